"""How synthesis splits work across the pods of an Indexed Job, resumes, and knows it is done.

Layout under the stage folder (``<workspace>/synthesis``)::

    shard-SSSSS-CCCCC.parquet     chunk C of shard S (params.rowsPerShard rows), every raw
                                  teacher output in its rows' ``raw`` (the audit trail); its
                                  presence means "finished": it is renamed into place last
    images/…                      the images, stored once (content-addressed)
    _shards/plan.json             the row layout every pod must agree on
    _shards/shard-SSSSS-CCCCC.failed.json  the rows of chunk C dropped at the teachers (id, step,
                                  reason, error), written just before the chunk itself
    _shards/shard-SSSSS.done.json one marker per finished shard (chunks, rows, hashes, timings)
    _manifest.json                written once every marker exists, by whichever pod sees that

Why it is correct under concurrency: each pod writes only its own chunks and its own marker,
all atomically. A pod writes its marker *before* listing the markers, so of two pods finishing
together at least the later one sees both markers and writes the manifest; two pods writing it
both write the same outputs and rows (atomic rename, last one wins). A killed pod leaves only
hidden temp files, which its replacement deletes before resuming.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from visionr1_jobs.contract import InvalidInput, atomic_write_json

SHARDS_DIR = "_shards"


@dataclass(frozen=True)
class Chunk:
    """Rows ``start:end`` of the input, written as one parquet file by one shard."""

    shard: int
    chunk: int
    start: int
    end: int

    @property
    def name(self) -> str:
        return f"shard-{self.shard:05d}-{self.chunk:05d}"

    @property
    def rows(self) -> int:
        return self.end - self.start


def shard_range(n_rows: int, index: int, count: int) -> tuple[int, int]:
    """Contiguous rows of shard ``index`` of ``count`` (sizes differ by at most one)."""
    return index * n_rows // count, (index + 1) * n_rows // count


def plan_chunks(n_rows: int, index: int, count: int, rows_per_chunk: int) -> list[Chunk]:
    """The chunks of one shard, in order."""
    start, end = shard_range(n_rows, index, count)
    return [
        Chunk(index, j, s, min(s + rows_per_chunk, end))
        for j, s in enumerate(range(start, end, rows_per_chunk))
    ]


def chunk_path(out_dir: Path, chunk: Chunk) -> Path:
    return out_dir / f"{chunk.name}.parquet"


def marker_path(out_dir: Path, index: int) -> Path:
    return out_dir / SHARDS_DIR / f"shard-{index:05d}.done.json"


def clean_stale_temps(out_dir: Path, index: int) -> list[Path]:
    """Delete the temp files a killed pod of this shard left behind (hidden ``.name.*.tmp``)."""
    prefix = f".shard-{index:05d}-"
    removed = []
    if out_dir.is_dir():
        for p in out_dir.iterdir():
            if p.name.startswith(prefix) and p.name.endswith(".tmp"):
                p.unlink(missing_ok=True)
                removed.append(p)
    return removed


def agree_on_plan(out_dir: Path, plan: dict[str, Any]) -> None:
    """Record the row layout on first start; refuse to resume under a different one.

    Chunk names depend on the shard count, the chunk size and the input rows: resuming with
    other values would mix two layouts and duplicate or lose rows.
    """
    path = out_dir / SHARDS_DIR / "plan.json"
    if path.exists():
        before = json.loads(path.read_text())
        if before != plan:
            changed = {
                k: (before.get(k), plan.get(k)) for k in plan if before.get(k) != plan.get(k)
            }
            raise InvalidInput(
                f"{path}: synthesis was started with a different layout {changed} "
                "(old, new); rerun with the old values, or delete the synthesis folder to start over"
            )
        return
    atomic_write_json(path, plan)


def failed_path(out_dir: Path, chunk: Chunk) -> Path:
    return out_dir / SHARDS_DIR / f"{chunk.name}.failed.json"


def write_failed(out_dir: Path, chunk: Chunk, rows: list[dict[str, str]]) -> Path:
    """The rows of ``chunk`` the teachers failed on (an empty list when none did)."""
    return atomic_write_json(failed_path(out_dir, chunk), {"chunk": chunk.name, "rows": rows})


def read_failed(out_dir: Path, chunk: Chunk) -> list[dict[str, str]]:
    """The dropped rows of a finished chunk (none for a chunk written before drops existed)."""
    try:
        return list(json.loads(failed_path(out_dir, chunk).read_text())["rows"])
    except FileNotFoundError:
        return []


def write_marker(out_dir: Path, index: int, marker: dict[str, Any]) -> Path:
    return atomic_write_json(marker_path(out_dir, index), marker)


def read_markers(out_dir: Path, count: int) -> list[dict[str, Any]] | None:
    """Every shard's marker in index order, or None while any shard is unfinished."""
    out = []
    for i in range(count):
        p = marker_path(out_dir, i)
        try:
            out.append(json.loads(p.read_text()))
        except FileNotFoundError:
            return None
    return out


def relpath(path: Path, workspace: str | os.PathLike[str]) -> str:
    return os.path.relpath(path, workspace)
