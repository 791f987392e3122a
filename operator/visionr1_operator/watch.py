"""What ``kubectl get vr1`` shows of a running stage: its step and total, an ETA, its key metric.

Read from the channel every stage already writes, its MLflow run (the operator polls it; stage
pods need no right to write the VisionR1Run). Pure: MLflow's answers in, status fields out.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from visionr1_operator.api import StageStatus, VisionR1Run, VisionR1RunStatus

#: The metric a stage is judged by, as its stage program logs it into the stage's MLflow run.
KEY_METRIC = {"sft": "loss", "grpo": "reward"}
#: The eval stage's rows done so far (its shard 0's), logged with the count as the MLflow step
#: while it generates.
EVAL_PROGRESS_METRIC = "items_scored"
#: The metric whose history (MLflow steps and timestamps) gives a stage's step and ETA.
STEP_METRIC = {**KEY_METRIC, "eval": EVAL_PROGRESS_METRIC}
#: The training callback logs the trainer's planned steps (plus the PTST offset) under this key;
#: the eval stage the rows it will do in all.
TOTAL_STEPS_METRIC = "total_steps"
_ACCURACY_SUFFIX = "accuracy"
#: ``<checkpoint>.<benchmark>.running_accuracy``: eval's accuracy over the rows done so far.
_RUNNING_SUFFIX = "running_accuracy"


@dataclass(frozen=True)
class Point:
    """One logged value of a metric: MLflow's step, timestamp (ms) and value."""

    step: int
    timestamp_ms: int
    value: float


@dataclass(frozen=True)
class StageWatch:
    step: int | None
    total: int | None
    metric: str | None  # "loss=0.412"
    eta_s: float | None


def checkpoint_slug(name: str) -> str:
    """How the eval stage names a checkpoint in its metrics (``grpo/stage-1`` → ``grpo-stage-1``)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "checkpoint"


def key_metric(stage: str, latest: dict[str, float], checkpoints: Sequence[str] = ()) -> str | None:
    """The key metric's name for ``stage`` among the run's ``latest`` metrics: loss (SFT), reward
    (GRPO), an accuracy (eval: that of the last of ``checkpoints`` that has one, the trained
    model, e.g. ``grpo.mathvista.accuracy``; else the first by name). Until eval logs its final
    accuracies, its running accuracy picked the same way (``grpo.mathvista.running_accuracy``)."""
    if stage in KEY_METRIC:
        return KEY_METRIC[stage] if KEY_METRIC[stage] in latest else None
    if stage == "eval":
        return _accuracy(latest, checkpoints, _ACCURACY_SUFFIX) or _accuracy(
            latest, checkpoints, _RUNNING_SUFFIX
        )
    return None


def _accuracy(latest: dict[str, float], checkpoints: Sequence[str], suffix: str) -> str | None:
    found = sorted(k for k in latest if k.split(".")[-1] == suffix)
    for checkpoint in reversed(list(checkpoints)):
        mine = [k for k in found if k.split(".")[0] == checkpoint_slug(checkpoint)]
        if mine:
            return mine[0]
    return found[0] if found else None


def is_running_metric(metric: str | None) -> bool:
    """Whether a METRIC (``name=value``) is eval's running accuracy, not a final one."""
    return bool(metric) and str(metric).partition("=")[0].split(".")[-1] == _RUNNING_SUFFIX


def planned_steps(run: VisionR1Run, stage: str, logged_total: float | None) -> int | None:
    """GRPO: the PTST table's steps (the spec knows them all; the trainer knows one row at a
    time); SFT: spec maxSteps, else what the trainer planned and logged; eval: the rows it
    logged it will do."""
    if stage == "grpo":
        return sum(row.steps for row in run.spec.stages.grpo.params.ptst) or None
    if stage == "sft" and run.spec.stages.sft.params.max_steps:
        return run.spec.stages.sft.params.max_steps
    return int(logged_total) if logged_total and logged_total > 0 else None


def summarize(
    run: VisionR1Run,
    stage: str,
    latest: dict[str, float],
    history: list[Point],
) -> StageWatch:
    """``latest``: the stage run's metrics (latest values); ``history``: the points of the
    stage's :data:`STEP_METRIC` (the key metric of SFT and GRPO, eval's rows done)."""
    name = key_metric(stage, latest, run.spec.stages.eval.params.checkpoints)
    metric = (
        f"{name.split('.')[-1] if stage != 'eval' else name}={_short(latest[name])}"
        if name
        else None
    )
    total = planned_steps(run, stage, latest.get(TOTAL_STEPS_METRIC))
    step = max((p.step for p in history), default=None) if stage in STEP_METRIC else None
    eta = eta_seconds(history, total)
    return StageWatch(step, total, metric, eta)


def eta_seconds(history: list[Point], total: int | None) -> float | None:
    """Seconds to ``total`` at the rate between the first and the last logged step."""
    if total is None or len(history) < 2:
        return None
    first = min(history, key=lambda p: (p.step, p.timestamp_ms))
    last = max(history, key=lambda p: (p.step, p.timestamp_ms))
    steps, ms = last.step - first.step, last.timestamp_ms - first.timestamp_ms
    if steps <= 0 or ms <= 0:
        return None
    return max(0.0, (total - last.step) * ms / steps / 1000.0)


def _short(value: float) -> str:
    if math.isnan(value) or math.isinf(value):
        return str(value)
    return f"{value:.4g}"


def duration(seconds: float | None) -> str | None:
    """42s, 3m10s, 2h05m: what fits a printer column."""
    if seconds is None:
        return None
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def apply_watch(status: VisionR1RunStatus, stage: str, watch: StageWatch) -> VisionR1RunStatus:
    """A copy of ``status`` with ``stage``'s watch fields and the run's columns set: the run's
    columns follow the running stage (or, once none runs, the last stage with a metric)."""
    out = status.model_copy(deep=True)
    st = out.stages.setdefault(stage, StageStatus())
    st.step, st.total_steps = watch.step, watch.total
    st.metric = watch.metric or st.metric
    running = st.phase == "Running"
    if not running and is_running_metric(st.metric):
        st.metric = None  # finished: its final metric, or none, never a running figure
    if running and watch.step is not None:
        out.step = f"{watch.step}/{watch.total}" if watch.total else str(watch.step)
    else:
        out.step = None
    out.eta = duration(watch.eta_s) if running else None
    # A running stage's metric, or none yet (never the stage before it's)
    out.metric = st.metric if running else st.metric or out.metric
    if not running and is_running_metric(out.metric):
        out.metric = None
    return out


def wants_watch(status: VisionR1RunStatus, stage: str, st: StageStatus) -> bool:
    """Stages worth a poll: running ones with an MLflow run, and a finished one that has no
    metric yet, or only eval's running accuracy (eval logs its final accuracies at the very
    end)."""
    if not st.mlflow_run_id:
        return False
    if st.phase == "Running":
        return True
    return (
        st.phase == "Succeeded"
        and (st.metric is None or is_running_metric(st.metric))
        and stage in STEP_METRIC
    )


def json_history(points: list[Any]) -> list[Point]:
    """MLflow's Metric objects (step, timestamp, value) as Points."""
    return [Point(int(m.step), int(m.timestamp), float(m.value)) for m in points]


def patch(status: VisionR1RunStatus) -> dict[str, Any]:
    """The watch fields of ``status`` as a merge patch of the status (None removes a field):
    nothing else, so a poll never overwrites what a reconcile wrote."""
    return {
        "step": status.step,
        "eta": status.eta,
        "metric": status.metric,
        "stages": {
            name: {"step": st.step, "totalSteps": st.total_steps, "metric": st.metric}
            for name, st in status.stages.items()
            if st.step is not None or st.total_steps is not None or st.metric is not None
        },
    }
