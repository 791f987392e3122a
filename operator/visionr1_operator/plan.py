"""The pipeline's brain, pure: (spec, status, observed Jobs, now) → the next actions.

Shared by the kopf operator (``handlers``) and the local executor (``visionr1 run-local``), so a
run goes through the same states on a cluster and on a laptop. No I/O, no clock, no Kubernetes
client: everything comes in as arguments.

API
---
``plan(run, status, jobs, now, policy=RetryPolicy()) -> list[Action]``
    ``run``: the parsed :class:`~visionr1_operator.api.VisionR1Run` (already validated; an invalid
    spec never reaches the plan: the caller records :class:`FinishRun` ``InvalidSpec`` itself, see
    :func:`invalid_spec`). ``status``: the run's current status (``None`` = never reconciled).
    ``jobs``: what the caller observes of the run's child Jobs, one :class:`ObservedJob` each
    (any order; Jobs of other runs must not be passed). ``now``: an aware UTC datetime.

``apply(status, actions, now) -> VisionR1RunStatus``
    Folds the actions into a new status (the input is not modified). Callers execute the side
    effects of an action (create a Job, suspend it, open an MLflow run) and then apply it.

Planning is idempotent: once the caller has executed and applied the actions, planning again on
observations that reflect them (the created Job now listed) yields at most a progress record, and
then ``[]`` (apart from :class:`Requeue`, which only asks to be called again later). A Job that
exists but that the status does not know (created just before a crash) is adopted, never created
twice. Calling ``plan`` again at any time is safe.

Attempts
--------
Each attempt of a stage is one Job named ``job_name(run, stage, attempt)`` (attempt 0, 1, ...).
The caller plays whatever runs it: Kubernetes' Job controller in the cluster, a subprocess
locally, the test in the kmock tests. An attempt ends in one of:

* success (``ObservedJob.complete`` or all completions succeeded): the stage is done; the stage
  program has written ``<stage>/_manifest.json`` last, so Job success and done-ness agree;
* permanent failure: exit code ``EXIT_INVALID_INPUT`` (65), a Job failed by its
  podFailurePolicy (``failed_reason == "PodFailurePolicy"``) with any code but
  ``EXIT_INPUT_MISSING``, or by its deadline (``"DeadlineExceeded"``): the run fails at once;
* input missing (exit code ``EXIT_INPUT_MISSING``, 66): the stage it reads from has no
  ``_manifest.json`` although its Job succeeded (a merge lost on a weakly consistent
  filesystem). A sharded producer is run again (:class:`RemergeStage`: its pods skip the work
  already done and the last one merges), then the consumer is retried, before and beyond its
  ``backoffLimit`` (one more attempt per lost merge: ``backoffLimit: 0`` re-merges once);
  other producers: a retry;
* retryable failure (anything else): a new attempt after an exponential backoff
  (:class:`RetryPolicy`), until ``spec.stages.<stage>.backoffLimit`` retries are spent; then the
  run fails.

For a local executor: a running subprocess is ``ObservedJob.running(...)``; a finished one is
``ObservedJob.exited(..., exit_code, at)``.

Actions
-------
=================  ======================================================================
StartRun           first reconcile: open the MLflow parent run; disabled stages → Skipped
CreateStage        create attempt ``attempt`` of ``stage`` (ConfigMap, Service, Job; a nested
                   MLflow stage run, reused across attempts)
StageProgress      the running attempt's progress or phase changed (record it)
StageSucceeded     the stage's Job succeeded
RetryStage         the attempt failed with a retryable code; the next one starts at ``not_before``
RemergeStage       the consumer's input is missing: run the (sharded) producer again first
StageFailed        the stage failed for good (permanent code or retries spent)
SuspendStage       ``spec.suspend``: suspend ``job_name`` (None when no Job is running)
ResumeStage        ``spec.suspend`` cleared: unsuspend ``job_name`` (None when no Job)
SuspendWorkload    ``spec.suspend`` on a queued Job: deactivate its Kueue Workload
                   (``spec.active: false``); its ``spec.suspend`` is Kueue's, never written
ResumeWorkload     ``spec.suspend`` cleared on a queued Job: reactivate its Workload, so it
                   goes back through admission
FinishRun          the run ended: ``Succeeded`` or ``Failed`` (end the MLflow parent run)
Requeue            nothing to do before ``after_s`` seconds: call ``plan`` again then
=================  ======================================================================

Two more actions come from the caller, not from ``plan``, so that what went wrong executing an
action is folded into the status (and described) like everything else:

=================  ======================================================================
StageBlocked       creating a stage's objects failed (refused: 403, 422, quota; or an object
                   of the same name that this run does not own is in the way; or the
                   namespace's Pod Security level would refuse the pods): it waits
TrackingState      MLflow reachable or not (the ``Tracking`` condition); Jobs never wait
=================  ======================================================================

:func:`describe` turns an action into a (type, reason, message) event for people.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Literal

from visionr1_jobs.config import EXIT_INPUT_MISSING, EXIT_INVALID_INPUT, STAGES
from visionr1_operator.api import (
    UPSTREAM,
    Condition,
    StageStatus,
    VisionR1Run,
    VisionR1RunStatus,
    enabled_stages,
)

# Job failure reasons (batch/v1 JobCondition Failed) that retrying cannot fix.
PERMANENT_REASONS = frozenset({"PodFailurePolicy", "DeadlineExceeded"})

CONDITION_TYPES = ("Progressing", "Suspended", "Succeeded", "Failed", "Tracking")
# Stages whose Job is Indexed with one shard per pod, the last shard to finish merging.
SHARDED_STAGES = ("synthesis", "filter", "eval")


# StageProgress.progress of a Job waiting for Kueue's admission (created suspended, or evicted)
QUEUED = "queued"


def job_name(run_name: str, stage: str, attempt: int) -> str:
    """Deterministic Job name of one attempt; also names its ConfigMap (and Service)."""
    return f"{run_name}-{stage}-{attempt}"


def rfc3339(t: datetime) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: str | None) -> datetime | None:
    if not text:
        return None
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


# --------------------------------------------------------------------------- observations


@dataclass(frozen=True)
class ObservedJob:
    """What the plan needs to know of one child Job (one attempt of one stage)."""

    name: str
    stage: str
    attempt: int
    completions: int = 1
    active: int = 0
    succeeded: int = 0
    failed: int = 0
    suspended: bool = False
    # suspended by the operator for spec.suspend: a plain Job through its spec.suspend, a queued
    # Job through its Kueue Workload (spec.active: false)
    held: bool = False
    queue: str | None = None  # the Job's Kueue LocalQueue (kueue.x-k8s.io/queue-name label)
    complete: bool = False
    failed_reason: str | None = None  # reason of the Job's Failed=True condition; None = not failed
    message: str = ""
    exit_code: int | None = None  # of the pod that failed it, when known
    finished_at: datetime | None = None
    # From the Job's pods (None = not observed, e.g. the local executor: ``active`` counts):
    running_pods: int | None = None  # pods in phase Running (``active`` counts pending ones too)
    # Why a pod is stuck or died: (reason, message), e.g. ("Unschedulable", "0/3 nodes ...");
    # also why the Job's pods cannot be created at all (a FailedCreate refusal: QuotaExceeded,
    # PodSecurity, LimitRange), which only the Job's Events say.
    pod_problem: tuple[str, str] | None = None
    uid: str = ""  # the Job's metadata.uid ("" before the watch reported it)
    # A Job suspended by Kueue: why Kueue has not admitted it yet (its Workload's QuotaReserved
    # message), when the caller could read it.
    admission: str | None = None

    @classmethod
    def running(cls, name: str, stage: str, attempt: int) -> ObservedJob:
        """A started attempt (local executor: the subprocess is alive)."""
        return cls(name=name, stage=stage, attempt=attempt, active=1, running_pods=1)

    @classmethod
    def exited(
        cls, name: str, stage: str, attempt: int, exit_code: int, at: datetime
    ) -> ObservedJob:
        """A finished attempt from its exit code, as the Job controller would report it."""
        if exit_code == 0:
            return cls(name, stage, attempt, succeeded=1, complete=True, finished_at=at)
        reason = (
            "PodFailurePolicy"
            if exit_code in (EXIT_INVALID_INPUT, EXIT_INPUT_MISSING)
            else "BackoffLimitExceeded"
        )
        return cls(
            name,
            stage,
            attempt,
            failed=1,
            failed_reason=reason,
            exit_code=exit_code,
            message=f"exited with code {exit_code}",
            finished_at=at,
        )

    @property
    def outcome(self) -> Literal["succeeded", "failed", "suspended", "running"]:
        if self.complete or self.succeeded >= self.completions > 0:
            return "succeeded"
        if self.failed_reason is not None:
            return "failed"
        if self.suspended:
            return "suspended"
        return "running"

    @property
    def input_missing(self) -> bool:
        """Failed because the stage it reads from has no manifest: retryable."""
        return self.exit_code == EXIT_INPUT_MISSING

    @property
    def permanent(self) -> bool:
        """A failure that a new attempt cannot fix."""
        if self.input_missing:
            return False
        return self.exit_code == EXIT_INVALID_INPUT or self.failed_reason in PERMANENT_REASONS


@dataclass(frozen=True)
class RetryPolicy:
    """Delay before retry n (1-based): min(base_s · 2^(n-1), max_s) seconds."""

    base_s: float = 10.0
    max_s: float = 600.0

    def delay(self, retry: int) -> float:
        return min(self.base_s * (2 ** max(retry - 1, 0)), self.max_s)


# --------------------------------------------------------------------------- actions


@dataclass(frozen=True)
class StartRun:
    stages: tuple[str, ...]  # enabled stages, in order
    skipped: tuple[str, ...]  # disabled stages


@dataclass(frozen=True)
class CreateStage:
    stage: str
    attempt: int
    job_name: str
    reason: str = "StageStarted"  # or StageRetried, JobRecreated


@dataclass(frozen=True)
class StageProgress:
    stage: str
    phase: Literal["Pending", "Running"]
    progress: str
    message: str = ""
    problem: str | None = None  # a pod's trouble (Unschedulable, ImagePullBackOff, ...): warn
    # The run already shows this reason (only the message changed, e.g. a new scheduler
    # message on the same Pending pod): the status is updated, no new Event is posted.
    repeat: bool = False


@dataclass(frozen=True)
class StageSucceeded:
    stage: str
    job_name: str


@dataclass(frozen=True)
class RetryStage:
    stage: str
    next_attempt: int
    not_before: datetime
    message: str


@dataclass(frozen=True)
class RemergeStage:
    """``consumer`` found no manifest of ``stage`` (whose Job succeeded): run ``stage`` again,
    then retry ``consumer``."""

    stage: str
    consumer: str
    message: str


@dataclass(frozen=True)
class StageBlocked:
    """Creating ``stage``'s objects failed; ``reason``: CreateRefused, ObjectInTheWay, or
    PodSecurity (the namespace would refuse the pods, so nothing is created)."""

    stage: str
    reason: str
    message: str


@dataclass(frozen=True)
class TrackingState:
    """MLflow answered (``ok``) or not; the run goes on either way."""

    ok: bool
    message: str


@dataclass(frozen=True)
class StageFailed:
    stage: str
    reason: str  # InvalidInput, DeadlineExceeded, RetriesExhausted, ...
    message: str


@dataclass(frozen=True)
class SuspendStage:
    stage: str | None
    job_name: str | None


@dataclass(frozen=True)
class ResumeStage:
    stage: str | None
    job_name: str | None


@dataclass(frozen=True)
class SuspendWorkload:
    """Pause a queued Job through Kueue: its Workload's ``spec.active`` goes false (Kueue then
    evicts it if admitted and keeps it out of the queue). Kueue owns the Job's ``spec.suspend``."""

    stage: str
    job_name: str


@dataclass(frozen=True)
class ResumeWorkload:
    """Reactivate a queued Job's Workload: it is queued again and runs once Kueue admits it."""

    stage: str
    job_name: str


@dataclass(frozen=True)
class FinishRun:
    phase: Literal["Succeeded", "Failed"]
    reason: str
    message: str


@dataclass(frozen=True)
class Requeue:
    after_s: float


Action = (
    StartRun
    | CreateStage
    | StageProgress
    | StageSucceeded
    | RetryStage
    | RemergeStage
    | StageBlocked
    | TrackingState
    | StageFailed
    | SuspendStage
    | ResumeStage
    | SuspendWorkload
    | ResumeWorkload
    | FinishRun
    | Requeue
)


# --------------------------------------------------------------------------- status folding


def set_condition(
    conditions: list[Condition],
    type_: str,
    status: Literal["True", "False", "Unknown"],
    reason: str,
    message: str,
    now: datetime,
    generation: int | None = None,
) -> list[Condition]:
    """metav1.Condition semantics: lastTransitionTime moves only when status changes."""
    out = [c for c in conditions if c.type != type_]
    old = next((c for c in conditions if c.type == type_), None)
    since = old.last_transition_time if old is not None and old.status == status else rfc3339(now)
    out.append(
        Condition(
            type=type_,
            status=status,
            reason=reason,
            message=message,
            last_transition_time=since,
            observed_generation=generation,
        )
    )
    out.sort(key=lambda c: CONDITION_TYPES.index(c.type) if c.type in CONDITION_TYPES else 99)
    return out


def _progress(status: VisionR1RunStatus) -> str:
    stages = [s for s in status.stages.values() if s.phase != "Skipped"]
    done = sum(1 for s in stages if s.phase == "Succeeded")
    return f"{done}/{len(stages)}"


def _stage(status: VisionR1RunStatus, stage: str) -> StageStatus:
    if stage not in status.stages:
        status.stages[stage] = StageStatus()
    return status.stages[stage]


def _apply_one(s: VisionR1RunStatus, a: Action, now: datetime) -> None:  # noqa: C901
    ts = rfc3339(now)
    cond = s.conditions
    if isinstance(a, StartRun):
        s.phase = "Running"
        s.start_time = s.start_time or ts
        for name in STAGES:
            if name in a.skipped:
                s.stages[name] = StageStatus(phase="Skipped")
            elif name in a.stages:
                _stage(s, name)
        s.progress = _progress(s)
        s.conditions = set_condition(
            cond, "Progressing", "True", "RunStarted", f"stages: {', '.join(a.stages)}", now
        )
    elif isinstance(a, CreateStage):
        st = _stage(s, a.stage)
        st.phase = "Running"
        st.job_name = a.job_name
        st.attempts = max(st.attempts, a.attempt + 1)
        st.start_time = st.start_time or ts
        st.finish_time = None
        st.next_retry_time = None
        st.progress = None
        st.message = None
        if s.current_stage != a.stage:  # the run's columns were the stage before's
            s.step = s.eta = s.metric = None
        s.current_stage = a.stage
        if s.phase != "Suspended":
            s.phase = "Running"
        s.conditions = set_condition(
            cond,
            "Progressing",
            "True",
            "StageRunning",
            f"{a.stage}: attempt {a.attempt + 1} ({a.job_name})",
            now,
        )
    elif isinstance(a, StageProgress):
        st = _stage(s, a.stage)
        st.phase = a.phase
        st.progress = a.progress
        st.message = a.message or None
        if a.problem is not None:
            s.conditions = set_condition(
                cond, "Progressing", "True", a.problem, f"{a.stage}: {a.message}", now
            )
        elif a.progress == QUEUED:
            # waiting for Kueue (quota, or evicted): say so where `kubectl describe` looks
            s.conditions = set_condition(
                cond, "Progressing", "True", "StageQueued", f"{a.stage}: {a.message}", now
            )
        elif any(c.type == "Progressing" and c.reason != "StageRunning" for c in cond):
            running = f"{a.stage}: {a.progress}"
            s.conditions = set_condition(cond, "Progressing", "True", "StageRunning", running, now)
    elif isinstance(a, StageSucceeded):
        st = _stage(s, a.stage)
        st.phase = "Succeeded"
        st.finish_time = ts
        st.message = None
        st.progress = None  # else the last "1 pod running" stays under a Succeeded stage
        s.progress = _progress(s)
    elif isinstance(a, RetryStage):
        st = _stage(s, a.stage)
        st.phase = "Pending"
        st.finish_time = ts
        st.next_retry_time = rfc3339(a.not_before)
        st.message = a.message
        s.conditions = set_condition(
            cond, "Progressing", "True", "StageRetrying", f"{a.stage}: {a.message}", now
        )
    elif isinstance(a, RemergeStage):
        for name in (a.stage, a.consumer):
            st = _stage(s, name)
            st.phase = "Pending"
            st.finish_time = ts
            st.next_retry_time = ts
        _stage(s, a.consumer).message = a.message
        s.progress = _progress(s)
        s.conditions = set_condition(
            cond, "Progressing", "True", "StageRemerging", f"{a.consumer}: {a.message}", now
        )
    elif isinstance(a, StageBlocked):
        st = _stage(s, a.stage)
        st.phase = "Pending"
        st.message = a.message
        s.conditions = set_condition(
            cond, "Progressing", "False", a.reason, f"{a.stage}: {a.message}", now
        )
    elif isinstance(a, TrackingState):
        s.conditions = set_condition(
            cond,
            "Tracking",
            "True" if a.ok else "False",
            "MlflowReachable" if a.ok else "MlflowUnreachable",
            a.message,
            now,
        )
    elif isinstance(a, StageFailed):
        st = _stage(s, a.stage)
        st.phase = "Failed"
        st.finish_time = ts
        st.message = a.message
    elif isinstance(a, SuspendStage | SuspendWorkload):
        s.phase = "Suspended"
        if a.stage is not None:
            _stage(s, a.stage).phase = "Suspended"
        how = (
            "its Kueue Workload is deactivated"
            if isinstance(a, SuspendWorkload)
            else "the running Job is suspended"
        )
        s.conditions = set_condition(
            cond,
            "Suspended",
            "True",
            "RunSuspended",
            f"spec.suspend is true: no new Jobs; {how}",
            now,
        )
    elif isinstance(a, ResumeStage | ResumeWorkload):
        s.phase = "Running"
        if a.stage is not None:
            st = _stage(s, a.stage)
            # a reactivated Workload waits for Kueue's admission again
            st.phase = "Running" if isinstance(a, ResumeStage) and a.job_name else "Pending"
        s.conditions = set_condition(
            cond, "Suspended", "False", "RunResumed", "spec.suspend is false", now
        )
    elif isinstance(a, FinishRun):
        s.phase = a.phase
        s.finish_time = ts
        s.conditions = set_condition(cond, "Progressing", "False", a.reason, a.message, now)
        s.conditions = set_condition(s.conditions, a.phase, "True", a.reason, a.message, now)
        if any(c.type == "Suspended" for c in s.conditions):
            s.conditions = set_condition(
                s.conditions, "Suspended", "False", a.reason, "the run has finished", now
            )


def apply(
    status: VisionR1RunStatus | None, actions: Iterable[Action], now: datetime
) -> VisionR1RunStatus:
    """The status after ``actions`` (a new object; ``status`` is left as it was)."""
    s = status.model_copy(deep=True) if status is not None else VisionR1RunStatus()
    for a in actions:
        _apply_one(s, a, now)
    return s


def invalid_spec(message: str) -> FinishRun:
    """The action recording a spec that failed validation (``message`` names the field)."""
    return FinishRun("Failed", "InvalidSpec", message)


# --------------------------------------------------------------------------- the plan


def _latest(jobs: Iterable[ObservedJob]) -> dict[str, ObservedJob]:
    out: dict[str, ObservedJob] = {}
    for j in jobs:
        if j.stage not in out or j.attempt > out[j.stage].attempt:
            out[j.stage] = j
    return out


def _job_progress(job: ObservedJob) -> str:
    # Only pods in phase Running count as running (Job.status.active counts pending ones too).
    running = job.active if job.running_pods is None else min(job.running_pods, job.active)
    pending = job.active - running
    waiting = f", {pending} pending" if pending > 0 else ""
    if job.completions > 1:
        return f"{job.succeeded}/{job.completions} pods done, {running} running{waiting}"
    return f"{running} pod{'s' if running != 1 else ''} running{waiting}"


def latest_succeeded(jobs: Iterable[ObservedJob], stage: str) -> bool:
    """Whether the latest Job of ``stage`` succeeded (a re-run of a finished stage)."""
    job = _latest(jobs).get(stage)
    return job is not None and job.outcome == "succeeded"


def _producer(run: VisionR1Run, stage: str) -> str | None:
    """The stage whose output ``stage`` reads (its ``from.stage``, else the one before it)."""
    ref = run.spec.stages.get(stage).from_
    if ref is not None:
        return ref.stage
    return UPSTREAM.get(stage)


def plan(
    run: VisionR1Run,
    status: VisionR1RunStatus | None,
    jobs: Iterable[ObservedJob],
    now: datetime,
    policy: RetryPolicy = RetryPolicy(),  # noqa: B008 (frozen dataclass)
    _actions: list[Action] | None = None,
) -> list[Action]:
    """The actions that move ``run`` forward; see the module docstring."""
    status = status if status is not None else VisionR1RunStatus()
    if status.phase in ("Succeeded", "Failed"):
        return []  # a finished run is never run again
    jobs = list(jobs)
    spec = run.spec
    stages = enabled_stages(spec)
    actions: list[Action] = _actions if _actions is not None else []
    s = status

    def emit(a: Action) -> None:
        nonlocal s
        actions.append(a)
        s = apply(s, [a], now)

    if s.start_time is None or s.phase == "Pending" and not s.stages:
        emit(StartRun(tuple(stages), tuple(x for x in STAGES if x not in stages)))
    latest = _latest(jobs)

    for stage in stages:
        st = s.stages.get(stage) or StageStatus()
        if st.phase == "Succeeded":
            continue
        if st.phase == "Failed":
            emit(FinishRun("Failed", "StageFailed", f"{stage}: {st.message or 'failed'}"))
            return actions
        backoff_limit = spec.stages.get(stage).backoff_limit
        job = latest.get(stage)
        # The latest attempt is live unless its outcome was already handled (RetryStage and
        # RemergeStage record when the next attempt starts; CreateStage clears it).
        current = (
            job is not None
            and st.attempts > 0
            and job.attempt == st.attempts - 1
            and st.next_retry_time is None
        )
        if job is not None and job.attempt >= st.attempts:
            # A Job newer than the status knows: created just before a crash. Adopt it.
            emit(CreateStage(stage, job.attempt, job.name, reason="JobAdopted"))
            st = s.stages[stage]
            current = True

        if not current:
            # No live attempt: start one, unless suspended or still backing off.
            if spec.suspend:
                if s.phase != "Suspended":
                    emit(SuspendStage(stage, None))
                return actions
            if s.phase == "Suspended":
                emit(ResumeStage(stage, None))
                st = s.stages[stage]
            if st.attempts == 0:
                emit(CreateStage(stage, 0, job_name(run.metadata.name, stage, 0)))
            elif st.next_retry_time is not None:
                due = parse_time(st.next_retry_time) or now
                if now < due:
                    actions.append(Requeue((due - now).total_seconds()))
                    return actions
                remerge = latest_succeeded(jobs, stage)
                emit(
                    CreateStage(
                        stage,
                        st.attempts,
                        job_name(run.metadata.name, stage, st.attempts),
                        reason="StageRemerged" if remerge else "StageRetried",
                    )
                )
            else:
                # The recorded attempt's Job is gone before we saw it finish (deleted by hand):
                # create it again; the stage program skips work that is already done.
                attempt = st.attempts - 1
                emit(
                    CreateStage(
                        stage,
                        attempt,
                        job_name(run.metadata.name, stage, attempt),
                        reason="JobRecreated",
                    )
                )
            return actions

        assert job is not None
        outcome = job.outcome
        if outcome == "succeeded":
            emit(StageSucceeded(stage, job.name))
            continue
        if outcome == "failed":
            detail = job.message or job.failed_reason or "failed"
            if job.exit_code is not None and str(job.exit_code) not in detail:
                detail = f"exit code {job.exit_code}: {detail}"
            if job.permanent:
                reason = (
                    "InvalidInput"
                    if job.exit_code == EXIT_INVALID_INPUT
                    or job.failed_reason == "PodFailurePolicy"
                    else job.failed_reason or "Failed"
                )
                emit(StageFailed(stage, reason, f"{job.name}: {detail} (not retried)"))
                emit(FinishRun("Failed", "StageFailed", f"{stage}: {detail}"))
                return actions
            retries = st.attempts - 1
            producer = _producer(run, stage)
            # A lost merge is not the consumer's failure: the re-merge comes before the retries
            # check, and each attempt lost this way gets one more (so backoffLimit 0 re-merges
            # once; a consumer that still finds no input then fails with its retries spent).
            if (
                job.input_missing
                and producer in SHARDED_STAGES
                and (s.stages.get(producer) or StageStatus()).phase == "Succeeded"
                and retries <= backoff_limit
            ):
                emit(
                    RemergeStage(
                        producer,
                        stage,
                        f"attempt {st.attempts} found no {producer}/_manifest.json although "
                        f"{producer}'s Job succeeded; running {producer} again to merge its "
                        f"shards, then attempt {st.attempts + 1} (backoffLimit {backoff_limit}, "
                        "plus one per lost merge)",
                    )
                )
                return plan(run, s, jobs, now, policy, _actions=actions)
            if retries >= backoff_limit:
                emit(
                    StageFailed(
                        stage,
                        "RetriesExhausted",
                        f"{job.name}: {detail}; {st.attempts} attempt(s), "
                        f"backoffLimit {backoff_limit} spent",
                    )
                )
                emit(
                    FinishRun(
                        "Failed", "StageFailed", f"{stage}: {detail} (after {st.attempts} attempts)"
                    )
                )
                return actions
            delay = policy.delay(retries + 1)
            failed_at = job.finished_at or now
            not_before = failed_at + timedelta(seconds=delay)
            emit(
                RetryStage(
                    stage,
                    st.attempts,
                    not_before,
                    f"attempt {st.attempts} failed ({detail}); retry "
                    f"{retries + 1}/{backoff_limit} at {rfc3339(not_before)}",
                )
            )
            if now < not_before:
                actions.append(Requeue((not_before - now).total_seconds()))
                return actions
            emit(
                CreateStage(
                    stage,
                    st.attempts,
                    job_name(run.metadata.name, stage, st.attempts),
                    reason="StageRetried",
                )
            )
            return actions
        # Running, or suspended (by us for spec.suspend, or by Kueue until it admits the Job).
        # Kueue owns spec.suspend of a queued Job: suspending an admitted one would be undone by
        # Kueue (and redone by us, in a loop), un-suspending one would skip admission. So a
        # queued Job is paused and resumed through its Workload (spec.active), never its suspend.
        queue = job.queue or spec.queue_name
        if spec.suspend:
            if queue and not job.held:
                emit(SuspendWorkload(stage, job.name))
            elif not queue and not job.suspended:
                emit(SuspendStage(stage, job.name))
            elif st.phase != "Suspended" or s.phase != "Suspended":
                emit(SuspendStage(stage, None))
            return actions
        if queue and job.held:
            emit(ResumeWorkload(stage, job.name))
            return actions
        if not queue and job.suspended and job.held:
            # Only our own suspend is undone: a Job suspended by someone else (Kueue managing
            # Jobs without a queue name) waits for them, or the two would fight over it.
            emit(ResumeStage(stage, job.name))
            return actions
        if st.phase == "Suspended" or s.phase == "Suspended":
            emit(ResumeStage(stage, None))
        if outcome == "suspended":
            # Created suspended for Kueue, or evicted by it (preempted): waiting for quota.
            where = (
                f"LocalQueue {queue}"
                if queue
                else "suspended by Kueue, which manages Jobs without a queue name; "
                "spec.queueName picks the queue"
            )
            text = f"waiting for Kueue to admit it ({where})"
            if job.admission:
                text += f": {job.admission}"
            want = StageProgress(stage, "Pending", QUEUED, text)
        elif job.pod_problem is not None:
            reason, message = job.pod_problem
            phase: Literal["Pending", "Running"] = "Running" if job.running_pods else "Pending"
            want = StageProgress(stage, phase, _job_progress(job), message, problem=reason)
        else:
            want = StageProgress(stage, "Running", _job_progress(job))
        st = s.stages[stage]
        if (st.phase, st.progress, st.message) != (want.phase, want.progress, want.message or None):
            shown = next((c.reason for c in s.conditions if c.type == "Progressing"), None)
            reason = want.problem or ("StageQueued" if want.progress == QUEUED else None)
            same = reason is not None and shown == reason and st.phase == want.phase
            emit(replace(want, repeat=same))
        return actions

    emit(
        FinishRun(
            "Succeeded",
            "AllStagesSucceeded",
            f"{len(stages)} stage(s) succeeded: {', '.join(stages)}",
        )
    )
    return actions


# --------------------------------------------------------------------------- for people


def describe(a: Action) -> tuple[Literal["Normal", "Warning"], str, str] | None:
    """(event type, reason, message) of an action; None for bookkeeping-only actions."""
    if isinstance(a, StartRun):
        skipped = f" (skipped: {', '.join(a.skipped)})" if a.skipped else ""
        return "Normal", "RunStarted", f"stages: {', '.join(a.stages)}{skipped}"
    if isinstance(a, CreateStage):
        return "Normal", a.reason, f"{a.stage}: attempt {a.attempt + 1}, Job {a.job_name}"
    if isinstance(a, StageSucceeded):
        return "Normal", "StageSucceeded", f"{a.stage}: Job {a.job_name} succeeded"
    if isinstance(a, RetryStage):
        return "Warning", "StageRetrying", f"{a.stage}: {a.message}"
    if isinstance(a, RemergeStage):
        return "Warning", "StageRemerging", f"{a.consumer}: {a.message}"
    if isinstance(a, StageBlocked):
        return "Warning", a.reason, f"{a.stage}: {a.message}"
    if isinstance(a, StageProgress) and a.repeat:
        return None  # the same reason, said already: no Event per new message
    if isinstance(a, StageProgress) and a.problem is not None:
        return "Warning", a.problem, f"{a.stage}: {a.message}"
    if isinstance(a, TrackingState):
        kind: Literal["Normal", "Warning"] = "Normal" if a.ok else "Warning"
        return kind, "MlflowReachable" if a.ok else "MlflowUnreachable", a.message
    if isinstance(a, StageFailed):
        return "Warning", a.reason, f"{a.stage}: {a.message}"
    if isinstance(a, SuspendStage):
        what = f"Job {a.job_name} suspended" if a.job_name else "no new Jobs"
        return "Normal", "Suspended", f"spec.suspend is true: {what}"
    if isinstance(a, ResumeStage):
        what = f"Job {a.job_name} resumed" if a.job_name else "continuing"
        return "Normal", "Resumed", f"spec.suspend is false: {what}"
    if isinstance(a, SuspendWorkload):
        what = f"Kueue Workload of Job {a.job_name} deactivated"
        return "Normal", "Suspended", f"spec.suspend is true: {what}"
    if isinstance(a, ResumeWorkload):
        what = f"Kueue Workload of Job {a.job_name} reactivated"
        return "Normal", "Resumed", f"spec.suspend is false: {what}"
    if isinstance(a, StageProgress) and a.progress == QUEUED:
        return "Normal", "StageQueued", f"{a.stage}: {a.message}"
    if isinstance(a, FinishRun):
        return ("Normal" if a.phase == "Succeeded" else "Warning"), a.reason, a.message
    return None


__all__ = [
    "Action",
    "CreateStage",
    "RemergeStage",
    "StageBlocked",
    "TrackingState",
    "FinishRun",
    "ObservedJob",
    "Requeue",
    "ResumeStage",
    "ResumeWorkload",
    "RetryPolicy",
    "RetryStage",
    "StageFailed",
    "StageProgress",
    "StageSucceeded",
    "StartRun",
    "SuspendStage",
    "SuspendWorkload",
    "apply",
    "describe",
    "invalid_spec",
    "job_name",
    "plan",
    "set_condition",
]
