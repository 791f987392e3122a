"""Write the toy world as pipeline datasets: ``train/``, ``rl/`` and ``bench/`` under one folder."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from visionr1_jobs.data.io import store_image, write_records
from visionr1_jobs.toy.world import generate, render, to_sample

SPLITS: tuple[str, ...] = ("train", "rl", "bench")


def _replace_dir(tmp: Path, dest: Path) -> None:
    """Swap a finished folder into place, so readers never see half a split."""
    old = None
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        os.replace(dest, old)
    os.replace(tmp, dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_toy_dataset(
    out: str | os.PathLike[str],
    n: int,
    seed: int = 0,
    *,
    n_rl: int | None = None,
    n_bench: int | None = None,
    rows_per_shard: int = 256,
) -> dict[str, int]:
    """Write ``out/train`` (n rows), ``out/rl`` (n_rl, default n) and ``out/bench`` (n_bench,
    default max(n // 2, 12)) as pipeline parquet; returns rows per split.

    The three splits never share a problem. The benchmark is drawn first from its own stream, so
    for one seed it stays the same whatever ``n`` is.
    """
    sizes = {
        "bench": n_bench if n_bench is not None else max(n // 2, 12),
        "rl": n_rl if n_rl is not None else n,
        "train": n,
    }
    for split, k in sizes.items():
        if k < 1:
            raise ValueError(f"toy data: the {split} split needs at least 1 row, got {k}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    seen: set[str] = set()
    for split in ("bench", "rl", "train"):
        tmp = Path(tempfile.mkdtemp(prefix=f".{split}.tmp-", dir=out))
        tmp.chmod(0o755)  # mkdtemp makes it private; other pods (other uids) read the data
        try:
            samples = []
            for problem, sid in generate(sizes[split], seed, split, exclude=seen):
                rel = store_image(tmp, render(problem.scene))
                samples.append(to_sample(problem, sid, rel, split, seed))
            write_records(samples, tmp, rows_per_shard=rows_per_shard)
            for f in tmp.rglob("*"):  # atomic temp files are 0600; pods of other uids read these
                f.chmod(0o755 if f.is_dir() else 0o644)
            _replace_dir(tmp, out / split)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return {s: sizes[s] for s in SPLITS}
