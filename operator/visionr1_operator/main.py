"""``visionr1 operator``: run the VisionR1Run operator (what the chart's Deployment runs).

One replica standalone, or several with ``--peering`` (one active, the others on standby:
peering.py); the watched namespaces are given exactly
(no globs: namespace scanning is off, so the operator needs no right to list namespaces).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

from visionr1_operator.policy import SYSTEM_NAMESPACES, ClusterPolicy


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = "Run the VisionR1Run operator."
    where = parser.add_mutually_exclusive_group()
    where.add_argument(
        "-n",
        "--namespace",
        dest="namespaces",
        action="append",
        default=[],
        metavar="NS",
        help="watch this namespace (repeatable); default: $VISIONR1_NAMESPACES (comma-separated)",
    )
    where.add_argument(
        "-A", "--all-namespaces", action="store_true", help="watch every namespace (ClusterRole)"
    )
    parser.add_argument(
        "--liveness",
        default=os.environ.get("VISIONR1_LIVENESS", "http://0.0.0.0:8080/healthz"),
        metavar="URL",
        help="liveness endpoint to serve (default: %(default)s; '' = none)",
    )
    parser.add_argument(
        "--mlflow-uri",
        default=os.environ.get("VISIONR1_MLFLOW_URI"),
        metavar="URI",
        help="MLflow tracking URI for runs without spec.mlflow.trackingUri "
        "(default: $VISIONR1_MLFLOW_URI; unset = no tracking by the operator)",
    )
    parser.add_argument(
        "--retry-backoff",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="delay before the first retry of a failed stage; doubles per retry (max 10 min)",
    )
    allowlists = (
        (
            "--allowed-image",
            "allowed_images",
            "PATTERN",
            "stage pods may use only images matching one of these shell-style patterns "
            "(e.g. 'ghcr.io/acme/trainer:*')",
        ),
        (
            "--allowed-service-account",
            "allowed_service_accounts",
            "NAME",
            "stage pods may run only as these service accounts ('default' when a run names none)",
        ),
        (
            "--allowed-priority-class",
            "allowed_priority_classes",
            "NAME",
            "PriorityClasses a run may name",
        ),
        (
            "--allowed-node-selector",
            "allowed_node_selectors",
            "PATTERN",
            "patterns of key=value a stage's nodeSelector entries must match",
        ),
        (
            "--allowed-toleration",
            "allowed_tolerations",
            "PATTERN",
            "patterns a stage toleration's key must match ('*' admits any)",
        ),
        (
            "--allowed-tracking-uri",
            "allowed_tracking_uris",
            "URI",
            "MLflow tracking URIs a run may name besides --mlflow-uri",
        ),
    )
    defaults = ClusterPolicy()
    for flag, dest, metavar, what in allowlists:
        env = "VISIONR1_" + dest.upper()
        shown = ", ".join(getattr(defaults, dest)) or "none"
        parser.add_argument(
            flag,
            dest=dest,
            action="append",
            default=[],
            metavar=metavar,
            help=f"{what}; repeatable; default: ${env} (comma-separated), else {shown}. "
            "Deny by default: anything not listed is refused",
        )
    parser.add_argument(
        "--shared-data-path",
        default=os.environ.get("VISIONR1_SHARED_DATA_PATH", "shared"),
        metavar="PATH",
        help="folder of each run's PVC mounted read-only at /data in stage pods "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--metrics-interval",
        type=float,
        default=float(os.environ.get("VISIONR1_METRICS_INTERVAL", "30")),
        metavar="SECONDS",
        help="how often a running stage's MLflow run is read for the step, ETA and key metric "
        "that `kubectl get vr1` shows (default: %(default)s)",
    )
    parser.add_argument(
        "--peering",
        default=os.environ.get("VISIONR1_PEERING") or None,
        metavar="NAME",
        help="run as one of several replicas, the oldest live one active (kopf peering object "
        "NAME, created when missing; needs the kopf.dev peering CRDs); default: standalone",
    )
    parser.add_argument(
        "--peering-lifetime",
        type=int,
        default=15,
        metavar="SECONDS",
        help="how long a silent replica counts as alive: the longest takeover (default: 15)",
    )
    parser.add_argument("--verbose", action="store_true", help="debug logging")


def policy_from(args: Any) -> ClusterPolicy:
    """The cluster policy of the parsed arguments: each list from its flags, else its environment
    variable (comma-separated), else the policy's deny-by-default list."""
    defaults = ClusterPolicy()

    def listed(dest: str) -> tuple[str, ...]:
        env = os.environ.get("VISIONR1_" + dest.upper())
        items = getattr(args, dest) or (env.split(",") if env is not None else None)
        if items is None:
            return tuple(getattr(defaults, dest))
        return tuple(i.strip() for i in items if i.strip())

    # The operator's own namespace (the chart sets it from the pod's): never reconciled either.
    own = os.environ.get("VISIONR1_OPERATOR_NAMESPACE", "").strip()
    return ClusterPolicy(
        allowed_images=listed("allowed_images"),
        allowed_service_accounts=listed("allowed_service_accounts"),
        allowed_priority_classes=listed("allowed_priority_classes"),
        allowed_node_selectors=listed("allowed_node_selectors"),
        allowed_tolerations=listed("allowed_tolerations"),
        allowed_tracking_uris=listed("allowed_tracking_uris"),
        reserved_namespaces=(own,) if own else (),
        shared_data_path=args.shared_data_path,
    )


# Young collections between two collections of the middle generation (Python's default: 10).
YOUNG_PER_MIDDLE = 100


def tune_gc() -> None:
    """The operator's garbage collection, tuned for its load (each choice measured with
    ``benchmarks/operator_load.py``; at 500 runs the full collections went from 56, 16.7 s in
    all, to 7, 1.3 s, with acyclic_bodies.py).

    - Objects alive once everything is imported (modules, classes, functions: about 100,000)
      are frozen out of every collection: they never become garbage, and a full collection
      stops the operator while it walks every container object alive.
    - The middle generation is collected after ``YOUNG_PER_MIDDLE`` young collections, not 10:
      an object that survives a middle collection moves to the oldest generation, and every
      quarter of that generation's size moved there costs a full collection. Under load, a
      watch event's objects live for a second or two (queued, then awaiting the API server),
      long enough to survive a collection every 7,000 allocations; most of them die by
      reference counting before one every 70,000.
    - Not kept: young collections ten times rarer as well (5 full collections, but each
      young one then held ten times the cyclic garbage: peak RSS +30 MB), and full
      collections ten times rarer (each then walked the garbage of ten, up to 1.8 s)."""
    import gc

    gc.freeze()
    young, _, old = gc.get_threshold()
    gc.set_threshold(young, YOUNG_PER_MIDDLE, old)


def main(args: Any) -> int:
    import asyncio

    import kopf

    from visionr1_operator import peering
    from visionr1_operator.handlers import OperatorConfig, make_registry
    from visionr1_operator.plan import RetryPolicy

    namespaces = list(args.namespaces) or [
        n.strip() for n in os.environ.get("VISIONR1_NAMESPACES", "").split(",") if n.strip()
    ]
    if not namespaces and not args.all_namespaces:
        print("error: give --namespace NS (repeatable) or --all-namespaces", file=sys.stderr)
        return 2
    policy = policy_from(args)
    reserved = policy.reserved_namespaces
    system = [n for n in namespaces if n in SYSTEM_NAMESPACES or n in reserved]
    if system:
        print(
            f"error: --namespace {system[0]}: a system namespace (or the operator's own) is never "
            "reconciled; watch tenant namespaces only",
            file=sys.stderr,
        )
        return 2
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from visionr1_operator import mlflow_runs

    if args.mlflow_uri or policy.allowed_tracking_uris:
        # MLflow's client is otherwise imported on first use, inside the first call's timeout
        # (30 s), which a busy node's import can use up: the run's first stage went untracked.
        import mlflow.tracking  # noqa: F401

    # The operator's own MLflow login (the chart's Secret) is for its own server only: taken out
    # of the environment, where MLflow's client would send it to any server.
    own_credentials = mlflow_runs.credentials_from_env(dict(os.environ))
    for key in mlflow_runs.CREDENTIAL_KEYS:
        os.environ.pop(key, None)
    if not args.verbose:
        # A line per API request and per handled watch event (tens of thousands an hour with
        # many runs) are debugging, not the operator's log; failures still show.
        logging.getLogger("httpx2").setLevel(logging.WARNING)
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    config = OperatorConfig(
        mlflow_uri=args.mlflow_uri,
        mlflow_credentials=own_credentials,
        retry=RetryPolicy(base_s=args.retry_backoff, max_s=max(600.0, args.retry_backoff)),
        metrics_interval_s=max(1.0, args.metrics_interval),
        peering=args.peering,
        peering_lifetime_s=max(12, args.peering_lifetime),
        namespaces=tuple(namespaces),
        clusterwide=bool(args.all_namespaces),
        policy=policy,
    )
    tune_gc()
    asyncio.run(
        kopf.operator(
            registry=make_registry(config),
            standalone=not args.peering,
            peering_name=args.peering,
            priority=peering.priority(),
            clusterwide=bool(args.all_namespaces),
            namespaces=namespaces,
            liveness_endpoint=args.liveness or None,
        )
    )
    return 0
