"""Small visual-math problems drawn with pillow, with known answers, deterministic from a seed.

Every problem is a *scene* (plain JSON data) rendered to a small image. The scene is kept in
``Sample.metadata["scene"]`` so the toy describer stand-in can turn it into text. Scene schema::

    {"kind": "count" | "add" | "bars",
     "size": [W, H],                      # pixels
     "background": "white",
     "objects": [                         # in drawing order
        {"shape": "circle" | "square" | "triangle", "color": str, "center": [x, y],
         "size": int, "cell": "top-left" | "top" | … | "bottom-right"},            # count
        {"shape": "text", "text": "7", "color": str, "center": [x, y], "size": int,
         "cell": …},                                                                # add
        {"shape": "bar", "color": str, "height": int, "x": int, "width": int,
         "index": int},                                                             # bars
     ],
     "target": {...}}                     # what the question asks about (kind-specific)

Kinds:
* ``count``: "How many circles …?" / "How many red shapes …?" — free-form integer.
* ``add``: two numbers written in the image, "What is the sum …?" — free-form integer.
* ``bars``: 3–4 bars of distinct heights, "Which bar is the tallest/shortest?" — multiple
  choice over the bar colours, answer = option letter.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from visionr1_jobs.data.record import OPTION_LETTERS, Sample, format_choices

SIZE = 112  # pixels; 112×112 becomes 16 vision tokens in Qwen2.5-VL (14-px patches, 2×2 merge)
KINDS: tuple[str, ...] = ("count", "add", "bars")
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "blue": (40, 80, 220),
    "green": (30, 160, 60),
    "orange": (240, 140, 20),
    "purple": (140, 60, 180),
    "black": (20, 20, 20),
}
_GRID = 3
_CELLS = (
    "top-left",
    "top",
    "top-right",
    "left",
    "center",
    "right",
    "bottom-left",
    "bottom",
    "bottom-right",
)


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


def _cell_centers(rng: random.Random, k: int) -> list[tuple[int, int, str]]:
    """k distinct grid cells with a little jitter, so shapes never overlap."""
    step = SIZE // _GRID
    cells = rng.sample(range(_GRID * _GRID), k)
    out = []
    for cell in cells:
        r, c = divmod(cell, _GRID)
        x = c * step + step // 2 + rng.randint(-3, 3)
        y = r * step + step // 2 + rng.randint(-3, 3)
        out.append((x, y, _CELLS[cell]))
    return out


def _count_problem(rng: random.Random) -> ToyProblem:
    total = rng.randint(2, 7)
    by_color = rng.random() < 0.4
    target_shape = rng.choice(SHAPES)
    target_color = rng.choice(list(COLORS))
    n_target = rng.randint(1, total)
    objects = []
    for i, (x, y, cell) in enumerate(_cell_centers(rng, total)):
        hit = i < n_target
        if by_color:
            color = target_color if hit else rng.choice([c for c in COLORS if c != target_color])
            shape = rng.choice(SHAPES)
        else:
            shape = target_shape if hit else rng.choice([s for s in SHAPES if s != target_shape])
            color = rng.choice(list(COLORS))
        objects.append(
            {
                "shape": shape,
                "color": color,
                "center": [x, y],
                "size": rng.randint(18, 26),
                "cell": cell,
            }
        )
    rng.shuffle(objects)
    if by_color:
        target = {"color": target_color}
        question = f"How many {target_color} shapes are there in the image?"
    else:
        target = {"shape": target_shape}
        question = f"How many {target_shape}s are there in the image?"
    scene = {
        "kind": "count",
        "size": [SIZE, SIZE],
        "background": "white",
        "objects": objects,
        "target": target,
    }
    return ToyProblem("count", scene, question, None, str(n_target))


def _add_problem(rng: random.Random) -> ToyProblem:
    a, b = rng.randint(0, 20), rng.randint(0, 20)
    objects = []
    for value, (x, y, cell) in zip((a, b), _cell_centers(rng, 2), strict=True):
        objects.append(
            {
                "shape": "text",
                "text": str(value),
                "color": rng.choice(["black", "blue", "red"]),
                "center": [x, y],
                "size": 26,
                "cell": cell,
            }
        )
    scene = {
        "kind": "add",
        "size": [SIZE, SIZE],
        "background": "white",
        "objects": objects,
        "target": {"operation": "sum"},
    }
    return ToyProblem(
        "add", scene, "What is the sum of the two numbers in the image?", None, str(a + b)
    )


def _bars_problem(rng: random.Random) -> ToyProblem:
    k = rng.randint(3, 4)
    colors = rng.sample(list(COLORS), k)
    heights = rng.sample(range(12, SIZE - 16, 6), k)
    width = (SIZE - 8) // k - 6
    objects = [
        {
            "shape": "bar",
            "color": col,
            "height": h,
            "x": 6 + i * (width + 6),
            "width": width,
            "index": i,
        }
        for i, (col, h) in enumerate(zip(colors, heights, strict=True))
    ]
    tallest = rng.random() < 0.6
    pick = max if tallest else min
    winner = pick(objects, key=lambda o: o["height"])["color"]
    choices = list(colors)
    rng.shuffle(choices)
    word = "tallest" if tallest else "shortest"
    question = f"Which bar is the {word}?\n{format_choices(choices)}"
    scene = {
        "kind": "bars",
        "size": [SIZE, SIZE],
        "background": "white",
        "objects": objects,
        "target": {"extreme": word},
    }
    return ToyProblem("bars", scene, question, choices, OPTION_LETTERS[choices.index(winner)])


_MAKERS = {"count": _count_problem, "add": _add_problem, "bars": _bars_problem}


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
        color = COLORS[obj["color"]]
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
