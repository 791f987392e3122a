"""Readers of the public formats, each turning rows into :class:`Sample` records.

Formats (names as in ``visionr1_jobs.config.DatasetFormat``):

* ``llava_cot``  — LLaVA-CoT-100k JSONL: ``id``, ``image`` (str), ``conversations`` human/gpt
  (multi-turn: one sample per human→gpt pair); answer from ``<CONCLUSION>``.
* ``mulberry``   — Mulberry-SFT (``messages`` role/content + ``images``) and the CoMCTS input rows
  (``image``, ``question``, ``conversations``); answer from ``### The final answer is:`` or
  ``Answer:X``.
* ``sharegpt``   — Vision-R1-cold (LLaMA-Factory sharegpt): ``conversations`` + ``image`` with
  human/gpt, or ``conversations`` + ``images`` with user/assistant; answer from
  ``<answer> Final Answer:X </answer>``.
* ``geometry3k`` — parquet with ``images`` (list of ``{bytes, path}``), ``problem`` (starting
  with ``<image>``), ``answer`` (optional ``id``, ``choices``, ``ground_truth``).
* ``jsonl``      — JSON lines (or a JSON list) of flat rows + an image folder: ``image``/``images``,
  ``question``/``problem``/``query``, ``answer``/``ground_truth``, optional ``choices``, ``id``,
  ``response``; other keys go to ``metadata``.
* ``hf_disk``    — a ``datasets`` ``save_to_disk`` folder with flat columns like ``jsonl``
  (image columns may be decoded images).

In every format ``images`` may be one string or a list, and the human text may or may not carry
``<image>`` (it is removed). Relative image paths are under ``image_root`` (default: the data
file's folder). Embedded image bytes are stored once, content-addressed, under ``image_cache``.

Every reader yields ``(row_label, Sample | RowProblem)``; :func:`visionr1_jobs.data.load.load_dataset`
decides whether a problem is an error or a counted skip.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from visionr1_jobs.data.io import DataError, store_image
from visionr1_jobs.data.record import OPTION_LETTERS, Sample


@dataclass(frozen=True)
class RowProblem:
    """Why a row could not become a sample; ``reason`` is a short key for counting skips."""

    reason: str
    detail: str


RowResult = tuple[str, "Sample | RowProblem"]

_IMAGE_TAG = re.compile(r"\s*<image>\s*", re.IGNORECASE)
_USER_ROLES = {"human", "user"}
_ASSISTANT_ROLES = {"gpt", "assistant"}


# --------------------------------------------------------------------------- text helpers


def strip_image_tags(text: str) -> str:
    """Remove ``<image>`` placeholders (the chat template places the image)."""
    return _IMAGE_TAG.sub("\n", text).strip()


_LINE_OPTION = re.compile(r"^\s*\(?([A-Z])\s*[\).:：]\s*(.*?)\s*$")
_MARKER = re.compile(r"(?:Options|Choices|Choice)\s*[:：]\s*", re.IGNORECASE)


def _consecutive(letters: list[str]) -> bool:
    return len(letters) >= 2 and letters == list(OPTION_LETTERS[: len(letters)])


def parse_choices(text: str) -> list[str] | None:
    """Option texts of a question in the layouts the public sets use, else None.

    ``A. blue\\nB. green``, ``A: 40°\\nB: 60°``, ``Options: (A) Seattle (B) Juneau``,
    ``Choices: A: 2π B: 3π``. Letters must run A, B, C, … so prose is not mistaken for options.
    """
    block: list[tuple[str, str]] = []
    for line in text.splitlines():
        m = _LINE_OPTION.match(line)
        if m and m.group(1) == OPTION_LETTERS[len(block)] and m.group(2):
            block.append((m.group(1), m.group(2)))
        elif m and m.group(1) == "A" and m.group(2):
            block = [(m.group(1), m.group(2))]
        elif len(block) >= 2:
            break
        else:
            block = []
    if _consecutive([b[0] for b in block]):
        return [b[1] for b in block]
    markers = list(_MARKER.finditer(text))
    if not markers:
        return None
    marker = markers[-1]  # the last one: questions may quote the word "options" earlier
    rest = text[marker.end() :].split("\n")[0]
    for pattern in (r"\(([A-Z])\)\s*", r"(?:^|\s)([A-Z])\s*[:.：]\s*"):
        parts = re.split(pattern, rest)
        letters, texts = parts[1::2], [p.strip() for p in parts[2::2]]
        if _consecutive(letters) and all(texts) and not parts[0].strip():
            return texts
    return None


_FINAL_ANSWER = re.compile(
    r"<answer>\s*(?:Final Answer\s*:)?\s*(.*?)\s*</answer>", re.IGNORECASE | re.DOTALL
)
_CONCLUSION = re.compile(r"<CONCLUSION>\s*(.*?)\s*</CONCLUSION>", re.IGNORECASE | re.DOTALL)
_MULBERRY_FINAL = re.compile(r"###\s*The final answer is:?\s*(.+?)\s*$", re.IGNORECASE | re.DOTALL)
_ANSWER_PREFIX = re.compile(
    r"^\s*(?:Final\s+)?Answer\s*[:：]\s*(.+?)\s*$", re.IGNORECASE | re.DOTALL
)
_ANSWER_IS = re.compile(r"(?:answer|option)\s+is\s*:?\s*\(?([A-Z])\)?\s*\.?\s*$", re.IGNORECASE)


def extract_answer(response: str) -> str | None:
    """The final answer inside a public dataset's assistant text, or None when there is none."""
    for pattern in (_FINAL_ANSWER, _CONCLUSION, _MULBERRY_FINAL, _ANSWER_PREFIX):
        m = pattern.search(response)
        if m and m.group(1).strip():
            found = m.group(1).strip()
            letter = _ANSWER_IS.search(found)
            if letter:
                return letter.group(1).upper()
            return found
    return None


def _normalise_mc_answer(answer: str, choices: list[str] | None) -> str:
    """MC answers as letters: ``(B)``/``B.``/``B: 3π`` → ``B``; an exact option text → its letter."""
    if not choices:
        return answer
    m = re.fullmatch(r"\(?([A-Z])\)?(?:\s*[.:：]\s*.*)?", answer.strip(), re.DOTALL)
    if m and OPTION_LETTERS.index(m.group(1)) < len(choices):
        return m.group(1)
    hits = [i for i, c in enumerate(choices) if c.strip().lower() == answer.strip().lower()]
    return OPTION_LETTERS[hits[0]] if len(hits) == 1 else answer


# --------------------------------------------------------------------------- images


@dataclass
class ImageContext:
    """Where relative image paths live, where embedded images are stored, and what was checked."""

    image_root: Path
    image_cache: Path
    check_images: bool = True  # False: trust paths (huge sets on slow storage); no existence check
    _checked: dict[str, str | None] | None = None

    def resolve(self, value: Any) -> str:
        """An absolute path for a path / ``{bytes, path}`` dict / bytes / PIL image.

        Raises DataError (missing or corrupt image) with the path in the message.
        """
        if isinstance(value, dict):
            if value.get("bytes"):
                value = value["bytes"]
            elif value.get("path"):
                value = value["path"]
            else:
                raise DataError("image entry has neither bytes nor path")
        if isinstance(value, str | os.PathLike):
            p = Path(value)
            p = p if p.is_absolute() else self.image_root / p
            self._check(p)
            return str(p)
        return str(self.image_cache / store_image(self.image_cache, value))

    def _check(self, path: Path) -> None:
        if not self.check_images:
            return
        if self._checked is None:
            self._checked = {}
        key = str(path)
        if key not in self._checked:
            self._checked[key] = _problem_with(path)
        if self._checked[key]:
            raise DataError(self._checked[key])


def _problem_with(path: Path) -> str | None:
    if not path.is_file():
        return f"image {path} does not exist"
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.verify()
    except Exception as exc:  # PIL raises many unrelated types on corrupt files
        return f"image {path} is corrupt ({type(exc).__name__}: {exc})"
    return None


def _as_list(value: Any) -> list[Any]:
    if value is None or value == "":
        return []
    if isinstance(value, list | tuple):
        return [v for v in value if v is not None and v != ""]
    return [value]


def _images(row: dict[str, Any], ctx: ImageContext, keys: tuple[str, ...]) -> list[str]:
    for key in keys:
        if key in row and row[key] is not None:
            return [ctx.resolve(v) for v in _as_list(row[key])]
    return []


# --------------------------------------------------------------------------- row readers


def _problem(label: str, exc: Exception) -> RowProblem:
    text = str(exc)
    if isinstance(exc, DataError):
        reason = (
            "corrupt_image"
            if ("corrupt" in text or "not a readable image" in text)
            else (
                "missing_image" if "does not exist" in text or "cannot read" in text else "bad_row"
            )
        )
    else:
        reason = "bad_row"
    return RowProblem(reason, f"{label}: {text}")


def _sample_or_problem(label: str, build: Any) -> Sample | RowProblem:
    try:
        return build()
    except (DataError, ValueError, TypeError, KeyError) as exc:
        return _problem(label, exc)


def conversation_samples(
    row: dict[str, Any], label: str, ctx: ImageContext, source: str
) -> list[Sample | RowProblem]:
    """Samples of one chat-style row (LLaVA-CoT, Mulberry, Vision-R1-cold sharegpt)."""
    turns = row.get("conversations", row.get("messages"))
    if not isinstance(turns, list) or not turns:
        return [RowProblem("bad_row", f"{label}: no 'conversations' or 'messages' list")]

    def role(t: dict[str, Any]) -> str:
        return str(t.get("from", t.get("role", ""))).lower()

    def content(t: dict[str, Any]) -> str:
        return str(t.get("value", t.get("content", "")))

    pairs: list[tuple[str, str]] = []
    pending: str | None = None
    for t in turns:
        if role(t) in _USER_ROLES:
            pending = content(t)
        elif role(t) in _ASSISTANT_ROLES and pending is not None:
            pairs.append((pending, content(t)))
            pending = None
    if not pairs:
        return [RowProblem("bad_row", f"{label}: no user→assistant turn pair")]
    base_id = str(row.get("id") or _fallback_id(label))
    try:
        images = _images(row, ctx, ("images", "image"))
    except DataError as exc:
        return [_problem(label, exc)]
    out: list[Sample | RowProblem] = []
    for k, (user, assistant) in enumerate(pairs):
        # The first turn of a multi-turn row is the usual problem text; CoMCTS rows also carry a
        # clean `question` field without the instruction prefix.
        question = row["question"] if k == 0 and isinstance(row.get("question"), str) else user
        question = strip_image_tags(question)
        choices = parse_choices(question)
        answer = row.get("answer") if k == 0 and row.get("answer") not in (None, "") else None
        answer = str(answer) if answer is not None else extract_answer(assistant)
        turn_label = f"{label} turn {k}" if len(pairs) > 1 else label
        if not answer:
            out.append(
                RowProblem("no_answer", f"{turn_label}: no answer found in the assistant text")
            )
            continue
        out.append(
            _sample_or_problem(
                turn_label,
                lambda k=k, question=question, choices=choices, answer=answer, assistant=assistant: (
                    Sample(
                        id=base_id if len(pairs) == 1 else f"{base_id}#{k}",
                        images=images,
                        question=question,
                        choices=choices,
                        answer=_normalise_mc_answer(answer, choices),
                        source=source,
                        response=assistant,
                        metadata={
                            **({"turn": k} if len(pairs) > 1 else {}),
                            **_extras(
                                row,
                                {
                                    "id",
                                    "image",
                                    "images",
                                    "conversations",
                                    "messages",
                                    "question",
                                    "answer",
                                },
                            ),
                        },
                    )
                ),
            )
        )
    return out


_QUESTION_KEYS = ("question", "problem", "query", "prompt")
_ANSWER_KEYS = ("answer", "ground_truth", "gt_answer", "label")
_IMAGE_KEYS = ("images", "image", "decoded_image", "image_path")
_KNOWN = (
    set(_QUESTION_KEYS)
    | set(_ANSWER_KEYS)
    | set(_IMAGE_KEYS)
    | {
        "id",
        "choices",
        "options",
        "response",
        "source",
        "metadata",
        "raw",
    }
)


def _fallback_id(label: str) -> str:
    """``<file stem>-<row>`` for rows without an id (labels read ``<file> row <n>[ …]``)."""
    where, _, rest = label.rpartition(" row ")
    return f"{Path(where.split('[')[0]).stem}-{rest.split()[0]}" if where else label


def _extras(row: dict[str, Any], known: set[str]) -> dict[str, Any]:
    """Unknown source fields kept as metadata (JSON-safe values only)."""
    out = {}
    for k, v in row.items():
        if k in known:
            continue
        try:
            json.dumps(v)
        except (TypeError, ValueError):
            continue
        out[k] = v
    return out


def flat_sample(
    row: dict[str, Any], label: str, ctx: ImageContext, source: str
) -> Sample | RowProblem:
    """A sample from a flat row (jsonl, geometry3k parquet, save_to_disk columns)."""
    question = next((row[k] for k in _QUESTION_KEYS if isinstance(row.get(k), str)), None)
    if question is None:
        return RowProblem(
            "bad_row", f"{label}: no question field (one of {', '.join(_QUESTION_KEYS)})"
        )
    answer = next((row[k] for k in _ANSWER_KEYS if row.get(k) not in (None, "")), None)
    if answer is None:
        return RowProblem(
            "no_answer", f"{label}: no answer field (one of {', '.join(_ANSWER_KEYS)})"
        )

    def build() -> Sample:
        question_text = strip_image_tags(question)
        choices = row.get("choices", row.get("options"))
        if isinstance(choices, str):  # e.g. VLMEvalKit's str(list)
            choices = json.loads(choices.replace("'", '"')) if choices.startswith("[") else None
        choices = [str(c) for c in choices] if choices else parse_choices(question_text)
        meta = row.get("metadata") if isinstance(row.get("metadata"), dict) else {}
        return Sample(
            id=str(row.get("id") if row.get("id") not in (None, "") else _fallback_id(label)),
            images=_images(row, ctx, _IMAGE_KEYS),
            question=question_text,
            choices=choices or None,
            answer=_normalise_mc_answer(str(answer).strip(), choices or None),
            source=str(row.get("source") or source),
            response=row.get("response") if isinstance(row.get("response"), str) else None,
            raw=row.get("raw") if isinstance(row.get("raw"), dict) else {},
            metadata={**meta, **_extras(row, _KNOWN)},
        )

    return _sample_or_problem(label, build)


# --------------------------------------------------------------------------- files


def json_rows(path: Path) -> Iterator[tuple[str, dict[str, Any] | RowProblem]]:
    """Rows of a .jsonl file, a JSON list, or a JSON object keyed by id; labelled ``file row N``."""
    if path.suffix == ".jsonl":
        with open(path, encoding="utf-8") as fh:
            for i, line in enumerate(fh):
                if not line.strip():
                    continue
                label = f"{path} row {i}"
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    yield label, RowProblem("bad_row", f"{label}: invalid JSON ({exc.msg})")
                    continue
                yield (
                    label,
                    row
                    if isinstance(row, dict)
                    else RowProblem("bad_row", f"{label}: not a JSON object"),
                )
        return
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: cannot read as JSON ({exc})") from exc
    if isinstance(data, dict):  # keyed by id (MathVista/MM-Math style)
        data = [{"id": k, **v} if isinstance(v, dict) else v for k, v in data.items()]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of rows or an object keyed by id")
    for i, row in enumerate(data):
        label = f"{path} row {i}"
        yield (
            label,
            row if isinstance(row, dict) else RowProblem("bad_row", f"{label}: not a JSON object"),
        )


def chat_file(path: Path, ctx: ImageContext, source: str) -> Iterator[Sample | RowProblem]:
    for label, row in json_rows(path):
        if isinstance(row, RowProblem):
            yield row
        else:
            yield from conversation_samples(row, label, ctx, source)


def flat_file(path: Path, ctx: ImageContext, source: str) -> Iterator[Sample | RowProblem]:
    for label, row in json_rows(path):
        yield row if isinstance(row, RowProblem) else flat_sample(row, label, ctx, source)


def parquet_file(path: Path, ctx: ImageContext, source: str) -> Iterator[Sample | RowProblem]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:
        raise DataError(f"{path}: not a readable parquet file ({exc})") from exc
    i = 0
    for batch in pf.iter_batches(batch_size=256):
        for row in batch.to_pylist():
            yield flat_sample(row, f"{path} row {i}", ctx, source)
            i += 1


def hf_disk(path: Path, ctx: ImageContext, split: str | None) -> Iterator[Sample | RowProblem]:
    from datasets import DatasetDict, load_from_disk

    try:
        ds = load_from_disk(str(path))
    except Exception as exc:
        raise DataError(f"{path}: not a datasets save_to_disk folder ({exc})") from exc
    if isinstance(ds, DatasetDict):
        names = list(ds)
        pick = split or ("train" if "train" in ds else names[0] if len(names) == 1 else None)
        if pick not in ds:
            raise DataError(f"{path}: choose a split with split=; it has {names}")
        ds, label_prefix = ds[pick], f"{path}[{pick}]"
    else:
        label_prefix = str(path)
    for i, row in enumerate(ds):
        yield flat_sample(row, f"{label_prefix} row {i}", ctx, "hf_disk")
