"""Filter throughput: samples/s judging ≥ 10,000 toy samples with 1 and 2 worker processes.

    python benchmarks/filter.py [--n 10000] [--repeats 3]

The samples are what the toy teacher stand-ins write (25% wrong, 10% inconsistent or malformed),
built in memory (no images, no MLflow): this measures the filter's own work — every per-sample
rule, answer checking with answers_match, the process pool, and dedupe. Each setting runs
``--repeats`` times and the best run counts (the machine is shared). Prints one JSON object.
Target: speed-up ≥ 1.8× from 1 to 2 workers.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "jobs"))

from visionr1_jobs.config import FilterParams  # noqa: E402
from visionr1_jobs.data.record import Sample  # noqa: E402
from visionr1_jobs.filtering.rules import RuleSet, judge  # noqa: E402
from visionr1_jobs.filtering.select import filter_samples, to_item  # noqa: E402
from visionr1_jobs.synthesis import toy_logic  # noqa: E402
from visionr1_jobs.synthesis.prompts import load_prompts  # noqa: E402
from visionr1_jobs.toy.world import generate  # noqa: E402


def toy_samples(n: int, seed: int) -> list[Sample]:
    prompt = load_prompts("v1")["reasoner_with_answer"]
    out = []
    for i, (problem, sid) in enumerate(generate(n, seed, "train")):
        text = prompt.render(
            description=toy_logic.describe_scene(problem.scene),
            question=problem.question,
            answer=problem.answer,
        )
        response, _ = toy_logic.reason(text, random.Random(i), 0.25, 0.1)
        out.append(
            Sample(
                id=sid,
                images=[f"/toy/{sid}.png"],
                question=problem.question,
                choices=problem.choices,
                answer=problem.answer,
                response=response,
            )
        )
    return out


def measure(samples: list[Sample], rules: RuleSet, workers: int, repeats: int) -> dict[str, Any]:
    """Best wall time of ``repeats`` runs, plus the parent's CPU seconds in each (the serial part:
    the workers are children of the forkserver, so their CPU time is not visible here)."""
    times, cpus, kept = [], [], None
    for _ in range(repeats):
        c0, t0 = time.process_time(), time.perf_counter()
        result = filter_samples(samples, rules, workers=workers)
        times.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
        kept = result.counts["kept"]
    best = min(times)
    return {
        "seconds": round(best, 3),
        "samples_per_s": round(len(samples) / best, 1),
        "all_seconds": [round(t, 3) for t in times],
        "parent_cpu_seconds": [round(c, 3) for c in cpus],
        "kept": kept,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10_000, help="toy samples (default 10000)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per setting (best counts)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    samples = toy_samples(args.n, args.seed)
    load_before = round(os.getloadavg()[0], 2)
    rules = RuleSet.from_params(FilterParams())
    # The parallel part, measured alone: every rule on every sample in this process, CPU time.
    c0 = time.process_time()
    for i, s in enumerate(samples):
        judge(to_item(i, s), rules)
    judge_cpu = time.process_time() - c0
    one = measure(samples, rules, 1, args.repeats)
    two = measure(samples, rules, 2, args.repeats)
    assert one["kept"] == two["kept"], "worker count changed the verdicts"
    print(
        json.dumps(
            {
                "benchmark": "filter",
                "samples": len(samples),
                "kept": one["kept"],
                "judge_cpu_seconds_in_process": round(judge_cpu, 3),
                "workers_1": one,
                "workers_2": two,
                "speedup_1_to_2": round(two["samples_per_s"] / one["samples_per_s"], 2),
                "target_speedup": 1.8,
                "cpus": os.cpu_count(),
                "loadavg_1min_before": load_before,
                "loadavg_1min_after": round(os.getloadavg()[0], 2),
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
