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
    if "grid" not in scene:
        raise ValueError(f"toy describer stand-in: unknown scene kind {scene.get('kind')!r}")
    parts = [f"a {o['color']} square in row {o['row']}, column {o['col']}" for o in objects]
    g = scene["grid"]
    return (
        f"{head} It shows a {g} by {g} grid with {len(objects)} coloured squares, one per cell. "
        f"Row by row: {'; '.join(parts)}. The other cells are empty."
    )


def pseudo_cot(scene: dict[str, Any], question: str, answer: str) -> str:
    """Step 1 of modality bridging: a caption plus reasoning toward the given answer."""
    caption = ". ".join(describe_scene(scene).split(". ")[:2]).rstrip(".") + "."
    step = f"Counting the filled cells gives {len(scene['objects'])} squares."
    return (
        f"Caption: {caption}\nReasoning: The question asks: {question.splitlines()[0]} {step} "
        f"So the answer is {answer}."
    )


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


_SQUARE = re.compile(r"\ba (\w+) square in row (\d+), column (\d+)")


def _read_grid(inp: ReasonerInput) -> list[tuple[str, int, int]]:
    found = [(c, int(r), int(k)) for c, r, k in _SQUARE.findall(inp.description)]
    if not found:
        raise ValueError("toy reasoner stand-in: no squares found in the description")
    return found


def _one_by_one(n: int) -> str:
    return ", ".join(str(i) for i in range(1, n + 1)) or "none"


def _miscount(n: int, rng: random.Random) -> int:
    """A typical slip: one square skipped or one counted twice."""
    return n - 1 if n > 1 and rng.random() < 0.5 else n + 1


def _cells(inp: ReasonerInput) -> int:
    m = re.search(r"a (\d+) by (\d+) grid", inp.description)
    return int(m.group(1)) * int(m.group(2)) if m else 16


def _solve_count(inp: ReasonerInput, rng: random.Random) -> Solution:
    n = len(_read_grid(inp))
    wrong = _miscount(n, rng)
    cells = _cells(inp)
    return Solution(
        answer=str(n),
        steps=[f"{_says(rng)} there are {n} squares."],
        recheck=f"Let me recount the squares one by one: {_one_by_one(n)}. That is {n}.",
        alt=f"Alternatively, {cells - n} of the {cells} cells are empty, and "
        f"{cells} - {cells - n} = {n}. Same result.",
        wrong_answer=str(wrong),
        wrong_steps=[f"{_says(rng)} there are {wrong} squares."],
    )


def _solve_empty(inp: ReasonerInput, rng: random.Random) -> Solution:
    n = len(_read_grid(inp))
    wrong = _miscount(n, rng)
    cells = _cells(inp)
    return Solution(
        answer=str(cells - n),
        steps=[f"{_says(rng)} there are {n} squares.", f"{cells} - {n} = {cells - n}."],
        recheck=f"Let me recount the squares one by one: {_one_by_one(n)}. That is {n}.",
        alt=f"Alternatively, {cells - n} + {n} = {cells}. Same result.",
        wrong_answer=str(cells - wrong),
        wrong_steps=[
            f"{_says(rng)} there are {wrong} squares.",
            f"{cells} - {wrong} = {cells - wrong}.",
        ],
    )


def _solve_parity(inp: ReasonerInput, rng: random.Random) -> Solution:
    n = len(_read_grid(inp))
    if not inp.choices or not {"even", "odd"} <= set(inp.choices):
        raise ValueError("toy reasoner stand-in: an even/odd question needs the two choices")
    wrong = _miscount(n, rng)

    def word(k: int) -> str:
        return "even" if k % 2 == 0 else "odd"

    letter, wrong_letter = (LETTERS[inp.choices.index(word(k))] for k in (n, wrong))
    return Solution(
        answer=letter,
        steps=[f"{_says(rng)} there are {n} squares.", f"{n} is {word(n)}, option {letter}."],
        recheck=f"Let me recount the squares one by one: {_one_by_one(n)}. That is {n}.",
        alt=f"Alternatively, {n} = 2 × {n // 2} + {n % 2}, so it is {word(n)}.",
        wrong_answer=wrong_letter,
        wrong_steps=[
            f"{_says(rng)} there are {wrong} squares.",
            f"{wrong} is {word(wrong)}, option {wrong_letter}.",
        ],
    )


def _kind(inp: ReasonerInput) -> str:
    if "even or odd" in inp.question:
        return "parity"
    if "empty" in inp.question:
        return "empty"
    return "count"


_OPEN = (
    "Okay, let's see.",
    "Okay, so I need to figure this out.",
    "Alright, let me think about this.",
    "Let me start by reading the question carefully.",
)
#: Share of correct answers written in the long, hesitant style (the rest go straight to it):
#: the cold start then holds short and long chains for the same kind of problem, and the
#: completion budget of each PTST stage decides which of the two RL keeps.
LONG_SHARE = 0.4
_HMM = ("Hmm, wait.", "Hmm.", "Wait, let me make sure.", "Hold on. Wait.")
_CLOSE = ("So the answer is {x}.", "Therefore, the answer should be {x}.", "So the answer is {x}.")


def reason(
    prompt: str, rng: random.Random, error_rate: float, inconsistent_rate: float
) -> tuple[str, str]:
    """(response, behaviour) for one reasoner prompt. behaviour ∈ correct | wrong |
    inconsistent:<variant> names what the stand-in did (kept in the audit trail)."""
    inp = parse_reasoner_prompt(prompt)
    kind = _kind(inp)
    sol = {"count": _solve_count, "empty": _solve_empty, "parity": _solve_parity}[kind](inp, rng)
    u = rng.random()
    if u < error_rate:
        body = [*sol.wrong_steps, rng.choice(_CLOSE).format(x=sol.wrong_answer)]
        return _format(" ".join(body), sol.wrong_answer), "wrong"
    if rng.random() < LONG_SHARE:
        # The hesitant R1 style: an opening, a recount, another way round, then the answer.
        question_line = inp.question.splitlines()[0]
        body = [
            f"{rng.choice(_OPEN)} The question is: {question_line}",
            *sol.steps,
            rng.choice(_HMM),
            sol.recheck,
            sol.alt,
            rng.choice(_CLOSE).format(x=sol.answer),
        ]
    else:
        body = [*sol.steps, rng.choice(_CLOSE).format(x=sol.answer)]
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
