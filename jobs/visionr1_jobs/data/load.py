"""One entry point for every dataset layout: detect the format and dispatch to its reader.

Bad rows (a missing or corrupt image, no answer, malformed JSON) raise a DataError naming the
file and row, or, with ``skip_bad=True``, are skipped and counted by reason in
:attr:`LoadResult.skipped`. An unknown format or a dataset with no usable row is always an error.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from visionr1_jobs.config import DatasetRef
from visionr1_jobs.data import readers
from visionr1_jobs.data.io import DataError, is_pipeline_parquet, iter_records, shard_files
from visionr1_jobs.data.record import Sample

FORMATS: tuple[str, ...] = (
    "visionr1",
    "toy",
    "llava_cot",
    "mulberry",
    "sharegpt",
    "geometry3k",
    "jsonl",
    "hf_disk",
)
_DATA_SUFFIXES = (".jsonl", ".json", ".parquet")


@dataclass
class LoadResult:
    """Samples read, the format used, and the rows skipped (``reason → count``, first examples)."""

    records: list[Sample]
    format: str
    skipped: Counter[str] = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)

    @property
    def n_skipped(self) -> int:
        return sum(self.skipped.values())


def _data_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    files = sorted(
        p
        for p in path.iterdir()
        if p.is_file()
        and p.suffix in _DATA_SUFFIXES
        and not p.name.startswith((".", "_"))
        and p.name not in ("dataset_info.json", "state.json", "dataset_dict.json")
    )
    return files


def _first_row(file: Path) -> dict | None:
    if file.suffix == ".parquet":
        import pyarrow.parquet as pq

        names = pq.read_schema(file).names
        return dict.fromkeys(names)
    for _, row in readers.json_rows(file):
        return row if isinstance(row, dict) else None
    return None


def _chat_flavour(row: dict) -> str:
    turns = row.get("conversations") or row.get("messages") or []
    text = " ".join(str(t.get("value", t.get("content", ""))) for t in turns if isinstance(t, dict))
    if "<think>" in text or "<answer>" in text:
        return "sharegpt"
    if "<CONCLUSION>" in text or "<REASONING>" in text:
        return "llava_cot"
    return "mulberry"


def detect_format(path: str | os.PathLike[str]) -> str:
    """Guess the layout of ``path`` (a file or folder); raises DataError when nothing fits."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"dataset {path}: no such file or directory")
    if path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "state.json").exists()):
        return "hf_disk"
    files = _data_files(path)
    if not files:
        raise DataError(
            f"dataset {path}: unknown format (no .parquet/.jsonl/.json data files, no "
            f"save_to_disk folder); pass format= one of {', '.join(FORMATS)}"
        )
    first = files[0]
    if first.suffix == ".parquet":
        if is_pipeline_parquet(first):
            return "visionr1"
        cols = set(_first_row(first) or {})
        if {"problem", "answer"} <= cols or {"images", "answer"} <= cols:
            return "geometry3k"
        raise DataError(
            f"{first}: unknown parquet layout (columns {sorted(cols)}); expected a visionr1 shard "
            "or geometry3k columns images/problem/answer"
        )
    row = _first_row(first)
    if row is None:
        raise DataError(f"{first}: no rows (empty dataset)")
    if "conversations" in row or "messages" in row:
        return _chat_flavour(row)
    if any(k in row for k in ("question", "problem", "query", "prompt")):
        return "jsonl"
    raise DataError(
        f"{first} row 0: unknown row layout (keys {sorted(row)}); pass format= one of "
        f"{', '.join(FORMATS)}"
    )


def _rows(
    path: Path, fmt: str, ctx: readers.ImageContext, split: str | None
) -> readers.Iterator[Sample | readers.RowProblem]:
    if fmt == "hf_disk":
        yield from readers.hf_disk(path, ctx, split)
        return
    files = _data_files(path)
    for file in files:
        if fmt == "geometry3k" or (fmt == "jsonl" and file.suffix == ".parquet"):
            yield from readers.parquet_file(file, ctx, fmt)
        elif fmt in ("llava_cot", "mulberry", "sharegpt"):
            yield from readers.chat_file(file, ctx, fmt)
        else:
            yield from readers.flat_file(file, ctx, fmt)


def load_dataset(
    path: str | os.PathLike[str],
    format: str = "auto",
    *,
    image_root: str | os.PathLike[str] | None = None,
    image_cache: str | os.PathLike[str] | None = None,
    limit: int | None = None,
    skip_bad: bool = False,
    check_images: bool = True,
    split: str | None = None,
) -> LoadResult:
    """Read any supported dataset into samples (image paths absolute).

    ``image_root``: folder relative image paths are under (default: the data's folder).
    ``image_cache``: where embedded image bytes are written (content-addressed; default a shared
    folder under the system temp dir). ``split``: the DatasetDict split for ``hf_disk``.
    """
    path = Path(path)
    fmt = detect_format(path) if format == "auto" else format
    if fmt not in FORMATS:
        raise DataError(f"dataset {path}: unknown format {fmt!r}; known: {', '.join(FORMATS)}")
    if not path.exists():
        raise DataError(f"dataset {path}: no such file or directory")
    if fmt in ("visionr1", "toy"):
        records = list(iter_records(path, limit=limit))
        if not records:
            raise DataError(
                f"dataset {path}: no rows (empty dataset; {len(shard_files(path))} shards)"
            )
        return LoadResult(records, fmt)
    root = Path(image_root) if image_root else (path if path.is_dir() else path.parent)
    cache = Path(image_cache) if image_cache else Path(tempfile.gettempdir()) / "visionr1-images"
    root, cache = root.absolute(), cache.absolute()
    ctx = readers.ImageContext(root, cache, check_images)
    result = LoadResult([], fmt)
    for item in _rows(path, fmt, ctx, split):
        if limit is not None and len(result.records) >= limit:
            break
        if isinstance(item, readers.RowProblem):
            if not skip_bad:
                raise DataError(f"{item.detail} (pass skip_bad to skip and count such rows)")
            result.skipped[item.reason] += 1
            if len(result.examples) < 5:
                result.examples.append(item.detail)
            continue
        result.records.append(item)
    if not result.records:
        why = f"; skipped {dict(result.skipped)}: {result.examples[:2]}" if result.skipped else ""
        raise DataError(f"dataset {path}: no usable rows (empty dataset){why}")
    ids = Counter(r.id for r in result.records)
    dupes = [i for i, c in ids.items() if c > 1]
    if dupes:
        # Different files may reuse row labels; ids must stay unique for dedupe and joins.
        seen: Counter[str] = Counter()
        for r in result.records:
            if ids[r.id] > 1:
                seen[r.id] += 1
                r.id = f"{r.id}~{seen[r.id]}"
    return result


def load_dataset_dir(
    path: str | os.PathLike[str], format: str = "auto", **kwargs: object
) -> list[Sample]:
    """The samples of :func:`load_dataset` (same arguments); bad rows raise unless skip_bad."""
    return load_dataset(path, format, **kwargs).records  # type: ignore[arg-type]


def load_dataset_ref(
    ref: DatasetRef, workspace: str | os.PathLike[str], **kwargs: Any
) -> LoadResult:
    """:func:`load_dataset` for a manifest's DatasetRef (relative paths under the workspace)."""
    from visionr1_jobs.contract import resolve_path

    root = resolve_path(workspace, ref.image_root) if ref.image_root else None
    kwargs.setdefault("limit", ref.limit)
    return load_dataset(resolve_path(workspace, ref.path), ref.format, image_root=root, **kwargs)


def describe(result: LoadResult) -> str:
    """One line for logs: rows read, format, skips by reason."""
    return json.dumps(
        {"rows": len(result.records), "format": result.format, "skipped": dict(result.skipped)}
    )
