"""What ``kubectl get vr1`` shows of a running stage (step/total, ETA, key metric), read from the
stage's MLflow run, and the GPU-hours recorded per stage for chargeback."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from visionr1_operator import chargeback, mlflow_runs, watch
from visionr1_operator.api import StageStatus, VisionR1Run, VisionR1RunStatus
from visionr1_operator.handlers import OperatorConfig, Reconciler
from visionr1_operator.plan import ObservedJob

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


def tiny() -> VisionR1Run:
    obj = yaml.safe_load((EXAMPLES / "tiny-cpu.yaml").read_text())
    return VisionR1Run.model_validate(obj)


def test_sft_columns_from_a_real_mlflow_run(tmp_path: Path) -> None:
    """The stage program's own logging (loss per step, the planned total) read back through
    MLflow's client, as the operator's poll does."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("watch")
    run_id = client.create_run(exp, run_name="sft").info.run_id
    start_ms = 1_700_000_000_000
    client.log_batch(run_id, metrics=[Metric("total_steps", 40, start_ms, 0)])
    # 10 steps, 2 s apart: 30 left at 0.5 steps/s = 60 s
    client.log_batch(
        run_id,
        metrics=[Metric("loss", 2.0 - s / 10, start_ms + 2000 * s, s) for s in range(1, 11)],
    )
    latest, history = mlflow_runs.stage_metrics(uri, run_id, "sft")
    run = tiny()
    run.spec.stages.sft.params.max_steps = None
    seen = watch.summarize(run, "sft", latest, watch.json_history(history))
    assert (seen.step, seen.total, seen.metric) == (10, 40, "loss=1")
    assert seen.eta_s == pytest.approx(60.0)

    status = VisionR1RunStatus(
        phase="Running", stages={"sft": StageStatus(phase="Running", mlflow_run_id=run_id)}
    )
    shown = watch.apply_watch(status, "sft", seen)
    assert (shown.step, shown.eta, shown.metric) == ("10/40", "1m00s", "loss=1")
    assert watch.patch(shown)["stages"]["sft"] == {"step": 10, "totalSteps": 40, "metric": "loss=1"}
    # the stage finished: its metric stays on the run, the step and ETA go
    shown.stages["sft"].phase = "Succeeded"
    after = watch.apply_watch(shown, "sft", seen)
    assert (after.step, after.eta, after.metric) == (None, None, "loss=1")


def test_grpo_total_is_the_ptst_table_and_eval_shows_an_accuracy() -> None:
    run = tiny()
    total = sum(r.steps for r in run.spec.stages.grpo.params.ptst)
    hist = [watch.Point(3, 1000, 0.2), watch.Point(5, 5000, 0.4)]
    seen = watch.summarize(run, "grpo", {"reward": 0.4, "total_steps": 5}, hist)
    assert (seen.step, seen.total, seen.metric) == (5, total, "reward=0.4")
    assert seen.eta_s == pytest.approx((total - 5) * 2.0)
    run.spec.stages.eval.params.checkpoints = ["base", "sft", "grpo/stage-1"]
    logged = {"base.toy.accuracy": 0.1, "grpo-stage-1.toy.accuracy": 0.625, "sft.toy.n": 8}
    ev = watch.summarize(run, "eval", logged, [])
    # the last checkpoint's (the trained model's) accuracy, not the base model's
    assert ev.metric == "grpo-stage-1.toy.accuracy=0.625" and ev.step is None and ev.eta_s is None
    assert watch.summarize(run, "synthesis", {"kept": 3.0}, []).metric is None


def test_which_stages_are_polled() -> None:
    st = VisionR1RunStatus()
    assert watch.wants_watch(st, "sft", StageStatus(phase="Running", mlflow_run_id="r"))
    assert not watch.wants_watch(st, "sft", StageStatus(phase="Running"))  # untracked
    assert watch.wants_watch(st, "eval", StageStatus(phase="Succeeded", mlflow_run_id="r"))
    done = StageStatus(phase="Succeeded", mlflow_run_id="r", metric="final.toy.accuracy=1")
    assert not watch.wants_watch(st, "eval", done)
    # eval finished while its column showed a running accuracy: one more read for the final one
    partial = StageStatus(phase="Succeeded", mlflow_run_id="r", metric="sft.toy.running_accuracy=1")
    assert watch.wants_watch(st, "eval", partial)
    assert not watch.wants_watch(st, "filter", StageStatus(phase="Succeeded", mlflow_run_id="r"))


def gpu_pod(gpus: int, start: datetime, end: datetime | None) -> dict[str, Any]:
    state = (
        {"terminated": {"exitCode": 0, "finishedAt": end.isoformat().replace("+00:00", "Z")}}
        if end
        else {"running": {}}
    )
    return {
        "spec": {
            "containers": [
                {"name": "stage", "resources": {"limits": {"nvidia.com/gpu": str(gpus)}}}
            ]
        },
        "status": {
            "phase": "Succeeded" if end else "Running",
            "startTime": start.isoformat().replace("+00:00", "Z"),
            "containerStatuses": [{"name": "stage", "state": state}],
        },
    }


def test_gpu_hours_are_gpus_times_running_time_of_each_pod() -> None:
    pods = [
        gpu_pod(8, T0, T0 + timedelta(minutes=30)),
        gpu_pod(8, T0 + timedelta(minutes=1), T0 + timedelta(minutes=31)),
    ]
    assert chargeback.gpu_hours(pods, T0 + timedelta(hours=5)) == pytest.approx(8.0)
    running = gpu_pod(4, T0, None)  # still running: counted up to now
    assert chargeback.gpu_hours([running], T0 + timedelta(minutes=15)) == pytest.approx(1.0)
    cpu = gpu_pod(0, T0, T0 + timedelta(hours=1))
    assert chargeback.gpu_hours([cpu], T0 + timedelta(hours=2)) == 0.0
    assert chargeback.pod_gpus({"spec": {"containers": [{"name": "x"}]}}) == 0


class PodLister:
    """The operator's API client, as far as charging goes: pods by their Job's label."""

    def __init__(self, pods: dict[str, list[dict[str, Any]]]) -> None:
        self.pods = pods
        self.calls: list[str] = []

    async def list(self, version: str, plural: str, ns: str, label_selector: str) -> Any:
        job = label_selector.split("=", 1)[1]
        self.calls.append(job)
        return self.pods.get(job, [])


def test_each_finished_attempt_of_a_gpu_stage_is_charged_once() -> None:
    rec = Reconciler(OperatorConfig())
    first = [gpu_pod(8, T0, T0 + timedelta(minutes=15))]  # attempt 0 failed after 15 min
    second = [gpu_pod(8, T0, T0 + timedelta(minutes=45)) for _ in range(2)]  # 2 nodes, 45 min
    rec.kube = PodLister({"r-sft-0": first, "r-sft-1": second})  # type: ignore[assignment]
    status = VisionR1RunStatus(
        phase="Running",
        stages={"sft": StageStatus(phase="Running", attempts=2), "synthesis": StageStatus()},
    )
    failed = ObservedJob("r-sft-0", "sft", 0, failed=1, failed_reason="BackoffLimitExceeded")
    running = ObservedJob("r-sft-1", "sft", 1, active=2)
    status = asyncio.run(rec._charge("ns", status, [failed, running], T0 + timedelta(hours=1)))
    assert status.stages["sft"].gpu_hours == pytest.approx(2.0)
    assert status.gpu_hours == pytest.approx(2.0)
    done = ObservedJob("r-sft-1", "sft", 1, succeeded=1, complete=True)
    for _ in range(2):  # a second reconcile lists nothing again and adds nothing
        status = asyncio.run(rec._charge("ns", status, [failed, done], T0 + timedelta(hours=1)))
    assert status.stages["sft"].gpu_hours == pytest.approx(2.0 + 12.0)
    assert status.gpu_hours == pytest.approx(14.0)
    assert rec.kube.calls == ["r-sft-0", "r-sft-1"]  # type: ignore[attr-defined]


def test_the_run_shows_the_running_stages_metric_never_the_stage_before_its() -> None:
    """GRPO has begun and logged steps but no reward yet: the run's METRIC is empty, not SFT's
    final loss under STAGE grpo."""
    status = VisionR1RunStatus(
        phase="Running",
        metric="loss=4.739",
        stages={
            "sft": StageStatus(phase="Succeeded", mlflow_run_id="s", metric="loss=4.739"),
            "grpo": StageStatus(phase="Running", mlflow_run_id="g"),
        },
    )
    shown = watch.apply_watch(status, "grpo", watch.StageWatch(2, 6, None, None))
    assert (shown.step, shown.metric) == ("2/6", None)
    assert shown.stages["sft"].metric == "loss=4.739"  # the stage keeps its own
    later = watch.apply_watch(shown, "grpo", watch.StageWatch(3, 6, "reward=0.5", 10.0))
    assert (later.step, later.metric) == ("3/6", "reward=0.5")


class StatusWriter:
    """The API server's side of a status patch: the precondition on resourceVersion included."""

    def __init__(self, current_version: str) -> None:
        self.current_version = current_version
        self.patches: list[dict[str, Any]] = []

    async def patch(self, api_version, plural, namespace, name, body, subresource=None):  # type: ignore[no-untyped-def]
        from visionr1_operator.kube import ApiError

        self.patches.append(body)
        sent = (body.get("metadata") or {}).get("resourceVersion")
        if sent is not None and sent != self.current_version:
            raise ApiError(409, "PATCH", f"{plural} {namespace}/{name}", "object was modified")


def test_a_poll_never_writes_columns_computed_from_a_status_older_than_the_api_servers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The watch still shows SFT running after a reconcile moved the run to GRPO: the poll's
    patch carries the version it read, the API server refuses it, and the poll goes on."""
    rec = Reconciler(OperatorConfig())
    obj = tiny().model_dump(by_alias=True, exclude_none=True)
    obj["metadata"].update(namespace="ns", resourceVersion="41", generation=1)
    obj["status"] = {
        "phase": "Running",
        "observedGeneration": 1,
        "currentStage": "sft",
        "stages": {"sft": {"phase": "Running", "mlflowRunId": "s"}},
    }

    async def read_run(key: tuple[str, str]) -> dict[str, Any]:
        return obj

    async def server(*args: Any) -> tuple[Any, None]:
        return mlflow_runs.Server("http://mlflow"), None

    async def metrics(uri: Any, fn: Any, run_id: str, stage: str) -> tuple[Any, None]:
        from mlflow.entities import Metric

        return ({"loss": 4.7, "total_steps": 6.0}, [Metric("loss", 4.7, 1, 6)]), None

    monkeypatch.setattr(rec, "_read_run", read_run)
    monkeypatch.setattr(rec, "_server", server)
    monkeypatch.setattr(rec, "_mlflow", metrics)
    rec.kube = StatusWriter(current_version="42")  # type: ignore[assignment]
    assert asyncio.run(rec._watch_once("ns", obj["metadata"]["name"])) is True
    (refused,) = rec.kube.patches  # type: ignore[attr-defined]
    assert refused["metadata"] == {"resourceVersion": "41"}
    assert refused["status"]["metric"] == "loss=4.7"
    # once the watch shows the current version, the same poll's patch is taken
    rec.kube.current_version = "41"  # type: ignore[attr-defined]
    assert asyncio.run(rec._watch_once("ns", obj["metadata"]["name"])) is True
    assert len(rec.kube.patches) == 2  # type: ignore[attr-defined]
