"""Generate the VisionR1Run CustomResourceDefinition from the pydantic API models.

Pydantic emits JSON Schema 2020-12; Kubernetes wants a *structural* OpenAPI v3.0 subset: every
node typed, no $ref, no anyOf-with-null, boolean exclusive bounds, no additionalProperties beside
properties. This module does that translation and nothing else.
"""

from __future__ import annotations

import copy
from typing import Any

import yaml

from visionr1_operator.api import (
    DNS_1035,
    GROUP,
    KIND,
    LONGEST_STAGE,
    MAX_RUN_NAME,
    PLURAL,
    SHORT_NAMES,
    SINGULAR,
    VERSION,
    VisionR1RunSpec,
    VisionR1RunStatus,
)

__all__ = ["MAX_RUN_NAME", "crd", "crd_yaml"]
_DROP = {"title", "default", "examples"}


def _inline(node: Any, defs: dict[str, Any]) -> Any:
    if isinstance(node, dict):
        if "$ref" in node:
            target = copy.deepcopy(defs[node["$ref"].split("/")[-1]])
            extra = {k: v for k, v in node.items() if k != "$ref"}
            target.update(extra)
            return _inline(target, defs)
        return {k: _inline(v, defs) for k, v in node.items()}
    if isinstance(node, list):
        return [_inline(v, defs) for v in node]
    return node


def _structural(node: dict[str, Any]) -> dict[str, Any]:
    node = dict(node)
    # Optional[X] is anyOf [X, null]: keep X (absence means "unset").
    if "anyOf" in node:
        options = [o for o in node.pop("anyOf") if o.get("type") != "null"]
        if len(options) != 1:
            raise ValueError(f"cannot express union in a structural schema: {options}")
        merged = dict(options[0])
        for key in ("description", "x-kubernetes-validations"):
            if key in node and key not in merged:
                merged[key] = node[key]
        node = {**merged, **{k: v for k, v in node.items() if k not in merged}}
    for key in _DROP:
        node.pop(key, None)
    if "const" in node:
        node["enum"] = [node.pop("const")]
    if "enum" in node and "type" not in node:
        node["type"] = "string"
    for bound, exclusive in (("minimum", "exclusiveMinimum"), ("maximum", "exclusiveMaximum")):
        if exclusive in node and not isinstance(node[exclusive], bool):
            node[bound] = node[exclusive]
            node[exclusive] = True
    if node.get("type") == "object":
        props = node.get("properties")
        addl = node.pop("additionalProperties", None)
        if props:
            node["properties"] = {k: _structural(v) for k, v in props.items()}
        elif isinstance(addl, dict) and addl:
            node["additionalProperties"] = _structural(addl)
        elif addl is None or addl is True or addl == {}:
            node["x-kubernetes-preserve-unknown-fields"] = True
    if node.get("type") == "array" and "items" in node:
        node["items"] = _structural(node["items"])
    if "type" not in node:
        raise ValueError(f"untyped schema node: {node}")
    return node


def openapi_schema(model: type) -> dict[str, Any]:
    """The structural schema of a pydantic model (camelCase field names)."""
    raw = model.model_json_schema(by_alias=True, mode="validation")  # type: ignore[attr-defined]
    defs = raw.pop("$defs", {})
    return _structural(_inline(raw, defs))


def _conditions(status: dict[str, Any]) -> None:
    cond = status["properties"]["conditions"]
    cond["x-kubernetes-list-type"] = "map"
    cond["x-kubernetes-list-map-keys"] = ["type"]
    cond["maxItems"] = 32


def crd() -> dict[str, Any]:
    """The CustomResourceDefinition as a dict."""
    spec = openapi_schema(VisionR1RunSpec)
    spec["description"] = "Desired state: the base model, storage, tracking and the five stages."
    status = openapi_schema(VisionR1RunStatus)
    status["description"] = "Observed state, written by the operator."
    _conditions(status)
    schema = {
        "type": "object",
        "description": "A Vision-R1 pipeline run: synthesis → filter → SFT → GRPO (PTST) → eval.",
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            # At the root, the API server allows a schema for metadata.name (and generateName)
            # only; declaring it lets the name rules below report their field path.
            "metadata": {"type": "object", "properties": {"name": {"type": "string"}}},
            "spec": spec,
            "status": status,
        },
        "x-kubernetes-validations": [
            {
                "rule": f"self.metadata.name.matches('{DNS_1035}')",
                "message": "metadata.name must be a DNS-1035 label: lower-case letters, digits "
                "and '-', starting with a letter (Services are named after the run)",
                "fieldPath": ".metadata.name",
                "reason": "FieldValueInvalid",
            },
            {
                "rule": f"self.metadata.name.size() <= {MAX_RUN_NAME}",
                "message": f"metadata.name must be at most {MAX_RUN_NAME} characters: the longest "
                f"child name, a pod host name <run>-{LONGEST_STAGE}-<attempt>-<index>, must fit "
                "in 63",
                "fieldPath": ".metadata.name",
                "reason": "FieldValueInvalid",
            },
        ],
    }
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{PLURAL}.{GROUP}"},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": KIND,
                "plural": PLURAL,
                "singular": SINGULAR,
                "shortNames": SHORT_NAMES,
                "listKind": f"{KIND}List",
                "categories": ["visionr1"],
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": [
                        {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
                        {"name": "Stage", "type": "string", "jsonPath": ".status.currentStage"},
                        {"name": "Progress", "type": "string", "jsonPath": ".status.progress"},
                        {"name": "Step", "type": "string", "jsonPath": ".status.step"},
                        {"name": "ETA", "type": "string", "jsonPath": ".status.eta"},
                        {"name": "Metric", "type": "string", "jsonPath": ".status.metric"},
                        {
                            "name": "GPU-Hours",
                            "type": "number",
                            "jsonPath": ".status.gpuHours",
                            "priority": 1,
                        },
                        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
                    ],
                    "schema": {"openAPIV3Schema": schema},
                }
            ],
        },
    }


def crd_yaml() -> str:
    header = (
        "# Generated by `visionr1 crd` from visionr1_operator.api. Do not edit by hand:\n"
        "# change the models, then run `make crd` (a test fails when this file drifts).\n"
    )
    return header + yaml.safe_dump(crd(), sort_keys=False, width=100)


def add_arguments(parser: Any) -> None:
    parser.description = "Print the VisionR1Run CRD (YAML)."


def main(args: Any) -> int:
    print(crd_yaml(), end="")
    return 0
