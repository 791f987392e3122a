"""Each shard writes, the last one merges: the one protocol the sharded stages share.

A sharded stage runs as an Indexed Job: pod ``i`` of ``n`` writes only its own outputs, then its
marker ``<stage>/_shards/shard-IIIII.done.json`` (what it did: files, rows, counts, timings). The
pod that, after writing its marker, finds all ``n`` markers merges: it combines the shards'
outputs and writes ``_manifest.json``. The others exit 0 without a manifest, so the Job succeeds
when every index has, and by then one pod has merged.

Why it is correct under concurrency: every write is atomic, and a pod writes its marker *before*
it lists the markers, so of two pods finishing together at least the later one sees both markers
and merges. Two pods merging at once write the same outputs (a merge is a pure function of the
markers and the shard files) and the last rename wins.

``_shards/plan.json`` records the layout every pod must agree on (the shard count, the rows);
resuming under another layout would mix two of them and duplicate or lose rows.

A merge is idempotent and can run on its own (:func:`merge_again`): given the finished shards'
markers it rebuilds the merged outputs and the manifest. That is how an operator recovers a Job
that succeeded but left no ``_manifest.json`` (a merging pod killed after the last marker).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from visionr1_jobs.config import ResolvedStageConfig
from visionr1_jobs.contract import (
    InvalidInput,
    StageManifest,
    atomic_write_json,
    stage_dir,
    write_manifest,
)

SHARDS_DIR = "_shards"
PLAN = "plan.json"

#: markers of every shard, in index order → the stage's manifest (after writing merged outputs)
Merge = Callable[[list[dict[str, Any]]], StageManifest]


class ShardsIncomplete(RuntimeError):
    """A merge was asked for while some shards have not finished (the message names them)."""


def marker_path(out_dir: Path, index: int) -> Path:
    return out_dir / SHARDS_DIR / f"shard-{index:05d}.done.json"


def plan_path(out_dir: Path) -> Path:
    return out_dir / SHARDS_DIR / PLAN


def agree_on_plan(out_dir: Path, plan: dict[str, Any], stage: str = "the stage") -> None:
    """Record the layout on first start; refuse (InvalidInput) to resume under a different one."""
    path = plan_path(out_dir)
    if path.exists():
        before = json.loads(path.read_text())
        if before != plan:
            changed = {
                k: (before.get(k), plan.get(k))
                for k in sorted(set(plan) | set(before))
                if before.get(k) != plan.get(k)
            }
            raise InvalidInput(
                f"{path}: {stage} was started with a different layout {changed} (old, new); "
                f"rerun with the old values, or delete the {out_dir.name} folder to start over"
            )
        return
    atomic_write_json(path, plan)


def read_plan(out_dir: Path) -> dict[str, Any]:
    """The recorded layout (raises ShardsIncomplete when no shard ever started)."""
    try:
        return dict(json.loads(plan_path(out_dir).read_text()))
    except FileNotFoundError:
        raise ShardsIncomplete(f"{plan_path(out_dir)} is missing: no shard has started") from None


def write_marker(out_dir: Path, index: int, marker: dict[str, Any]) -> Path:
    return atomic_write_json(marker_path(out_dir, index), marker)


def read_marker(out_dir: Path, index: int) -> dict[str, Any] | None:
    try:
        return dict(json.loads(marker_path(out_dir, index).read_text()))
    except FileNotFoundError:
        return None


def missing_shards(out_dir: Path, count: int) -> list[int]:
    return [i for i in range(count) if not marker_path(out_dir, i).exists()]


def read_markers(out_dir: Path, count: int) -> list[dict[str, Any]] | None:
    """Every shard's marker in index order, or None while any shard is unfinished."""
    out = []
    for i in range(count):
        marker = read_marker(out_dir, i)
        if marker is None:
            return None
        out.append(marker)
    return out


def finish_shard(
    cfg: ResolvedStageConfig,
    index: int,
    count: int,
    marker: dict[str, Any],
    merge: Merge,
) -> StageManifest | None:
    """Mark shard ``index`` done; when every shard is, merge and write the manifest.

    Returns the manifest, or None when other shards are still running (this pod exits 0 and the
    last one to finish merges)."""
    out_dir = stage_dir(cfg)
    write_marker(out_dir, index, marker)
    markers = read_markers(out_dir, count)
    if markers is None:
        return None
    manifest = merge(markers)
    write_manifest(cfg, manifest)
    return manifest


def merge_again(cfg: ResolvedStageConfig, merge: Merge, count: int | None = None) -> StageManifest:
    """Merge the finished shards' outputs and write the manifest, outside any shard's run.

    ``count`` defaults to the recorded plan's ``shards``. Raises :class:`ShardsIncomplete`
    naming the shards without a marker."""
    out_dir = stage_dir(cfg)
    if count is None:
        count = int(read_plan(out_dir)["shards"])
    markers = read_markers(out_dir, count)
    if markers is None:
        missing = missing_shards(out_dir, count)
        raise ShardsIncomplete(
            f"{out_dir}: shard(s) {missing} of {count} have not finished (no "
            f"{SHARDS_DIR}/shard-NNNNN.done.json); rerun them before merging"
        )
    manifest = merge(markers)
    write_manifest(cfg, manifest)
    return manifest
