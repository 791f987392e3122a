"""``visionr1 operator``: run the VisionR1Run operator (what the chart's Deployment runs).

One replica, standalone (kopf has no leader election); the watched namespaces are given exactly
(no globs: namespace scanning is off, so the operator needs no right to list namespaces).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any


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
    parser.add_argument(
        "--allowed-image",
        dest="allowed_images",
        action="append",
        default=[],
        metavar="PATTERN",
        help="stage pods may use only images matching one of these shell-style patterns "
        "(repeatable; e.g. 'ghcr.io/acme/*'); default: $VISIONR1_ALLOWED_IMAGES "
        "(comma-separated); none = any image",
    )
    parser.add_argument(
        "--allowed-service-account",
        dest="allowed_service_accounts",
        action="append",
        default=[],
        metavar="NAME",
        help="stage pods may run only as these service accounts ('default' when a run names "
        "none; repeatable); default: $VISIONR1_ALLOWED_SERVICE_ACCOUNTS; none = any",
    )
    parser.add_argument(
        "--shared-data-path",
        default=os.environ.get("VISIONR1_SHARED_DATA_PATH", "shared"),
        metavar="PATH",
        help="folder of each run's PVC mounted read-only at /data in stage pods "
        "(default: %(default)s)",
    )
    parser.add_argument("--verbose", action="store_true", help="debug logging")


def main(args: Any) -> int:
    import asyncio

    import kopf

    from visionr1_operator.handlers import OperatorConfig, make_registry
    from visionr1_operator.plan import RetryPolicy
    from visionr1_operator.policy import ClusterPolicy

    def listed(given: list[str], env: str) -> tuple[str, ...]:
        items = given or os.environ.get(env, "").split(",")
        return tuple(i.strip() for i in items if i.strip())

    namespaces = list(args.namespaces) or [
        n.strip() for n in os.environ.get("VISIONR1_NAMESPACES", "").split(",") if n.strip()
    ]
    if not namespaces and not args.all_namespaces:
        print("error: give --namespace NS (repeatable) or --all-namespaces", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    config = OperatorConfig(
        mlflow_uri=args.mlflow_uri,
        retry=RetryPolicy(base_s=args.retry_backoff, max_s=max(600.0, args.retry_backoff)),
        policy=ClusterPolicy(
            allowed_images=listed(args.allowed_images, "VISIONR1_ALLOWED_IMAGES"),
            allowed_service_accounts=listed(
                args.allowed_service_accounts, "VISIONR1_ALLOWED_SERVICE_ACCOUNTS"
            ),
            shared_data_path=args.shared_data_path,
        ),
    )
    asyncio.run(
        kopf.operator(
            registry=make_registry(config),
            standalone=True,
            clusterwide=bool(args.all_namespaces),
            namespaces=namespaces,
            liveness_endpoint=args.liveness or None,
        )
    )
    return 0
