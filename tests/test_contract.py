"""The stage contract's small pieces: atomic files, manifests, shards, progress lines."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from visionr1_jobs.config import ResolvedStageConfig
from visionr1_jobs.contract import (
    InvalidInput,
    StageManifest,
    atomic_path,
    atomic_write,
    parse_progress,
    read_manifest,
    run_stage,
    shard_from_env,
)


def test_atomic_write_leaves_nothing_behind_on_failure(tmp_path: Path) -> None:
    dest = tmp_path / "out" / "data.parquet"
    with pytest.raises(RuntimeError), atomic_path(dest) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed mid-write")
    assert not dest.exists() and list(dest.parent.iterdir()) == []
    atomic_write(dest, "whole")
    assert dest.read_text() == "whole"
    # Readable by the next stage's pod, whatever uid it runs as (mkstemp would give 0600).
    assert stat.S_IMODE(os.stat(dest).st_mode) & 0o044 == 0o044


def test_progress_lines_are_found_after_a_tqdm_redraw() -> None:
    line = ' 1%|  | 2/340 [00:00<02:29]VISIONR1_PROGRESS {"stage": "sft", "done": 2, "total": 340}'
    assert parse_progress(line) == {"stage": "sft", "done": 2, "total": 340}
    assert parse_progress("loss 0.3") is None
    assert parse_progress("VISIONR1_PROGRESS {not json") is None


def test_shards_from_an_indexed_job() -> None:
    assert shard_from_env({"JOB_COMPLETION_INDEX": "3", "VISIONR1_SHARDS": "8"}) == (3, 8)
    assert shard_from_env({}) == (0, 1)
    with pytest.raises(InvalidInput, match="JOB_COMPLETION_INDEX=8"):
        shard_from_env({"JOB_COMPLETION_INDEX": "8", "VISIONR1_SHARDS": "8"})


def test_run_stage_writes_the_manifest_last_and_skips_a_done_stage(tmp_path: Path) -> None:
    cfg = ResolvedStageConfig(
        stage="filter", workspace=str(tmp_path), output_dir="filter", base_model="m"
    )
    path = tmp_path / "cfg.json"
    path.write_text(cfg.model_dump_json(by_alias=True))
    calls: list[str] = []

    def stage(c: ResolvedStageConfig) -> StageManifest:
        calls.append(c.stage)
        assert read_manifest(tmp_path, "filter") is None  # not done while it runs
        return StageManifest(stage="filter", outputs={"data": "filter/data"}, rows={"data": 3})

    assert run_stage(stage, str(path)) == 0
    assert read_manifest(tmp_path, "filter").outputs == {"data": "filter/data"}
    assert run_stage(stage, str(path)) == 0 and calls == ["filter"]


def test_run_stage_maps_a_bad_config_to_exit_65(tmp_path: Path) -> None:
    path = tmp_path / "cfg.json"
    path.write_text(
        '{"stage": "grpo", "workspace": "/w", "outputDir": "grpo", "baseModel": "m",'
        ' "params": {"ptst": []}}'
    )
    assert run_stage(lambda c: None, str(path)) == 65
    assert run_stage(lambda c: None, str(tmp_path / "missing.json")) == 65
