"""MathVerse scoring, rule-based (the official judge is GPT; ``--quick_match`` is exact equality).

MathVerse has no ``choices`` field: options live in the question text in several layouts
(``Choices:\\nA:40°``, ``Choice:\\nA. 090^\\circ T``, ``A.$y$``), and gold answers come as a letter,
``(C)``, several letters (``C\\nD``), or option text (``False``). Free-form golds carry units, LaTeX,
``$…$``, bearings and mojibake (``118掳T``). We parse the options, reduce the gold to letters where
it names options, and compare with :func:`visionr1_jobs.answers.answers_match` (letter ↔ option
text, numbers with units stripped, math-verify). The official exact-match verdict is kept as
``quick_match`` beside ours.
"""

from __future__ import annotations

import re
from typing import Any

from visionr1_jobs.answers import answers_match, extract_final, option_letter
from visionr1_jobs.eval.common import as_list, require, verdict

NAME = "mathverse"
REQUIRED = ("answer", "question_type")
MAIN_VERSIONS = ("Text Dominant", "Text Lite", "Vision Intensive", "Vision Dominant", "Vision Only")

# Between the letters of a several-option answer ("C and D", "C, D", "C和D"): whitespace, a
# comma, a semicolon, 和 or the word "and" (not the letters a, n and d: "a and d" names A and D).
_SEPARATORS = re.compile(r"(?:\s|,|;|和|\band\b)+", re.IGNORECASE)
_OPTION_LINE = re.compile(r"^\s*\(?([A-H])\)?\s*[:.：)]\s*(.*?)\s*$")


def parse_choices(question: str) -> list[str] | None:
    """Option texts listed after a ``Choice(s):`` line, in letter order; None if there are none."""
    m = re.search(r"Choices?\s*[:：]?\s*\n", question)
    if not m:
        return None
    options: list[str] = []
    for line in question[m.end() :].split("\n"):
        om = _OPTION_LINE.match(line)
        if not om or om.group(1) != chr(ord("A") + len(options)):
            break
        options.append(om.group(2))
    return options or None


def gold_letters(answer: str, n_choices: int) -> set[str] | None:
    """``"C"``, ``"(C)"``, ``"C\\nD"`` → letters; None when the gold is option text instead."""
    parts = [p for p in re.split(r"[\s,]+", answer.strip()) if p]
    letters = set()
    for p in parts:
        idx = option_letter(p, max(n_choices, 1))
        if idx is None or len(p.strip("()")) != 1:
            return None
        letters.add(chr(ord("A") + idx))
    return letters or None


def clean_gold(answer: str) -> str:
    """Free-form gold without ``$``, a leading ``Name =``, mojibake degrees or trailing space."""
    text = answer.replace("掳", "°").replace("$", "").strip()
    text = re.sub(r"^[A-Za-z][\w ]*?=\s*", "", text)
    return text.strip()


def score(row: dict[str, Any], response: str) -> dict[str, Any]:
    require(row, REQUIRED, NAME)
    answer = str(row["answer"])
    mc = str(row["question_type"]).replace("_", "-") == "multi-choice"
    choices = parse_choices(str(row.get("question_for_eval") or row.get("question") or ""))
    value, method = extract_final(response or "", multiple_choice=mc)
    quick = value is not None and value.strip() == answer.strip()
    if value is None:
        correct = False
    elif mc:
        letters = gold_letters(answer, len(choices) if choices else 8)
        if letters is not None and len(letters) > 1:
            said = {
                chr(ord("A") + i)
                for p in _SEPARATORS.split(value)
                if p and (i := option_letter(p, 8)) is not None
            }
            correct = said == letters
        elif letters is not None:
            gold = next(iter(letters))
            correct = answers_match(value, gold, choices)
        else:
            correct = answers_match(value, answer.strip(), choices)
    else:
        correct = answers_match(value, clean_gold(answer))
    return verdict(row, response, value, method, value, correct or quick, quick_match=quick)


def groups(row: dict[str, Any]) -> dict[str, list[str]]:
    meta = row.get("metadata") or {}
    out: dict[str, list[str]] = {}
    for field in ("problem_version", "subject", "subfield", "source", "question_type"):
        labels = as_list(row.get(field, meta.get(field)))
        if labels:
            out[field] = labels
    return out


def prompt(row: dict[str, Any]) -> str:
    """The CoT query (``query_cot``), as VLMEvalKit sends it; the question when absent."""
    return str(row.get("query_cot") or row.get("question") or "")
