"""Refusals the API server makes to a run's pods, a failed run's resources, and a Pending run's
quiet, on the real control plane with the operator as a local process.

ResourceQuota and Pod Security judge pods, not Jobs: the operator's Job is created and the real
Job controller's pod creations are refused (its ``FailedCreate`` Events). Each test checks what
the run then says (its ``Progressing`` condition and a Warning Event), against a real quota on
``requests.nvidia.com/gpu`` (the local node advertises 8 GPUs) and a namespace that enforces Pod
Security ``restricted`` on an operator that may not read namespaces (a tenant's namespaced
Role). Pods here never run: a nodeSelector no node has keeps the admitted ones Pending.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from cluster_helpers import (
    OperatorProcess,
    apply,
    condition,
    create_namespace,
    ensure_crd,
    items,
    kget,
    kget_or_none,
    wait_for,
)

from visionr1_operator.rbac import as_policy_rules

pytestmark = pytest.mark.cluster

REPO = Path(__file__).resolve().parents[2]
SUFFIX = uuid.uuid4().hex[:6]
NS = f"vr1-refusals-{SUFFIX}"
NS_PS = f"vr1-restricted-{SUFFIX}"
PVC = "data"
IMAGE = "registry.invalid/visionr1/never-pulled:1"  # no pod here gets as far as a pull
NEVER = {"visionr1.io/refusals-e2e-never": "true"}  # no node has it
# what the runs here use, allowed by the operator (deny by default)
ALLOW = [
    f"--allowed-image={IMAGE}",
    *(f"--allowed-node-selector={k}={v}" for k, v in NEVER.items()),
]


def run_manifest(
    name: str,
    namespace: str = NS,
    *,
    gpus: int = 0,
    memory: str = "256Mi",
    node_selector: dict[str, str] | None = None,
) -> dict[str, Any]:
    """A run with only synthesis enabled, on the namespace's PVC."""
    obj = yaml.safe_load((REPO / "examples" / "tiny-cpu.yaml").read_text())
    obj["metadata"] = {"name": name, "namespace": namespace}
    spec = obj["spec"]
    spec["storage"] = {"pvc": PVC}
    spec["images"] = {"trainer": IMAGE, "pullPolicy": "IfNotPresent"}
    for stage in ("filter", "sft", "grpo", "eval"):
        spec["stages"][stage] = {"enabled": False}
    syn = spec["stages"]["synthesis"]
    syn["resources"] = {"gpus": gpus, "cpu": "100m", "memory": memory}
    if node_selector:
        syn["nodeSelector"] = node_selector
    return obj


def progressing(cp: Any, name: str, namespace: str = NS) -> dict[str, Any]:
    return condition(kget_or_none(cp, "vr1", name, "-n", namespace) or {}, "Progressing") or {}


def run_events(cp: Any, name: str, namespace: str = NS) -> list[dict[str, Any]]:
    return items(
        cp,
        "events",
        "-n",
        namespace,
        "--field-selector",
        f"involvedObject.kind=VisionR1Run,involvedObject.name={name}",
    )


@pytest.fixture(scope="module")
def cp(control_plane: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    cp = control_plane
    ensure_crd(cp)
    create_namespace(cp, NS)
    folder = cp.make_pvc(NS, PVC, "1Gi")
    operator = OperatorProcess(
        cp.kubeconfig,
        [NS],
        tmp_path_factory.mktemp("operator") / "operator.log",
        extra_args=ALLOW,
    )
    operator.start()
    try:
        yield cp
    finally:
        cp.kubectl("delete", "vr1", "--all", "-n", NS, "--wait=false", check=False)
        operator.stop()
        cp.kubectl("delete", "namespace", NS, "--wait=false", check=False)
        cp.kubectl("delete", "pv", f"pv-{NS}-{PVC}", "--wait=false", check=False)
        shutil.rmtree(folder, ignore_errors=True)


def test_a_gpu_quota_refusal_is_named_then_cleared_when_pods_are_created(cp: Any) -> None:
    quota = {
        "apiVersion": "v1",
        "kind": "ResourceQuota",
        "metadata": {"name": "gpu", "namespace": NS},
        "spec": {"hard": {"requests.nvidia.com/gpu": "1"}},
    }
    apply(cp, quota)
    wait_for(
        lambda: (kget(cp, "resourcequota", "gpu", "-n", NS).get("status") or {}).get("hard"),
        30,
        "the quota controller to fill the quota's status",
    )
    apply(cp, run_manifest("quota", gpus=2, node_selector=NEVER))
    cond = wait_for(
        lambda: (c := progressing(cp, "quota")).get("reason") == "QuotaExceeded" and c,
        60,
        "the run to name the quota refusal",
    )
    message = cond["message"]
    assert "ResourceQuota gpu" in message, message
    assert "requested requests.nvidia.com/gpu=2" in message, message
    assert "limited requests.nvidia.com/gpu=1" in message, message
    assert "spec.stages.synthesis.resources.gpus" in message, message
    job = kget(cp, "job", "quota-synthesis-0", "-n", NS)
    assert not items(cp, "pods", "-n", NS, "-l", "batch.kubernetes.io/job-name=quota-synthesis-0")
    assert (job.get("status") or {}).get("active", 0) == 0
    warnings = [e for e in run_events(cp, "quota") if e.get("reason") == "QuotaExceeded"]
    assert warnings and warnings[0]["type"] == "Warning", run_events(cp, "quota")
    # The quota raised: the Job controller's next try creates the pod, and the refusal goes.
    cp.kubectl(
        "patch", "resourcequota", "gpu", "-n", NS, "--type=merge",
        "-p", json.dumps({"spec": {"hard": {"requests.nvidia.com/gpu": "4"}}}),
    )  # fmt: skip
    wait_for(
        lambda: items(cp, "pods", "-n", NS, "-l", "batch.kubernetes.io/job-name=quota-synthesis-0"),
        150,
        "the Job controller to create the pod under the raised quota",
    )
    cleared = wait_for(
        lambda: (c := progressing(cp, "quota")).get("reason") not in (None, "QuotaExceeded") and c,
        30,
        "the quota refusal to be cleared",
    )
    assert "ResourceQuota" not in cleared["message"], cleared


def test_a_failed_run_deletes_its_job_and_pods(cp: Any) -> None:
    apply(cp, run_manifest("stopme", node_selector=NEVER))
    selector = "batch.kubernetes.io/job-name=stopme-synthesis-0"
    wait_for(lambda: items(cp, "pods", "-n", NS, "-l", selector), 60, "the stage's pod")
    # An edit the operator refuses (a cluster run needs a PVC): the run fails ...
    cp.kubectl(
        "patch", "vr1", "stopme", "-n", NS, "--type=merge",
        "-p", json.dumps({"spec": {"storage": {"pvc": None, "localDir": ".visionr1/stopme"}}}),
    )  # fmt: skip
    edited = time.monotonic()
    failed = wait_for(
        lambda: (
            (c := condition(kget(cp, "vr1", "stopme", "-n", NS), "Failed") or {}).get("status")
            == "True"
            and c
        ),
        30,
        "the run to fail on its invalid spec",
    )
    assert failed["reason"] == "InvalidSpec" and "spec.storage.pvc" in failed["message"]
    # ... and its live Job and pods go within seconds (not when the run is deleted).
    wait_for(
        lambda: (
            kget_or_none(cp, "job", "stopme-synthesis-0", "-n", NS) is None
            and not items(cp, "pods", "-n", NS, "-l", selector)
        ),
        20,
        "the failed run's Job and pods to be gone",
    )
    gone_after = time.monotonic() - edited
    assert gone_after < 20
    stage = kget(cp, "vr1", "stopme", "-n", NS)["status"]["stages"]["synthesis"]
    assert stage["phase"] == "Failed", stage


def churn_nodes(cp: Any, stop: threading.Event, made: list[str]) -> None:
    """Add a Node object every few seconds, big enough for the pod (so the scheduler's queueing
    hints retry it) but tainted (so it is not bound there): each retry writes a new message
    ("0/N nodes are available: ...") with the same reason. No kubelet runs these Nodes."""
    while not stop.wait(5):
        name = f"vr1-churn-{SUFFIX}-{len(made)}"
        room = {"cpu": "1000", "memory": "128Ti", "pods": "110"}
        node = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": name, "labels": {"visionr1.io/churn": SUFFIX}},
            "spec": {"taints": [{"key": "visionr1.io/churn", "effect": "NoSchedule"}]},
            "status": {"capacity": room, "allocatable": room},
        }
        cp.kubectl("create", "-f", "-", input=yaml.safe_dump(node))
        made.append(name)


def record_modified(stream: Any, out: list[tuple[float, Any]], until: float) -> None:
    for event in stream:
        if event["type"] == "MODIFIED":
            out.append((time.monotonic(), event["object"]))
        if time.monotonic() > until:
            break


def test_a_pending_run_writes_its_status_at_most_twice_a_minute(
    cp: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """A pod that cannot be scheduled (more memory than the node has) while the scheduler's
    message keeps changing (Nodes come): the run says so once, then stays quiet. Prints the
    measured figures as JSON."""
    from kubernetes import client, watch

    apply(cp, run_manifest("pending", memory="64Ti"))
    cond = wait_for(
        lambda: (c := progressing(cp, "pending")).get("reason") == "Unschedulable" and c,
        60,
        "the run to say its pod cannot be scheduled",
    )
    assert "Insufficient memory" in cond["message"], cond
    api = cp.api_client()
    runs, core = client.CustomObjectsApi(api), client.CoreV1Api(api)
    start = runs.get_namespaced_custom_object(
        "visionr1.io", "v1alpha1", NS, "visionr1runs", "pending"
    )
    (pod,) = items(cp, "pods", "-n", NS, "-l", "batch.kubernetes.io/job-name=pending-synthesis-0")
    window = 60.0
    began = time.monotonic()
    pod_seen: list[tuple[float, Any]] = []
    run_seen: list[tuple[float, Any]] = []
    pod_stream = watch.Watch().stream(
        core.list_namespaced_pod,
        NS,
        field_selector=f"metadata.name={pod['metadata']['name']}",
        resource_version=pod["metadata"]["resourceVersion"],
        timeout_seconds=int(window) + 5,
    )
    run_stream = watch.Watch().stream(
        runs.list_namespaced_custom_object,
        "visionr1.io",
        "v1alpha1",
        NS,
        "visionr1runs",
        field_selector="metadata.name=pending",
        resource_version=start["metadata"]["resourceVersion"],
        timeout_seconds=int(window) + 30,
    )
    watches = [
        threading.Thread(target=record_modified, args=(pod_stream, pod_seen, began + window)),
        threading.Thread(target=record_modified, args=(run_stream, run_seen, began + window + 20)),
    ]
    stop, made = threading.Event(), []
    churn = threading.Thread(target=churn_nodes, args=(cp, stop, made))
    for t in [*watches, churn]:
        t.start()

    def measured(obj: Any) -> bool:
        return bool((obj["metadata"].get("labels") or {}).get("visionr1.io/measured"))

    try:
        time.sleep(window)
        stop.set()
        churn.join()
        # A write of our own after the window: the run's watch delivers (so 0 means 0).
        cp.kubectl("label", "vr1", "pending", "-n", NS, f"visionr1.io/measured={SUFFIX}")
        wait_for(
            lambda: any(measured(o) for _, o in run_seen), 20, "the run's watch to see our label"
        )
    finally:
        stop.set()
        cp.kubectl(
            "delete", "node", "-l", f"visionr1.io/churn={SUFFIX}", "--wait=false", check=False
        )
        for t in watches:
            t.join(timeout=60)
    messages: list[str] = []
    for _, obj in pod_seen:
        for c in obj.status.conditions or []:
            if c.type == "PodScheduled" and c.message and messages[-1:] != [c.message]:
                messages.append(c.message)
    writes = [o for t, o in run_seen if t <= began + window and not measured(o)]
    warnings = [e for e in run_events(cp, "pending") if e.get("reason") == "Unschedulable"]
    figure = {
        "window_s": window,
        "nodes_added": len(made),
        "scheduler_messages_per_minute": len(messages) * 60 / window,
        "status_writes_per_pending_run_per_minute": len(writes) * 60 / window,
        "unschedulable_warning_events": sum(int(e.get("count") or 1) for e in warnings),
    }
    with capsys.disabled():
        print(f"\n{json.dumps(figure)}")
    assert len(messages) >= 3, f"the scheduler's message did not change: {figure} {messages}"
    assert figure["status_writes_per_pending_run_per_minute"] <= 2, figure
    assert figure["unschedulable_warning_events"] == 1, figure


@pytest.fixture
def restricted(cp: Any, tmp_path: Path) -> Iterator[str]:
    """A namespace enforcing Pod Security restricted, watched by an operator logged in as a
    ServiceAccount with only the operator's namespaced Role there: it cannot read the
    namespace's labels (cluster-scoped), so it cannot know the level before creating pods."""
    create_namespace(cp, NS_PS)
    cp.kubectl(
        "label", "namespace", NS_PS, "pod-security.kubernetes.io/enforce=restricted", "--overwrite"
    )
    folder = cp.make_pvc(NS_PS, PVC, "1Gi")
    role = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": {"name": "vr1-operator", "namespace": NS_PS},
        "rules": as_policy_rules(),
    }
    binding = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": {"name": "vr1-operator", "namespace": NS_PS},
        "roleRef": {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "Role",
            "name": "vr1-operator",
        },
        "subjects": [{"kind": "ServiceAccount", "name": "vr1-operator", "namespace": NS_PS}],
    }
    sa = {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": {"name": "vr1-operator", "namespace": NS_PS},
    }
    apply(cp, [sa, role, binding])
    operator = OperatorProcess(
        cp.token_kubeconfig(NS_PS, "vr1-operator"),
        [NS_PS],
        tmp_path / "operator.log",
        extra_args=ALLOW,
    )
    operator.start()
    try:
        yield NS_PS
    finally:
        cp.kubectl("delete", "vr1", "--all", "-n", NS_PS, "--wait=false", check=False)
        operator.stop()
        cp.kubectl("delete", "namespace", NS_PS, "--wait=false", check=False)
        cp.kubectl("delete", "pv", f"pv-{NS_PS}-{PVC}", "--wait=false", check=False)
        shutil.rmtree(folder, ignore_errors=True)


def test_a_pod_security_refusal_names_the_violated_rule(cp: Any, restricted: str) -> None:
    # workspaceInit Auto: without the namespace's label, the root init container is used
    apply(cp, run_manifest("rooted", restricted, node_selector=NEVER))
    cond = wait_for(
        lambda: (c := progressing(cp, "rooted", restricted)).get("reason") == "PodSecurity" and c,
        60,
        "the run to name the Pod Security refusal",
    )
    message = cond["message"]
    assert "restricted" in message and "workspace-init" in message, message
    assert "runAsNonRoot != true" in message or "runAsUser=0" in message, message
    assert "spec.storage.workspaceInit" in message, message
    assert not items(
        cp, "pods", "-n", restricted, "-l", "batch.kubernetes.io/job-name=rooted-synthesis-0"
    )
    reasons = [e.get("reason") for e in run_events(cp, "rooted", restricted)]
    assert "PodSecurity" in reasons, reasons
