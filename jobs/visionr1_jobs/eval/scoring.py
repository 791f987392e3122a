"""One entry point over the per-benchmark scorers: score rows, summarise verdicts."""

from __future__ import annotations

from collections import defaultdict
from types import ModuleType
from typing import Any

from visionr1_jobs.eval import dynamath, mathverse, mathvista, mmmath, toy
from visionr1_jobs.eval.common import ScoreInputError

SCORERS: dict[str, ModuleType] = {
    "mathvista": mathvista,
    "mathverse": mathverse,
    "mmmath": mmmath,
    "dynamath": dynamath,
    "toy": toy,
}


def scorer(name: str) -> ModuleType:
    try:
        return SCORERS[name]
    except KeyError:
        raise ScoreInputError(
            f"unknown benchmark {name!r}; known: {', '.join(sorted(SCORERS))}"
        ) from None


def score_row(name: str, row: dict[str, Any], response: str | None = None) -> dict[str, Any]:
    """The verdict of one row; ``response`` defaults to ``row['response']``."""
    text = row.get("response") if response is None else response
    if text is None:
        raise ScoreInputError(f"{name} row id={row.get('id')!r} has no 'response'")
    return scorer(name).score(row, str(text))


def summarize(
    name: str, rows: list[dict[str, Any]], verdicts: list[dict[str, Any]]
) -> dict[str, Any]:
    """Accuracy overall and per category, format rate, mean response length, extra metrics.

    ``rows`` may carry ``response_tokens`` (from generation) for the mean length in tokens and
    ``failed`` (the request failed for good) for the failed-row count.
    """
    mod = scorer(name)
    n = len(verdicts)
    correct = sum(bool(v["correct"]) for v in verdicts)
    per: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(lambda: [0, 0]))
    for row, v in zip(rows, verdicts, strict=True):
        for dim, labels in mod.groups(row).items():
            for label in labels:
                cell = per[dim][label]
                cell[0] += 1
                cell[1] += bool(v["correct"])
    tokens = [r["response_tokens"] for r in rows if isinstance(r.get("response_tokens"), int)]
    summary: dict[str, Any] = {
        "benchmark": name,
        "n": n,
        "correct": correct,
        # Requests that failed for good at generation (scored wrong; counted so it shows).
        "failed": sum(bool(r.get("failed")) for r in rows),
        "accuracy": correct / n if n else 0.0,
        "format_rate": sum(bool(v.get("format_ok")) for v in verdicts) / n if n else 0.0,
        "mean_response_chars": sum(v.get("response_chars", 0) for v in verdicts) / n if n else 0.0,
        "mean_response_tokens": sum(tokens) / len(tokens) if tokens else None,
        "extraction_methods": dict(
            sorted(
                {
                    m: sum(v["method"] == m for v in verdicts)
                    for m in {v["method"] for v in verdicts}
                }.items()
            )
        ),
        "per_category": {
            dim: {
                label: {"n": c[0], "correct": c[1], "accuracy": c[1] / c[0]}
                for label, c in sorted(cells.items())
            }
            for dim, cells in sorted(per.items())
        },
    }
    extra = getattr(mod, "extra_metrics", None)
    if extra is not None:
        summary.update(extra(rows, verdicts))
    return summary
