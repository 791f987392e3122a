"""What a cluster admits of a VisionR1Run beyond its schema: pure checks, no I/O.

The operator is started with a :class:`ClusterPolicy` (the chart's values): which images and
service accounts stage pods may use, and which folder of the PVC is the shared (read-only) data.
A run that breaks the policy, or that cannot run on a cluster at all (laptop-only storage), is
refused before anything is created; :func:`cluster_problems` names the field and what to set.
"""

from __future__ import annotations

import fnmatch
import posixpath
from dataclasses import dataclass

from visionr1_operator.api import VisionR1Run, enabled_stages

DEFAULT_SERVICE_ACCOUNT = "default"


@dataclass(frozen=True)
class ClusterPolicy:
    # Shell-style patterns (fnmatch) an image must match, e.g. "ghcr.io/acme/*"; empty = any.
    allowed_images: tuple[str, ...] = ()
    # Service accounts stage pods may run as ("default" when the run names none); empty = any.
    allowed_service_accounts: tuple[str, ...] = ()
    # Folder of the PVC mounted read-only at /data in every stage pod (shared raw data,
    # benchmarks, models), relative to the PVC's root.
    shared_data_path: str = "shared"


def workspace_sub_path(run: VisionR1Run) -> str:
    """The run's folder in the PVC: ``spec.storage.subPath`` or ``<namespace>/<run>``."""
    return run.spec.storage.sub_path or f"{run.metadata.namespace or 'default'}/{run.metadata.name}"


def model_cache_sub_path(run: VisionR1Run) -> str:
    """The model cache folder in the PVC: ``<namespace>/<spec.storage.modelCache>``."""
    namespace = run.metadata.namespace or "default"
    return f"{namespace}/{posixpath.normpath(run.spec.storage.model_cache).strip('/')}"


def _norm(path: str) -> str:
    return posixpath.normpath(path).strip("/")


def images(run: VisionR1Run) -> dict[str, str]:
    """Field path → image of every image the run's stage pods would use."""
    out = {"spec.images.trainer": run.spec.images.trainer}
    for stage in enabled_stages(run.spec):
        image = run.spec.stages.get(stage).image
        if image:
            out[f"spec.stages.{stage}.image"] = image
    return out


def cluster_problems(run: VisionR1Run, policy: ClusterPolicy) -> list[str]:
    """Why ``run`` cannot run on this cluster (empty: it can). Each message names the field."""
    problems: list[str] = []
    storage = run.spec.storage
    if not storage.pvc:
        problems.append(
            "spec.storage.pvc: required on a cluster (spec.storage.localDir is for `visionr1 "
            "run-local` only; stage pods share no local disk): set spec.storage.pvc to a "
            "PersistentVolumeClaim in this namespace (ReadWriteMany for multi-node stages)"
        )
    else:
        namespace = run.metadata.namespace or "default"
        sub = _norm(workspace_sub_path(run))
        shared = _norm(policy.shared_data_path)
        if sub in ("", ".") or sub.startswith("..") or not sub.startswith(f"{namespace}/"):
            problems.append(
                f"spec.storage.subPath: {storage.sub_path!r} is outside this namespace's folder; "
                f"use a folder under {namespace}/ (or leave it unset: {namespace}/<run name>)"
            )
        elif posixpath.normpath(storage.model_cache).startswith(".."):
            problems.append(
                f"spec.storage.modelCache: {storage.model_cache!r} leaves this namespace's folder; "
                f"use a folder inside it (default .cache/huggingface = {namespace}/.cache/huggingface)"
            )
        elif shared and (sub == shared or sub.startswith(f"{shared}/")):
            problems.append(
                f"spec.storage.subPath: {sub!r} is inside the shared data folder {shared!r} "
                "(read-only for every run); choose another folder"
            )
    if policy.allowed_images:
        for path, image in images(run).items():
            if not any(fnmatch.fnmatchcase(image, p) for p in policy.allowed_images):
                problems.append(
                    f"{path}: image {image!r} is not allowed on this cluster; allowed: "
                    + ", ".join(policy.allowed_images)
                )
    if policy.allowed_service_accounts:
        account = run.spec.service_account_name or DEFAULT_SERVICE_ACCOUNT
        if account not in policy.allowed_service_accounts:
            problems.append(
                f"spec.serviceAccountName: {account!r} is not allowed on this cluster; allowed: "
                + ", ".join(policy.allowed_service_accounts)
            )
    return problems
