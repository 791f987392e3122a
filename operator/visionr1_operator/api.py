"""The VisionR1Run API (group visionr1.io, version v1alpha1): spec and status models.

The spec composes run-level fields with each stage's own parameter model from
``visionr1_jobs.config``. The CRD is generated from these models (``visionr1_operator.crd``);
every cross-field rule is written twice on purpose: as a pydantic validator (for
``visionr1 validate`` and the operator) and as a CEL rule (for the API server).
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, ValidationInfo, field_validator, model_validator

from visionr1_jobs.config import (
    STAGES,
    EvalParams,
    FilterParams,
    GRPOParams,
    Model,
    SecretKeyRef,
    SFTParams,
    StageName,
    SynthesisParams,
    _cel,
    grpo_batch_plan,
    sft_batch_problem,
)

GROUP = "visionr1.io"
VERSION = "v1alpha1"
KIND = "VisionR1Run"
PLURAL = "visionr1runs"
SINGULAR = "visionr1run"
SHORT_NAMES = ["vr1"]
API_VERSION = f"{GROUP}/{VERSION}"

# Kubernetes resource.Quantity, as the apimachinery regular expression accepts it.
QUANTITY_PATTERN = r"^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$"
_QUANTITY_STRICT = re.compile(
    r"^[+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+|m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$"
)
DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
LABEL_VALUE = r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$"

PHASES = ("Pending", "Running", "Succeeded", "Failed", "Suspended")
Phase = Literal["Pending", "Running", "Succeeded", "Failed", "Suspended"]


def _quantity(value: str | None, what: str) -> str | None:
    if value is not None and not _QUANTITY_STRICT.match(value):
        raise ValueError(
            f"{value!r} is not a Kubernetes quantity for {what}; use e.g. '8', '500m', '64Gi'"
        )
    return value


# --------------------------------------------------------------------------- run-level pieces


class BaseModelRef(Model):
    """The model every stage starts from."""

    name: str = Field(
        min_length=1,
        max_length=512,
        description="Hub id (e.g. Qwen/Qwen2.5-VL-7B-Instruct) or a path on the run's storage.",
    )
    revision: str | None = Field(
        None,
        max_length=256,
        description="Hub revision (commit, tag or branch; unset = main). On a cluster the "
        "namespace's model cache keeps one download per model and revision: a branch or tag is "
        "downloaded when first used and reused as it was then, so pin a commit to choose.",
    )


class Storage(Model):
    """Where the run's workspace lives."""

    model_config = ConfigDict(
        json_schema_extra=_cel(
            ("has(self.pvc) || has(self.localDir)", "set pvc (cluster) or localDir (laptop)")
        )
    )

    pvc: str | None = Field(
        None,
        max_length=253,
        pattern=DNS_SUBDOMAIN,
        description="PersistentVolumeClaim (ReadWriteMany for multi-node stages) holding the "
        "workspace; required on a cluster. Its shared data folder (the operator's "
        "--shared-data-path, default shared/) is mounted read-only at /data in every stage pod: "
        "put shared raw data, benchmarks and models there and refer to them as /data/….",
    )
    sub_path: str = Field(
        "",
        max_length=1024,
        pattern=r"^[^/].*$|^$",
        description="The run's workspace folder inside the PVC (mounted at /workspace; relative "
        "paths in the manifest are under it); default = <namespace>/<run name>; on a cluster it "
        "must be under <namespace>/.",
    )
    model_cache: str = Field(
        ".cache/huggingface",
        max_length=1024,
        pattern=r"^[^/].*$",
        description="Folder inside the namespace's folder of the PVC (<namespace>/<modelCache>) "
        "holding the namespace's hub base models, one folder per model and revision "
        "(models--<owner>--<name>/<revision>), so each downloads once per namespace. A stage pod "
        "that loads the base model downloads it there with its model-fetch init container (the "
        "only container that mounts the folder writable; the download appears whole or not at "
        "all) and mounts it read-only at /cache/base-model. Other hub downloads (teachers, "
        "datasets) go to the run's own <workspace>/.cache/huggingface (HF_HOME).",
    )
    workspace_init: Literal["Auto", "RootInitContainer", "FSGroup"] = Field(
        "Auto",
        description="How the run's folder and its base model's folder of the model cache on the "
        "PVC are made writable by the stage user (uid and gid 1000). RootInitContainer: an init container running as "
        "root (only CHOWN, DAC_OVERRIDE and FOWNER) creates them and hands them to uid 1000; "
        "works on any volume, but a namespace enforcing the restricted Pod Security Standard "
        "refuses it. FSGroup: no init container; the pod's fsGroup 1000 (fsGroupChangePolicy "
        "OnRootMismatch) makes the volume group-writable, which needs a volume whose driver "
        "applies fsGroup (not hostPath, local or most NFS volumes); a stage that finds its "
        "workspace not writable fails saying so. Auto: FSGroup in a namespace labelled "
        "pod-security.kubernetes.io/enforce=restricted, RootInitContainer elsewhere.",
    )
    local_dir: str | None = Field(
        None, max_length=4096, description="Workspace directory for `visionr1 run-local`."
    )

    @model_validator(mode="after")
    def _one(self) -> Storage:
        if not self.pvc and not self.local_dir:
            raise ValueError("set pvc (cluster) or localDir (laptop)")
        return self


class Mlflow(Model):
    """MLflow tracking for the run."""

    tracking_uri: str | None = Field(
        None,
        max_length=2048,
        description="Tracking URI; unset = the operator's default (the chart's MLflow server), or "
        "sqlite in the workspace locally.",
    )
    experiment: str = Field(
        "visionr1", min_length=1, max_length=256, description="Experiment name."
    )
    credentials_secret: str | None = Field(
        None,
        max_length=253,
        pattern=DNS_SUBDOMAIN,
        description="Secret whose keys (MLFLOW_TRACKING_USERNAME/PASSWORD/TOKEN, AWS_*) become env.",
    )


class Images(Model):
    """Container images."""

    trainer: str = Field(
        "ghcr.io/visionr1/trainer:0.1.0",
        min_length=1,
        max_length=1024,
        description="Image of the stage programs (CUDA, torch, vLLM, DeepSpeed).",
    )
    pull_policy: Literal["Always", "IfNotPresent", "Never"] = Field(
        "IfNotPresent", description="imagePullPolicy of stage pods."
    )
    pull_secrets: list[str] = Field(
        default_factory=list, max_length=16, description="imagePullSecrets names."
    )


class Resources(Model):
    """Per-pod resources of a stage."""

    gpus: int = Field(0, ge=0, le=64, description="nvidia.com/gpu per pod (GPUs).")
    cpu: str | None = Field(
        None,
        max_length=64,
        pattern=QUANTITY_PATTERN,
        description="CPU request and limit, e.g. '16'.",
    )
    memory: str | None = Field(
        None,
        max_length=64,
        pattern=QUANTITY_PATTERN,
        description="Memory request and limit, e.g. '256Gi'.",
    )
    shm: str = Field(
        "16Gi",
        max_length=64,
        pattern=QUANTITY_PATTERN,
        description="Size of the memory-backed /dev/shm (NCCL, dataloaders).",
    )

    @field_validator("cpu")
    @classmethod
    def _cpu(cls, v: str | None) -> str | None:
        return _quantity(v, "cpu")

    @field_validator("memory")
    @classmethod
    def _memory(cls, v: str | None) -> str | None:
        return _quantity(v, "memory")

    @field_validator("shm")
    @classmethod
    def _shm(cls, v: str) -> str:
        return _quantity(v, "shm")  # type: ignore[return-value]


class Toleration(Model):
    """A pod toleration (core/v1 Toleration)."""

    key: str | None = Field(None, max_length=316)
    operator: Literal["Exists", "Equal"] | None = None
    value: str | None = Field(None, max_length=63)
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    toleration_seconds: int | None = Field(None, ge=0)


class KeyRef(Model):
    name: str = Field(min_length=1, max_length=253)
    key: str = Field(min_length=1, max_length=253)


class EnvSource(Model):
    model_config = ConfigDict(
        json_schema_extra=_cel(
            (
                "has(self.secretKeyRef) != has(self.configMapKeyRef)",
                "set exactly one of secretKeyRef or configMapKeyRef",
            )
        )
    )
    secret_key_ref: KeyRef | None = None
    config_map_key_ref: KeyRef | None = None

    @model_validator(mode="after")
    def _one(self) -> EnvSource:
        if (self.secret_key_ref is None) == (self.config_map_key_ref is None):
            raise ValueError("set exactly one of secretKeyRef or configMapKeyRef")
        return self


# Variables that make the dynamic loader or an interpreter run code from somewhere other than
# the image (a library preloaded into every process, a module imported at start-up, a shell's rc
# file), plus the tracking URI, which spec.mlflow.trackingUri sets under the cluster's allowlist.
# A stage's env may not set them: the image is what the cluster admin allowed.
FORBIDDEN_ENV = (
    "PYTHONPATH",
    "PYTHONSTARTUP",
    "PYTHONHOME",
    "PYTHONUSERBASE",
    "PYTHONEXECUTABLE",
    "PYTHONPLATLIBDIR",
    "PYTHONBREAKPOINT",
    "PYTHONINSPECT",
    "BASH_ENV",
    "ENV",
    "PERL5LIB",
    "PERL5OPT",
    "NODE_OPTIONS",
    "GCONV_PATH",
    "MLFLOW_TRACKING_URI",
)
FORBIDDEN_ENV_PREFIX = "LD_"  # LD_PRELOAD, LD_LIBRARY_PATH, LD_AUDIT, ...


def env_name_problem(name: str) -> str | None:
    """Why a stage's env may not set ``name`` (None: it may)."""
    if name == "MLFLOW_TRACKING_URI":
        return "MLFLOW_TRACKING_URI may not be set in env; set spec.mlflow.trackingUri instead"
    if name in FORBIDDEN_ENV or name.startswith(FORBIDDEN_ENV_PREFIX):
        return (
            f"{name} may not be set in env: it makes the loader or the interpreter run code that "
            "is not the image's; remove it and put the code into an allowed image"
        )
    return None


class EnvVar(Model):
    """An environment variable; secrets only by reference (to a Secret listed in spec.secrets)."""

    model_config = ConfigDict(
        json_schema_extra=_cel(
            (
                "has(self.value) != has(self.valueFrom)",
                "set exactly one of value or valueFrom",
            ),
            (
                f"!self.name.startsWith('{FORBIDDEN_ENV_PREFIX}') && !(self.name in "
                + "["
                + ", ".join(f"'{n}'" for n in FORBIDDEN_ENV)
                + "])",
                "this variable may not be set in env (LD_*, PYTHONPATH, PYTHONSTARTUP, PYTHONHOME "
                "and the like run code that is not the image's; MLFLOW_TRACKING_URI: set "
                "spec.mlflow.trackingUri); remove it",
            ),
        )
    )
    name: str = Field(min_length=1, max_length=256, pattern=r"^[A-Za-z_][A-Za-z0-9_.-]*$")
    value: str | None = Field(None, max_length=32768)
    value_from: EnvSource | None = None

    @field_validator("name")
    @classmethod
    def _allowed(cls, v: str) -> str:
        problem = env_name_problem(v)
        if problem is not None:
            raise ValueError(problem)
        return v

    @model_validator(mode="after")
    def _one(self) -> EnvVar:
        if (self.value is None) == (self.value_from is None):
            raise ValueError("set exactly one of value or valueFrom")
        return self


class InputRef(Model):
    """Where a stage takes its main input from: another stage, a dataset, a checkpoint, or the base model."""

    model_config = ConfigDict(
        json_schema_extra=_cel(
            (
                "[has(self.stage), has(self.dataset), has(self.checkpoint), has(self.baseModel)]"
                ".filter(x, x).size() == 1",
                "set exactly one of stage, dataset, checkpoint or baseModel",
            ),
            ("!has(self.baseModel) || self.baseModel", "baseModel may only be true"),
        )
    )

    stage: StageName | None = Field(None, description="Take the output of this stage of the run.")
    dataset: str | None = Field(
        None, min_length=1, max_length=4096, description="A dataset path on the storage."
    )
    format: str | None = Field(
        None,
        max_length=32,
        description="Layout of `dataset` (see DatasetRef.format); default auto.",
    )
    checkpoint: str | None = Field(
        None,
        min_length=1,
        max_length=4096,
        description="A model directory on the storage or a hub id.",
    )
    base_model: bool | None = Field(None, description="Start from the run's base model.")

    @model_validator(mode="after")
    def _exactly_one(self) -> InputRef:
        chosen = [self.stage, self.dataset, self.checkpoint, self.base_model]
        if sum(x is not None for x in chosen) != 1:
            raise ValueError("set exactly one of stage, dataset, checkpoint or baseModel")
        if self.base_model is False:
            raise ValueError("baseModel may only be true")
        return self


class StageCommon(Model):
    """Fields every stage has."""

    enabled: bool = Field(True, description="Run this stage (false = skip; consumers need `from`).")
    image: str | None = Field(None, max_length=1024, description="Override the trainer image.")
    resources: Resources = Field(default_factory=Resources, description="Per-pod resources.")
    nodes: int = Field(
        1,
        ge=1,
        le=1024,
        description="Pods: nodes for torchrun (sft, grpo) or shards (synthesis, filter, eval).",
    )
    node_selector: dict[str, str] = Field(default_factory=dict, description="Pod nodeSelector.")
    tolerations: list[Toleration] = Field(default_factory=list, max_length=64)
    env: list[EnvVar] = Field(default_factory=list, max_length=256, description="Extra env.")
    backoff_limit: int = Field(
        3, ge=0, le=100, description="Retries of a failed pod (retryable codes)."
    )
    active_deadline_seconds: int | None = Field(
        None, ge=1, description="Fail the stage after this long (seconds)."
    )
    from_: InputRef | None = Field(
        None,
        alias="from",
        description="Main input; default = the previous enabled stage's output.",
    )


class SynthesisStage(StageCommon):
    params: SynthesisParams = Field(
        default_factory=SynthesisParams, description="Stage parameters."
    )


class FilterStage(StageCommon):
    params: FilterParams = Field(default_factory=FilterParams, description="Stage parameters.")


class SFTStage(StageCommon):
    params: SFTParams = Field(default_factory=SFTParams, description="Stage parameters.")


class GRPOStage(StageCommon):
    params: GRPOParams = Field(default_factory=GRPOParams, description="Stage parameters.")


class EvalStage(StageCommon):
    params: EvalParams = Field(default_factory=EvalParams, description="Stage parameters.")


# Which input each stage consumes from the stage before it, and what an explicit `from` may be.
UPSTREAM: dict[str, str | None] = {
    "synthesis": None,
    "filter": "synthesis",
    "sft": "filter",
    "grpo": "sft",
    "eval": None,  # eval reads checkpoints named in its params
}


def _off_or_fed(stage: str, fed: str) -> str:
    """CEL: the stage is disabled, or ``fed`` holds. An absent stage is enabled (the default)."""
    return f"(has(self.{stage}) && ((has(self.{stage}.enabled) && !self.{stage}.enabled) || {fed}))"


def _consumer_rule(stage: str, upstream: str) -> tuple[str, str]:
    return (
        _off_or_fed(stage, f"has(self.{stage}.from)")
        + f" || !has(self.{upstream}) || !has(self.{upstream}.enabled) || self.{upstream}.enabled",
        f"{upstream} is disabled: set stages.{stage}.from (a dataset, checkpoint or baseModel)",
    )


class Stages(Model):
    """The five stages; each can be disabled (the paper's ablations) or fed from an artifact."""

    model_config = ConfigDict(
        json_schema_extra=_cel(
            *(_consumer_rule(s, u) for s, u in UPSTREAM.items() if u),
            (
                _off_or_fed("synthesis", "has(self.synthesis.from)"),
                "synthesis needs from.dataset (the raw multimodal QA data)",
            ),
            (
                _off_or_fed("grpo", "(has(self.grpo.params) && has(self.grpo.params.dataset))"),
                "stages.grpo.params.dataset is required when grpo is enabled",
            ),
            (
                "!has(self.filter) || !has(self.filter.nodes) || self.filter.nodes == 1",
                "stages.filter.nodes must be 1: the filter dedupes across all rows in one pod "
                "(scale it with params.workers)",
            ),
        )
    )

    synthesis: SynthesisStage = Field(
        default_factory=SynthesisStage, description="Modality-bridging CoT synthesis (sharded)."
    )
    filter: FilterStage = Field(
        default_factory=FilterStage, description="Filter into the cold-start dataset (sharded)."
    )
    sft: SFTStage = Field(default_factory=SFTStage, description="Cold-start SFT (torchrun).")
    grpo: GRPOStage = Field(
        default_factory=GRPOStage, description="GRPO with PTST sub-stages (torchrun)."
    )
    eval: EvalStage = Field(default_factory=EvalStage, description="Benchmarks (sharded).")

    def get(self, name: str) -> StageCommon:
        return getattr(self, name)

    @model_validator(mode="after")
    def _wiring(self) -> Stages:
        if self.synthesis.enabled and self.synthesis.from_ is None:
            raise ValueError("synthesis needs from.dataset (the raw multimodal QA data)")
        for stage, upstream in UPSTREAM.items():
            spec = self.get(stage)
            if not spec.enabled:
                continue
            ref = spec.from_
            if upstream and ref is None and not self.get(upstream).enabled:
                raise ValueError(
                    f"{upstream} is disabled: set stages.{stage}.from "
                    "(a dataset, checkpoint or baseModel)"
                )
            if ref is not None and ref.stage is not None:
                if ref.stage == stage:
                    raise ValueError(f"stages.{stage}.from.stage cannot name the stage itself")
                if STAGES.index(ref.stage) > STAGES.index(stage):
                    raise ValueError(
                        f"stages.{stage}.from.stage={ref.stage} runs later; name an earlier stage"
                    )
                if not self.get(ref.stage).enabled:
                    raise ValueError(
                        f"stages.{stage}.from.stage={ref.stage} is disabled; enable it or take "
                        "a dataset/checkpoint"
                    )
        if self.filter.nodes != 1:
            raise ValueError(
                "stages.filter.nodes must be 1: the filter dedupes across all rows in one pod "
                "(scale it with params.workers)"
            )
        if self.grpo.enabled and self.grpo.params.dataset is None:
            raise ValueError("stages.grpo.params.dataset is required when grpo is enabled")
        self._batches_divide()
        return self

    def _batches_divide(self) -> None:
        """Batch sizes that cannot split over the stage's processes (nodes × GPUs per pod, as
        the Job runs torchrun), refused here rather than by the first pod an hour later. The
        stage program checks again against the processes it really has (a local run has one)."""
        sft, grpo = self.sft, self.grpo
        if sft.enabled:
            problem = sft_batch_problem(
                sft.params.global_batch_size,
                sft.params.per_device_batch_size,
                sft.nodes * max(sft.resources.gpus, 1),
                prefix="stages.sft.params.",
            )
            if problem:
                raise ValueError(f"{problem} (stages.sft.nodes × resources.gpus processes)")
        if not grpo.enabled:
            return
        for index in range(len(grpo.params.ptst)):
            grpo_batch_plan(
                grpo.params,
                index,
                grpo.nodes * max(grpo.resources.gpus, 1),
                prefix="stages.grpo.params.",
            )
        tp = grpo.params.vllm_tensor_parallel_size
        if grpo.params.rollout != "transformers" and grpo.resources.gpus % tp:
            raise ValueError(
                f"stages.grpo.params.vllmTensorParallelSize ({tp}) must divide "
                f"stages.grpo.resources.gpus ({grpo.resources.gpus}): each colocated vLLM engine "
                "takes that many GPUs of one pod"
            )


def _secret_rule(stage: str) -> str:
    """CEL: every secretKeyRef of ``stage``'s env names a Secret listed in spec.secrets."""
    return (
        f"!has(self.stages.{stage}) || !has(self.stages.{stage}.env) || "
        f"self.stages.{stage}.env.all(e, !has(e.valueFrom) || !has(e.valueFrom.secretKeyRef) || "
        "(has(self.secrets) && e.valueFrom.secretKeyRef.name in self.secrets))"
    )


class VisionR1RunSpec(Model):
    """Desired state of a VisionR1Run."""

    model_config = ConfigDict(
        json_schema_extra=_cel(
            *(
                (
                    _secret_rule(stage),
                    f"stages.{stage}.env reads a Secret not listed in spec.secrets; add its name "
                    "to spec.secrets or remove the reference",
                )
                for stage in STAGES
            )
        )
    )

    base_model: BaseModelRef = Field(description="The base MLLM (paper: Qwen2.5-VL-7B-Instruct).")
    storage: Storage = Field(description="Where the run's workspace lives.")
    mlflow: Mlflow = Field(default_factory=Mlflow, description="Experiment tracking.")
    images: Images = Field(default_factory=Images, description="Container images.")
    hf_token_secret: SecretKeyRef | None = Field(
        None, description="Secret key holding a Hugging Face token (HF_TOKEN) for gated models."
    )
    secrets: list[Annotated[str, Field(max_length=253, pattern=DNS_SUBDOMAIN)]] = Field(
        default_factory=list,
        max_length=32,
        description="Secrets of the namespace that stages' env may read "
        "(env[].valueFrom.secretKeyRef.name); a reference to any other Secret is refused, so a "
        "run's Secrets are named in one place (hfTokenSecret and mlflow.credentialsSecret are "
        "allowed by their own fields).",
    )
    queue_name: str | None = Field(
        None,
        max_length=63,
        pattern=LABEL_VALUE,
        description="Kueue LocalQueue: adds the kueue.x-k8s.io/queue-name label to every Job.",
    )
    priority_class_name: str | None = Field(
        None, max_length=253, pattern=DNS_SUBDOMAIN, description="Pod priorityClassName."
    )
    service_account_name: str | None = Field(
        None, max_length=253, pattern=DNS_SUBDOMAIN, description="Service account of stage pods."
    )
    suspend: bool = Field(False, description="Pause: no new Jobs; the running Job is suspended.")
    ttl_seconds_after_finished: int = Field(
        86400, ge=0, le=31_536_000, description="Delete finished Jobs after this long (seconds)."
    )
    stages: Stages = Field(
        description="The pipeline's stages (synthesis needs from.dataset, grpo needs params.dataset)."
    )

    @model_validator(mode="after")
    def _secrets_listed(self) -> VisionR1RunSpec:
        for stage in STAGES:
            for i, var in enumerate(self.stages.get(stage).env):
                ref = var.value_from and var.value_from.secret_key_ref
                if ref is not None and ref.name not in self.secrets:
                    raise ValueError(
                        f"stages.{stage}.env[{i}] ({var.name}) reads Secret {ref.name!r}, which "
                        f"is not listed in spec.secrets; add {ref.name!r} to spec.secrets or "
                        "remove the reference"
                    )
        return self


# --------------------------------------------------------------------------- status


class Condition(Model):
    """metav1.Condition."""

    type: str = Field(
        max_length=316,
        pattern=r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])$",
    )
    status: Literal["True", "False", "Unknown"]
    observed_generation: int | None = Field(None, ge=0)
    last_transition_time: str = Field(description="RFC 3339 time.")
    reason: str = Field(
        max_length=1024, min_length=1, pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$"
    )
    message: str = Field("", max_length=32768)


class StageStatus(Model):
    """Observed state of one stage."""

    phase: Literal["Pending", "Running", "Succeeded", "Failed", "Skipped", "Suspended"] = "Pending"
    job_name: str | None = None
    attempts: int = Field(0, ge=0)
    start_time: str | None = None
    finish_time: str | None = None
    next_retry_time: str | None = Field(
        None, description="When the next attempt starts (RFC 3339), while a retry waits."
    )
    mlflow_run_id: str | None = None
    outputs: dict[str, str] = Field(default_factory=dict)
    progress: str | None = None
    message: str | None = None
    step: int | None = Field(None, description="Last optimizer step the stage logged to MLflow.")
    total_steps: int | None = Field(None, description="Steps the stage will take in all.")
    metric: str | None = Field(
        None, description="The stage's key metric, latest value (loss, reward, accuracy)."
    )
    gpu_hours: float | None = Field(
        None, ge=0, description="GPUs x running time of the stage's finished attempts' pods (h)."
    )
    charged_attempts: int = Field(
        0, ge=0, description="Attempts whose pods are counted in gpuHours."
    )


class VisionR1RunStatus(Model):
    """Observed state of a VisionR1Run."""

    phase: Phase = "Pending"
    current_stage: str | None = None
    progress: str | None = Field(None, description="Finished stages / enabled stages, e.g. 2/5.")
    stages: dict[str, StageStatus] = Field(default_factory=dict)
    conditions: list[Condition] = Field(default_factory=list)
    mlflow_run_id: str | None = None
    observed_generation: int | None = None
    start_time: str | None = None
    finish_time: str | None = None
    step: str | None = Field(None, description="The running stage's step/total, e.g. 12/40.")
    eta: str | None = Field(None, description="Time the running stage still needs, e.g. 3m10s.")
    metric: str | None = Field(
        None, description="Key metric of the running (or last) stage, e.g. reward=0.41."
    )
    gpu_hours: float | None = Field(
        None, ge=0, description="GPU-hours of every stage's finished attempts (chargeback)."
    )


# Run names: every child name is derived from it and must be a DNS-1035 label (≤ 63, a letter
# first: Services need that), the longest being a pod host name of a sharded or multi-node stage,
# "<run>-<stage>-<attempt>-<index>" (its Job "<run>-<stage>-<attempt>", under the headless
# Service "<run>-<stage>"). Longest stage "synthesis", attempts < 1000 (backoffLimit ≤ 100, plus
# re-merges), indexes < 1024 (nodes ≤ 1024).
DNS_1035 = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
MAX_ATTEMPT_DIGITS = 3
MAX_INDEX_DIGITS = 4
LONGEST_STAGE = max(STAGES, key=len)
MAX_RUN_NAME = 63 - len(f"-{LONGEST_STAGE}") - (1 + MAX_ATTEMPT_DIGITS) - (1 + MAX_INDEX_DIGITS)
_DNS_1035 = re.compile(DNS_1035)


def run_name_problem(name: str) -> str | None:
    """Why ``name`` cannot name a run (None: it can)."""
    if not _DNS_1035.match(name):
        return (
            f"{name!r} is not a DNS-1035 label: lower-case letters, digits and '-', starting "
            "with a letter and ending with a letter or digit (Services are named after the run)"
        )
    if len(name) > MAX_RUN_NAME:
        return (
            f"at most {MAX_RUN_NAME} characters (got {len(name)}): the longest child name, a pod "
            f"host name <run>-{LONGEST_STAGE}-<attempt>-<index>, must fit in 63"
        )
    return None


#: Validation context key of a spec already accepted (its generation was admitted): rules applied
#: only at admission (the run name's limits) are skipped for it, so an operator whose rules are
#: tighter keeps running the runs an earlier one accepted. Put a rule that a newer release may
#: tighten behind this key (``info.context``) or in ``validate.admission_problems``.
ADMITTED = "admitted"


class ObjectMeta(Model):
    """The part of metadata validate checks (the API server checks the rest)."""

    model_config = ConfigDict(extra="allow")
    name: str = Field(
        min_length=1,
        description=f"Run name (DNS-1035 label: lower-case letters, digits, '-', a letter first; "
        f"≤ {MAX_RUN_NAME}).",
    )

    @field_validator("name")
    @classmethod
    def _name(cls, v: str, info: ValidationInfo) -> str:
        if (info.context or {}).get(ADMITTED):
            return v  # an admission rule: a run accepted before keeps its (immutable) name
        problem = run_name_problem(v)
        if problem is not None:
            raise ValueError(problem)
        return v

    namespace: str | None = Field(None, max_length=63, pattern=DNS_LABEL)
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)


class VisionR1Run(Model):
    """A whole Vision-R1 pipeline run."""

    api_version: Literal["visionr1.io/v1alpha1"] = Field(alias="apiVersion")
    kind: Literal["VisionR1Run"]
    metadata: ObjectMeta
    spec: VisionR1RunSpec
    status: VisionR1RunStatus | None = None


def parse_run(obj: dict[str, Any]) -> VisionR1Run:
    """Validate a manifest dict; raises pydantic.ValidationError."""
    return VisionR1Run.model_validate(obj)


def enabled_stages(spec: VisionR1RunSpec) -> list[str]:
    return [s for s in STAGES if spec.stages.get(s).enabled]
