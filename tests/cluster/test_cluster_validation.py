"""The CRD on the real API server: every example accepted, every known-bad manifest refused by the
server's own schema and CEL validation (the message naming the field), and the CEL rules within
the server's cost budget, both estimated (CRD create) and at run time (a maximal object)."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from cluster_helpers import (
    CRD_NAME,
    EXAMPLES,
    condition,
    crd_object,
    create_namespace,
    ensure_crd,
    items,
    kget,
)
from test_manifest_validation import BASE, CASES, _manifest

pytestmark = pytest.mark.cluster

NS = "vr1-validation"


@pytest.fixture(scope="module")
def cp(control_plane: Any) -> Iterator[Any]:
    ensure_crd(control_plane)
    create_namespace(control_plane, NS)
    yield control_plane
    control_plane.kubectl("delete", "namespace", NS, "--wait=false", check=False)


def _in_ns(obj: dict[str, Any]) -> dict[str, Any]:
    obj = copy.deepcopy(obj)
    obj["metadata"]["namespace"] = NS
    return obj


def _dry_run(cp: Any, obj: dict[str, Any]) -> Any:
    return cp.kubectl(
        "apply", "--dry-run=server", "-f", "-", input=yaml.safe_dump(_in_ns(obj)), check=False
    )


def test_the_crd_is_established_with_the_schema_we_generate(cp: Any) -> None:
    served = kget(cp, "crd", CRD_NAME)
    for kind in ("Established", "NamesAccepted"):
        c = condition(served, kind)
        assert c is not None and c["status"] == "True", served["status"]
    ours = crd_object()["spec"]["versions"][0]
    version = served["spec"]["versions"][0]
    assert version["name"] == ours["name"] and version["subresources"] == {"status": {}}

    # The server stored every CEL rule we generate (none dropped or rewritten).
    def rules(schema: dict[str, Any]) -> list[str]:
        out = [v["rule"] for v in schema.get("x-kubernetes-validations", [])]
        for sub in (schema.get("properties") or {}).values():
            out += rules(sub)
        for key in ("items", "additionalProperties"):
            if isinstance(schema.get(key), dict):
                out += rules(schema[key])
        return out

    stored = rules(version["schema"]["openAPIV3Schema"])
    assert len(stored) >= 20
    assert sorted(stored) == sorted(rules(ours["schema"]["openAPIV3Schema"]))


def _renamed_crd(group: str) -> dict[str, Any]:
    crd = crd_object()
    crd["metadata"] = {"name": f"visionr1runs.{group}"}
    crd["spec"]["group"] = group
    return crd


def test_cel_rules_fit_the_estimated_cost_budget(cp: Any) -> None:
    """A CRD create compiles every rule and checks its estimated cost; a dry run of the same CRD
    under another group goes through exactly that, without keeping anything."""
    out = cp.kubectl(
        "create",
        "--dry-run=server",
        "-f",
        "-",
        input=yaml.safe_dump(_renamed_crd("costcheck.visionr1.io")),
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert "created (server dry run)" in out.stdout
    # The check is live: an unbounded quadratic rule on the same schema is refused for its cost.
    crd = _renamed_crd("costcheck2.visionr1.io")
    env = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"][
        "properties"
    ]["stages"]["properties"]["sft"]["properties"]["env"]
    env.pop("maxItems", None)
    env["x-kubernetes-validations"] = [
        {"rule": "self.all(a, self.all(b, a.name != b.name || a == b))", "message": "unique"}
    ]
    for prop in env["items"]["properties"].values():
        prop.pop("maxLength", None)
    out = cp.kubectl(
        "create", "--dry-run=server", "-f", "-", input=yaml.safe_dump(crd), check=False
    )
    assert out.returncode != 0 and "cost" in out.stderr.lower(), out.stderr


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_every_example_is_accepted_by_the_api_server(cp: Any, path: Path) -> None:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    assert docs
    for doc in docs:
        out = _dry_run(cp, doc)
        assert out.returncode == 0, f"{path.name}: {out.stderr}"
        assert "(server dry run)" in out.stdout
    assert items(cp, "vr1", "-n", NS) == []  # a dry run stores nothing


def _field_named(expected: str) -> str:
    """The part of the suite's expected message the server must also name: the field path
    (``spec.x.y[0].z``) when it starts with one, else the CEL rule's message itself."""
    head = expected.split(":")[0].split(" ")[0]
    return head if head.startswith(("spec.", "metadata.", "stages.")) else expected


REFUSABLE = [c for c in CASES if c[3]]
ONLY_MODELS = [c for c in CASES if not c[3] and c[0] != "wrong-api-version"]


@pytest.mark.parametrize(
    ("case", "changes", "expected"), [c[:3] for c in REFUSABLE], ids=[c[0] for c in REFUSABLE]
)
def test_invalid_manifest_is_refused_by_the_api_server(
    cp: Any, case: str, changes: dict[str, Any], expected: str
) -> None:
    out = _dry_run(cp, _manifest(changes))
    assert out.returncode != 0, f"{case}: the API server accepted it: {out.stdout}"
    field = _field_named(expected)
    assert field in out.stderr, f"{case}: {field!r} not named in: {out.stderr}"


@pytest.mark.parametrize(
    ("case", "changes"), [c[:2] for c in ONLY_MODELS], ids=[c[0] for c in ONLY_MODELS]
)
def test_rules_only_the_operator_checks_pass_the_api_server(
    cp: Any, case: str, changes: dict[str, Any]
) -> None:
    """Stage order cannot be written in CEL: the server stores these, the operator fails them
    (InvalidSpec, tested with the operator)."""
    out = _dry_run(cp, _manifest(changes))
    assert out.returncode == 0, f"{case}: {out.stderr}"


def test_wrong_api_version_is_refused(cp: Any) -> None:
    out = _dry_run(cp, _manifest({"apiVersion": "visionr1.io/v1"}))
    assert out.returncode != 0 and "visionr1.io/v1" in out.stderr, out.stderr


@pytest.mark.parametrize(
    ("name", "needle"),
    [("1st-run", "DNS-1035 label"), ("r" * 45, "at most 44 characters")],
)
def test_a_bad_run_name_is_reported_at_metadata_name(cp: Any, name: str, needle: str) -> None:
    """The root-level name rules carry a fieldPath: kubectl shows the field, not ``<nil>``."""
    obj = copy.deepcopy(BASE)
    obj["metadata"]["name"] = name
    out = _dry_run(cp, obj)
    assert out.returncode != 0, out.stdout
    assert "is invalid: metadata.name: Invalid value" in out.stderr, out.stderr
    assert needle in out.stderr and "<nil>" not in out.stderr, out.stderr


def _maximal() -> dict[str, Any]:
    """BASE with every bounded list at its maxItems and every per-item CEL rule exercised."""
    obj = copy.deepcopy(BASE)
    obj["metadata"]["name"] = "m" * 40
    spec = obj["spec"]
    spec["images"] = {"pullSecrets": [f"pull-{i}" for i in range(16)]}
    # maxItems names, kept short: kubectl apply copies the object into a size-limited annotation
    secrets = [f"s{i}" for i in range(32)]
    spec["secrets"] = secrets
    stages = spec["stages"]
    for stage in ("synthesis", "filter", "sft", "grpo", "eval"):
        s = stages.setdefault(stage, {})
        s["env"] = [
            {
                "name": f"V{i}",
                "valueFrom": {"secretKeyRef": {"name": secrets[i % 32], "key": f"k{i}"}},
            }
            if i % 2
            else {"name": f"V{i}", "value": "x" * 64}
            for i in range(256)
        ]
        s["tolerations"] = [
            {"key": f"k{i}", "operator": "Equal", "value": "v", "effect": "NoSchedule"}
            for i in range(64)
        ]
        s["nodeSelector"] = {f"example.com/l{i}": "v" for i in range(32)}
    stages["filter"].setdefault("params", {})["replacements"] = [
        {"pattern": f"p{i}", "replacement": "r"} for i in range(256)
    ]
    stages["grpo"]["params"]["ptst"] = [
        {"maxCompletionLength": 64 * (i + 1), "numGenerations": 2, "steps": 1} for i in range(16)
    ]
    stages["eval"]["params"] = {
        "benchmarks": [
            {"name": "mathvista", "path": f"b/{i}", "versions": [f"v{j}" for j in range(16)]}
            for i in range(32)
        ],
        "checkpoints": ["base", "sft", "grpo"]
        + [f"grpo/stage-{i}" for i in range(1, 17)]
        + [f"/data/ckpt/{i}" for i in range(45)],
    }
    return obj


def test_a_maximal_object_validates_within_the_runtime_cost_budget(cp: Any) -> None:
    from visionr1_operator.validate import validate_object

    obj = _maximal()
    assert validate_object(obj) == [], validate_object(obj)[:3]
    out = _dry_run(cp, obj)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "cost" not in out.stderr.lower()
