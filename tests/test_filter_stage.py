"""The filter's cross-sample parts: worker processes, dedupe, the stage's own checks."""

from __future__ import annotations

from pathlib import Path

import pytest

from visionr1_jobs.config import FilterParams, InputLocation, ResolvedStageConfig
from visionr1_jobs.contract import InvalidInput, StageManifest, write_manifest
from visionr1_jobs.data.io import read_records, write_records
from visionr1_jobs.data.record import Sample
from visionr1_jobs.filtering import rules as R
from visionr1_jobs.filtering.rules import RuleSet
from visionr1_jobs.filtering.select import filter_samples

RULES = RuleSet.from_params(FilterParams())
THINK = "Hmm, the description says {n} dots. Wait, let me recount: {n}. So the answer is {n}."


def good(n: int) -> str:
    return f"<think> {THINK.format(n=n)} </think><answer> Final Answer:{n} </answer>"


def sample(
    i: int,
    response: str | None,
    answer: str = "3",
    question: str | None = None,
    images: list[str] | None = None,
) -> Sample:
    return Sample(
        id=f"s{i}",
        question=question or f"How many dots in picture {i}?",
        answer=answer,
        response=response,
        images=images or [],
    )


def mixed(n: int) -> list[Sample]:
    """Every kind of verdict, repeated: kept, wrong, malformed, inconsistent, empty."""
    kinds = [
        lambda i: sample(i, good(3)),
        lambda i: sample(i, good(4)),
        lambda i: sample(i, good(3).replace("</think>", "")),
        lambda i: sample(i, good(3).replace("So the answer is 3.", "So the answer is 5.")),
        lambda i: sample(i, None),
        lambda i: sample(i, good(3) + " ok?"),
        lambda i: sample(i, good(12), answer="\\frac{24}{2}"),
    ]
    return [kinds[i % len(kinds)](i) for i in range(n)]


def test_two_workers_give_the_same_verdicts_as_one() -> None:
    samples = mixed(140)
    one = filter_samples(samples, RULES, workers=1)
    two = filter_samples(samples, RULES, workers=2)
    assert [(v.key, v.reason, v.response) for v in one.verdicts] == [
        (v.key, v.reason, v.response) for v in two.verdicts
    ]
    assert [v.key for v in two.verdicts] == list(range(140))
    assert one.counts == two.counts
    assert one.counts["kept"] == 40  # kinds 0 and 6 (12 == 24/2 via math-verify)
    assert one.counts[R.WRONG_ANSWER] == 20 and one.counts[R.UNBALANCED_TAGS] == 20
    assert one.counts[R.INCONSISTENT] == 20 and one.counts[R.EMPTY] == 20
    assert one.counts[R.TEXT_OUTSIDE_TAGS] == 20


def test_dedupe_keeps_the_first_surviving_copy() -> None:
    q = "How many dots?"
    samples = [
        sample(0, good(4), question=q, images=["/img/a.png"]),  # wrong: does not shadow the next
        sample(1, good(3), question=q, images=["/img/a.png"]),  # kept
        sample(2, good(3), question="how many  DOTS?", images=["/img/a.png"]),  # same, respelled
        sample(3, good(3), question=q, images=["/img/b.png"]),  # another image: kept
    ]
    result = filter_samples(samples, RULES, workers=1)
    assert [v.reason for v in result.verdicts] == [R.WRONG_ANSWER, None, R.DUPLICATE, None]
    assert [s.id for s in result.kept] == ["s1", "s3"]
    assert result.counts[R.DUPLICATE] == 1
    off = filter_samples(samples, RULES, workers=1, dedupe=False)
    assert [s.id for s in off.kept] == ["s1", "s2", "s3"]


def test_kept_rows_are_rewritten_and_carry_no_raw_audit(tmp_path: Path) -> None:
    s = sample(0, good(3)).model_copy(update={"raw": {"reasoner": "x"}, "metadata": {"kind": "k"}})
    (kept,) = filter_samples([s], RULES, workers=1).kept
    assert kept.response == good(3).replace("the description says", "the image shows")
    assert kept.raw == {} and kept.metadata == {"kind": "k", "filter": {"replacements": 1}}


def _stage_cfg(ws: Path, **params: object) -> ResolvedStageConfig:
    return ResolvedStageConfig(
        stage="filter",
        workspace=str(ws),
        output_dir="filter",
        base_model="unused",
        inputs={"data": InputLocation(path="synthesis", format="stage", stage="synthesis")},
        params=FilterParams(**params).dump(),
        mlflow={"trackingUri": f"sqlite:///{ws / 'mlflow.db'}"},
    )


def test_the_filter_is_one_pod_and_needs_a_finished_synthesis(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from visionr1_jobs.stages import filter as filter_stage

    with pytest.raises(InvalidInput, match="stage 'synthesis' has not finished"):
        filter_stage.run(_stage_cfg(tmp_path))
    monkeypatch.setenv("VISIONR1_SHARDS", "3")
    with pytest.raises(InvalidInput, match="filter runs as one pod"):
        filter_stage.run(_stage_cfg(tmp_path))


def test_stage_rewrites_output_from_scratch_after_a_crash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from visionr1_jobs.stages import filter as filter_stage

    monkeypatch.setenv("RANK", "1")  # not rank 0: no MLflow run (and no store to create)

    img = tmp_path / "dot.png"
    from PIL import Image

    Image.new("RGB", (8, 8), "red").save(img)
    write_records(
        [sample(i, good(3), question=f"q{i}", images=[str(img)]) for i in range(5)],
        tmp_path / "synthesis",
        prefix="shard-00000",
    )
    cfg = _stage_cfg(tmp_path, rows_per_shard=2)
    write_manifest(
        cfg.model_copy(update={"stage": "synthesis", "output_dir": "synthesis"}),
        StageManifest(stage="synthesis", outputs={"data": "synthesis"}),
    )
    # A dead earlier attempt left more shards than this run will write.
    write_records([sample(9, good(3))], tmp_path / "filter" / "data", prefix="shard", start_index=7)
    man = filter_stage.run(cfg)
    assert man.mlflow_run_id is None and not (tmp_path / "mlflow.db").exists()
    files = sorted(p.name for p in (tmp_path / "filter" / "data").glob("*.parquet"))
    assert files == ["shard-00000.parquet", "shard-00001.parquet", "shard-00002.parquet"]
    kept = read_records(tmp_path / "filter" / "data")
    assert [k.id for k in kept] == [f"s{i}" for i in range(5)] and man.rows["data"] == 5
    # One image, stored once beside the data.
    assert len({k.images[0] for k in kept}) == 1
    assert len(list((tmp_path / "filter" / "data" / "images").rglob("*.png"))) == 1
