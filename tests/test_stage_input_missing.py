"""A stage whose input stage has no ``_manifest.json`` exits 66 (retryable), not 65: the
producer's last merge may have been lost on a weakly consistent filesystem, and the operator
merges it again and retries (see the plan's RemergeStage)."""

from __future__ import annotations

from pathlib import Path

from visionr1_jobs.config import EXIT_INPUT_MISSING, InputLocation, ResolvedStageConfig
from visionr1_jobs.contract import StageManifest, input_path, run_stage, write_manifest


def config(tmp_path: Path) -> Path:
    cfg = ResolvedStageConfig(
        stage="filter",
        workspace=str(tmp_path),
        output_dir="filter",
        base_model="m",
        inputs={"data": InputLocation(path="synthesis", format="stage", stage="synthesis")},
    )
    path = tmp_path / "cfg.json"
    path.write_text(cfg.model_dump_json(by_alias=True))
    return path


def test_a_missing_input_manifest_exits_66_and_a_present_one_runs(tmp_path: Path) -> None:
    path = config(tmp_path)
    (tmp_path / "synthesis").mkdir()
    (tmp_path / "synthesis" / "shard-00000-00000.parquet").write_bytes(b"rows, no manifest")

    def stage(cfg: ResolvedStageConfig) -> StageManifest:
        data = input_path(cfg, "data")
        return StageManifest(stage="filter", outputs={"data": str(data)})

    assert run_stage(stage, str(path)) == EXIT_INPUT_MISSING == 66
    assert not (tmp_path / "filter" / "_manifest.json").exists()
    # the producer merged again: the retry finds its input
    producer = ResolvedStageConfig(
        stage="synthesis", workspace=str(tmp_path), output_dir="synthesis", base_model="m"
    )
    write_manifest(producer, StageManifest(stage="synthesis", outputs={"data": "synthesis"}))
    assert run_stage(stage, str(path)) == 0
    assert (tmp_path / "filter" / "_manifest.json").exists()
