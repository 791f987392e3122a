"""Judged rows saved as they finish, so a restarted merge asks the judge only for the rest.

The merge judges one (checkpoint, benchmark) a part at a time and writes each part's records to
``eval/_judge/<checkpoint>/<benchmark>.part-<k>.jsonl`` atomically as soon as the judge has
answered it. Every record carries ``judge_key``: the sha256 of what the judge was asked (the
rendered prompt) and of who was asked (backend, model, max tokens, seed, retries). A rerun takes
a saved record only where its key is the row's key now, so a changed response or another judge
is asked again; so is a row whose request failed (``judge_status: error``), since the failure may
have been the endpoint's outage rather than the row's.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from visionr1_jobs.contract import atomic_write

if TYPE_CHECKING:
    from visionr1_jobs.config import Teacher
    from visionr1_jobs.eval.llm_judge import JudgePrompt
    from visionr1_jobs.generation import GenerationBackend

JUDGE_DIR = "_judge"


def part_files(folder: Path, bench: str) -> list[Path]:
    """The saved parts of one benchmark, oldest first (the names sort in that order)."""
    return sorted(folder.glob(f"{bench}.part-*.jsonl"))


def _load(folder: Path, bench: str) -> dict[str, dict[str, Any]]:
    saved: dict[str, dict[str, Any]] = {}
    for part in part_files(folder, bench):
        for line in part.read_text(encoding="utf-8").splitlines():
            if line:
                record = json.loads(line)
                saved[record["judge_key"]] = record
    return saved


def row_keys(texts: list[str], teacher: Teacher, retries: int) -> list[str]:
    """The key of each judge request (its text and the judge's identity)."""
    who = json.dumps(
        [
            teacher.backend.kind,
            teacher.backend.base_url,
            teacher.backend.model,
            teacher.sampling.max_tokens,
            teacher.sampling.seed,
            retries,
        ]
    )
    return [hashlib.sha256(f"{who}\n{t}".encode()).hexdigest() for t in texts]


def judge_in_parts(
    backend: GenerationBackend,
    rows: list[dict[str, Any]],
    rule_verdicts: list[dict[str, Any]],
    *,
    teacher: Teacher,
    prompt: JudgePrompt,
    folder: Path,
    bench: str,
    part_rows: int,
) -> tuple[list[dict[str, Any]], int]:
    """One judge record per row (see :func:`visionr1_jobs.eval.llm_judge.judge_rows`), judging
    only rows without a saved record, ``part_rows`` at a time, each part saved when answered.
    Returns the records in row order and how many rows were taken from saved parts."""
    from visionr1_jobs.eval.llm_judge import RETRIES, judge_rows, judge_texts

    keys = row_keys(judge_texts(prompt, rows, rule_verdicts), teacher, RETRIES)
    saved = _load(folder, bench)
    reused = {i for i, k in enumerate(keys) if k in saved and saved[k]["judge_status"] != "error"}
    todo = [i for i in range(len(rows)) if i not in reused]
    parts = part_files(folder, bench)
    next_part = int(parts[-1].name.rsplit(".part-", 1)[1].split(".")[0]) + 1 if parts else 0
    for start in range(0, len(todo), part_rows):
        batch = todo[start : start + part_rows]
        judged = judge_rows(
            backend,
            [rows[i] for i in batch],
            [rule_verdicts[i] for i in batch],
            prompt=prompt,
            max_tokens=teacher.sampling.max_tokens,
            seed=teacher.sampling.seed,
            model_name=teacher.backend.model,
        )
        for i, record in zip(batch, judged, strict=True):
            record["judge_key"] = keys[i]
            saved[keys[i]] = record
        atomic_write(
            folder / f"{bench}.part-{next_part:05d}.jsonl",
            "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in judged),
        )
        next_part += 1
        print(
            f"[eval] judged {bench}: {min(start + part_rows, len(todo))} of {len(todo)} rows "
            f"({len(reused)} from saved parts)",
            flush=True,
        )
    out = []
    for k, v in zip(keys, rule_verdicts, strict=True):
        record = dict(saved[k])
        if record["llm_correct"] is None:  # unparsed or failed: the rule verdict of this scoring
            record["correct"] = bool(v["correct"])
        out.append(record)
    return out, len(reused)
