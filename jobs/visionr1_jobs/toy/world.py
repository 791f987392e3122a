"""Small visual-math problems drawn with pillow, with known answers, deterministic from a seed.

Every problem is a *scene* (plain JSON data) rendered to a small image. The scene is kept in
``Sample.metadata["scene"]`` so the toy describer stand-in can turn it into text.

The picture is a 4×4 grid of 28-pixel cells with 3–8 coloured squares in it. A cell is exactly
one merged vision token of Qwen2.5-VL (14-px patches, 2×2 merge), and every question turns on
how many cells are filled: a quantity a tiny model learns to see in a few minutes of SFT, roughly
(its guesses land on the true count or next to it). The questions then need a step or two on top
of the count: subtract it from the 16 cells, or tell its parity. Answers are small integers or
an option letter, a small answer space, so the cold-started model is sometimes right and
sometimes not: the room GRPO needs. Scene schema::

    {"kind": "count" | "empty" | "parity",
     "size": [W, H], "background": "white", "grid": 4,
     "objects": [{"shape": "square", "color": str, "row": int, "col": int,
                  "center": [x, y], "size": int}, …],        # row-major order
     "target": {"squares": int}}                              # how many cells are filled

Kinds:
* ``count``: "How many squares are there?" — free-form integer.
* ``empty``: "How many cells of the grid are empty?" — free-form integer (16 − count).
* ``parity``: "Is the number of squares even or odd?" — multiple choice (A: even, B: odd),
  answer = option letter.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from visionr1_jobs.data.record import OPTION_LETTERS, Sample, format_choices

SIZE = 112  # pixels; 112×112 becomes 16 vision tokens in Qwen2.5-VL (14-px patches, 2×2 merge)
GRID = 4  # cells per side; one cell = one merged vision token
CELL = SIZE // GRID
KINDS: tuple[str, ...] = ("count", "empty", "parity")
PARITY_CHOICES: tuple[str, ...] = ("even", "odd")
SHAPES: tuple[str, ...] = ("square",)
#: The three colours of the grid world (far apart in RGB, so one linear map tells them apart).
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "blue": (40, 80, 220),
    "green": (30, 160, 60),
}
#: Colours the renderer knows (the grid world draws only ``COLORS``).
PALETTE: dict[str, tuple[int, int, int]] = {
    **COLORS,
    "orange": (240, 140, 20),
    "purple": (140, 60, 180),
    "black": (20, 20, 20),
}


@dataclass(frozen=True)
class ToyProblem:
    """One toy problem before it is rendered and stored."""

    kind: str
    scene: dict[str, Any]
    question: str
    choices: list[str] | None
    answer: str

    def key(self) -> str:
        """Identity of the problem (scene + question): two problems are distinct iff keys differ."""
        return json.dumps([self.scene, self.question], sort_keys=True)


# --------------------------------------------------------------------------- scenes


def _grid_scene(rng: random.Random, kind: str) -> dict[str, Any]:
    n = rng.randint(3, 8)
    cells = sorted(rng.sample(range(GRID * GRID), n))
    objects = []
    for cell in cells:
        row, col = divmod(cell, GRID)
        objects.append(
            {
                "shape": "square",
                "color": rng.choice(list(COLORS)),
                "row": row + 1,
                "col": col + 1,
                "center": [col * CELL + CELL // 2, row * CELL + CELL // 2],
                "size": CELL - 2,
            }
        )
    return {
        "kind": kind,
        "size": [SIZE, SIZE],
        "background": "white",
        "grid": GRID,
        "objects": objects,
        "target": {"squares": n},
    }


def _count_problem(rng: random.Random) -> ToyProblem:
    scene = _grid_scene(rng, "count")
    n = len(scene["objects"])
    return ToyProblem("count", scene, "How many squares are there?", None, str(n))


def _empty_problem(rng: random.Random) -> ToyProblem:
    scene = _grid_scene(rng, "empty")
    n = len(scene["objects"])
    question = f"How many cells of the {GRID} by {GRID} grid are empty?"
    return ToyProblem("empty", scene, question, None, str(GRID * GRID - n))


def _parity_problem(rng: random.Random) -> ToyProblem:
    scene = _grid_scene(rng, "parity")
    n = len(scene["objects"])
    choices = list(PARITY_CHOICES)
    question = f"Is the number of squares even or odd?\n{format_choices(choices)}"
    return ToyProblem("parity", scene, question, choices, OPTION_LETTERS[n % 2])


_MAKERS = {"count": _count_problem, "empty": _empty_problem, "parity": _parity_problem}


def make_problem(rng: random.Random, kind: str | None = None) -> ToyProblem:
    """One problem of ``kind`` (random kind when None), drawn from ``rng``."""
    kind = kind or rng.choice(KINDS)
    if kind not in _MAKERS:
        raise ValueError(f"unknown toy kind {kind!r}; known: {', '.join(KINDS)}")
    return _MAKERS[kind](rng)


# --------------------------------------------------------------------------- rendering


def _font(size: int) -> Any:
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # pillow without FreeType: the fixed bitmap font still draws digits
        return ImageFont.load_default()


def render(scene: dict[str, Any]) -> Any:
    """Draw a scene; returns a PIL RGB image of ``scene["size"]``."""
    from PIL import Image, ImageDraw

    w, h = scene["size"]
    im = Image.new("RGB", (w, h), scene.get("background", "white"))
    draw = ImageDraw.Draw(im)
    for obj in scene["objects"]:
        color = PALETTE[obj["color"]]
        shape = obj["shape"]
        if shape == "bar":
            draw.rectangle(
                [obj["x"], h - 4 - obj["height"], obj["x"] + obj["width"], h - 4], fill=color
            )
            continue
        x, y = obj["center"]
        r = obj["size"] // 2
        if shape == "circle":
            draw.ellipse([x - r, y - r, x + r, y + r], fill=color)
        elif shape == "square":
            draw.rectangle([x - r, y - r, x + r, y + r], fill=color)
        elif shape == "triangle":
            draw.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=color)
        elif shape == "text":
            draw.text((x, y), obj["text"], fill=color, font=_font(obj["size"]), anchor="mm")
        else:
            raise ValueError(f"unknown shape {shape!r} in scene")
    if scene["kind"] == "bars":
        draw.line([(2, h - 4), (w - 2, h - 4)], fill=(0, 0, 0), width=1)
    return im


# --------------------------------------------------------------------------- datasets


def generate(
    n: int, seed: int, split: str, *, exclude: set[str] | None = None
) -> Iterator[tuple[ToyProblem, str]]:
    """``n`` distinct problems of ``split`` with ids, deterministic from (seed, split).

    Problems whose key is in ``exclude`` are skipped (and the set is updated), which keeps the
    splits of one toy dataset disjoint.
    """
    seen = exclude if exclude is not None else set()
    # str seeds hash with sha512 in random.Random: stable across runs and Python builds.
    rng = random.Random(f"visionr1-toy:{seed}:{split}")
    made, tries = 0, 0
    while made < n:
        tries += 1
        if tries > 50 * n + 100:
            raise RuntimeError(f"toy world: cannot draw {n} distinct {split} problems")
        problem = make_problem(rng, KINDS[made % len(KINDS)])
        key = problem.key()
        if key in seen:
            continue
        seen.add(key)
        yield problem, f"toy-{split}-{made:06d}"
        made += 1


def to_sample(
    problem: ToyProblem, sample_id: str, image_path: str, split: str, seed: int
) -> Sample:
    return Sample(
        id=sample_id,
        images=[image_path],
        question=problem.question,
        choices=problem.choices,
        answer=problem.answer,
        source="toy",
        metadata={"kind": problem.kind, "scene": problem.scene, "split": split, "seed": seed},
    )
