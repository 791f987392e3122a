"""``python -m visionr1_jobs STAGE --config FILE``: the one entry point of every stage program."""

from __future__ import annotations

import argparse
import importlib
import signal
import sys
from types import FrameType

from visionr1_jobs.config import STAGES
from visionr1_jobs.contract import exception_line, run_stage, write_termination_message

# Exit status of a program ended by SIGTERM (128 + 15): retryable, like any status but 0, 65, 66.
EXIT_TERMINATED = 143


def _terminated(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(EXIT_TERMINATED)


def main(argv: list[str] | None = None) -> int:
    # In a pod the stage program is PID 1, and PID 1 ignores a signal it has no handler for: a
    # deleted, evicted or suspended pod would train on through its whole grace period (and may
    # finish and publish the stage meanwhile). Stop at once instead; the next attempt resumes
    # from the last complete checkpoint (every write on the way is atomic).
    signal.signal(signal.SIGTERM, _terminated)
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
