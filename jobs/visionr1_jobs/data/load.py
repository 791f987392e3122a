"""One entry point for every dataset layout: detect the format and dispatch to its reader."""

from __future__ import annotations

import os
from pathlib import Path

from visionr1_jobs.data.io import DataError, is_pipeline_parquet, iter_records, shard_files
from visionr1_jobs.data.record import Sample

PIPELINE_FORMATS = ("visionr1", "toy")


def detect_format(path: str | os.PathLike[str]) -> str:
    """Guess the layout of ``path`` (a file or folder); raises DataError when nothing fits."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"dataset {path}: no such file or directory")
    files = shard_files(path) if path.is_dir() else [path]
    if files and all(f.suffix == ".parquet" for f in files) and is_pipeline_parquet(files[0]):
        return "visionr1"
    raise DataError(
        f"dataset {path}: unknown format; pass format= one of "
        f"{', '.join(PIPELINE_FORMATS)} (public-format readers: see visionr1_jobs.data.readers)"
    )


def load_dataset_dir(
    path: str | os.PathLike[str],
    format: str = "auto",
    *,
    limit: int | None = None,
) -> list[Sample]:
    """Read a dataset of any supported layout into samples (image paths absolute)."""
    fmt = detect_format(path) if format == "auto" else format
    if fmt in PIPELINE_FORMATS:
        records = list(iter_records(path, limit=limit))
    else:
        raise DataError(f"dataset {path}: unknown format {fmt!r}")
    if not records:
        raise DataError(f"dataset {path}: no rows (empty dataset)")
    return records
