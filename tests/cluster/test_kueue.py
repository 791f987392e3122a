"""Real Kueue (scripts/cluster/kueue.py: v0.17.0 built from its module) on the real control plane
with the operator's own Jobs: admission, waiting for GPU quota, preemption, a disrupted pod, and
spec.suspend/resume of a queued run through the Workload by the real operator.

One ClusterQueue with ``nvidia.com/gpu: 1`` (the local node advertises 8), preemption of lower
priority within the queue. The Jobs are built by ``manifests.stage_objects`` (labels, suspend,
podFailurePolicy, resources as the operator makes them); where a pod must keep running, its
command is a sleep instead of a stage program, and where it must never run (the operator test),
a nodeSelector no node has keeps it Pending after admission.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml

from visionr1_operator import kueue as opkueue
from visionr1_operator import manifests
from visionr1_operator.api import VisionR1Run
from visionr1_operator.plan import QUEUED, StageProgress, plan

pytestmark = pytest.mark.cluster

REPO = Path(__file__).resolve().parents[2]
# A namespace per session, removed at its end: a rerun never meets the names a run left.
NS = f"kueue-e2e-{uuid.uuid4().hex[:6]}"
LQ = "gpu"
CQ = "visionr1-kueue-e2e"
FLAVOR = "visionr1-kueue-e2e"
# PID 1 of a container ignores SIGTERM unless it handles it: end at once when the pod is deleted
# or evicted, with the status of a process killed by SIGTERM (128 + 15), not a success.
SLEEP = [
    "python",
    "-c",
    "import signal, os, time; signal.signal(signal.SIGTERM, lambda *a: os._exit(143)); "
    "time.sleep(900)",
]
IMAGE = ""  # what stage pods run (set by the kq fixture)
NEVER = {"visionr1.io/kueue-e2e-never": "true"}  # no node has it: admitted, never scheduled
T = TypeVar("T")


def _load_script() -> Any:
    spec = importlib.util.spec_from_file_location(
        "visionr1_kueue_script", REPO / "scripts" / "cluster" / "kueue.py"
    )
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def wait_for(predicate: Callable[[], T], timeout: float, what: str) -> T:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r})")


class K:
    """kubectl as JSON on the control plane."""

    def __init__(self, cp: Any) -> None:
        self.cp = cp

    def get(self, *args: str) -> dict[str, Any] | None:
        out = self.cp.kubectl("get", *args, "-o", "json", check=False)
        if out.returncode != 0:
            if "NotFound" in out.stderr or "not found" in out.stderr:
                return None
            raise AssertionError(out.stderr)
        return json.loads(out.stdout)

    def items(self, *args: str) -> list[dict[str, Any]]:
        return list((self.get(*args) or {}).get("items") or [])

    def apply(self, objs: list[dict[str, Any]]) -> None:
        self.cp.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(objs))

    def create(self, objs: list[dict[str, Any]]) -> None:
        self.cp.kubectl("create", "-f", "-", input=yaml.safe_dump_all(objs))

    def merge(self, kind: str, name: str, patch: dict[str, Any], ns: str = NS) -> None:
        self.cp.kubectl("patch", kind, name, "-n", ns, "--type=merge", "-p", json.dumps(patch))

    def job(self, name: str) -> dict[str, Any]:
        job = self.get("job", name, "-n", NS, "--show-managed-fields")
        assert job is not None, f"Job {name} is gone"
        return job

    def workload(self, job: str) -> dict[str, Any] | None:
        found = opkueue.workload_of(self.items("workloads.kueue.x-k8s.io", "-n", NS), job)
        return dict(found) if found is not None else None

    def pods(self, job: str) -> list[dict[str, Any]]:
        return self.items("pods", "-n", NS, "-l", f"batch.kubernetes.io/job-name={job}")


def cond(obj: dict[str, Any] | None, type_: str) -> dict[str, Any] | None:
    for c in ((obj or {}).get("status") or {}).get("conditions") or []:
        if c.get("type") == type_:
            return c
    return None


def is_true(obj: dict[str, Any] | None, type_: str) -> bool:
    c = cond(obj, type_)
    return c is not None and c.get("status") == "True"


@pytest.fixture(scope="module")
def kq(control_plane: Any, images: dict[str, str]) -> Iterator[K]:
    """Kueue running, a ResourceFlavor, a ClusterQueue with one GPU, a LocalQueue in NS, two
    PriorityClasses; torn down (Kueue's webhooks first, then NS) at the end of the module. Stage
    pods run the operator image (a Python, and small): only their sleep matters here."""
    global IMAGE
    IMAGE = images["operator"]
    script = _load_script()
    try:
        script.build(echo=print)
    except script.Unavailable as exc:  # a build that fails is an error, not a skip
        pytest.skip(f"Kueue cannot be built here: {exc}")
    k = K(control_plane)
    started = script.running() is None
    if started:
        script.up(control_plane.kubectl_bin, control_plane.kubeconfig, echo=print)
    control_plane.kubectl("create", "namespace", NS, check=False)
    control_plane.make_pvc(NS, "data")
    k.apply(
        [
            {
                "apiVersion": "scheduling.k8s.io/v1",
                "kind": "PriorityClass",
                "metadata": {"name": "kueue-e2e-low"},
                "value": 100,
            },
            {
                "apiVersion": "scheduling.k8s.io/v1",
                "kind": "PriorityClass",
                "metadata": {"name": "kueue-e2e-high"},
                "value": 1000,
            },
            {
                "apiVersion": opkueue.API_VERSION,
                "kind": "ResourceFlavor",
                "metadata": {"name": FLAVOR},
            },
            {
                "apiVersion": opkueue.API_VERSION,
                "kind": "ClusterQueue",
                "metadata": {"name": CQ},
                "spec": {
                    "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": NS}},
                    "preemption": {"withinClusterQueue": "LowerPriority"},
                    "resourceGroups": [
                        {
                            "coveredResources": ["cpu", "memory", "nvidia.com/gpu"],
                            "flavors": [
                                {
                                    "name": FLAVOR,
                                    "resources": [
                                        {"name": "cpu", "nominalQuota": "32"},
                                        {"name": "memory", "nominalQuota": "256Gi"},
                                        {"name": "nvidia.com/gpu", "nominalQuota": 1},
                                    ],
                                }
                            ],
                        }
                    ],
                },
            },
            {
                "apiVersion": opkueue.API_VERSION,
                "kind": "LocalQueue",
                "metadata": {"name": LQ, "namespace": NS},
                "spec": {"clusterQueue": CQ},
            },
        ]
    )
    wait_for(
        lambda: is_true(k.get("clusterqueues.kueue.x-k8s.io", CQ), "Active"),
        60,
        "the ClusterQueue Active",
    )
    try:
        yield k
    finally:
        control_plane.kubectl(
            "delete",
            "jobs,visionr1runs.visionr1.io",
            "--all",
            "-n",
            NS,
            "--cascade=background",
            "--wait=false",
            check=False,
        )
        if started:
            script.down(control_plane.kubectl_bin, control_plane.kubeconfig)
        control_plane.kubectl("delete", "namespace", NS, "--timeout=180s", check=False, timeout=200)
        control_plane.kubectl("delete", "pv", f"pv-{NS}-data", check=False)


@pytest.fixture(autouse=True)
def clean_jobs(kq: K) -> Iterator[None]:
    yield
    kq.cp.kubectl(
        "delete", "jobs", "--all", "-n", NS, "--cascade=foreground", "--timeout=60s", check=False
    )


# --------------------------------------------------------------------------- the Jobs


def run_for(
    name: str,
    *,
    gpus: int = 1,
    priority: str | None = None,
    node_selector: dict[str, str] | None = None,
) -> dict[str, Any]:
    """A run with only synthesis enabled, queued on LQ, on the PVC."""
    obj = yaml.safe_load((REPO / "examples" / "tiny-cpu.yaml").read_text())
    obj["metadata"] = {"name": name, "namespace": NS}
    spec = obj["spec"]
    spec["storage"] = {"pvc": "data"}
    spec["images"] = {"trainer": IMAGE, "pullPolicy": "IfNotPresent"}
    spec["queueName"] = LQ
    if priority:
        spec["priorityClassName"] = priority
    for stage in ("filter", "sft", "grpo", "eval"):
        spec["stages"][stage] = {"enabled": False}
    syn = spec["stages"]["synthesis"]
    syn["resources"] = {"gpus": gpus, "cpu": "100m", "memory": "256Mi"}
    if node_selector:
        syn["nodeSelector"] = node_selector
    return obj


def queued_job(k: K, name: str, **kw: Any) -> str:
    """Create the operator's objects of attempt 0 of synthesis, its pod sleeping."""
    run = VisionR1Run.model_validate(run_for(name, **kw))
    objs = manifests.stage_objects(run, "synthesis", 0)
    job = objs[-1]
    assert job["kind"] == "Job" and job["spec"]["suspend"] is True
    assert job["metadata"]["labels"][manifests.KUEUE_QUEUE_LABEL] == LQ
    job["spec"]["template"]["spec"]["containers"][0]["command"] = SLEEP
    k.create(objs)
    return job["metadata"]["name"]


def admitted(k: K, job: str) -> bool:
    wl = k.workload(job)
    return wl is not None and opkueue.is_admitted(wl) and not k.job(job)["spec"].get("suspend")


def running_pod(k: K, job: str) -> dict[str, Any] | None:
    """A Running pod of ``job`` that is not on its way out (a real kubelet keeps a deleted pod
    Running through its termination grace period)."""
    return next(
        (
            p
            for p in k.pods(job)
            if (p.get("status") or {}).get("phase") == "Running"
            and not p["metadata"].get("deletionTimestamp")
        ),
        None,
    )


def observed_plan(k: K, name: str, job: str) -> list[Any]:
    """What the operator's plan makes of the real Job (attempt 0 of synthesis running)."""
    from visionr1_operator.plan import CreateStage, StartRun, apply

    run = VisionR1Run.model_validate(run_for(name))
    status = apply(None, [StartRun(("synthesis",), ("filter", "sft", "grpo", "eval"))], time_now())
    status = apply(status, [CreateStage("synthesis", 0, job)], time_now())
    seen = manifests.observe_job(k.job(job))
    assert seen is not None and seen.queue == LQ
    return plan(run, status, [seen], time_now())


def time_now() -> Any:
    from datetime import UTC, datetime

    return datetime.now(UTC)


# --------------------------------------------------------------------------- the tests


def test_admission_then_waiting_for_gpu_quota(kq: K) -> None:
    first = queued_job(kq, "kq-first")
    wait_for(lambda: admitted(kq, first), 60, f"Kueue to admit {first}")
    wait_for(lambda: running_pod(kq, first), 90, f"a running pod of {first}")
    actions = observed_plan(kq, "kq-first", first)
    assert actions and all(isinstance(a, StageProgress) and a.phase == "Running" for a in actions)

    second = queued_job(kq, "kq-second")
    wl = wait_for(
        lambda: (w := kq.workload(second)) is not None and opkueue.pending_message(w) and w,
        60,
        f"Kueue to leave {second} pending",
    )
    assert "insufficient" in (opkueue.pending_message(wl) or "").lower() or "quota" in (
        opkueue.pending_message(wl) or ""
    ), opkueue.pending_message(wl)
    time.sleep(3)
    assert kq.job(second)["spec"]["suspend"] is True  # waiting: Kueue keeps it suspended
    assert kq.pods(second) == []
    actions = observed_plan(kq, "kq-second", second)
    assert actions == [
        StageProgress(
            "synthesis", "Pending", QUEUED, f"waiting for Kueue to admit it (LocalQueue {LQ})"
        )
    ]

    # the GPU comes free: the waiting Job is admitted and started by Kueue
    kq.cp.kubectl("delete", "job", first, "-n", NS, "--cascade=foreground", "--timeout=60s")
    wait_for(lambda: admitted(kq, second), 60, f"Kueue to admit {second} once the GPU is free")


def test_preemption_suspends_the_job_and_is_not_a_failure(kq: K) -> None:
    low = queued_job(kq, "kq-low", priority="kueue-e2e-low")
    wait_for(lambda: running_pod(kq, low), 90, f"a running pod of {low}")
    first_pod = running_pod(kq, low)
    assert first_pod is not None

    high = queued_job(kq, "kq-high", priority="kueue-e2e-high")
    wait_for(lambda: admitted(kq, high), 90, f"Kueue to preempt {low} and admit {high}")
    wl_low = kq.workload(low)
    evicted = cond(wl_low, "Evicted")
    preempted = cond(wl_low, "Preempted")
    assert (evicted or preempted) is not None, (wl_low or {}).get("status")
    job_low = kq.job(low)
    assert job_low["spec"]["suspend"] is True  # Kueue suspended it
    wait_for(
        lambda: not [p for p in kq.pods(low) if not p["metadata"].get("deletionTimestamp")],
        60,
        f"the pods of {low} deleted",
    )
    job_low = kq.job(low)
    # not a failure: the Job controller untracks pods it deletes on suspend
    assert int((job_low.get("status") or {}).get("failed") or 0) == 0, job_low.get("status")
    assert not is_true(job_low, "Failed")
    actions = observed_plan(kq, "kq-low", low)
    assert [type(a).__name__ for a in actions] == ["StageProgress"]
    assert actions[0].progress == QUEUED  # type: ignore[union-attr]

    # the high one finishes (deleted): the same Job of the low run is admitted again
    kq.cp.kubectl("delete", "job", high, "-n", NS, "--cascade=foreground", "--timeout=60s")
    wait_for(lambda: admitted(kq, low), 90, f"Kueue to readmit {low}")
    pod = wait_for(lambda: running_pod(kq, low), 90, f"a new running pod of {low}")
    assert pod["metadata"]["uid"] != first_pod["metadata"]["uid"]
    assert int((kq.job(low).get("status") or {}).get("failed") or 0) == 0


def test_a_disrupted_pod_is_replaced_not_counted(kq: K) -> None:
    """An evicted pod gets DisruptionTarget; the Jobs' podFailurePolicy ignores it."""
    job = queued_job(kq, "kq-evict")
    pod = wait_for(lambda: running_pod(kq, job), 90, f"a running pod of {job}")
    name = pod["metadata"]["name"]
    eviction = {
        "apiVersion": "policy/v1",
        "kind": "Eviction",
        "metadata": {"name": name, "namespace": NS},
    }
    kq.cp.kubectl(
        "create",
        "--raw",
        f"/api/v1/namespaces/{NS}/pods/{name}/eviction",
        "-f",
        "-",
        input=json.dumps(eviction),
    )
    replacement = wait_for(
        lambda: next(
            (
                p
                for p in kq.pods(job)
                if p["metadata"]["name"] != name
                and (p.get("status") or {}).get("phase") == "Running"
            ),
            None,
        ),
        120,
        f"a replacement pod of {job}",
    )
    assert replacement["metadata"]["name"] != name
    status = kq.job(job).get("status") or {}
    assert not is_true(kq.job(job), "Failed"), status
    assert int(status.get("failed") or 0) == 0, status
    actions = observed_plan(kq, "kq-evict", job)
    assert all(type(a).__name__ == "StageProgress" and a.phase == "Running" for a in actions)


# --------------------------------------------------------------------------- the operator


@pytest.fixture
def operator_proc(kq: K, tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    from visionr1_operator.crd import crd

    cp = kq.cp
    if kq.get("crd", "visionr1runs.visionr1.io") is None:
        cp.kubectl("create", "-f", "-", input=yaml.safe_dump(crd()))
    wait_for(
        lambda: is_true(kq.get("crd", "visionr1runs.visionr1.io"), "Established"),
        60,
        "the VisionR1Run CRD Established",
    )
    env = {**os.environ, "KUBECONFIG": str(cp.kubeconfig), "MLFLOW_DISABLE_TELEMETRY": "true"}
    env.pop("VISIONR1_MLFLOW_URI", None)
    log = (tmp_path / "operator.log").open("wb")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "visionr1_operator.cli",
            "operator",
            "--namespace",
            NS,
            "--liveness",
            "",
            "--retry-backoff",
            "1",
            # deny by default: the image and node selector these runs use
            f"--allowed-image={IMAGE}",
            *(f"--allowed-node-selector={k}={v}" for k, v in NEVER.items()),
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        yield proc
    finally:
        cp.kubectl(
            "delete", "visionr1runs.visionr1.io", "--all", "-n", NS, "--wait=false", check=False
        )
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        print((tmp_path / "operator.log").read_text(errors="replace")[-4000:])


# the field manager of the operator's client (kube.Kube)
OPERATOR_MANAGER = "visionr1-operator"


def managed(job: dict[str, Any]) -> list[tuple[str, str, list[str]]]:
    """(manager, operation, spec fields) per managedFields entry: who wrote what."""
    return [
        (
            e.get("manager", ""),
            e.get("operation", ""),
            sorted((e.get("fieldsV1") or {}).get("f:spec", {})),
        )
        for e in job["metadata"].get("managedFields") or []
    ]


def suspend_owners(job: dict[str, Any]) -> set[str]:
    return {m for m, _, fields in managed(job) if "f:suspend" in fields}


def settled_generation(k: K, job: str, quiet_s: float = 2.0, timeout: float = 30) -> int:
    """The Job's generation once it has not changed for ``quiet_s``."""
    deadline = time.monotonic() + timeout
    last, since = k.job(job)["metadata"]["generation"], time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.25)
        now = k.job(job)["metadata"]["generation"]
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            return int(now)
    raise AssertionError(f"Job {job} kept changing: {managed(k.job(job))}")


def run_status(k: K, name: str) -> dict[str, Any]:
    return (k.get("visionr1runs.visionr1.io", name, "-n", NS) or {}).get("status") or {}


def test_operator_suspends_and_resumes_a_queued_run_through_its_workload(
    kq: K, operator_proc: Any
) -> None:
    name, job = "kq-op", "kq-op-synthesis-0"
    kq.apply([run_for(name, node_selector=NEVER)])
    wait_for(lambda: kq.get("job", job, "-n", NS), 60, f"the operator to create {job}")
    wait_for(lambda: admitted(kq, job), 60, f"Kueue to admit {job}")

    kq.merge("visionr1runs.visionr1.io", name, {"spec": {"suspend": True}})
    wait_for(
        lambda: (kq.workload(job) or {}).get("spec", {}).get("active") is False,
        60,
        "the operator to deactivate the Workload",
    )
    wait_for(lambda: kq.job(job)["spec"].get("suspend") is True, 60, "Kueue to suspend the Job")
    wait_for(lambda: run_status(kq, name).get("phase") == "Suspended", 30, "phase Suspended")
    held = kq.job(job)["metadata"].get("annotations") or {}
    assert held.get(manifests.ANNOTATION_HELD) == "operator"
    # No tug of war: once Kueue is done evicting (it suspends the Job, then restores its pod
    # template), nobody rewrites the Job's spec, and the operator never owned its suspend.
    generation = settled_generation(kq, job)
    deadline = time.monotonic() + 6
    while time.monotonic() < deadline:
        assert kq.job(job)["spec"].get("suspend") is True, "the suspended Job was un-suspended"
        time.sleep(0.5)
    assert kq.job(job)["metadata"]["generation"] == generation, managed(kq.job(job))
    writers = {m for m, _, _ in managed(kq.job(job))}
    assert OPERATOR_MANAGER in writers, writers  # it created the Job and marked it held
    assert OPERATOR_MANAGER not in suspend_owners(kq.job(job)), managed(kq.job(job))
    cond_s = next(c for c in run_status(kq, name)["conditions"] if c["type"] == "Suspended")
    assert cond_s["status"] == "True" and "Kueue Workload" in cond_s["message"]

    kq.merge("visionr1runs.visionr1.io", name, {"spec": {"suspend": False}})
    wait_for(
        lambda: (kq.workload(job) or {}).get("spec", {}).get("active") is True,
        60,
        "the operator to reactivate the Workload",
    )
    wait_for(lambda: admitted(kq, job), 60, "Kueue to admit the Job again")
    wait_for(lambda: run_status(kq, name).get("phase") == "Running", 30, "phase Running")
    st = run_status(kq, name)["stages"]["synthesis"]
    assert st["attempts"] == 1 and st["jobName"] == job
    assert OPERATOR_MANAGER not in suspend_owners(kq.job(job)), managed(kq.job(job))
    assert manifests.ANNOTATION_HELD not in (kq.job(job)["metadata"].get("annotations") or {})


def test_operator_shows_a_run_waiting_for_quota(kq: K, operator_proc: Any) -> None:
    name, job = "kq-big", "kq-big-synthesis-0"
    kq.apply([run_for(name, gpus=2, node_selector=NEVER)])  # the queue has 1 GPU
    wl = wait_for(
        lambda: (w := kq.workload(job)) is not None and opkueue.pending_message(w) and w,
        60,
        "Kueue to leave the Workload pending",
    )
    assert opkueue.pending_message(wl)
    st = wait_for(
        lambda: (
            (run_status(kq, name).get("stages") or {}).get("synthesis", {}).get("progress")
            == QUEUED
            and run_status(kq, name)["stages"]["synthesis"]
        ),
        30,
        "the run's stage to say it is queued",
    )
    assert st["phase"] == "Pending" and LQ in st["message"]
    # Kueue's own reason (the Workload's QuotaReserved message) reaches the run while it waits
    why = wait_for(
        lambda: (
            (opkueue.pending_message(kq.workload(job) or {}) or "?")
            in run_status(kq, name)["stages"]["synthesis"].get("message", "")
            and run_status(kq, name)["stages"]["synthesis"]["message"]
        ),
        30,
        "Kueue's pending message on the run",
    )
    assert "nvidia.com/gpu" in why, why
    events = kq.items("events", "-n", NS, "--field-selector", f"involvedObject.name={name}")
    assert "StageQueued" in [e.get("reason") for e in events]
    assert kq.job(job)["spec"]["suspend"] is True
