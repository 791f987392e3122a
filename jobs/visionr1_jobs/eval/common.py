"""What every benchmark scorer shares: the verdict row, gold-field checks, response format facts."""

from __future__ import annotations

from typing import Any

from visionr1_jobs.answers import format_ok


class ScoreInputError(ValueError):
    """A predictions row lacks a gold field the benchmark needs (the message names row and field)."""


def require(row: dict[str, Any], fields: tuple[str, ...], benchmark: str) -> None:
    """Raise ScoreInputError naming the row and every missing field."""
    missing = [f for f in fields if f not in row]
    if missing:
        rid = row.get("id", "<no id>")
        raise ScoreInputError(
            f"{benchmark} row id={rid!r} lacks field(s) {missing}; a {benchmark} predictions row "
            f"needs {list(fields)} (copy them from the benchmark record)"
        )


def verdict(
    row: dict[str, Any],
    response: str,
    extracted: str | None,
    method: str,
    prediction: Any,
    correct: bool,
    **extra: Any,
) -> dict[str, Any]:
    """The saved verdict of one response (every field the report and re-scoring need)."""
    return {
        "id": row.get("id"),
        "extracted": extracted,
        "method": method,
        "prediction": prediction,
        "correct": bool(correct),
        "format_ok": format_ok(response or ""),
        "response_chars": len(response or ""),
        **extra,
    }


def as_list(value: Any) -> list[str]:
    """A group value as a list of labels (skills are lists; most fields are one string)."""
    if value is None or value == "":
        return []
    if isinstance(value, list | tuple):
        return [str(v) for v in value]
    return [str(value)]
