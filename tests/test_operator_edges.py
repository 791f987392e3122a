"""The operator's edge without a cluster: what it keeps per run, refused creates, and the
Kubernetes client's retries. (The kmock tests run the same code under kopf end to end; these
pin down paths a kmock server cannot produce: a 403 quota refusal, a 503 then success.)"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx2
import pytest
import yaml

from visionr1_operator.api import VisionR1Run, VisionR1RunStatus
from visionr1_operator.handlers import OperatorConfig, Reconciler
from visionr1_operator.kube import ApiError, Kube, Timeouts
from visionr1_operator.plan import CreateStage, ObservedJob, StageBlocked

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "tiny-cpu.yaml"
NOW = datetime(2025, 1, 1, tzinfo=UTC)


def run_and_object() -> tuple[VisionR1Run, dict[str, Any]]:
    obj = yaml.safe_load(EXAMPLE.read_text())
    obj["spec"]["storage"] = {"pvc": "data"}
    obj["metadata"].update(namespace="ml", uid="uid-1", generation=1)
    run = VisionR1Run.model_validate(obj)
    return run, obj


class RefusingKube:
    """Refuses Job creation the way a ResourceQuota does (403 Forbidden)."""

    def __init__(self) -> None:
        self.created: list[str] = []

    async def namespace(self, name: str) -> dict[str, Any]:
        return {"metadata": {"name": name, "labels": {}}}  # no Pod Security level enforced

    async def create(self, obj: dict[str, Any]) -> None:
        if obj["kind"] == "Job":
            raise ApiError(
                403,
                "POST",
                f"Job ml/{obj['metadata']['name']}",
                'jobs "x" is forbidden: exceeded quota: gpu, requested: count/jobs.batch=1',
                "Forbidden",
            )
        self.created.append(f"{obj['kind']}/{obj['metadata']['name']}")


async def test_a_quota_refusal_is_a_condition_and_the_run_waits() -> None:
    run, obj = run_and_object()
    rec = Reconciler(OperatorConfig(error_delay_s=1.0))
    rec.kube = RefusingKube()  # type: ignore[assignment]
    create = CreateStage("synthesis", 0, "tiny-cpu-synthesis-0")
    status, extra = await rec._execute(run, obj, VisionR1RunStatus(), [create], NOW)
    [blocked, requeue] = extra
    assert isinstance(blocked, StageBlocked) and blocked.reason == "CreateRefused"
    assert "exceeded quota" in blocked.message and "403" in blocked.message
    cond = next(c for c in status.conditions if c.type == "Progressing")
    assert cond.status == "False" and cond.reason == "CreateRefused"
    assert status.stages["synthesis"].attempts == 0, "not created: planned again later"
    assert requeue.after_s == 1.0
    # waiting longer each time it is refused again
    _, extra = await rec._execute(run, obj, VisionR1RunStatus(), [create], NOW)
    assert extra[1].after_s == 2.0


async def test_a_deleted_runs_in_memory_state_is_dropped() -> None:
    rec = Reconciler(OperatorConfig())
    key = ("ml", "tiny-cpu")
    rec.locks[key]  # noqa: B018 (created on access, as a reconcile does)
    rec.created[key]["tiny-cpu-synthesis-0"] = ObservedJob("tiny-cpu-synthesis-0", "synthesis", 0)
    rec.seen[key]["tiny-cpu-synthesis-0"] = ObservedJob("tiny-cpu-synthesis-0", "synthesis", 0)
    rec.blocked[key] = 3
    rec.schedule(*key, after_s=60)
    timer = rec.timers[key]
    other = ("ml", "other")
    rec.blocked[other] = 1
    _, obj = run_and_object()
    await rec.deleted(obj)
    assert rec.state_of(*key) == {}
    await asyncio.sleep(0)
    assert timer.cancelled()
    assert rec.state_of(*other) == {"blocked": 1}, "other runs keep theirs"
    # a new run of the same name does not see the old one's Jobs as its own
    assert rec._observe("ml", "tiny-cpu", obj) == []


def kube_against(handler: Any) -> Kube:
    from lightkube import KubeConfig
    from lightkube.config.models import Cluster, User

    config = KubeConfig.from_one(cluster=Cluster(server="http://k8s.test"), user=User())
    return Kube(
        config, Timeouts(attempts=3, backoff_s=0.01), transport=httpx2.MockTransport(handler)
    )


def status_body(code: int, reason: str, message: str) -> dict[str, Any]:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "status": "Failure",
        "code": code,
        "reason": reason,
        "message": message,
    }


async def test_the_client_retries_429_and_5xx_then_succeeds() -> None:
    calls: list[str] = []

    def handler(request: httpx2.Request) -> httpx2.Response:
        calls.append(request.method)
        if len(calls) == 1:
            return httpx2.Response(
                429,
                json=status_body(429, "TooManyRequests", "slow down"),
                headers={"Retry-After": "0"},
            )
        if len(calls) == 2:
            return httpx2.Response(503, json=status_body(503, "ServiceUnavailable", "busy"))
        return httpx2.Response(
            200,
            json={
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {"name": "c", "namespace": "ml"},
            },
        )

    kube = kube_against(handler)
    got = await kube.get("v1", "configmaps", "ml", "c")
    assert got["metadata"]["name"] == "c" and calls == ["GET", "GET", "GET"]


async def test_the_client_does_not_retry_a_refusal_and_names_it() -> None:
    calls: list[str] = []

    def handler(request: httpx2.Request) -> httpx2.Response:
        calls.append(request.method)
        return httpx2.Response(
            422, json=status_body(422, "Invalid", 'Job.batch "x" is invalid: spec.template')
        )

    kube = kube_against(handler)
    with pytest.raises(ApiError) as err:
        await kube.create(
            {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c", "namespace": "ml"}}
        )
    assert err.value.status == 422 and err.value.reason == "Invalid"
    assert "is invalid" in str(err.value) and calls == ["POST"]


def test_no_handler_asks_kopf_for_a_finalizer() -> None:
    """Nothing holds a run's deletion for the operator: after `helm uninstall`, deleting a run
    or its namespace must not hang on a finalizer nobody will remove. kopf adds its finalizer
    only for handlers that require one, and removes a stale one (an older version's) when none
    does. (Checked here on the registry: kmock cannot apply kopf's finalizer-removal patch; the
    kmock deletion test checks that no finalizer is added.)"""
    from visionr1_operator.handlers import make_registry

    registry = make_registry(OperatorConfig())
    # none at all: kopf's base for them is not built (NoDiffBase), so one would see no change
    assert list(registry._changing.get_all_handlers()) == []
    assert list(registry._spawning.get_all_handlers()) == []  # no daemons or timers either
    watching = [h.id for h in registry._watching.get_all_handlers()]
    assert any("run_event" in h for h in watching), watching  # runs reach a reconcile


def test_a_run_may_not_reach_outside_its_namespaces_folder() -> None:
    from visionr1_operator.policy import ClusterPolicy, cluster_problems

    run, _ = run_and_object()
    assert cluster_problems(run, ClusterPolicy()) == []
    run.spec.storage.sub_path = "other-team/their-run"
    [problem] = cluster_problems(run, ClusterPolicy())
    assert problem.startswith("spec.storage.subPath") and "under ml/" in problem
    run.spec.storage.sub_path = ""
    run.spec.storage.model_cache = "../other-team/.cache"
    [problem] = cluster_problems(run, ClusterPolicy())
    assert problem.startswith("spec.storage.modelCache")
    run.spec.storage.model_cache = ".cache/huggingface"
    run.metadata.namespace = "shared"  # its folder would be the read-only shared data folder
    [problem] = cluster_problems(run, ClusterPolicy())
    assert "shared data folder" in problem


class RecordingKube:
    """Creates whatever it is given; the namespace is read as ``namespace_answer`` says (its
    labels, or an ApiError to raise); pods are listed from ``pods``."""

    def __init__(self, namespace_answer: Any, pods: list[dict[str, Any]] | None = None) -> None:
        self.namespace_answer = namespace_answer
        self.pods = pods or []
        self.created: list[dict[str, Any]] = []
        self.listed: list[tuple[str, str | None]] = []

    async def namespace(self, name: str) -> dict[str, Any]:
        if isinstance(self.namespace_answer, Exception):
            raise self.namespace_answer
        return {"metadata": {"name": name, "labels": self.namespace_answer}}

    async def create(self, obj: dict[str, Any]) -> None:
        self.created.append(obj)

    async def list(
        self, api_version: str, plural: str, namespace: str, label_selector: str | None = None
    ) -> list[dict[str, Any]]:
        self.listed.append((plural, label_selector))
        return self.pods


async def created_pod_spec(answer: Any) -> dict[str, Any]:
    run, obj = run_and_object()
    rec = Reconciler(OperatorConfig())
    kube = RecordingKube(answer)
    rec.kube = kube  # type: ignore[assignment]
    create = CreateStage("synthesis", 0, "tiny-cpu-synthesis-0")
    await rec._execute(run, obj, VisionR1RunStatus(), [create], NOW)
    [job] = [o for o in kube.created if o["kind"] == "Job"]
    return job["spec"]["template"]["spec"]


async def test_the_namespaces_pod_security_label_decides_the_init_container() -> None:
    restricted = await created_pod_spec({"pod-security.kubernetes.io/enforce": "restricted"})
    assert "initContainers" not in restricted
    baseline = await created_pod_spec({"pod-security.kubernetes.io/enforce": "baseline"})
    assert [c["name"] for c in baseline["initContainers"]] == ["workspace-init"]
    # RBAC without namespaces get: as before (the run can still say FSGroup)
    forbidden = ApiError(403, "GET", "namespaces ml", 'namespaces "ml" is forbidden', "Forbidden")
    unknown = await created_pod_spec(forbidden)
    assert [c["name"] for c in unknown["initContainers"]] == ["workspace-init"]
    # the API server itself failing is not "unknown": the reconcile is retried
    with pytest.raises(ApiError):
        await created_pod_spec(ApiError(503, "GET", "namespaces ml", "busy", ""))


async def test_a_failed_jobs_pods_are_listed_when_their_event_is_late() -> None:
    """The Job's Failed condition came in before its pod's terminated state (two watches, any
    order): the operator lists the Job's pods once, so the stage's own reason is not lost."""
    from visionr1_operator import manifests
    from visionr1_operator.plan import apply, plan

    run, _ = run_and_object()
    name = "tiny-cpu-synthesis-0"
    job = manifests.job(run, "synthesis", 0)
    reason = "raw/llava-cot: no such file or directory"
    pod = {
        "metadata": {
            "name": f"{name}-0-abcde",
            "labels": {**job["spec"]["template"]["metadata"]["labels"], "job-name": name},
        },
        "spec": job["spec"]["template"]["spec"],
        "status": {
            "phase": "Failed",
            "containerStatuses": [
                {
                    "name": "stage",
                    "state": {"terminated": {"exitCode": 65, "reason": "Error", "message": reason}},
                }
            ],
        },
    }
    rec = Reconciler(OperatorConfig())
    kube = RecordingKube({}, pods=[pod])
    rec.kube = kube  # type: ignore[assignment]
    status = apply(None, plan(run, None, [], NOW), NOW)  # attempt 0 of synthesis created
    failed = ObservedJob(
        name,
        "synthesis",
        0,
        failed=1,
        failed_reason="PodFailurePolicy",
        message="Container stage for pod ml/x failed with exit code 65 matching FailJob rule",
    )
    [seen] = await rec._failed_pods("ml", status, [failed])
    assert kube.listed == [("pods", f"batch.kubernetes.io/job-name={name}")]
    assert f"(exit code 65): {reason}" in seen.message and seen.exit_code == 65
    # once the failure is recorded, nothing is listed again
    status = apply(status, plan(run, status, [seen], NOW), NOW)
    assert status.phase == "Failed" and reason in status.stages["synthesis"].message
    await rec._failed_pods("ml", status, [failed])
    assert len(kube.listed) == 1


class EventsKube:
    """Lists Events (as the API server filters them by field) and Kueue Workloads."""

    def __init__(self, events: list[dict[str, Any]], workloads: list[dict[str, Any]]) -> None:
        self.events, self.workloads = events, workloads
        self.listed: list[tuple[str, Any]] = []

    async def list(
        self,
        api_version: str,
        plural: str,
        namespace: str,
        label_selector: str | None = None,
        field_selector: dict[str, str] | None = None,
    ) -> list[dict[str, Any]]:
        self.listed.append((plural, field_selector or label_selector))
        if plural == "workloads":
            return self.workloads
        want = field_selector or {}
        fields = {
            "reason": lambda e: e["reason"],
            "involvedObject.uid": lambda e: e["involvedObject"]["uid"],
            "involvedObject.kind": lambda e: e["involvedObject"]["kind"],
        }
        return [e for e in self.events if all(fields[k](e) == v for k, v in want.items())]


async def test_a_pod_less_job_has_its_refusal_read_on_a_backoff_and_dropped_with_pods(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from visionr1_operator import handlers, manifests

    clock = [1000.0]
    monkeypatch.setattr(handlers.time, "monotonic", lambda: clock[0])
    quota = (
        'Error creating: pods "p" is forbidden: exceeded quota: gpu, requested: '
        "requests.nvidia.com/gpu=2, used: requests.nvidia.com/gpu=0, limited: "
        "requests.nvidia.com/gpu=1"
    )
    refused = {
        "reason": "FailedCreate",
        "message": quota,
        "involvedObject": {"kind": "Job", "name": "tiny-cpu-synthesis-0", "uid": "job-uid"},
    }
    rec = Reconciler(OperatorConfig())
    kube = EventsKube([refused], [])
    rec.kube = kube  # type: ignore[assignment]
    rec.pod_index = {}
    job = ObservedJob("tiny-cpu-synthesis-0", "synthesis", 0, uid="job-uid", running_pods=0)
    # first seen: nothing read yet (its pods are usually a moment away), a read due in 3 s
    [seen], after = await rec._why_waiting("ml", "tiny-cpu", [job])
    assert kube.listed == [] and seen.pod_problem is None and after == 3.0
    clock[0] += 3
    [seen], after = await rec._why_waiting("ml", "tiny-cpu", [job])
    assert kube.listed == [("events", {"reason": "FailedCreate", "involvedObject.kind": "Job"})]
    assert seen.pod_problem is not None and seen.pod_problem[0] == "QuotaExceeded"
    assert after == 6.0  # the next read backs off
    clock[0] += 1  # a reconcile in between reads nothing and keeps what was read
    [seen], after = await rec._why_waiting("ml", "tiny-cpu", [job])
    assert len(kube.listed) == 1 and seen.pod_problem is not None and after == 5.0
    # its pod is created: nothing waits any more
    rec.pod_index = {("ml", job.name): [manifests.PodFacts("p", job.name, "Pending")]}
    [seen], after = await rec._why_waiting("ml", "tiny-cpu", [job])
    assert after is None and seen.pod_problem is None and rec.state_of("ml", "tiny-cpu") == {}


async def test_a_kueue_suspended_job_shows_kueues_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    from visionr1_operator import handlers, kueue

    clock = [1000.0]
    monkeypatch.setattr(handlers.time, "monotonic", lambda: clock[0])
    why = "couldn't assign flavors to pod set main: insufficient quota for nvidia.com/gpu"
    workload = {
        "metadata": {
            "name": "job-x",
            "labels": {kueue.JOB_UID_LABEL: "job-uid"},
            "ownerReferences": [{"kind": "Job", "name": "tiny-cpu-sft-0", "uid": "job-uid"}],
        },
        "status": {"conditions": [{"type": "QuotaReserved", "status": "False", "message": why}]},
    }
    rec = Reconciler(OperatorConfig())
    kube = EventsKube([], [workload])
    rec.kube = kube  # type: ignore[assignment]
    job = ObservedJob("tiny-cpu-sft-0", "sft", 0, uid="job-uid", suspended=True, queue="gpu")
    await rec._why_waiting("ml", "tiny-cpu", [job])
    clock[0] += 3
    [seen], _ = await rec._why_waiting("ml", "tiny-cpu", [job])
    assert kube.listed == [("workloads", f"{kueue.JOB_UID_LABEL}=job-uid")]
    assert seen.admission == why
    # a Job the operator itself holds (spec.suspend) is not Kueue's to explain
    held = ObservedJob("tiny-cpu-sft-0", "sft", 0, uid="job-uid", suspended=True, held=True)
    assert (await rec._why_waiting("ml", "tiny-cpu", [held]))[1] is None


def test_a_pods_new_message_for_the_same_reason_is_not_news() -> None:
    from visionr1_operator.handlers import _same_reason
    from visionr1_operator.manifests import PodFacts

    a = PodFacts("p", "j", "Pending", ("Unschedulable", "0/5 nodes are available"))
    b = PodFacts("p", "j", "Pending", ("Unschedulable", "0/6 nodes are available"))
    assert _same_reason(a, b)
    assert not _same_reason(a, PodFacts("p", "j", "Pending", ("ErrImagePull", "no such image")))
    assert not _same_reason(a, PodFacts("p", "j", "Running", a.problem))  # the phase is news
    assert not _same_reason(PodFacts("p", "j", "Pending"), a)  # a first problem is news
    assert not _same_reason(None, a)


async def test_the_jobs_waiting_in_a_namespace_share_one_read_of_its_events(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The API server keeps no cache of Events: each list reads all of the namespace's from
    etcd. Many Jobs waiting at once (a burst of runs) cost one list, not one each; each still
    gets its own refusal, and a later read sees a refusal that came since."""
    from visionr1_operator import handlers

    clock = [1000.0]
    monkeypatch.setattr(handlers.time, "monotonic", lambda: clock[0])

    def refused(uid: str, message: str) -> dict[str, Any]:
        return {
            "reason": "FailedCreate",
            "message": message,
            "involvedObject": {"kind": "Job", "name": uid, "uid": uid},
        }

    quota = (
        'Error creating: pods "p" is forbidden: exceeded quota: gpu, requested: '
        "requests.nvidia.com/gpu=2, used: requests.nvidia.com/gpu=0, limited: "
        "requests.nvidia.com/gpu=1"
    )
    kube = EventsKube([refused("uid-0", quota)], [])
    rec = Reconciler(OperatorConfig())
    rec.kube = kube  # type: ignore[assignment]
    rec.pod_index = {}
    jobs = {
        i: ObservedJob(f"r{i}-synthesis-0", "synthesis", 0, uid=f"uid-{i}", running_pods=0)
        for i in range(20)
    }
    for i, job in jobs.items():
        await rec._why_waiting("ml", f"r{i}", [job])
    clock[0] += 3
    seen = await asyncio.gather(
        *(rec._why_waiting("ml", f"r{i}", [job]) for i, job in jobs.items())
    )
    assert len(kube.listed) == 1
    problems = [s[0][0].pod_problem for s in seen]
    assert problems[0] is not None and problems[0][0] == "QuotaExceeded"
    assert problems[1:] == [None] * 19
    # a refusal that comes later is seen once the namespace's read is older than its TTL
    kube.events.append(refused("uid-1", quota))
    clock[0] += handlers.EVENTS_TTL_S + 1
    [job1], _ = await rec._why_waiting("ml", "r1", [jobs[1]])
    assert len(kube.listed) == 2 and job1.pod_problem is not None


def test_the_operator_process_leaves_its_startup_objects_out_of_collections() -> None:
    """What tune_gc leaves the interpreter with (in a process of its own: it changes global
    state): the objects alive at startup out of the collections; an object alive through 30
    young collections still young (with Python's thresholds it is in the oldest generation
    by then, where only full collections look); and a cycle made afterwards still collected."""
    import subprocess
    import sys

    probe = (
        "import gc, weakref\n"
        "from visionr1_operator.main import tune_gc\n"
        "class Node: pass\n"
        "def churn():\n"  # cyclic garbage: young collections, as a watch event's objects make
        "    young = gc.get_threshold()[0]\n"
        "    for _ in range(30 * young):\n"
        "        a, b = Node(), Node()\n"
        "        a.other, b.other = b, a\n"
        "def oldest(obj):\n"
        "    return any(o is obj for o in gc.get_objects(generation=2))\n"
        "before = [Node()]\n"
        "churn()\n"
        "assert oldest(before), 'with Python thresholds 30 young collections promote'\n"
        "tune_gc()\n"
        "assert gc.get_freeze_count() > 1000, gc.get_freeze_count()\n"
        "in_flight = [Node()]\n"
        "churn()\n"
        "assert not oldest(in_flight), 'promoted to the oldest generation'\n"
        "a, b = Node(), Node()\n"
        "a.other, b.other = b, a\n"
        "gone = weakref.ref(a)\n"
        "del a, b\n"
        "gc.collect()\n"
        "assert gone() is None\n"
        "print('ok')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=False
    )
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
