"""DynaMath scoring: the official rules (``evaluation/gpt4o/gpt_4o_json_eval.py``) on our extraction.

Official: floats are correct within an absolute 0.001 (a token like ``2π`` is evaluated); for
multiple choice a one-character answer must equal the gold letter, a longer one must contain it in
its first 3 characters; text answers are correct when the gold is a (case-sensitive) substring.
Metrics: average accuracy, and worst-case accuracy (a seed question counts only if every variant of
it is correct).
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from typing import Any

from visionr1_jobs.answers import extract_final, to_number
from visionr1_jobs.eval.common import require, verdict
from visionr1_jobs.eval.latexnum import try_evaluate

NAME = "dynamath"
REQUIRED = ("answer", "answer_type")
FLOAT_TOL = 1e-3
NUMERIC_TYPES = {"float", "int", "single answer"}  # the seed file's extra types are numbers


def _float_of(text: str) -> float | None:
    text = text.strip()
    value = to_number(text)
    if value is None:
        value = try_evaluate(text)
    if value is None and text:
        first = text.split()[0]
        if "π" in first:
            coef = first.replace("π", "").strip() or "1"
            try:
                return float(coef) * math.pi
            except ValueError:
                return None
        value = to_number(first)
    return value


def official_correct(extracted: str, answer: str, answer_type: str) -> bool:
    """The official per-type comparison of a short answer with the gold."""
    if answer_type in NUMERIC_TYPES:
        pred, gold = _float_of(extracted), _float_of(answer)
        return pred is not None and gold is not None and abs(pred - gold) <= FLOAT_TOL
    if answer_type == "multiple choice":
        text = extracted.strip()
        if len(text) == 1:
            return text == answer.strip()
        return answer.strip() in text[:3]
    return answer in extracted


def score(row: dict[str, Any], response: str) -> dict[str, Any]:
    require(row, REQUIRED, NAME)
    at = str(row["answer_type"])
    value, method = extract_final(response or "", multiple_choice=at == "multiple choice")
    extracted = value if value is not None else ""
    if at == "multiple choice" and extracted:
        m = re.match(r"^\(?([A-E])\)?(?:[.:)\s]|$)", extracted.strip())
        extracted = m.group(1) if m else extracted
    correct = bool(extracted) and official_correct(extracted, str(row["answer"]), at)
    return verdict(row, response, value, method, extracted, correct)


def groups(row: dict[str, Any]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for field in ("subject", "level", "answer_type", "variant"):
        value = row.get(field)
        if value not in (None, ""):
            out[field] = [re.sub(r"\s+", " ", str(value))]
    return out


def extra_metrics(rows: list[dict[str, Any]], verdicts: list[dict[str, Any]]) -> dict[str, float]:
    """Worst-case accuracy over seed questions (``qid``): all variants must be correct."""
    by_q: dict[str, list[bool]] = defaultdict(list)
    for row, v in zip(rows, verdicts, strict=True):
        by_q[str(row.get("qid", row.get("id")))].append(bool(v["correct"]))
    if not by_q:
        return {}
    return {"worst_case_accuracy": sum(all(v) for v in by_q.values()) / len(by_q)}


def prompt(row: dict[str, Any]) -> str:
    return str(row["question"])
