"""The shared "each shard writes, the last one merges" protocol, and merging again on its own."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from visionr1_jobs import shards
from visionr1_jobs.config import (
    Backend,
    InputLocation,
    ResolvedStageConfig,
    Sampling,
    SynthesisParams,
    Teacher,
)
from visionr1_jobs.contract import InvalidInput, StageManifest, read_manifest


def _cfg(ws: Path) -> ResolvedStageConfig:
    return ResolvedStageConfig(stage="eval", workspace=str(ws), output_dir="st", base_model="m")


def _merge(calls: list[int]) -> shards.Merge:
    def merge(markers: list[dict]) -> StageManifest:
        calls.append(len(markers))
        return StageManifest(stage="st", rows={"all": sum(m["rows"] for m in markers)})

    return merge


def test_only_a_shard_that_sees_every_marker_merges(tmp_path: Path) -> None:
    cfg, calls = _cfg(tmp_path), []
    assert shards.finish_shard(cfg, 2, 3, {"rows": 5}, _merge(calls)) is None
    assert shards.finish_shard(cfg, 0, 3, {"rows": 4}, _merge(calls)) is None
    assert calls == [] and read_manifest(tmp_path, "st") is None
    man = shards.finish_shard(cfg, 1, 3, {"rows": 1}, _merge(calls))
    assert man is not None and man.rows == {"all": 10} and calls == [3]
    assert read_manifest(tmp_path, "st") == man


def test_shards_finishing_together_merge_at_least_once(tmp_path: Path) -> None:
    cfg, calls = _cfg(tmp_path), []
    barrier = threading.Barrier(8)

    def finish(i: int) -> None:
        barrier.wait()
        shards.finish_shard(cfg, i, 8, {"rows": 1}, _merge(calls))

    threads = [threading.Thread(target=finish, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls and set(calls) == {8}
    assert read_manifest(tmp_path, "st").rows == {"all": 8}  # type: ignore[union-attr]


def test_merge_again_uses_the_plan_and_names_missing_shards(tmp_path: Path) -> None:
    cfg, calls = _cfg(tmp_path), []
    out = tmp_path / "st"
    with pytest.raises(shards.ShardsIncomplete, match="no shard has started"):
        shards.merge_again(cfg, _merge(calls))
    shards.agree_on_plan(out, {"shards": 3, "rows": 9}, "st")
    shards.write_marker(out, 1, {"rows": 3})
    with pytest.raises(shards.ShardsIncomplete, match=r"shard\(s\) \[0, 2\] of 3"):
        shards.merge_again(cfg, _merge(calls))
    shards.write_marker(out, 0, {"rows": 3})
    shards.write_marker(out, 2, {"rows": 3})
    first = shards.merge_again(cfg, _merge(calls))
    second = shards.merge_again(cfg, _merge(calls))  # idempotent: same manifest again
    assert first.rows == second.rows == {"all": 9} and calls == [3, 3]
    with pytest.raises(InvalidInput, match=r"different layout \{'shards': \(3, 4\)\}"):
        shards.agree_on_plan(out, {"shards": 4, "rows": 9}, "st")


def test_synthesis_merges_again_on_its_own(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from visionr1_jobs.stages import synthesis
    from visionr1_jobs.toy.dataset import write_toy_dataset

    write_toy_dataset(tmp_path / "toy", n=12, seed=4, n_rl=1, n_bench=1)
    toy = Teacher(backend=Backend(kind="toy"), sampling=Sampling(seed=3))
    cfg = ResolvedStageConfig(
        stage="synthesis",
        workspace=str(tmp_path),
        output_dir="synthesis",
        base_model="unused",
        inputs={"data": InputLocation(path="toy/train", format="toy")},
        params=SynthesisParams(describer=toy, reasoner=toy, rows_per_shard=4).dump(),
    )
    monkeypatch.setenv("VISIONR1_SHARDS", "2")
    monkeypatch.setenv("JOB_COMPLETION_INDEX", "0")
    assert synthesis.run(cfg) is None
    with pytest.raises(shards.ShardsIncomplete, match=r"shard\(s\) \[1\] of 2"):
        synthesis.merge(cfg)
    monkeypatch.setenv("JOB_COMPLETION_INDEX", "1")
    first = synthesis.run(cfg)
    assert first is not None and read_manifest(tmp_path, "synthesis") == first
    # The merging pod died before the manifest: merge again, generating nothing.
    (tmp_path / "synthesis" / "_manifest.json").unlink()
    monkeypatch.setattr(synthesis, "_teachers", lambda *a: pytest.fail("must not generate"))
    again = synthesis.merge(cfg)
    assert read_manifest(tmp_path, "synthesis") == again
    assert (again.rows, again.hashes, again.outputs) == (first.rows, first.hashes, first.outputs)
    assert again.metrics["rows"] == first.metrics["rows"] == first.rows["data"]
