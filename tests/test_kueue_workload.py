"""kueue.py: finding a Job's Workload and pausing it through spec.active (the real Kueue runs in
tests/cluster/test_kueue.py; here a recording client checks which writes are made)."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import pytest

from visionr1_operator import kueue
from visionr1_operator.manifests import ANNOTATION_HELD


def workload(name: str, job: str, uid: str, active: bool = True, **status: Any) -> dict[str, Any]:
    return {
        "apiVersion": kueue.API_VERSION,
        "kind": "Workload",
        "metadata": {
            "name": name,
            "namespace": "team",
            "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": job, "uid": uid}],
        },
        "spec": {"active": active, "queueName": "gpu"},
        "status": status,
    }


class Recorder:
    """Answers ``list`` from a fixed set of Workloads and records every patch."""

    def __init__(self, workloads: list[dict[str, Any]]) -> None:
        self.workloads = workloads
        self.patches: list[tuple[str, str, dict[str, Any]]] = []

    async def list(
        self, api_version: str, plural: str, namespace: str, label_selector: str | None = None
    ) -> list[dict[str, Any]]:
        assert (api_version, plural, namespace) == (kueue.API_VERSION, "workloads", "team")
        return self.workloads

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
    client = Recorder([workload("job-run-sft-0-x", "run-sft-0", "u1")])
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
    client = Recorder([])
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
