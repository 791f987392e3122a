"""kopf handlers: the thin edge that runs the plan against a cluster.

Every trigger (a VisionR1Run created, resumed at operator start, or its spec changed; a child Job
changed; a retry's backoff elapsed) does the same thing: read the run and its Jobs, ``plan``,
execute the actions (create objects, suspend Jobs, open and end MLflow runs, post Events), and
patch the status. Reconciles of one run are serialised by a lock; different runs go in parallel.
All calls are async (our aiohttp client; MlflowClient in a thread), and kopf's worker_limit is
left unset: a low limit turns millisecond transitions into seconds (DESIGN.md).

``make_registry(config)`` builds a fresh kopf registry, so tests and ``visionr1 operator`` run the
same handlers with their own settings.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import kopf
from pydantic import ValidationError

from visionr1_operator import manifests, mlflow_runs
from visionr1_operator.api import (
    API_VERSION,
    GROUP,
    PLURAL,
    VERSION,
    VisionR1Run,
    VisionR1RunStatus,
)
from visionr1_operator.kube import ApiError, Kube
from visionr1_operator.plan import (
    Action,
    CreateStage,
    FinishRun,
    ObservedJob,
    Requeue,
    ResumeStage,
    RetryPolicy,
    StageFailed,
    StartRun,
    SuspendStage,
    apply,
    describe,
    invalid_spec,
    plan,
)
from visionr1_operator.validate import validate_object

FINALIZER = f"{GROUP}/finalizer"
log = logging.getLogger("visionr1.operator")


@dataclass
class OperatorConfig:
    """What ``visionr1 operator`` is started with."""

    mlflow_uri: str | None = None  # for runs without spec.mlflow.trackingUri; None = no tracking
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    # Log in with this kopf.ConnectionInfo instead of the service account / kubeconfig (tests).
    connection: Any = None
    error_delay_s: float = 5.0


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


class Reconciler:
    """In-memory state of one operator process: API client, per-run locks, retry timers."""

    def __init__(self, config: OperatorConfig) -> None:
        self.config = config
        self.kube: Kube | None = None
        self.locks: dict[tuple[str, str], asyncio.Lock] = defaultdict(asyncio.Lock)
        self.timers: dict[tuple[str, str], asyncio.Task[None]] = {}
        self.seen: dict[tuple[str, str], ObservedJob] = {}
        self.job_index: Any = None  # kopf.Index: (namespace, run) → (ObservedJob, owner uids)
        self.created: dict[tuple[str, str], dict[str, ObservedJob]] = defaultdict(dict)

    # ------------------------------------------------------------------ triggers

    def schedule(self, namespace: str, name: str, after_s: float) -> None:
        key = (namespace, name)
        old = self.timers.get(key)
        if old is not None and not old.done():
            old.cancel()

        async def later() -> None:
            await asyncio.sleep(after_s)
            self.timers.pop(key, None)
            await self.reconcile_quietly(namespace, name)

        self.timers[key] = asyncio.create_task(later())

    async def reconcile_quietly(self, namespace: str, name: str) -> None:
        """For triggers kopf does not retry (Job events, timers): log and try again later."""
        try:
            await self.reconcile(namespace, name)
        except Exception as exc:  # noqa: BLE001 (any failure: retry the whole reconcile)
            log.warning("reconcile %s/%s failed, retrying: %s", namespace, name, exc)
            self.schedule(namespace, name, self.config.error_delay_s)

    # ------------------------------------------------------------------ the reconcile

    async def reconcile(self, namespace: str, name: str) -> None:
        assert self.kube is not None, "not logged in"
        async with self.locks[(namespace, name)]:
            try:
                obj = await self.kube.get(API_VERSION, PLURAL, namespace, name)
            except ApiError as exc:
                if exc.status == 404:
                    return
                raise
            if (obj.get("metadata") or {}).get("deletionTimestamp"):
                return
            status = _status(obj)
            if status.phase in ("Succeeded", "Failed"):
                return  # a finished run is never run again
            now = datetime.now(UTC)
            spec_only = {k: v for k, v in obj.items() if k != "status"}
            problems = validate_object(spec_only)
            if problems:
                message = "; ".join(str(p) for p in problems)
                await self._finish(obj, status, status, [invalid_spec(message)], now)
                return
            run = VisionR1Run.model_validate(spec_only)
            jobs = await self._observe(namespace, name, obj)
            actions = plan(run, status, jobs, now, self.config.retry)
            new = await self._execute(run, obj, status, actions, now)
            await self._finish(obj, status, new, actions, now, executed=True)

    async def _observe(
        self, namespace: str, name: str, obj: Mapping[str, Any]
    ) -> list[ObservedJob]:
        """The run's Jobs from kopf's in-memory index (filled from the watch before any handler
        runs, so a restarted operator sees every existing Job), plus the Jobs this process
        created whose watch event has not arrived yet. No list request per reconcile: at 200
        runs that was the quadratic part."""
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
        return [*found.values(), *pending.values()]

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
        if new != old:
            await self.kube.patch(
                API_VERSION,
                PLURAL,
                meta["namespace"],
                meta["name"],
                _status_patch(new),
                subresource="status",
            )
        for a in actions:
            described = describe(a)
            if described is not None:
                kind, reason, message = described
                kopf.event(dict(obj), type=kind, reason=reason, message=message[:1024])
            if isinstance(a, Requeue):
                self.schedule(meta["namespace"], meta["name"], a.after_s)

    def _tracking_uri(self, run: VisionR1Run) -> str | None:
        return run.spec.mlflow.tracking_uri or self.config.mlflow_uri

    async def _execute(
        self,
        run: VisionR1Run,
        obj: Mapping[str, Any],
        status: VisionR1RunStatus,
        actions: list[Action],
        now: datetime,
    ) -> VisionR1RunStatus:
        assert self.kube is not None
        meta = obj["metadata"]
        namespace, name, uid = meta["namespace"], meta["name"], meta.get("uid") or ""
        run.metadata.namespace = namespace
        uri = self._tracking_uri(run)
        experiment = run.spec.mlflow.experiment
        for a in actions:
            if isinstance(a, StartRun) and uri and not status.mlflow_run_id:
                status.mlflow_run_id = await asyncio.to_thread(
                    mlflow_runs.open_parent,
                    uri,
                    experiment,
                    namespace=namespace,
                    name=name,
                    uid=uid,
                    extra_tags={
                        "visionr1.image": run.spec.images.trainer,
                        "visionr1.baseModel": run.spec.base_model.name,
                    },
                )
            elif isinstance(a, CreateStage):
                stage_run = (status.stages.get(a.stage) or None) and status.stages[
                    a.stage
                ].mlflow_run_id
                if uri and status.mlflow_run_id and not stage_run:
                    stage_run = await asyncio.to_thread(
                        mlflow_runs.open_stage,
                        uri,
                        experiment,
                        parent_run_id=status.mlflow_run_id,
                        uid=uid,
                        stage=a.stage,
                        namespace=namespace,
                        name=name,
                    )
                for child in manifests.stage_objects(
                    run,
                    a.stage,
                    a.attempt,
                    mlflow_uri=uri,
                    parent_run_id=status.mlflow_run_id,
                    stage_run_id=stage_run,
                ):
                    await self.kube.create(child)
                    if child["kind"] == "Job":
                        seen = manifests.observe_job(child)
                        if seen is not None:
                            self.created[(namespace, name)][seen.name] = seen
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
            elif isinstance(a, StageFailed) and uri:
                stage_run = status.stages.get(a.stage) and status.stages[a.stage].mlflow_run_id
                if stage_run:
                    await asyncio.to_thread(mlflow_runs.end, uri, stage_run, "FAILED")
            elif isinstance(a, FinishRun) and uri and status.mlflow_run_id:
                outcome = "FINISHED" if a.phase == "Succeeded" else "FAILED"
                try:  # the headline on the parent run; the run's outcome never waits on it
                    await asyncio.to_thread(
                        mlflow_runs.summarize_parent, uri, status.mlflow_run_id, run
                    )
                except Exception:  # noqa: BLE001
                    log.warning("could not summarize MLflow run %s", status.mlflow_run_id)
                await asyncio.to_thread(mlflow_runs.end, uri, status.mlflow_run_id, outcome)
            status = apply(status, [a], now)
        return status

    # ------------------------------------------------------------------ deletion

    async def deleted(self, obj: Mapping[str, Any]) -> None:
        """The run is being deleted: its children go by owner reference; end its MLflow runs."""
        meta = obj["metadata"]
        key = (meta["namespace"], meta["name"])
        timer = self.timers.pop(key, None)
        if timer is not None:
            timer.cancel()
        status = _status(obj)
        spec = (obj.get("spec") or {}).get("mlflow") or {}
        uri = spec.get("trackingUri") or self.config.mlflow_uri
        if status.phase in ("Succeeded", "Failed") or not uri or not status.mlflow_run_id:
            return
        for stage in status.stages.values():
            if stage.mlflow_run_id and stage.phase not in ("Succeeded", "Skipped"):
                await asyncio.to_thread(mlflow_runs.end, uri, stage.mlflow_run_id, "KILLED")
        await asyncio.to_thread(mlflow_runs.end, uri, status.mlflow_run_id, "KILLED")
        self.locks.pop(key, None)


def make_registry(config: OperatorConfig | None = None) -> kopf.OperatorRegistry:
    """A kopf registry with every handler of the operator, bound to ``config``."""
    config = config or OperatorConfig()
    registry = kopf.OperatorRegistry()
    rec = Reconciler(config)

    @kopf.on.startup(registry=registry)
    async def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
        settings.persistence.finalizer = FINALIZER
        settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
        settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
            prefix=GROUP, key="last-handled-configuration"
        )
        # One replica (kopf has no leader election): no peering objects to need RBAC for.
        settings.peering.standalone = True
        # Watch the namespaces given, as given: no CRD or namespace listing.
        settings.scanning.disabled = True
        # Our own Events say what happened; kopf's per-handler chatter only when it goes wrong.
        settings.posting.level = logging.WARNING

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
        rec.kube = Kube(info)
        return info

    @kopf.on.cleanup(registry=registry)
    async def cleanup(**_: Any) -> None:
        for task in list(rec.timers.values()):
            task.cancel()
        if rec.kube is not None:
            await rec.kube.close()
            rec.kube = None

    @kopf.index(
        "batch",
        "v1",
        "jobs",
        labels={manifests.LABEL_RUN: kopf.PRESENT},
        id="job_index",
        registry=registry,
    )
    def job_index(namespace: str, labels: Mapping[str, str], body: kopf.Body, **_: Any) -> Any:
        seen = manifests.observe_job(body)
        if seen is None:
            return None
        owners = tuple(o.get("uid") for o in body.get("metadata", {}).get("ownerReferences") or [])
        return {(namespace, labels[manifests.LABEL_RUN]): (seen, owners)}

    @kopf.on.resume(GROUP, VERSION, PLURAL, registry=registry)
    @kopf.on.create(GROUP, VERSION, PLURAL, registry=registry)
    @kopf.on.update(GROUP, VERSION, PLURAL, field="spec", registry=registry)
    async def run_changed(name: str, namespace: str, job_index: Any, **_: Any) -> None:
        rec.job_index = job_index
        try:
            await rec.reconcile(namespace, name)
        except ApiError as exc:
            raise kopf.TemporaryError(str(exc), delay=config.error_delay_s) from exc

    @kopf.on.delete(GROUP, VERSION, PLURAL, registry=registry)
    async def run_deleted(body: kopf.Body, **_: Any) -> None:
        await rec.deleted(body)

    @kopf.on.event(
        "batch",
        "v1",
        "jobs",
        labels={manifests.LABEL_RUN: kopf.PRESENT},
        id="job_event",
        registry=registry,
    )
    async def job_event(
        event: Mapping[str, Any], body: kopf.Body, namespace: str, job_index: Any, **_: Any
    ) -> None:
        rec.job_index = job_index
        meta = body.get("metadata") or {}
        key = (namespace, meta.get("name", ""))
        if event.get("type") == "DELETED":
            rec.seen.pop(key, None)
        else:
            seen = manifests.observe_job(body)
            if seen is None or rec.seen.get(key) == seen:
                return  # nothing the plan would see has changed
            rec.seen[key] = seen
        run_name = (meta.get("labels") or {}).get(manifests.LABEL_RUN)
        if run_name:
            await rec.reconcile_quietly(namespace, run_name)

    return registry
