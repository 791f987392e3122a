"""Readers for the benchmarks as their hubs publish them, copied to a local directory.

Each reader returns plain dict rows: ``id``, ``images`` (absolute paths; embedded image bytes are
written once to ``image_cache``), the fields the prompt needs and the gold fields the scorer needs
(see each scorer's ``REQUIRED``). Rows whose image is missing or unreadable are skipped and
counted; a directory with nothing recognisable raises :class:`BenchmarkError` saying what was
expected.

Layouts:

* **mathvista** — GitHub ``testmini.json`` (object keyed by pid, images under ``images/``, optional
  ``query.json`` beside it) or the HF parquet (``testmini-*.parquet``, ``decoded_image`` embedded,
  ``precision`` as float64).
* **mathverse** — ``testmini.json`` (list, images under ``images/`` or beside),
  ``testmini_text_only.json``, or HF parquet; ``versions`` filters ``problem_version``
  (``Vision Only`` included; ``Text Only`` rows come from the text-only file).
* **mmmath** — the original ``MM-Math`` JSON object keyed by id (``question``, ``file_name``,
  ``solution``, ``year``, ``difficult``, ``knowledge``), or rows (JSONL/parquet/VLMEvalKit TSV with
  base64 ``image``) with ``answer``, ``difficulty``, ``year``, ``knowledge_l1``, ``knowledge_l2``.
* **dynamath** — ``dataset.json`` keyed by qid (seed), ``trial*/dataset.json`` variants, or HF
  ``sample_variant*`` parquet (``ground_truth``, ``knowledge_level``, ``decoded_image``).
* **toy** — the pipeline's own parquet (``visionr1 toy data --out DIR`` writes ``DIR/bench``).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from visionr1_jobs.contract import InvalidInput, atomic_write

BENCHMARKS = ("mathvista", "mathverse", "mmmath", "dynamath", "toy")


class BenchmarkError(InvalidInput):
    """A benchmark directory that does not match the expected layout (exit 65 in a stage)."""


@dataclass
class ReadResult:
    """The rows of a benchmark and the rows skipped on the way, with reasons."""

    rows: list[dict[str, Any]]
    skipped: list[dict[str, str]] = field(default_factory=list)
    source: str = ""


EXPECTED = {
    "mathvista": "testmini.json (object keyed by pid) with images/, or HF testmini-*.parquet",
    "mathverse": "testmini.json / testmini_text_only.json (list of problems) with images/, or HF "
    "*.parquet",
    "mmmath": "a JSON object keyed by id with question/file_name/solution, or JSONL/parquet/TSV "
    "rows with question/answer",
    "dynamath": "dataset.json keyed by qid (and/or trial*/dataset.json), or HF "
    "sample_variant*.parquet",
    "toy": "the pipeline's parquet shards (visionr1 toy data --out DIR writes DIR/bench)",
}


# --------------------------------------------------------------------------- files


def _read_json_any(path: Path) -> list[tuple[str | None, dict[str, Any]]]:
    try:
        if path.suffix == ".jsonl":
            out = []
            for line in path.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    out.append((None, json.loads(line)))
            return out
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BenchmarkError(f"{path}: cannot read as JSON ({exc})") from exc
    if isinstance(data, dict):
        if all(isinstance(v, dict) for v in data.values()):
            return [(str(k), v) for k, v in data.items()]
        raise BenchmarkError(f"{path}: a JSON object whose values are not records")
    if isinstance(data, list):
        return [(None, r) for r in data if isinstance(r, dict)]
    raise BenchmarkError(f"{path}: expected a JSON list or an object keyed by id")


def _read_parquet(path: Path) -> list[tuple[str | None, dict[str, Any]]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for a bad file
        raise BenchmarkError(f"{path}: cannot read as parquet ({exc})") from exc
    return [(None, r) for r in table.to_pylist()]


def _read_tsv(path: Path) -> list[tuple[str | None, dict[str, Any]]]:
    import csv
    import sys

    csv.field_size_limit(sys.maxsize)  # base64 images are long fields
    with path.open(encoding="utf-8", newline="") as fh:
        return [(None, dict(r)) for r in csv.DictReader(fh, delimiter="\t")]


def read_table(path: Path) -> list[tuple[str | None, dict[str, Any]]]:
    """(key, record) pairs of a JSON (list or keyed object), JSONL, parquet or TSV file."""
    if path.suffix in (".json", ".jsonl"):
        return _read_json_any(path)
    if path.suffix == ".parquet":
        return _read_parquet(path)
    if path.suffix == ".tsv":
        return _read_tsv(path)
    raise BenchmarkError(f"{path}: unsupported file type {path.suffix!r}")


# --------------------------------------------------------------------------- images


class ImageProblem(ValueError):
    """A row's image is missing or unreadable: the row is skipped and counted."""


def _check_image(path: Path) -> str:
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.verify()
    except Exception as exc:  # PIL raises many unrelated types for bad files
        raise ImageProblem(f"unreadable image {path} ({type(exc).__name__}: {exc})") from exc
    return str(path.resolve())


def _store_bytes(data: bytes, cache: Path) -> Path:
    digest = hashlib.sha256(data).hexdigest()
    dest = cache / digest[:2] / f"{digest}.img"
    if not dest.exists():
        atomic_write(dest, data)
    return dest


def resolve_image(value: Any, bases: list[Path], cache: Path | None) -> str:
    """An absolute, readable image path for a row's image field (path, bytes struct or base64)."""
    if isinstance(value, dict):
        data = value.get("bytes")
        if data:
            if cache is None:
                raise ImageProblem("embedded image bytes but no image cache directory given")
            return _check_image(_store_bytes(bytes(data), cache))
        value = value.get("path")
    if isinstance(value, bytes | bytearray):
        if cache is None:
            raise ImageProblem("embedded image bytes but no image cache directory given")
        return _check_image(_store_bytes(bytes(value), cache))
    if not isinstance(value, str) or not value:
        raise ImageProblem(f"no image path ({value!r})")
    rel = Path(value)
    if rel.is_absolute() and rel.exists():
        return _check_image(rel)
    for base in bases:
        for cand in (base / rel, base / "images" / rel, base / "images" / rel.name):
            if cand.exists():
                return _check_image(cand)
    # VLMEvalKit TSVs embed the image as base64 text.
    if len(value) >= 32 and re.fullmatch(r"[A-Za-z0-9+/=\s]+", value[:512]):
        if cache is None:
            raise ImageProblem("base64 image but no image cache directory given")
        try:
            data = base64.b64decode(value)
        except ValueError as exc:
            raise ImageProblem(f"bad base64 image ({exc})") from exc
        return _check_image(_store_bytes(data, cache))
    tried = ", ".join(str(b / rel) for b in bases)
    raise ImageProblem(f"image {value!r} not found (looked in {tried})")


# --------------------------------------------------------------------------- helpers


def _files(root: Path, patterns: tuple[str, ...]) -> list[Path]:
    for pattern in patterns:
        found = sorted(p for p in root.glob(pattern) if p.is_file())
        if found:
            return found
    return []


def _need(rec: dict[str, Any], fields: tuple[str, ...], where: str) -> None:
    missing = [f for f in fields if f not in rec]
    if missing:
        raise BenchmarkError(f"{where}: missing field(s) {missing} (have {sorted(rec)[:20]})")


def _plain(value: Any) -> Any:
    """numpy/pyarrow scalars and arrays as JSON-able Python values."""
    if hasattr(value, "tolist"):
        return value.tolist()
    return value


# --------------------------------------------------------------------------- benchmarks


def _mathvista(root: Path) -> list[tuple[dict[str, Any], list[Path], Any]]:
    files = _files(root, ("testmini.json", "data/testmini.json", "**/testmini.json"))
    out = []
    if files:
        path = files[0]
        queries: dict[str, str] = {}
        qfile = path.parent / "query.json"
        if qfile.exists():
            queries = {k: v for k, v in json.loads(qfile.read_text(encoding="utf-8")).items()}
        for key, rec in _read_json_any(path):
            pid = str(rec.get("pid", key))
            rec = dict(rec)
            rec.setdefault("query", queries.get(pid))
            out.append((rec, [path.parent, root], rec.get("image")))
        return out
    for path in _files(root, ("*testmini*.parquet", "**/*testmini*.parquet")):
        for _, rec in _read_parquet(path):
            out.append((rec, [path.parent, root], rec.get("decoded_image") or rec.get("image")))
    return out


def _mathvista_row(rec: dict[str, Any], where: str) -> dict[str, Any]:
    _need(rec, ("pid", "question", "answer", "question_type", "answer_type"), where)
    precision = rec.get("precision")
    if precision is not None and precision == precision:  # NaN in parquet means null
        precision = int(precision)
    else:
        precision = None
    meta = rec.get("metadata") or {}
    return {
        "id": str(rec["pid"]),
        "question": rec["question"],
        "query": rec.get("query"),
        "choices": _plain(rec.get("choices")),
        "unit": rec.get("unit"),
        "precision": precision,
        "answer": str(rec["answer"]),
        "question_type": rec["question_type"],
        "answer_type": rec["answer_type"],
        "metadata": {k: _plain(v) for k, v in dict(meta).items()},
    }


def _mathverse(
    root: Path, versions: list[str] | None
) -> list[tuple[dict[str, Any], list[Path], Any]]:
    want_text_only = versions is not None and "Text Only" in versions
    names = ["testmini.json", "data/testmini.json"]
    if want_text_only:
        names += ["testmini_text_only.json", "data/testmini_text_only.json"]
    out = []
    files = [root / n for n in names if (root / n).exists()]
    if not files and versions is None:
        files = _files(root, ("testmini_text_only.json",))
    for path in files:
        for _, rec in _read_json_any(path):
            out.append((rec, [path.parent, root], rec.get("image")))
    if not out:
        for path in _files(root, ("*.parquet", "**/*.parquet")):
            for _, rec in _read_parquet(path):
                out.append((rec, [path.parent, root], rec.get("image")))
    return out


def _mathverse_row(rec: dict[str, Any], where: str) -> dict[str, Any]:
    _need(rec, ("sample_index", "question", "answer", "question_type"), where)
    return {
        "id": str(rec["sample_index"]),
        "problem_index": str(rec.get("problem_index", "")),
        "problem_version": rec.get("problem_version", ""),
        "question": rec["question"],
        "question_for_eval": rec.get("question_for_eval"),
        "query_cot": rec.get("query_cot"),
        "answer": str(rec["answer"]),
        "question_type": rec["question_type"],
        "metadata": _plain(rec.get("metadata")) or {},
    }


def _mmmath(root: Path) -> list[tuple[dict[str, Any], list[Path], Any]]:
    out = []
    files = _files(root, ("*.json", "*.jsonl", "*.parquet", "*.tsv", "**/*.json", "**/*.parquet"))
    for path in files:
        for key, rec in read_table(path):
            rec = dict(rec)
            if key is not None:
                rec.setdefault("id", key)
            out.append((rec, [path.parent, root], rec.get("image") or rec.get("file_name")))
    return out


def _mmmath_row(rec: dict[str, Any], where: str) -> dict[str, Any]:
    if "answer" not in rec and "solution" not in rec:
        raise BenchmarkError(f"{where}: an MM-Math row needs 'answer' or 'solution'")
    _need(rec, ("question",), where)
    knowledge = _plain(rec.get("knowledge")) or []
    return {
        "id": str(rec.get("id", rec.get("index", ""))),
        "question": rec["question"],
        # The official judge boxes out the answer from either a short answer or a full solution.
        "answer": str(
            rec.get("answer") if rec.get("answer") not in (None, "") else rec["solution"]
        ),
        "difficulty": rec.get("difficulty", rec.get("difficult")),
        "year": rec.get("year"),
        "knowledge_l1": rec.get("knowledge_l1", knowledge[0] if knowledge else None),
        "knowledge_l2": rec.get("knowledge_l2", knowledge[1] if len(knowledge) > 1 else None),
    }


def _dynamath(root: Path) -> list[tuple[dict[str, Any], list[Path], Any]]:
    out = []
    trials = sorted(p for p in root.glob("**/trial*/dataset.json"))
    seeds = [root / "dataset.json"] if (root / "dataset.json").exists() else []
    for path in trials or seeds or _files(root, ("**/dataset.json",)):
        variant = path.parent.name if path.parent != root else "seed"
        for key, rec in _read_json_any(path):
            rec = {**rec, "qid": str(rec.get("qid", key)), "variant": variant}
            out.append((rec, [path.parent, root, path.parent.parent], rec.get("image")))
    if not out:
        for path in _files(root, ("*.parquet", "**/*.parquet")):
            variant = re.sub(r"-\d{5}-of-\d{5}.*$", "", path.stem)
            for _, rec in _read_parquet(path):
                rec = {**rec, "variant": rec.get("variant", variant)}
                out.append((rec, [path.parent, root], rec.get("decoded_image") or rec.get("image")))
    return out


def _dynamath_row(rec: dict[str, Any], where: str) -> dict[str, Any]:
    if "answer" not in rec and "ground_truth" not in rec:
        raise BenchmarkError(f"{where}: a DynaMath row needs 'answer' or 'ground_truth'")
    _need(rec, ("question", "answer_type"), where)
    qid = str(rec.get("qid", rec.get("id", "")))
    return {
        "id": f"{qid}/{rec.get('variant', 'seed')}",
        "qid": qid,
        "variant": rec.get("variant", "seed"),
        "question": rec["question"],
        "answer": str(rec.get("answer", rec.get("ground_truth"))),
        "answer_type": rec["answer_type"],
        "subject": rec.get("subject"),
        "level": rec.get("level", rec.get("knowledge_level")),
    }


def _toy(root: Path, limit: int | None) -> ReadResult:
    from visionr1_jobs.data.io import read_records

    try:
        samples = read_records(root, limit=limit)
    except InvalidInput as exc:
        raise BenchmarkError(f"toy benchmark at {root}: {exc}") from exc
    rows = [
        {
            "id": s.id,
            "question": s.question,
            "choices": s.choices,
            "answer": s.answer,
            "kind": s.metadata.get("kind"),
            "images": list(s.images),
        }
        for s in samples
    ]
    return ReadResult(rows=rows, source=str(root))


_ROW = {
    "mathvista": _mathvista_row,
    "mathverse": _mathverse_row,
    "mmmath": _mmmath_row,
    "dynamath": _dynamath_row,
}


def read_benchmark(
    name: str,
    path: str | os.PathLike[str],
    *,
    limit: int | None = None,
    versions: list[str] | None = None,
    image_cache: str | os.PathLike[str] | None = None,
) -> ReadResult:
    """Read benchmark ``name`` from directory (or file) ``path``; see the module docstring."""
    if name not in BENCHMARKS:
        raise BenchmarkError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}")
    root = Path(path)
    if not root.exists():
        raise BenchmarkError(f"{name}: {root} does not exist; expected {EXPECTED[name]}")
    if name == "toy":
        return _toy(root, limit)
    cache = Path(image_cache) if image_cache is not None else None
    if root.is_file():
        records = [
            (dict(r, **({"id": k} if k and "id" not in r else {})), [root.parent], None)
            for k, r in read_table(root)
        ]
        records = [
            (r, b, r.get("image") or r.get("decoded_image") or r.get("file_name"))
            for r, b, _ in records
        ]
    elif name == "mathvista":
        records = _mathvista(root)
    elif name == "mathverse":
        records = _mathverse(root, versions)
    elif name == "mmmath":
        records = _mmmath(root)
    else:
        records = _dynamath(root)
    if not records:
        raise BenchmarkError(f"{name}: nothing found in {root}; expected {EXPECTED[name]}")
    rows: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    for n, (rec, bases, image) in enumerate(records):
        where = f"{name} {root} record {n}"
        row = _ROW[name](rec, where)
        if name == "mathverse" and versions is not None and row["problem_version"] not in versions:
            continue
        text_only = name == "mathverse" and row["problem_version"] == "Text Only"
        if text_only or (image in (None, "") and name == "mathverse"):
            row["images"] = []
        else:
            try:
                row["images"] = [resolve_image(image, bases, cache)]
            except ImageProblem as exc:
                skipped.append({"id": row["id"], "reason": str(exc)})
                continue
        rows.append(row)
        if limit is not None and len(rows) >= limit:
            break
    if not rows:
        first = skipped[0]["reason"] if skipped else "no rows matched the filters"
        raise BenchmarkError(
            f"{name}: no usable rows in {root} ({len(skipped)} skipped; first: {first})"
        )
    return ReadResult(rows=rows, skipped=skipped, source=str(root))
