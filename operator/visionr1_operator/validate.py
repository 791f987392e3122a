"""``visionr1 validate FILE...``: check VisionR1Run manifests with the same models the operator uses.

Every error names the field path (``spec.stages.grpo.params.ptst[0].numGenerations``), what was
wrong, and what is allowed.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from visionr1_operator.api import ADMITTED, KIND, VisionR1Run


@dataclass(frozen=True)
class Problem:
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


def field_path(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def _field_info(model: type[BaseModel], loc: tuple[Any, ...]) -> tuple[str | None, list[str]]:
    """Description of the field at ``loc`` and the allowed field names of its parent model."""
    current: Any = model
    description = None
    allowed: list[str] = []
    for part in loc:
        if isinstance(part, int) or current is None:
            continue
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            current = None
            continue
        by_alias = {(f.alias or n): f for n, f in current.model_fields.items()}
        allowed = sorted(by_alias)
        field = by_alias.get(str(part))
        if field is None:
            return None, allowed
        description = field.description
        current = _model_of(field.annotation)
    return description, allowed


def _model_of(annotation: Any) -> Any:
    from typing import get_args

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        found = _model_of(arg)
        if found is not None:
            return found
    return None


def problems_from_validation(
    exc: ValidationError, model: type[BaseModel] = VisionR1Run
) -> list[Problem]:
    out: list[Problem] = []
    for err in exc.errors(include_url=False):
        loc = tuple(err["loc"])
        kind = err["type"]
        description, allowed = _field_info(model, loc)
        if kind == "extra_forbidden":
            msg = (
                f"unknown field; allowed here: {', '.join(allowed)}" if allowed else "unknown field"
            )
            out.append(Problem(field_path(loc), msg))
            continue
        msg = err["msg"].removeprefix("Value error, ")
        if kind != "value_error" and "input" in err and not isinstance(err["input"], dict | list):
            msg += f" (got {err['input']!r})"
        if kind == "missing" and description:
            msg = f"required field is missing: {description}"
        elif description and kind not in ("value_error", "assertion_error"):
            msg += f". Field: {description}"
        out.append(Problem(field_path(loc), msg))
    return out


def validate_object(obj: Any) -> list[Problem]:
    """All problems of one parsed manifest (empty list = valid)."""
    if not isinstance(obj, dict):
        return [Problem("", f"expected a mapping (a VisionR1Run object), got {type(obj).__name__}")]
    if obj.get("kind") != KIND:
        return [Problem("kind", f"expected {KIND!r}, got {obj.get('kind')!r}")]
    try:
        VisionR1Run.model_validate(obj)  # the run name's limits are the model's (api.ObjectMeta)
    except ValidationError as exc:
        return problems_from_validation(exc)
    return []


def accepted_run(obj: dict[str, Any]) -> tuple[VisionR1Run | None, list[Problem]]:
    """Parse a spec whose generation was accepted before (status.observedGeneration ==
    metadata.generation), possibly by an earlier operator: admission-only rules are skipped
    (api.ADMITTED) and fields this operator no longer knows are dropped. Returns the run and
    what was dropped (for a warning), or None and the problems when it cannot be read at all."""
    data = dict(obj)
    dropped: list[Problem] = []
    for _ in range(2):
        try:
            return VisionR1Run.model_validate(data, context={ADMITTED: True}), dropped
        except ValidationError as exc:
            errors = exc.errors(include_url=False)
            extra = [tuple(e["loc"]) for e in errors if e["type"] == "extra_forbidden"]
            if len(extra) != len(errors) or dropped:
                return None, problems_from_validation(exc)
            for loc in extra:
                data = _without(data, loc)
                dropped.append(Problem(field_path(loc), "unknown to this operator; ignored"))
    return None, dropped  # not reached: the second try returns


def _without(data: Any, loc: tuple[Any, ...]) -> Any:
    """``data`` (nested dicts and lists) without the item at ``loc``, copied along the path."""
    if not loc:
        return data
    head, rest = loc[0], loc[1:]
    if isinstance(data, dict) and head in data:
        copy = dict(data)
        if rest:
            copy[head] = _without(data[head], rest)
        else:
            del copy[head]
        return copy
    if isinstance(data, list) and isinstance(head, int) and 0 <= head < len(data):
        copy_list = list(data)
        copy_list[head] = _without(data[head], rest)
        return copy_list
    return data


def validate_file(path: str | Path) -> list[Problem]:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        return [Problem("", f"cannot read: {exc.strerror or exc}")]
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        return [Problem("", f"not valid YAML: {exc}")]
    if not docs:
        return [Problem("", "empty file: expected a VisionR1Run manifest")]
    problems: list[Problem] = []
    for i, doc in enumerate(docs):
        for p in validate_object(doc):
            prefix = f"document {i + 1}: " if len(docs) > 1 else ""
            problems.append(Problem(p.path, prefix + p.message))
    return problems


def add_arguments(parser: Any) -> None:
    parser.description = "Validate VisionR1Run manifests (exit 1 on any error)."
    parser.add_argument("files", nargs="+", metavar="FILE", help="manifest YAML files")


def main(args: Any) -> int:
    bad = 0
    for f in args.files:
        problems = validate_file(f)
        if problems:
            bad += 1
            print(
                f"{f}: INVALID ({len(problems)} error{'s' if len(problems) > 1 else ''})",
                file=sys.stderr,
            )
            for p in problems:
                print(f"  - {p}", file=sys.stderr)
        else:
            print(f"{f}: valid")
    return 1 if bad else 0
