"""Run :func:`rules.judge` over many samples in worker processes.

Every rule runs in the workers, not only answer checking, so the parent's serial part is just
pickling batches and collecting verdicts: that is what lets 2 workers approach 2× one worker.

Time bounds: each answer check is :func:`visionr1_jobs.answers.answers_match` with
``verify_timeout_s`` (its symbolic step runs in a killable child process of the worker, so a
pathological expression costs at most that long and counts as ``verify_timeout``); the other rules
are linear-time regexes over at most ``max_chars`` characters.

Workers come from a ``forkserver`` context: the parent may hold MLflow/sqlite threads, which
``fork`` would copy in a locked state. (Like ``spawn``, forkserver workers import the parent's
``__main__`` file as ``__mp_main__``: scripts must keep their work under ``if __name__ ==
"__main__"``, as ``python -m visionr1_jobs`` and ``benchmarks/filter.py`` do.)
"""

from __future__ import annotations

import math
import multiprocessing as mp
import os
import sys
from collections.abc import Callable, Sequence

from visionr1_jobs.filtering.rules import Item, RuleSet, Verdict, judge

_RULES: RuleSet | None = None


def _init(rules: RuleSet) -> None:
    global _RULES
    _RULES = rules


def _judge_batch(batch: list[Item]) -> list[Verdict]:
    assert _RULES is not None, "worker not initialised"
    return [judge(item, _RULES) for item in batch]


def _context() -> mp.context.BaseContext:
    # forkserver children re-run the parent's __main__ file; a parent without one on disk (a
    # script piped to ``python -``) would make every worker die at start, so fork there instead.
    main_file = getattr(sys.modules.get("__main__"), "__file__", None)
    if main_file is not None and not os.path.isfile(main_file):
        return mp.get_context("fork")
    ctx = mp.get_context("forkserver")
    # Imported once in the server, so each forked worker starts warm (``__main__`` included:
    # a worker then skips re-importing the caller's script).
    ctx.set_forkserver_preload(["__main__", "visionr1_jobs.filtering.parallel"])
    return ctx


def batch_size_for(n: int, workers: int) -> int:
    """Enough batches to balance the workers (about 16 each), each large enough that pickling
    overhead stays small, none so large that one slow batch idles the other workers."""
    return max(16, min(256, math.ceil(n / (workers * 16)) or 1))


def judge_all(
    items: Sequence[Item],
    rules: RuleSet,
    workers: int,
    on_progress: Callable[[int], None] | None = None,
) -> list[Verdict]:
    """Verdicts for ``items`` (same order), computed by ``workers`` processes."""
    if not items:
        return []
    size = batch_size_for(len(items), workers)
    batches = [list(items[i : i + size]) for i in range(0, len(items), size)]
    ctx = _context()
    verdicts: list[Verdict] = []
    with ctx.Pool(processes=workers, initializer=_init, initargs=(rules,)) as pool:
        for result in pool.imap(_judge_batch, batches, chunksize=1):
            verdicts.extend(result)
            if on_progress is not None:
                on_progress(len(verdicts))
    return verdicts
