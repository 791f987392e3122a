"""GPU-hours of a finished attempt from the pods' watch: no list request when the watch already
shows every pod of the attempt ended (a label list scans the whole namespace's pods)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from visionr1_operator import manifests
from visionr1_operator.api import StageStatus, VisionR1RunStatus
from visionr1_operator.handlers import OperatorConfig, Reconciler
from visionr1_operator.plan import ObservedJob

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


def stage_pod(name: str, job: str, gpus: int, start: datetime, end: datetime | None) -> dict:
    def z(t: datetime) -> str:
        return t.isoformat().replace("+00:00", "Z")

    state = {"terminated": {"exitCode": 0, "finishedAt": z(end)}} if end else {"running": {}}
    return {
        "metadata": {
            "name": name,
            "labels": {manifests.LABEL_RUN: "r", manifests.JOB_NAME_LABEL: job},
        },
        "spec": {
            "containers": [
                {"name": "stage", "resources": {"limits": {"nvidia.com/gpu": str(gpus)}}}
            ]
        },
        "status": {
            "phase": "Succeeded" if end else "Running",
            "startTime": z(start),
            "containerStatuses": [{"name": "stage", "state": state}],
        },
    }


class PodLister:
    def __init__(self, pods: dict[str, list[dict[str, Any]]]) -> None:
        self.pods, self.calls = pods, []

    async def list(self, version: str, plural: str, ns: str, label_selector: str) -> Any:
        job = label_selector.split("=", 1)[1]
        self.calls.append(job)
        return self.pods.get(job, [])


def charge(rec: Reconciler, job: ObservedJob) -> VisionR1RunStatus:
    status = VisionR1RunStatus(phase="Running", stages={"sft": StageStatus(phase="Running")})
    return asyncio.run(rec._charge("ns", status, [job], T0 + timedelta(hours=3)))


def test_an_attempt_whose_pods_the_watch_shows_ended_is_charged_without_a_list() -> None:
    pods = [
        stage_pod("r-sft-0-0", "r-sft-0", 8, T0, T0 + timedelta(minutes=30)),
        stage_pod("r-sft-0-1", "r-sft-0", 8, T0 + timedelta(minutes=1), T0 + timedelta(hours=1)),
    ]
    rec = Reconciler(OperatorConfig())
    rec.kube = PodLister({"r-sft-0": pods})  # type: ignore[assignment]
    rec.pod_index = {("ns", "r-sft-0"): [manifests.observe_pod(p) for p in pods]}
    done = ObservedJob("r-sft-0", "sft", 0, succeeded=2, complete=True)
    status = charge(rec, done)
    assert status.stages["sft"].gpu_hours == pytest.approx(4.0 + 7.866667, rel=1e-5)
    assert rec.kube.calls == []  # type: ignore[attr-defined]
    # the same figure as listing the pods gives
    listed = Reconciler(OperatorConfig())
    listed.kube = PodLister({"r-sft-0": pods})  # type: ignore[assignment]
    assert charge(listed, done).stages["sft"].gpu_hours == status.stages["sft"].gpu_hours
    assert listed.kube.calls == ["r-sft-0"]  # type: ignore[attr-defined]


def test_a_pod_the_watch_still_shows_running_is_listed_for_its_end() -> None:
    """The Job's completion can come before its pod's last event: the list has the end."""
    ended = stage_pod("r-sft-0-0", "r-sft-0", 4, T0, T0 + timedelta(hours=1))
    still = stage_pod("r-sft-0-0", "r-sft-0", 4, T0, None)
    rec = Reconciler(OperatorConfig())
    rec.kube = PodLister({"r-sft-0": [ended]})  # type: ignore[assignment]
    rec.pod_index = {("ns", "r-sft-0"): [manifests.observe_pod(still)]}
    status = charge(rec, ObservedJob("r-sft-0", "sft", 0, succeeded=1, complete=True))
    assert status.stages["sft"].gpu_hours == pytest.approx(4.0)  # not 3 h up to "now"
    assert rec.kube.calls == ["r-sft-0"]  # type: ignore[attr-defined]


def test_a_pods_start_or_end_time_alone_is_no_news_to_the_plan() -> None:
    """Usage is kept with a pod's facts but not compared: no extra reconcile per pod."""
    a = manifests.observe_pod(stage_pod("p", "j", 1, T0, None))
    b = manifests.observe_pod(stage_pod("p", "j", 1, T0 + timedelta(seconds=5), None))
    assert a is not None and b is not None and a.usage != b.usage
    assert a == b
