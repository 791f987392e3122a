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

The markers, the plan and the "last one merges" step are the protocol every sharded stage
shares (:mod:`visionr1_jobs.shards`, where the argument for its correctness under concurrency
is); this module adds the synthesis chunks. Each pod writes only its own chunks, atomically; a
killed pod leaves only hidden temp files, which its replacement deletes before resuming.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from visionr1_jobs import shards as _shared
from visionr1_jobs.contract import atomic_write_json
from visionr1_jobs.shards import SHARDS_DIR, marker_path, read_markers, write_marker

__all__ = ["SHARDS_DIR", "marker_path", "read_markers", "write_marker"]  # re-exported


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
    _shared.agree_on_plan(out_dir, plan, "synthesis")


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


def relpath(path: Path, workspace: str | os.PathLike[str]) -> str:
    return os.path.relpath(path, workspace)
