"""Check objects against the generated CRD the way the API server would: OpenAPI schema + CEL."""

from __future__ import annotations

import copy
from typing import Any

import celpy
import jsonschema

from visionr1_operator.crd import crd


def openapi_schema() -> dict[str, Any]:
    return crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def _strict(node: dict[str, Any]) -> dict[str, Any]:
    """Server-side strict field validation: unknown fields are errors, not pruned."""
    node = dict(node)
    if node.get("type") == "object" and "properties" in node:
        node["properties"] = {
            # The root's metadata is ObjectMeta, checked by the API server itself; the CRD
            # may only add rules for its name, so it is never closed.
            k: v if k == "metadata" and "spec" in node["properties"] else _strict(v)
            for k, v in node["properties"].items()
        }
        if not node.get("x-kubernetes-preserve-unknown-fields") and set(node["properties"]) != {
            "apiVersion",
            "kind",
            "metadata",
            "spec",
            "status",
        }:
            node["additionalProperties"] = False
    elif node.get("type") == "object" and isinstance(node.get("additionalProperties"), dict):
        node["additionalProperties"] = _strict(node["additionalProperties"])
    if node.get("type") == "array" and "items" in node:
        node["items"] = _strict(node["items"])
    return node


def schema_errors(obj: dict[str, Any]) -> list[str]:
    """OpenAPI v3.0 (draft-4 semantics: boolean exclusiveMinimum) with strict unknown fields."""
    validator = jsonschema.Draft4Validator(_strict(copy.deepcopy(openapi_schema())))
    return [
        f"{'.'.join(str(p) for p in e.absolute_path)}: {e.message}"
        for e in validator.iter_errors(obj)
    ]


_ENV = celpy.Environment()
_PROGRAMS: dict[str, Any] = {}


def _program(rule: str) -> Any:
    if rule not in _PROGRAMS:
        _PROGRAMS[rule] = _ENV.program(_ENV.compile(rule))
    return _PROGRAMS[rule]


def cel_errors(obj: Any, schema: dict[str, Any] | None = None, path: str = "") -> list[str]:
    """Evaluate every x-kubernetes-validations rule at the node it is attached to."""
    schema = openapi_schema() if schema is None else schema
    out: list[str] = []
    for v in schema.get("x-kubernetes-validations", []):
        result = _program(v["rule"]).evaluate({"self": celpy.json_to_cel(obj)})
        if isinstance(result, Exception) or not bool(result):
            where = f"{path}{v['fieldPath']}" if v.get("fieldPath") else path
            out.append(f"{where.lstrip('.') or '<root>'}: {v['message']}")
    if isinstance(obj, dict):
        for key, sub in (schema.get("properties") or {}).items():
            if key in obj:
                out += cel_errors(obj[key], sub, f"{path}.{key}" if path else key)
        addl = schema.get("additionalProperties")
        if isinstance(addl, dict):
            for key, value in obj.items():
                out += cel_errors(value, addl, f"{path}.{key}")
    elif isinstance(obj, list) and "items" in schema:
        for i, item in enumerate(obj):
            out += cel_errors(item, schema["items"], f"{path}[{i}]")
    return out


def api_server_errors(obj: dict[str, Any]) -> list[str]:
    return schema_errors(obj) + cel_errors(obj)
