"""``visionr1 render FILE``: every object the operator would create for a run, as YAML.

The first attempt of each enabled stage: its ConfigMap, its headless Service (multi-node
training), its Job. MLflow run ids are only known once the operator runs, so they are left out
unless given; owner references need the uid the API server assigns, so they appear only when the
file carries one. The operator reads the namespace's Pod Security level before it creates a
Job; ``--pod-security`` says which one to render for (restricted: no root init container).
"""

from __future__ import annotations

import sys
from typing import Any

import yaml

from visionr1_operator.api import VisionR1Run, enabled_stages


def render_run(
    run: VisionR1Run,
    *,
    mlflow_uri: str | None = None,
    parent_run_id: str | None = None,
    pod_security: str | None = None,
) -> list[dict[str, Any]]:
    """ValueError when the namespace's Pod Security level would refuse the run's pods."""
    from visionr1_operator.manifests import pod_security_problem, stage_objects

    refused = pod_security_problem(run, pod_security)
    if refused:
        raise ValueError(refused)
    out: list[dict[str, Any]] = []
    for stage in enabled_stages(run.spec):
        out.extend(
            stage_objects(
                run,
                stage,
                0,
                mlflow_uri=mlflow_uri,
                parent_run_id=parent_run_id,
                pod_security=pod_security,
            )
        )
    return out


def render_file(
    path: str, *, mlflow_uri: str | None = None, pod_security: str | None = None
) -> list[dict[str, Any]]:
    """Objects for every VisionR1Run in ``path``; ValueError naming the field when invalid."""
    from visionr1_operator.validate import validate_file

    problems = validate_file(path)
    if problems:
        raise ValueError(f"{path}: " + "; ".join(str(p) for p in problems))
    with open(path) as fh:
        docs = [d for d in yaml.safe_load_all(fh) if d is not None]
    out: list[dict[str, Any]] = []
    for doc in docs:
        run = VisionR1Run.model_validate(doc)
        out.extend(render_run(run, mlflow_uri=mlflow_uri, pod_security=pod_security))
    return out


def to_yaml(objects: list[dict[str, Any]]) -> str:
    return "".join("---\n" + yaml.safe_dump(o, sort_keys=False, width=100) for o in objects)


def add_arguments(parser: Any) -> None:
    parser.description = "Print the ConfigMaps, Services and Jobs the operator would create."
    parser.add_argument("file", metavar="FILE", help="VisionR1Run manifest (YAML)")
    parser.add_argument(
        "--mlflow-uri",
        default=None,
        help="MLflow tracking URI for runs that do not set spec.mlflow.trackingUri "
        "(the operator's --mlflow-uri)",
    )
    parser.add_argument(
        "--pod-security",
        choices=("privileged", "baseline", "restricted"),
        default=None,
        help="render for a namespace that enforces this Pod Security level (its label "
        "pod-security.kubernetes.io/enforce, which the operator reads): with restricted, "
        "spec.storage.workspaceInit Auto gives pods no root init container",
    )


def main(args: Any) -> int:
    try:
        objects = render_file(args.file, mlflow_uri=args.mlflow_uri, pod_security=args.pod_security)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    sys.stdout.write(to_yaml(objects))
    return 0
