"""Rule-based scoring throughput on one core: predictions scored per second, per benchmark.

Prints JSON. Inputs are the real samples in tests/data/realdata (MathVista responses, MM-Math
judge cases, MathVerse rows, DynaMath rows) plus Vision-R1-style tagged responses, repeated to
``--n`` predictions per benchmark. Target: ≥ 1,000/s for rule-based judging.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

REAL = Path(__file__).resolve().parents[1] / "tests" / "data" / "realdata"


def _tag(x: str) -> str:
    return (
        f"<think> let me look at the figure carefully </think><answer> Final Answer:{x} </answer>"
    )


def workloads() -> dict[str, list[dict]]:
    mv = json.loads((REAL / "mathvista_model_outputs_sample.json").read_text())
    mathvista = [dict(r, id=f"{r['model']}/{r['pid']}") for r in mv]
    mathvista += [dict(r, response=_tag(r["answer"])) for r in mathvista]
    mm = json.loads((REAL / "mmmath_autoscoringjudge_cases.json").read_text())
    mmmath = [
        {"id": str(i), "answer": c["ground_truth"], "response": c["prediction"]}
        for i, c in enumerate(mm)
    ]
    verse = json.loads((REAL / "mathverse_testmini_text_only_sample.json").read_text())
    verse += json.loads((REAL / "mathverse_output_testmini_5versions.json").read_text())
    mathverse = [
        dict(r, id=r["sample_index"], response=r.get("model_answer") or _tag(r["answer"]))
        for r in verse
    ]
    dyn = json.loads((REAL / "dynamath_sample.json").read_text())
    dynamath = [
        dict(r, id=f"{r['qid']}/{i}", response=_tag(r["answer"])) for i, r in enumerate(dyn)
    ]
    return {"mathvista": mathvista, "mmmath": mmmath, "mathverse": mathverse, "dynamath": dynamath}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=5000, help="predictions per benchmark")
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})  # one core
    from visionr1_jobs.eval.scoring import score_row

    out: dict[str, dict] = {}
    for name, rows in workloads().items():
        for r in rows:  # warm-up: imports, regex compilation, the math-verify worker
            score_row(name, r)
        batch = (rows * (args.n // len(rows) + 1))[: args.n]
        t0 = time.perf_counter()
        correct = sum(score_row(name, r)["correct"] for r in batch)
        dt = time.perf_counter() - t0
        out[name] = {
            "n": len(batch),
            "seconds": round(dt, 3),
            "per_second": round(len(batch) / dt),
            "accuracy": round(correct / len(batch), 3),
        }
    total_n = sum(v["n"] for v in out.values())
    total_s = sum(v["seconds"] for v in out.values())
    print(
        json.dumps(
            {
                "benchmark": "rule-based scoring, one core",
                "per_benchmark": out,
                "overall_per_second": round(total_n / total_s),
                "target_per_second": 1000,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
