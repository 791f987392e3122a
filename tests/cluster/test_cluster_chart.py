"""The chart installed, upgraded and uninstalled with the real helm against the real API server,
checked against what charts/visionr1-operator/README.md promises: the CRD established and kept on
uninstall (with the runs), the operator's ServiceAccount and exactly its RBAC, `helm upgrade`
updating the CRD and switching between ClusterRole and per-namespace Roles."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from cluster_helpers import (
    CRD_NAME,
    REPO,
    apply,
    condition,
    create_namespace,
    kget,
    kget_or_none,
    tiny_cluster_run,
)

from visionr1_operator.rbac import (
    CLUSTER_PEERING_RULES,
    CREDENTIAL_RULES,
    PEERING_RULES,
    RULES,
    as_policy_rules,
)

pytestmark = pytest.mark.cluster

CHART = REPO / "charts" / "visionr1-operator"
RELEASE = "vr1-chart"
NS = "vr1-chart-system"
FULLNAME = f"{RELEASE}-visionr1-operator"  # <release>-<chart> (README: fullnameOverride)
CLUSTER_NAME = f"{NS}-{FULLNAME}"  # cluster-scoped objects: the release's namespace in the name
WATCHED = ["vr1-chart-team-a", "vr1-chart-team-b"]
# Only the API objects are under test here: the chart's pods are kept off the node (an operator
# watching every namespace would reconcile the other tests' runs). test_cluster_operator and the
# README walkthrough run the chart's operator and MLflow from our images on the node.
OFF_NODE = {"nodeSelector": {"visionr1.io/test-no-such-node": "true"}}
VALUES = {"operator": OFF_NODE, "mlflow": OFF_NODE}


def _values(tmp_path: Path, extra: dict[str, Any] | None = None) -> str:
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump({**VALUES, **(extra or {})}))
    return str(path)


def _hand_crd_to_release(cp: Any) -> None:
    """README: a CRD applied earlier by hand is not Helm's; hand it to the release first."""
    crd = kget_or_none(cp, "crd", CRD_NAME)
    if crd is None:
        return
    ann = crd["metadata"].get("annotations") or {}
    if ann.get("meta.helm.sh/release-name") == RELEASE:
        return
    cp.kubectl("label", "--overwrite", "crd", CRD_NAME, "app.kubernetes.io/managed-by=Helm")
    cp.kubectl(
        "annotate",
        "--overwrite",
        "crd",
        CRD_NAME,
        f"meta.helm.sh/release-name={RELEASE}",
        f"meta.helm.sh/release-namespace={NS}",
    )


def _sa_can(cp: Any, verb: str, resource: str, namespace: str) -> bool:
    """``resource``: ``plural[.group]``, or ``plural/subresource[.group]`` (kubectl takes the
    subresource as a flag: given in the name it checks something else)."""
    name, _, group = resource.partition(".")
    plural, _, sub = name.partition("/")
    out = cp.kubectl(
        "auth",
        "can-i",
        verb,
        f"{plural}.{group}" if group else plural,
        *([f"--subresource={sub}"] if sub else []),
        "--as",
        f"system:serviceaccount:{NS}:{FULLNAME}",
        "-n",
        namespace,
        check=False,
    )
    return out.stdout.strip() == "yes"


def _triples(rules: list[dict[str, Any]]) -> set[tuple[str, str, str]]:
    """PolicyRules as (apiGroup, resource, verb): equal however the rules are grouped."""
    return {
        (g, r, v)
        for rule in rules
        for g in rule["apiGroups"]
        for r in rule["resources"]
        for v in rule["verbs"]
    }


def _resource(rule_group: str, resource: str) -> str:
    return f"{resource}.{rule_group}" if rule_group else resource


@pytest.fixture
def namespaces(control_plane: Any) -> Iterator[None]:
    """The release's and the watched namespaces, removed after the test (a rerun starts clean)."""
    yield
    for ns in (NS, *WATCHED):
        control_plane.kubectl("delete", "namespace", ns, "--wait=false", check=False)


def test_install_upgrade_uninstall_as_the_readme_says(
    control_plane: Any, namespaces: None, tmp_path: Path
) -> None:
    cp = control_plane
    for ns in WATCHED:
        create_namespace(cp, ns)
    if cp.helm("status", RELEASE, "-n", NS, check=False).returncode == 0:
        cp.helm("uninstall", RELEASE, "-n", NS)  # left over from an interrupted session
    _hand_crd_to_release(cp)

    # --- install: defaults (every namespace, ClusterRole)
    out = cp.helm(
        "install", RELEASE, str(CHART), "-n", NS, "--create-namespace", "-f", _values(tmp_path)
    )
    assert "STATUS: deployed" in out.stdout, out.stdout
    cp.kubectl("wait", "--for=condition=Established", f"crd/{CRD_NAME}", "--timeout=60s")
    crd = kget(cp, "crd", CRD_NAME)
    assert condition(crd, "Established")["status"] == "True"
    ann = crd["metadata"]["annotations"]
    assert ann["helm.sh/resource-policy"] == "keep"
    assert ann["meta.helm.sh/release-name"] == RELEASE

    sa = kget(cp, "serviceaccount", FULLNAME, "-n", NS)
    assert sa["automountServiceAccountToken"] is False
    role = kget(cp, "clusterrole", CLUSTER_NAME)
    # with the chart's standby replica (the default) the release's cluster-wide peering object
    assert _triples(role["rules"]) == _triples(as_policy_rules(CLUSTER_PEERING_RULES))
    binding = kget(cp, "clusterrolebinding", CLUSTER_NAME)
    assert binding["roleRef"]["name"] == CLUSTER_NAME
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": FULLNAME, "namespace": NS}]
    deploy = kget(cp, "deployment", FULLNAME, "-n", NS)
    pod = deploy["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == FULLNAME
    assert "--all-namespaces" in pod["containers"][0]["args"]

    # The API server's own authorizer: the ServiceAccount may do exactly what rbac.RULES say,
    # in any namespace, and nothing the operator does not need.
    for rule in (*RULES, *CREDENTIAL_RULES):
        for verb in rule.verbs:
            assert _sa_can(cp, verb, _resource(rule.api_group, rule.resource), WATCHED[0]), (
                verb,
                rule,
            )
    for verb, resource in [
        ("list", "secrets"),  # a run's credentials Secret only by name (get)
        ("watch", "secrets"),
        ("delete", "pods"),
        ("delete", "visionr1runs.visionr1.io"),
        ("patch", "visionr1runs.visionr1.io"),  # only their status: no finalizer, no annotation
        ("list", "namespaces"),
        ("create", "customresourcedefinitions.apiextensions.k8s.io"),
    ]:
        assert not _sa_can(cp, verb, resource, WATCHED[0]), (verb, resource)

    # A run created while the chart is installed (nothing reconciles it: no operator pod here).
    run = tiny_cluster_run("kept-run", WATCHED[0], "visionr1-data")
    apply(cp, run)

    # --- upgrade: a newer chart whose CRD gained a printer column, now only two namespaces
    newer = tmp_path / "chart"
    shutil.copytree(CHART, newer)
    crd_file = newer / "templates" / "crd" / f"{CRD_NAME}.yaml"
    text = crd_file.read_text()
    anchor = "    - name: Age\n"
    assert anchor in text
    crd_file.write_text(
        text.replace(
            anchor,
            "    - name: Upgraded\n      type: string\n      jsonPath: .status.phase\n"
            "      priority: 1\n" + anchor,
            1,
        )
    )
    chart_yaml = newer / "Chart.yaml"
    chart_yaml.write_text(chart_yaml.read_text().replace("version: 0.1.0", "version: 0.1.1"))
    out = cp.helm(
        "upgrade",
        RELEASE,
        str(newer),
        "-n",
        NS,
        "-f",
        _values(tmp_path, {"watchNamespaces": WATCHED}),
    )
    assert "STATUS: deployed" in out.stdout and "REVISION: 2" in out.stdout, out.stdout
    columns = [
        c["name"]
        for c in kget(cp, "crd", CRD_NAME)["spec"]["versions"][0]["additionalPrinterColumns"]
    ]
    assert "Upgraded" in columns  # helm upgrade updated the CRD (a template, not crds/)
    assert kget_or_none(cp, "clusterrole", CLUSTER_NAME) is None
    assert kget_or_none(cp, "clusterrolebinding", CLUSTER_NAME) is None
    for ns in WATCHED:
        assert _triples(kget(cp, "role", FULLNAME, "-n", ns)["rules"]) == _triples(
            as_policy_rules(PEERING_RULES)
        )
        assert kget(cp, "rolebinding", FULLNAME, "-n", ns)["subjects"][0]["name"] == FULLNAME
        assert _sa_can(cp, "create", "jobs.batch", ns)
    assert not _sa_can(cp, "create", "jobs.batch", "default")  # nothing cluster-wide any more
    args = kget(cp, "deployment", FULLNAME, "-n", NS)["spec"]["template"]["spec"]["containers"][0][
        "args"
    ]
    assert [a for a in args if a.startswith("--namespace=")] == [
        f"--namespace={ns}" for ns in WATCHED
    ]
    # ...and back to this chart: the column goes again
    cp.helm(
        "upgrade",
        RELEASE,
        str(CHART),
        "-n",
        NS,
        "-f",
        _values(tmp_path, {"watchNamespaces": WATCHED}),
    )
    columns = [
        c["name"]
        for c in kget(cp, "crd", CRD_NAME)["spec"]["versions"][0]["additionalPrinterColumns"]
    ]
    assert "Upgraded" not in columns and "Phase" in columns
    history = yaml.safe_load(cp.helm("history", RELEASE, "-n", NS, "-o", "yaml").stdout)
    assert [h["revision"] for h in history] == [1, 2, 3]

    # --- uninstall: everything goes except the CRD, and the runs stay with it
    cp.helm("uninstall", RELEASE, "-n", NS)
    assert kget_or_none(cp, "deployment", FULLNAME, "-n", NS) is None
    assert kget_or_none(cp, "serviceaccount", FULLNAME, "-n", NS) is None
    for ns in WATCHED:
        assert kget_or_none(cp, "role", FULLNAME, "-n", ns) is None
    crd = kget(cp, "crd", CRD_NAME)
    assert condition(crd, "Established")["status"] == "True"
    assert kget(cp, "vr1", "kept-run", "-n", WATCHED[0])["spec"]["storage"]["pvc"] == (
        "visionr1-data"
    )
    cp.kubectl("delete", "vr1", "kept-run", "-n", WATCHED[0], "--wait=false")
