"""GPU-hours per stage, for chargeback: GPUs × running time of each of the stage's pods.

A pod holds its GPUs from the moment the kubelet accepts it (``status.startTime``: the device
plugin has allocated them) until its last container ends; a pod still running is counted up to
now. Pure: pod objects in, hours out.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

GPU = "nvidia.com/gpu"


def _time(value: str | None) -> datetime | None:
    if not value:
        return None
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def pod_gpus(pod: Mapping[str, Any]) -> int:
    """GPUs the pod's containers hold (their nvidia.com/gpu limits, or requests)."""
    total = 0
    for c in (pod.get("spec") or {}).get("containers") or []:
        res = c.get("resources") or {}
        value = (res.get("limits") or {}).get(GPU) or (res.get("requests") or {}).get(GPU) or 0
        total += int(value)
    return total


@dataclass(frozen=True)
class Usage:
    """What a pod holds and for how long: its GPUs, its start, its last container's end (None
    while one runs). Small enough to keep for every watched pod, so charging a finished attempt
    needs no list of its pods."""

    gpus: int
    start: datetime | None
    end: datetime | None

    def seconds(self, now: datetime) -> float:
        if self.start is None:
            return 0.0
        return max(0.0, ((self.end or now) - self.start).total_seconds())


def usage(pod: Mapping[str, Any]) -> Usage:
    status = pod.get("status") or {}
    ends = [
        _time(((cs.get("state") or {}).get("terminated") or {}).get("finishedAt"))
        for cs in status.get("containerStatuses") or []
    ]
    finished = [e for e in ends if e is not None]
    end = max(finished) if finished and len(finished) == len(ends) else None  # all have ended
    return Usage(pod_gpus(pod), _time(status.get("startTime")), end)


def pod_seconds(pod: Mapping[str, Any], now: datetime) -> float:
    """Seconds from the pod's start to its last container's end (or ``now`` while one runs)."""
    return usage(pod).seconds(now)


def usage_hours(usages: Iterable[Usage], now: datetime | None = None) -> float:
    """GPU-hours of pods given by their Usage: the sum of each one's GPUs × running time."""
    now = now or datetime.now(UTC)
    return sum(u.gpus * u.seconds(now) for u in usages) / 3600.0


def gpu_hours(pods: Iterable[Mapping[str, Any]], now: datetime | None = None) -> float:
    """GPU-hours of ``pods``: the sum of each pod's GPUs × running time."""
    return usage_hours(map(usage, pods), now)
