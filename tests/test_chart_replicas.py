"""The chart with standby operator replicas (kopf peering) and as one release per tenant
namespace: rendered with Helm's own engine, checked against what the operator needs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import helm_python as helm
import yaml
from test_chart import CHART, container, documents, env_of, find, one, permissions

from visionr1_operator import rbac
from visionr1_operator.cli import build_parser

REPO = Path(__file__).resolve().parents[1]


def render(
    values: dict[str, Any], release: str = "vr1", namespace: str = "visionr1-a"
) -> list[dict]:
    with helm.Chart.load(str(CHART)) as chart:
        return documents(chart.render(values, name=release, namespace=namespace, is_install=True))


def rules(*sets: tuple[rbac.Rule, ...]) -> set[tuple[str, str, str]]:
    return {(r.api_group, r.resource, v) for rs in sets for r in rs for v in r.verbs}


def test_two_replicas_watching_namespaces_peer_in_each_namespace() -> None:
    docs = render({"operator": {"replicas": 2}, "watchNamespaces": ["team-a", "team-b"]})
    deployment = one(docs, "Deployment", "operator")
    assert deployment["spec"]["replicas"] == 2
    # a new pod starts before the old one goes, and never takes over from a live one
    assert deployment["spec"]["strategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
    }
    ctr = container(deployment)
    args = build_parser().parse_args(ctr["args"])
    assert args.peering == "visionr1-a-vr1-visionr1-operator"  # the release's namespace in it
    assert args.peering_lifetime == 15
    assert env_of(ctr)["POD_ID"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    for role in find(docs, "Role"):
        assert permissions(role) == rules(rbac.RULES, rbac.CREDENTIAL_RULES, rbac.PEERING_RULES)
    # The peering CRDs are in the chart's crds/ folder (Helm installs them when absent and never
    # owns them: a second release, or one after an uninstall, installs beside them), the same
    # as crds/ ships them; never among the release's templates.
    assert [d["metadata"]["name"] for d in find(docs, "CustomResourceDefinition")] == [
        "visionr1runs.visionr1.io"
    ]
    in_chart = REPO / "charts" / "visionr1-operator" / "crds" / "kopf-peering.yaml"
    shipped = [d for d in yaml.safe_load_all((REPO / "crds/kopf-peering.yaml").read_text()) if d]
    assert len(shipped) == 2
    assert [d for d in yaml.safe_load_all(in_chart.read_text()) if d] == shipped


def test_two_replicas_cluster_wide_peer_in_one_cluster_peering() -> None:
    docs = render({"operator": {"replicas": 2}})
    (role,) = [
        r for r in find(docs, "ClusterRole") if not r["metadata"]["name"].endswith("-namespaces")
    ]
    assert permissions(role) == rules(rbac.RULES, rbac.CREDENTIAL_RULES, rbac.CLUSTER_PEERING_RULES)
    args = build_parser().parse_args(container(one(docs, "Deployment", "operator"))["args"])
    assert args.all_namespaces and args.peering == "visionr1-a-vr1-visionr1-operator"


def test_one_replica_is_standalone_without_peering_rights_or_crds() -> None:
    docs = render({"operator": {"replicas": 1}})
    deployment = one(docs, "Deployment", "operator")
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    args = build_parser().parse_args(container(deployment)["args"])
    assert args.peering is None
    assert not any(
        "kopf.dev" in rule["apiGroups"]
        for role in find(docs, "ClusterRole") + find(docs, "Role")
        for rule in role["rules"]
    )
    assert [d["metadata"]["name"] for d in find(docs, "CustomResourceDefinition")] == [
        "visionr1runs.visionr1.io"
    ]
    assert find(docs, "PodDisruptionBudget") == []
    assert "affinity" not in deployment["spec"]["template"]["spec"]


def test_a_release_per_tenant_namespace_shares_no_cluster_scoped_name() -> None:
    """Same release name in two namespaces (one per tenant, each watching its tenant's), the
    CRD installed on its own (crds/): nothing cluster-scoped of one overwrites the other's."""
    cluster_scoped = ("ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition")

    def names(namespace: str, watched: list[str] | None) -> set[tuple[str, str]]:
        values: dict[str, Any] = {"crds": {"install": False}, "operator": {"replicas": 2}}
        if watched:
            values["watchNamespaces"] = watched
        docs = render(values, release="visionr1", namespace=namespace)
        return {(d["kind"], d["metadata"]["name"]) for d in docs if d["kind"] in cluster_scoped}

    for watched_a, watched_b in ((["team-a"], ["team-b"]), (None, None)):
        a, b = names("visionr1-a", watched_a), names("visionr1-b", watched_b)
        assert a and b and not a & b, (a, b)
        assert all(name.startswith("visionr1-a-") for _, name in a)
