"""The GRPO reward on hand-written completions (method.md §6: hard formatting result reward)."""

from __future__ import annotations

import pytest

from visionr1_jobs.training.rewards import Score, combine, completion_text, reward_functions, score


def tagged(answer: str, think: str = "Count the shapes: 1 + 2 = 3.") -> str:
    return f"<think> {think} </think><answer> Final Answer:{answer} </answer>"


CASES = [
    # (name, completion, gold, choices, format, accuracy)
    ("correct", tagged("3"), "3", None, 1, 1),
    (
        "correct with newlines",
        "<think>\nHmm, 3.\n</think>\n<answer> Final Answer:3 </answer>\n",
        "3",
        None,
        1,
        1,
    ),
    ("wrong", tagged("4"), "3", None, 1, 0),
    ("no tags", "Final Answer:3", "3", None, 0, 0),
    ("think missing", "<answer> Final Answer:3 </answer>", "3", None, 0, 1),
    ("answer tag missing", "<think> it is 3 </think> Final Answer:3", "3", None, 0, 0),
    ("empty think", "<think> </think><answer> Final Answer:3 </answer>", "3", None, 0, 1),
    (
        "think repeated",
        "<think> a </think><think> b </think><answer> Final Answer:3 </answer>",
        "3",
        None,
        0,
        1,
    ),
    ("out of order", "<answer> Final Answer:3 </answer><think> 1 + 2 </think>", "3", None, 0, 1),
    ("text after answer", tagged("3") + " Also maybe 4.", "3", None, 0, 1),
    ("cut off at the budget", "<think> 1 + 2 = 3 </think><answer> Final Answ", "3", None, 0, 0),
    ("cut off inside think", "<think> 1 + 2 = 3, so the answer", "3", None, 0, 0),
    (
        "two answers",
        "<think> x </think><answer> Final Answer:2 </answer><answer> Final Answer:3 </answer>",
        "3",
        None,
        0,
        1,
    ),
    ("MC letter for letter gold", tagged("B"), "B", ["2", "3", "5"], 1, 1),
    ("MC option text for letter gold", tagged("3"), "B", ["2", "3", "5"], 1, 1),
    ("MC '(B)' form", tagged("(B)"), "B", ["2", "3", "5"], 1, 1),
    ("MC wrong letter", tagged("C"), "B", ["2", "3", "5"], 1, 0),
    ("MC wrong option text", tagged("5"), "B", ["2", "3", "5"], 1, 0),
    ("LaTeX fraction vs decimal", tagged("0.5"), "\\frac{1}{2}", None, 1, 1),
    ("slash fraction vs LaTeX", tagged("1/2"), "\\frac{1}{2}", None, 1, 1),
    ("dfrac vs frac", tagged("\\dfrac{3}{4}"), "\\frac{3}{4}", None, 1, 1),
    ("wrong fraction", tagged("\\frac{2}{3}"), "\\frac{3}{4}", None, 1, 0),
    ("unit after number", tagged("5 cm"), "5", None, 1, 1),
    ("degrees", tagged("30^\\circ"), "30", None, 1, 1),
    ("percent", tagged("25\\%"), "25", None, 1, 1),
    ("wrong number with unit", tagged("6 cm"), "5", None, 1, 0),
]


@pytest.mark.parametrize(
    ("completion", "gold", "choices", "fmt", "acc"),
    [c[1:] for c in CASES],
    ids=[c[0] for c in CASES],
)
def test_format_and_accuracy(
    completion: str, gold: str, choices: list[str] | None, fmt: int, acc: int
) -> None:
    s = score(completion, gold, choices, timeout_s=20)
    assert s == Score(float(fmt), float(acc))
    # Vision-R1: the reward is 1 only when both hold; Vision-R1-Zero: the average.
    assert combine(s, "hard_format_result") == float(fmt and acc)
    assert combine(s, "format_plus_accuracy") == 0.5 * fmt + 0.5 * acc


def test_reward_functions_take_trl_batches() -> None:
    funcs, weights = reward_functions("hard_format_result", timeout_s=20)
    assert [f.__name__ for f in funcs] == ["hard_format_result", "format", "accuracy"]
    assert weights == [1.0, 0.0, 0.0]  # format and accuracy are logged, never trained on
    # TRL passes conversational completions and the dataset's columns repeated per generation.
    completions = [
        [{"role": "assistant", "content": tagged("3")}],
        [{"role": "assistant", "content": tagged("4")}],
        [{"role": "assistant", "content": "<think> 3 </think><answer> Final Answer:3"}],
        [{"role": "assistant", "content": tagged("B")}],
    ]
    kwargs = {
        "prompts": [[{"role": "user", "content": "q"}]] * 4,
        "answer": ["3", "3", "3", "B"],
        "choices": [None, None, None, ["1", "3"]],
        "completion_ids": [[1]] * 4,
    }
    out = {f.__name__: f(completions=completions, **kwargs) for f in funcs}
    assert out["hard_format_result"] == [1.0, 0.0, 0.0, 1.0]
    assert out["format"] == [1.0, 1.0, 0.0, 1.0]
    assert out["accuracy"] == [1.0, 0.0, 0.0, 1.0]


def test_zero_variant_and_bad_inputs() -> None:
    funcs, _ = reward_functions("format_plus_accuracy", timeout_s=20)
    assert funcs[0](completions=[tagged("4"), "3"], answer=["3", "3"]) == [0.5, 0.0]
    with pytest.raises(ValueError, match="unknown reward"):
        reward_functions("exact_match")
    with pytest.raises(ValueError, match="'answer' column"):
        funcs[0](completions=[tagged("3")], answer=[])


def test_completion_text_shapes() -> None:
    assert completion_text("plain") == "plain"
    assert (
        completion_text(
            [
                {
                    "role": "assistant",
                    "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
                }
            ]
        )
        == "ab"
    )
