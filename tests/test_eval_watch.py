"""Eval watched while it runs: the eval stage logs its progress and running accuracy into its
stage MLflow run, and the operator's watch turns them into STEP (k/N), ETA and METRIC."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from visionr1_jobs.config import (
    Benchmark,
    EvalParams,
    InputLocation,
    MlflowRef,
    ResolvedStageConfig,
)
from visionr1_jobs.generation import Generation, GenerationBackend
from visionr1_jobs.stages import eval as eval_stage
from visionr1_operator import mlflow_runs, watch
from visionr1_operator.api import StageStatus, VisionR1Run, VisionR1RunStatus

N_BENCH = 10
BATCH = 2
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


class Marking(GenerationBackend):
    """Answers a toy problem right unless its image is in ``wrong``; before each batch it calls
    ``peek`` (what the operator's poll would read at that moment)."""

    kind = "marking"

    def __init__(
        self, answers: dict[tuple[str, str], str], wrong: set[str], peek: Any = None
    ) -> None:
        self.answers, self.wrong, self.peek = answers, wrong, peek

    def _generate(self, requests, sampling):  # type: ignore[no-untyped-def]
        if self.peek is not None:
            self.peek()
        time.sleep(0.005)  # points a few ms apart, as any real batch is
        out = []
        for req in requests:
            q = (req.messages[0]["content"], req.images[0])
            ans = self.answers[q] + ("1" if req.images[0] in self.wrong else "")
            out.append(Generation(text=f"<think> x </think><answer> Final Answer:{ans} </answer>"))
        return out


@pytest.fixture
def bench(tmp_path: Path) -> tuple[list[dict[str, Any]], dict[tuple[str, str], str], set[str]]:
    """The toy benchmark's rows in order, their answers, and the images answered wrong (row
    indices 1, 2, 4, 7: the running accuracy goes up and down)."""
    from visionr1_jobs.eval.readers import read_benchmark
    from visionr1_jobs.toy.dataset import write_toy_dataset

    write_toy_dataset(tmp_path / "toy", n=2, n_bench=N_BENCH, seed=11)
    rows = read_benchmark("toy", tmp_path / "toy" / "bench").rows
    answers = {(r["question"], r["images"][0]): r["answer"] for r in rows}
    return rows, answers, {rows[i]["images"][0] for i in (1, 2, 4, 7)}


def stage_run(ws: Path) -> tuple[str, str]:
    """The eval stage's MLflow run, created before the stage starts, as the operator does."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{ws / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("t")
    return uri, client.create_run(exp, run_name="eval").info.run_id


def _cfg(ws: Path, uri: str, run_id: str | None, checkpoints: list[str]) -> ResolvedStageConfig:
    p = EvalParams(
        benchmarks=[Benchmark(name="toy", path="toy/bench")],
        checkpoints=checkpoints,
        max_new_tokens=16,
        retries_missing_answer=0,
        batch_size=BATCH,
    )
    return ResolvedStageConfig(
        stage="eval",
        workspace=str(ws),
        output_dir="eval",
        base_model="models/base",
        inputs={
            f"checkpoint:{c}": InputLocation(path=f"models/{c}", format="model")
            for c in checkpoints
        },
        params=p.dump(),
        mlflow=MlflowRef(tracking_uri=uri, experiment="t", run_id=run_id),
    )


def history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    from mlflow.tracking import MlflowClient

    points = MlflowClient(uri).get_metric_history(run_id, key)
    return sorted((int(m.step), m.value) for m in points)


def tiny(checkpoints: list[str]) -> VisionR1Run:
    run = VisionR1Run.model_validate(yaml.safe_load((EXAMPLES / "tiny-cpu.yaml").read_text()))
    run.spec.stages.eval.params.checkpoints = checkpoints
    return run


def test_eval_logs_progress_and_a_running_accuracy_that_ends_at_the_final_one(
    tmp_path: Path, bench: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    rows, answers, wrong = bench
    monkeypatch.setattr(eval_stage, "PROGRESS_EVERY_S", 0.0)  # a point after every batch
    uri, run_id = stage_run(tmp_path)
    cfg = _cfg(tmp_path, uri, run_id, ["base", "sft"])
    man = eval_stage.run(cfg, lambda m, p: Marking(answers, wrong))
    assert man is not None and man.mlflow_run_id == run_id  # the merge logs into the same run

    total = 2 * N_BENCH
    items = history(uri, run_id, "items_scored")
    steps = [s for s, _ in items]
    # The start, then one point per batch: base's 5, then sft's 5
    assert steps == list(range(0, total + 1, BATCH))
    assert all(v == s for s, v in items)
    assert history(uri, run_id, "total_steps")[-1] == (total, total)

    right = [r["images"][0] not in wrong for r in rows]  # the rows in shard order
    running = history(uri, run_id, "base.toy.running_accuracy")
    assert [s for s, _ in running] == list(range(BATCH, N_BENCH + 1, BATCH))
    for s, value in running:  # the rows done so far, and only those
        assert value == pytest.approx(sum(right[:s]) / s)
    assert len({v for _, v in running}) > 1
    sft = history(uri, run_id, "sft.toy.running_accuracy")
    assert [s for s, _ in sft] == list(range(N_BENCH + BATCH, total + 1, BATCH))

    from mlflow.tracking import MlflowClient

    final = MlflowClient(uri).get_run(run_id).data.metrics
    assert sum(right) / N_BENCH == 0.6
    assert final["base.toy.accuracy"] == pytest.approx(0.6)
    assert running[-1][1] == pytest.approx(final["base.toy.accuracy"])
    assert sft[-1][1] == pytest.approx(final["sft.toy.accuracy"])
    # the final metrics are those the stage always logged
    assert final["base.toy.format_rate"] == 1.0 and final["sft.toy.failed_rows"] == 0.0


def test_points_are_throttled_to_one_per_interval_and_each_benchmarks_end(
    tmp_path: Path, bench: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Batches faster than the interval: the start and each benchmark's last batch only."""
    _, answers, wrong = bench
    monkeypatch.setattr(eval_stage, "PROGRESS_EVERY_S", 3600.0)
    uri, run_id = stage_run(tmp_path)
    cfg = _cfg(tmp_path, uri, run_id, ["base", "sft"])
    eval_stage.run(cfg, lambda m, p: Marking(answers, wrong))
    assert [s for s, _ in history(uri, run_id, "items_scored")] == [0, N_BENCH, 2 * N_BENCH]
    assert [s for s, _ in history(uri, run_id, "base.toy.running_accuracy")] == [N_BENCH]


def test_only_shard_0_logs_progress_over_its_own_rows(
    tmp_path: Path, bench: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    rows, answers, wrong = bench
    monkeypatch.setattr(eval_stage, "PROGRESS_EVERY_S", 0.0)
    uri, run_id = stage_run(tmp_path)
    cfg = _cfg(tmp_path, uri, run_id, ["base"])
    monkeypatch.setenv("VISIONR1_SHARDS", "3")
    for index in (1, 2):
        monkeypatch.setenv("JOB_COMPLETION_INDEX", str(index))
        assert eval_stage.run(cfg, lambda m, p: Marking(answers, wrong)) is None
    assert history(uri, run_id, "items_scored") == []  # shards 1 and 2 log nothing

    monkeypatch.setenv("JOB_COMPLETION_INDEX", "0")
    assert eval_stage.run(cfg, lambda m, p: Marking(answers, wrong)) is not None
    mine = rows[0::3]  # rows 0, 3, 6, 9
    assert [s for s, _ in history(uri, run_id, "items_scored")] == [0, 2, 4]
    assert history(uri, run_id, "total_steps")[-1][1] == len(mine)
    right = [r["images"][0] not in wrong for r in mine]
    running = history(uri, run_id, "base.toy.running_accuracy")
    assert running[-1] == (len(mine), pytest.approx(sum(right) / len(mine)))


def test_no_stage_run_id_no_progress_and_the_stage_still_logs_its_result(
    tmp_path: Path, bench: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, answers, wrong = bench
    monkeypatch.delenv("VISIONR1_STAGE_RUN_ID", raising=False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    man = eval_stage.run(_cfg(tmp_path, uri, None, ["base"]), lambda m, p: Marking(answers, wrong))
    assert man is not None and man.mlflow_run_id
    assert history(uri, man.mlflow_run_id, "items_scored") == []
    assert man.metrics["base.toy.accuracy"] == pytest.approx(0.6)


def test_an_eval_with_nothing_to_score_does_not_crash(
    tmp_path: Path, bench: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A benchmark whose every record was skipped: no rows for any shard."""
    from visionr1_jobs.eval import readers

    monkeypatch.setattr(
        readers, "read_benchmark", lambda name, path, **kw: readers.ReadResult(rows=[])
    )
    uri, run_id = stage_run(tmp_path)
    man = eval_stage.run(
        _cfg(tmp_path, uri, run_id, ["base"]),
        lambda m, p: Marking({}, set(), lambda: pytest.fail("nothing to ask")),
    )
    assert man is not None and man.rows == {"base/toy": 0}
    assert history(uri, run_id, "items_scored") == [(0, 0.0)]
    assert history(uri, run_id, "base.toy.running_accuracy") == []
    latest, hist = mlflow_runs.stage_metrics(uri, run_id, "eval")
    seen = watch.summarize(tiny(["base"]), "eval", latest, watch.json_history(hist))
    assert (seen.step, seen.total, seen.eta_s) == (0, None, None)
    assert seen.metric == "base.toy.accuracy=0"


def test_the_watch_shows_eval_step_eta_and_running_accuracy_while_it_runs(
    tmp_path: Path, bench: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the operator's poll reads from the stage run between batches, then at the end."""
    rows, answers, wrong = bench
    monkeypatch.setattr(eval_stage, "PROGRESS_EVERY_S", 0.0)
    uri, run_id = stage_run(tmp_path)
    spec = tiny(["base", "grpo"])
    seen: list[watch.StageWatch] = []

    def poll() -> None:
        latest, hist = mlflow_runs.stage_metrics(uri, run_id, "eval")
        seen.append(watch.summarize(spec, "eval", latest, watch.json_history(hist)))

    cfg = _cfg(tmp_path, uri, run_id, ["base", "grpo"])
    eval_stage.run(cfg, lambda m, p: Marking(answers, wrong if m.endswith("base") else set(), poll))

    total = 2 * N_BENCH
    # before the first batch of base: the start point only (no step rate, no accuracy yet)
    assert (seen[0].step, seen[0].total, seen[0].eta_s, seen[0].metric) == (0, total, None, None)
    # base's third batch: 2 batches done, 4 rows, 2 of them right
    mid = seen[2]
    assert (mid.step, mid.total, mid.metric) == (4, total, "base.toy.running_accuracy=0.5")
    assert mid.eta_s is not None and mid.eta_s > 0
    # into grpo (the trained model, last of the checkpoints): its running accuracy shows
    late = seen[7]
    assert (late.step, late.metric) == (14, "grpo.toy.running_accuracy=1")

    status = VisionR1RunStatus(
        phase="Running",
        stages={"eval": StageStatus(phase="Running", mlflow_run_id=run_id)},
    )
    shown = watch.apply_watch(status, "eval", mid)
    assert (shown.step, shown.metric) == ("4/20", "base.toy.running_accuracy=0.5")
    assert shown.eta is not None and shown.eta.endswith("s")
    assert watch.patch(shown)["stages"]["eval"]["step"] == 4

    # finished: the running accuracy asks for one more read, which shows the final accuracy
    shown = watch.apply_watch(shown, "eval", late)
    shown.stages["eval"].phase = "Succeeded"
    assert watch.wants_watch(shown, "eval", shown.stages["eval"])
    latest, hist = mlflow_runs.stage_metrics(uri, run_id, "eval")
    end = watch.summarize(spec, "eval", latest, watch.json_history(hist))
    assert (end.step, end.total, end.metric) == (total, total, "grpo.toy.accuracy=1")
    after = watch.apply_watch(shown, "eval", end)
    assert (after.step, after.eta, after.metric) == (None, None, "grpo.toy.accuracy=1")
    assert not watch.wants_watch(after, "eval", after.stages["eval"])


def test_a_finished_eval_never_keeps_a_running_accuracy_as_its_metric() -> None:
    """No final accuracy in the last read (it never logged one): no metric, and no more polls."""
    status = VisionR1RunStatus(
        phase="Succeeded",
        metric="grpo.toy.running_accuracy=0.5",
        stages={
            "eval": StageStatus(
                phase="Succeeded", mlflow_run_id="r", metric="grpo.toy.running_accuracy=0.5"
            )
        },
    )
    assert watch.wants_watch(status, "eval", status.stages["eval"])
    last = watch.StageWatch(20, 20, "grpo.toy.running_accuracy=0.5", None)
    after = watch.apply_watch(status, "eval", last)
    assert after.metric is None and after.stages["eval"].metric is None
    after.stages["eval"].metric = after.stages["eval"].metric or ""  # as the poll records it
    assert not watch.wants_watch(after, "eval", after.stages["eval"])
