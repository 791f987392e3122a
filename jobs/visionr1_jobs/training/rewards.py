"""The GRPO rewards of method.md §6: the hard formatting result reward and its parts.

* ``hard_format_result`` (Vision-R1): 1 when the completion is exactly
  ``<think>…</think><answer>…</answer>`` AND its answer is correct, else 0.
* ``format_plus_accuracy`` (Vision-R1-Zero): ``0.5·format + 0.5·accuracy``.

``format`` and ``accuracy`` are also exposed as their own reward functions so TRL logs them apart
(``rewards/format/mean``, ``rewards/accuracy/mean``); the stage gives them weight 0, so they never
change the advantage. Answer extraction, the format check and answer equivalence come from
:mod:`visionr1_jobs.answers` (math-verify in a killable worker: thread safe, time bounded).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from visionr1_jobs.answers import answers_match, extract_answer, format_ok

RewardKind = str  # "hard_format_result" | "format_plus_accuracy"


class Score(NamedTuple):
    """Format and accuracy of one completion, each 0.0 or 1.0."""

    format: float
    accuracy: float


def completion_text(completion: Any) -> str:
    """The assistant text of a TRL completion: a plain string, or a conversational message list."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        return completion_text(completion.get("content", ""))
    if isinstance(completion, Sequence):
        parts = []
        for item in completion:
            if isinstance(item, dict) and item.get("type") == "text":
                parts.append(str(item.get("text", "")))
            elif isinstance(item, dict) and "content" in item:
                parts.append(completion_text(item["content"]))
            elif isinstance(item, str):
                parts.append(item)
        return "".join(parts)
    return str(completion)


def score(
    text: str, gold: str, choices: Sequence[str] | None = None, timeout_s: float = 5.0
) -> Score:
    """Format (the exact think/answer layout) and accuracy (the tagged answer matches ``gold``).

    Accuracy is judged on the last complete answer tag whatever the format, so a correct answer
    in a malformed completion still shows up in the accuracy metric; the hard reward multiplies
    the two. A completion cut at the budget has no ``</answer>``: format 0 and accuracy 0.
    """
    fmt = 1.0 if format_ok(text) else 0.0
    pred = extract_answer(text)
    acc = 0.0
    if pred is not None:
        acc = (
            1.0 if answers_match(pred, gold, list(choices) if choices else None, timeout_s) else 0.0
        )
    return Score(fmt, acc)


def combine(s: Score, kind: RewardKind) -> float:
    """The training reward of one completion."""
    if kind == "hard_format_result":
        return s.format * s.accuracy
    if kind == "format_plus_accuracy":
        return 0.5 * s.format + 0.5 * s.accuracy
    raise ValueError(f"unknown reward {kind!r}: use hard_format_result or format_plus_accuracy")


class Scorer:
    """Scores completions once per (text, gold, choices) for all reward functions of a step.

    TRL calls each reward function on the same batch in turn; the cache makes the format and
    accuracy functions (weight 0, for logging) free after the training reward ran. Bounded, and
    guarded by a lock because TRL may run reward functions from several threads.
    """

    def __init__(self, timeout_s: float = 5.0, cache_size: int = 8192) -> None:
        self.timeout_s = timeout_s
        self.cache_size = cache_size
        self._cache: OrderedDict[tuple[str, str, tuple[str, ...] | None], Score] = OrderedDict()
        self._lock = threading.Lock()

    def __call__(self, text: str, gold: str, choices: Sequence[str] | None) -> Score:
        key = (text, str(gold), tuple(str(c) for c in choices) if choices else None)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        result = score(text, str(gold), choices, self.timeout_s)
        with self._lock:
            self._cache[key] = result
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return result

    def batch(
        self, completions: Sequence[Any], answer: Sequence[str], choices: Sequence[Any] | None
    ) -> list[Score]:
        if len(answer) != len(completions):
            raise ValueError(
                f"reward: {len(completions)} completions but {len(answer)} answers; the dataset's "
                "'answer' column must reach the reward (GRPOConfig.remove_unused_columns=False)"
            )
        chs = choices if choices is not None else [None] * len(completions)
        return [
            self(completion_text(c), a, ch)
            for c, a, ch in zip(completions, answer, chs, strict=True)
        ]


RewardFunc = Callable[..., list[float]]


def reward_functions(
    kind: RewardKind, timeout_s: float = 5.0
) -> tuple[list[RewardFunc], list[float]]:
    """TRL reward functions and their weights: the training reward first (weight 1), then
    ``format`` and ``accuracy`` with weight 0 so they are logged but never trained on.

    Each function takes TRL's keyword arguments: ``completions`` and the dataset columns
    ``answer`` (gold, as after 'Final Answer:') and optional ``choices`` (option texts).
    """
    combine(Score(0.0, 0.0), kind)  # refuse an unknown kind now, not at the first step
    scorer = Scorer(timeout_s)

    def _scores(
        completions: Sequence[Any], answer: Sequence[str], choices: Any = None, **_: Any
    ) -> list[Score]:
        return scorer.batch(completions, answer, choices)

    def train_reward(
        completions: Sequence[Any], answer: Sequence[str], choices: Any = None, **kw: Any
    ) -> list[float]:
        return [combine(s, kind) for s in _scores(completions, answer, choices)]

    def format_reward(
        completions: Sequence[Any], answer: Sequence[str], choices: Any = None, **kw: Any
    ) -> list[float]:
        return [s.format for s in _scores(completions, answer, choices)]

    def accuracy_reward(
        completions: Sequence[Any], answer: Sequence[str], choices: Any = None, **kw: Any
    ) -> list[float]:
        return [s.accuracy for s in _scores(completions, answer, choices)]

    # TRL names each function's metrics after __name__ (rewards/<name>/mean).
    train_reward.__name__ = kind
    format_reward.__name__ = "format"
    accuracy_reward.__name__ = "accuracy"
    return [train_reward, format_reward, accuracy_reward], [1.0, 0.0, 0.0]
