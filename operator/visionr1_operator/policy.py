"""What a cluster admits of a VisionR1Run beyond its schema: pure checks, no I/O.

The operator is started with a :class:`ClusterPolicy` (the chart's values): which images,
service accounts, priority classes, node selectors, tolerations and MLflow tracking URIs a run may
use, and which folder of the PVC is the shared (read-only) data. Every list denies by default: an
empty list admits nothing beyond the defaults (the chart's trainer image, the namespace's
``default`` service account, the operator's own MLflow server), so a tenant cannot pick a
privileged service account, a priority class that preempts another team, another team's nodes, or
an image nobody reviewed. A run that cannot run on a cluster at all (laptop-only storage) is
refused by :func:`cluster_problems`, one that breaks the policy by :func:`policy_problems`; each
names the field and what to set. Runs in the system namespaces are never reconciled.
"""

from __future__ import annotations

import fnmatch
import hashlib
import posixpath
import re
from dataclasses import dataclass

from visionr1_operator.api import Images, VisionR1Run, enabled_stages

DEFAULT_SERVICE_ACCOUNT = "default"
# The trainer image a run gets when it names none (spec.images.trainer's default).
DEFAULT_TRAINER_IMAGE: str = Images.model_fields["trainer"].default
# Namespaces of the cluster itself: a run there is never reconciled (its Jobs would run next to
# the control plane's own pods, with whatever that namespace's service accounts may do).
SYSTEM_NAMESPACES = ("kube-system", "kube-public", "kube-node-lease")


@dataclass(frozen=True)
class ClusterPolicy:
    # Shell-style patterns (fnmatch) an image must match, e.g. "ghcr.io/acme/*".
    allowed_images: tuple[str, ...] = (DEFAULT_TRAINER_IMAGE,)
    # Service accounts stage pods may run as ("default" when the run names none).
    allowed_service_accounts: tuple[str, ...] = (DEFAULT_SERVICE_ACCOUNT,)
    # PriorityClasses a run may name (spec.priorityClassName); empty: none.
    allowed_priority_classes: tuple[str, ...] = ()
    # Patterns of "key=value" a stage's nodeSelector entries must match; empty: none.
    allowed_node_selectors: tuple[str, ...] = ()
    # Patterns a stage toleration's key must match ("*" also admits a key-less toleration, which
    # tolerates every taint); empty: none.
    allowed_tolerations: tuple[str, ...] = ()
    # Tracking URIs a run may name in spec.mlflow.trackingUri besides the operator's own
    # (--mlflow-uri); empty: only the operator's own. Exact URIs, not patterns: the operator
    # sends the run's credentials there.
    allowed_tracking_uris: tuple[str, ...] = ()
    # Namespaces never reconciled besides SYSTEM_NAMESPACES (the operator's own).
    reserved_namespaces: tuple[str, ...] = ()
    # Folder of the PVC mounted read-only at /data in every stage pod (shared raw data,
    # benchmarks, models), relative to the PVC's root.
    shared_data_path: str = "shared"


def workspace_sub_path(run: VisionR1Run) -> str:
    """The run's folder in the PVC: ``spec.storage.subPath`` or ``<namespace>/<run>``."""
    return run.spec.storage.sub_path or f"{run.metadata.namespace or 'default'}/{run.metadata.name}"


def model_cache_sub_path(run: VisionR1Run) -> str:
    """The namespace's model cache in the PVC: ``<namespace>/<spec.storage.modelCache>``, one
    folder per hub model and revision under it (:func:`base_model_cache_sub_path`)."""
    namespace = run.metadata.namespace or "default"
    return f"{namespace}/{posixpath.normpath(run.spec.storage.model_cache).strip('/')}"


# A hub model id: ``name`` or ``owner/name`` of letters, digits, ``_``, ``.`` and ``-`` (the hub's
# own rule, huggingface_hub.utils.validate_repo_id: at most 96 characters, no ``--`` or ``..``).
_HUB_ID = re.compile(r"^(?:[A-Za-z0-9_.-]+/)?[A-Za-z0-9_.-]+$")
# A revision used as it is in a folder name; any other is slugged and given a hash.
_SAFE_REVISION = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9_.-]{0,63}$")
# The hub's default branch: an unset spec.baseModel.revision is this one.
DEFAULT_REVISION = "main"


def is_hub_model(name: str) -> bool:
    """Whether ``spec.baseModel.name`` names a hub model (downloaded into the model cache)
    rather than a folder: an absolute path (e.g. /data/models/…) or any other path is a folder,
    loaded where it is."""
    return (
        not name.startswith("/")
        and len(name) <= 96
        and _HUB_ID.match(name) is not None
        and "--" not in name
        and ".." not in name
        and not name.startswith(("./", "."))
    )


def model_cache_key(name: str, revision: str | None) -> str:
    """The model cache's folder of one hub model at one revision, relative to the cache:
    ``models--<owner>--<name>/<revision>``, the hub cache's own naming of a model. The same for
    the same model and revision in every run; a revision that is no safe folder name (``/``,
    a leading dot, over 64 characters) becomes a slug and 12 hex digits of its SHA-256. An unset
    revision is the hub's default branch, ``main``."""
    if not is_hub_model(name):
        raise ValueError(f"{name!r} is not a hub model id (owner/name)")
    rev = revision or DEFAULT_REVISION
    if not _SAFE_REVISION.match(rev):
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", rev).strip(".-")[:40] or "revision"
        rev = f"{slug}-{hashlib.sha256(rev.encode()).hexdigest()[:12]}"
    return f"models--{name.replace('/', '--')}/{rev}"


def base_model_cache_sub_path(run: VisionR1Run) -> str | None:
    """The folder of the PVC holding the run's hub base model (``<namespace>/<modelCache>/
    <key>``, :func:`model_cache_key`), None for a base model that is a folder."""
    model = run.spec.base_model
    if not is_hub_model(model.name):
        return None
    return f"{model_cache_sub_path(run)}/{model_cache_key(model.name, model.revision)}"


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
    return problems


def _listed(allowed: tuple[str, ...], chart_key: str) -> str:
    got = ", ".join(allowed) if allowed else "none"
    return f"allowed on this cluster: {got} (the chart's operator.{chart_key})"


def namespace_problem(namespace: str, policy: ClusterPolicy) -> str | None:
    """Why runs in ``namespace`` are never reconciled (None: they are)."""
    if namespace in SYSTEM_NAMESPACES or namespace in policy.reserved_namespaces:
        return (
            f"metadata.namespace: {namespace!r} is a system namespace (or the operator's own), "
            "where the operator never runs anything; create the run in a tenant namespace"
        )
    return None


def policy_problems(
    run: VisionR1Run, policy: ClusterPolicy, default_tracking_uri: str | None = None
) -> list[str]:
    """What ``run`` asks for that this cluster does not allow (empty: nothing). Each message
    names the field, what is allowed, and the chart value an admin would change."""
    problems: list[str] = []
    problem = namespace_problem(run.metadata.namespace or "default", policy)
    if problem:
        problems.append(problem)
    for path, image in images(run).items():
        if not any(fnmatch.fnmatchcase(image, p) for p in policy.allowed_images):
            problems.append(
                f"{path}: image {image!r} is not allowed; use an allowed one or ask the cluster "
                f"admin to add it; {_listed(policy.allowed_images, 'allowedImages')}"
            )
    account = run.spec.service_account_name or DEFAULT_SERVICE_ACCOUNT
    if account not in policy.allowed_service_accounts:
        problems.append(
            f"spec.serviceAccountName: {account!r} is not allowed; remove it (stage pods then run "
            "as the namespace's default service account, without an API token) or ask the "
            "cluster admin; " + _listed(policy.allowed_service_accounts, "allowedServiceAccounts")
        )
    priority = run.spec.priority_class_name
    if priority and priority not in policy.allowed_priority_classes:
        problems.append(
            f"spec.priorityClassName: {priority!r} is not allowed; remove it or ask the cluster "
            "admin; " + _listed(policy.allowed_priority_classes, "allowedPriorityClasses")
        )
    for stage in enabled_stages(run.spec):
        spec = run.spec.stages.get(stage)
        for key, value in spec.node_selector.items():
            pair = f"{key}={value}"
            if not any(fnmatch.fnmatchcase(pair, p) for p in policy.allowed_node_selectors):
                problems.append(
                    f"spec.stages.{stage}.nodeSelector: {pair!r} is not allowed; remove it or ask "
                    "the cluster admin; "
                    + _listed(policy.allowed_node_selectors, "allowedNodeSelectors")
                )
        for i, toleration in enumerate(spec.tolerations):
            key = toleration.key or ""
            if not any(fnmatch.fnmatchcase(key, p) for p in policy.allowed_tolerations):
                what = repr(key) if key else "without a key (it tolerates every taint)"
                problems.append(
                    f"spec.stages.{stage}.tolerations[{i}]: a toleration {what} is not allowed; "
                    "remove it or ask the cluster admin; "
                    + _listed(policy.allowed_tolerations, "allowedTolerations")
                )
    uri = run.spec.mlflow.tracking_uri
    if uri and uri != default_tracking_uri and uri not in policy.allowed_tracking_uris:
        allowed = [u for u in (default_tracking_uri, *policy.allowed_tracking_uris) if u]
        problems.append(
            f"spec.mlflow.trackingUri: {uri!r} is not allowed (the operator and the stage pods "
            "would send this run's MLflow credentials there); leave it unset for the cluster's "
            "MLflow server or ask the cluster admin; allowed on this cluster: "
            + (", ".join(allowed) or "none")
            + " (the chart's operator.allowedTrackingUris)"
        )
    return problems
