"""What the toy teacher stand-ins say (pure text functions; the backend wrapper is toy_teachers).

TOY STAND-INS, for the toy world only: they replace the 72B describer and the R1 reasoner so the
synthesis → filter path runs on a laptop with real data flow and real failure modes.

* The toy describer writes the pseudo-CoT and the detailed description from the scene the toy
  world drew (``Sample.metadata["scene"]``, see :mod:`visionr1_jobs.toy.world`).
* The toy reasoner reads only the rendered reasoner prompt (description + question), parses the
  description text back into objects, solves the problem, and writes an R1-style chain of thought
  (hesitation, "Wait", "Alternatively", self-checks) in the exact Vision-R1 format. A seeded share
  of its answers is wrong, and another share is inconsistent or malformed, so the filter has
  real work.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Any

LETTERS = "ABCDEFGH"

# --------------------------------------------------------------------------- describer


def _article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def describe_scene(scene: dict[str, Any]) -> str:
    """A detailed description of a toy scene with every fact needed to answer its question."""
    w, h = scene["size"]
    objects = scene["objects"]
    head = (
        f"The image is a {w}×{h} pixel picture on a {scene.get('background', 'white')} background."
    )
    kind = scene["kind"]
    if kind == "count":
        parts = [
            f"{_article(o['color'])} {o['color']} {o['shape']} in the {o['cell']} area"
            for o in objects
        ]
        return (
            f"{head} It shows {len(objects)} separate filled shapes that do not overlap. "
            f"Going through them one by one: {'; '.join(parts)}. Nothing else is drawn."
        )
    if kind == "add":
        parts = [
            f"the number {o['text']} written in {o['color']} in the {o['cell']} area"
            for o in objects
        ]
        return f"{head} Two numbers are written on it and nothing else: {', and '.join(parts)}."
    if kind == "bars":
        bars = sorted(objects, key=lambda o: o["index"])
        parts = [f"{_article(o['color'])} {o['color']} bar {o['height']} pixels tall" for o in bars]
        return (
            f"{head} It is a simple bar chart with {len(bars)} vertical bars of equal width "
            f"standing on a black baseline, from left to right: {', '.join(parts)}. "
            "There are no axis labels or numbers."
        )
    raise ValueError(f"toy describer stand-in: unknown scene kind {kind!r}")


def pseudo_cot(scene: dict[str, Any], question: str, answer: str) -> str:
    """Step 1 of modality bridging: a caption plus reasoning toward the given answer."""
    caption = ". ".join(describe_scene(scene).split(". ")[:2]).rstrip(".") + "."
    kind = scene["kind"]
    if kind == "count":
        target = scene["target"]
        what = f"{target['color']} shapes" if "color" in target else f"{target['shape']}s"
        step = f"Counting the {what} in the picture gives {answer}."
    elif kind == "add":
        values = " + ".join(o["text"] for o in scene["objects"])
        step = f"The two numbers are {values.replace(' + ', ' and ')}, and {values} = {answer}."
    else:
        step = (
            f"Comparing the bar heights, the {scene['target']['extreme']} bar is option {answer}."
        )
    return f"Caption: {caption}\nReasoning: The question asks: {question.splitlines()[0]} {step} So the answer is {answer}."


# --------------------------------------------------------------------------- reasoner input


@dataclass(frozen=True)
class ReasonerInput:
    """What the toy reasoner recovers from the rendered reasoner prompt."""

    description: str
    question: str
    choices: list[str]
    reference: str | None


_SECTION = re.compile(r"^### (Image description|Question|Reference answer)\s*$", re.MULTILINE)
_CHOICE = re.compile(r"^([A-H]):\s*(.+)$", re.MULTILINE)


def parse_reasoner_prompt(prompt: str) -> ReasonerInput:
    """Split the prompt into its ``### …`` sections (the layout of prompts/v1/reasoner*.txt)."""
    marks = list(_SECTION.finditer(prompt))
    sections: dict[str, str] = {}
    for i, m in enumerate(marks):
        end = marks[i + 1].start() if i + 1 < len(marks) else len(prompt)
        body = prompt[m.end() : end].strip()
        if i + 1 == len(marks):
            body = body.split("\n\n", 1)[0].strip()  # the instruction paragraph follows
        sections[m.group(1)] = body
    if "Image description" not in sections or "Question" not in sections:
        raise ValueError(
            "toy reasoner stand-in: the prompt has no '### Image description' / '### Question' "
            "sections (it understands the layout of prompts/v1/reasoner*.txt only)"
        )
    question = sections["Question"]
    choices = [c.strip() for _, c in _CHOICE.findall(question)]
    return ReasonerInput(
        sections["Image description"], question, choices, sections.get("Reference answer")
    )


# --------------------------------------------------------------------------- reasoner


@dataclass
class Solution:
    """A solved toy problem: the answer and the reasoning steps that reached it."""

    answer: str
    steps: list[str]
    recheck: str
    alt: str
    wrong_answer: str
    wrong_steps: list[str]


_SAYS = (
    "The description says",
    "According to the description,",
    "The description mentions that",
    "From the image,",
    "Looking at the image,",
    "The image shows that",
    "As described,",
)


def _says(rng: random.Random) -> str:
    return rng.choice(_SAYS)


def _solve_count(inp: ReasonerInput, rng: random.Random) -> Solution:
    found = re.findall(
        r"\b(?:a|an) (\w+) (circle|square|triangle) in the ([\w-]+) area", inp.description
    )
    if not found:
        raise ValueError("toy reasoner stand-in: no shapes found in the description")
    m = re.search(r"How many (\w+?)s? (?:shapes )?are there", inp.question)
    if not m:
        raise ValueError(f"toy reasoner stand-in: cannot read the count question {inp.question!r}")
    word = m.group(1)
    by_color = word not in ("circle", "square", "triangle")
    hits = [(c, s, cell) for c, s, cell in found if (c == word if by_color else s == word)]
    what = f"{word} shapes" if by_color else f"{word}s"
    steps = [
        f"{_says(rng)} there are {len(found)} shapes in total. Let me go through them one by one."
    ]
    running = 0
    for c, s, cell in found:
        hit = (c == word) if by_color else (s == word)
        running += hit
        steps.append(
            f"The {c} {s} in the {cell}: {'that is one of them, so ' + str(running) + ' so far' if hit else 'not one of the ' + what}."
        )
    n = len(hits)
    # A typical miscount: one shape skipped or one counted twice.
    wrong_n = n - 1 if n > 1 and rng.random() < 0.5 else n + 1
    wrong_steps = [
        f"{_says(rng)} there are {len(found)} shapes. Scanning them quickly, I see {wrong_n} {what}."
    ]
    others = len(found) - n
    return Solution(
        answer=str(n),
        steps=steps,
        recheck=f"Let me recount: the {what} are "
        + (", ".join(f"the {c} {s} ({cell})" for c, s, cell in hits) or "none")
        + f", which is {n}.",
        alt=f"Alternatively, count what is not one of the {what}: {others} of the {len(found)} "
        f"shapes, and {len(found)} - {others} = {n}. Same result.",
        wrong_answer=str(wrong_n),
        wrong_steps=wrong_steps,
    )


def _solve_add(inp: ReasonerInput, rng: random.Random) -> Solution:
    nums = [int(x) for x in re.findall(r"the number (\d+)", inp.description)]
    if len(nums) != 2:
        raise ValueError("toy reasoner stand-in: expected two numbers in the description")
    a, b = nums
    total = a + b
    slip = total + rng.choice([-10, -1, 1, 10])
    if slip < 0:
        slip = total + 1
    return Solution(
        answer=str(total),
        steps=[
            f"{_says(rng)} two numbers are written: {a} and {b}.",
            f"The question wants their sum, so {a} + {b}. {a} plus {b} is {total}.",
        ],
        recheck=f"Let me verify: {total} - {b} = {a}. Yes, that checks out.",
        alt=f"Alternatively, {b} + {a} = {total} as well, addition is commutative.",
        wrong_answer=str(slip),
        wrong_steps=[
            f"{_says(rng)} the numbers are {a} and {b}.",
            f"Adding them: {a} + {b} = {slip}.",
        ],
    )


def _solve_bars(inp: ReasonerInput, rng: random.Random) -> Solution:
    bars = [
        (c, int(h))
        for c, h in re.findall(r"\b(?:a|an) (\w+) bar (\d+) pixels tall", inp.description)
    ]
    if not bars or not inp.choices:
        raise ValueError("toy reasoner stand-in: no bars or no choices to compare")
    tallest = "tallest" in inp.question
    ranked = sorted(bars, key=lambda b: b[1], reverse=tallest)
    best = ranked[0][0]
    second = ranked[1][0]
    if best not in inp.choices or second not in inp.choices:
        raise ValueError("toy reasoner stand-in: the bar colours do not match the choices")
    letter, wrong = LETTERS[inp.choices.index(best)], LETTERS[inp.choices.index(second)]
    word = "tallest" if tallest else "shortest"
    listing = ", ".join(f"{c} at {h}" for c, h in bars)
    return Solution(
        answer=letter,
        steps=[
            f"{_says(rng)} the bar heights from left to right are: {listing}.",
            f"The {word} is the one with the {'largest' if tallest else 'smallest'} height, "
            f"which is {best} ({ranked[0][1]} pixels). In the choices, {best} is option {letter}.",
        ],
        recheck=f"Let me double-check by comparing {best} with {second}: "
        f"{ranked[0][1]} vs {ranked[1][1]}, so {best} is indeed the {word}.",
        alt="Alternatively, sort all heights: "
        + " < ".join(str(h) for _, h in sorted(bars, key=lambda b: b[1]))
        + f". The {word} is {ranked[0][1]}, the {best} bar.",
        wrong_answer=wrong,
        wrong_steps=[
            f"{_says(rng)} the bars are {listing}.",
            f"Hmm, the {second} bar looks like the {word} one, so option {wrong}.",
        ],
    )


def _kind(inp: ReasonerInput) -> str:
    if "bar chart" in inp.description:
        return "bars"
    if "Two numbers are written" in inp.description:
        return "add"
    return "count"


_OPEN = (
    "Okay, let's see.",
    "Okay, so I need to figure this out.",
    "Alright, let me think about this.",
    "Let me start by reading the question carefully.",
)
_HMM = ("Hmm, wait.", "Hmm.", "Wait, let me make sure.", "Hold on. Wait.")
_CLOSE = ("So the answer is {x}.", "Therefore, the answer should be {x}.", "So the answer is {x}.")


def reason(
    prompt: str, rng: random.Random, error_rate: float, inconsistent_rate: float
) -> tuple[str, str]:
    """(response, behaviour) for one reasoner prompt. behaviour ∈ correct | wrong |
    inconsistent:<variant> names what the stand-in did (kept in the audit trail)."""
    inp = parse_reasoner_prompt(prompt)
    kind = _kind(inp)
    sol = {"count": _solve_count, "add": _solve_add, "bars": _solve_bars}[kind](inp, rng)
    u = rng.random()
    question_line = inp.question.splitlines()[0]
    opening = f"{rng.choice(_OPEN)} The question is: {question_line}"
    if u < error_rate:
        body = [
            opening,
            *sol.wrong_steps,
            rng.choice(_HMM) + " That seems right.",
            rng.choice(_CLOSE).format(x=sol.wrong_answer),
        ]
        return _format(" ".join(body), sol.wrong_answer), "wrong"
    body = [
        opening,
        *sol.steps,
        rng.choice(_HMM),
        sol.recheck,
        sol.alt,
        rng.choice(_CLOSE).format(x=sol.answer),
    ]
    if u >= error_rate + inconsistent_rate:
        return _format(" ".join(body), sol.answer), "correct"
    variant = rng.choice(
        [
            "contradiction",
            "contradiction",
            "two_answers",
            "unclosed_think",
            "repeated_answer",
            "no_final",
            "loop",
            "text_after",
            "cites_reference",
        ]
    )
    think = " ".join(body)
    if variant == "contradiction":
        # The thinking talks itself into another answer, but the final answer is the right one.
        think = " ".join(
            [
                *body[:-1],
                "Wait, actually I think I misread something.",
                rng.choice(_CLOSE).format(x=sol.wrong_answer),
            ]
        )
        return _format(think, sol.answer), f"inconsistent:{variant}"
    if variant == "cites_reference" and inp.reference is not None:
        # Leans on the ground truth it was shown instead of the picture.
        cited = [*body[:-1], f"The reference answer is {inp.reference}, which matches.", body[-1]]
        return _format(" ".join(cited), sol.answer), f"inconsistent:{variant}"
    if variant == "two_answers":
        return (
            f"<think> {think} </think><answer> Final Answer:{sol.answer} </answer>"
            f"<answer> Final Answer:{sol.wrong_answer} </answer>"
        ), f"inconsistent:{variant}"
    if variant == "unclosed_think":
        return (
            f"<think> {think} <answer> Final Answer:{sol.answer} </answer>",
            f"inconsistent:{variant}",
        )
    if variant == "repeated_answer":
        return (
            f"<think> {think} </think><answer> Final Answer:{sol.answer} Final Answer:"
            f"{sol.wrong_answer} </answer>"
        ), f"inconsistent:{variant}"
    if variant == "no_final":
        return f"<think> {think} </think><answer> {sol.answer} </answer>", f"inconsistent:{variant}"
    if variant == "loop":
        loop = " ".join(["Wait, let me recount everything from the start once more."] * 40)
        return _format(f"{' '.join(body[:-1])} {loop}", sol.answer), f"inconsistent:{variant}"
    return _format(think, sol.answer) + " I hope this helps!", f"inconsistent:{variant}"


def _format(think: str, answer: str) -> str:
    return f"<think> {think} </think><answer> Final Answer:{answer} </answer>"
