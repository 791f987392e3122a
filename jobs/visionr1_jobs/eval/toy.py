"""The toy benchmark (the toy world): answers compared with :func:`answers_match`."""

from __future__ import annotations

from typing import Any

from visionr1_jobs.answers import answers_match, extract_final
from visionr1_jobs.eval.common import require, verdict

NAME = "toy"
REQUIRED = ("answer",)


def score(row: dict[str, Any], response: str) -> dict[str, Any]:
    require(row, REQUIRED, NAME)
    choices = row.get("choices") or None
    value, method = extract_final(response or "", multiple_choice=bool(choices))
    correct = value is not None and answers_match(value, str(row["answer"]), choices)
    return verdict(row, response, value, method, value, correct)


def groups(row: dict[str, Any]) -> dict[str, list[str]]:
    kind = row.get("kind") or (row.get("metadata") or {}).get("kind")
    return {"kind": [str(kind)]} if kind else {}


def prompt(row: dict[str, Any]) -> str:
    return str(row["question"])
