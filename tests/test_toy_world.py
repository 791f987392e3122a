"""The toy world: deterministic problems with known answers, and `visionr1 toy data`."""

from __future__ import annotations

import random
from pathlib import Path

from PIL import Image

from visionr1_jobs.data.load import detect_format, load_dataset_dir
from visionr1_jobs.toy.world import COLORS, KINDS, SIZE, make_problem, render
from visionr1_operator.cli import main as visionr1


def _ids_and_images(path: Path) -> list[tuple[str, bytes]]:
    return [(r.id, Path(r.images[0]).read_bytes()) for r in load_dataset_dir(path)]


def test_answers_follow_from_the_scene() -> None:
    rng = random.Random(5)
    seen = set()
    for _ in range(60):
        p = make_problem(rng)
        seen.add(p.kind)
        n = len(p.scene["objects"])
        assert 3 <= n <= 8 and p.scene["target"] == {"squares": n}
        if p.kind == "count":
            assert p.answer == str(n)
        elif p.kind == "empty":
            assert p.answer == str(16 - n)
        else:
            assert p.choices == ["even", "odd"] and "Choices:\nA: even\nB: odd" in p.question
            assert p.answer == ("A" if n % 2 == 0 else "B")
        im = render(p.scene)
        assert im.size == (SIZE, SIZE)
        # One square per grid cell (a cell is one merged vision token): filled cells show their
        # square's colour at the centre, empty cells stay white.
        filled = {(o["row"], o["col"]): o["color"] for o in p.scene["objects"]}
        for row in range(1, 5):
            for col in range(1, 5):
                pixel = im.getpixel(((col - 1) * 28 + 14, (row - 1) * 28 + 14))
                assert pixel == (COLORS[filled[row, col]] if (row, col) in filled else (255,) * 3)
    assert seen == set(KINDS)


def test_toy_data_cli_writes_three_disjoint_deterministic_splits(tmp_path: Path) -> None:
    assert visionr1(["toy", "data", "--out", str(tmp_path / "a"), "--n", "9", "--seed", "7"]) == 0
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["bench", "rl", "train"]
    train = load_dataset_dir(tmp_path / "a" / "train")
    rl = load_dataset_dir(tmp_path / "a" / "rl")
    bench = load_dataset_dir(tmp_path / "a" / "bench")
    assert (len(train), len(rl), len(bench)) == (9, 9, 12)
    assert {r.metadata["kind"] for r in train} == set(KINDS)
    assert any(r.choices for r in train) and any(r.choices is None for r in train)
    assert detect_format(tmp_path / "a" / "train") == "visionr1"
    scenes = [str(r.metadata["scene"]) + r.question for r in train + rl + bench]
    assert len(set(scenes)) == len(scenes)  # no problem shared between splits
    with Image.open(train[0].images[0]) as im:
        assert im.size == (SIZE, SIZE)
    # Same seed → byte-identical data; another seed → other data; bench does not depend on --n.
    assert visionr1(["toy", "data", "--out", str(tmp_path / "b"), "--n", "9", "--seed", "7"]) == 0
    assert _ids_and_images(tmp_path / "a" / "train") == _ids_and_images(tmp_path / "b" / "train")
    assert (
        visionr1(
            [
                "toy",
                "data",
                "--out",
                str(tmp_path / "c"),
                "--n",
                "4",
                "--seed",
                "8",
                "--n-bench",
                "12",
            ]
        )
        == 0
    )
    assert _ids_and_images(tmp_path / "a" / "train")[:4] != _ids_and_images(
        tmp_path / "c" / "train"
    )
    assert visionr1(["toy", "data", "--out", str(tmp_path / "d"), "--n", "30", "--seed", "7"]) == 0
    assert _ids_and_images(tmp_path / "d" / "bench")[:12] == _ids_and_images(
        tmp_path / "a" / "bench"
    )
    # Rewriting into the same folder replaces the splits (no stale shards, no temp folders left).
    assert visionr1(["toy", "data", "--out", str(tmp_path / "a"), "--n", "3", "--seed", "7"]) == 0
    assert len(load_dataset_dir(tmp_path / "a" / "train")) == 3
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["bench", "rl", "train"]


def test_toy_data_cli_refuses_empty_split(tmp_path: Path, capsys) -> None:
    assert visionr1(["toy", "data", "--out", str(tmp_path), "--n", "0"]) == 2
    assert "--n must be >= 1" in capsys.readouterr().err
