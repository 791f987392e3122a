"""Standby replicas: kopf peering, one active operator pod and the others paused.

kopf pauses an operator while a live peer of higher priority shares its peering object, and
pauses every one of equal priority; a peer counts as alive until its last keep-alive is older
than its lifetime. The priority is minus the pod's start time (ms, plus a random tie-breaker):
the oldest live pod is active, a new or restarted pod never takes over from a live one (a
rolling update hands over only when the old pod leaves), and when the active pod dies the next
oldest resumes once the dead one's lifetime ends (a pod stopped with SIGTERM removes itself at
once). Whoever resumes reconciles every run from the cluster's state (kopf's resume handlers):
Job names are deterministic and creation adopts only its own objects, so nothing is created
twice and no transition is lost.

kopf patches the peering objects but never creates them: the operator creates its release's
one at start (a ClusterKopfPeering when it watches every namespace, else a KopfPeering in each
watched namespace), before kopf's first keep-alive.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Iterable

from lightkube.generic_resource import create_global_resource, create_namespaced_resource

from visionr1_operator.kube import ApiError, Kube

log = logging.getLogger("visionr1.operator")

GROUP, VERSION = "kopf.dev", "v1"
CLUSTER = create_global_resource(GROUP, VERSION, "ClusterKopfPeering", "clusterkopfpeerings")
NAMESPACED = create_namespaced_resource(GROUP, VERSION, "KopfPeering", "kopfpeerings")


def priority(now_s: float | None = None) -> int:
    """This process's kopf priority: older processes rank higher."""
    started_ms = int((time.time() if now_s is None else now_s) * 1000)
    return -(started_ms * 1000 + random.randrange(1000))


async def ensure(kube: Kube, name: str, namespaces: Iterable[str], clusterwide: bool) -> None:
    """Create the peering object(s) named ``name`` unless they exist."""
    targets: list[str | None] = [None] if clusterwide else list(namespaces)
    for ns in targets:
        kind = "ClusterKopfPeering" if ns is None else "KopfPeering"
        meta = {"name": name} if ns is None else {"name": name, "namespace": ns}
        obj = {"apiVersion": f"{GROUP}/{VERSION}", "kind": kind, "metadata": meta}
        try:
            await kube.create_custom(CLUSTER if ns is None else NAMESPACED, obj)
            log.info("created %s %s", kind, name if ns is None else f"{ns}/{name}")
        except ApiError as exc:
            if exc.status == 404:
                raise RuntimeError(
                    f"cannot create {kind} {name}: the kopf.dev peering CRDs are not installed; "
                    "apply crds/kopf-peering.yaml (or install the chart with crds.install), or "
                    "run one replica without --peering"
                ) from exc
            if exc.status != 409:  # 409: there already, made by a peer
                raise
