"""Seconds per optimizer step and peak memory of the SFT and GRPO stages on the tiny model.

Runs the real stage programs (``python -m visionr1_jobs sft|grpo``) on CPU in fresh processes,
each in its own workspace, and prints one JSON object:

    {"sft": {"s_per_step": …, "peak_rss_mb": …, …},
     "grpo": {"64": {"s_per_step": …, "peak_rss_mb": …, "completion_tokens_per_s": …}, "128": {…}}}

Usage: ``python benchmarks/train_tiny.py [--sft-steps 8] [--grpo-steps 3] [--keep DIR]``.
Peak RSS is the stage process's own maximum resident set (``ru_maxrss``), imports included.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

# Runs one stage in this fresh interpreter and reports its own peak RSS.
_CHILD = """
import json, resource, sys
from visionr1_jobs.__main__ import main
rc = main([sys.argv[1], "--config", sys.argv[2]])
print("BENCH " + json.dumps({"rc": rc, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def _run_stage(stage: str, cfg: Path) -> dict[str, Any]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO / "jobs") + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    env.setdefault("HF_HUB_OFFLINE", "1")
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, stage, str(cfg)],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("BENCH ")]
    if out.returncode != 0 or not lines:
        sys.stderr.write(out.stderr[-4000:])
        raise SystemExit(f"{stage} failed (exit {out.returncode})")
    result = json.loads(lines[-1][len("BENCH ") :])
    if result["rc"] != 0:
        sys.stderr.write(out.stderr[-4000:])
        raise SystemExit(f"{stage} exited {result['rc']}")
    return result


def _config(
    ws: Path, stage: str, inputs: dict[str, Any], params: dict[str, Any], base: Path
) -> Path:
    from visionr1_jobs.config import ResolvedStageConfig

    cfg = ResolvedStageConfig(
        stage=stage,  # type: ignore[arg-type]
        workspace=str(ws),
        output_dir=stage,
        base_model=str(base),
        inputs=inputs,
        params={"deepspeed": "none", "bf16": False, "gradientCheckpointing": False, **params},
        mlflow={"experiment": "bench"},
    )
    path = ws / f"{stage}.json"
    path.write_text(cfg.model_dump_json(by_alias=True))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sft-steps", type=int, default=8)
    parser.add_argument("--grpo-steps", type=int, default=3)
    parser.add_argument("--keep", help="work in this folder and keep it (default: a temp dir)")
    args = parser.parse_args(argv)

    sys.path.insert(0, str(REPO / "jobs"))
    from visionr1_jobs.contract import read_manifest
    from visionr1_jobs.data.io import write_records
    from visionr1_jobs.data.load import load_dataset_dir
    from visionr1_jobs.toy.dataset import write_toy_dataset
    from visionr1_jobs.toy.model import create_tiny_model

    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="visionr1-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        model = create_tiny_model(root / "tiny")
        write_toy_dataset(root / "toy", 64, seed=0, n_rl=32, n_bench=12)
        cold = [
            s.model_copy(
                update={
                    "response": f"<think> Let me look at the image. The answer is {s.answer}. "
                    f"</think><answer> Final Answer:{s.answer} </answer>"
                }
            )
            for s in load_dataset_dir(root / "toy" / "train", "toy")
        ]
        write_records(cold, root / "cold")
        report: dict[str, Any] = {"sft": {}, "grpo": {}}

        ws = root / "ws-sft"
        ws.mkdir(exist_ok=True)
        sft_params = {
            "learningRate": 1e-2,
            "globalBatchSize": 8,
            "perDeviceBatchSize": 4,
            "maxSteps": args.sft_steps,
            "saveSteps": 1_000_000,
            "maxLength": 512,
        }
        cfg = _config(
            ws,
            "sft",
            {
                "data": {"path": str(root / "cold"), "format": "visionr1"},
                "model": {"path": str(model), "format": "model"},
            },
            sft_params,
            model,
        )
        res = _run_stage("sft", cfg)
        man = read_manifest(ws, "sft")
        assert man is not None
        steps = man.metrics["global_step"]
        report["sft"] = {
            "steps": steps,
            "sequences_per_step": 8,
            "s_per_step": round(man.metrics["train_runtime"] / steps, 3),
            "peak_rss_mb": round(res["peak_rss_mb"], 1),
            "cpu_threads": man.metrics.get("cpu_threads"),
        }
        for budget in (64, 128):
            ws = root / f"ws-grpo-{budget}"
            ws.mkdir(exist_ok=True)
            cfg = _config(
                ws,
                "grpo",
                {
                    "model": {"path": str(model), "format": "model"},
                    "data": {"path": str(root / "toy" / "rl"), "format": "toy"},
                },
                {
                    "dataset": {"path": str(root / "toy" / "rl"), "format": "toy"},
                    "learningRate": 1e-4,
                    "promptsPerStep": 2,
                    "rollout": "transformers",
                    "saveSteps": 1_000_000,
                    "ptst": [
                        {
                            "maxCompletionLength": budget,
                            "numGenerations": 4,
                            "steps": args.grpo_steps,
                        }
                    ],
                },
                model,
            )
            res = _run_stage("grpo", cfg)
            done = json.loads((ws / "grpo" / "stage-1" / "_done.json").read_text())
            seconds = done["train_seconds_last_attempt"]
            lengths = [r.get("completion_length", 0.0) for r in done["series"]]
            tokens = sum(lengths) * 2 * 4  # mean length × prompts × samples, per step
            report["grpo"][str(budget)] = {
                "steps": args.grpo_steps,
                "completions_per_step": 8,
                "s_per_step": round(seconds / args.grpo_steps, 3),
                "mean_completion_length": round(sum(lengths) / max(len(lengths), 1), 1),
                "completion_tokens_per_s": round(tokens / seconds, 1),
                "peak_rss_mb": round(res["peak_rss_mb"], 1),
                "cpu_threads": done.get("cpu_threads"),
            }
        print(json.dumps(report, indent=2))
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
