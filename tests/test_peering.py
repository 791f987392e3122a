"""Standby replicas: the oldest live operator ranks highest, and each release's peering objects
are created once, by whichever replica starts first."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from visionr1_operator import peering
from visionr1_operator.kube import ApiError


def test_an_older_process_ranks_higher_and_ties_are_broken() -> None:
    older, newer = peering.priority(1000.0), peering.priority(1000.001)
    assert older > newer  # kopf pauses the lower one
    same_ms = {peering.priority(2000.0) for _ in range(50)}
    assert len(same_ms) > 1  # two pods started in the same millisecond still differ (mostly)


class Creator:
    def __init__(self, existing: set[tuple[str | None, str]], refuse: int | None = None) -> None:
        self.existing, self.refuse = existing, refuse
        self.created: list[tuple[str, str | None, str]] = []

    async def create_custom(self, res: Any, obj: dict[str, Any]) -> None:
        key = (obj["metadata"].get("namespace"), obj["metadata"]["name"])
        if self.refuse:
            raise ApiError(self.refuse, "POST", "kopfpeerings", "forbidden")
        if key in self.existing:
            raise ApiError(409, "POST", "kopfpeerings", "already exists")
        self.existing.add(key)
        self.created.append((obj["kind"], *key))


def test_peering_objects_are_created_where_kopf_looks_for_them() -> None:
    kube = Creator({("team-b", "p")})  # a peer made this one already
    asyncio.run(peering.ensure(kube, "p", ["team-a", "team-b"], clusterwide=False))  # type: ignore[arg-type]
    assert kube.created == [("KopfPeering", "team-a", "p")]
    kube = Creator(set())
    asyncio.run(peering.ensure(kube, "p", ["ignored"], clusterwide=True))  # type: ignore[arg-type]
    assert kube.created == [("ClusterKopfPeering", None, "p")]


def test_a_refusal_other_than_exists_is_raised() -> None:
    with pytest.raises(ApiError):
        asyncio.run(peering.ensure(Creator(set(), refuse=403), "p", ["a"], clusterwide=False))  # type: ignore[arg-type]
