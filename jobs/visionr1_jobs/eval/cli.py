"""``visionr1 score --benchmark NAME PREDICTIONS.jsonl [--out VERDICTS.jsonl]``: re-score saved
predictions with the rule-based judge and print a JSON summary on stdout."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--benchmark",
        required=True,
        choices=["mathvista", "mathverse", "mmmath", "dynamath", "toy"],
        help="Scoring rules to apply.",
    )
    parser.add_argument(
        "predictions",
        help="JSONL, one row per prediction: id, response and the benchmark's gold fields "
        "(MathVista: answer, choices, question_type, answer_type, precision, unit).",
    )
    parser.add_argument("--out", help="Write one verdict per input row here (JSONL).")


def _read_rows(path: Path) -> list[dict[str, Any]]:
    rows = []
    with path.open(encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{n}: not JSON ({exc.msg})") from exc
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{n}: expected a JSON object per line")
            if "id" not in row:
                row["id"] = f"line-{n}"
            rows.append(row)
    return rows


def main(args: argparse.Namespace) -> int:
    from visionr1_jobs.contract import atomic_write
    from visionr1_jobs.eval.common import ScoreInputError
    from visionr1_jobs.eval.scoring import score_row, summarize

    path = Path(args.predictions)
    try:
        rows = _read_rows(path)
        verdicts = [score_row(args.benchmark, row) for row in rows]
    except (OSError, ValueError, ScoreInputError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    summary = summarize(args.benchmark, rows, verdicts)
    if args.out:
        atomic_write(
            args.out,
            "".join(json.dumps(v, ensure_ascii=False, default=str) + "\n" for v in verdicts),
        )
    print(json.dumps(summary, ensure_ascii=False, indent=1))
    return 0
