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

Pure helpers (``workload_of``, ``active_patch``, ``held_patch``, ``pending_message``) plus one
async edge (``set_active``) over the operator's Kubernetes client (``get``/``list``/``patch``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

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


class Client(Protocol):
    async def list(
        self, api_version: str, plural: str, namespace: str, label_selector: str | None = None
    ) -> list[dict[str, Any]]: ...

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


async def set_active(client: Client, namespace: str, job_name: str, active: bool) -> str:
    """Deactivate (``active=False``) or reactivate the Workload of a queued Job, then mark the
    Job held or not. Returns the Workload's name; raises :class:`WorkloadNotFound` before Kueue
    has created it. Idempotent: repeating it after a crash half-way is safe."""
    workloads = await client.list(API_VERSION, WORKLOADS, namespace)
    wl = workload_of(workloads, job_name)
    if wl is None:
        raise WorkloadNotFound(
            f"no Kueue Workload owned by Job {namespace}/{job_name} yet (is Kueue running, and "
            f"does it manage batch/job?)"
        )
    name = wl["metadata"]["name"]
    if (wl.get("spec") or {}).get("active", True) != active:
        await client.patch(API_VERSION, WORKLOADS, namespace, name, active_patch(active))
    await client.patch("batch/v1", "jobs", namespace, job_name, held_patch(not active))
    return name


__all__ = [
    "API_VERSION",
    "JOB_UID_LABEL",
    "QUEUE_LABEL",
    "WORKLOADS",
    "WorkloadNotFound",
    "active_patch",
    "held_patch",
    "is_admitted",
    "pending_message",
    "set_active",
    "workload_of",
]
