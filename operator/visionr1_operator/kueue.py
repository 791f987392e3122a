"""Kueue's side of a queued run: pause and resume a queued Job through its Workload.

Kueue (sigs.k8s.io/kueue) owns ``spec.suspend`` of a Job that carries the
``kueue.x-k8s.io/queue-name`` label: it creates a Workload for it, un-suspends the Job when it
admits the Workload, and suspends it again when it evicts it (preemption, deactivation). If the
operator wrote that field too, the two would fight (Kueue un-suspends an admitted Job the operator
suspended, in a loop) and an un-suspend from the operator would start a Job Kueue never admitted.
So ``spec.suspend`` of a queued run goes through Kueue's own control instead: the Workload's
``spec.active``. Deactivated, Kueue evicts the Workload (the Job is suspended, its pods deleted,
not counted as failed) and keeps it out of the queue; reactivated, it is queued again.

The Job is marked with the operator's held annotation once its Workload is deactivated, so the
plan (which sees Jobs, not Workloads) knows the pause is done and whose it is. Writing a Job's
metadata does not touch anything Kueue owns.

The Workload of a Job is found by the Job's uid (Kueue labels it ``kueue.x-k8s.io/job-uid``; the
owner reference's uid is checked too), never by listing the namespace: a list per pause was
O(Workloads in the namespace), and a Workload of an earlier Job of the same name is not this
Job's. An operator that may not read or write Workloads (403: the chart's ``kueue.enabled`` off
on a cluster whose Kueue manages the run's Jobs) gets :class:`WorkloadForbidden`, naming the
permission, so the run says so instead of retrying.

Pure helpers (``workload_of``, ``active_patch``, ``held_patch``, ``pending_message``) plus two
async edges (``set_active``, ``waiting_message``) over the operator's Kubernetes client.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from visionr1_operator.kube import ApiError
from visionr1_operator.manifests import ANNOTATION_HELD, KUEUE_QUEUE_LABEL

GROUP = "kueue.x-k8s.io"
# The Workload API Kueue stores (v1beta2 since Kueue 0.15; v1beta1 is still served).
API_VERSION = f"{GROUP}/v1beta2"
WORKLOADS = "workloads"
QUEUE_LABEL = KUEUE_QUEUE_LABEL
# Kueue labels the Workload of a Job with the Job's uid.
JOB_UID_LABEL = f"{GROUP}/job-uid"


class WorkloadNotFound(LookupError):
    """The Job has no Workload yet (Kueue creates it shortly after the Job): try again later."""


class WorkloadForbidden(PermissionError):
    """The API server refused the operator access to Workloads (HTTP 403)."""

    def __init__(self, namespace: str, verb: str, detail: str) -> None:
        super().__init__(
            f"the operator may not {verb} workloads.kueue.x-k8s.io in namespace {namespace} "
            f"(HTTP 403: {detail}); grant it (the chart's kueue.enabled=true adds the rule)"
        )
        self.verb = verb


class Client(Protocol):
    async def list(
        self, api_version: str, plural: str, namespace: str, label_selector: str | None = None
    ) -> list[dict[str, Any]]: ...

    async def get(
        self, api_version: str, plural: str, namespace: str, name: str
    ) -> dict[str, Any]: ...

    async def patch(
        self,
        api_version: str,
        plural: str,
        namespace: str,
        name: str,
        patch: Mapping[str, Any],
        subresource: str | None = None,
    ) -> Any: ...


def workload_of(
    workloads: Sequence[Mapping[str, Any]], job_name: str, job_uid: str | None = None
) -> Mapping[str, Any] | None:
    """The Workload whose owner is the Job ``job_name`` (and ``job_uid`` when given)."""
    for wl in workloads:
        for ref in (wl.get("metadata") or {}).get("ownerReferences") or []:
            if ref.get("kind") != "Job" or ref.get("name") != job_name:
                continue
            if job_uid and ref.get("uid") != job_uid:
                continue  # a Workload of an earlier Job of the same name
            return wl
    return None


def active_patch(active: bool) -> dict[str, Any]:
    """Merge patch of a Workload: Kueue's own switch for keeping it out of the queue."""
    return {"spec": {"active": active}}


def held_patch(held: bool) -> dict[str, Any]:
    """Merge patch of a queued Job: metadata only, never its spec.suspend (Kueue's)."""
    return {"metadata": {"annotations": {ANNOTATION_HELD: "operator" if held else None}}}


def pending_message(workload: Mapping[str, Any]) -> str | None:
    """Why Kueue has not admitted the Workload (its QuotaReserved=False message), if it says."""
    for cond in (workload.get("status") or {}).get("conditions") or []:
        if cond.get("type") == "QuotaReserved" and cond.get("status") == "False":
            return cond.get("message") or cond.get("reason")
    return None


def is_admitted(workload: Mapping[str, Any]) -> bool:
    for cond in (workload.get("status") or {}).get("conditions") or []:
        if cond.get("type") == "Admitted":
            return cond.get("status") == "True"
    return False


async def find(
    client: Client, namespace: str, job_name: str, job_uid: str = ""
) -> Mapping[str, Any] | None:
    """The Workload of the Job ``job_name`` with uid ``job_uid`` (read from the Job when not
    given), by Kueue's job-uid label; None before Kueue has created it."""
    try:
        if not job_uid:
            job = await client.get("batch/v1", "jobs", namespace, job_name)
            job_uid = str((job.get("metadata") or {}).get("uid") or "")
        found = await client.list(
            API_VERSION, WORKLOADS, namespace, label_selector=f"{JOB_UID_LABEL}={job_uid}"
        )
    except ApiError as exc:
        if exc.status == 403:
            raise WorkloadForbidden(namespace, "list", exc.message) from exc
        raise
    return workload_of(found, job_name, job_uid)


async def set_active(
    client: Client, namespace: str, job_name: str, active: bool, job_uid: str = ""
) -> str:
    """Deactivate (``active=False``) or reactivate the Workload of a queued Job, then mark the
    Job held or not. Returns the Workload's name; raises :class:`WorkloadNotFound` before Kueue
    has created it, :class:`WorkloadForbidden` on a 403. Idempotent: repeating it after a crash
    half-way is safe."""
    wl = await find(client, namespace, job_name, job_uid)
    if wl is None:
        raise WorkloadNotFound(
            f"no Kueue Workload owned by Job {namespace}/{job_name} yet (is Kueue running, and "
            f"does it manage batch/job?)"
        )
    name = wl["metadata"]["name"]
    if (wl.get("spec") or {}).get("active", True) != active:
        try:
            await client.patch(API_VERSION, WORKLOADS, namespace, name, active_patch(active))
        except ApiError as exc:
            if exc.status == 403:
                raise WorkloadForbidden(namespace, "patch", exc.message) from exc
            raise
    await client.patch("batch/v1", "jobs", namespace, job_name, held_patch(not active))
    return name


async def waiting_message(client: Client, namespace: str, job_name: str, job_uid: str) -> str:
    """Why Kueue keeps the Job waiting, for the run's status: its Workload's pending message,
    or what stands in the way of reading it."""
    try:
        wl = await find(client, namespace, job_name, job_uid)
    except WorkloadForbidden as exc:
        return str(exc)
    if wl is None:
        return "Kueue has not created its Workload yet"
    return pending_message(wl) or "its Workload is pending"


__all__ = [
    "API_VERSION",
    "JOB_UID_LABEL",
    "QUEUE_LABEL",
    "WORKLOADS",
    "WorkloadForbidden",
    "WorkloadNotFound",
    "active_patch",
    "find",
    "held_patch",
    "is_admitted",
    "pending_message",
    "set_active",
    "waiting_message",
    "workload_of",
]
