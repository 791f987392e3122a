"""MathVista scoring: the official normalisation and verdict, fed by a rule-based extractor.

The official pipeline (lupantech/MathVista ``evaluation/``) extracts an answer from the response with
GPT (after a few shortcuts), normalises it (:func:`normalize_extracted_answer`) and compares the
normalised string with ``answer`` using Python ``==``. We reproduce the normalisation and the
verdict exactly, and replace the GPT extractor with rules (:func:`extract`): the official shortcuts,
then the Vision-R1 answer tag and the fallbacks of :func:`visionr1_jobs.answers.extract_final`.
Given the official ``extraction`` the verdicts are identical (tests/test_eval_mathvista.py lists
the only differences, all caused by the released result files predating today's code).
"""

from __future__ import annotations

import re
from typing import Any

from visionr1_jobs.answers import Extraction, extract_final, option_letter, to_number
from visionr1_jobs.eval.common import as_list, require, verdict
from visionr1_jobs.eval.latexnum import try_evaluate

NAME = "mathvista"
REQUIRED = ("answer", "choices", "question_type", "answer_type", "precision")
GROUP_FIELDS = ("question_type", "answer_type", "language", "source", "category", "task")
GROUP_FIELDS_EXTRA = ("context", "grade", "skills")
# The paper's MathVista sub-scores (method.md §7) as the leaderboard defines them.
PAPER_SUBSCORES = {
    "GEO": ("skills", "geometry reasoning"),
    "ALG": ("skills", "algebraic reasoning"),
    "GPS": ("task", "geometry problem solving"),
    "MWP": ("task", "math word problem"),
}


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insert, delete, substitute; each costs 1), as python-Levenshtein's distance."""
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def most_similar(prediction: str, choices: list[str]) -> str:
    """The choice nearest to ``prediction`` by edit distance; the first on a tie (official)."""
    distances = [levenshtein(prediction, c) for c in choices]
    return choices[distances.index(min(distances))]


def normalize_extracted_answer(
    extraction: Any,
    choices: list[str] | None,
    question_type: str,
    answer_type: str,
    precision: Any,
    ignore_empty_extractions: bool = False,
) -> str | None:
    """The official ``normalize_extracted_answer`` (calculate_score.py, e999481), re-implemented.

    MC: the first ``(x)`` letter wins; a valid letter maps to its choice; anything else goes to the
    nearest choice by edit distance, so an MC prediction is always a choice. Integer:
    ``str(int(float(x)))`` (truncation). Float: ``str(round(float(x), int(precision)))``. List:
    ``str(x)``. Failures give None.
    """
    if question_type == "multi_choice":
        text = extraction.strip() if isinstance(extraction, str) else str(extraction)
        if ignore_empty_extractions and not text:
            return None
        letters = re.findall(r"\(([a-zA-Z])\)", text)
        if letters:
            text = letters[0].upper()
        options = list(choices or [])
        sequential = [chr(ord("A") + i) for i in range(len(options))]
        if text in sequential:
            return options[sequential.index(text)]
        if not options:
            return None
        return most_similar(text, options)
    try:
        if answer_type == "integer":
            return str(int(float(extraction)))
        if answer_type == "float":
            return str(round(float(extraction), int(precision)))
        if answer_type == "list":
            return str(extraction)
    except (TypeError, ValueError, OverflowError):
        return None
    return None


def safe_equal(prediction: str | None, answer: str) -> bool:
    return prediction == answer


def _format_number(value: float) -> str:
    return str(int(value)) if value.is_integer() and abs(value) < 1e15 else repr(value)


def _number_in(text: str) -> float | None:
    value = to_number(text)
    if value is None:
        value = try_evaluate(text)
    if value is None:
        nums = re.findall(r"-?\d+(?:\.\d+)?", text.replace(",", ""))
        if len(nums) == 1:
            value = float(nums[0])
    return value


def extract(response: str, row: dict[str, Any]) -> Extraction:
    """Rule-based stand-in for the official GPT extractor.

    The official shortcuts first (empty → ``""``; MC response equal to a choice; integer/float
    response that parses), then the answer tag / ``Final Answer:`` / ``\\boxed{}`` / "the answer
    is" / last-resort patterns, reduced to what the GPT extractor returns: an option letter or
    choice text for MC, a plain number for integer/float, a Python-style list for lists.
    """
    text = (response or "").strip()
    qt, at = row["question_type"], row["answer_type"]
    choices = list(row.get("choices") or [])
    if not text:
        return Extraction("", "empty")
    if qt == "multi_choice" and text in choices:
        return Extraction(text, "exact_choice")
    if at in ("integer", "float"):
        try:
            float(text) if at == "float" else int(text)
            return Extraction(text, "plain")
        except ValueError:
            pass
    if at == "list":
        if re.fullmatch(r"\[[^\[\]]*\]", text):
            return Extraction(text, "plain")
    found = extract_final(text, multiple_choice=qt == "multi_choice")
    value, method = found
    if value is None:
        # Like a GPT extractor handed a sentence: MC goes to edit distance on the tail, numbers fail.
        return Extraction(text[-200:] if qt == "multi_choice" else "", "none")
    if qt == "multi_choice":
        for c in choices:
            if value.strip() == c.strip():
                return Extraction(c, method)
        idx = option_letter(value, len(choices))
        if idx is not None:
            return Extraction(chr(ord("A") + idx), method)
        return Extraction(value, method)
    if at in ("integer", "float"):
        number = _number_in(value)
        return Extraction(_format_number(number) if number is not None else value, method)
    if at == "list":
        if not value.strip().startswith("["):
            lists = re.findall(r"\[[^\[\]]*\]", text)
            if lists:
                return Extraction(lists[-1], "last_list")
        inner = value.strip().strip("[]()")
        nums = [n.strip() for n in inner.split(",")]
        if len(nums) > 1 and all(re.fullmatch(r"-?\d+(?:\.\d+)?", n) for n in nums):
            return Extraction("[" + ", ".join(nums) + "]", method)
    return Extraction(value, method)


def score_extraction(row: dict[str, Any], extraction: Any) -> tuple[str | None, bool]:
    """(official prediction, official verdict) of a given extraction."""
    prediction = normalize_extracted_answer(
        extraction,
        row.get("choices"),
        row["question_type"],
        row["answer_type"],
        row.get("precision"),
    )
    return prediction, safe_equal(prediction, row["answer"])


def score(row: dict[str, Any], response: str) -> dict[str, Any]:
    """Extract from the raw response, then judge with the official rules.

    A row that already carries the official ``extraction`` (an official result file, re-scored
    with ``visionr1 score``) is judged on that extraction with the official normalisation only,
    so those files re-score as they were scored: an integer row whose extraction is
    ``"2000 and 2005"`` is wrong, whatever number our extractor would find in the response.
    """
    require(row, REQUIRED, NAME)
    given = row.get("extraction")
    if isinstance(given, str):
        prediction, correct = score_extraction(row, given)
        return verdict(row, response, given, "given_extraction", prediction, correct)
    extracted, method = extract(response, row)
    prediction, correct = score_extraction(row, extracted)
    return verdict(row, response, extracted, method, prediction, correct)


def groups(row: dict[str, Any]) -> dict[str, list[str]]:
    """Category labels of a row: the official aggregation fields and the paper's sub-scores."""
    meta = row.get("metadata") or {}
    out: dict[str, list[str]] = {}
    for field in GROUP_FIELDS + GROUP_FIELDS_EXTRA:
        value = row.get(field, meta.get(field))
        if value not in (None, "", []):
            out[field] = as_list(value)
    paper = [
        label for label, (field, wanted) in PAPER_SUBSCORES.items() if wanted in out.get(field, [])
    ]
    if paper:
        out["paper"] = paper
    return out


def prompt(row: dict[str, Any]) -> str:
    """The official zero-shot query (HF ``query`` / GitHub ``query.json``)."""
    return str(row.get("query") or row["question"])
