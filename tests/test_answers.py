"""The shared answer logic: extraction, the format check and answer equivalence."""

from __future__ import annotations

import threading
import time

import pytest

from visionr1_jobs import answers
from visionr1_jobs.answers import (
    answers_match,
    extract_answer,
    extract_final,
    format_ok,
    last_boxed,
    to_number,
)

PAPER = "<think> The image shows a triangle. So x = 3. </think><answer> Final Answer:B </answer>"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (PAPER, "B"),
        ("<think>t</think><answer>Final Answer: 3</answer>", "3"),
        ("<think>t</think><answer>final answer :  \\frac{1}{2} </answer>", "\\frac{1}{2}"),
        ("<think>t</think><answer> 42 </answer>", "42"),
        ("<think>t</think><answer> Final Answer:yes </answer>", "yes"),
        ("<answer>1</answer> then <answer> Final Answer:2 </answer>", "2"),
        ("<think>t</think><answer> Final Answer:3", None),  # cut at the token budget
        ("<think>t</think><answer> Final Answer: </answer>", None),
        ("The answer is 3.", None),
        ("", None),
    ],
)
def test_extract_answer(text: str, expected: str | None) -> None:
    assert extract_answer(text) == expected


@pytest.mark.parametrize(
    ("text", "mc", "value", "method"),
    [
        (PAPER, None, "B", "answer_tag"),
        ("<answer> Final Answer:\\boxed{7} </answer>", None, "7", "answer_tag"),
        ("<think>long</think><answer> Final Answer:12\n", None, "12", "final_answer"),
        ("so $x=\\boxed{\\frac{1}{2}}$.", None, "\\frac{1}{2}", "boxed"),
        ("Thus the answer is 12 cm.", None, "12 cm", "answer_is"),
        ("Answer: C", True, "C", "answer_is"),
        ("After checking every option I pick (D)", True, "D", "option_letter"),
        # A leading marked option wins over the article "A" later in its own text.
        ("(B) A sphere has no base.", True, "B", "leading_option"),
        ("B. A sphere has no base.", None, "B", "leading_option"),
        ("A sphere has no base, so (C)", True, "C", "option_letter"),
        ("the total is 1,250 apples", False, "1,250", "last_number"),
        ("no idea", None, None, "none"),
    ],
)
def test_extract_final(text: str, mc: bool | None, value: str | None, method: str) -> None:
    assert tuple(extract_final(text, mc)) == (value, method)


def test_last_boxed_is_brace_matched_and_last() -> None:
    assert last_boxed("\\boxed{1} and \\boxed{\\frac{a}{b}}") == "\\frac{a}{b}"
    assert last_boxed("\\boxed{1} and \\boxed{unclosed") == "1"
    assert last_boxed("none") is None


@pytest.mark.parametrize(
    ("text", "ok"),
    [
        (PAPER, True),
        ("<think>x</think>\n\n<answer>3</answer>\n", True),
        ("  <think>\nx\n</think><answer> Final Answer:3 </answer>", True),
        ("<think>x</think><answer> Final Answer:3", False),  # no </answer>
        ("<think></think><answer>3</answer>", False),  # empty think
        ("<think>x</think><answer>  </answer>", False),  # empty answer
        ("<think>x</think><answer>3</answer> trailing", False),
        ("preamble <think>x</think><answer>3</answer>", False),
        ("<answer>3</answer><think>x</think>", False),
        ("<think>x</think><think>y</think><answer>3</answer>", False),
        ("<think>x<think>y</think><answer>3</answer>", False),
        ("<think>x</think><answer>3</answer><answer>4</answer>", False),
        ("<think>x</think>between<answer>3</answer>", False),
        ("", False),
    ],
)
def test_format_ok(text: str, ok: bool) -> None:
    assert format_ok(text) is ok


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("12", 12.0),
        ("-3.5", -3.5),
        ("1,000", 1000.0),
        ("50%", 50.0),
        ("30^\\circ", 30.0),
        ("30°", 30.0),
        ("2191.7 metres", 2191.7),
        ("$12$ cm^2", 12.0),
        ("3/4", 0.75),
        ("\\frac{3}{4}", 0.75),
        ("-\\dfrac{1}{2}", -0.5),
        ("x = 5", 5.0),
        ("2\\sqrt{3}", None),
        ("\\pi", None),
        ("3 + 4", None),
        ("[1, 2]", None),
    ],
)
def test_to_number(text: str, value: float | None) -> None:
    assert to_number(text) == value


OPTS = ["30°", "60°", "90°", "120°"]
MARKERS = ["(c)", "(d)", "(a)", "(b)", "(e)"]  # MathVista pid 849: option texts look like letters


@pytest.mark.parametrize(
    ("pred", "gold", "choices", "expected"),
    [
        # multiple choice: letter <-> option text
        ("B", "60°", OPTS, True),
        ("(B)", "60°", OPTS, True),
        ("b", "60°", OPTS, True),
        ("B. 60°", "60°", OPTS, True),
        ("Option B", "60°", OPTS, True),
        ("60°", "60°", OPTS, True),
        ("60", "60°", OPTS, True),
        ("A", "60°", OPTS, False),
        ("F", "60°", OPTS, False),
        ("(b)", "(b)", MARKERS, True),  # the option text wins over the letter reading
        ("D", "(b)", MARKERS, True),
        ("B", "B", None, True),
        ("(C)", "C", None, True),
        ("C. 40°", "C", None, True),
        ("D", "C", None, False),
        ("B", "B", ["A", "B", "C"], True),  # options that are letters (MathVista pid 10)
        ("20海里", "20海里", ["20海里", "15海里", "20海里"], True),  # duplicate choices
        ("C", "20海里", ["20海里", "15海里", "20海里"], True),
        # numbers, units, tolerance
        ("2191.7 metres", "2191.7", None, True),
        ("1,000", "1000", None, True),
        ("1.498", "1.5", None, True),
        ("1.4", "1.5", None, False),
        ("2.4", "2", None, False),
        ("12.0", "12", None, True),
        ("50%", "50", None, True),
        ("30^{\\circ}", "30", None, True),
        ("x = 5", "5", None, True),
        # LaTeX and symbolic (math-verify in the worker)
        ("\\frac{1}{2}", "0.5", None, True),
        ("1/2", "\\frac{1}{2}", None, True),
        ("2\\sqrt{3}", "\\sqrt{12}", None, True),
        ("\\pi/2", "\\frac{\\pi}{2}", None, True),
        ("x^2+2x+1", "(x+1)^2", None, True),
        ("\\{1,2\\}", "\\{2,1\\}", None, True),
        ("3.46", "2\\sqrt{3}", None, False),
        ("\\boxed{3}", "3", None, True),
        # lists and text
        ("[2014,2016]", "[2014, 2016]", None, True),
        ("[2016, 2014]", "[2014, 2016]", None, False),
        ("2, 3", "[2, 3]", None, True),
        ("Yes", "yes", None, True),
        ("  May. ", "May", None, True),
        ("June", "May", None, False),
        ("", "3", None, False),
        ("3", "", None, False),
    ],
)
def test_answers_match(pred: str, gold: str, choices: list[str] | None, expected: bool) -> None:
    assert answers_match(pred, gold, choices) is expected


def test_exponent_bomb_is_refused_without_sympy() -> None:
    start = time.perf_counter()
    assert answers_match("10^{10^{10}}", "1") is False
    assert answers_match("9999!", "1") is False
    assert answers_match("x" * (answers.MAX_SYMBOLIC_CHARS + 1), "x") is False
    assert time.perf_counter() - start < 1.0


def test_worker_timeout_kills_and_recovers() -> None:
    slow = "\\frac{(x+1)^{80}(x-1)^{80}}{(x^2-1)^{79}}"  # true, but takes sympy about a second
    assert answers_match("\\sqrt{8}", "2\\sqrt{2}", timeout_s=30)  # warm the worker
    start = time.perf_counter()
    assert answers_match(slow, "x^2-1", timeout_s=0.05) is False
    assert time.perf_counter() - start < 0.5
    assert answers._WORKER.proc is None  # the stuck worker was killed
    assert answers_match("\\sqrt{8}", "2\\sqrt{2}", timeout_s=30)  # and a fresh one serves


def test_match_answers_tells_a_timeout_from_a_wrong_answer() -> None:
    slow = "\\frac{(x+1)^{80}(x-1)^{80}}{(x^2-1)^{79}}"
    answers.match_answers("\\sqrt{8}", "2\\sqrt{2}", timeout_s=30)  # warm the worker
    assert answers.match_answers(slow, "x^2-1", timeout_s=0.05) == (False, True)
    assert answers.match_answers("\\sqrt{3}", "2\\sqrt{2}", timeout_s=30) == (False, False)
    # Inside a list: one element's timeout is the list's.
    assert answers.match_answers(f"[{slow}, 2]", "[x^2-1, 2]", timeout_s=0.05).timed_out


def test_a_slow_first_comparison_that_says_false_is_a_wrong_answer_not_a_timeout() -> None:
    """The first call after a (re)start also waits for the worker's imports (seconds): when it
    then answers False, the filter drops the row as wrong, not as a verify timeout."""
    from visionr1_jobs.config import FilterParams
    from visionr1_jobs.filtering.rules import WRONG_ANSWER, Item, RuleSet, judge

    answers._WORKER.stop()  # cold: the next comparison pays the imports
    think = "Let me look at the figure carefully. The length works out to the square root of 3."
    text = f"<think> {think} </think><answer> Final Answer:\\sqrt{{3}} </answer>"
    rules = RuleSet.from_params(FilterParams(verify_timeout_s=0.05, check_consistency=False))
    start = time.perf_counter()
    verdict = judge(Item(0, "q", "2\\sqrt{2}", None, text), rules)
    assert time.perf_counter() - start > 0.05  # it was slow...
    assert verdict.reason == WRONG_ANSWER  # ...and it is a wrong answer


def test_thread_safe_under_concurrency() -> None:
    cases = [
        ("\\frac{2}{4}", "\\frac{1}{2}", True),
        ("2\\sqrt{2}", "\\sqrt{8}", True),
        ("\\sqrt{3}", "\\sqrt{2}", False),
        ("B", "60°", True),
        ("x+1", "1+x", True),
        ("x+2", "1+x", False),
    ]
    results: dict[int, list[bool]] = {}

    def work(k: int) -> None:
        results[k] = [answers_match(p, g, OPTS if g == "60°" else None) for p, g, _ in cases]

    threads = [threading.Thread(target=work, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    expected = [e for _, _, e in cases]
    assert results == {k: expected for k in range(6)}


def test_in_process_mode_without_worker() -> None:
    assert answers_match("2\\sqrt{2}", "\\sqrt{8}", timeout_s=None) is True
    assert answers_match("2\\sqrt{3}", "\\sqrt{8}", timeout_s=None) is False


def test_a_long_letter_tail_that_fails_at_its_end_is_refused_at_once() -> None:
    """A GRPO rollout wrote such an answer and the unit-tail pattern backtracked exponentially on
    it (26 letters: 20 s; the rollout's hung the run). Checked in a child with a deadline, so a
    regression fails instead of hanging the suite."""
    import subprocess
    import sys

    code = "from visionr1_jobs.answers import to_number; print(to_number('5 ' + 'ab' * 200 + '!'))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=True
    )
    assert out.stdout.strip() == "None"
    assert to_number("12 kg m") == 12.0 and to_number("5 m. s") == 5.0
