"""The filter's per-sample rules on hand-written chains of thought (method.md §3–4)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from visionr1_jobs.answers import extract_answer, format_ok
from visionr1_jobs.config import FilterParams, Replacement
from visionr1_jobs.filtering import rules as R
from visionr1_jobs.filtering.rules import Item, RuleSet, judge

RULES = RuleSet.from_params(FilterParams())
GOOD_THINK = (
    "Okay, let's see. The description says there are 3 red circles and 2 blue squares. "
    "Hmm, the question asks for circles only. Wait, let me double-check: red circle, red circle, "
    "red circle. Yes, three. So the answer is 3."
)


def cot(think: str = GOOD_THINK, final: str = "3") -> str:
    return f"<think> {think} </think><answer> Final Answer:{final} </answer>"


def verdict(
    response: str | None, gold: str = "3", choices: list[str] | None = None, rules: RuleSet = RULES
) -> R.Verdict:
    return judge(Item(0, "How many circles?", gold, choices, response), rules)


# --------------------------------------------------------------------------- kept


def test_a_good_cot_is_kept_rewritten_in_the_exact_vision_r1_format() -> None:
    v = verdict(cot())
    assert v.kept, v
    assert v.response is not None
    assert v.response.startswith("<think> Okay, let's see. The image shows there are 3 red")
    assert v.response.endswith(" </think><answer> Final Answer:3 </answer>")
    assert re.fullmatch(r"<think> .+ </think><answer> Final Answer:3 </answer>", v.response, re.S)
    assert format_ok(v.response) and extract_answer(v.response) == "3"
    assert v.replacements == 1


def test_r1_layout_with_newlines_and_spacing_is_normalised() -> None:
    raw = f"<think>\n{GOOD_THINK}\n</think>\n\n<answer>\nFinal Answer: 3\n</answer>\n"
    v = verdict(raw)
    assert v.kept, v
    assert v.response == cot(GOOD_THINK.replace("The description says", "The image shows"))


def _paper_examples(realdata: Path) -> list[dict[str, str]]:
    return json.loads((realdata / "vision_r1_cold_examples_from_paper.json").read_text())


def _choices(question: str) -> list[str] | None:
    m = re.search(r"Choices:\s*(.*)$", question)
    if not m:
        return None
    return [c.strip() for c in re.split(r"\s*\b[A-D]:\s*", m.group(1)) if c.strip()]


def test_the_four_published_vision_r1_cold_examples_are_kept(realdata: Path) -> None:
    examples = _paper_examples(realdata)
    assert len(examples) == 4
    for ex in examples:
        gold = extract_answer(ex["assistant"])
        assert gold is not None
        v = judge(Item(0, ex["question"], gold, _choices(ex["question"]), ex["assistant"]), RULES)
        assert v.kept, (ex["figure"], v.reason, v.detail)
        # Already in the target format: only the doubled reporting verbs the paper's own
        # replacement left behind are repaired.
        assert v.response is not None and format_ok(v.response)
        assert extract_answer(v.response) == gold
    first = judge(
        Item(
            0,
            examples[0]["question"],
            "B",
            _choices(examples[0]["question"]),
            examples[0]["assistant"],
        ),
        RULES,
    )
    assert "The image illustrates that the formula" in (first.response or "")
    assert "shows illustrates" not in (first.response or "")
    fourth = judge(Item(0, examples[3]["question"], "yes", None, examples[3]["assistant"]), RULES)
    assert "The image shows that some people" in (fourth.response or "")


def test_the_published_examples_with_a_wrong_gold_are_dropped(realdata: Path) -> None:
    ex = _paper_examples(realdata)[1]  # final answer D (24)
    v = judge(Item(0, ex["question"], "A", _choices(ex["question"]), ex["assistant"]), RULES)
    assert v.reason == R.WRONG_ANSWER
    # …and the option text of the right letter is accepted as the same answer.
    v = judge(Item(0, ex["question"], "24", _choices(ex["question"]), ex["assistant"]), RULES)
    assert v.kept, v


# --------------------------------------------------------------------------- drop reasons


@pytest.mark.parametrize(
    ("response", "reason"),
    [
        (None, R.EMPTY),
        ("   ", R.EMPTY),
        ("The answer is 3.", R.MISSING_TAGS),
        ("<think> thinking about it for a while </think> Final Answer:3", R.MISSING_TAGS),
        (f"<think> {GOOD_THINK} <answer> Final Answer:3 </answer>", R.UNBALANCED_TAGS),
        (f"<think> {GOOD_THINK} </think><answer> Final Answer:3", R.UNBALANCED_TAGS),
        (cot() + "<answer> Final Answer:3 </answer>", R.REPEATED_TAGS),
        (
            f"<think> a </think><think> {GOOD_THINK} </think><answer> Final Answer:3 </answer>",
            R.REPEATED_TAGS,
        ),
        (f"<answer> Final Answer:3 </answer><think> {GOOD_THINK} </think>", R.TAGS_OUT_OF_ORDER),
        ("Sure! " + cot(), R.TEXT_OUTSIDE_TAGS),
        (cot() + " Hope this helps.", R.TEXT_OUTSIDE_TAGS),
        (
            f"<think> {GOOD_THINK} </think> so: <answer> Final Answer:3 </answer>",
            R.TEXT_OUTSIDE_TAGS,
        ),
        (f"<think> {GOOD_THINK} </think><answer> 3 </answer>", R.NO_FINAL_ANSWER),
        (f"<think> {GOOD_THINK} </think><answer> Final Answer: </answer>", R.NO_FINAL_ANSWER),
        (
            f"<think> {GOOD_THINK} </think><answer> Final Answer:3 Final Answer:4 </answer>",
            R.MULTIPLE_ANSWERS,
        ),
        (cot("Three.", "3"), R.THINK_TOO_SHORT),
        (
            cot(GOOD_THINK.replace("So the answer is 3.", "So the answer is 4."), "4"),
            R.WRONG_ANSWER,
        ),
        (cot(GOOD_THINK, "4"), R.WRONG_ANSWER),
        (
            cot(GOOD_THINK.replace("So the answer is 3.", "So the answer is 5."), "3"),
            R.INCONSISTENT,
        ),
        (cot(GOOD_THINK + " Wait, actually it is \\boxed{4}.", "3"), R.INCONSISTENT),
        (
            cot(
                GOOD_THINK + " " + "Wait, let me count the circles again from the start. " * 30, "3"
            ),
            R.REPETITION,
        ),
        (cot("x" * 70000), R.TOO_LONG),
        (cot(GOOD_THINK.replace("So the", "The reference answer is 3. So the")), R.ANSWER_LEAK),
        (cot(GOOD_THINK + " This matches the provided answer."), R.ANSWER_LEAK),
    ],
)
def test_each_rule_names_its_drop_reason(response: str | None, reason: str) -> None:
    v = verdict(response)
    assert v.reason == reason, (v.reason, v.detail)
    assert v.response is None
    assert v.detail or reason == R.EMPTY


def test_several_option_letters_are_several_answers_unless_the_gold_has_several() -> None:
    choices = ["red", "blue", "green"]
    think = "Hmm, red or blue both look tall. Let me compare again; they are close."
    assert verdict(cot(think, "A or B"), "A", choices).reason == R.MULTIPLE_ANSWERS
    assert verdict(cot(think, "A, B"), "A", choices).reason == R.MULTIPLE_ANSWERS
    assert verdict(cot(think, "A, B"), "A, B", choices).kept


def test_conclusions_are_compared_as_answers_letter_and_option_text() -> None:
    choices = ["2π", "3π", "6π", "8π"]
    think = "The area is π·1·3 = 3π, which is option B. So the answer should be 3π."
    assert verdict(cot(think, "B"), "B", choices).kept
    wrong_turn = think + " Wait, maybe it is 6π? Yes, the answer is C: 6π."
    assert verdict(cot(wrong_turn, "B"), "B", choices).reason == R.INCONSISTENT
    assert verdict(cot(think + " So B is correct.", "B"), "B", choices).kept
    assert verdict(cot(think + " So D is correct.", "B"), "B", choices).reason == R.INCONSISTENT


def test_a_cot_without_an_explicit_conclusion_is_not_called_inconsistent() -> None:
    think = "There are three red circles and two squares; counting only circles gives three."
    assert verdict(cot(think, "3")).kept


def test_the_answer_is_not_x_is_not_a_conclusion() -> None:
    think = GOOD_THINK.replace("So the answer is 3.", "The answer is not 4, so it is three.")
    assert verdict(cot(think, "3")).kept


def test_rules_can_be_switched_off() -> None:
    lax = RuleSet.from_params(FilterParams(require_correct=False, check_consistency=False))
    assert verdict(cot(GOOD_THINK, "4"), rules=lax).kept
    inconsistent = cot(GOOD_THINK.replace("is 3.", "is 5."), "3")
    assert verdict(inconsistent, rules=lax).kept


def test_timeouts_of_the_answer_check_have_their_own_reason() -> None:
    import time

    def slow(pred: str, gold: str, choices: list[str] | None, timeout_s: float) -> bool:
        time.sleep(timeout_s)
        return False

    fast = RuleSet.from_params(FilterParams(verify_timeout_s=0.05))
    v = judge(Item(0, "q", "3", None, cot()), fast, match=slow)
    assert v.reason == R.VERIFY_TIMEOUT


# --------------------------------------------------------------------------- pieces


def test_repeated_ngram_share() -> None:
    assert R.repeated_ngram_share("a b c d e f g h i j k l m n o p", 4) == 0.0
    loop = "wait let me recount " * 10
    assert R.repeated_ngram_share(loop, 4) == 1.0
    mixed = " ".join(f"w{i}" for i in range(40)) + " " + "wait let me recount " * 5
    assert 0.3 < R.repeated_ngram_share(mixed, 4) < 0.4
    assert R.repeated_ngram_share("short text", 8) == 0.0


@pytest.mark.parametrize(
    ("before", "after"),
    [
        ("The description says the bar is 5.", "The image shows the bar is 5."),
        ("the detailed description mentions two cats", "the image shows two cats"),
        ("According to the description, x = 2.", "According to the image, x = 2."),
        ("As described, the angle is 30°.", "As shown, the angle is 30°."),
        ("The description shows shows a cone.", "The image shows a cone."),
        ("In the the description there are 3 dots.", "In the image there are 3 dots."),
        ("the description illustrates a cone", "the image illustrates a cone"),
        ("This text says the width is 4.", "The image says the width is 4."),
        ("The image shows illustrates that L = πrs.", "The image illustrates that L = πrs."),
        ("No wording to change here.", "No wording to change here."),
    ],
)
def test_wording_replacement_and_the_doubled_words_it_creates(before: str, after: str) -> None:
    assert R.replace_wording(before, RULES.replacements)[0] == after


def test_a_replacement_that_ends_in_a_verb_keeps_the_authors_verb() -> None:
    custom = R.compile_replacements([(r"\bthe description\b", "the image shows")])
    text, n = R.replace_wording("The description depicts a triangle. The description", custom)
    assert text == "The image depicts a triangle. The image shows"
    assert n == 2


def test_legitimate_doubles_far_from_a_replacement_stay() -> None:
    text, _ = R.replace_wording(
        "He said that that was fine; the description says so.", RULES.replacements
    )
    assert text == "He said that that was fine; the image shows so."


def test_a_bad_replacement_regex_names_itself() -> None:
    params = FilterParams(replacements=[Replacement(pattern="(unclosed", replacement="x")])
    with pytest.raises(ValueError, match=r"replacements\[0\]"):
        RuleSet.from_params(params)


def test_last_conclusion_patterns() -> None:
    choices = ["a", "b", "c", "d"]
    assert R.last_conclusion("so the answer is 12.", None) == "12"
    assert R.last_conclusion("The answer should be D:24. Let me check. Yes.", choices) == "D"
    assert R.last_conclusion("thus \\boxed{\\frac{1}{2}} is it", None) == "\\frac{1}{2}"
    assert R.last_conclusion("Answer: 3.5. Then, the answer is 7, because", None) == "7"
    assert R.last_conclusion("no conclusion here", None) is None
    assert R.last_conclusion("option C is correct", choices) == "C"
