"""``python -m visionr1_jobs STAGE --config FILE``: the one entry point of every stage program."""

from __future__ import annotations

import argparse
import importlib
import sys

from visionr1_jobs.config import STAGES
from visionr1_jobs.contract import exception_line, run_stage, write_termination_message


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m visionr1_jobs", description=__doc__)
    parser.add_argument("stage", choices=STAGES, help="stage program to run")
    parser.add_argument("--config", required=True, help="resolved stage config (JSON)")
    args = parser.parse_args(argv)
    try:
        # Imported only now: each stage pulls its own heavy dependencies (torch, TRL, vLLM).
        module = importlib.import_module(f"visionr1_jobs.stages.{args.stage}")
        return run_stage(module.run, args.config)
    except Exception as exc:
        # An unexpected error: the traceback goes to the log as always, and its last line
        # becomes the container's termination message, which the operator shows on the run.
        write_termination_message(exception_line(exc))
        raise


if __name__ == "__main__":
    sys.exit(main())
