"""Hand-written (response, gold) cases for every benchmark scorer, both question types, all answer
types: the extraction path and the verdict each benchmark's rules give."""

from __future__ import annotations

from typing import Any

import pytest

from visionr1_jobs.eval.common import ScoreInputError
from visionr1_jobs.eval.scoring import score_row, summarize


def tag(x: str) -> str:
    return f"<think> reasoning </think><answer> Final Answer:{x} </answer>"


def mv(answer: str, qt: str = "free_form", at: str = "integer", **kw: Any) -> dict[str, Any]:
    return {
        "id": "p",
        "answer": answer,
        "question_type": qt,
        "answer_type": at,
        "choices": kw.get("choices"),
        "precision": kw.get("precision"),
        "unit": kw.get("unit"),
    }


DEG = ["30°", "45°", "60°", "90°"]
MARK = ["(c)", "(d)", "(a)", "(b)", "(e)"]

MATHVISTA = [
    # multi_choice / text
    (tag("B"), mv("45°", "multi_choice", "text", choices=DEG), True),
    (tag("(B)"), mv("45°", "multi_choice", "text", choices=DEG), True),
    (tag("45°"), mv("45°", "multi_choice", "text", choices=DEG), True),
    (tag("C"), mv("45°", "multi_choice", "text", choices=DEG), False),
    (
        "Looking at the angles... The answer is (C).",
        mv("60°", "multi_choice", "text", choices=DEG),
        True,
    ),
    ("60°", mv("60°", "multi_choice", "text", choices=DEG), True),  # exact choice shortcut
    (tag("B. 45°"), mv("45°", "multi_choice", "text", choices=DEG), True),
    (
        tag("(b)"),
        mv("(b)", "multi_choice", "text", choices=MARK),
        False,
    ),  # official: letter B → (d)
    (tag("D"), mv("(b)", "multi_choice", "text", choices=MARK), True),
    (
        tag("F"),
        mv("45°", "multi_choice", "text", choices=DEG),
        False,
    ),  # invalid letter → edit distance
    (tag("44°"), mv("45°", "multi_choice", "text", choices=DEG), True),  # nearest choice
    ("", mv("45°", "multi_choice", "text", choices=DEG), False),
    # integer
    (tag("12"), mv("12"), True),
    (tag("12.7"), mv("12"), True),  # int(float()) truncates
    (tag("-3"), mv("-3"), True),
    (tag("1,000"), mv("1000"), True),
    (tag("12 apples"), mv("12"), True),
    (tag("13"), mv("12"), False),
    ("There are 7 birds. So the answer is 7.", mv("7"), True),
    ("I cannot tell.", mv("7"), False),
    # float, precision 1 and 2
    (tag("1.25"), mv("1.2", at="float", precision=1), True),  # Python round on binary floats
    (tag("1.2"), mv("1.2", at="float", precision=1), True),
    (tag("13.80"), mv("13.8", at="float", precision=1), True),
    (tag("0.214"), mv("0.21", at="float", precision=2), True),
    (tag("0.089"), mv("0.09", at="float", precision=2), True),
    (tag("200"), mv("0.0", at="float", precision=1), False),
    (tag("\\frac{1}{4}"), mv("0.25", at="float", precision=2), True),
    (tag("2\\sqrt{3}"), mv("3.46", at="float", precision=2), True),
    (tag("3.5 cm"), mv("3.5", at="float", precision=1), True),
    # list
    (tag("[2014, 2016]"), mv("[2014, 2016]", at="list"), True),
    (tag("[2014,2016]"), mv("[2014, 2016]", at="list"), True),  # we format lists like the extractor
    (tag("[2016, 2014]"), mv("[2014, 2016]", at="list"), False),
    ("[0, 2, 0]", mv("[0, 2, 0]", at="list"), True),
]


@pytest.mark.parametrize(("response", "row", "expected"), MATHVISTA)
def test_mathvista(response: str, row: dict[str, Any], expected: bool) -> None:
    assert score_row("mathvista", row, response)["correct"] is expected


def mverse(answer: str, qt: str = "free-form", question: str = "") -> dict[str, Any]:
    return {"id": "s", "answer": answer, "question_type": qt, "question": question}


Q4 = "Find the angle.\nChoices:\nA:40°\nB:60°\nC:120°\nD:140°"
QTF = "Is it?\nChoices:\nA:True\nB:False"
QMULTI = "Which hold?\nChoices:\nA. x\nB. y\nC. z\nD. w"

MATHVERSE = [
    (tag("D"), mverse("D", "multi-choice", Q4), True),
    (tag("140°"), mverse("D", "multi-choice", Q4), True),
    (tag("A"), mverse("D", "multi-choice", Q4), False),
    (tag("C"), mverse("(C)", "multi-choice", Q4), True),
    (tag("B"), mverse("False", "multi-choice", QTF), True),
    (tag("False"), mverse("False", "multi-choice", QTF), True),
    (tag("C, D"), mverse("C\nD", "multi-choice", QMULTI), True),
    (tag("C"), mverse("C\nD", "multi-choice", QMULTI), False),
    # Several letters, lower case, joined by the word "and" (not split on its letters a, n, d).
    (tag("a and d"), mverse("A\nD", "multi-choice", QMULTI), True),
    (tag("(A) and (D)"), mverse("A\nD", "multi-choice", QMULTI), True),
    (tag("C和D"), mverse("C\nD", "multi-choice", QMULTI), True),
    (tag("a and c"), mverse("A\nD", "multi-choice", QMULTI), False),
    (tag("2191.7"), mverse("2191.7 metres"), True),
    (tag("315°T"), mverse("315^\\circT"), True),
    (tag("118°"), mverse("118掳T"), True),  # mojibake degree sign
    (tag("62"), mverse("62^\\circ "), True),
    (tag("\\frac{\\sqrt{30}}{2}"), mverse("\\frac{\\sqrt{30}}{2}"), True),
    (tag("\\sqrt{7.5}"), mverse("\\frac{\\sqrt{30}}{2}"), True),
    (tag("7"), mverse("$$r=7.00$$"), True),
    (tag("113.1 cm^2"), mverse("Area $=113.1 \\mathrm{~cm}^{2}$"), True),
    (tag("113"), mverse("Area $=113.1 \\mathrm{~cm}^{2}$"), False),
    ("... so L is 14 cm.", mverse("14"), True),
]


@pytest.mark.parametrize(("response", "row", "expected"), MATHVERSE)
def test_mathverse(response: str, row: dict[str, Any], expected: bool) -> None:
    assert score_row("mathverse", row, response)["correct"] is expected


def dyn(answer: str, at: str) -> dict[str, Any]:
    return {"id": "1/trial1", "qid": "1", "answer": answer, "answer_type": at}


DYNAMATH = [
    (tag("2.0944"), dyn("2.0944", "float"), True),
    (tag("2.0948"), dyn("2.0944", "float"), True),  # |Δ| ≤ 0.001
    (tag("2.1"), dyn("2.0944", "float"), False),
    (tag("2π/3"), dyn("2.0944", "float"), True),
    (tag("13"), dyn("13", "float"), True),
    (tag("-15.7"), dyn("-15.700000000000001", "int"), True),  # seed-file type
    (tag("49"), dyn("49", "single answer"), True),
    (tag("B"), dyn("B", "multiple choice"), True),
    (tag("(B) yes"), dyn("B", "multiple choice"), True),
    (tag("A"), dyn("B", "multiple choice"), False),
    (tag("May"), dyn("May", "text"), True),
    (tag("It is May."), dyn("May", "text"), True),  # substring rule
    (tag("may"), dyn("May", "text"), False),  # case-sensitive
    (tag("(0.886, -0.465)"), dyn("(0.886, -0.465)", "text"), True),
]


@pytest.mark.parametrize(("response", "row", "expected"), DYNAMATH)
def test_dynamath(response: str, row: dict[str, Any], expected: bool) -> None:
    assert score_row("dynamath", row, response)["correct"] is expected


MMMATH = [
    (tag("\\boxed{3}"), "\\boxed{3}", True),
    (tag("3"), "the solution ... \\boxed{3}", True),
    (tag("3.46"), "\\boxed{2\\sqrt{3}}", True),
    (tag("3.4"), "\\boxed{2\\sqrt{3}}", False),
    (tag("2, -2"), "\\boxed{\\pm 2}", True),
    (tag("y=1+2x"), "\\boxed{y=2x+1}", True),
    ("so the answer is \\boxed{2} and then \\boxed{3}", "\\boxed{3}", False),
    ("no final answer", "\\boxed{3}", False),
]


@pytest.mark.parametrize(("response", "gold", "expected"), MMMATH)
def test_mmmath(response: str, gold: str, expected: bool) -> None:
    assert score_row("mmmath", {"id": "m", "answer": gold}, response)["correct"] is expected


TOY = [
    (tag("3"), {"answer": "3"}, True),
    (tag("4"), {"answer": "3"}, False),
    (tag("B"), {"answer": "B", "choices": ["red", "blue"]}, True),
    (tag("blue"), {"answer": "B", "choices": ["red", "blue"]}, True),
    ("<think> x </think><answer> Final Answer:3", {"answer": "3"}, True),  # cut, still extracted
]


@pytest.mark.parametrize(("response", "row", "expected"), TOY)
def test_toy(response: str, row: dict[str, Any], expected: bool) -> None:
    assert score_row("toy", {"id": "t", **row}, response)["correct"] is expected


def test_case_count_meets_the_acceptance_floor() -> None:
    assert len(MATHVISTA) + len(MATHVERSE) + len(DYNAMATH) + len(MMMATH) + len(TOY) >= 60


def test_verdict_records_extraction_and_format() -> None:
    v = score_row("mathvista", mv("45°", "multi_choice", "text", choices=DEG), tag("B"))
    assert v == {
        "id": "p",
        "extracted": "B",
        "method": "answer_tag",
        "prediction": "45°",
        "correct": True,
        "format_ok": True,
        "response_chars": len(tag("B")),
    }


def test_missing_gold_field_names_row_and_field() -> None:
    with pytest.raises(ScoreInputError, match=r"id='p'.*\['answer_type'\]"):
        score_row(
            "mathvista",
            {
                "id": "p",
                "answer": "1",
                "question_type": "free_form",
                "choices": None,
                "precision": None,
            },
            "1",
        )
    with pytest.raises(ScoreInputError, match="unknown benchmark"):
        score_row("nope", {"id": "x"}, "1")


def test_summary_per_category_and_worst_case() -> None:
    rows = [
        {**dyn("1", "float"), "id": "1/a", "qid": "1", "subject": "algebra", "response": tag("1")},
        {**dyn("2", "float"), "id": "1/b", "qid": "1", "subject": "algebra", "response": tag("3")},
        {
            **dyn("5", "float"),
            "id": "2/a",
            "qid": "2",
            "subject": "analytic     geometry",
            "response": tag("5"),
            "response_tokens": 9,
        },
    ]
    verdicts = [score_row("dynamath", r) for r in rows]
    s = summarize("dynamath", rows, verdicts)
    assert (s["n"], s["correct"]) == (3, 2)
    assert s["per_category"]["subject"]["algebra"] == {"n": 2, "correct": 1, "accuracy": 0.5}
    assert "analytic geometry" in s["per_category"]["subject"]  # the seed file's spacing typo
    assert s["worst_case_accuracy"] == 0.5
    assert s["format_rate"] == 1.0 and s["mean_response_tokens"] == 9
