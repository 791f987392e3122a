"""The eval stage program: shards, re-asks, merge, report, plot, manifest and MLflow metrics."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from visionr1_jobs.config import (
    Backend,
    Benchmark,
    EvalParams,
    InputLocation,
    MlflowRef,
    ResolvedStageConfig,
)
from visionr1_jobs.contract import StageManifest, read_manifest, write_manifest
from visionr1_jobs.generation import Generation, GenerationBackend
from visionr1_jobs.stages import eval as eval_stage


class ScriptedBackend(GenerationBackend):
    """Answers the toy problem whose text it sees: correct for the 'good' checkpoint, a wrong
    number for the other; the first ask of every second problem is cut before ``</answer>``."""

    kind = "scripted"

    def __init__(
        self, model: str, answers: dict[tuple[str, str], str], log: list[tuple[str, int]]
    ) -> None:
        self.model, self.answers, self.log = model, answers, log
        self.seen: dict[str, int] = {}

    def _generate(self, requests, sampling):  # type: ignore[no-untyped-def]
        out = []
        for req in requests:
            (msg,) = req.messages  # no system prompt
            assert msg["role"] == "user" and req.images
            q = (msg["content"], req.images[0])  # toy questions repeat; the image differs
            self.seen[q] = self.seen.get(q, 0) + 1
            self.log.append((self.model, sampling.max_tokens))
            gold = self.answers[q]
            ans = gold if self.model.endswith("good") else gold + "1"
            text = f"<think> looking </think><answer> Final Answer:{ans} </answer>"
            if self.seen[q] == 1 and sorted(self.answers).index(q) % 2 == 0:
                text = "<think> looking and looking"
            out.append(Generation(text=text, completion_tokens=len(text) // 4))
        return out


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    from visionr1_jobs.toy.dataset import write_toy_dataset

    write_toy_dataset(tmp_path / "toy", n=2, n_bench=6, seed=3)
    # A finished grpo stage with PTST sub-stage outputs, as the grpo stage will leave it.
    cfg = ResolvedStageConfig(
        stage="grpo", workspace=str(tmp_path), output_dir="grpo", base_model="m"
    )
    write_manifest(
        cfg,
        StageManifest(
            stage="grpo", outputs={"model": "grpo/final", "stage-1": "grpo/stage-1/final-good"}
        ),
    )
    return tmp_path


def _cfg(ws: Path, **params: object) -> ResolvedStageConfig:
    p = EvalParams(
        benchmarks=[Benchmark(name="toy", path="toy/bench")],
        checkpoints=["base", "grpo/stage-1"],
        max_new_tokens=64,
        retries_missing_answer=2,
        **params,
    )
    return ResolvedStageConfig(
        stage="eval",
        workspace=str(ws),
        output_dir="eval",
        base_model="models/base",
        inputs={
            "checkpoint:base": InputLocation(path="models/base", format="model"),
            "checkpoint:grpo/stage-1": InputLocation(path="grpo", format="stage", stage="grpo"),
        },
        params=p.dump(),
        mlflow=MlflowRef(tracking_uri=f"sqlite:///{ws / 'mlflow.db'}", experiment="t"),
    )


def test_two_shards_then_merge_report_plot_and_mlflow(
    workspace: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from visionr1_jobs.eval.readers import read_benchmark

    rows = read_benchmark("toy", workspace / "toy" / "bench").rows
    answers = {(r["question"], r["images"][0]): r["answer"] for r in rows}
    log: list[tuple[str, int]] = []

    def factory(model: str, params: EvalParams) -> GenerationBackend:
        return ScriptedBackend(model, answers, log)

    cfg = _cfg(workspace)
    monkeypatch.setenv("VISIONR1_SHARDS", "2")
    monkeypatch.setenv("JOB_COMPLETION_INDEX", "1")
    # Not the last shard: it returns no manifest (run_stage then exits 0 without writing one).
    assert eval_stage.run(cfg, factory) is None
    assert read_manifest(workspace, "eval") is None
    assert (workspace / "eval/base/toy.shard-00001-of-00002.jsonl").exists()

    monkeypatch.setenv("JOB_COMPLETION_INDEX", "0")
    man = eval_stage.run(cfg, factory)
    assert read_manifest(workspace, "eval") == man
    assert {m for m, _ in log} == {"models/base", str(workspace / "grpo/stage-1/final-good")}
    assert {t for _, t in log} == {64}

    out = workspace / "eval"
    good = json.loads((out / "grpo-stage-1" / "toy.json").read_text())
    bad = json.loads((out / "base" / "toy.json").read_text())
    assert (good["n"], good["accuracy"], good["format_rate"]) == (6, 1.0, 1.0)
    assert bad["accuracy"] == 0.0 and good["settings"]["temperature"] == 0.6
    verdicts = [
        json.loads(x) for x in (out / "base" / "toy.verdicts.jsonl").read_text().splitlines()
    ]
    assert len(verdicts) == 6
    assert sorted(v["attempts"] for v in verdicts) == [1, 1, 1, 2, 2, 2]  # re-asked when cut
    assert all(len(v["responses"]) == v["attempts"] and "verdict" in v for v in verdicts)
    md = (out / "report.md").read_text()
    assert "| grpo/stage-1 | 100.0 |" in md and "paper" not in md.split("## Format")[0]
    assert (out / "accuracy.png").read_bytes()[:4] == b"\x89PNG"
    assert man.metrics["grpo-stage-1.toy.accuracy"] == 1.0

    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{workspace / 'mlflow.db'}")
    run = mlflow.get_run(man.mlflow_run_id)
    assert run.data.metrics["grpo-stage-1.toy.accuracy"] == 1.0
    assert run.data.metrics["base.toy.format_rate"] == 1.0
    assert "base.toy.mean_response_tokens" in run.data.metrics
    arts = {a.path for a in mlflow.MlflowClient().list_artifacts(man.mlflow_run_id)}
    assert {"report.md", "report.json", "accuracy.png", "base", "grpo-stage-1"} <= arts


def test_missing_checkpoint_stage_output_is_invalid_input(workspace: Path) -> None:
    from visionr1_jobs.contract import InvalidInput

    cfg = _cfg(workspace)
    cfg.inputs["checkpoint:grpo/stage-9"] = InputLocation(path="grpo", format="stage", stage="grpo")
    with pytest.raises(InvalidInput, match="stage-9"):
        eval_stage.run(cfg, lambda m, p: pytest.fail("must not generate"))


@pytest.mark.slow
def test_tiny_model_on_toy_benchmark_end_to_end(tmp_path: Path) -> None:
    """The real path: ``python -m visionr1_jobs eval`` with the tiny Qwen2.5-VL (transformers)."""
    import subprocess
    import sys

    from visionr1_jobs.toy.dataset import write_toy_dataset
    from visionr1_jobs.toy.model import create_tiny_model

    ws = tmp_path
    write_toy_dataset(ws / "toy", n=2, n_bench=3, seed=0)
    create_tiny_model(ws / "models" / "tiny")
    p = EvalParams(
        benchmarks=[Benchmark(name="toy", path="toy/bench")],
        checkpoints=["base"],
        max_new_tokens=8,
        retries_missing_answer=1,
        backend=Backend(kind="transformers"),
    )
    cfg = ResolvedStageConfig(
        stage="eval",
        workspace=str(ws),
        output_dir="eval",
        base_model="models/tiny",
        inputs={"checkpoint:base": InputLocation(path="models/tiny", format="model")},
        params=p.dump(),
        mlflow=MlflowRef(tracking_uri=f"sqlite:///{ws / 'mlflow.db'}", experiment="e2e"),
    )
    (ws / "cfg.json").write_text(json.dumps(cfg.dump()))
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "visionr1_jobs", "eval", "--config", str(ws / "cfg.json")],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ws,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    man = read_manifest(ws, "eval")
    assert man is not None and (ws / man.outputs["plot"]).exists()
    summary = json.loads((ws / "eval/base/toy.json").read_text())
    assert summary["n"] == 3 and 0 < summary["mean_response_tokens"] <= 8
    assert "VISIONR1_PROGRESS" in proc.stderr
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{ws / 'mlflow.db'}")
    metrics = mlflow.get_run(man.mlflow_run_id).data.metrics
    assert "base.toy.accuracy" in metrics and "base.toy.format_rate" in metrics
    print(f"tiny-model eval e2e: {time.monotonic() - t0:.1f}s")
