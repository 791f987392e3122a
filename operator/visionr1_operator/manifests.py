"""Pure: one attempt of one stage of a VisionR1Run → the Kubernetes objects that run it.

Per attempt: a ConfigMap holding the resolved stage config and a Job, both named
``plan.job_name(run, stage, attempt)``; for multi-node training also a headless Service per stage
(``<run>-<stage>``) that gives the Indexed Job's pods stable host names for torchrun's rendezvous
on index 0. Also the reverse direction: a Job object → :class:`plan.ObservedJob`.

Storage: the run's own folder of the PVC (``<namespace>/<run>``) is mounted read-write at
/workspace and only the shared data folder (:class:`~visionr1_operator.policy.ClusterPolicy`) is
mounted, read-only, at /data; never the PVC's root, which holds every run of every namespace.
The kubelet creates a missing subPath folder as root 0755, and fsGroup does not reach into it
on hostPath, local, NFS and many CSI volumes (the driver's fsGroupPolicy decides), so a small
init container (root, with only CHOWN/DAC_OVERRIDE/FOWNER) creates the run's folder and hands it
to the stage user first. It mounts only the folder above the run's, not the PVC's root. A
namespace that enforces the restricted Pod Security Standard refuses a root container, so there
(``spec.storage.workspaceInit``: Auto in such a namespace, or FSGroup) the pod has no init
container and relies on its fsGroup (fsGroupChangePolicy OnRootMismatch); a stage that then
finds its workspace not writable fails (exit 65) saying what to do.

The model cache: a hub base model (``spec.baseModel``) is downloaded once per namespace, model
and revision, into its own folder ``<namespace>/<spec.storage.modelCache>/models--<owner>--<name>/
<revision>`` (:func:`~visionr1_operator.policy.base_model_cache_sub_path`), by the ``model-fetch``
init container of each stage pod that loads it: the one container that mounts that folder
read-write, running a fixed program (``python -m visionr1_jobs.fetch_model``) with no secret but
the run's HF token. It renames a complete download into place with a marker, or finds one there
and skips. The stage container mounts the folder read-only and loads the model from it
(``VISIONR1_BASE_MODEL_DIR``), so no run, whatever its code, can change the weights another run
loads. Everything else the hub libraries write (teacher models, datasets, tokens, locks) goes
to HF_HOME, the run's own ``.cache/huggingface`` of its workspace folder. A base model that is a
folder (``/data/models/…``) is loaded where it is: no fetch.

Failures explain themselves: the stage container's termination message (``FallbackToLogsOnError``;
the stage program writes its one-line reason to the file) and an OOMKilled container's memory
limit go into the stage's message, and from there into the run's conditions and Events.

Retries belong to the plan (one Job per attempt, with the operator's backoff), so every Job has
``backoffLimit: 0``; its podFailurePolicy still matters: exit code 65 fails the Job with reason
``PodFailurePolicy`` (how the plan tells a permanent failure from a retryable one); a pod
evicted by a node disruption is replaced without failing the Job, except in a multi-pod training
Job, where losing any pod fails the whole attempt at once and the next attempt resumes from the
checkpoint (:func:`pod_failure_policy`).
"""

from __future__ import annotations

import dataclasses
import json
import posixpath
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from visionr1_jobs.config import (
    BASE_MODEL_DIR_ENV,
    BASE_MODEL_ENV,
    BASE_MODEL_REVISION_ENV,
    DEFAULT_TERMINATION_LOG,
    EXIT_INPUT_MISSING,
    EXIT_INVALID_INPUT,
    TERMINATION_LOG_ENV,
)
from visionr1_operator.api import API_VERSION, GROUP, KIND, VisionR1Run
from visionr1_operator.chargeback import Usage, usage
from visionr1_operator.plan import ObservedJob, job_name, parse_time
from visionr1_operator.policy import (
    DEFAULT_REVISION,
    ClusterPolicy,
    base_model_cache_sub_path,
    model_cache_sub_path,
)
from visionr1_operator.policy import workspace_sub_path as workspace_sub_path
from visionr1_operator.resolve import resolve_stage_config

LABEL_RUN = f"{GROUP}/run"
LABEL_STAGE = f"{GROUP}/stage"
LABEL_ATTEMPT = f"{GROUP}/attempt"
ANNOTATION_HELD = f"{GROUP}/suspended-by"  # set when the operator suspends a Job (spec.suspend)
ANNOTATION_STAGE_RUN = f"{GROUP}/mlflow-run-id"
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"

CONTAINER = "stage"
INIT_CONTAINER = "workspace-init"
FETCH_CONTAINER = "model-fetch"
WORKSPACE = "/workspace"
# The PVC's shared data folder, read-only: raw data, benchmarks and models shared across runs
# (the workspace is only this run's subPath of the same PVC).
SHARED_DATA = "/data"
INIT_MOUNT = "/parent"
CONFIG_DIR = "/etc/visionr1"
CONFIG_FILE = f"{CONFIG_DIR}/config.json"
# The hub libraries' cache (HF_HOME, the trainer image's too): the run's own
# <workspace>/.cache/huggingface, writable, shared by the run's pods only.
HF_HOME = "/cache/huggingface"
HF_HOME_IN_WORKSPACE = ".cache/huggingface"
# The hub base model's folder of the model cache (module docstring): read-write in the fetch
# container, read-only in the stage container, which loads SNAPSHOT from it.
BASE_MODEL_MOUNT = "/cache/base-model"
BASE_MODEL_SNAPSHOT = f"{BASE_MODEL_MOUNT}/snapshot"  # visionr1_jobs.fetch_model.SNAPSHOT
RDZV_PORT = 29500
SHARDED = ("synthesis", "filter", "eval")
DISTRIBUTED = ("sft", "grpo")
# The stage images run as this user (images/trainer/Dockerfile creates it).
RUN_AS_USER = 1000
# The container's terminationMessagePath (the Kubernetes default), also passed to the stage
# program in TERMINATION_LOG_ENV: it writes its one-line reason for failing there.
TERMINATION_LOG = DEFAULT_TERMINATION_LOG
# The namespace label that makes the API server refuse pods above a Pod Security level.
POD_SECURITY_ENFORCE = "pod-security.kubernetes.io/enforce"
# How much of a container's termination message goes into the run's status.
MESSAGE_CHARS = 300


def service_name(run_name: str, stage: str) -> str:
    return f"{run_name}-{stage}"


class NoClusterStorage(ValueError):
    """The run has no PVC: it cannot run on a cluster (never on a scratch emptyDir)."""


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


# Backends that load a model's weights (toy and openai ones load none).
_LOADING_BACKENDS = ("transformers", "vllm", "auto")


def _strings(value: Any) -> Any:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def fetches_base_model(run: VisionR1Run, stage: str) -> bool:
    """Whether the pods of ``stage`` get the base model from the model cache: the run's base
    model is a hub model and the stage loads it (an input of the stage, e.g. SFT's model or
    eval's ``base`` checkpoint, or a backend of its parameters naming it)."""
    if base_model_cache_sub_path(run) is None:
        return False
    name = run.spec.base_model.name
    cfg = resolve_stage_config(run, stage, WORKSPACE)
    if any(loc.format == "model" and loc.path == name for loc in cfg.inputs.values()):
        return True
    if stage == "synthesis":  # a teacher naming no model is the base model
        params = run.spec.stages.synthesis.params
        for teacher in (params.describer, params.reasoner):
            if teacher.backend.kind in _LOADING_BACKENDS and not teacher.backend.model:
                return True
    return any(s == name for s in _strings(cfg.params))


def _hf_token(run: VisionR1Run) -> list[dict[str, Any]]:
    ref = run.spec.hf_token_secret
    if ref is None:
        return []
    return [{"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}}]


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
        {"name": BASE_MODEL_ENV, "value": spec.base_model.name},
    ]
    if spec.base_model.revision:  # every loader of the base model loads this revision
        env.append({"name": BASE_MODEL_REVISION_ENV, "value": spec.base_model.revision})
    if fetches_base_model(run, stage):  # the loaders load it from the model cache's folder
        env.append({"name": BASE_MODEL_DIR_ENV, "value": BASE_MODEL_SNAPSHOT})
    uri = spec.mlflow.tracking_uri or mlflow_uri
    if uri:
        env.append({"name": "MLFLOW_TRACKING_URI", "value": uri})
    if parent_run_id:
        env.append({"name": "VISIONR1_PARENT_RUN_ID", "value": parent_run_id})
    if stage_run_id:
        env.append({"name": "VISIONR1_STAGE_RUN_ID", "value": stage_run_id})
    if stage in SHARDED:
        env.append({"name": "VISIONR1_SHARDS", "value": str(spec.stages.get(stage).nodes)})
    env += _hf_token(run)
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


def uses_root_init(run: VisionR1Run, pod_security: str | None = None) -> bool:
    """Whether the pods get the root init container that prepares the workspace.

    ``pod_security``: the namespace's ``pod-security.kubernetes.io/enforce`` level, when known.
    """
    mode = run.spec.storage.workspace_init
    if mode == "Auto":
        return pod_security != "restricted"
    return mode == "RootInitContainer"


def pod_security_problem(run: VisionR1Run, pod_security: str | None) -> str | None:
    """Why the run's pods would be refused in a namespace enforcing ``pod_security``, if so."""
    if pod_security == "restricted" and uses_root_init(run, pod_security):
        namespace = run.metadata.namespace or "default"
        return (
            "spec.storage.workspaceInit: RootInitContainer runs an init container as root, which "
            f"namespace {namespace} refuses ({POD_SECURITY_ENFORCE}=restricted); set it to Auto "
            "or FSGroup (the PVC must then be writable through the pod's fsGroup 1000), or run "
            "in a namespace whose Pod Security level allows it (baseline)"
        )
    return None


def _hf_home_sub_path(run: VisionR1Run) -> str:
    """The run's own hub cache in the PVC, mounted at HF_HOME: inside its workspace folder."""
    return f"{posixpath.normpath(workspace_sub_path(run)).strip('/')}/{HF_HOME_IN_WORKSPACE}"


def _workspace_init(
    run: VisionR1Run, image: str, pull_policy: str, *, fetch: bool = False
) -> dict[str, Any]:
    """Creates the run's folder, its hub cache and (``fetch``) its base model's folder of the
    model cache, and gives each to the stage user (see the module docstring)."""
    sub = posixpath.normpath(workspace_sub_path(run)).strip("/")
    namespace = run.metadata.namespace or "default"
    folders = [sub, _hf_home_sub_path(run)]
    key = base_model_cache_sub_path(run) if fetch else None
    if sub.startswith(f"{namespace}/"):  # always on a cluster (policy): the namespace's folder
        parent = namespace
        if key is not None:
            # the cache, the model's folder and its revision's: each level the stage user's
            cache = posixpath.normpath(model_cache_sub_path(run))
            model_dir = posixpath.dirname(posixpath.normpath(key))
            folders += [cache, model_dir, posixpath.normpath(key)]
    else:  # `visionr1 render` of a manifest the operator would refuse: the run's folder only
        parent = posixpath.dirname(sub)
    mount: dict[str, Any] = {"name": "workspace", "mountPath": INIT_MOUNT}
    if parent:
        mount["subPath"] = parent
    targets = [f"{INIT_MOUNT}/{posixpath.relpath(f, parent or '.')}" for f in folders]
    owner = f"{RUN_AS_USER}:{RUN_AS_USER}"
    return {
        "name": INIT_CONTAINER,
        "image": image,
        "imagePullPolicy": pull_policy,
        # Not recursive: only the folder itself; what the stages write there is theirs already.
        "command": [
            "sh",
            "-c",
            'o="$1"; shift; for d in "$@"; do mkdir -p "$d" && chown "$o" "$d" && '
            'chmod 0775 "$d" || exit 1; done',
        ],
        "args": [INIT_CONTAINER, owner, *targets],
        "volumeMounts": [mount],
        "terminationMessagePath": TERMINATION_LOG,
        "terminationMessagePolicy": "FallbackToLogsOnError",  # e.g. chown's own error
        "resources": {
            "requests": {"cpu": "10m", "memory": "16Mi"},
            "limits": {"cpu": "100m", "memory": "64Mi"},
        },
        "securityContext": {
            "runAsUser": 0,
            "runAsGroup": 0,
            "runAsNonRoot": False,
            "allowPrivilegeEscalation": False,
            "privileged": False,
            "capabilities": {"drop": ["ALL"], "add": ["CHOWN", "DAC_OVERRIDE", "FOWNER"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
    }


def _model_fetch(run: VisionR1Run, image: str, pull_policy: str) -> dict[str, Any]:
    """The one writer of the base model's folder of the model cache (module docstring): a fixed
    program, the run's HF token and nothing else secret, the stage user, no privileges."""
    model = run.spec.base_model
    key = base_model_cache_sub_path(run)
    assert key is not None
    return {
        "name": FETCH_CONTAINER,
        "image": image,
        "imagePullPolicy": pull_policy,
        "command": [
            "python",
            "-m",
            "visionr1_jobs.fetch_model",
            "--name",
            model.name,
            "--revision",
            model.revision or DEFAULT_REVISION,
            "--dest",
            BASE_MODEL_MOUNT,
            "--workspace",
            WORKSPACE,
        ],
        "env": [
            {"name": "PYTHONUNBUFFERED", "value": "1"},
            # huggingface_hub's own caches (e.g. Xet chunks) stay beside the model, not in the
            # container's writable layer
            {"name": "HF_HOME", "value": f"{BASE_MODEL_MOUNT}/.hf-home"},
            {"name": "HF_HUB_DISABLE_TELEMETRY", "value": "1"},
            {"name": TERMINATION_LOG_ENV, "value": TERMINATION_LOG},
            *_hf_token(run),
        ],
        "volumeMounts": [
            {"name": "workspace", "mountPath": BASE_MODEL_MOUNT, "subPath": key},
            # only to see whether the run's workspace has a folder named like the model, which
            # the stage would load instead
            {
                "name": "workspace",
                "mountPath": WORKSPACE,
                "subPath": workspace_sub_path(run),
                "readOnly": True,
            },
        ],
        "terminationMessagePath": TERMINATION_LOG,
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "resources": {
            "requests": {"cpu": "250m", "memory": "512Mi"},
            "limits": {"cpu": "2", "memory": "4Gi"},
        },
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "privileged": False,
            "runAsNonRoot": True,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
    }


def pod_failure_policy(multi_node: bool, fetch: bool = False) -> dict[str, Any]:
    """How the Job controller reads a failed pod (every Job has ``backoffLimit: 0``).

    * exit 65 / 66: FailJob (reason ``PodFailurePolicy``, the code in the message): the plan
      fails the run (65) or re-merges the producer and retries (66);
    * a pod disrupted by the cluster (condition ``DisruptionTarget``: eviction, preemption, a
      drained or lost node):
      - one-pod Job: Ignore; the Job controller starts a new pod, which resumes from the last
        checkpoint without spending a retry;
      - multi-pod training Job: Count, i.e. the attempt fails at once (``BackoffLimitExceeded``,
        retryable). Its pods form one static torchrun group: a new pod cannot join the ranks
        still running, which would wait on the lost one until the collective's timeout. The
        Job controller then terminates the surviving pods (SIGTERM: the stage program stops at
        once), and the plan starts the next attempt, which resumes from the checkpoint and
        counts against ``backoffLimit``;
    * any other non-zero exit (a killed or crashed rank: 137, 1, 143): counted, so the attempt
      fails and the plan retries it the same way.
    """
    rules: list[dict[str, Any]] = [
        {
            "action": "FailJob",
            "onExitCodes": {
                "containerName": CONTAINER,
                "operator": "In",
                # 65: permanent; 66 (input missing): retried by the plan, which needs the
                # code in the Job's condition to re-merge the producer.
                "values": [EXIT_INVALID_INPUT, EXIT_INPUT_MISSING],
            },
        },
        {
            "action": "Count" if multi_node else "Ignore",
            "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}],
        },
    ]
    if fetch:  # no such model or revision, or no access to it: as permanent as invalid input
        rules.append(
            {
                "action": "FailJob",
                "onExitCodes": {
                    "containerName": FETCH_CONTAINER,
                    "operator": "In",
                    "values": [EXIT_INVALID_INPUT],
                },
            }
        )
    return {"rules": rules}


def job(
    run: VisionR1Run,
    stage: str,
    attempt: int,
    *,
    mlflow_uri: str | None = None,
    parent_run_id: str | None = None,
    stage_run_id: str | None = None,
    policy: ClusterPolicy | None = None,
    pod_security: str | None = None,
) -> dict[str, Any]:
    """The Job of one attempt of ``stage``; :class:`NoClusterStorage` without a PVC.

    ``pod_security``: the namespace's enforced Pod Security level, when known (restricted: no
    root init container unless the run asks for one, see :func:`pod_security_problem`).
    """
    policy = policy or ClusterPolicy()
    spec = run.spec
    if not spec.storage.pvc:
        raise NoClusterStorage(
            "spec.storage.pvc: required on a cluster (spec.storage.localDir is for `visionr1 "
            "run-local` only): set spec.storage.pvc to a PersistentVolumeClaim"
        )
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
    env.append({"name": TERMINATION_LOG_ENV, "value": TERMINATION_LOG})
    image = stage_spec.image or spec.images.trainer
    fetch = fetches_base_model(run, stage)
    base_model_mounts: list[dict[str, Any]] = []
    if fetch:
        key = base_model_cache_sub_path(run)
        base_model_mounts.append(
            {"name": "workspace", "mountPath": BASE_MODEL_MOUNT, "subPath": key, "readOnly": True}
        )
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": image,
        "imagePullPolicy": spec.images.pull_policy,
        "command": _command(run, stage, attempt),
        "env": env,
        "resources": _resources(run, stage),
        "volumeMounts": [
            {"name": "workspace", "mountPath": WORKSPACE, "subPath": workspace_sub_path(run)},
            {
                "name": "workspace",
                "mountPath": SHARED_DATA,
                "subPath": posixpath.normpath(policy.shared_data_path).strip("/"),
                "readOnly": True,
            },
            {"name": "workspace", "mountPath": HF_HOME, "subPath": _hf_home_sub_path(run)},
            *base_model_mounts,
            {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
            {"name": "dshm", "mountPath": "/dev/shm"},
        ],
        # The stage writes its one-line reason for failing there; a crash before it could (an
        # import error, a segfault) leaves the file empty and the log's tail is shown instead.
        "terminationMessagePath": TERMINATION_LOG,
        "terminationMessagePolicy": "FallbackToLogsOnError",
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
    volumes: list[dict[str, Any]] = [
        {"name": "workspace", "persistentVolumeClaim": {"claimName": spec.storage.pvc}},
        {"name": "config", "configMap": {"name": name}},
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": stage_spec.resources.shm}},
    ]
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RUN_AS_USER,
            "runAsGroup": RUN_AS_USER,
            "fsGroup": RUN_AS_USER,
            # Only when the volume's root is not the group's yet: never a recursive chown of a
            # PVC full of checkpoints at every pod start (the default, Always, does that).
            "fsGroupChangePolicy": "OnRootMismatch",
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": volumes,
    }
    init_containers: list[dict[str, Any]] = []
    if uses_root_init(run, pod_security):
        init_containers.append(_workspace_init(run, image, spec.images.pull_policy, fetch=fetch))
    if fetch:
        init_containers.append(_model_fetch(run, image, spec.images.pull_policy))
    if init_containers:
        pod_spec["initContainers"] = init_containers
    if stage_spec.node_selector:
        pod_spec["nodeSelector"] = dict(stage_spec.node_selector)
    if stage_spec.tolerations:
        pod_spec["tolerations"] = [t.dump() for t in stage_spec.tolerations]
    if spec.service_account_name:
        pod_spec["serviceAccountName"] = spec.service_account_name
    else:  # the namespace's default account: stage programs never call the API, so no token
        pod_spec["automountServiceAccountToken"] = False
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
        "podFailurePolicy": pod_failure_policy(is_multi_node(run, stage), fetch),
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
    policy: ClusterPolicy | None = None,
    pod_security: str | None = None,
) -> list[dict[str, Any]]:
    """Everything one attempt needs, in creation order (the Job last: it mounts the rest)."""
    ids = {"mlflow_uri": mlflow_uri, "parent_run_id": parent_run_id, "stage_run_id": stage_run_id}
    # first: it refuses a run without a PVC
    the_job = job(run, stage, attempt, policy=policy, pod_security=pod_security, **ids)
    out = [config_map(run, stage, attempt, **ids)]
    if is_multi_node(run, stage):
        out.append(headless_service(run, stage))
    out.append(the_job)
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
        uid=str(meta.get("uid") or ""),
    )


def suspend_patch(suspend: bool) -> dict[str, Any]:
    """Merge patch that suspends (held by the operator) or resumes a Job."""
    return {
        "metadata": {"annotations": {ANNOTATION_HELD: "operator" if suspend else None}},
        "spec": {"suspend": suspend},
    }


# --------------------------------------------------------------------------- observing pods

JOB_NAME_LABEL = "batch.kubernetes.io/job-name"
# Container waiting reasons that will not fix themselves quickly: say so at once.
STUCK_REASONS = frozenset(
    {
        "ErrImagePull",
        "ImagePullBackOff",
        "InvalidImageName",
        "CreateContainerConfigError",
        "CreateContainerError",
        "RunContainerError",
    }
)


@dataclass(frozen=True)
class PodFacts:
    """What the plan needs to know of one pod of a stage Job."""

    name: str
    job: str
    phase: str  # Pending, Running, Succeeded, Failed, Unknown
    problem: tuple[str, str] | None = None  # (reason, message): why it is stuck or died
    exit_code: int | None = None  # of the stage container, when it terminated with an error
    # GPUs and running time, for chargeback; not compared: a pod's start or end time alone
    # changes nothing the plan reads, so it triggers no reconcile
    usage: Usage | None = dataclasses.field(default=None, compare=False)


_PROGRESS_TAG = "VISIONR1_PROGRESS"
_EXIT_HINT = re.compile(r"^\(exit \d+: ")


def termination_line(message: str | None) -> str:
    """The one line of a container's termination message worth showing, at most
    MESSAGE_CHARS long. The stage writes one line; a message the kubelet took from the log's
    tail (FallbackToLogsOnError) ends in the traceback's last line, after which only progress
    lines or the stage's own exit-code hint can follow."""
    lines = [
        " ".join(line.split())
        for line in re.split(r"[\r\n]+", message or "")
        if line.strip() and _PROGRESS_TAG not in line and not _EXIT_HINT.match(line.strip())
    ]
    if not lines:
        return ""
    line = lines[-1]
    return line if len(line) <= MESSAGE_CHARS else line[: MESSAGE_CHARS - 1] + "…"


def _memory_limit(spec: Mapping[str, Any], container: str) -> str | None:
    for c in [*(spec.get("initContainers") or []), *(spec.get("containers") or [])]:
        if c.get("name") == container:
            return ((c.get("resources") or {}).get("limits") or {}).get("memory")
    return None


def _oom_advice(container: str, stage: str | None, limit: str | None) -> str:
    """What an OOMKilled container's message adds: its limit, and which field to raise."""
    if container != CONTAINER or not stage:
        return f"memory limit {limit}" if limit else "no memory limit"
    field = f"spec.stages.{stage}.resources.memory"
    if limit:
        return (
            f"the {stage} stage ran out of its memory limit of {limit}; raise {field} (request "
            f"and limit; the /dev/shm of spec.stages.{stage}.resources.shm counts against it)"
        )
    return (
        f"the {stage} stage has no memory limit and its node ran out of memory; set {field} "
        "to what the stage needs (request and limit), so it is scheduled where that fits"
    )


def _container_trouble(
    pod: str,
    statuses: list[Mapping[str, Any]],
    spec: Mapping[str, Any] | None = None,
    stage: str | None = None,
) -> PodFacts | None:
    for cs in statuses:
        state = cs.get("state") or {}
        waiting = state.get("waiting") or {}
        reason = waiting.get("reason") or ""
        if reason in STUCK_REASONS:
            detail = waiting.get("message") or reason
            return PodFacts(
                pod, "", "", (reason, f"pod {pod}: container {cs.get('name')}: {detail}")
            )
        done = state.get("terminated") or {}
        code = done.get("exitCode")
        if done and code not in (None, 0):
            why = done.get("reason") or "Error"
            name = str(cs.get("name") or "")
            text = f"pod {pod}: container {name} {why} (exit code {code})"
            if why == "OOMKilled":
                # the log's tail (FallbackToLogsOnError) says nothing about memory: the limit does
                text += f": {_oom_advice(name, stage, _memory_limit(spec or {}, name))}"
            elif said := termination_line(done.get("message")):
                text += f": {said}"
            return PodFacts(
                pod, "", "", ("OOMKilled" if why == "OOMKilled" else "PodFailed", text), int(code)
            )
    return None


def observe_pod(obj: Mapping[str, Any]) -> PodFacts | None:
    """A stage pod → what the plan needs; None for a pod that is not of a stage Job."""
    meta = obj.get("metadata") or {}
    lab = meta.get("labels") or {}
    if LABEL_RUN not in lab:
        return None
    job = lab.get(JOB_NAME_LABEL) or lab.get("job-name")
    if not job:
        try:
            job = job_name(lab[LABEL_RUN], lab[LABEL_STAGE], int(lab[LABEL_ATTEMPT]))
        except (KeyError, ValueError):
            return None
    name = meta.get("name", "")
    status = obj.get("status") or {}
    phase = status.get("phase") or "Pending"
    trouble = _container_trouble(
        name,
        [*(status.get("initContainerStatuses") or []), *(status.get("containerStatuses") or [])],
        obj.get("spec") or {},
        lab.get(LABEL_STAGE),
    )
    used = usage(obj)
    if trouble is not None:
        return PodFacts(name, job, phase, trouble.problem, trouble.exit_code, used)
    for cond in status.get("conditions") or []:
        if cond.get("type") == "PodScheduled" and cond.get("status") == "False":
            reason = cond.get("reason") or "Unschedulable"
            text = f"pod {name} cannot be scheduled: {cond.get('message') or reason}"
            return PodFacts(name, job, phase, (reason, text), usage=used)
    return PodFacts(name, job, phase, usage=used)


def with_pods(job: ObservedJob, pods: list[PodFacts]) -> ObservedJob:
    """``job`` with what its pods say: how many run, what is wrong, the failing exit code.
    A pod that has succeeded while the Job has not counted it yet still counts as running: its
    Job's next status says it is done (the stage's end, written at once); "0 pods running, 1
    pending" in between is wrong, and under load it cost a status write per stage."""
    running = sum(1 for p in pods if p.phase == "Running")
    running += max(0, sum(1 for p in pods if p.phase == "Succeeded") - job.succeeded)
    problems = [p for p in pods if p.problem is not None]
    if job.outcome == "failed":
        failed = next((p for p in problems if p.exit_code is not None), None) or (
            problems[0] if problems else None
        )
        if failed is None or failed.problem is None:
            return dataclasses.replace(job, running_pods=running)
        message = failed.problem[1]
        if job.message and job.message not in message:
            message = f"{message}; {job.message}"
        return dataclasses.replace(
            job,
            running_pods=running,
            message=message,
            exit_code=job.exit_code if job.exit_code is not None else failed.exit_code,
        )
    live = [p for p in problems if p.phase in ("Pending", "Running", "Failed")]
    problem = live[0].problem if live and job.outcome in ("running",) else None
    return dataclasses.replace(job, running_pods=running, pod_problem=problem)
