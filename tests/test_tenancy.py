"""Tenants kept apart, deny by default: what a run may ask for on a shared cluster.

The cluster's lists (images, service accounts, priority classes, node selectors, tolerations,
tracking URIs) admit only the defaults unless the chart adds to them; a stage's env reads only the
Secrets the run lists and sets no loader variable; system namespaces are never reconciled. Each
refusal is checked where it happens: the pydantic models (``visionr1 validate``), the CRD's CEL
rules (the API server, through crd_tools), the operator's policy, the operator's CLI and the
chart's rendered arguments parsed by that CLI.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from visionr1_operator.api import VisionR1Run
from visionr1_operator.manifests import job
from visionr1_operator.policy import (
    DEFAULT_TRAINER_IMAGE,
    ClusterPolicy,
    namespace_problem,
    policy_problems,
)
from visionr1_operator.validate import validate_object

from crd_tools import api_server_errors

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "tiny-cpu.yaml"
BUNDLED = "http://vr1-visionr1-operator-mlflow.visionr1-system.svc:5000"


def manifest(**spec: Any) -> dict[str, Any]:
    obj = yaml.safe_load(EXAMPLE.read_text())
    obj["metadata"]["namespace"] = "team-a"
    obj["spec"]["storage"] = {"pvc": "data"}
    obj["spec"].update(spec)
    return obj


def run_of(obj: dict[str, Any]) -> VisionR1Run:
    run = VisionR1Run.model_validate(obj)
    run.metadata.namespace = obj["metadata"]["namespace"]
    return run


# ------------------------------------------------------------------------- the cluster's lists


def test_the_default_run_passes_the_default_policy() -> None:
    run = run_of(manifest())
    assert run.spec.images.trainer == DEFAULT_TRAINER_IMAGE
    assert policy_problems(run, ClusterPolicy(), BUNDLED) == []


@pytest.mark.parametrize(
    ("spec", "field", "allowing"),
    [
        (
            {"images": {"trainer": "docker.io/someone/miner:1"}},
            "spec.images.trainer",
            ClusterPolicy(allowed_images=("docker.io/someone/*",)),
        ),
        (
            {"serviceAccountName": "ci-deployer"},
            "spec.serviceAccountName",
            ClusterPolicy(allowed_service_accounts=("default", "ci-deployer")),
        ),
        (
            {"priorityClassName": "system-cluster-critical"},
            "spec.priorityClassName",
            ClusterPolicy(allowed_priority_classes=("system-cluster-critical",)),
        ),
        (
            {"mlflow": {"trackingUri": "https://collector.example.net"}},
            "spec.mlflow.trackingUri",
            ClusterPolicy(allowed_tracking_uris=("https://collector.example.net",)),
        ),
    ],
)
def test_run_level_fields_are_denied_by_default_and_allowed_when_listed(
    spec: dict[str, Any], field: str, allowing: ClusterPolicy
) -> None:
    run = run_of(manifest(**spec))
    [problem] = policy_problems(run, ClusterPolicy(), BUNDLED)
    assert problem.startswith(f"{field}: ")
    assert "not allowed" in problem and "ask the cluster admin" in problem
    assert policy_problems(run, allowing, BUNDLED) == []


def test_stage_images_placement_and_tolerations_are_checked_per_stage() -> None:
    obj = manifest()
    sft = obj["spec"]["stages"]["sft"]
    sft["image"] = "ghcr.io/visionr1/trainer:0.2.0"
    sft["nodeSelector"] = {"nvidia.com/gpu.product": "H100", "team": "b"}
    sft["tolerations"] = [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
        {"operator": "Exists"},  # no key: tolerates every taint, the control plane's too
    ]
    run = run_of(obj)
    problems = policy_problems(run, ClusterPolicy(), BUNDLED)
    assert [p.split(":")[0] for p in problems] == [
        "spec.stages.sft.image",
        "spec.stages.sft.nodeSelector",
        "spec.stages.sft.nodeSelector",
        "spec.stages.sft.tolerations[0]",
        "spec.stages.sft.tolerations[1]",
    ]
    assert "'team=b'" in problems[2] and "operator.allowedNodeSelectors" in problems[2]
    assert "tolerates every taint" in problems[4]
    gpu_pool = ClusterPolicy(
        allowed_images=("ghcr.io/visionr1/trainer:*",),
        allowed_node_selectors=("nvidia.com/gpu.product=*",),
        allowed_tolerations=("nvidia.com/gpu",),
    )
    left = policy_problems(run, gpu_pool, BUNDLED)
    assert [p.split(":")[0] for p in left] == [
        "spec.stages.sft.nodeSelector",
        "spec.stages.sft.tolerations[1]",
    ]
    assert "'team=b'" in left[0]
    # A disabled stage asks for nothing.
    obj["spec"]["stages"]["sft"]["enabled"] = False
    obj["spec"]["stages"]["grpo"]["from"] = {"baseModel": True}
    assert policy_problems(run_of(obj), gpu_pool, BUNDLED) == []


def test_only_the_operators_own_tracking_uri_by_default() -> None:
    run = run_of(manifest(mlflow={"trackingUri": BUNDLED}))
    assert policy_problems(run, ClusterPolicy(), BUNDLED) == []
    [problem] = policy_problems(run, ClusterPolicy(), None)  # an operator with no server
    assert problem.startswith("spec.mlflow.trackingUri") and "allowed on this cluster: none" in (
        problem
    )


@pytest.mark.parametrize("namespace", ["kube-system", "kube-public", "kube-node-lease", "vr1-op"])
def test_system_namespaces_and_the_operators_own_are_refused(namespace: str) -> None:
    policy = ClusterPolicy(reserved_namespaces=("vr1-op",))
    obj = manifest()
    obj["metadata"]["namespace"] = namespace
    problems = policy_problems(run_of(obj), policy, BUNDLED)
    assert problems[0].startswith("metadata.namespace: ") and "tenant namespace" in problems[0]
    assert namespace_problem("team-a", policy) is None


# --------------------------------------------------------------------------------- the env


@pytest.mark.parametrize(
    "name",
    ["LD_PRELOAD", "LD_LIBRARY_PATH", "LD_AUDIT", "PYTHONPATH", "PYTHONSTARTUP", "PYTHONHOME",
     "BASH_ENV", "MLFLOW_TRACKING_URI"],
)  # fmt: skip
def test_loader_variables_are_refused_by_validate_and_the_api_server(name: str) -> None:
    obj = manifest()
    obj["spec"]["stages"]["grpo"]["env"] = [{"name": "OK_VAR", "value": "1"}]
    assert validate_object(obj) == [] and api_server_errors(obj) == []
    obj["spec"]["stages"]["grpo"]["env"].append({"name": name, "value": "/tmp/x"})
    [problem] = validate_object(obj)
    assert problem.path == "spec.stages.grpo.env[1].name"
    assert name in problem.message and (
        "remove it" in problem.message or "instead" in problem.message
    )
    [refused] = api_server_errors(obj)
    assert refused.startswith("spec.stages.grpo.env[1]") and "may not be set in env" in refused


def test_env_reads_only_the_secrets_the_run_lists() -> None:
    obj = manifest()
    ref = {"name": "API_KEY", "valueFrom": {"secretKeyRef": {"name": "deepseek", "key": "k"}}}
    obj["spec"]["stages"]["synthesis"]["env"] = [ref]
    [problem] = validate_object(obj)
    assert "stages.synthesis.env[0] (API_KEY) reads Secret 'deepseek'" in problem.message
    assert "add 'deepseek' to spec.secrets" in problem.message
    [refused] = api_server_errors(obj)
    assert "stages.synthesis.env reads a Secret not listed in spec.secrets" in refused
    listed = copy.deepcopy(obj)
    listed["spec"]["secrets"] = ["deepseek"]
    assert validate_object(listed) == [] and api_server_errors(listed) == []
    # Another Secret than the listed one is still refused; a ConfigMap needs no listing.
    listed["spec"]["stages"]["eval"]["env"] = [
        {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "ops-admin", "key": "token"}}},
        {"name": "CFG", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "a"}}},
    ]
    [problem] = validate_object(listed)
    assert "'ops-admin'" in problem.message
    assert len(api_server_errors(listed)) == 1


def test_stage_pods_of_the_default_account_get_no_api_token() -> None:
    run = run_of(manifest())
    pod = job(run, "sft", 0)["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False and "serviceAccountName" not in pod
    run = run_of(manifest(serviceAccountName="trainer"))
    pod = job(run, "sft", 0)["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "trainer" and "automountServiceAccountToken" not in pod


# ------------------------------------------------------------------------ the operator's CLI


def _parse(argv: list[str]) -> Any:
    from visionr1_operator.cli import build_parser

    return build_parser().parse_args(["operator", *argv])


def test_cli_policy_is_deny_by_default_and_takes_flags_then_env(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from visionr1_operator.main import policy_from

    for var in ("VISIONR1_ALLOWED_IMAGES", "VISIONR1_ALLOWED_TOLERATIONS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("VISIONR1_OPERATOR_NAMESPACE", "vr1-op")
    policy = policy_from(_parse(["-A"]))
    assert policy.allowed_images == (DEFAULT_TRAINER_IMAGE,)
    assert policy.allowed_service_accounts == ("default",)
    assert policy.allowed_priority_classes == policy.allowed_tolerations == ()
    assert policy.reserved_namespaces == ("vr1-op",)
    monkeypatch.setenv("VISIONR1_ALLOWED_TOLERATIONS", "nvidia.com/gpu, dedicated")
    flags = ["-A", "--allowed-image=reg/a:*", "--allowed-image=reg/b:1"]
    policy = policy_from(_parse(flags))
    assert policy.allowed_images == ("reg/a:*", "reg/b:1")
    assert policy.allowed_tolerations == ("nvidia.com/gpu", "dedicated")


@pytest.mark.parametrize("namespace", ["kube-system", "vr1-op"])
def test_the_operator_will_not_watch_a_system_namespace(
    namespace: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from visionr1_operator.main import main

    monkeypatch.setenv("VISIONR1_OPERATOR_NAMESPACE", "vr1-op")
    assert main(_parse(["-n", "team-a", "-n", namespace])) == 2
    err = capsys.readouterr().err
    assert f"--namespace {namespace}" in err and "tenant namespaces" in err


# --------------------------------------------------------------------------- the reconcile


class PatchingKube:
    """Records status patches and creates; creates nothing else."""

    def __init__(self) -> None:
        self.patches: list[dict[str, Any]] = []
        self.created: list[dict[str, Any]] = []

    async def patch(self, api_version: str, plural: str, ns: str, name: str, body: Any, **_: Any):
        self.patches.append(body)

    async def create(self, obj: dict[str, Any]) -> None:
        self.created.append(obj)

    async def namespace(self, name: str) -> dict[str, Any]:
        return {"metadata": {"name": name, "labels": {}}}


@pytest.mark.parametrize(
    ("namespace", "spec", "field"),
    [
        ("kube-system", {}, "metadata.namespace"),
        ("team-a", {"priorityClassName": "system-node-critical"}, "spec.priorityClassName"),
    ],
)
async def test_a_refused_run_fails_not_allowed_naming_the_field_and_creates_nothing(
    namespace: str, spec: dict[str, Any], field: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import kopf

    from visionr1_operator.handlers import NOT_ALLOWED, OperatorConfig, Reconciler

    events: list[tuple[str, str, str]] = []
    monkeypatch.setattr(
        kopf, "event", lambda obj, type, reason, message: events.append((type, reason, message))
    )
    obj = manifest(**spec)
    obj["metadata"].update(namespace=namespace, uid="u1", generation=1)
    rec = Reconciler(OperatorConfig(mlflow_uri=BUNDLED))
    kube = PatchingKube()
    rec.kube = kube  # type: ignore[assignment]
    await rec._reconcile(namespace, obj["metadata"]["name"], obj)
    assert kube.created == []
    [patch] = kube.patches
    status = patch["status"]
    assert status["phase"] == "Failed"
    [failed] = [c for c in status["conditions"] if c["type"] == "Failed"]
    assert failed["reason"] == NOT_ALLOWED and failed["message"].startswith(f"{field}: ")
    assert any(reason == NOT_ALLOWED and field in message for _, reason, message in events)
