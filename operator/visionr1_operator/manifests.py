"""Pure: one attempt of one stage of a VisionR1Run → the Kubernetes objects that run it.

Per attempt: a ConfigMap holding the resolved stage config and a Job, both named
``plan.job_name(run, stage, attempt)``; for multi-node training also a headless Service per stage
(``<run>-<stage>``) that gives the Indexed Job's pods stable host names for torchrun's rendezvous
on index 0. Also the reverse direction: a Job object → :class:`plan.ObservedJob`.

Retries belong to the plan (one Job per attempt, with the operator's backoff), so every Job has
``backoffLimit: 0``; its podFailurePolicy still matters: exit code 65 fails the Job with reason
``PodFailurePolicy`` (how the plan tells a permanent failure from a retryable one), and pods
evicted by a node disruption are replaced without failing the Job at all.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from visionr1_jobs.config import EXIT_INVALID_INPUT
from visionr1_operator.api import API_VERSION, GROUP, KIND, VisionR1Run
from visionr1_operator.plan import ObservedJob, job_name, parse_time
from visionr1_operator.resolve import resolve_stage_config

LABEL_RUN = f"{GROUP}/run"
LABEL_STAGE = f"{GROUP}/stage"
LABEL_ATTEMPT = f"{GROUP}/attempt"
ANNOTATION_HELD = f"{GROUP}/suspended-by"  # set when the operator suspends a Job (spec.suspend)
ANNOTATION_STAGE_RUN = f"{GROUP}/mlflow-run-id"
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"

CONTAINER = "stage"
WORKSPACE = "/workspace"
# The PVC's root, read-only: shared raw data, benchmarks and models live here across runs
# (the workspace is only this run's subPath of the same PVC).
SHARED_DATA = "/data"
CONFIG_DIR = "/etc/visionr1"
CONFIG_FILE = f"{CONFIG_DIR}/config.json"
HF_HOME = f"{WORKSPACE}/.cache/huggingface"
RDZV_PORT = 29500
SHARDED = ("synthesis", "filter", "eval")
DISTRIBUTED = ("sft", "grpo")
# The stage images run as this user (images/trainer/Dockerfile creates it).
RUN_AS_USER = 1000


def service_name(run_name: str, stage: str) -> str:
    return f"{run_name}-{stage}"


def workspace_sub_path(run: VisionR1Run) -> str:
    return run.spec.storage.sub_path or f"{run.metadata.namespace or 'default'}/{run.metadata.name}"


def labels(run_name: str, stage: str, attempt: int | None = None) -> dict[str, str]:
    out = {
        LABEL_RUN: run_name,
        LABEL_STAGE: stage,
        "app.kubernetes.io/name": "visionr1",
        "app.kubernetes.io/component": stage,
        "app.kubernetes.io/managed-by": "visionr1-operator",
    }
    if attempt is not None:
        out[LABEL_ATTEMPT] = str(attempt)
    return out


def owner_references(run: VisionR1Run) -> list[dict[str, Any]]:
    """The run owns every child, so deleting it deletes them (garbage collector).

    Without a uid (``visionr1 render`` of a file never applied) there is nothing to point at.
    blockOwnerDeletion is left unset: it would need update on visionr1runs/finalizers.
    """
    uid = (run.metadata.model_extra or {}).get("uid")
    if not uid:
        return []
    return [
        {
            "apiVersion": API_VERSION,
            "kind": KIND,
            "name": run.metadata.name,
            "uid": uid,
            "controller": True,
        }
    ]


def _meta(run: VisionR1Run, name: str, stage: str, attempt: int | None) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "name": name,
        "namespace": run.metadata.namespace or "default",
        "labels": labels(run.metadata.name, stage, attempt),
    }
    owners = owner_references(run)
    if owners:
        meta["ownerReferences"] = owners
    return meta


def config_map(
    run: VisionR1Run,
    stage: str,
    attempt: int,
    *,
    mlflow_uri: str | None = None,
    parent_run_id: str | None = None,
    stage_run_id: str | None = None,
) -> dict[str, Any]:
    cfg = resolve_stage_config(
        run,
        stage,
        WORKSPACE,
        mlflow_tracking_uri=mlflow_uri,
        parent_run_id=parent_run_id,
        stage_run_id=stage_run_id,
    )
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _meta(run, job_name(run.metadata.name, stage, attempt), stage, attempt),
        "data": {"config.json": json.dumps(cfg.dump(), indent=2, sort_keys=True)},
    }


def is_multi_node(run: VisionR1Run, stage: str) -> bool:
    return stage in DISTRIBUTED and run.spec.stages.get(stage).nodes > 1


def headless_service(run: VisionR1Run, stage: str) -> dict[str, Any]:
    """Stable DNS (<job>-<index>.<service>) for the pods of a multi-node training Job."""
    name = service_name(run.metadata.name, stage)
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(run, name, stage, None),
        "spec": {
            "clusterIP": "None",
            # torchrun's rendezvous runs before any pod is Ready
            "publishNotReadyAddresses": True,
            "selector": {LABEL_RUN: run.metadata.name, LABEL_STAGE: stage},
            "ports": [{"name": "rendezvous", "port": RDZV_PORT, "targetPort": RDZV_PORT}],
        },
    }


def _command(run: VisionR1Run, stage: str, attempt: int) -> list[str]:
    # Training stages re-launch themselves under torchrun from the VISIONR1_* env below
    # (visionr1_jobs.training.launch): one mechanism on a laptop and in a pod, and the launcher
    # turns a rank's invalid-input exit into 65, which torchrun alone would report as 1.
    return ["python", "-m", "visionr1_jobs", stage, "--config", CONFIG_FILE]


def _torchrun_env(run: VisionR1Run, stage: str, attempt: int) -> list[dict[str, Any]]:
    spec = run.spec.stages.get(stage)
    env = [
        {"name": "VISIONR1_NNODES", "value": str(spec.nodes)},
        {"name": "VISIONR1_NPROC_PER_NODE", "value": str(max(spec.resources.gpus, 1))},
        {"name": "MASTER_PORT", "value": str(RDZV_PORT)},
    ]
    if spec.nodes > 1:
        host = f"{job_name(run.metadata.name, stage, attempt)}-0.{service_name(run.metadata.name, stage)}"
        env.append({"name": "MASTER_ADDR", "value": host})
    return env


def _env(
    run: VisionR1Run,
    stage: str,
    *,
    mlflow_uri: str | None,
    parent_run_id: str | None,
    stage_run_id: str | None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    spec = run.spec
    env: list[dict[str, Any]] = [
        {"name": "PYTHONUNBUFFERED", "value": "1"},
        {"name": "MLFLOW_DISABLE_TELEMETRY", "value": "true"},
        {"name": "MLFLOW_EXPERIMENT_NAME", "value": spec.mlflow.experiment},
        {"name": "HF_HOME", "value": HF_HOME},
    ]
    uri = spec.mlflow.tracking_uri or mlflow_uri
    if uri:
        env.append({"name": "MLFLOW_TRACKING_URI", "value": uri})
    if parent_run_id:
        env.append({"name": "VISIONR1_PARENT_RUN_ID", "value": parent_run_id})
    if stage_run_id:
        env.append({"name": "VISIONR1_STAGE_RUN_ID", "value": stage_run_id})
    if stage in SHARDED:
        env.append({"name": "VISIONR1_SHARDS", "value": str(spec.stages.get(stage).nodes)})
    if spec.hf_token_secret is not None:
        ref = spec.hf_token_secret
        env.append(
            {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}}
        )
    for var in spec.stages.get(stage).env:
        env.append(var.dump())
    env_from: list[dict[str, Any]] = []
    if spec.mlflow.credentials_secret:
        env_from.append({"secretRef": {"name": spec.mlflow.credentials_secret}})
    return env, env_from


def _resources(run: VisionR1Run, stage: str) -> dict[str, Any]:
    res = run.spec.stages.get(stage).resources
    limits: dict[str, str] = {}
    requests: dict[str, str] = {}
    if res.gpus:
        limits["nvidia.com/gpu"] = str(res.gpus)
    for key, value in (("cpu", res.cpu), ("memory", res.memory)):
        if value:
            limits[key] = requests[key] = value
    out: dict[str, Any] = {}
    if limits:
        out["limits"] = limits
    if requests:
        out["requests"] = requests
    return out


def job(
    run: VisionR1Run,
    stage: str,
    attempt: int,
    *,
    mlflow_uri: str | None = None,
    parent_run_id: str | None = None,
    stage_run_id: str | None = None,
) -> dict[str, Any]:
    """The Job of one attempt of ``stage``."""
    spec = run.spec
    stage_spec = spec.stages.get(stage)
    name = job_name(run.metadata.name, stage, attempt)
    meta = _meta(run, name, stage, attempt)
    if spec.queue_name:
        meta["labels"][KUEUE_QUEUE_LABEL] = spec.queue_name
    if stage_run_id:
        meta["annotations"] = {ANNOTATION_STAGE_RUN: stage_run_id}
    env, env_from = _env(
        run, stage, mlflow_uri=mlflow_uri, parent_run_id=parent_run_id, stage_run_id=stage_run_id
    )
    if stage in DISTRIBUTED:
        env += _torchrun_env(run, stage, attempt)
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": stage_spec.image or spec.images.trainer,
        "imagePullPolicy": spec.images.pull_policy,
        "command": _command(run, stage, attempt),
        "env": env,
        "resources": _resources(run, stage),
        "volumeMounts": [
            {"name": "workspace", "mountPath": WORKSPACE, "subPath": workspace_sub_path(run)},
            {"name": "workspace", "mountPath": SHARED_DATA, "readOnly": True},
            {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
            {"name": "dshm", "mountPath": "/dev/shm"},
        ],
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "privileged": False,
            "runAsNonRoot": True,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
    }
    if env_from:
        container["envFrom"] = env_from
    if is_multi_node(run, stage):
        container["ports"] = [{"name": "rendezvous", "containerPort": RDZV_PORT}]
    storage = spec.storage
    volumes: list[dict[str, Any]] = [
        {"name": "config", "configMap": {"name": name}},
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": stage_spec.resources.shm}},
    ]
    if storage.pvc:
        volumes.insert(
            0, {"name": "workspace", "persistentVolumeClaim": {"claimName": storage.pvc}}
        )
    else:
        # A run written for the laptop (storage.localDir only) has no shared storage in a
        # cluster: render it with a scratch volume rather than refuse, and say so.
        volumes.insert(0, {"name": "workspace", "emptyDir": {}})
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RUN_AS_USER,
            "runAsGroup": RUN_AS_USER,
            "fsGroup": RUN_AS_USER,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": volumes,
    }
    if stage_spec.node_selector:
        pod_spec["nodeSelector"] = dict(stage_spec.node_selector)
    if stage_spec.tolerations:
        pod_spec["tolerations"] = [t.dump() for t in stage_spec.tolerations]
    if spec.service_account_name:
        pod_spec["serviceAccountName"] = spec.service_account_name
    if spec.priority_class_name:
        pod_spec["priorityClassName"] = spec.priority_class_name
    if spec.images.pull_secrets:
        pod_spec["imagePullSecrets"] = [{"name": n} for n in spec.images.pull_secrets]
    nodes = stage_spec.nodes
    job_spec: dict[str, Any] = {
        "backoffLimit": 0,
        "completions": nodes,
        "parallelism": nodes,
        "ttlSecondsAfterFinished": spec.ttl_seconds_after_finished,
        "suspend": bool(spec.queue_name),  # Kueue admits (unsuspends) queued Jobs
        "podFailurePolicy": {
            "rules": [
                {
                    "action": "FailJob",
                    "onExitCodes": {
                        "containerName": CONTAINER,
                        "operator": "In",
                        "values": [EXIT_INVALID_INPUT],
                    },
                },
                {
                    "action": "Ignore",
                    "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}],
                },
            ]
        },
        "template": {
            "metadata": {"labels": labels(run.metadata.name, stage, attempt)},
            "spec": pod_spec,
        },
    }
    if stage in SHARDED or is_multi_node(run, stage):
        job_spec["completionMode"] = "Indexed"
    if is_multi_node(run, stage):
        pod_spec["subdomain"] = service_name(run.metadata.name, stage)
    if stage_spec.active_deadline_seconds:
        job_spec["activeDeadlineSeconds"] = stage_spec.active_deadline_seconds
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": meta, "spec": job_spec}


def stage_objects(
    run: VisionR1Run,
    stage: str,
    attempt: int,
    *,
    mlflow_uri: str | None = None,
    parent_run_id: str | None = None,
    stage_run_id: str | None = None,
) -> list[dict[str, Any]]:
    """Everything one attempt needs, in creation order (the Job last: it mounts the rest)."""
    ids = {"mlflow_uri": mlflow_uri, "parent_run_id": parent_run_id, "stage_run_id": stage_run_id}
    out = [config_map(run, stage, attempt, **ids)]
    if is_multi_node(run, stage):
        out.append(headless_service(run, stage))
    out.append(job(run, stage, attempt, **ids))
    return out


# --------------------------------------------------------------------------- observing Jobs

_EXIT_CODE = re.compile(r"exit code (\d+)")


def observe_job(obj: Mapping[str, Any]) -> ObservedJob | None:
    """A child Job → what the plan needs; None for a Job without our labels."""
    meta = obj.get("metadata") or {}
    lab = meta.get("labels") or {}
    stage = lab.get(LABEL_STAGE)
    try:
        attempt = int(lab.get(LABEL_ATTEMPT, ""))
    except ValueError:
        return None
    if not stage:
        return None
    spec = obj.get("spec") or {}
    status = obj.get("status") or {}
    complete = False
    failed_reason = None
    message = ""
    finished_at = parse_time(status.get("completionTime"))
    for cond in status.get("conditions") or []:
        if cond.get("status") != "True":
            continue
        if cond.get("type") == "Complete":
            complete = True
        elif cond.get("type") == "Failed":
            failed_reason = cond.get("reason") or "Failed"
            message = cond.get("message") or ""
            finished_at = parse_time(cond.get("lastTransitionTime")) or finished_at
    code = _EXIT_CODE.search(message)
    return ObservedJob(
        name=meta.get("name", ""),
        stage=stage,
        attempt=attempt,
        completions=int(spec.get("completions") or 1),
        active=int(status.get("active") or 0),
        succeeded=int(status.get("succeeded") or 0),
        failed=int(status.get("failed") or 0),
        suspended=bool(spec.get("suspend")),
        held=(meta.get("annotations") or {}).get(ANNOTATION_HELD) == "operator",
        queue=lab.get(KUEUE_QUEUE_LABEL) or None,
        complete=complete,
        failed_reason=failed_reason,
        message=message,
        exit_code=int(code.group(1)) if code else None,
        finished_at=finished_at,
    )


def suspend_patch(suspend: bool) -> dict[str, Any]:
    """Merge patch that suspends (held by the operator) or resumes a Job."""
    return {
        "metadata": {"annotations": {ANNOTATION_HELD: "operator" if suspend else None}},
        "spec": {"suspend": suspend},
    }
