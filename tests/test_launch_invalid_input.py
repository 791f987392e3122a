"""A rank's invalid input stays permanent through torchrun (which reports every failure as 1)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from visionr1_jobs.config import EXIT_INVALID_INPUT, ResolvedStageConfig
from visionr1_jobs.contract import INVALID_MARKER, InvalidInput, run_stage
from visionr1_jobs.training import launch


def _cfg(tmp_path: Path) -> Path:
    cfg = ResolvedStageConfig(
        stage="sft", workspace=str(tmp_path), output_dir="sft", base_model="m"
    )
    path = tmp_path / "cfg.json"
    path.write_text(cfg.model_dump_json(by_alias=True))
    return path


def test_a_rank_refusing_its_input_leaves_a_marker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LOCAL_RANK", "1")

    def refuse(cfg: ResolvedStageConfig) -> None:
        raise InvalidInput("row 7 of filter/data/part-0.parquet has no answer")

    assert run_stage(refuse, str(_cfg(tmp_path))) == EXIT_INVALID_INPUT
    assert "row 7" in (tmp_path / "sft" / INVALID_MARKER).read_text()


def test_the_launcher_turns_the_marker_into_invalid_input(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "sft"
    folder.mkdir()
    (folder / INVALID_MARKER).write_text("stale from an earlier attempt\n")
    # Stands in for torchrun: one child writes the marker, torchrun exits 1.
    child = (
        "import pathlib, sys; "
        f"pathlib.Path({str(folder / INVALID_MARKER)!r}).write_text('bad row 3'); sys.exit(1)"
    )
    monkeypatch.setattr(launch, "torchrun_command", lambda *a: [sys.executable, "-c", child])
    with pytest.raises(InvalidInput, match="bad row 3"):
        launch.relaunch("sft", "{}", folder)


def test_a_plain_crash_under_torchrun_stays_retryable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "sft"
    folder.mkdir()
    (folder / INVALID_MARKER).write_text("stale from an earlier attempt\n")
    monkeypatch.setattr(
        launch, "torchrun_command", lambda *a: [sys.executable, "-c", "raise SystemExit(1)"]
    )
    assert launch.relaunch("sft", "{}", folder) == 1  # the stale marker was cleared first
