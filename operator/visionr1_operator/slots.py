"""A bounded number of reconciles at once, the most urgent first.

With many runs changing together (1,000 created at once, their pods all starting), an
unbounded operator had a reconcile in flight per run, each holding its run, manifests and
requests: its peak memory. A plain FIFO bound cost latency instead: a Job's completion, whose
reconcile creates the next stage, queued behind hundreds of reconciles that only recount pods.
So waiters are served by priority, then in the order they came, and a waiter whose run gets a
more urgent trigger meanwhile moves up (``raise_priority``).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import AsyncIterator, Hashable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

# Priorities, most urgent first.
JOB_CHANGED = 0  # a stage's Job changed: its completion or failure decides the next step
RUN_CHANGED = 1  # a run is new, or its spec changed
ROUTINE = 2  # pods' progress, timers (retries, re-reads, deferred progress)


@dataclass(order=True)
class _Waiter:
    priority: int
    seq: int
    key: Hashable = field(compare=False)
    ready: asyncio.Future[None] = field(compare=False)
    live: bool = field(default=True, compare=False)


class Slots:
    """``limit`` slots; ``slot(key, priority)`` waits for one. One waiter per key at a time
    (the caller's per-run lock guarantees it)."""

    def __init__(self, limit: int) -> None:
        self.free = max(1, limit)
        self._heap: list[_Waiter] = []
        self._seq = itertools.count()
        self._waiting: dict[Hashable, _Waiter] = {}
        self._wanted: dict[Hashable, int] = {}  # raised for a key not waiting for a slot yet

    def waiting(self) -> int:
        return len(self._waiting)

    def raise_priority(self, key: Hashable, priority: int) -> None:
        """A more urgent trigger for ``key``: its wait (now, or when it starts) uses it."""
        waiter = self._waiting.get(key)
        if waiter is None:
            self._wanted[key] = min(priority, self._wanted.get(key, priority))
            return
        if priority < waiter.priority:
            waiter.live = False  # left in the heap, skipped when popped
            moved = _Waiter(priority, waiter.seq, key, waiter.ready)
            self._waiting[key] = moved
            heapq.heappush(self._heap, moved)

    def forget(self, key: Hashable) -> None:
        self._wanted.pop(key, None)

    @asynccontextmanager
    async def slot(self, key: Hashable, priority: int) -> AsyncIterator[None]:
        priority = min(priority, self._wanted.pop(key, priority))
        if self.free > 0:  # nobody waits while a slot is free: release hands it over
            self.free -= 1
        else:
            waiter = _Waiter(
                priority, next(self._seq), key, asyncio.get_running_loop().create_future()
            )
            self._waiting[key] = waiter
            heapq.heappush(self._heap, waiter)
            try:
                await waiter.ready
            except asyncio.CancelledError:
                current = self._waiting.get(key)
                if current is not None and current.ready is waiter.ready:
                    current.live = False
                    del self._waiting[key]
                if waiter.ready.done() and not waiter.ready.cancelled():
                    self._release()  # handed a slot as it was cancelled: pass it on
                raise
        try:
            yield
        finally:
            self._release()

    def _release(self) -> None:
        while self._heap:
            waiter = heapq.heappop(self._heap)
            if not waiter.live or waiter.ready.done():
                continue
            if self._waiting.get(waiter.key) is waiter:
                del self._waiting[waiter.key]
            waiter.ready.set_result(None)
            return
        self.free += 1


__all__ = ["JOB_CHANGED", "ROUTINE", "RUN_CHANGED", "Slots"]
