"""The filter's per-sample rules (method.md §3): pure functions, one verdict per sample.

A reasoner output survives when, in this order, it is non-empty and not over-long; its tags are
exactly ``<think>…</think><answer>…</answer>``; the answer block holds one ``Final Answer:X``;
the thinking is long enough and free of runaway repetition; X matches the ground truth; the
thinking's last explicit conclusion agrees with X; and the thinking does not cite the reference
answer the reasoner was shown. The first failing rule names the drop reason.
Survivors get the wording replacement ("the description says" → "the image shows", plus the
doubled words that creates) and are rewritten in the exact Vision-R1 format
``<think> … </think><answer> Final Answer:X </answer>``.

Answer equivalence is :func:`visionr1_jobs.answers.answers_match` (math-verify behind exact
paths, time bounded); nothing here calls sympy directly.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from visionr1_jobs.answers import (
    MatchResult,
    extract_answer,
    format_ok,
    match_answers,
    normalize_text,
)

# Drop reasons, in the order the rules run (dedupe runs last, across samples).
EMPTY = "empty_response"
TOO_LONG = "too_long"
MISSING_TAGS = "missing_tags"
UNBALANCED_TAGS = "unbalanced_tags"
REPEATED_TAGS = "repeated_tags"
TAGS_OUT_OF_ORDER = "tags_out_of_order"
TEXT_OUTSIDE_TAGS = "text_outside_tags"
NO_FINAL_ANSWER = "no_final_answer"
MULTIPLE_ANSWERS = "multiple_answers"
BAD_FORMAT = "bad_format"
THINK_TOO_SHORT = "think_too_short"
REPETITION = "repetition"
WRONG_ANSWER = "wrong_answer"
VERIFY_TIMEOUT = "verify_timeout"
INCONSISTENT = "inconsistent"
ANSWER_LEAK = "answer_leak"
DUPLICATE = "duplicate"

REASONS: tuple[str, ...] = (
    EMPTY,
    TOO_LONG,
    MISSING_TAGS,
    UNBALANCED_TAGS,
    REPEATED_TAGS,
    TAGS_OUT_OF_ORDER,
    TEXT_OUTSIDE_TAGS,
    NO_FINAL_ANSWER,
    MULTIPLE_ANSWERS,
    BAD_FORMAT,
    THINK_TOO_SHORT,
    REPETITION,
    WRONG_ANSWER,
    VERIFY_TIMEOUT,
    INCONSISTENT,
    ANSWER_LEAK,
    DUPLICATE,
)

# Returns a MatchResult (which knows a timeout from a mismatch) or a plain bool.
Matcher = Callable[[str, str, "list[str] | None", float], "bool | MatchResult"]


@dataclass(frozen=True)
class RuleSet:
    """The filter parameters the per-sample rules need, with the replacement regexes compiled.

    Built once per worker process from :class:`visionr1_jobs.config.FilterParams`.
    """

    require_correct: bool = True
    check_consistency: bool = True
    max_chars: int = 65536
    min_think_chars: int = 16
    repetition_ngram: int = 8
    max_repeated_ngram_share: float = 0.3
    replacements: tuple[tuple[re.Pattern[str], str], ...] = ()
    verify_timeout_s: float = 5.0

    @classmethod
    def from_params(cls, params: Any) -> RuleSet:
        """From a ``FilterParams`` (or anything with the same attributes)."""
        return cls(
            require_correct=params.require_correct,
            check_consistency=params.check_consistency,
            max_chars=params.max_chars,
            min_think_chars=params.min_think_chars,
            repetition_ngram=params.repetition_ngram,
            max_repeated_ngram_share=params.max_repeated_ngram_share,
            replacements=compile_replacements(
                [(r.pattern, r.replacement) for r in params.replacements]
            ),
            verify_timeout_s=params.verify_timeout_s,
        )


@dataclass(frozen=True)
class Item:
    """What the rules see of one sample (small and picklable: it crosses process boundaries)."""

    key: int
    question: str
    gold: str
    choices: list[str] | None
    response: str | None
    images: tuple[str, ...] = ()


@dataclass
class Verdict:
    """The outcome for one sample: kept (``reason`` None, ``response`` rewritten) or dropped."""

    key: int
    reason: str | None
    response: str | None = None
    final: str | None = None
    detail: str = ""
    replacements: int = 0
    #: (images, question) identity of a kept sample, computed in the worker (the parent only
    #: compares it, which keeps the serial part of the filter small).
    dedupe_key: str | None = None

    @property
    def kept(self) -> bool:
        return self.reason is None


# --------------------------------------------------------------------------- tags and parts

_TAG = re.compile(r"<(/?)(think|answer)>", re.IGNORECASE)
_EXPECTED = [("", "think"), ("/", "think"), ("", "answer"), ("/", "answer")]
_FINAL_MARK = re.compile(r"final\s*answer\s*[:：]", re.IGNORECASE)


def check_tags(text: str) -> tuple[str | None, str]:
    """(reason, detail) for the tag structure of a response; (None, "") when it is exactly
    ``<think>…</think><answer>…</answer>`` with only whitespace outside the blocks."""
    tags = [(m.group(1), m.group(2).lower()) for m in _TAG.finditer(text)]
    counts = Counter(tags)
    for name in ("think", "answer"):
        opens, closes = counts[("", name)], counts[("/", name)]
        if opens == 0 and closes == 0:
            return MISSING_TAGS, f"no <{name}> block"
        if opens != closes:
            return UNBALANCED_TAGS, f"<{name}> ×{opens} but </{name}> ×{closes}"
        if opens > 1:
            return REPEATED_TAGS, f"<{name}> appears {opens} times"
    if tags != _EXPECTED:
        order = " ".join(f"<{s}{n}>" for s, n in tags)
        return TAGS_OUT_OF_ORDER, f"tag order is {order}"
    low = text.lower()
    before = text[: low.index("<think>")]
    between = text[low.index("</think>") + len("</think>") : low.index("<answer>")]
    after = text[low.index("</answer>") + len("</answer>") :]
    for where, part in (
        ("before <think>", before),
        ("between the blocks", between),
        ("after </answer>", after),
    ):
        if part.strip():
            return TEXT_OUTSIDE_TAGS, f"text {where}: {part.strip()[:60]!r}"
    return None, ""


def split_blocks(text: str) -> tuple[str, str]:
    """(thinking, answer-block content) of a response that passed :func:`check_tags`."""
    low = text.lower()
    think = text[low.index("<think>") + len("<think>") : low.index("</think>")]
    answer = text[low.index("<answer>") + len("<answer>") : low.index("</answer>")]
    return think.strip(), answer.strip()


_MULTI_LETTERS = re.compile(
    r"^\(?[A-H]\)?(?:\s*(?:,|/|&|\band\b|\bor\b)\s*\(?[A-H]\)?)+\.?$", re.IGNORECASE
)


def several_answers(final: str, gold: str, choices: list[str] | None) -> bool:
    """True when X names several options ("A or B", "A, C") while the gold names one."""
    if not choices:
        return False
    return bool(_MULTI_LETTERS.match(final.strip())) and not _MULTI_LETTERS.match(gold.strip())


# --------------------------------------------------------------------------- conclusions

_CONCLUSION = re.compile(
    r"(?:\b(?:the\s+)?(?:final\s+|correct\s+)?answer\s+(?:is|should\s+be|would\s+be|must\s+be|"
    r"will\s+be)\b|\bfinal\s+answer\s*[:：]|\banswer\s*[:：])"
    # The value is captured in a lookahead so that later conclusions in the same line still match.
    r"(?!\s*not\b)\s*[:：]?\s*(?=(?P<x>[^\n]*))",
    re.IGNORECASE,
)
_LETTER_CORRECT = re.compile(
    r"(?:^|[\s(])(?:option\s+|choice\s+)?\(?(?P<x>[A-H])\)?\s+is\s+(?:the\s+)?(?:correct|right)\b"
)
_SENTENCE_END = re.compile(
    r"[.;!?](?=\s|$)|,\s|\s+(?:because|since|as|but|which|so|and\s+that)\b|\s+-\s"
)
_LEAD = re.compile(r"^(?:option|choice)\s+", re.IGNORECASE)
_LETTER_LEAD = re.compile(r"^\(?([A-H])\)?(?:\s*[:.)]|\s|$)")


def _clean_conclusion(x: str, choices: list[str] | None) -> str:
    m = _SENTENCE_END.search(x)
    value = x[: m.start()] if m else x
    value = value.strip().strip("*\"'`“”").strip()
    value = _LEAD.sub("", value)
    if choices:
        lead = _LETTER_LEAD.match(value)
        if lead:
            return lead.group(1)
    return value


def last_conclusion(think: str, choices: list[str] | None) -> str | None:
    """The answer the thinking last commits to ("so the answer is B", "\\boxed{12}",
    "D is correct"), or None when it never says one explicitly."""
    best: tuple[int, str] | None = None
    for m in _CONCLUSION.finditer(think):
        value = _clean_conclusion(m.group("x"), choices)
        if value:
            best = (m.start(), value)
    box = think.rfind("\\boxed{")
    if box >= 0 and (best is None or box > best[0]):
        depth, i = 1, box + len("\\boxed{")
        start = i
        while i < len(think) and depth:
            depth += {"{": 1, "}": -1}.get(think[i], 0)
            i += 1
        if depth == 0 and think[start : i - 1].strip():
            best = (box, think[start : i - 1].strip())
    if choices:
        for m in _LETTER_CORRECT.finditer(think):
            if best is None or m.start() > best[0]:
                best = (m.start(), m.group("x"))
    return best[1] if best else None


# The reasoner is shown the ground truth (give_answer_to_reasoner); a CoT that leans on it
# ("the reference answer is B") teaches the student to cite an answer it will never be given.
_LEAK = re.compile(
    r"\b(?:reference|provided|given|expected)\s+(?:final\s+)?answer\b|\banswer\s+key\b",
    re.IGNORECASE,
)


def answer_leak(think: str) -> str | None:
    """The phrase by which the thinking cites the answer it was given, or None."""
    m = _LEAK.search(think)
    return m.group(0) if m else None


# --------------------------------------------------------------------------- repetition


def repeated_ngram_share(text: str, n: int) -> float:
    """Share of the words covered by occurrences of the most frequent word n-gram (0 when no
    n-gram repeats). A CoT stuck in a loop repeats one phrase over most of its length."""
    words = text.lower().split()
    if len(words) < 2 * n:
        return 0.0
    grams = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
    gram, count = grams.most_common(1)[0]
    if count < 2:
        return 0.0
    covered = [False] * len(words)
    for i in range(len(words) - n + 1):
        if tuple(words[i : i + n]) == gram:
            for j in range(i, i + n):
                covered[j] = True
    return sum(covered) / len(words)


# --------------------------------------------------------------------------- wording

_L, _R = "\x02", "\x03"  # marks around replaced text, so doubles are fixed only where we made them
_VERBS = (
    "shows|says|states|mentions|notes|indicates|illustrates|depicts|displays|presents|reveals|"
    "describes|suggests|tells|gives|lists|specifies|confirms|highlights|demonstrates"
)
_DOUBLE_RIGHT = re.compile(rf"\b(\w+){_R}(\s+)\1\b", re.IGNORECASE)
_DOUBLE_LEFT = re.compile(rf"\b(\w+)\s+{_L}\1\b", re.IGNORECASE)
_VERB_AFTER = re.compile(rf"\b(?:{_VERBS}){_R}\s+({_VERBS})\b", re.IGNORECASE)
# "The image shows illustrates": two reporting verbs after "the image", as an earlier replacement
# pass leaves them (the paper's own released examples contain two of these).
_IMAGE_TWO_VERBS = re.compile(rf"\b(the\s+image)\s+(?:{_VERBS})\s+({_VERBS})\b", re.IGNORECASE)


def compile_replacements(pairs: list[tuple[str, str]]) -> tuple[tuple[re.Pattern[str], str], ...]:
    """Compile (pattern, replacement) pairs case-insensitively; a bad regex names itself."""
    out = []
    for i, (pattern, replacement) in enumerate(pairs):
        try:
            out.append((re.compile(pattern, re.IGNORECASE), replacement))
        except re.error as exc:
            raise ValueError(f"params.replacements[{i}].pattern {pattern!r}: {exc}") from exc
    return tuple(out)


def _match_case(found: str, replacement: str) -> str:
    if found[:1].isupper() and replacement[:1].islower():
        return replacement[0].upper() + replacement[1:]
    return replacement


def replace_wording(
    text: str, replacements: tuple[tuple[re.Pattern[str], str], ...]
) -> tuple[str, int]:
    """Apply the replacements in order and fix the doubled words they create.

    Returns (new text, number of replacements made). "the description says" → "the image shows";
    "the description shows shows" → "the image shows"; "the the description" → "the image".
    """
    count = 0

    def sub(m: re.Match[str], template: str) -> str:
        nonlocal count
        count += 1
        return _L + _match_case(m.group(0), m.expand(template)) + _R

    for pattern, template in replacements:
        text = pattern.sub(lambda m, t=template: sub(m, t), text)
    if count:
        text = _DOUBLE_RIGHT.sub(lambda m: m.group(1) + _R, text)
        text = _DOUBLE_LEFT.sub(lambda m: _L + m.group(1), text)
        # Keep the author's own verb: "the image shows] illustrates" → "the image illustrates".
        text = _VERB_AFTER.sub(lambda m: m.group(1), text)
        text = text.replace(_L, "").replace(_R, "")
    text = _IMAGE_TWO_VERBS.sub(lambda m: f"{m.group(1)} {m.group(2)}", text)
    return text, count


def vision_r1_response(think: str, final: str) -> str:
    """The exact target format of the released data and the eval regex (method.md §4)."""
    return f"<think> {think.strip()} </think><answer> Final Answer:{final.strip()} </answer>"


# --------------------------------------------------------------------------- the verdict


def _timed_match(
    match: Matcher, pred: str, gold: str, choices: list[str] | None, timeout_s: float
) -> tuple[bool, bool]:
    """(matched, timed out). A MatchResult says itself whether math-verify was stopped at its
    bound (a slow first call that answered False is a wrong answer); for a plain-bool matcher
    only the clock can tell."""
    t0 = time.perf_counter()
    result = match(pred, gold, choices, timeout_s)
    if isinstance(result, MatchResult):
        return result.matched, result.timed_out
    return result, (not result and time.perf_counter() - t0 >= timeout_s)


def judge(item: Item, rules: RuleSet, match: Matcher = match_answers) -> Verdict:
    """Run every rule on one sample; the first failing rule is the drop reason."""
    text = item.response or ""
    if not text.strip():
        return Verdict(item.key, EMPTY, detail="no reasoner output")
    if len(text) > rules.max_chars:
        return Verdict(item.key, TOO_LONG, detail=f"{len(text)} > {rules.max_chars} characters")
    reason, detail = check_tags(text)
    if reason:
        return Verdict(item.key, reason, detail=detail)
    think, answer_block = split_blocks(text)
    marks = len(_FINAL_MARK.findall(answer_block))
    if marks > 1:
        return Verdict(item.key, MULTIPLE_ANSWERS, detail=f"'Final Answer:' ×{marks}")
    final = extract_answer(text)
    if marks == 0 or not final:
        return Verdict(item.key, NO_FINAL_ANSWER, detail=f"answer block {answer_block[:60]!r}")
    if several_answers(final, item.gold, item.choices):
        return Verdict(item.key, MULTIPLE_ANSWERS, final=final, detail=f"X = {final!r}")
    if not format_ok(text):
        return Verdict(item.key, BAD_FORMAT, final=final, detail="answers.format_ok refused it")
    if len(think) < rules.min_think_chars:
        return Verdict(
            item.key, THINK_TOO_SHORT, final=final, detail=f"{len(think)} < {rules.min_think_chars}"
        )
    share = repeated_ngram_share(think, rules.repetition_ngram)
    if share > rules.max_repeated_ngram_share:
        return Verdict(
            item.key,
            REPETITION,
            final=final,
            detail=f"one {rules.repetition_ngram}-gram covers {share:.0%} of the thinking",
        )
    if rules.require_correct:
        ok, timed_out = _timed_match(match, final, item.gold, item.choices, rules.verify_timeout_s)
        if timed_out:
            return Verdict(
                item.key, VERIFY_TIMEOUT, final=final, detail=f"> {rules.verify_timeout_s}s"
            )
        if not ok:
            return Verdict(
                item.key, WRONG_ANSWER, final=final, detail=f"{final!r} vs gold {item.gold!r}"
            )
    if rules.check_consistency:
        said = last_conclusion(think, item.choices)
        if said is not None:
            ok, timed_out = _timed_match(match, said, final, item.choices, rules.verify_timeout_s)
            if timed_out:
                return Verdict(item.key, VERIFY_TIMEOUT, final=final, detail="consistency check")
            if not ok:
                return Verdict(
                    item.key,
                    INCONSISTENT,
                    final=final,
                    detail=f"thinking concludes {said!r}, answer says {final!r}",
                )
    leak = answer_leak(think)
    if leak:
        return Verdict(item.key, ANSWER_LEAK, final=final, detail=f"the thinking cites {leak!r}")
    think, n_repl = replace_wording(think, rules.replacements)
    return Verdict(
        item.key,
        None,
        response=vision_r1_response(think, final),
        final=final,
        replacements=n_repl,
        dedupe_key="\x00".join(item.images) + "\x01" + normalize_text(item.question),
    )
