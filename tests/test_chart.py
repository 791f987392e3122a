"""The Helm chart: rendered with Helm's own engine (helm-python-sdk), linted strictly, every object
checked against the real Kubernetes schemas, the values schema, the CRD copy, RBAC, and checkov.

Value sets cover what platform teams install: the defaults (cluster-wide, sqlite MLflow on a PVC),
namespaced RBAC, MLflow on PostgreSQL with S3 artifacts, custom images by digest with node
placement, and an external MLflow without the CRD.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import helm_python as helm
import pytest
import yaml
from kubernetes_validate.utils import latest_version
from kubernetes_validate.utils import validate as k8s_validate

from visionr1_operator import chart_crd
from visionr1_operator.crd import crd

from repo_paths import REPO

CHART = REPO / "charts" / "visionr1-operator"
README = CHART / "README.md"
RELEASE = "vr1"
NAMESPACE = "visionr1-system"
# The chart's kubeVersion floor and the newest schemas kubernetes-validate ships.
K8S_VERSIONS = ("1.31.0", latest_version())
DIGEST = "sha256:" + "0123456789abcdef" * 4

VALUE_SETS: dict[str, dict[str, Any]] = {
    "default": {},
    "namespaced-rbac": {
        "watchNamespaces": ["ml-team-a", "ml-team-b"],
        "networkPolicy": {
            "mlflowFrom": [{"namespaceSelector": {"matchLabels": {"visionr1.io/ml": "true"}}}]
        },
    },
    "mlflow-postgresql": {
        "mlflow": {
            "backendStore": {
                "type": "postgresql",
                "postgresql": {"existingSecret": "mlflow-db", "uriKey": "connection"},
            },
            "artifacts": {
                "destination": "s3://ml-artifacts/visionr1",
                "s3": {"existingSecret": "mlflow-s3", "endpointUrl": "https://minio.example:9000"},
            },
            "persistence": {"enabled": False},
        }
    },
    "custom-images-placement": {
        "image": {
            "repository": "registry.example.com/ml/visionr1-operator",
            "digest": DIGEST,
            "pullPolicy": "Always",
        },
        "imagePullSecrets": ["regcred"],
        "operator": {
            "nodeSelector": {"node-role.kubernetes.io/control": "true"},
            "tolerations": [
                {
                    "key": "dedicated",
                    "operator": "Equal",
                    "value": "control",
                    "effect": "NoSchedule",
                }
            ],
            "affinity": {
                "nodeAffinity": {
                    "requiredDuringSchedulingIgnoredDuringExecution": {
                        "nodeSelectorTerms": [
                            {
                                "matchExpressions": [
                                    {
                                        "key": "kubernetes.io/arch",
                                        "operator": "In",
                                        "values": ["amd64"],
                                    }
                                ]
                            }
                        ]
                    }
                }
            },
            "priorityClassName": "system-cluster-critical",
        },
        "mlflow": {
            "image": {
                "repository": "registry.example.com/ml/mlflow",
                "digest": DIGEST,
                "pullPolicy": "Always",
            },
            "nodeSelector": {"pool": "services"},
            "tolerations": [{"key": "pool", "operator": "Exists", "effect": "NoSchedule"}],
            "persistence": {"storageClassName": "fast-ssd", "size": "50Gi"},
            "postgresql": {
                "image": {
                    "repository": "registry.example.com/ml/postgres",
                    "digest": DIGEST,
                    "pullPolicy": "Always",
                }
            },
        },
    },
    "external-mlflow-no-crd": {
        "crds": {"install": False},
        "serviceAccount": {"create": False, "name": "visionr1-operator"},
        "mlflow": {"enabled": False},
        "operator": {"mlflowTrackingUri": "https://mlflow.example.com"},
    },
}


# ---------------------------------------------------------------------------------- rendering


class _StrictLoader(yaml.SafeLoader):
    """YAML that refuses duplicate keys (the API server's decoder does too)."""


def _no_duplicates(loader: _StrictLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _no_duplicates)


def render(values: dict[str, Any]) -> dict[str, str]:
    with helm.Chart.load(str(CHART)) as chart:
        return chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)


def documents(rendered: dict[str, str]) -> list[dict[str, Any]]:
    docs = []
    for path, text in sorted(rendered.items()):
        if not path.endswith(".yaml"):
            continue
        for doc in yaml.load_all(text, Loader=_StrictLoader):
            if doc:
                docs.append(doc)
    return docs


@pytest.fixture(scope="module")
def rendered() -> dict[str, dict[str, str]]:
    return {name: render(values) for name, values in VALUE_SETS.items()}


@pytest.fixture(scope="module")
def docs(rendered: dict[str, dict[str, str]]) -> dict[str, list[dict[str, Any]]]:
    return {name: documents(out) for name, out in rendered.items()}


def find(docs: list[dict[str, Any]], kind: str, component: str | None = None) -> list[dict]:
    return [
        d
        for d in docs
        if d["kind"] == kind
        and (
            component is None
            or d["metadata"].get("labels", {}).get("app.kubernetes.io/component") == component
        )
    ]


def one(docs: list[dict[str, Any]], kind: str, component: str | None = None) -> dict[str, Any]:
    found = find(docs, kind, component)
    assert len(found) == 1, f"expected one {kind} ({component}), got {len(found)}"
    return found[0]


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    (ctr,) = deployment["spec"]["template"]["spec"]["containers"]
    return ctr


def env_of(ctr: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in ctr.get("env", [])}


# ------------------------------------------------------------------ schemas, lint, value schema


@pytest.mark.parametrize("name", VALUE_SETS)
def test_every_rendered_object_passes_strict_kubernetes_validation(
    name: str, docs: dict[str, list[dict[str, Any]]]
) -> None:
    assert docs[name], "nothing rendered"
    for doc in docs[name]:
        for version in K8S_VERSIONS:
            # Raises on a schema error, and on a kind it has no schema for.
            k8s_validate(doc, version, strict=True)
        if doc["kind"] not in ("ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition"):
            assert doc["metadata"]["namespace"], f"{doc['kind']} without a namespace"


@pytest.mark.parametrize("name", VALUE_SETS)
def test_chart_lints_strictly(name: str) -> None:
    for kube_version in (None, "v1.31.0"):
        report = helm.lint(
            str(CHART),
            VALUE_SETS[name],
            strict=True,
            namespace=NAMESPACE,
            kube_version=kube_version,
        )
        problems = [m for m in report["messages"] if m["severity"] >= 2]
        assert report["errors"] == [] and problems == [], (report["errors"], problems)


@pytest.mark.parametrize(
    ("values", "complaint"),
    [
        ({"image": {"pullPolicy": "Sometimes"}}, "/image/pullPolicy"),
        ({"image": {"digest": "sha256:short"}}, "/image/digest"),
        ({"watchNamespaces": ["Team_A"]}, "/watchNamespaces/0"),
        ({"watchNamespaces": ["a", "a"]}, "/watchNamespaces"),
        ({"replicaCount": 2}, "replicaCount"),
        ({"operator": {"healthPort": 80}}, "/operator/healthPort"),
        ({"operator": {"retryBackoffSeconds": 0}}, "/operator/retryBackoffSeconds"),
        ({"operator": {"podSecurityContext": {"runAsNonRoot": False}}}, "runAsNonRoot"),
        (
            {"operator": {"securityContext": {"allowPrivilegeEscalation": True}}},
            "allowPrivilegeEscalation",
        ),
        (
            {"operator": {"securityContext": {"capabilities": {"drop": ["NET_RAW"]}}}},
            "/operator/securityContext/capabilities/drop",
        ),
        ({"operator": {"resources": {"limits": {"memory": "lots"}}}}, "/operator/resources"),
        ({"mlflow": {"backendStore": {"type": "mysql"}}}, "/mlflow/backendStore/type"),
        ({"mlflow": {"auth": {"defaultPermission": "ALL"}}}, "/mlflow/auth/defaultPermission"),
        ({"mlflow": {"postgresql": {"database": "mlflow; drop"}}}, "/mlflow/postgresql/database"),
        ({"mlflow": {"persistence": {"enabled": False}}}, "/mlflow/persistence/enabled"),
        (
            {
                "mlflow": {
                    "backendStore": {"type": "postgresql", "postgresql": {"existingSecret": "db"}},
                    "persistence": {"enabled": False},
                }
            },
            "/mlflow/persistence/enabled",
        ),
        (
            {"mlflow": {"artifacts": {"destination": "gs://bucket"}}},
            "/mlflow/artifacts/destination",
        ),
        ({"mlflow": {"workers": 0}}, "/mlflow/workers"),
        ({"crds": {"install": "yes"}}, "/crds/install"),
    ],
)
def test_values_schema_refuses_bad_values(values: dict[str, Any], complaint: str) -> None:
    with helm.Chart.load(str(CHART)) as chart:
        with pytest.raises(helm.HelmValuesError) as err:
            chart.validate_schema(values)
        # Rendering (what `helm install` does) refuses them too.
        with pytest.raises(helm.HelmValuesError):
            chart.render(values, name=RELEASE, namespace=NAMESPACE)
    assert complaint in str(err.value)


def test_values_schema_accepts_every_value_set() -> None:
    with helm.Chart.load(str(CHART)) as chart:
        for values in VALUE_SETS.values():
            chart.validate_schema(values)


# ----------------------------------------------------------------------------------------- CRD


def test_chart_crd_is_the_generated_crd(docs: dict[str, list[dict[str, Any]]]) -> None:
    chart_copy = copy.deepcopy(run_crd(docs["default"]))
    meta = chart_copy["metadata"]
    assert meta.pop("annotations") == {"helm.sh/resource-policy": "keep"}
    assert meta.pop("labels")["app.kubernetes.io/part-of"] == "visionr1"
    printed = subprocess.run(
        [sys.executable, "-m", "visionr1_operator.cli", "crd"],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
    ).stdout
    assert chart_copy == yaml.safe_load(printed) == crd()
    committed = yaml.safe_load((REPO / "crds" / "visionr1run.yaml").read_text())
    assert chart_copy == committed, "crds/visionr1run.yaml is stale: run `make crd`"


def test_chart_crd_template_is_up_to_date() -> None:
    assert chart_crd.main(["--check", "--chart", str(CHART)]) == 0, "run `make crd`"


def test_chart_crd_generator_detects_and_repairs_drift(tmp_path: Path) -> None:
    chart = tmp_path / "chart"
    shutil.copytree(CHART, chart)
    template = chart / chart_crd.TEMPLATE
    template.write_text(template.read_text().replace("maxItems: 32", "maxItems: 33"))
    assert chart_crd.main(["--check", "--chart", str(chart)]) == 1
    assert chart_crd.main(["--chart", str(chart)]) == 0
    assert chart_crd.main(["--check", "--chart", str(chart)]) == 0
    assert template.read_text() == (CHART / chart_crd.TEMPLATE).read_text()


def test_chart_crd_generator_names_a_missing_chart(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert chart_crd.main(["--chart", str(tmp_path)]) == 2
    assert "no Chart.yaml" in capsys.readouterr().err


def run_crd(docs: list[dict[str, Any]]) -> dict[str, Any]:
    """The VisionR1Run CRD among the rendered CRDs (kopf's peering CRDs come with standby
    replicas, the default)."""
    (crd,) = [
        d
        for d in find(docs, "CustomResourceDefinition")
        if d["metadata"]["name"] == "visionr1runs.visionr1.io"
    ]
    return crd


def test_crd_install_and_keep_toggles() -> None:
    no_keep = documents(render({"crds": {"keep": False}}))
    assert "annotations" not in run_crd(no_keep)["metadata"]
    assert find(documents(render({"crds": {"install": False}})), "CustomResourceDefinition") == []


# ---------------------------------------------------------------------------------------- RBAC

Permission = tuple[str, str, str]  # (apiGroup, resource, verb)


def permissions(role: dict[str, Any]) -> set[Permission]:
    return {
        (group, resource, verb)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


def operator_permissions(rules: str = "RULES") -> set[Permission]:
    """What the operator code declares it uses (operator/visionr1_operator/rbac.py): the
    namespaced ``RULES`` (and ``CREDENTIAL_RULES``), or the cluster-scoped ``NAMESPACE_RULES``."""
    rbac = pytest.importorskip(
        "visionr1_operator.rbac",
        reason="operator/visionr1_operator/rbac.py (RULES) not written yet",
    )
    return {
        (group, resource, verb) for group, resource, verbs in getattr(rbac, rules) for verb in verbs
    }


NAMESPACES_SUFFIX = "-namespaces"  # the ClusterRole (and binding) for the namespaces' labels


def split_cluster_rbac(docs: list[dict[str, Any]], kind: str) -> tuple[list[dict], dict]:
    """(the operator's own objects of ``kind``, the one for reading namespaces)."""
    found = find(docs, kind)
    ns = [d for d in found if d["metadata"]["name"].endswith(NAMESPACES_SUFFIX)]
    assert len(ns) == 1, f"expected one {kind} *{NAMESPACES_SUFFIX}, got {len(ns)}"
    return [d for d in found if d is not ns[0]], ns[0]


def check_namespace_reader(docs: list[dict[str, Any]], watched: list[str] | None) -> None:
    """get (never list or watch) of namespaces, only the watched ones by name when listed,
    bound to the operator's ServiceAccount: for their Pod Security labels."""
    _, role = split_cluster_rbac(docs, "ClusterRole")
    _, binding = split_cluster_rbac(docs, "ClusterRoleBinding")
    (rule,) = role["rules"]
    assert (
        permissions(role) == operator_permissions("NAMESPACE_RULES") == {("", "namespaces", "get")}
    )
    if watched:
        assert rule["resourceNames"] == watched
    else:
        assert "resourceNames" not in rule
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": role["metadata"]["name"],
    }
    assert binding["subjects"] == [
        {
            "kind": "ServiceAccount",
            "name": one(docs, "ServiceAccount")["metadata"]["name"],
            "namespace": NAMESPACE,
        }
    ]


def test_cluster_wide_rbac(docs: dict[str, list[dict[str, Any]]]) -> None:
    default = docs["default"]
    (role,), _ = split_cluster_rbac(default, "ClusterRole")
    (binding,), _ = split_cluster_rbac(default, "ClusterRoleBinding")
    sa = one(default, "ServiceAccount")
    assert find(default, "Role") == [] and find(default, "RoleBinding") == []
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": role["metadata"]["name"],
    }
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": sa["metadata"]["name"], "namespace": NAMESPACE}
    ]
    perms = permissions(role)
    # Least privilege: no wildcard, Secrets only by name (get: a run's MLflow credentials, never
    # list or watch), no RBAC objects, nothing cluster-scoped (the namespaces' labels: a
    # ClusterRole of its own, get only).
    assert not any("*" in p for perm in perms for p in perm)
    assert {v for _, r, v in perms if r == "secrets"} == {"get"}
    assert not {r for _, r, _ in perms} & {
        "roles",
        "rolebindings",
        "clusterroles",
        "customresourcedefinitions",
        "namespaces",
        "nodes",
    }
    check_namespace_reader(default, None)


def test_namespaced_rbac_grants_only_the_watched_namespaces(
    docs: dict[str, list[dict[str, Any]]],
) -> None:
    namespaced = docs["namespaced-rbac"]
    watched = VALUE_SETS["namespaced-rbac"]["watchNamespaces"]
    # cluster-wide only: get of the watched namespaces themselves, by name
    assert split_cluster_rbac(namespaced, "ClusterRole")[0] == []
    assert split_cluster_rbac(namespaced, "ClusterRoleBinding")[0] == []
    check_namespace_reader(namespaced, watched)
    roles = find(namespaced, "Role")
    bindings = find(namespaced, "RoleBinding")
    assert sorted(r["metadata"]["namespace"] for r in roles) == sorted(watched)
    assert sorted(b["metadata"]["namespace"] for b in bindings) == sorted(watched)
    # the same rules, with the peering objects of the standby replicas in each namespace
    used = operator_permissions() | operator_permissions("CREDENTIAL_RULES")
    for role in roles:
        assert permissions(role) == used | operator_permissions("PEERING_RULES")
    for binding in bindings:
        assert binding["roleRef"]["kind"] == "Role"
        (subject,) = binding["subjects"]
        assert (subject["name"], subject["namespace"]) == (
            one(namespaced, "ServiceAccount")["metadata"]["name"],
            NAMESPACE,
        )
    args = container(one(namespaced, "Deployment", "operator"))["args"]
    assert [a for a in args if a.startswith("--namespace")] == [
        f"--namespace={ns}" for ns in watched
    ]
    assert "--all-namespaces" not in args


def test_rbac_rules_equal_what_the_operator_uses(docs: dict[str, list[dict[str, Any]]]) -> None:
    used = operator_permissions() | operator_permissions("CREDENTIAL_RULES")
    # standby replicas (the default): the release's peering object, cluster-wide or per namespace
    cluster_role = split_cluster_rbac(docs["default"], "ClusterRole")[0][0]
    assert permissions(cluster_role) == used | operator_permissions("CLUSTER_PEERING_RULES")
    for role in find(docs["namespaced-rbac"], "Role"):
        assert permissions(role) == used | operator_permissions("PEERING_RULES")
    standalone = documents(render({"operator": {"replicas": 1}}))
    assert permissions(split_cluster_rbac(standalone, "ClusterRole")[0][0]) == used


def test_existing_service_account_is_bound_and_not_created(
    docs: dict[str, list[dict[str, Any]]],
) -> None:
    external = docs["external-mlflow-no-crd"]
    assert find(external, "ServiceAccount") == []
    for binding in find(external, "ClusterRoleBinding"):
        assert binding["subjects"][0]["name"] == "visionr1-operator"
    pod = one(external, "Deployment", "operator")["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "visionr1-operator"


# ------------------------------------------------------------------------ operator Deployment


@pytest.mark.parametrize("name", VALUE_SETS)
def test_operator_deployment_is_replicated_restricted_and_probed(
    name: str, docs: dict[str, list[dict[str, Any]]]
) -> None:
    deployment = one(docs[name], "Deployment", "operator")
    spec = deployment["spec"]
    # one active pod and one on standby; a rollout starts the new pod before the old one goes
    assert spec["replicas"] == 2 and spec["strategy"]["type"] == "RollingUpdate"
    assert spec["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}
    (pdb,) = find(docs[name], "PodDisruptionBudget")
    assert pdb["spec"]["maxUnavailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"] == spec["selector"]["matchLabels"]
    pod = spec["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    ctr = container(deployment)
    sc = ctr["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert {"requests", "limits"} <= set(ctr["resources"])
    # The read-only root filesystem gets a writable /tmp (HOME points there).
    tmp = next(m for m in ctr["volumeMounts"] if m["mountPath"] == "/tmp")
    volume = next(v for v in pod["volumes"] if v["name"] == tmp["name"])
    assert "emptyDir" in volume and env_of(ctr)["HOME"]["value"] == "/tmp"
    # The liveness probe asks exactly the endpoint kopf is told to serve.
    assert ctr["command"] == ["visionr1"] and ctr["args"][0] == "operator"
    liveness = urlsplit(next(a for a in ctr["args"] if a.startswith("--liveness="))[11:])
    probe = ctr["livenessProbe"]["httpGet"]
    port = next(p for p in ctr["ports"] if p["name"] == probe["port"])
    assert (probe["path"], port["containerPort"]) == (liveness.path, liveness.port)
    assert liveness.hostname == "0.0.0.0"


@pytest.mark.parametrize("name", VALUE_SETS)
def test_operator_args_parse_with_the_operator_cli(
    name: str, docs: dict[str, list[dict[str, Any]]]
) -> None:
    if importlib.util.find_spec("visionr1_operator.main") is None:
        pytest.skip("visionr1_operator.main (`visionr1 operator`) not written yet")
    from visionr1_operator.cli import build_parser

    ctr = container(one(docs[name], "Deployment", "operator"))
    args = build_parser().parse_args(ctr["args"])  # exits (SystemExit) on an unknown flag
    assert args.command == "operator"
    values = VALUE_SETS[name]
    assert args.namespaces == values.get("watchNamespaces", [])
    assert args.all_namespaces is not bool(values.get("watchNamespaces"))
    assert args.liveness == "http://0.0.0.0:8080/healthz"
    assert args.retry_backoff == 10.0
    if name == "external-mlflow-no-crd":
        assert args.mlflow_uri == "https://mlflow.example.com"


def test_operator_policy_is_the_charts_lists_and_denies_by_default(
    docs: dict[str, list[dict[str, Any]]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Deployment's arguments, parsed by the operator's CLI, make the policy the operator
    enforces: the chart's trainer image and `default` only, plus what the values list."""
    from visionr1_operator.api import VisionR1Run
    from visionr1_operator.cli import build_parser
    from visionr1_operator.main import policy_from
    from visionr1_operator.policy import policy_problems

    for var in list(os.environ):
        if var.startswith("VISIONR1_ALLOWED_"):
            monkeypatch.delenv(var)

    def policy_of(rendered: list[dict[str, Any]]) -> Any:
        deployment = one(rendered, "Deployment", "operator")
        ctr = container(deployment)
        env = env_of(ctr)["VISIONR1_OPERATOR_NAMESPACE"]
        assert env["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
        monkeypatch.setenv("VISIONR1_OPERATOR_NAMESPACE", deployment["metadata"]["namespace"])
        return policy_from(build_parser().parse_args(ctr["args"]))

    example = yaml.safe_load((REPO / "examples" / "qwen25vl-7b.yaml").read_text())
    run = VisionR1Run.model_validate(example)
    default = policy_of(docs["default"])
    assert default.reserved_namespaces == (NAMESPACE,)
    # the paper's example asks for GPU nodes: refused until the chart allows them
    fields = {p.split(":")[0] for p in policy_problems(run, default)}
    assert fields == {
        *(f"spec.stages.{s}.nodeSelector" for s in ("synthesis", "sft", "grpo")),
        *(f"spec.stages.{s}.tolerations[0]" for s in ("synthesis", "sft", "grpo")),
    }
    gpu_pool = documents(
        render(
            {
                "operator": {
                    "trainerImage": "registry.example.com/ml/trainer:7",
                    "allowedImages": ["ghcr.io/visionr1/*"],
                    "allowedNodeSelectors": ["nvidia.com/gpu.product=*"],
                    "allowedTolerations": ["nvidia.com/gpu"],
                    "allowedPriorityClasses": ["batch-low"],
                    "allowedServiceAccounts": ["trainer"],
                    "allowedTrackingUris": ["https://mlflow.example.com"],
                }
            }
        )
    )
    policy = policy_of(gpu_pool)
    assert policy_problems(run, policy) == []
    assert policy.allowed_images == ("registry.example.com/ml/trainer:7", "ghcr.io/visionr1/*")
    assert policy.allowed_service_accounts == ("default", "trainer")
    assert policy.allowed_priority_classes == ("batch-low",)
    assert policy.allowed_tracking_uris == ("https://mlflow.example.com",)


@pytest.mark.parametrize("namespace", ["kube-system", "kube-node-lease", NAMESPACE])
def test_watching_a_system_namespace_fails_the_install(namespace: str) -> None:
    with pytest.raises(Exception, match=f"watchNamespaces: {namespace} is a system namespace"):
        render({"watchNamespaces": ["team-a", namespace]})


def test_custom_images_and_node_placement(docs: dict[str, list[dict[str, Any]]]) -> None:
    values = VALUE_SETS["custom-images-placement"]
    custom = docs["custom-images-placement"]
    for component, key in (("operator", None), ("mlflow", "mlflow")):
        pod = one(custom, "Deployment", component)["spec"]["template"]["spec"]
        placement = values["operator"] if key is None else values["mlflow"]
        image = values["image"] if key is None else values["mlflow"]["image"]
        ctr = pod["containers"][0]
        assert ctr["image"] == f"{image['repository']}@{DIGEST}"
        assert ctr["imagePullPolicy"] == "Always"
        assert pod["imagePullSecrets"] == [{"name": "regcred"}]
        assert pod["nodeSelector"] == placement["nodeSelector"]
        assert pod["tolerations"] == placement["tolerations"]
    operator_pod = one(custom, "Deployment", "operator")["spec"]["template"]["spec"]
    assert operator_pod["affinity"] == values["operator"]["affinity"]
    assert operator_pod["priorityClassName"] == "system-cluster-critical"
    pvc = one(custom, "PersistentVolumeClaim")["spec"]
    assert (pvc["storageClassName"], pvc["resources"]["requests"]["storage"]) == (
        "fast-ssd",
        "50Gi",
    )
    default_image = container(one(docs["default"], "Deployment", "operator"))["image"]
    app_version = yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]
    assert default_image == f"ghcr.io/visionr1/operator:{app_version}"


# ------------------------------------------------------------------------------------- MLflow


def test_operator_points_at_the_bundled_mlflow_service(
    docs: dict[str, list[dict[str, Any]]],
) -> None:
    from mlflow.server.security_utils import is_allowed_host_header

    default = docs["default"]
    args = container(one(default, "Deployment", "operator"))["args"]
    uri = urlsplit(next(a for a in args if a.startswith("--mlflow-uri="))[13:])
    name, namespace, svc = uri.hostname.split(".")
    service = one(default, "Service", "mlflow")
    assert (name, namespace, svc) == (service["metadata"]["name"], NAMESPACE, "svc")
    (port,) = service["spec"]["ports"]
    assert uri.port == port["port"]
    server = one(default, "Deployment", "mlflow")
    labels = server["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    ctr = container(server)
    assert any(p["name"] == port["targetPort"] for p in ctr["ports"])
    # MLflow's own Host-header guard accepts the name the operator and stage pods use.
    allowed = env_of(ctr)["MLFLOW_SERVER_ALLOWED_HOSTS"]["value"].split(",")
    assert is_allowed_host_header(allowed, uri.netloc)
    assert is_allowed_host_header(allowed, f"{name}.{namespace}.svc.cluster.local:{uri.port}")
    assert not is_allowed_host_header(allowed, "attacker.example.com")


def test_mlflow_defaults_to_the_bundled_postgresql_with_auth(
    docs: dict[str, list[dict[str, Any]]], tmp_path: Path
) -> None:
    default = docs["default"]
    server = one(default, "Deployment", "mlflow")
    ctr = container(server)
    env = env_of(ctr)
    # The backend store: the chart's PostgreSQL StatefulSet, its password from a Secret that
    # the server and the database both read (never written into the pod spec).
    db = one(default, "StatefulSet", "postgresql")
    service = one(default, "Service", "postgresql")
    (db_ctr,) = db["spec"]["template"]["spec"]["containers"]
    db_env = env_of(db_ctr)
    password_ref = env["MLFLOW_DB_PASSWORD"]["valueFrom"]["secretKeyRef"]
    (mount,) = [m for m in db_ctr["volumeMounts"] if m["name"] == "password"]
    (volume,) = [v for v in db["spec"]["template"]["spec"]["volumes"] if v["name"] == "password"]
    assert volume["secret"]["secretName"] == password_ref["name"]
    assert volume["secret"]["items"] == [{"key": password_ref["key"], "path": "password"}]
    assert db_env["POSTGRES_PASSWORD_FILE"]["value"] == f"{mount['mountPath']}/password"
    secret = next(
        d for d in find(default, "Secret") if d["metadata"]["name"] == password_ref["name"]
    )
    assert len(secret["stringData"][password_ref["key"]]) == 32
    assert secret["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep"}
    uri = urlsplit(env["MLFLOW_BACKEND_STORE_URI"]["value"].replace("$(MLFLOW_DB_PASSWORD)", "pw"))
    assert uri.scheme == "postgresql+psycopg2"
    assert (uri.username, uri.password) == (db_env["POSTGRES_USER"]["value"], "pw")
    assert (uri.hostname, uri.port) == (service["metadata"]["name"], 5432)
    assert uri.path == "/" + db_env["POSTGRES_DB"]["value"]
    assert (
        service["spec"]["selector"].items() <= db["spec"]["template"]["metadata"]["labels"].items()
    )
    assert (
        db["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"] == "8Gi"
    )
    assert db_ctr["image"] == "docker.io/library/postgres:16.4-bookworm"  # upstream, by tag
    assert db_ctr["securityContext"]["readOnlyRootFilesystem"] is True
    assert db["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == 999
    # Only the MLflow server reaches the database.
    policy = one(default, "NetworkPolicy", "postgresql")
    (rule,) = policy["spec"]["ingress"]
    assert rule["from"] == [
        {"podSelector": {"matchLabels": server["spec"]["selector"]["matchLabels"]}}
    ]
    # Authentication: the basic-auth app, the admin login from the chart's Secret, which the
    # operator reads too (for its own server only).
    assert ctr["command"][:2] == ["sh", "-c"] and "--app-name basic-auth" in ctr["command"][2]
    admin = env["MLFLOW_AUTH_ADMIN_PASSWORD"]["valueFrom"]["secretKeyRef"]
    assert admin["key"] == "MLFLOW_TRACKING_PASSWORD"
    assert env["MLFLOW_AUTH_DEFAULT_PERMISSION"]["value"] == "NO_PERMISSIONS"
    assert "MLFLOW_FLASK_SERVER_SECRET_KEY" in env
    operator = container(one(default, "Deployment", "operator"))
    assert {"secretRef": {"name": admin["name"]}} in operator["envFrom"]
    # The shell wrapper passes the args through to `mlflow server`.
    ini = tmp_path / "basic_auth.ini"
    script = ctr["command"][2].replace("/tmp/basic_auth.ini", str(ini))
    wrapper = subprocess.run(
        ["sh", "-c", script.replace("exec mlflow server", "printf '%s\\n' mlflow server"),
         *ctr["command"][3:], *ctr["args"]],
        env={"PATH": os.environ["PATH"], "MLFLOW_AUTH_DEFAULT_PERMISSION": "READ",
             "MLFLOW_BACKEND_STORE_URI": "postgresql+psycopg2://u:p%40ss@h:5432/d",
             "MLFLOW_AUTH_CACHE_TTL_SECONDS": env["MLFLOW_AUTH_CACHE_TTL_SECONDS"]["value"]},
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert wrapper.returncode == 0, wrapper.stderr
    assert wrapper.stdout.split("\n")[:4] == ["mlflow", "server", "--app-name", "basic-auth"]
    # What MLflow's auth app reads from the file (mlflow.server.auth.config parses it with a
    # plain ConfigParser): the store's URI as given, '%' and all.
    import configparser

    config = configparser.ConfigParser()
    config.read(ini)
    assert config["mlflow"]["database_uri"] == "postgresql+psycopg2://u:p%40ss@h:5432/d"
    assert config["mlflow"]["default_permission"] == "READ"
    assert config.getint("mlflow", "auth_cache_ttl_seconds") == 60


def test_mlflow_on_sqlite_without_auth_for_a_laptop() -> None:
    out = documents(
        render({"mlflow": {"backendStore": {"type": "sqlite"}, "auth": {"enabled": False}}})
    )
    assert find(out, "StatefulSet") == [] and find(out, "Secret") == []
    server = one(out, "Deployment", "mlflow")
    ctr = container(server)
    assert ctr["command"] == ["mlflow", "server"]
    assert "envFrom" not in container(one(out, "Deployment", "operator"))
    assert env_of(ctr)["MLFLOW_BACKEND_STORE_URI"]["value"] == "sqlite:////mlflow/mlflow.db"


def test_mlflow_artifacts_on_a_kept_pvc(docs: dict[str, list[dict[str, Any]]]) -> None:
    default = docs["default"]
    server = one(default, "Deployment", "mlflow")
    ctr = container(server)
    assert "--artifacts-destination=/mlflow/artifacts" in ctr["args"]
    assert "--serve-artifacts" in ctr["args"]
    pvc = one(default, "PersistentVolumeClaim")
    assert pvc["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep"}
    pod = server["spec"]["template"]["spec"]
    data = next(v for v in pod["volumes"] if "persistentVolumeClaim" in v)
    assert data["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    assert {"name": data["name"], "mountPath": "/mlflow"} in ctr["volumeMounts"]
    assert server["spec"]["strategy"] == {"type": "Recreate"} and server["spec"]["replicas"] == 1
    assert pod["automountServiceAccountToken"] is False
    assert ctr["securityContext"]["readOnlyRootFilesystem"] is True


def test_mlflow_with_postgresql_and_s3(docs: dict[str, list[dict[str, Any]]]) -> None:
    pg = docs["mlflow-postgresql"]
    ctr = container(one(pg, "Deployment", "mlflow"))
    env = env_of(ctr)
    assert env["MLFLOW_BACKEND_STORE_URI"]["valueFrom"] == {
        "secretKeyRef": {"name": "mlflow-db", "key": "connection"}
    }
    assert env["MLFLOW_S3_ENDPOINT_URL"]["value"] == "https://minio.example:9000"
    assert ctr["envFrom"] == [{"secretRef": {"name": "mlflow-s3"}}]
    assert "--artifacts-destination=s3://ml-artifacts/visionr1" in ctr["args"]
    assert find(pg, "PersistentVolumeClaim") == []
    assert all(m["mountPath"] != "/mlflow" for m in ctr["volumeMounts"])


def test_external_mlflow_renders_no_server(docs: dict[str, list[dict[str, Any]]]) -> None:
    external = docs["external-mlflow-no-crd"]
    assert find(external, "Deployment", "mlflow") == [] and find(external, "Service") == []
    args = container(one(external, "Deployment", "operator"))["args"]
    assert "--mlflow-uri=https://mlflow.example.com" in args
    no_uri = documents(render({"mlflow": {"enabled": False}}))
    args = container(one(no_uri, "Deployment", "operator"))["args"]
    assert not any(a.startswith("--mlflow-uri") for a in args)


def test_existing_claim_is_mounted_and_not_created() -> None:
    out = documents(render({"mlflow": {"persistence": {"existingClaim": "tracking-data"}}}))
    assert find(out, "PersistentVolumeClaim") == []
    pod = one(out, "Deployment", "mlflow")["spec"]["template"]["spec"]
    claims = [
        v["persistentVolumeClaim"]["claimName"]
        for v in pod["volumes"]
        if "persistentVolumeClaim" in v
    ]
    assert claims == ["tracking-data"]


def test_network_policies_select_the_pods_and_open_only_their_ports(
    docs: dict[str, list[dict[str, Any]]],
) -> None:
    for name in ("default", "namespaced-rbac"):
        for component in ("operator", "mlflow"):
            policy = one(docs[name], "NetworkPolicy", component)
            deployment = one(docs[name], "Deployment", component)
            labels = deployment["spec"]["template"]["metadata"]["labels"]
            assert policy["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
            ports = {p["name"] for p in container(deployment)["ports"]}
            (rule,) = policy["spec"]["ingress"]
            assert {p["port"] for p in rule["ports"]} == ports
    operator_peer = {
        "podSelector": {
            "matchLabels": one(docs["default"], "Deployment", "operator")["spec"]["selector"][
                "matchLabels"
            ]
        }
    }
    mlflow_rule = one(docs["namespaced-rbac"], "NetworkPolicy", "mlflow")["spec"]["ingress"][0]
    assert mlflow_rule["from"] == [
        operator_peer,
        *VALUE_SETS["namespaced-rbac"]["networkPolicy"]["mlflowFrom"],
    ]
    # by default only the operator and the stage pods (labelled by the operator) reach MLflow,
    # and the stage pods only from namespaces the operator reconciles: never a system namespace
    # or the release's own, whatever their pods' labels say
    default_rule = one(docs["default"], "NetworkPolicy", "mlflow")["spec"]["ingress"][0]
    assert default_rule["from"] == [
        operator_peer,
        {
            "podSelector": {"matchExpressions": [{"key": "visionr1.io/run", "operator": "Exists"}]},
            "namespaceSelector": {
                "matchExpressions": [
                    {
                        "key": "kubernetes.io/metadata.name",
                        "operator": "NotIn",
                        "values": ["kube-system", "kube-public", "kube-node-lease", NAMESPACE],
                    }
                ]
            },
        },
    ]
    watched = documents(render({"watchNamespaces": ["team-a"]}))
    stage_peer = one(watched, "NetworkPolicy", "mlflow")["spec"]["ingress"][0]["from"][1]
    assert stage_peer["namespaceSelector"] == {
        "matchExpressions": [
            {"key": "kubernetes.io/metadata.name", "operator": "In", "values": ["team-a"]}
        ]
    }
    assert find(documents(render({"networkPolicy": {"enabled": False}})), "NetworkPolicy") == []


def test_notes_say_what_to_run_next(rendered: dict[str, dict[str, str]]) -> None:
    notes = rendered["default"]["visionr1-operator/templates/NOTES.txt"]
    deployment = one(documents(rendered["default"]), "Deployment", "operator")
    service = one(documents(rendered["default"]), "Service", "mlflow")
    assert f"rollout status deployment/{deployment['metadata']['name']}" in notes
    assert f"port-forward svc/{service['metadata']['name']} 5000:5000" in notes
    assert "kubectl -n ml get vr1 -w" in notes
    # MLflow's authentication: where the admin login is, how a run logs in
    admin = env_of(container(one(documents(rendered["default"]), "Deployment", "mlflow")))[
        "MLFLOW_AUTH_ADMIN_PASSWORD"
    ]["valueFrom"]["secretKeyRef"]["name"]
    assert f"get secret {admin} -o jsonpath" in notes and "spec.mlflow.credentialsSecret" in notes
    namespaced = rendered["namespaced-rbac"]["visionr1-operator/templates/NOTES.txt"]
    assert "in: ml-team-a, ml-team-b" in namespaced and "-n ml-team-a apply" in namespaced
    external = rendered["external-mlflow-no-crd"]["visionr1-operator/templates/NOTES.txt"]
    assert "visionr1 crd | kubectl apply" in external


# ------------------------------------------------------------------------------------- README


def _leaf_keys(values: dict[str, Any], prefix: str = "") -> Iterator[str]:
    for key, value in values.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            yield from _leaf_keys(value, f"{path}.")
        else:
            yield path


def test_readme_documents_every_value() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    section = README.read_text().split("## Values", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"^\| `([^`]+)` \|", section, flags=re.M))
    assert set(_leaf_keys(values)) == documented


# ------------------------------------------------------------------------------------ checkov

CHECKOV_VERSION = "3.3.30"
# checkov pins old packaging/networkx/cachetools and would downgrade the project's own, so it
# lives in a tool venv (ignored by git; `make clean` removes it; first install about a minute).
CHECKOV_VENV = REPO / ".visionr1" / "tools" / "checkov"


def _checkov() -> Path:
    if os.environ.get("CHECKOV"):
        return Path(os.environ["CHECKOV"])
    exe = CHECKOV_VENV / "bin" / "checkov"
    installed = list(
        CHECKOV_VENV.glob(f"lib/python*/site-packages/checkov-{CHECKOV_VERSION}.dist-info")
    )
    if not (exe.exists() and installed):
        subprocess.run([sys.executable, "-m", "venv", str(CHECKOV_VENV)], check=True)
        install = subprocess.run(
            [
                str(CHECKOV_VENV / "bin" / "pip"),
                "install",
                "--quiet",
                f"checkov=={CHECKOV_VERSION}",
            ],
            capture_output=True,
            text=True,
            timeout=1200,
        )
        if install.returncode != 0:
            pytest.fail(f"could not install checkov into {CHECKOV_VENV}:\n{install.stderr[-2000:]}")
    return exe


def _accepted_findings() -> set[tuple[str, str]]:
    """(check id, object) pairs the README accepts, from its "Security checks" table."""
    section = README.read_text().split("## Security checks", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `(CKV2?_K8S_\d+)` \| ([^|]+?) \|", section, flags=re.M)
    return {(check, obj.strip().lower()) for check, obj in rows}


@pytest.fixture(scope="module")
def checkov_findings(
    docs: dict[str, list[dict[str, Any]]], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, set[tuple[str, str]]]:
    """Failed checks per value set, as (check id, "<component> <kind>")."""
    out = tmp_path_factory.mktemp("rendered")
    components: dict[tuple[str, str], str] = {}
    for name, objs in docs.items():
        (out / f"{name}.yaml").write_text(yaml.safe_dump_all(objs, sort_keys=False))
        for d in objs:
            component = d["metadata"].get("labels", {}).get("app.kubernetes.io/component", "")
            components[(d["kind"], d["metadata"]["name"])] = component
    result = subprocess.run(
        [
            str(_checkov()),
            "-d",
            str(out),
            "--framework",
            "kubernetes",
            "--output",
            "json",
            "--quiet",
            "--compact",
            "--skip-download",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "BC_SKIP_MAPPING": "TRUE", "CHECKOV_RUN_SCA_PACKAGE_SCAN_V2": "false"},
    )
    report = json.loads(result.stdout)
    reports = report if isinstance(report, list) else [report]
    assert reports and sum(r["summary"]["passed"] for r in reports) > 50, result.stderr[-2000:]
    findings: dict[str, set[tuple[str, str]]] = {name: set() for name in docs}
    for r in reports:
        for failed in r["results"]["failed_checks"]:
            # "Deployment.<ns>.<name>" or, for graph checks, "Pod.<ns>.<name>.<labels...>"
            kind, _, name = failed["resource"].split(".")[:3]
            kind = "Deployment" if kind == "Pod" else kind
            value_set = Path(failed["file_path"]).stem
            obj = f"{components.get((kind, name), '?')} {kind}".lower()
            findings[value_set].add((failed["check_id"], obj))
    return findings


def test_checkov_fails_nothing_the_readme_does_not_accept(
    checkov_findings: dict[str, set[tuple[str, str]]],
) -> None:
    accepted = _accepted_findings()
    seen = set().union(*checkov_findings.values())
    unexplained = {f"{s}: {f}" for s, fs in checkov_findings.items() for f in fs - accepted}
    assert not unexplained, "document these in the chart README (Security checks) or fix them"
    # And the README lists no exception that no longer happens.
    assert accepted <= seen, f"stale README exceptions: {accepted - seen}"
    # Pinning by digest and pulling Always clears the image checks.
    custom = {check for check, _ in checkov_findings["custom-images-placement"]}
    assert not custom & {"CKV_K8S_15", "CKV_K8S_43"}
