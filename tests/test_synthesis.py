"""Synthesis (modality bridging) with the toy teacher stand-ins, then the filter, end to end:
shards, chunk files, manifest, raw audit fields, drop reasons, output schema, MLflow read back."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any

import pytest

from visionr1_jobs.config import (
    Backend,
    FilterParams,
    InputLocation,
    MlflowRef,
    ResolvedStageConfig,
    Sampling,
    SynthesisParams,
    Teacher,
)
from visionr1_jobs.contract import InvalidInput, read_manifest, run_stage, sha256_file
from visionr1_jobs.data.io import read_records
from visionr1_jobs.filtering.rules import REASONS
from visionr1_jobs.synthesis import shards as S
from visionr1_jobs.synthesis import toy_logic
from visionr1_jobs.synthesis.prompts import load_prompts

N_ROWS = 60
TARGET = re.compile(r"<think> .+ </think><answer> Final Answer:\S(?:.*\S)? </answer>", re.S)


def toy_teacher(seed: int = 7, config: Path | None = None) -> Teacher:
    backend = Backend(kind="toy", model=str(config) if config else None)
    return Teacher(backend=backend, sampling=Sampling(seed=seed))


def toy_config(folder: Path, error_rate: float, inconsistent_rate: float) -> Path:
    """The toy stand-ins' own settings file (never part of the production schema)."""
    path = folder / f"toy-teachers-{error_rate}-{inconsistent_rate}.json"
    path.write_text(json.dumps({"errorRate": error_rate, "inconsistentRate": inconsistent_rate}))
    return path


def synthesis_cfg(ws: Path, mlflow_db: Path, **params: Any) -> ResolvedStageConfig:
    p = SynthesisParams(
        describer=toy_teacher(),
        reasoner=toy_teacher(config=toy_config(ws, 0.25, 0.15)),
        rows_per_shard=16,
        **params,
    )
    return ResolvedStageConfig(
        stage="synthesis",
        workspace=str(ws),
        output_dir="synthesis",
        base_model="unused",
        inputs={"data": InputLocation(path="toy/train", format="toy")},
        params=p.dump(),
        mlflow=MlflowRef(tracking_uri=f"sqlite:///{mlflow_db}", experiment="synthesis-tests"),
    )


def filter_cfg(ws: Path, mlflow_db: Path, **params: Any) -> ResolvedStageConfig:
    return ResolvedStageConfig(
        stage="filter",
        workspace=str(ws),
        output_dir="filter",
        base_model="unused",
        inputs={"data": InputLocation(path="synthesis", format="stage", stage="synthesis")},
        params=FilterParams(**params).dump(),
        mlflow=MlflowRef(tracking_uri=f"sqlite:///{mlflow_db}", experiment="synthesis-tests"),
    )


@pytest.fixture(scope="module")
def mlflow_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # One store for the module: creating MLflow's sqlite schema costs seconds.
    return tmp_path_factory.mktemp("mlflow") / "mlflow.db"


@pytest.fixture(scope="module")
def toy_ws(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from visionr1_jobs.toy.dataset import write_toy_dataset

    ws = tmp_path_factory.mktemp("ws")
    write_toy_dataset(ws / "toy", n=N_ROWS, seed=5, n_rl=1, n_bench=1)
    return ws


@pytest.fixture(scope="module")
def synthesized(toy_ws: Path, mlflow_db: Path) -> dict[str, Any]:
    """Synthesis as an Indexed Job of 2: shard 1 finishes first (no manifest), then shard 0."""
    from visionr1_jobs.stages import synthesis

    mp = pytest.MonkeyPatch()
    cfg = synthesis_cfg(toy_ws, mlflow_db)
    try:
        mp.setenv("VISIONR1_SHARDS", "2")
        mp.setenv("JOB_COMPLETION_INDEX", "1")
        first_result = synthesis.run(cfg)
        manifest_after_first = read_manifest(toy_ws, "synthesis")
        mp.setenv("JOB_COMPLETION_INDEX", "0")
        manifest = synthesis.run(cfg)
    finally:
        mp.undo()
    return {
        "cfg": cfg,
        "first_result": first_result,
        "early": manifest_after_first,
        "manifest": manifest,
    }


def test_indexed_shards_write_chunks_and_only_the_last_writes_the_manifest(
    synthesized: dict[str, Any], toy_ws: Path
) -> None:
    assert synthesized["first_result"] is None and synthesized["early"] is None
    man = synthesized["manifest"]
    assert man.outputs == {"data": "synthesis"} and man.rows == {"data": N_ROWS}
    out = toy_ws / "synthesis"
    # 30 rows per shard in chunks of 16: 16 + 14 each.
    names = sorted(p.name for p in out.glob("*.parquet"))
    assert names == [f"shard-0000{s}-0000{c}.parquet" for s in (0, 1) for c in (0, 1)]
    assert {Path(k).name: v for k, v in man.hashes.items()} == {
        n: sha256_file(out / n) for n in names
    }
    markers = S.read_markers(out, 2)
    assert markers is not None and [m["rows"] for m in markers] == [30, 30]
    assert man.metrics["rows"] == N_ROWS and man.metrics["samples_per_s"] > 0
    assert man.metrics["tokens_per_s"] > 0 and man.metrics["tokens.reasoner"] > 0
    assert "TOY STAND-IN" in man.extra["describer"] and "TOY STAND-IN" in man.extra["reasoner"]
    assert set(man.extra["prompts_sha256"]) == {
        "pseudo_cot",
        "description",
        "reasoner",
        "reasoner_with_answer",
    }


def test_every_input_row_once_with_raw_teacher_outputs(
    synthesized: dict[str, Any], toy_ws: Path
) -> None:
    rows = read_records(toy_ws / "synthesis")
    inputs = read_records(toy_ws / "toy" / "train")
    assert [r.id for r in rows] == [s.id for s in inputs]  # order kept, no duplicates, none missing
    for row, src in zip(rows, inputs, strict=True):
        assert row.question == src.question and row.answer == src.answer
        assert Path(row.images[0]).read_bytes() == Path(src.images[0]).read_bytes()
        assert row.raw["pseudo_cot"].startswith("Caption:")
        assert row.raw["description"] == toy_logic.describe_scene(src.metadata["scene"])
        assert row.raw["description"] in row.raw["reasoner_prompt"]
        assert "### Reference answer" in row.raw["reasoner_prompt"]  # giveAnswerToReasoner
        assert row.raw["reasoner"] == row.response
        assert (
            "TOY STAND-IN" in row.raw["describer_model"]
            and "TOY STAND-IN" in row.raw["reasoner_model"]
        )
        assert row.raw["tokens"]["reasoner"] == len(row.response.split())
    behaviours = {r.raw["toy_behaviour"].split(":")[0] for r in rows}
    assert behaviours == {"correct", "wrong", "inconsistent"}
    # Correct chains come direct or in the hesitant R1 style (the share PTST has to squeeze).
    correct = [r for r in rows if r.raw["toy_behaviour"] == "correct"]
    hesitant = [r for r in correct if "Alternatively" in r.response]
    assert 0 < len(hesitant) < len(correct)
    assert all(re.search(r"\b(Hmm|Wait)\b", r.response) for r in hesitant)
    assert all(
        len(r.response) < min(len(h.response) for h in hesitant)
        for r in correct
        if r not in hesitant
    )


def test_mlflow_has_prompts_hashes_teachers_and_throughput(
    synthesized: dict[str, Any], mlflow_db: Path
) -> None:
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{mlflow_db}")
    run = client.get_run(synthesized["manifest"].mlflow_run_id)
    prompts = load_prompts("v1")
    for step, prompt in prompts.items():
        assert run.data.params[f"prompt.{step}.sha256"] == prompt.sha256
        path = client.download_artifacts(run.info.run_id, f"prompts/v1/{step}.txt")
        assert Path(path).read_text() == prompt.text
    assert run.data.params["rowsPerShard"] == "16"
    assert run.data.params["reasoner.backend.kind"] == "toy"
    assert run.data.tags["visionr1.toy_stand_in"] == "describer,reasoner"
    assert "TOY STAND-IN" in run.data.tags["visionr1.reasoner"]
    assert run.data.metrics["rows"] == N_ROWS
    assert run.data.metrics["samples_per_s"] > 0 and run.data.metrics["tokens_per_s"] > 0
    history = client.get_metric_history(run.info.run_id, "chunk.samples_per_s")
    assert sorted(m.step for m in history) == [0, 16]  # shard 0's chunks (rows 0 and 16)


def test_filter_turns_synthesis_into_vision_r1_cold(
    synthesized: dict[str, Any], toy_ws: Path, mlflow_db: Path
) -> None:
    import mlflow

    from visionr1_jobs.stages import filter as filter_stage

    cfg = filter_cfg(toy_ws, mlflow_db, workers=2, sample_rows=5)
    man = filter_stage.run(cfg)
    assert man.outputs == {"data": "filter/data"}
    kept = read_records(toy_ws / "filter" / "data")
    inputs = {r.id: r for r in read_records(toy_ws / "synthesis")}
    assert len(kept) == man.rows["data"] and man.rows["input"] == N_ROWS
    # Wrong answers are dropped, inconsistent or malformed ones too; correct ones survive.
    behaviour = {i: r.raw["toy_behaviour"] for i, r in inputs.items()}
    assert {behaviour[k.id] for k in kept} == {"correct"}
    assert len(kept) == sum(1 for b in behaviour.values() if b == "correct")
    for row in kept:
        assert TARGET.fullmatch(row.response), row.response
        assert row.response.endswith(f" Final Answer:{row.answer} </answer>")
        assert "description" not in row.response.lower()  # wording replaced
        assert row.raw == {} and row.images and Path(row.images[0]).is_file()
        assert (
            str(toy_ws / "filter" / "data" / "images") in row.images[0]
        )  # images stored with the data
    # Every dropped row has a reason; counts add up.
    verdicts = [
        json.loads(line) for line in (toy_ws / "filter" / "verdicts.jsonl").read_text().splitlines()
    ]
    assert [v["id"] for v in verdicts] == list(inputs)
    dropped = [v for v in verdicts if not v["kept"]]
    assert all(v["reason"] in REASONS for v in dropped)
    counts = man.extra["drop_reasons"]
    assert sum(counts.values()) == len(dropped) == N_ROWS - len(kept)
    # Each thing the toy reasoner did on purpose is caught by the rule meant for it.
    expected = {
        "correct": None,
        "wrong": "wrong_answer",
        "inconsistent:contradiction": "inconsistent",
        "inconsistent:two_answers": "repeated_tags",
        "inconsistent:unclosed_think": "unbalanced_tags",
        "inconsistent:repeated_answer": "multiple_answers",
        "inconsistent:no_final": "no_final_answer",
        "inconsistent:loop": "repetition",
        "inconsistent:text_after": "text_outside_tags",
        "inconsistent:cites_reference": "answer_leak",
    }
    assert {v["id"]: v["reason"] for v in verdicts} == {
        i: expected[b] for i, b in behaviour.items()
    }
    # MLflow: per-reason counts as metrics, samples of kept and dropped rows as an artifact.
    client = mlflow.MlflowClient(f"sqlite:///{mlflow_db}")
    run = client.get_run(man.mlflow_run_id)
    assert run.data.metrics["kept"] == len(kept)
    assert run.data.metrics["keep_rate"] == pytest.approx(len(kept) / N_ROWS)
    for reason in REASONS:
        assert run.data.metrics[f"dropped.{reason}"] == counts.get(reason, 0)
    assert run.data.params["workers"] == "2"
    sample = json.loads(
        Path(client.download_artifacts(run.info.run_id, "filter_samples.json")).read_text()
    )
    assert len(sample["kept"]) == 5 and 0 < len(sample["dropped"]) <= 5
    assert all(d["reason"] and d["detail"] for d in sample["dropped"])
    assert len({d["reason"] for d in sample["dropped"]}) > 1  # spread over the reasons


def test_invalid_inputs_exit_65(toy_ws: Path, mlflow_db: Path, tmp_path: Path) -> None:
    import io

    from visionr1_jobs.stages import filter as filter_stage
    from visionr1_jobs.stages import synthesis

    base = synthesis_cfg(toy_ws, mlflow_db)
    elsewhere = {"workspace": str(tmp_path)}
    cases = [
        (
            synthesis,
            "nope: no such file",
            base.model_copy(
                update={"inputs": {"data": InputLocation(path="nope", format="toy")}, **elsewhere}
            ),
        ),
        (
            synthesis,
            "promptsVersion 'v99'",
            base.model_copy(
                update={"params": {**base.params, "promptsVersion": "v99"}, **elsewhere}
            ),
        ),
        (
            filter_stage,
            "no row has a 'response'",
            filter_cfg(toy_ws, mlflow_db).model_copy(
                update={
                    "output_dir": "filter2",
                    "inputs": {"data": InputLocation(path="toy/train", format="toy")},
                }
            ),
        ),
    ]
    for module, message, cfg in cases:
        path = tmp_path / "cfg.json"
        path.write_text(cfg.model_dump_json(by_alias=True))
        err = io.StringIO()
        assert run_stage(module.run, str(path), out=err) == 65
        assert message in err.getvalue(), err.getvalue()


def test_toy_describer_refuses_non_toy_rows(tmp_path: Path, mlflow_db: Path) -> None:
    from visionr1_jobs.data.io import write_records
    from visionr1_jobs.data.record import Sample
    from visionr1_jobs.stages import synthesis

    write_records([Sample(id="x", question="q?", answer="1")], tmp_path / "plain")
    cfg = synthesis_cfg(tmp_path, mlflow_db).model_copy(
        update={"inputs": {"data": InputLocation(path="plain", format="visionr1")}}
    )
    with pytest.raises(InvalidInput, match="row 'x' has no toy scene"):
        synthesis.run(cfg)


def test_resuming_under_another_layout_is_refused(tmp_path: Path) -> None:
    S.agree_on_plan(tmp_path, {"shards": 2, "rows_per_shard": 16, "rows": 60})
    S.agree_on_plan(tmp_path, {"shards": 2, "rows_per_shard": 16, "rows": 60})
    with pytest.raises(InvalidInput, match="different layout"):
        S.agree_on_plan(tmp_path, {"shards": 3, "rows_per_shard": 16, "rows": 60})


@pytest.mark.parametrize(
    ("rows", "count", "per_chunk"), [(60, 2, 16), (7, 3, 2), (5, 8, 4), (1000, 7, 33)]
)
def test_chunks_cover_every_row_exactly_once(rows: int, count: int, per_chunk: int) -> None:
    covered = [
        i
        for k in range(count)
        for c in S.plan_chunks(rows, k, count, per_chunk)
        for i in range(c.start, c.end)
    ]
    assert covered == list(range(rows))
    assert all(
        0 < c.rows <= per_chunk
        for k in range(count)
        for c in S.plan_chunks(rows, k, count, per_chunk)
    )


# --------------------------------------------------------------------------- toy stand-ins


def _reasoner_prompt(problem: Any, with_answer: bool = True) -> str:
    p = load_prompts("v1")["reasoner_with_answer" if with_answer else "reasoner"]
    return p.render(
        description=toy_logic.describe_scene(problem.scene),
        question=problem.question,
        answer=problem.answer,
    )


def test_toy_reasoner_solves_from_the_description_text_alone() -> None:
    from visionr1_jobs.answers import extract_answer
    from visionr1_jobs.toy.world import generate

    problems = [p for p, _ in generate(30, 11, "train")]
    for i, problem in enumerate(problems):
        # Without the reference answer, and with no errors: every answer is right.
        text, how = toy_logic.reason(_reasoner_prompt(problem, False), random.Random(i), 0.0, 0.0)
        assert how == "correct" and extract_answer(text) == problem.answer, (problem.question, text)
        assert TARGET.fullmatch(text)


def test_toy_reasoner_rates_and_determinism(tmp_path: Path) -> None:
    from visionr1_jobs.generation import get_backend, user
    from visionr1_jobs.toy.world import generate

    prompts = [_reasoner_prompt(p) for p, _ in generate(300, 2, "train")]
    backend = get_backend(Backend(kind="toy", model=str(toy_config(tmp_path, 0.3, 0.2))))
    reqs = [user(t, visionr1_step="reasoner") for t in prompts]
    a = backend.generate(reqs, Sampling(seed=1))
    b = backend.generate(reqs, Sampling(seed=1))
    c = backend.generate(reqs, Sampling(seed=2))
    assert [g.text for g in a] == [g.text for g in b]
    assert [g.text for g in a] != [g.text for g in c]
    kinds = [g.behaviour.split(":")[0] for g in a]  # type: ignore[attr-defined]
    assert 0.2 < kinds.count("wrong") / 300 < 0.4
    assert 0.12 < kinds.count("inconsistent") / 300 < 0.28
    assert (
        sum("The description" in g.text or "According to the description" in g.text for g in a) > 30
    )


def test_toy_knobs_are_not_in_the_production_schema(tmp_path: Path) -> None:
    from pydantic import ValidationError

    from visionr1_jobs.generation import get_backend

    # A real backend refuses toy fields; the toy kind keeps its settings in its own file.
    for kind in ("openai", "toy", "vllm"):
        with pytest.raises(ValidationError, match="toyErrorRate|toy_error_rate"):
            Backend.model_validate({"kind": kind, "baseUrl": "http://x/v1", "toyErrorRate": 0.3})
    assert not any("toy" in name.lower() for name in Backend.model_json_schema()["properties"])
    bad = tmp_path / "bad.json"
    bad.write_text('{"errorRate": 2}')
    with pytest.raises(InvalidInput, match="backend.model .*errorRate"):
        get_backend(Backend(kind="toy", model=str(bad)))
    with pytest.raises(InvalidInput, match="backend.model .*JSON file"):
        get_backend(Backend(kind="toy", model=str(tmp_path / "missing.json")))
    assert get_backend(Backend(kind="toy")).error_rate == 0.3  # type: ignore[attr-defined]


def test_toy_describer_needs_the_scene() -> None:
    from visionr1_jobs.generation import get_backend, user

    backend = get_backend(Backend(kind="toy"))
    with pytest.raises(ValueError, match="toy world|toy data"):
        backend.generate([user("describe", visionr1_step="description", sample_id="r1")])


def test_more_shards_than_rows_and_any_finishing_order(
    tmp_path: Path, mlflow_db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from visionr1_jobs.stages import synthesis
    from visionr1_jobs.toy.dataset import write_toy_dataset

    write_toy_dataset(tmp_path / "toy", n=3, seed=2, n_rl=1, n_bench=1)
    cfg = synthesis_cfg(tmp_path, mlflow_db)
    monkeypatch.setenv("RANK", "1")  # not rank 0: no MLflow run, the files alone must be right
    monkeypatch.setenv("VISIONR1_SHARDS", "4")
    for index in (2, 3, 1):  # shard 0 has no rows (3 rows over 4 shards) and finishes last
        monkeypatch.setenv("JOB_COMPLETION_INDEX", str(index))
        assert synthesis.run(cfg) is None
        assert read_manifest(tmp_path, "synthesis") is None
    monkeypatch.setenv("JOB_COMPLETION_INDEX", "0")
    man = synthesis.run(cfg)
    assert man.rows == {"data": 3} and man.mlflow_run_id is None
    assert read_manifest(tmp_path, "synthesis") == man
    assert [r.id for r in read_records(tmp_path / "synthesis")] == [
        s.id for s in read_records(tmp_path / "toy" / "train")
    ]
    # A pod of a finished stage that runs again (a retried index) changes nothing.
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "synthesis").glob("*.parquet")}
    monkeypatch.setenv("JOB_COMPLETION_INDEX", "2")
    assert synthesis.run(cfg).rows == {"data": 3}
    assert {
        p.name: p.stat().st_mtime_ns for p in (tmp_path / "synthesis").glob("*.parquet")
    } == before
