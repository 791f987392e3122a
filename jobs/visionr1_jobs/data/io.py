"""The pipeline's own storage: sharded parquet, images stored once and referenced by path.

Layout of a dataset directory::

    DIR/shard-00000.parquet      one row per Sample; each file written atomically
    DIR/shard-00001.parquet
    DIR/images/ab/ab12….png      content-addressed (sha256 of the bytes), shared by all shards

Image paths inside a shard are relative to the folder holding the shard, so a dataset directory
can be moved or mounted anywhere. In memory (what :func:`read_records` returns) they are absolute.
``raw`` and ``metadata`` are stored as JSON text: their keys differ from row to row, and a JSON
column keeps every shard's schema identical.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from visionr1_jobs.contract import InvalidInput, atomic_path
from visionr1_jobs.data.record import SCHEMA_VERSION, Sample

SCHEMA_KEY = b"visionr1.schema"
IMAGES_DIR = "images"
SHARD_GLOB = "*.parquet"


class DataError(InvalidInput):
    """Bad dataset input (missing/corrupt image, unknown format, empty dataset, bad row).

    A subclass of InvalidInput, so a stage that lets it escape exits with EXIT_INVALID_INPUT.
    """


def _schema() -> Any:
    import pyarrow as pa

    return pa.schema(
        [
            ("id", pa.string()),
            ("images", pa.list_(pa.string())),
            ("question", pa.string()),
            ("choices", pa.list_(pa.string())),
            ("answer", pa.string()),
            ("source", pa.string()),
            ("response", pa.string()),
            ("raw", pa.string()),
            ("metadata", pa.string()),
        ],
        metadata={SCHEMA_KEY: SCHEMA_VERSION.encode()},
    )


# --------------------------------------------------------------------------- images


def _image_ext(data: bytes) -> str:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt = (im.format or "png").lower()
    except Exception as exc:  # PIL raises several unrelated types for bad bytes
        raise DataError(f"not a readable image ({type(exc).__name__}: {exc})") from exc
    return {"jpeg": "jpg", "tiff": "tif"}.get(fmt, fmt)


def store_image(dataset_dir: str | os.PathLike[str], image: Any) -> str:
    """Store one image under ``dataset_dir/images/`` once per content; return its relative path.

    ``image`` is a path, encoded bytes, or a PIL image (saved as PNG). Identical bytes map to the
    same file, so the same picture used by many rows (or many shards) is stored once.
    """
    if isinstance(image, bytes | bytearray):
        data = bytes(image)
    elif isinstance(image, str | os.PathLike):
        try:
            data = Path(image).read_bytes()
        except OSError as exc:
            raise DataError(f"image {image}: cannot read ({exc.strerror or exc})") from exc
    else:  # a PIL image
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        data = buf.getvalue()
    digest = hashlib.sha256(data).hexdigest()
    rel = f"{IMAGES_DIR}/{digest[:2]}/{digest}.{_image_ext(data)}"
    dest = Path(dataset_dir) / rel
    if not dest.exists():
        with atomic_path(dest) as tmp:
            tmp.write_bytes(data)
    return rel


def _stored_rel(dataset_dir: Path, image: str) -> str:
    """Reuse an image already in this dataset's store; copy anything else into it."""
    p = Path(image)
    if not p.is_absolute():
        p = dataset_dir / p
    try:
        rel = p.resolve().relative_to(dataset_dir.resolve())
    except ValueError:
        rel = None
    if rel is not None and rel.parts[:1] == (IMAGES_DIR,) and p.exists():
        return rel.as_posix()
    return store_image(dataset_dir, p)


# --------------------------------------------------------------------------- write


def write_shard(records: Iterable[Sample], path: str | os.PathLike[str]) -> Path:
    """Write one parquet shard atomically; images are copied into ``<shard dir>/images/``.

    Relative image paths of the records are taken relative to the shard's folder.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    dataset_dir = path.parent
    dataset_dir.mkdir(parents=True, exist_ok=True)
    rows: dict[str, list[Any]] = {name: [] for name in _schema().names}
    for rec in records:
        rows["id"].append(rec.id)
        rows["images"].append([_stored_rel(dataset_dir, im) for im in rec.images])
        rows["question"].append(rec.question)
        rows["choices"].append(rec.choices)
        rows["answer"].append(rec.answer)
        rows["source"].append(rec.source)
        rows["response"].append(rec.response)
        rows["raw"].append(json.dumps(rec.raw, ensure_ascii=False, sort_keys=True))
        rows["metadata"].append(json.dumps(rec.metadata, ensure_ascii=False, sort_keys=True))
    table = pa.Table.from_pydict(rows, schema=_schema())
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return path


def shard_name(index: int, prefix: str = "shard") -> str:
    return f"{prefix}-{index:05d}.parquet"


def write_records(
    records: Iterable[Sample],
    out_dir: str | os.PathLike[str],
    *,
    rows_per_shard: int = 4096,
    prefix: str = "shard",
    start_index: int = 0,
) -> list[Path]:
    """Write records as ``out_dir/<prefix>-NNNNN.parquet`` shards of ``rows_per_shard`` rows."""
    if rows_per_shard < 1:
        raise ValueError("rows_per_shard must be >= 1")
    out_dir = Path(out_dir)
    paths: list[Path] = []
    batch: list[Sample] = []
    for rec in records:
        batch.append(rec)
        if len(batch) == rows_per_shard:
            paths.append(write_shard(batch, out_dir / shard_name(start_index + len(paths), prefix)))
            batch = []
    if batch or not paths:
        # An empty input still gives one (empty) shard, so the reader sees a dataset, not nothing.
        paths.append(write_shard(batch, out_dir / shard_name(start_index + len(paths), prefix)))
    return paths


# --------------------------------------------------------------------------- read


def shard_files(path: str | os.PathLike[str]) -> list[Path]:
    """The parquet files of a dataset: the file itself, or a directory's visible ``*.parquet``."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise DataError(f"dataset {path}: no such file or directory")
    # Hidden names are atomic_path's temp files of a writer that is still running (or died).
    return sorted(p for p in path.glob(SHARD_GLOB) if not p.name.startswith("."))


def is_pipeline_parquet(path: str | os.PathLike[str]) -> bool:
    """True when the parquet file was written by :func:`write_shard` (schema metadata tag)."""
    import pyarrow.parquet as pq

    try:
        meta = pq.read_schema(path).metadata or {}
    except Exception:
        return False
    return SCHEMA_KEY in meta


def _row_to_sample(row: dict[str, Any], base: Path, where: str) -> Sample:
    try:
        return Sample(
            id=row["id"],
            images=[str(im if os.path.isabs(im) else base / im) for im in row["images"] or []],
            question=row["question"],
            choices=row["choices"],
            answer=row["answer"],
            source=row["source"],
            response=row["response"],
            raw=json.loads(row["raw"] or "{}"),
            metadata=json.loads(row["metadata"] or "{}"),
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{where}: not a valid visionr1 row ({exc})") from exc


def iter_records(path: str | os.PathLike[str], *, limit: int | None = None) -> Iterator[Sample]:
    """Yield the samples of a pipeline dataset (a directory of shards or one shard), in order.

    Image paths come back absolute. Raises DataError naming the file for foreign parquet files.
    """
    import pyarrow.parquet as pq

    n = 0
    for file in shard_files(path):
        if not is_pipeline_parquet(file):
            raise DataError(
                f"{file}: not a visionr1 shard (no '{SCHEMA_KEY.decode()}' schema tag); "
                "read it with load_dataset(..., format=...) instead"
            )
        pf = pq.ParquetFile(file)
        row_no = 0
        for batch in pf.iter_batches(batch_size=1024):
            for row in batch.to_pylist():
                if limit is not None and n >= limit:
                    return
                yield _row_to_sample(row, file.parent, f"{file} row {row_no}")
                row_no += 1
                n += 1


def read_records(path: str | os.PathLike[str], *, limit: int | None = None) -> list[Sample]:
    """All samples of a pipeline dataset (see :func:`iter_records`)."""
    return list(iter_records(path, limit=limit))
