"""``python -m visionr1_jobs STAGE --config FILE``: the one entry point of every stage program."""

from __future__ import annotations

import argparse
import importlib
import sys

from visionr1_jobs.config import STAGES
from visionr1_jobs.contract import run_stage


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m visionr1_jobs", description=__doc__)
    parser.add_argument("stage", choices=STAGES, help="stage program to run")
    parser.add_argument("--config", required=True, help="resolved stage config (JSON)")
    args = parser.parse_args(argv)
    # Imported only now: each stage pulls its own heavy dependencies (torch, TRL, vLLM).
    module = importlib.import_module(f"visionr1_jobs.stages.{args.stage}")
    return run_stage(module.run, args.config)


if __name__ == "__main__":
    sys.exit(main())
