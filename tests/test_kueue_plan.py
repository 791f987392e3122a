"""Kueue owns ``spec.suspend`` of a queued Job: the plan pauses and resumes such a Job through its
Workload (``spec.active``) and never writes the Job's suspend; a Job Kueue evicts (preemption)
waits in the queue as the same attempt, not as a failure."""

from __future__ import annotations

import itertools
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from visionr1_operator import manifests
from visionr1_operator.api import VisionR1Run, VisionR1RunStatus
from visionr1_operator.plan import (
    QUEUED,
    CreateStage,
    ObservedJob,
    ResumeStage,
    ResumeWorkload,
    StageProgress,
    StageSucceeded,
    StartRun,
    SuspendStage,
    SuspendWorkload,
    apply,
    describe,
    job_name,
    plan,
)

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
T0 = datetime(2025, 1, 1, 12, 0, 0, tzinfo=UTC)
FIVE = ("synthesis", "filter", "sft", "grpo", "eval")
QUEUE = "gpu-team"


def load(**spec: Any) -> VisionR1Run:
    obj = yaml.safe_load((EXAMPLES / "tiny-cpu.yaml").read_text())
    obj["spec"].update(spec)
    return VisionR1Run.model_validate(obj)


QUEUED_RUN = load(queueName=QUEUE)
QUEUED_SUSPENDED = load(queueName=QUEUE, suspend=True)


def running_sft(run: VisionR1Run) -> VisionR1RunStatus:
    status = apply(None, [StartRun(FIVE, ())], T0)
    for s in ("synthesis", "filter"):
        name = job_name("tiny-cpu", s, 0)
        status = apply(status, [CreateStage(s, 0, name), StageSucceeded(s, name)], T0)
    return apply(status, [CreateStage("sft", 0, job_name("tiny-cpu", "sft", 0))], T0)


def sft(**kw: Any) -> ObservedJob:
    base: dict[str, Any] = {"queue": QUEUE}
    base.update(kw)
    return ObservedJob(name="tiny-cpu-sft-0", stage="sft", attempt=0, **base)


def writes_job_suspend(actions: list[Any]) -> list[Any]:
    """The actions whose execution patches a Job's spec.suspend (handlers: a job_name set)."""
    return [a for a in actions if isinstance(a, SuspendStage | ResumeStage) and a.job_name]


def test_suspending_an_admitted_queued_job_deactivates_its_workload() -> None:
    status = running_sft(QUEUED_RUN)
    admitted = sft(active=1)
    actions = plan(QUEUED_SUSPENDED, status, [admitted], T0)
    assert actions == [SuspendWorkload("sft", "tiny-cpu-sft-0")]
    status = apply(status, actions, T0)
    assert status.phase == "Suspended" and status.stages["sft"].phase == "Suspended"
    cond = next(c for c in status.conditions if c.type == "Suspended")
    assert (cond.status, cond.reason) == ("True", "RunSuspended")
    assert "Kueue Workload" in cond.message
    kind, reason, message = describe(actions[0])  # type: ignore[misc]
    assert (kind, reason) == ("Normal", "Suspended") and "tiny-cpu-sft-0" in message


def test_no_suspend_loop_with_kueue() -> None:
    """The old loop: we suspend, Kueue un-suspends the admitted Job, we suspend again. Now the
    Workload is deactivated once; whatever Kueue does with the Job's suspend, the plan writes
    nothing to the Job."""
    status = apply(
        running_sft(QUEUED_RUN), [SuspendWorkload("sft", "tiny-cpu-sft-0")], T0
    )  # deactivated: the Job carries the operator's held annotation
    for suspended, active in [(False, 1), (True, 0), (False, 1), (True, 0)]:
        observed = sft(held=True, suspended=suspended, active=active)
        assert plan(QUEUED_SUSPENDED, status, [observed], T0) == []


def test_suspending_a_job_still_waiting_for_admission_deactivates_its_workload() -> None:
    status = running_sft(QUEUED_RUN)
    waiting = sft(suspended=True)
    assert plan(QUEUED_SUSPENDED, status, [waiting], T0) == [
        SuspendWorkload("sft", "tiny-cpu-sft-0")
    ]


def test_resume_reactivates_the_workload_and_waits_for_admission() -> None:
    status = apply(running_sft(QUEUED_RUN), [SuspendWorkload("sft", "tiny-cpu-sft-0")], T0)
    held = sft(held=True, suspended=True)
    actions = plan(QUEUED_RUN, status, [held], T0)
    assert actions == [ResumeWorkload("sft", "tiny-cpu-sft-0")]
    status = apply(status, actions, T0)
    assert status.phase == "Running"
    assert status.stages["sft"].phase == "Pending"  # back in the queue, not running yet
    assert next(c for c in status.conditions if c.type == "Suspended").status == "False"
    # Kueue has the Workload again; the Job stays suspended until it is admitted
    requeued = sft(suspended=True)
    actions = plan(QUEUED_RUN, status, [requeued], T0)
    assert actions == [
        StageProgress(
            "sft", "Pending", QUEUED, f"waiting for Kueue to admit it (LocalQueue {QUEUE})"
        )
    ]
    status = apply(status, actions, T0)
    assert plan(QUEUED_RUN, status, [requeued], T0) == []
    admitted = sft(active=1)
    actions = plan(QUEUED_RUN, status, [admitted], T0)
    assert actions == [StageProgress("sft", "Running", "1 pod running")]


def test_preempted_job_waits_in_the_queue_as_the_same_attempt() -> None:
    """Kueue evicts a preempted Workload by suspending its Job: the Job controller deletes the
    pods (they are not counted as failed), and the run waits for readmission, same attempt."""
    status = running_sft(QUEUED_RUN)
    status = apply(status, plan(QUEUED_RUN, status, [sft(active=1)], T0), T0)
    assert status.stages["sft"].phase == "Running"
    evicted = sft(suspended=True, active=0)
    actions = plan(QUEUED_RUN, status, [evicted], T0)
    assert actions == [
        StageProgress(
            "sft", "Pending", QUEUED, f"waiting for Kueue to admit it (LocalQueue {QUEUE})"
        )
    ]
    status = apply(status, actions, T0)
    assert status.stages["sft"].attempts == 1
    assert status.stages["sft"].job_name == "tiny-cpu-sft-0"
    described = describe(actions[0])
    assert described is not None and described[:2] == ("Normal", "StageQueued")
    progressing = next(c for c in status.conditions if c.type == "Progressing")
    assert (progressing.status, progressing.reason) == ("True", "StageQueued")
    assert f"LocalQueue {QUEUE}" in progressing.message
    readmitted = sft(active=1)
    status = apply(status, plan(QUEUED_RUN, status, [readmitted], T0), T0)
    assert status.stages["sft"].phase == "Running" and status.stages["sft"].attempts == 1
    progressing = next(c for c in status.conditions if c.type == "Progressing")
    assert progressing.reason == "StageRunning"


def test_a_queued_job_never_gets_a_suspend_patch() -> None:
    """Every combination of run and Job state: no action for a queued Job writes its suspend."""
    base = running_sft(QUEUED_RUN)
    statuses = [
        base,
        apply(base, [SuspendWorkload("sft", "tiny-cpu-sft-0")], T0),
        apply(base, [SuspendStage("sft", "tiny-cpu-sft-0")], T0),  # an older operator's doing
    ]
    for run, status, suspended, held, active in itertools.product(
        (QUEUED_RUN, QUEUED_SUSPENDED), statuses, (False, True), (False, True), (0, 1)
    ):
        observed = sft(suspended=suspended, held=held, active=active)
        actions = plan(run, status, [observed], T0)
        assert writes_job_suspend(actions) == [], (run.spec.suspend, suspended, held, active)
        # the Job's queue label decides, even if spec.queueName was removed since
        plain_run = load(suspend=run.spec.suspend)
        assert writes_job_suspend(plan(plain_run, status, [observed], T0)) == []


def test_a_plain_job_is_still_suspended_through_its_spec() -> None:
    run, suspended_run = load(), load(suspend=True)
    status = running_sft(run)
    plain = replace(sft(active=1), queue=None)
    assert plan(suspended_run, status, [plain], T0) == [SuspendStage("sft", "tiny-cpu-sft-0")]
    held = replace(plain, suspended=True, held=True, active=0)
    status = apply(status, [SuspendStage("sft", "tiny-cpu-sft-0")], T0)
    assert plan(run, status, [held], T0) == [ResumeStage("sft", "tiny-cpu-sft-0")]


def test_observed_job_carries_the_queue_label() -> None:
    run = load(queueName=QUEUE, storage={"pvc": "data"})
    run.metadata.namespace = "team"
    obj = manifests.job(run, "sft", 0)
    assert obj["spec"]["suspend"] is True  # created suspended: Kueue admits it
    seen = manifests.observe_job(obj)
    assert seen is not None and seen.queue == QUEUE and seen.suspended
    plain = manifests.observe_job(manifests.job(load(storage={"pvc": "data"}), "sft", 0))
    assert plain is not None and plain.queue is None


def test_a_job_kueue_suspended_without_a_queue_name_is_not_resumed() -> None:
    """Kueue's manageJobsWithoutQueueName suspends every Job it manages: the plan must not undo
    it (Kueue would suspend it again, and so on); it waits for Kueue's admission instead."""
    run = load()
    status = running_sft(run)
    kueues = replace(sft(), queue=None, suspended=True, held=False)
    actions = plan(run, status, [kueues], T0)
    assert writes_job_suspend(actions) == []
    (progress,) = actions
    assert isinstance(progress, StageProgress) and progress.progress == QUEUED
    assert "waiting for Kueue" in progress.message and "queue name" in progress.message
    # Kueue's own reason for waiting is shown, and a new one updates the status without an Event
    status = apply(status, actions, T0)
    why = "couldn't assign flavors to pod set main: insufficient quota for nvidia.com/gpu"
    (progress,) = plan(run, status, [replace(kueues, admission=why)], T0)
    assert progress.message.endswith(why) and describe(progress) is None
    # admitted: Kueue un-suspends it and it runs
    admitted = replace(kueues, suspended=False, active=1, running_pods=1)
    (running,) = plan(run, apply(status, [progress], T0), [admitted], T0)
    assert running.phase == "Running"
