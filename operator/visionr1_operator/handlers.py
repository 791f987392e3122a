"""kopf handlers: the thin edge that runs the plan against a cluster.

Every trigger (a VisionR1Run created, resumed at operator start, or its spec changed; a child Job
or one of its pods changed; a retry's backoff elapsed) does the same thing: read the run and its
Jobs, ``plan``, execute the actions (create objects, suspend Jobs, open and end MLflow runs, post
Events), and patch the status. Reconciles of one run are serialised by a lock; different runs go
in parallel. All calls are async (lightkube through ``kube``; MlflowClient in a thread), and
kopf's worker_limit is left unset: a low limit turns millisecond transitions into seconds
(docs/design.md).

What goes wrong is shown to people, never swallowed: a create refused (403, 422, quota) or an
object of the same name that this run does not own (a deleted run's children still being
collected) makes the run wait with a condition and an Event naming it; a pod that cannot be
scheduled, cannot pull its image or was OOMKilled (with its memory limit and the field to
raise) is named in the stage's message, the ``Progressing`` condition and an Event, and so is a
failed container's own termination message (the stage program's one-line reason). MLflow is
never in the way: when it does not answer, the ``Tracking`` condition says so, Jobs are created
all the same, and the MLflow side is retried on its own (opening runs on later reconciles,
ending runs in the background).

Refusals that only Events show: ResourceQuota, Pod Security and LimitRange judge pods, so the
Job is accepted and the Job controller's pod creations are refused (``FailedCreate`` Events on
the Job). A live Job with no pods a few seconds after it was seen has its FailedCreate Events
read (by the Job's uid, server-side filtered), again with a backoff up to a minute while it has
none; the refusal (the quota and its numbers, the violated Pod Security rule, the LimitRange
bound) becomes the stage's message, the ``Progressing`` reason and a Warning Event, cleared when
its pods are created. The same timer reads a Kueue-suspended Job's Workload (by the Job's uid)
for Kueue's "why not admitted" message. Nothing is watched for this: no Event stream of the
whole namespace, one filtered list per waiting Job and backoff step.

Quiet while Pending: a pod whose trouble keeps its reason but changes its message (the
scheduler's node counts) triggers a reconcile at most once a minute, and a new message for a
reason the run already shows updates the status without a new Event.

Failure releases resources: when a run fails (a stage failed, retries spent, or an edit made
its spec invalid), its unfinished Jobs are deleted with background propagation, so the garbage
collector terminates their pods at once (their grace period); finished Jobs and their pods
stay for their logs. MLflow stage runs still open and the parent run end FAILED.

Pod Security: before creating a stage's Job the operator reads the namespace's
``pod-security.kubernetes.io/enforce`` label; where it is ``restricted`` the pods get no root
init container (``spec.storage.workspaceInit`` Auto), and a run that insists on one waits with
a ``PodSecurity`` condition naming the field instead of creating pods the API server refuses.

No finalizer: deleting a run (or uninstalling the chart with runs present) is never blocked by
the operator. Children go by owner reference (the garbage collector); the MLflow runs of a run
deleted while the operator runs are ended from the deletion's watch event.

``make_registry(config)`` builds a fresh kopf registry, so tests and ``visionr1 operator`` run the
same handlers with their own settings.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import os
import time
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

import kopf
import orjson
from pydantic import ValidationError

from visionr1_jobs.config import STAGES
from visionr1_operator import (
    acyclic_bodies,
    chargeback,
    compat,
    kueue,
    manifests,
    mlflow_runs,
    peering,
    refusals,
    watch,
    watch_stream,
)
from visionr1_operator.api import (
    API_VERSION,
    GROUP,
    PLURAL,
    VERSION,
    VisionR1Run,
    VisionR1RunStatus,
)
from visionr1_operator.kube import ApiError, Kube, Timeouts
from visionr1_operator.plan import (
    Action,
    CreateStage,
    FinishRun,
    ObservedJob,
    Requeue,
    ResumeStage,
    ResumeWorkload,
    RetryPolicy,
    StageBlocked,
    StageFailed,
    StartRun,
    SuspendStage,
    SuspendWorkload,
    TrackingState,
    apply,
    describe,
    invalid_spec,
    plan,
)
from visionr1_operator.policy import (
    ClusterPolicy,
    cluster_problems,
    namespace_problem,
    policy_problems,
)
from visionr1_operator.validate import accepted_run, validate_object

# Recorded in kopf's settings; no handler needs it, so kopf adds none and removes a stale one.
FINALIZER = f"{GROUP}/finalizer"
# kopf's copy of the last spec it handled, as operators with change handlers stored it on runs
KOPF_DIFFBASE = f"{GROUP}/last-handled-configuration"
SERVICE_ACCOUNT_TOKEN = "/var/run/secrets/kubernetes.io/serviceaccount/token"
# A live Job without pods: when its FailedCreate Events (or a Kueue-suspended Job's Workload) are
# read first, and at most how long apart later reads are (doubling in between).
FIRST_CHECK_S = 3.0
MAX_CHECK_S = 60.0
# A namespace's FailedCreate Events, read once for every Job of it that waits: the API server
# keeps no cache of Events, so each list decodes every Event of the namespace from etcd (one
# per waiting Job at 200 runs was a quarter of its CPU, and slowed every Job it served)
EVENTS_TTL_S = 5.0
# A pod's trouble with the same reason and a new message reconciles at most this often.
PROBLEM_REFRESH_S = 60.0
# A Job's or pod's change that only updates what the status shows (a Job seen, its pods
# counted, a pod running or done) reconciles within this many seconds, one reconcile for all
# such changes of the run meanwhile; an end, a suspension, a pod's trouble reconcile at once.
# (A stage's start brought about seven reconciles, one per watch event: at 1,000 runs they
# queued the one reconcile that creates the next stage.)
COALESCE_S = 1.0
# How long the status this process wrote stands in for the one its watch shows, which should
# catch up within a second: if it never does (someone else wrote the status), the watch wins.
WRITTEN_TRUST_S = 30.0
log = logging.getLogger("visionr1.operator")
# The condition reason of a run the cluster's policy refuses (policy.policy_problems).
NOT_ALLOWED = "NotAllowed"

T = TypeVar("T")


@dataclass
class OperatorConfig:
    """What ``visionr1 operator`` is started with."""

    mlflow_uri: str | None = None  # for runs without spec.mlflow.trackingUri; None = no tracking
    # The operator's own credentials, sent only to mlflow_uri, for runs naming no
    # spec.mlflow.credentialsSecret (keys: username, password, token).
    mlflow_credentials: dict[str, str] = field(default_factory=dict)
    # How long a run's credentials Secret, once read, is used before it is read again.
    credentials_ttl_s: float = 60.0
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    # Log in with this kopf.ConnectionInfo instead of the service account / kubeconfig (tests).
    connection: Any = None
    error_delay_s: float = 5.0
    policy: ClusterPolicy = field(default_factory=ClusterPolicy)
    # MLflow: how long one call may take, and how long to wait after it failed before the
    # next try (meanwhile runs go on untracked).
    mlflow_timeout_s: float = 30.0
    mlflow_retry_s: float = 30.0
    timeouts: Timeouts = field(default_factory=Timeouts)
    # How often a running stage's MLflow run is read for its step, ETA and key metric.
    metrics_interval_s: float = 30.0
    # Standby replicas: the kopf peering object's name (None: standalone, one replica), how long
    # a silent peer counts as alive, and where the peering objects live (peering.py).
    peering: str | None = None
    peering_lifetime_s: int = 15
    namespaces: tuple[str, ...] = ()
    clusterwide: bool = False
    # How long a namespace's Pod Security label, once read, is taken as it was.
    pod_security_ttl_s: float = 10.0
    # A status write that changes only its pods' progress (what a person reads while a stage
    # runs) waits until this long after the run's previous write. At 5 s,
    # stages slowed by a busy control plane wrote "1 pod running", then "0 pods running"
    # before their Job completed: two thirds of the status writes at 200 runs, each a full
    # validation of the run by the API server. A stage's start, end and failure, why it waits,
    # and whatever an Event says, are written at once.
    progress_interval_s: float = 30.0
    # ... and at most this many such writes per second for all runs together: with more runs
    # going than this times progress_interval_s, each run's interval grows (1,000 runs: 200 s).
    # Progress is what a person glances at; a stage's start and end are never held back.
    progress_writes_per_s: float = 5.0


class NoDiffBase(kopf.DiffBaseStorage):
    """kopf's base for change handlers, for an operator that has none: nothing built, nothing
    stored. Runs are reconciled from their own watch events, never by comparing a spec with a
    copy of the last one handled; yet kopf builds that copy (a deep copy of the whole object,
    managedFields included) for every watch event of every Job, pod and run it watches: 16% of
    the operator's CPU at 500 runs. With no change handler registered, it is never read."""

    def build(self, *, body: kopf.Body, extra_fields: Any = None) -> Any:
        return None

    def fetch(self, *, body: kopf.Body) -> Any:
        return None

    def store(self, *, body: kopf.Body, patch: Any, essence: Any) -> None:
        return None


class ObjectInTheWay(Exception):
    """An object of a child's name exists that this run does not own."""


@dataclass
class WaitCheck:
    """Reading why a live Job has no pods (``refusal``: its FailedCreate Events) or why Kueue
    keeps it suspended (``kueue``: its Workload), with a backoff between reads."""

    kind: str
    due: float  # monotonic time of the next read
    interval: float
    value: str | tuple[str, str] | None = None  # what the last read found


def _status(obj: Mapping[str, Any]) -> VisionR1RunStatus:
    raw = dict(obj.get("status") or {})
    try:
        return VisionR1RunStatus.model_validate(raw)
    except ValidationError:
        # Unknown or foreign fields (an older operator's status): keep what still parses.
        known = VisionR1RunStatus.model_fields
        aliases = {f.alias or n for n, f in known.items()}
        try:
            return VisionR1RunStatus.model_validate({k: v for k, v in raw.items() if k in aliases})
        except ValidationError:
            return VisionR1RunStatus()


def _status_patch(status: VisionR1RunStatus) -> dict[str, Any]:
    # Merge patch: send None for cleared fields so they are removed, not left stale.
    return {"status": status.model_dump(mode="json", by_alias=True)}


def _indexed_run(body: Mapping[str, Any]) -> bytes:
    """What a reconcile reads of a run, kept in memory per run as JSON: its metadata without
    managedFields and without kopf's annotation that holds a copy of the whole spec. Bytes,
    not the dicts: a run's spec and status are hundreds of small objects that each full
    garbage collection walks (at 1,000 runs they paused the operator 0.1-1.1 s each time) and
    about five times the memory; decoding one per reconcile costs tens of microseconds. (A
    deep copy per event, which this replaces, was 3.5% of the operator's CPU at 500 runs.)"""
    meta = {k: v for k, v in (body.get("metadata") or {}).items() if k != "managedFields"}
    notes = meta.get("annotations") or {}
    kept = {k: v for k, v in notes.items() if k != KOPF_DIFFBASE}
    if notes:
        meta["annotations"] = kept
    out = {k: body.get(k) for k in ("apiVersion", "kind", "spec", "status") if k in body}
    return orjson.dumps({**out, "metadata": meta})


def _progress_only(old: VisionR1RunStatus, new: VisionR1RunStatus, actions: list[Action]) -> bool:
    """Whether ``new`` differs from ``old`` only in what a person reads while a stage runs (a
    stage's progress, a condition's message) and nothing is said in an Event. A stage's message
    is not progress: it says why the stage waits (Kueue's reason, a quota that refuses its
    pods), read at most once per check, and a person waits for it."""
    if any(describe(a) is not None for a in actions):
        return False

    def shape(s: VisionR1RunStatus) -> VisionR1RunStatus:
        stages = {k: v.model_copy(update={"progress": None}) for k, v in s.stages.items()}
        conditions = [c.model_copy(update={"message": ""}) for c in s.conditions]
        return s.model_copy(update={"stages": stages, "conditions": conditions})

    return shape(old) == shape(new)


def _tracking_ok(status: VisionR1RunStatus) -> bool:
    return not any(c.type == "Tracking" and c.status == "False" for c in status.conditions)


class Reconciler:
    """In-memory state of one operator process: API client, per-run locks, retry timers.

    Everything kept per run is dropped when the run is deleted (:meth:`forget`): a new run of
    the same name starts from nothing.
    """

    def __init__(self, config: OperatorConfig) -> None:
        self.config = config
        self.kube: Kube | None = None
        self.locks: dict[tuple[str, str], asyncio.Lock] = defaultdict(asyncio.Lock)
        self.timers: dict[tuple[str, str], asyncio.Task[None]] = {}
        # (namespace, run) → job name → what the Job watch last reported
        self.seen: dict[tuple[str, str], dict[str, ObservedJob]] = defaultdict(dict)
        self.job_index: Any = None  # kopf.Index: (namespace, run) → (ObservedJob, owner uids)
        self.pod_index: Any = None  # kopf.Index: (namespace, job) → manifests.PodFacts
        # (namespace, run) → Jobs this process created whose watch event has not arrived yet
        self.created: dict[tuple[str, str], dict[str, ObservedJob]] = defaultdict(dict)
        # (namespace, run) → consecutive reconciles that could not create a stage's objects
        self.blocked: dict[tuple[str, str], int] = defaultdict(int)
        # MLflow URI → monotonic time before which it is not asked again (it just failed)
        self.mlflow_down_until: dict[str, float] = {}
        # (namespace, Secret) → (until when, credentials read from it): a run's MLflow login
        self.credentials: dict[tuple[str, str], tuple[float, dict[str, str]]] = {}
        self.background: set[asyncio.Task[None]] = set()
        # (namespace, run) → pod name → what the pod watch last reported
        self.seen_pods: dict[tuple[str, str], dict[str, Any]] = defaultdict(dict)
        # (namespace, run) → Job name → why it has no pods / is not admitted (read on a timer)
        self.waiting: dict[tuple[str, str], dict[str, WaitCheck]] = {}
        self.wait_timers: dict[tuple[str, str], asyncio.Task[None]] = {}
        # (namespace, run) → the task polling its stages' MLflow metrics
        self.watchers: dict[tuple[str, str], asyncio.Task[None]] = {}
        self.run_index: Any = None  # kopf.Index: (namespace, run) → the run, as last watched
        # (namespace, run) → the status this process last wrote and when, while the watch has
        # not shown it yet: until it does, the index's status is older than the run's
        self.written: dict[tuple[str, str], tuple[VisionR1RunStatus, float]] = {}
        # Runs with a reconcile waiting for their lock: a trigger that comes meanwhile rides on
        # it (it reads the run, its Jobs and pods only once it holds the lock).
        self.queued: set[tuple[str, str]] = set()
        # namespace → (monotonic expiry, its Pod Security enforce level)
        self.pod_security_levels: dict[str, tuple[float, str | None]] = {}
        # (namespace, run) → monotonic time of this process's last status write
        self.last_write: dict[tuple[str, str], float] = {}
        # runs not finished, as their last reconcile left them (sets the progress interval)
        self.active: set[tuple[str, str]] = set()
        # (namespace, run) → monotonic time its timer fires
        self.due: dict[tuple[str, str], float] = {}
        # runs whose events this process has reconciled at least once
        self.resumed: set[tuple[str, str]] = set()
        # namespace → (monotonic expiry, its FailedCreate Events), and the read under way
        self.failed_creates: dict[str, tuple[float, list[dict[str, Any]]]] = {}
        self.failed_creates_reading: dict[str, asyncio.Future[list[dict[str, Any]]]] = {}
        # (namespace, run) → the reconcile coalescing its Jobs' and pods' minor changes
        self.soon: dict[tuple[str, str], asyncio.Task[None]] = {}

    # ------------------------------------------------------------------ triggers

    def reconcile_soon(self, namespace: str, name: str) -> None:
        """Reconcile the run within ``COALESCE_S`` seconds, with every trigger of it meanwhile
        (a reconcile that starts before then reads them all and takes this one's place)."""
        key = (namespace, name)
        task = self.soon.get(key)
        if task is not None and not task.done():
            return

        async def later() -> None:
            await asyncio.sleep(COALESCE_S)
            if self.soon.get(key) is asyncio.current_task():
                del self.soon[key]
            await self.reconcile_quietly(namespace, name)

        self.soon[key] = asyncio.create_task(later())

    def progress_interval_s(self) -> float:
        """How long after a run's last status write its pods' progress alone is written:
        ``config.progress_interval_s``, or longer with so many runs going that their progress
        writes together would pass ``config.progress_writes_per_s``."""
        return max(
            self.config.progress_interval_s,
            len(self.active) / max(self.config.progress_writes_per_s, 1e-3),
        )

    def schedule(
        self, namespace: str, name: str, after_s: float, *, keep_sooner: bool = False
    ) -> None:
        """Reconcile the run in ``after_s`` seconds, replacing its timer (``keep_sooner``: unless
        that one fires sooner)."""
        key = (namespace, name)
        old = self.timers.get(key)
        if old is not None and not old.done():
            if keep_sooner and self.due.get(key, float("inf")) <= time.monotonic() + after_s:
                return
            old.cancel()

        async def later() -> None:
            await asyncio.sleep(after_s)
            self.timers.pop(key, None)
            self.due.pop(key, None)
            await self.reconcile_quietly(namespace, name)

        self.due[key] = time.monotonic() + after_s
        self.timers[key] = asyncio.create_task(later())

    def _schedule_check(self, namespace: str, name: str, after_s: float | None) -> None:
        """The next read of a waiting Job's Events or Workload (its own timer: the plan's
        retry timer is left alone); None cancels it."""
        key = (namespace, name)
        old = self.wait_timers.pop(key, None)
        if old is not None and not old.done() and old is not asyncio.current_task():
            old.cancel()
        if after_s is None:
            return

        async def later() -> None:
            await asyncio.sleep(after_s)
            if self.wait_timers.get(key) is asyncio.current_task():
                del self.wait_timers[key]
            if self._still_waits(key):
                await self.reconcile_quietly(namespace, name)

        self.wait_timers[key] = asyncio.create_task(later())

    def _still_waits(self, key: tuple[str, str]) -> bool:
        """Whether a Job the run's last reconcile found waiting still waits, as far as the
        watch shows: Kueue keeps it suspended, or it has no pods yet. (Under load the Job
        controller often takes longer than the first check to create a Job's pods; those
        pods' events reconcile the run themselves.)"""
        for job, check in (self.waiting.get(key) or {}).items():
            if check.kind != "refusal" or self.pod_index is None:
                return True
            if not list(self.pod_index.get((key[0], job), [])):
                return True
        return False

    async def reconcile_quietly(self, namespace: str, name: str) -> None:
        """For triggers kopf does not retry (Job events, timers): log and try again later."""
        try:
            await self.reconcile(namespace, name)
        except Exception as exc:  # noqa: BLE001 (any failure: retry the whole reconcile)
            log.warning("reconcile %s/%s failed, retrying: %s", namespace, name, exc)
            self.schedule(namespace, name, self.config.error_delay_s)

    def forget(self, namespace: str, name: str) -> None:
        """Drop every piece of in-memory state of a run (it was deleted)."""
        key = (namespace, name)
        for timers in (self.timers, self.wait_timers, self.watchers, self.soon):
            timer = timers.pop(key, None)
            if timer is not None and timer is not asyncio.current_task():
                timer.cancel()
        lock = self.locks.get(key)
        if lock is not None and not lock.locked():
            self.locks.pop(key, None)
        self.seen.pop(key, None)
        self.seen_pods.pop(key, None)
        self.created.pop(key, None)
        self.blocked.pop(key, None)
        self.waiting.pop(key, None)
        self.written.pop(key, None)
        self.last_write.pop(key, None)
        self.active.discard(key)
        self.due.pop(key, None)
        self.resumed.discard(key)

    def state_of(self, namespace: str, name: str) -> dict[str, Any]:
        """What this process keeps about one run (for tests and debugging)."""
        key = (namespace, name)
        stores = {
            "locks": self.locks,
            "timers": self.timers,
            "seen": self.seen,
            "seen_pods": self.seen_pods,
            "created": self.created,
            "blocked": self.blocked,
            "waiting": self.waiting,
            "wait_timers": self.wait_timers,
            "written": self.written,
            "last_write": self.last_write,
            "due": self.due,
            "soon": self.soon,
        }
        out = {k: store[key] for k, store in stores.items() if key in store}
        if key in self.queued:
            out["queued"] = True
        if key in self.active:
            out["active"] = True
        return out

    # ------------------------------------------------------------------ the reconcile

    async def reconcile(self, namespace: str, name: str) -> None:
        """Bring the run one step closer to its spec. Triggers that come while a reconcile of
        the same run waits for its lock are dropped: that one reads everything after it gets
        the lock. (A burst of pod and Job events used to queue one reconcile each behind the
        lock; the Job's completion waited for all of them: the tail of the load benchmark.)"""
        assert self.kube is not None, "not logged in"
        key = (namespace, name)
        if key in self.queued:
            return
        self.queued.add(key)
        try:
            async with self.locks[key]:
                self.queued.discard(key)
                soon = self.soon.pop(key, None)
                if soon is not None and soon is not asyncio.current_task():
                    soon.cancel()  # this reconcile reads what it was waiting to read
                obj = await self._read_run(key)
                if obj is not None:
                    await self._reconcile(namespace, name, obj)
                    return
        finally:
            self.queued.discard(key)
        self.forget(namespace, name)  # gone: after the lock is released, so it goes too

    async def _read_run(self, key: tuple[str, str]) -> dict[str, Any] | None:
        """The run as the watch's index has it, with the status this process wrote last while
        the watch has not shown that yet (the operator is the status's only writer; after
        ``WRITTEN_TRUST_S`` the index is trusted again); None when the index does not have it
        (it is gone). No GET per reconcile: at 1,000 runs half the operator's requests were
        these. A spec older than the API server's is harmless: its
        edit is a trigger of its own, seen once the watch brings it."""
        assert self.kube is not None
        index = self.run_index
        if index is None:  # no kopf (a test driving the Reconciler): the API server
            try:
                return await self.kube.get(API_VERSION, PLURAL, *key)
            except ApiError as exc:
                if exc.status != 404:
                    raise
                return None
        # kopf fills its indexes from the watch before any handler runs: not there, gone
        found = next(iter(index.get(key, [])), None)
        if found is None:
            return None
        obj: dict[str, Any] = orjson.loads(found)  # the reconcile's own copy
        mine = self.written.get(key)
        if mine is not None:
            status, at = mine
            if _status(obj) == status or time.monotonic() - at > WRITTEN_TRUST_S:
                del self.written[key]  # the watch has caught up
            else:
                obj["status"] = _status_patch(status)["status"]
        return obj

    async def _reconcile(self, namespace: str, name: str, obj: dict[str, Any]) -> None:
        assert self.kube is not None
        if (obj.get("metadata") or {}).get("deletionTimestamp"):
            return
        status = _status(obj)
        if status.phase in ("Succeeded", "Failed"):
            return  # a finished run is never run again
        now = datetime.now(UTC)
        refused = namespace_problem(namespace, self.config.policy)
        if refused:  # before anything else, on every reconcile: nothing of the run is looked at
            await self._finish(
                obj, status, status, [FinishRun("Failed", NOT_ALLOWED, refused)], now
            )
            return
        run, refusal = self._admit(namespace, name, obj, status)
        if run is None:
            assert refusal is not None
            await self._fail_invalid(obj, status, refusal, now)
            return
        jobs = await self._failed_pods(namespace, status, self._observe(namespace, name, obj))
        jobs, recheck = await self._why_waiting(namespace, name, jobs)
        actions = plan(run, status, jobs, now, self.config.retry)
        new, extra = await self._execute(run, obj, status, actions, now, jobs)
        new = await self._charge(namespace, new, jobs, now)
        if not any(st.phase == "Running" for st in new.stages.values()):
            new.step = new.eta = None  # no stage runs: no step to show, nothing to wait for
        await self._finish(obj, status, new, [*actions, *extra], now, executed=True)
        self._schedule_check(
            namespace, name, None if new.phase in ("Failed", "Succeeded") else recheck
        )
        if (run.spec.mlflow.tracking_uri or self.config.mlflow_uri) and any(
            watch.wants_watch(new, s, st) for s, st in new.stages.items()
        ):
            self._watch(namespace, name)

    async def _fail_invalid(
        self, obj: Mapping[str, Any], status: VisionR1RunStatus, refusal: FinishRun, now: datetime
    ) -> None:
        """The spec is refused (an edit that does not validate or is not allowed): the run
        fails, its live Jobs go, its open MLflow runs end FAILED."""
        assert self.kube is not None
        meta = obj["metadata"]
        namespace, name = meta["namespace"], meta["name"]
        await self._stop_jobs(namespace, name, self._observe(namespace, name, obj))
        stopped = [
            StageFailed(
                stage, "RunFailed", f"stopped: the run's spec is refused ({refusal.reason})"
            )
            for stage, st in status.stages.items()
            if st.phase in ("Pending", "Running", "Suspended") and st.attempts > 0
        ]
        spec = (obj.get("spec") or {}).get("mlflow") or {}
        uri: mlflow_runs.Server | None = None
        tracking = spec.get("trackingUri") or self.config.mlflow_uri
        # the refused edit may name any server: never call one that is not allowed
        if status.mlflow_run_id and tracking in (
            self.config.mlflow_uri,
            *self.config.policy.allowed_tracking_uris,
        ):
            try:
                uri, _ = await self._server(namespace, tracking, spec.get("credentialsSecret"))
            except ApiError:
                uri = None
        if uri and status.mlflow_run_id:
            for a in stopped:
                stage_run = status.stages[a.stage].mlflow_run_id
                if stage_run:
                    await self._end(uri, stage_run, "FAILED")
            await self._end(uri, status.mlflow_run_id, "FAILED")
        self._schedule_check(namespace, name, None)
        await self._finish(obj, status, status, [*stopped, refusal], now)

    async def _stop_jobs(self, namespace: str, name: str, jobs: list[ObservedJob]) -> None:
        """Delete the run's unfinished Jobs; their pods go with them (background propagation:
        the garbage collector terminates them at once). Finished ones stay for their logs."""
        assert self.kube is not None
        for job in jobs:
            if job.outcome in ("running", "suspended"):
                if await self.kube.delete("batch/v1", "jobs", namespace, job.name):
                    log.info(
                        "%s/%s failed: deleted its unfinished Job %s", namespace, name, job.name
                    )
            self.created.get((namespace, name), {}).pop(job.name, None)

    async def _why_waiting(
        self, namespace: str, name: str, jobs: list[ObservedJob]
    ) -> tuple[list[ObservedJob], float | None]:
        """Each live Job without pods with its pods' refusal (``pod_problem``), each Job Kueue
        keeps suspended with Kueue's reason (``admission``), as far as read so far; and in how
        many seconds to read again (None: nothing waits)."""
        key = (namespace, name)
        known = self.waiting.get(key, {})
        fresh: dict[str, WaitCheck] = {}
        out: list[ObservedJob] = []
        nearest = math.inf
        now = time.monotonic()
        for job in jobs:
            pods = self.pod_index.get((namespace, job.name), []) if self.pod_index else []
            kind = None
            if job.uid and job.outcome == "running" and job.active == 0 and not list(pods):
                kind = "refusal"
            elif job.uid and job.outcome == "suspended" and not job.held:
                kind = "kueue"
            if kind is None:
                out.append(job)
                continue
            check = known.get(job.name)
            if check is None or check.kind != kind:
                check = WaitCheck(kind, now + FIRST_CHECK_S, FIRST_CHECK_S)
            elif now >= check.due:
                check.value = await self._read_why(kind, namespace, job)
                check.interval = min(check.interval * 2, MAX_CHECK_S)
                check.due = now + check.interval
            fresh[job.name] = check
            nearest = min(nearest, max(check.due - now, 0.1))
            if isinstance(check.value, tuple):
                job = dataclasses.replace(job, pod_problem=check.value)
            elif isinstance(check.value, str):
                job = dataclasses.replace(job, admission=check.value)
            out.append(job)
        if fresh:
            self.waiting[key] = fresh
        else:
            self.waiting.pop(key, None)
        return out, (nearest if fresh else None)

    async def _read_why(
        self, kind: str, namespace: str, job: ObservedJob
    ) -> str | tuple[str, str] | None:
        assert self.kube is not None
        try:
            if kind == "kueue":
                return await kueue.waiting_message(self.kube, namespace, job.name, job.uid)
            events = await self._failed_creates(namespace)
        except ApiError as exc:  # only a missing explanation: the run goes on
            log.warning("%s: cannot read why Job %s waits: %s", namespace, job.name, exc)
            return None
        return refusals.refusal(events, job.uid, job.stage)

    async def _failed_creates(self, namespace: str) -> list[dict[str, Any]]:
        """The namespace's FailedCreate Events of Jobs, at most ``EVENTS_TTL_S`` old: one list
        (and one at a time) for all its waiting Jobs."""
        assert self.kube is not None
        cached = self.failed_creates.get(namespace)
        if cached is not None and cached[0] > time.monotonic():
            return cached[1]
        reading = self.failed_creates_reading.get(namespace)
        if reading is None:

            async def read() -> list[dict[str, Any]]:
                assert self.kube is not None
                try:
                    events = await self.kube.list(
                        "v1",
                        "events",
                        namespace,
                        field_selector={
                            "reason": refusals.FAILED_CREATE,
                            "involvedObject.kind": "Job",
                        },
                    )
                finally:
                    self.failed_creates_reading.pop(namespace, None)
                self.failed_creates[namespace] = (time.monotonic() + EVENTS_TTL_S, list(events))
                return list(events)

            reading = asyncio.ensure_future(read())
            self.failed_creates_reading[namespace] = reading
        return await asyncio.shield(reading)

    async def _charge(
        self,
        namespace: str,
        status: VisionR1RunStatus,
        jobs: list[ObservedJob],
        now: datetime,
    ) -> VisionR1RunStatus:
        """Add the GPU-hours of every attempt that has ended (its Job succeeded or failed) and
        is not counted yet: GPUs × running time of its pods. From the pods' watch when it shows
        every pod of the attempt ended, else from a list of them (once per attempt): a label
        list scans the namespace's pods, which at 1,000 runs made charging quadratic."""
        assert self.kube is not None
        for job in sorted(jobs, key=lambda j: j.attempt):
            st = status.stages.get(job.stage)
            if st is None or job.outcome not in ("succeeded", "failed"):
                continue
            if job.attempt < st.charged_attempts:
                continue
            seen = self.pod_index.get((namespace, job.name), []) if self.pod_index else []
            used = [p.usage for p in seen if p.usage is not None]
            if not seen or len(used) < len(seen) or any(u.end is None for u in used):
                try:
                    pods = await self.kube.list(
                        "v1",
                        "pods",
                        namespace,
                        label_selector=f"{manifests.JOB_NAME_LABEL}={job.name}",
                    )
                except ApiError as exc:  # counted on a later reconcile
                    log.info("%s: listing pods of %s for GPU-hours: %s", namespace, job.name, exc)
                    continue
                used = [chargeback.usage(p) for p in pods]
            st.gpu_hours = round((st.gpu_hours or 0.0) + chargeback.usage_hours(used, now), 6)
            st.charged_attempts = job.attempt + 1
        charged = [st.gpu_hours for st in status.stages.values() if st.gpu_hours is not None]
        if charged:
            status.gpu_hours = round(sum(charged), 6)
        return status

    # ------------------------------------------------------------------ what a user watches

    def _watch(self, namespace: str, name: str) -> None:
        """Poll the run's stages' MLflow runs every metrics_interval_s while one wants it."""
        key = (namespace, name)
        task = self.watchers.get(key)
        if task is not None and not task.done():
            return

        async def loop() -> None:
            try:
                while True:
                    await asyncio.sleep(self.config.metrics_interval_s)
                    try:
                        if not await self._watch_once(namespace, name):
                            return
                    except Exception as exc:  # noqa: BLE001 (never in the run's way)
                        log.info("%s/%s: reading stage metrics: %s", namespace, name, exc)
            finally:
                if self.watchers.get(key) is asyncio.current_task():
                    del self.watchers[key]

        self.watchers[key] = asyncio.create_task(loop())

    async def _watch_once(self, namespace: str, name: str) -> bool:
        """Read the metrics of each stage that wants it and patch the watch fields of the
        status (only those). False when no stage wants a poll any more."""
        assert self.kube is not None
        async with self.locks[(namespace, name)]:
            # From the watch, as a reconcile reads it (the operator has no get on runs).
            obj = await self._read_run((namespace, name))
            if obj is None:
                return False
            status = _status(obj)
            run, _ = accepted_run({k: v for k, v in obj.items() if k != "status"})
            wanted = [s for s, st in status.stages.items() if watch.wants_watch(status, s, st)]
            if run is None or not wanted:
                return False
            uri, error = await self._server(
                namespace, run.spec.mlflow.tracking_uri, run.spec.mlflow.credentials_secret
            )
            if uri is None:
                if error:
                    log.info("%s/%s: %s", namespace, name, error)
                return False
            new = status
            for stage in sorted(wanted, key=STAGES.index):
                st = status.stages[stage]
                got, error = await self._mlflow(
                    uri, mlflow_runs.stage_metrics, st.mlflow_run_id, stage
                )
                if got is None:
                    log.info("%s/%s: %s", namespace, name, error)
                    continue
                latest, history = got
                seen = watch.summarize(run, stage, latest, watch.json_history(history))
                new = watch.apply_watch(new, stage, seen)
                if st.phase != "Running":
                    # one last read of a finished stage; a stage that logged none keeps none
                    new.stages[stage].metric = new.stages[stage].metric or ""
            if new != status:
                # On the resourceVersion read: the watch may not show yet a reconcile's newer
                # status (a stage just finished, the next begun), and columns computed from the
                # older one would then overwrite it. The API server refuses such a patch (409)
                # and the next poll reads the newer status.
                version = (obj.get("metadata") or {}).get("resourceVersion")
                body: dict[str, Any] = {"status": watch.patch(new)}
                if version:
                    body["metadata"] = {"resourceVersion": version}
                try:
                    await self.kube.patch(
                        API_VERSION, PLURAL, namespace, name, body, subresource="status"
                    )
                except ApiError as exc:
                    if exc.status != 409:
                        raise
                    return True
            return any(watch.wants_watch(new, s, st) for s, st in new.stages.items())

    def _admit(
        self, namespace: str, name: str, obj: Mapping[str, Any], status: VisionR1RunStatus
    ) -> tuple[VisionR1Run | None, FinishRun | None]:
        """The run, or None and the refusal of its spec.

        A spec is validated in full (the model, the cluster's policy, the trainer image's
        version) when its generation is new; a generation accepted before (the status says it
        observed it) is only parsed, without the rules applied at admission. So an operator
        upgraded to stricter rules keeps running the runs an earlier one accepted, and an edit
        of the spec is judged by the rules of its day."""
        spec_only = {k: v for k, v in obj.items() if k != "status"}
        generation = (obj.get("metadata") or {}).get("generation")
        if generation is not None and status.observed_generation == generation:
            run, dropped = accepted_run(spec_only)
            if run is not None:
                if dropped:
                    log.warning("%s/%s: accepted spec read without %s", namespace, name, dropped)
                run.metadata.namespace = namespace
                return run, None
            return None, invalid_spec("; ".join(map(str, dropped)))
        problems = [str(p) for p in validate_object(spec_only)]
        if problems:
            return None, invalid_spec("; ".join(problems))
        run = VisionR1Run.model_validate(spec_only)
        run.metadata.namespace = namespace
        problems = cluster_problems(run, self.config.policy)
        if problems:
            return None, invalid_spec("; ".join(problems))
        not_allowed = policy_problems(run, self.config.policy, self.config.mlflow_uri)
        if not_allowed:
            return None, FinishRun("Failed", NOT_ALLOWED, "; ".join(not_allowed))
        too_old = compat.trainer_problems(run)
        if too_old:
            return None, FinishRun("Failed", compat.REASON, "; ".join(too_old))
        return run, None

    def _observe(self, namespace: str, name: str, obj: Mapping[str, Any]) -> list[ObservedJob]:
        """The run's Jobs from kopf's in-memory index (filled from the watch before any handler
        runs, so a restarted operator sees every existing Job), plus the Jobs this process
        created whose watch event has not arrived yet, each with what its pods say. No list
        request per reconcile: at 200 runs that was the quadratic part."""
        uid = obj["metadata"].get("uid")
        found: dict[str, ObservedJob] = {}
        index = self.job_index
        for seen, owners in index.get((namespace, name), []) if index is not None else []:
            if uid and owners and uid not in owners:
                continue  # left over from a deleted run of the same name
            found[seen.name] = seen
        pending = self.created.get((namespace, name), {})
        for job_name in [j for j in pending if j in found]:
            del pending[job_name]
        out = []
        for job in [*found.values(), *pending.values()]:
            pods = self.pod_index.get((namespace, job.name), []) if self.pod_index else []
            out.append(manifests.with_pods(job, list(pods)))
        return out

    async def _failed_pods(
        self, namespace: str, status: VisionR1RunStatus, jobs: list[ObservedJob]
    ) -> list[ObservedJob]:
        """Each failed Job whose failure the status has not recorded yet, and whose pods the
        watch has not reported as failed, with its pods listed once: the Job's and the pods'
        watch events come in either order, and only a pod says why its container failed (its
        termination message, OOMKilled and its memory limit, the exit code)."""
        assert self.kube is not None
        out = []
        for job in jobs:
            st = status.stages.get(job.stage)
            fresh = (
                job.outcome == "failed"
                and st is not None
                and st.attempts == job.attempt + 1
                and st.next_retry_time is None
                and st.phase not in ("Failed", "Succeeded")
            )
            known = self.pod_index.get((namespace, job.name), []) if self.pod_index else []
            if fresh and not any(p.problem is not None for p in known):
                try:
                    pods = await self.kube.list(
                        "v1",
                        "pods",
                        namespace,
                        label_selector=f"{manifests.JOB_NAME_LABEL}={job.name}",
                    )
                except ApiError as exc:  # the Job's own message is still there
                    log.info("%s/%s: listing pods of %s: %s", namespace, job.stage, job.name, exc)
                    pods = []
                facts = [f for f in map(manifests.observe_pod, pods) if f and f.job == job.name]
                job = manifests.with_pods(job, facts)
            out.append(job)
        return out

    async def _pod_security(self, namespace: str) -> str | None:
        """The Pod Security level the namespace enforces (its label), None when it enforces
        none or cannot be read (RBAC without namespaces get: the run's own setting decides).
        Read at most once per ``pod_security_ttl_s`` per namespace: a burst of stage starts
        costs one GET, and a relabelled namespace counts within seconds."""
        cached = self.pod_security_levels.get(namespace)
        if cached is not None and cached[0] > time.monotonic():
            return cached[1]
        level = await self._read_pod_security(namespace)
        self.pod_security_levels[namespace] = (
            time.monotonic() + self.config.pod_security_ttl_s,
            level,
        )
        return level

    async def _read_pod_security(self, namespace: str) -> str | None:
        assert self.kube is not None
        try:
            ns = await self.kube.namespace(namespace)
        except ApiError as exc:
            if exc.status == 0 or exc.status >= 500:
                raise  # the API server itself: retry the whole reconcile
            log.warning(
                "cannot read namespace %s's Pod Security labels (%s); spec.storage.workspaceInit "
                "Auto uses the root init container",
                namespace,
                exc,
            )
            return None
        labels = (ns.get("metadata") or {}).get("labels") or {}
        return labels.get(manifests.POD_SECURITY_ENFORCE)

    async def _finish(
        self,
        obj: Mapping[str, Any],
        old: VisionR1RunStatus,
        new: VisionR1RunStatus,
        actions: list[Action],
        now: datetime,
        executed: bool = False,
    ) -> None:
        assert self.kube is not None
        meta = obj["metadata"]
        if not executed:
            new = apply(new, actions, now)
        new.observed_generation = meta.get("generation", new.observed_generation)
        key = (meta["namespace"], meta["name"])
        if new.phase in ("Succeeded", "Failed"):
            self.active.discard(key)
        else:
            self.active.add(key)
        wait = self.last_write.get(key, -1e9) + self.progress_interval_s() - time.monotonic()
        if new != old and wait > 0 and _progress_only(old, new, actions):
            # Later, with whatever the pods say then: a run's pods changing state (pending,
            # running, done) within seconds cost a write each, most of the API server's load
            # at 1,000 runs. A timer that fires sooner (a retry) is kept.
            self.schedule(*key, wait, keep_sooner=True)
        elif new != old:
            await self.kube.patch(
                API_VERSION,
                PLURAL,
                meta["namespace"],
                meta["name"],
                _status_patch(new),
                subresource="status",
            )
            self.last_write[key] = time.monotonic()
            # the index's status is older until the watch shows this one
            self.written[key] = (new, time.monotonic())
        for a in actions:
            described = describe(a)
            if described is not None:
                kind, reason, message = described
                kopf.event(dict(obj), type=kind, reason=reason, message=message[:1024])
            if isinstance(a, Requeue):
                self.schedule(meta["namespace"], meta["name"], a.after_s)

    async def _server(
        self, namespace: str, tracking_uri: str | None, credentials_secret: str | None
    ) -> tuple[mlflow_runs.Server | None, str | None]:
        """Where the operator tracks a run and with which credentials: the run's own Secret
        (spec.mlflow.credentialsSecret) when it names one; else the operator's credentials, but
        only for the operator's own server; else none. (None, why) when the Secret cannot be read.
        """
        uri = tracking_uri or self.config.mlflow_uri
        if not uri:
            return None, None
        if not credentials_secret:
            own = self.config.mlflow_credentials if uri == self.config.mlflow_uri else {}
            return mlflow_runs.Server(uri, **own), None
        assert self.kube is not None
        key = (namespace, credentials_secret)
        cached = self.credentials.get(key)
        if cached is not None and cached[0] > time.monotonic():
            return mlflow_runs.Server(uri, **cached[1]), None
        try:
            secret = await self.kube.get("v1", "secrets", namespace, credentials_secret)
        except ApiError as exc:
            if exc.status not in (403, 404):
                raise
            return None, (
                f"spec.mlflow.credentialsSecret: cannot read Secret {namespace}/"
                f"{credentials_secret} ({exc.status} {exc.reason or ''}); create it with the keys "
                "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN); "
                "the run goes on untracked meanwhile"
            ).replace(" )", ")")
        creds = mlflow_runs.credentials_from_secret(secret.get("data") or {})
        self.credentials[key] = (time.monotonic() + self.config.credentials_ttl_s, creds)
        return mlflow_runs.Server(uri, **creds), None

    # ------------------------------------------------------------------ MLflow, never blocking

    async def _mlflow(
        self, uri: mlflow_runs.Server, fn: Callable[..., T], *args: Any, **kwargs: Any
    ) -> tuple[T | None, str | None]:
        """(result, None), or (None, why) when MLflow failed or failed moments ago."""
        if self.mlflow_down_until.get(uri.uri, 0.0) > time.monotonic():
            return None, f"MLflow at {uri} did not answer recently; retrying later"
        try:
            result = await asyncio.wait_for(
                asyncio.to_thread(fn, uri, *args, **kwargs), self.config.mlflow_timeout_s
            )
        except Exception as exc:  # noqa: BLE001 (any failure of the tracking server)
            self.mlflow_down_until[uri.uri] = time.monotonic() + self.config.mlflow_retry_s
            text = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
            return None, f"MLflow at {uri} unreachable ({text}); runs go on, tracking resumes"
        self.mlflow_down_until.pop(uri.uri, None)
        return result, None

    def _end_later(self, uri: mlflow_runs.Server, run_id: str, outcome: str) -> None:
        """End an MLflow run in the background, retrying until MLflow answers (for ~1 hour)."""

        async def retry() -> None:
            delay = self.config.mlflow_retry_s
            for _ in range(120):
                await asyncio.sleep(delay)
                try:
                    await asyncio.wait_for(
                        asyncio.to_thread(mlflow_runs.end, uri, run_id, outcome),
                        self.config.mlflow_timeout_s,
                    )
                    return
                except Exception as exc:  # noqa: BLE001
                    log.info("ending MLflow run %s failed, retrying: %s", run_id, exc)
                delay = min(delay * 2, 300.0)

        task = asyncio.create_task(retry())
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    async def _end(self, uri: mlflow_runs.Server, run_id: str, outcome: str) -> str | None:
        _, error = await self._mlflow(uri, mlflow_runs.end, run_id, outcome)
        if error is not None:
            self._end_later(uri, run_id, outcome)
        return error

    # ------------------------------------------------------------------ creating children

    async def _create_owned(self, child: Mapping[str, Any], uid: str) -> None:
        """Create ``child``; an existing one is adopted only when this run owns it."""
        assert self.kube is not None
        try:
            await self.kube.create(child)
            return
        except ApiError as exc:
            if exc.status != 409:
                raise
        meta = child["metadata"]
        kind, ns, name = child["kind"], meta["namespace"], meta["name"]
        plural = {"Job": "jobs", "ConfigMap": "configmaps", "Service": "services"}[kind]
        version = "batch/v1" if kind == "Job" else "v1"
        try:
            existing = await self.kube.get(version, plural, ns, name)
        except ApiError as exc:
            if exc.status == 404:  # gone between the two calls: try again on the next reconcile
                raise ObjectInTheWay(f"{kind} {ns}/{name} was being deleted") from exc
            raise
        emeta = existing.get("metadata") or {}
        owners = emeta.get("ownerReferences") or []
        if uid and any(o.get("uid") == uid for o in owners):
            return  # ours (created before a crash, or by a reconcile racing this one)
        whose = (
            ", ".join(f"{o.get('kind')} {o.get('name')} (uid {o.get('uid')})" for o in owners)
            or "nothing"
        )
        going = " and is being deleted" if emeta.get("deletionTimestamp") else ""
        raise ObjectInTheWay(
            f"{kind} {ns}/{name} already exists, owned by {whose}, not by this run (uid {uid})"
            f"{going}: waiting for it to go (delete it if it is left over)"
        )

    async def _create_stage(
        self, run: VisionR1Run, a: CreateStage, uid: str, children: list[dict[str, Any]]
    ) -> StageBlocked | None:
        """Create the stage's objects; what stopped it as a StageBlocked action, if anything."""
        key = (run.metadata.namespace or "default", run.metadata.name)
        try:
            for child in children:
                await self._create_owned(child, uid)
                if child["kind"] == "Job":
                    seen = manifests.observe_job(child)
                    if seen is not None:
                        self.created[key][seen.name] = seen
        except ObjectInTheWay as exc:
            return StageBlocked(a.stage, "ObjectInTheWay", str(exc))
        except ApiError as exc:
            if exc.status in (0, 404) or exc.status >= 500:
                raise  # the API server itself: kopf's / our retry of the whole reconcile
            # 403 (RBAC, quota "exceeded quota"), 422 (invalid), 400: say so and wait
            return StageBlocked(a.stage, "CreateRefused", str(exc))
        self.blocked.pop(key, None)
        return None

    # ------------------------------------------------------------------ executing the plan

    async def _execute(
        self,
        run: VisionR1Run,
        obj: Mapping[str, Any],
        status: VisionR1RunStatus,
        actions: list[Action],
        now: datetime,
        jobs: list[ObservedJob] | None = None,
    ) -> tuple[VisionR1RunStatus, list[Action]]:
        """Run the actions' side effects; returns the new status and the actions that the
        execution itself added (StageBlocked, TrackingState, Requeue) to describe. ``jobs``:
        the run's Jobs as observed (a failed run stops the unfinished ones)."""
        assert self.kube is not None
        meta = obj["metadata"]
        namespace, name, uid = meta["namespace"], meta["name"], meta.get("uid") or ""
        uri, tracking_error = await self._server(
            namespace, run.spec.mlflow.tracking_uri, run.spec.mlflow.credentials_secret
        )
        experiment = run.spec.mlflow.experiment
        extra: list[Action] = []

        def note(error: str | None) -> None:
            nonlocal tracking_error
            tracking_error = tracking_error or error

        pod_security: str | None = None
        if run.spec.storage.workspace_init != "FSGroup" and any(
            isinstance(a, CreateStage) for a in actions
        ):
            pod_security = await self._pod_security(namespace)

        if uri and not status.mlflow_run_id and status.phase not in ("Succeeded", "Failed"):
            # Opened at the start, or on a later reconcile if MLflow was down then.
            wants = any(isinstance(a, StartRun | CreateStage) for a in actions)
            if wants or status.start_time is not None:
                run_id, error = await self._mlflow(
                    uri,
                    mlflow_runs.open_parent,
                    experiment,
                    namespace=namespace,
                    name=name,
                    uid=uid,
                    extra_tags=mlflow_runs.run_tags(run),
                )
                status.mlflow_run_id = run_id
                note(error)
        for a in actions:
            if isinstance(a, CreateStage):
                stage_run = (status.stages.get(a.stage) or None) and status.stages[
                    a.stage
                ].mlflow_run_id
                if uri and status.mlflow_run_id and not stage_run:
                    stage_run, error = await self._mlflow(
                        uri,
                        mlflow_runs.open_stage,
                        experiment,
                        parent_run_id=status.mlflow_run_id,
                        uid=uid,
                        stage=a.stage,
                        namespace=namespace,
                        name=name,
                    )
                    note(error)
                refused = manifests.pod_security_problem(run, pod_security)
                if refused is not None:  # its pods would never be created: wait, say why
                    blocked: StageBlocked | None = StageBlocked(a.stage, "PodSecurity", refused)
                else:
                    children = manifests.stage_objects(
                        run,
                        a.stage,
                        a.attempt,
                        mlflow_uri=uri.uri if uri else None,
                        parent_run_id=status.mlflow_run_id,
                        stage_run_id=stage_run,
                        policy=self.config.policy,
                        pod_security=pod_security,
                    )
                    blocked = await self._create_stage(run, a, uid, children)
                if blocked is not None:
                    # The stage is not created: the next reconcile plans it again.
                    key = (namespace, name)
                    self.blocked[key] += 1
                    delay = min(self.config.error_delay_s * 2 ** (self.blocked[key] - 1), 300.0)
                    status = apply(status, [blocked], now)
                    extra += [blocked, Requeue(delay)]
                    break
                status = apply(status, [a], now)
                status.stages[a.stage].mlflow_run_id = stage_run
                continue
            elif isinstance(a, SuspendStage | ResumeStage) and a.job_name:
                await self.kube.patch(
                    "batch/v1",
                    "jobs",
                    namespace,
                    a.job_name,
                    manifests.suspend_patch(isinstance(a, SuspendStage)),
                )
            elif isinstance(a, SuspendWorkload | ResumeWorkload):
                # A queued Job: Kueue owns its spec.suspend; pause it through its Workload.
                uid = next((j.uid for j in jobs or [] if j.name == a.job_name), "")
                try:
                    await kueue.set_active(
                        self.kube, namespace, a.job_name, isinstance(a, ResumeWorkload), uid
                    )
                except kueue.WorkloadNotFound as exc:
                    log.info("%s/%s: %s; trying again", namespace, name, exc)
                    self.schedule(namespace, name, self.config.error_delay_s)
                    continue  # not applied: the next reconcile plans it again
                except kueue.WorkloadForbidden as exc:
                    # RBAC, not a moment's trouble: say which permission, try again slowly
                    key = (namespace, name)
                    self.blocked[key] += 1
                    delay = min(self.config.error_delay_s * 4 ** self.blocked[key], 600.0)
                    blocked = StageBlocked(a.stage, "KueueForbidden", str(exc))
                    status = apply(status, [blocked], now)
                    extra += [blocked, Requeue(delay)]
                    continue
            elif isinstance(a, StageFailed) and uri:
                stage_run = status.stages.get(a.stage) and status.stages[a.stage].mlflow_run_id
                if stage_run:
                    note(await self._end(uri, stage_run, "FAILED"))
            elif isinstance(a, FinishRun) and a.phase == "Failed":
                await self._stop_jobs(namespace, name, jobs or [])
                self._schedule_check(namespace, name, None)
            if isinstance(a, FinishRun) and uri and status.mlflow_run_id:
                outcome = "FINISHED" if a.phase == "Succeeded" else "FAILED"
                if a.phase == "Failed":  # a stage run still open (a stopped stage) fails too
                    for st in status.stages.values():
                        if st.mlflow_run_id and st.phase in ("Pending", "Running", "Suspended"):
                            note(await self._end(uri, st.mlflow_run_id, "FAILED"))
                try:  # the headline on the parent run; the run's outcome never waits on it
                    await asyncio.to_thread(
                        mlflow_runs.summarize_parent, uri, status.mlflow_run_id, run
                    )
                except Exception:  # noqa: BLE001
                    log.warning("could not summarize MLflow run %s", status.mlflow_run_id)
                note(await self._end(uri, status.mlflow_run_id, outcome))
            status = apply(status, [a], now)
        if uri or tracking_error is not None:
            was_ok = _tracking_ok(status)
            if tracking_error is not None:
                if was_ok:
                    state = TrackingState(False, tracking_error)
                    status = apply(status, [state], now)
                    extra.append(state)
                if not any(isinstance(a, Requeue) for a in [*actions, *extra]):
                    extra.append(Requeue(self.config.mlflow_retry_s))
            elif not was_ok and status.mlflow_run_id:
                state = TrackingState(True, f"MLflow at {uri} answers again")
                status = apply(status, [state], now)
                extra.append(state)
        return status, extra

    # ------------------------------------------------------------------ deletion

    async def deleted(self, obj: Mapping[str, Any]) -> None:
        """The run is gone: forget it; its children go by owner reference; end its MLflow runs
        (in the background when MLflow does not answer)."""
        meta = obj["metadata"]
        self.forget(meta["namespace"], meta["name"])
        status = _status(obj)
        spec = (obj.get("spec") or {}).get("mlflow") or {}
        if status.phase in ("Succeeded", "Failed") or not status.mlflow_run_id:
            return
        try:
            uri, _ = await self._server(
                meta["namespace"], spec.get("trackingUri"), spec.get("credentialsSecret")
            )
        except ApiError:
            uri = None
        if uri is None:
            return
        for stage in status.stages.values():
            if stage.mlflow_run_id and stage.phase not in ("Succeeded", "Skipped"):
                await self._end(uri, stage.mlflow_run_id, "KILLED")
        await self._end(uri, status.mlflow_run_id, "KILLED")

    async def close(self) -> None:
        for task in [
            *self.timers.values(),
            *self.watchers.values(),
            *self.soon.values(),
            *self.background,
        ]:
            task.cancel()
        if self.kube is not None:
            await self.kube.close()
            self.kube = None


def _in_cluster() -> bool:
    return os.path.exists(SERVICE_ACCOUNT_TOKEN) and bool(os.environ.get("KUBERNETES_SERVICE_HOST"))


def _watch_children(
    registry: kopf.OperatorRegistry,
    rec: Reconciler,
    resource: tuple[str, ...],
    handler_id: str,
    observe: Callable[[kopf.Body], Any],
    seen: dict[tuple[str, str], dict[str, Any]],
    *,
    reconcile_on_delete: bool,
    refresh_s: float | None = None,
) -> None:
    """Register an event handler for a run's child objects (Jobs, pods) of ``resource``.

    Only objects labelled with their run reach it (the same label the startup handler gives
    the API server as a watch selector). What ``observe`` makes of an object is kept in
    ``seen`` (run → object name → facts) and the run is reconciled only when that changes,
    or when the object is deleted and ``reconcile_on_delete``. With ``refresh_s``, facts whose
    ``problem`` keeps its reason and changes only its message (a Pending pod's new scheduler
    message) reconcile at most once per ``refresh_s`` seconds.
    """
    refreshed: dict[tuple[str, str], float] = {}  # (namespace, name) → last reconcile for it

    @kopf.on.event(
        *resource, labels={manifests.LABEL_RUN: kopf.PRESENT}, id=handler_id, registry=registry
    )
    async def child_event(
        event: Mapping[str, Any],
        body: kopf.Body,
        namespace: str,
        job_index: Any,
        pod_index: Any,
        run_index: Any,
        **_: Any,
    ) -> None:
        rec.job_index, rec.pod_index, rec.run_index = job_index, pod_index, run_index
        meta = body.get("metadata") or {}
        run_name = (meta.get("labels") or {}).get(manifests.LABEL_RUN)
        if not run_name:
            return
        key = (namespace, run_name)
        name = meta.get("name", "")
        if event.get("type") == "DELETED":
            refreshed.pop((namespace, name), None)
            left = seen.get(key) or {}
            left.pop(name, None)
            if not left:
                seen.pop(key, None)  # nothing kept for a run that is gone
            if not reconcile_on_delete:
                return
        else:
            facts = observe(body)
            old = seen[key].get(name)
            if facts is None or old == facts:
                return  # nothing the plan would see has changed
            now = time.monotonic()
            if (
                refresh_s is not None
                and _same_reason(old, facts)
                and now - refreshed.get((namespace, name), -math.inf) < refresh_s
            ):
                return  # only the message changed, and it was said moments ago
            refreshed[(namespace, name)] = now
            seen[key][name] = facts
            if not _urgent(old, facts):
                rec.reconcile_soon(namespace, run_name)
                return
        await rec.reconcile_quietly(namespace, run_name)


def _urgent(old: Any, new: Any) -> bool:
    """Whether a Job's or pod's change needs its run reconciled at once: a Job that ended or
    was suspended or resumed (the next stage waits on it), a pod in trouble or failed. Any
    other change (a Job first seen, its pods counted, a pod running or done) only updates the
    status, within ``COALESCE_S``."""
    if isinstance(new, ObservedJob):
        if old is None:  # first seen already ended (its events came as one)
            return new.outcome in ("succeeded", "failed")
        return old.outcome != new.outcome
    if isinstance(new, manifests.PodFacts):
        if new.phase == "Failed" or new.exit_code is not None:
            return old is None or (old.phase, old.exit_code) != (new.phase, new.exit_code)
        return new.problem is not None and (old is None or old.problem != new.problem)
    return True


def _same_reason(old: Any, new: Any) -> bool:
    """Two observations of a pod that differ at most in their problem's message."""
    problem_old, problem_new = getattr(old, "problem", None), getattr(new, "problem", None)
    if old is None or problem_old is None or problem_new is None:
        return False
    return problem_old[0] == problem_new[0] and dataclasses.replace(
        old, problem=problem_new
    ) == dataclasses.replace(new, problem=problem_new)


def make_registry(config: OperatorConfig | None = None) -> kopf.OperatorRegistry:
    """A kopf registry with every handler of the operator, bound to ``config``."""
    config = config or OperatorConfig()
    registry = kopf.OperatorRegistry()
    rec = Reconciler(config)

    @kopf.on.startup(registry=registry)
    async def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
        watch_stream.install()  # before the first watch: orjson, without managedFields
        acyclic_bodies.install()  # each event's object freed once kopf is done with it
        settings.persistence.finalizer = FINALIZER
        settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
        settings.persistence.diffbase_storage = NoDiffBase()
        if config.peering:
            # Standby replicas (peering.py): kopf pauses all but the oldest live pod.
            settings.peering.name = config.peering
            settings.peering.mandatory = True
            settings.peering.standalone = False
            settings.peering.lifetime = config.peering_lifetime_s
            settings.peering.stealth = True  # keep-alives are not worth a log line each
        else:
            # One replica: no peering objects to need RBAC for.
            settings.peering.standalone = True
        # Watch the namespaces given, as given: no CRD or namespace listing.
        settings.scanning.disabled = True
        # Our own Events say what happened; kopf's per-handler chatter only when it goes wrong.
        settings.posting.level = logging.WARNING
        # Server-side filtering: with --all-namespaces the API server streams only our Jobs and
        # pods, not every Job and pod of the cluster (the handlers' `labels=` filter client-side).
        settings.watching.label_selectors["batch", "jobs"] = manifests.LABEL_RUN
        settings.watching.label_selectors["pods"] = manifests.LABEL_RUN
        # `kubectl describe` shows this in the Events' From column (kopf's default: "kopf").
        settings.posting.reporting_component = "visionr1-operator"

    @kopf.on.login(registry=registry)
    async def login(**kwargs: Any) -> Any:
        info = config.connection
        if info is None:
            # In a pod: the service account; elsewhere: the kubeconfig (as kopf's defaults do).
            info = kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)
        if info is None:
            raise kopf.LoginError("no service account token and no kubeconfig found")
        if rec.kube is not None:
            await rec.kube.close()
        if config.connection is None and _in_cluster():
            from lightkube import KubeConfig

            # Reads the token file again when it is rotated (projected tokens expire).
            rec.kube = Kube(KubeConfig.from_service_account(), config.timeouts)
        else:
            rec.kube = Kube.from_connection(info, config.timeouts)
        if config.peering:
            await peering.ensure(rec.kube, config.peering, config.namespaces, config.clusterwide)
        return info

    @kopf.on.cleanup(registry=registry)
    async def cleanup(**_: Any) -> None:
        await rec.close()

    @kopf.index(
        "batch",
        "v1",
        "jobs",
        labels={manifests.LABEL_RUN: kopf.PRESENT},
        id="job_index",
        registry=registry,
    )
    async def job_index(
        namespace: str, labels: Mapping[str, str], body: kopf.Body, **_: Any
    ) -> Any:
        seen = manifests.observe_job(body)
        if seen is None:
            return None
        owners = tuple(o.get("uid") for o in body.get("metadata", {}).get("ownerReferences") or [])
        return {(namespace, labels[manifests.LABEL_RUN]): (seen, owners)}

    @kopf.index(
        "v1", "pods", labels={manifests.LABEL_RUN: kopf.PRESENT}, id="pod_index", registry=registry
    )
    async def pod_index(namespace: str, body: kopf.Body, **_: Any) -> Any:
        facts = manifests.observe_pod(body)
        return None if facts is None else {(namespace, facts.job): facts}

    @kopf.index(GROUP, VERSION, PLURAL, id="run_index", registry=registry)
    async def run_index(namespace: str, name: str, body: kopf.Body, **_: Any) -> Any:
        return {(namespace, name): _indexed_run(body)}

    # A run's own events: it is new (or listed when the operator starts), or its spec changed
    # (a generation the status has not observed). Not kopf's on.create/on.update/on.resume:
    # those make kopf copy and compare the whole object on every event of the run (each status
    # write is one), 11% of the operator's CPU at 1,000 runs, and store a copy of the spec in
    # an annotation; a status write of our own triggers nothing here.
    @kopf.on.event(GROUP, VERSION, PLURAL, registry=registry)
    async def run_event(
        event: Mapping[str, Any],
        body: kopf.Body,
        namespace: str,
        name: str,
        job_index: Any,
        pod_index: Any,
        run_index: Any,
        **_: Any,
    ) -> None:
        rec.job_index, rec.pod_index, rec.run_index = job_index, pod_index, run_index
        kind = event.get("type")
        if kind == "DELETED":
            await rec.deleted(body)
            return
        generation = (body.get("metadata") or {}).get("generation")
        observed = (body.get("status") or {}).get("observedGeneration")
        key = (namespace, name)
        # not yet reconciled by this process: a standby that takes over resumes every run
        # from the first event it processes, whatever its type
        # (no generation: an API server that keeps none, e.g. an emulator: every event)
        if (
            kind in (None, "ADDED")
            or generation is None
            or observed != generation
            or key not in rec.resumed
        ):
            rec.resumed.add(key)
            await rec.reconcile_quietly(namespace, name)

    # Jobs: a Job gone changes the plan (its stage may need a retry), so it reconciles too.
    # Pods: a pod going away changes nothing the Job does not report itself.
    _watch_children(
        registry,
        rec,
        ("batch", "v1", "jobs"),
        "job_event",
        manifests.observe_job,
        rec.seen,
        reconcile_on_delete=True,
    )
    _watch_children(
        registry,
        rec,
        ("v1", "pods"),
        "pod_event",
        manifests.observe_pod,
        rec.seen_pods,
        reconcile_on_delete=False,
        refresh_s=PROBLEM_REFRESH_S,
    )

    return registry
