"""kueue.py: finding a Job's Workload and pausing it through spec.active (the real Kueue runs in
tests/cluster/test_kueue.py; here a recording client checks which writes are made)."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import pytest

from visionr1_operator import kueue
from visionr1_operator.kube import ApiError
from visionr1_operator.manifests import ANNOTATION_HELD


def workload(name: str, job: str, uid: str, active: bool = True, **status: Any) -> dict[str, Any]:
    return {
        "apiVersion": kueue.API_VERSION,
        "kind": "Workload",
        "metadata": {
            "name": name,
            "namespace": "team",
            "labels": {kueue.JOB_UID_LABEL: uid},
            "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": job, "uid": uid}],
        },
        "spec": {"active": active, "queueName": "gpu"},
        "status": status,
    }


class Recorder:
    """Answers ``list`` from a fixed set of Workloads (by an equality label selector, as the API
    server does), ``get`` of a Job with its uid, and records every request."""

    def __init__(
        self, workloads: list[dict[str, Any]], jobs: dict[str, str] | None = None, deny: str = ""
    ) -> None:
        self.workloads = workloads
        self.jobs = jobs or {}  # Job name → uid
        self.deny = deny  # "list" or "patch": answer 403 to that verb on Workloads
        self.patches: list[tuple[str, str, dict[str, Any]]] = []
        self.requests: list[tuple[str, str, str | None]] = []

    async def list(
        self, api_version: str, plural: str, namespace: str, label_selector: str | None = None
    ) -> list[dict[str, Any]]:
        assert (api_version, plural, namespace) == (kueue.API_VERSION, "workloads", "team")
        self.requests.append(("list", plural, label_selector))
        if self.deny == "list":
            raise ApiError(403, "LIST", "workloads team", "workloads is forbidden", "Forbidden")
        assert label_selector, "never a list of the whole namespace"
        key, _, value = label_selector.partition("=")
        return [w for w in self.workloads if w["metadata"]["labels"].get(key) == value]

    async def get(self, api_version: str, plural: str, namespace: str, name: str) -> dict[str, Any]:
        self.requests.append(("get", plural, name))
        return {"metadata": {"name": name, "uid": self.jobs[name]}}

    async def patch(
        self,
        api_version: str,
        plural: str,
        namespace: str,
        name: str,
        patch: Mapping[str, Any],
        subresource: str | None = None,
    ) -> dict[str, Any]:
        self.patches.append((plural, name, dict(patch)))
        if plural == "workloads" and self.deny == "patch":
            raise ApiError(403, "PATCH", "workloads team", "workloads is forbidden", "Forbidden")
        if plural == "workloads":
            wl = next(w for w in self.workloads if w["metadata"]["name"] == name)
            wl["spec"].update(patch["spec"])
        return {}


def test_workload_of_matches_the_owner_job() -> None:
    wls = [workload("job-a-0-1", "a-0", "u1"), workload("job-b-0-2", "b-0", "u2")]
    assert kueue.workload_of(wls, "b-0")["metadata"]["name"] == "job-b-0-2"  # type: ignore[index]
    assert kueue.workload_of(wls, "b-0", job_uid="other") is None
    assert kueue.workload_of(wls, "c-0") is None


def test_suspend_deactivates_then_marks_the_job_and_never_writes_its_suspend() -> None:
    client = Recorder([workload("job-run-sft-0-x", "run-sft-0", "u1")], {"run-sft-0": "u1"})
    name = asyncio.run(kueue.set_active(client, "team", "run-sft-0", active=False))
    assert name == "job-run-sft-0-x"
    assert client.patches == [
        ("workloads", "job-run-sft-0-x", {"spec": {"active": False}}),
        ("jobs", "run-sft-0", {"metadata": {"annotations": {ANNOTATION_HELD: "operator"}}}),
    ]
    assert all("spec" not in p for plural, _, p in client.patches if plural == "jobs")
    # again (a crash after the first patch): the Workload is already inactive
    client.patches.clear()
    asyncio.run(kueue.set_active(client, "team", "run-sft-0", active=False))
    assert [p[0] for p in client.patches] == ["jobs"]
    # resume: reactivate, then the held mark goes
    client.patches.clear()
    asyncio.run(kueue.set_active(client, "team", "run-sft-0", active=True))
    assert client.patches == [
        ("workloads", "job-run-sft-0-x", {"spec": {"active": True}}),
        ("jobs", "run-sft-0", {"metadata": {"annotations": {ANNOTATION_HELD: None}}}),
    ]


def test_no_workload_yet_is_an_error_that_names_the_job() -> None:
    client = Recorder([], {"run-sft-0": "u1"})
    with pytest.raises(kueue.WorkloadNotFound, match="team/run-sft-0"):
        asyncio.run(kueue.set_active(client, "team", "run-sft-0", active=False))
    assert client.patches == []


def test_pending_message_and_admission() -> None:
    pending = workload(
        "w",
        "j",
        "u",
        conditions=[
            {
                "type": "QuotaReserved",
                "status": "False",
                "reason": "Pending",
                "message": "couldn't assign flavors to pod set main: insufficient quota",
            }
        ],
    )
    assert "insufficient quota" in (kueue.pending_message(pending) or "")
    assert not kueue.is_admitted(pending)
    admitted = workload(
        "w",
        "j",
        "u",
        conditions=[
            {"type": "QuotaReserved", "status": "True", "reason": "QuotaReserved"},
            {"type": "Admitted", "status": "True", "reason": "Admitted"},
        ],
    )
    assert kueue.pending_message(admitted) is None and kueue.is_admitted(admitted)


def test_the_workload_is_found_by_the_jobs_uid_not_by_listing_the_namespace() -> None:
    earlier = workload("job-run-sft-0-old", "run-sft-0", "u0")  # a deleted Job of that name
    current = workload("job-run-sft-0-new", "run-sft-0", "u1")
    other = workload("job-other-0-x", "other-0", "u2")
    client = Recorder([earlier, current, other], {"run-sft-0": "u1"})
    name = asyncio.run(kueue.set_active(client, "team", "run-sft-0", False, job_uid="u1"))
    assert name == "job-run-sft-0-new"
    assert client.requests == [("list", "workloads", f"{kueue.JOB_UID_LABEL}=u1")]
    assert earlier["spec"]["active"] is True and current["spec"]["active"] is False
    # the uid not known yet (a Job just created): read from the Job itself
    client.requests.clear()
    asyncio.run(kueue.set_active(client, "team", "run-sft-0", True))
    assert client.requests == [
        ("get", "jobs", "run-sft-0"),
        ("list", "workloads", f"{kueue.JOB_UID_LABEL}=u1"),
    ]
    assert current["spec"]["active"] is True


@pytest.mark.parametrize("verb", ["list", "patch"])
def test_a_403_on_workloads_names_the_missing_permission(verb: str) -> None:
    client = Recorder([workload("w", "run-sft-0", "u1")], {"run-sft-0": "u1"}, deny=verb)
    with pytest.raises(kueue.WorkloadForbidden) as err:
        asyncio.run(kueue.set_active(client, "team", "run-sft-0", False, job_uid="u1"))
    assert f"may not {verb} workloads.kueue.x-k8s.io in namespace team" in str(err.value)
    assert "kueue.enabled" in str(err.value)


def test_waiting_message_is_kueues_pending_reason() -> None:
    why = "couldn't assign flavors to pod set main: insufficient quota for nvidia.com/gpu"
    pending = workload(
        "w",
        "run-sft-0",
        "u1",
        conditions=[
            {"type": "QuotaReserved", "status": "False", "reason": "Pending", "message": why}
        ],
    )
    client = Recorder([pending], {"run-sft-0": "u1"})
    assert asyncio.run(kueue.waiting_message(client, "team", "run-sft-0", "u1")) == why
    assert "not created its Workload" in asyncio.run(
        kueue.waiting_message(Recorder([]), "team", "run-sft-0", "u1")
    )
    denied = Recorder([pending], deny="list")
    assert "may not list" in asyncio.run(kueue.waiting_message(denied, "team", "run-sft-0", "u1"))
