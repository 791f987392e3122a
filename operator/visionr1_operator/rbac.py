"""The exact API access the operator needs, as RBAC rules.

The Helm chart's ClusterRole (or Role) must grant exactly these; a chart test asserts that, and
the kmock test asserts that every request the operator makes is covered by a rule and every rule
is used. Standalone mode (one replica) needs no kopf peering objects; disabled scanning needs no
namespace or CRD listing. One cluster-scoped right, kept apart (:data:`NAMESPACE_RULES`): get of
a watched namespace, for its Pod Security labels.
"""

from __future__ import annotations

from typing import NamedTuple


class Rule(NamedTuple):
    api_group: str
    resource: str
    verbs: frozenset[str]


RULES: tuple[Rule, ...] = (
    # the runs: watched by kopf (and only their status written: no finalizer, no annotation)
    Rule("visionr1.io", "visionr1runs", frozenset({"list", "watch"})),
    Rule("visionr1.io", "visionr1runs/status", frozenset({"patch"})),
    # the stage Jobs: watched for progress, created per attempt, patched to suspend/resume;
    # get: on a create conflict, to see whether the existing one is this run's (its owner);
    # delete: a run that fails stops its unfinished Job (and so its pods)
    Rule("batch", "jobs", frozenset({"get", "list", "watch", "create", "patch", "delete"})),
    # the stage pods: watched (only ours, by label) for unschedulable, image pull, OOMKilled
    Rule("", "pods", frozenset({"list", "watch"})),
    # per attempt: the resolved stage config; per multi-node stage: the rendezvous Service
    Rule("", "configmaps", frozenset({"get", "create"})),
    Rule("", "services", frozenset({"get", "create"})),
    # an Event for every transition; list: a Job's FailedCreate Events (quota, Pod Security,
    # LimitRange refusing its pods), by the Job's uid
    Rule("", "events", frozenset({"create", "list"})),
)

# With Kueue (the chart's ``kueue.enabled``): spec.suspend of a queued run deactivates and
# reactivates the Job's Workload (kueue.py), found by the Job's uid (a label-selected list). Not in
# RULES: a cluster without Kueue has no Workload API and the operator never calls it.
KUEUE_RULES: tuple[Rule, ...] = (Rule("kueue.x-k8s.io", "workloads", frozenset({"list", "patch"})),)

# The operator's own MLflow calls for a run (opening and ending its MLflow runs) carry that run's
# spec.mlflow.credentialsSecret, read by name (get, never list or watch): never the operator's own
# credentials sent to a server a tenant chose. Kept apart from RULES: only runs that name such a
# Secret make the request.
CREDENTIAL_RULES: tuple[Rule, ...] = (Rule("", "secrets", frozenset({"get"})),)

# Standby replicas (the chart's ``operator.replicas`` >= 2, ``--peering``): kopf lists, watches
# and patches the release's peering object with keep-alives; the operator creates it at start
# (peering.py). A KopfPeering in each watched namespace, or, watching every namespace, one
# ClusterKopfPeering. Not in RULES: a standalone operator never calls them.
PEERING_RULES: tuple[Rule, ...] = (
    Rule("kopf.dev", "kopfpeerings", frozenset({"list", "watch", "patch", "create"})),
)
CLUSTER_PEERING_RULES: tuple[Rule, ...] = (
    Rule("kopf.dev", "clusterkopfpeerings", frozenset({"list", "watch", "patch", "create"})),
)

# Cluster-scoped, so never in a namespace's Role: before creating a stage's Job the operator
# reads its namespace's pod-security.kubernetes.io/enforce label (a restricted namespace gets
# pods without the root init container). The chart grants it in a ClusterRole of its own,
# limited by resourceNames to the watched namespaces when it watches a list of them.
NAMESPACE_RULES: tuple[Rule, ...] = (Rule("", "namespaces", frozenset({"get"})),)


def covers(api_group: str, resource: str, verb: str) -> Rule | None:
    """The rule that allows ``verb`` on ``resource`` of ``api_group``, if any."""
    for rule in (*RULES, *CREDENTIAL_RULES, *NAMESPACE_RULES):
        if rule.api_group == api_group and rule.resource == resource and verb in rule.verbs:
            return rule
    return None


def as_policy_rules(peering: tuple[Rule, ...] = ()) -> list[dict[str, object]]:
    """RULES and CREDENTIAL_RULES (and ``peering``: PEERING_RULES or CLUSTER_PEERING_RULES with
    standby replicas) as rbac.authorization.k8s.io/v1 PolicyRule dicts (what the chart's
    (Cluster)Role renders)."""
    return [
        {"apiGroups": [r.api_group], "resources": [r.resource], "verbs": sorted(r.verbs)}
        for r in (*RULES, *CREDENTIAL_RULES, *peering)
    ]
