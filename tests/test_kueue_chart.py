"""The chart grants the Kueue Workload access the operator uses for queued runs, only when asked
(``kueue.enabled``), in both RBAC modes."""

from __future__ import annotations

from typing import Any

import helm_python as helm
import yaml

from visionr1_operator.rbac import (
    CLUSTER_PEERING_RULES,
    CREDENTIAL_RULES,
    KUEUE_RULES,
    PEERING_RULES,
    RULES,
)

from repo_paths import REPO

CHART = REPO / "charts" / "visionr1-operator"


def roles(values: dict[str, Any]) -> list[dict[str, Any]]:
    with helm.Chart.load(str(CHART)) as chart:
        chart.validate_schema(values)
        out = chart.render(values, name="vr1", namespace="visionr1-system", is_install=True)
    texts = [text for path, text in out.items() if path.endswith((".yaml", ".yml"))]
    docs = [d for text in texts for d in yaml.safe_load_all(text) if d]
    # the operator's own rules (not the ClusterRole that only reads namespaces' labels)
    return [
        d
        for d in docs
        if d["kind"] in ("ClusterRole", "Role")
        and not d["metadata"]["name"].endswith("-namespaces")
    ]


def permissions(role: dict[str, Any]) -> set[tuple[str, str, str]]:
    return {
        (g, r, v)
        for rule in role["rules"]
        for g in rule["apiGroups"]
        for r in rule["resources"]
        for v in rule["verbs"]
    }


def expected(rules: tuple[Any, ...]) -> set[tuple[str, str, str]]:
    return {(r.api_group, r.resource, v) for r in rules for v in r.verbs}


def test_workload_access_only_with_kueue_enabled() -> None:
    base = RULES + CREDENTIAL_RULES + CLUSTER_PEERING_RULES  # standby replicas: the default
    (default,) = roles({})
    assert permissions(default) == expected(base)
    (with_kueue,) = roles({"kueue": {"enabled": True}})
    assert permissions(with_kueue) == expected(base + KUEUE_RULES)
    assert ("kueue.x-k8s.io", "workloads", "patch") in permissions(with_kueue)
    namespaced = roles({"kueue": {"enabled": True}, "watchNamespaces": ["a", "b"]})
    assert len(namespaced) == 2
    in_namespace = RULES + CREDENTIAL_RULES + PEERING_RULES + KUEUE_RULES
    assert all(permissions(r) == expected(in_namespace) for r in namespaced)
