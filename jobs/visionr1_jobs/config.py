"""Parameters of every stage program, as pydantic models.

The stage programs own their parameters; the operator's VisionR1Run API embeds these models
under ``spec.stages.<stage>.params``. Defaults reproduce the Vision-R1 paper (see docs/method.md);
where the paper is silent the default is marked "not published" in the field description.

This module imports only pydantic (and the standard library): the operator image has no torch.
Field names are snake_case in Python and camelCase in manifests and in the resolved stage config.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from importlib import metadata
from typing import Annotated, Any, Literal, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel

STAGES: tuple[str, ...] = ("synthesis", "filter", "sft", "grpo", "eval")
StageName = Literal["synthesis", "filter", "sft", "grpo", "eval"]

#: Exit status of a stage program whose config or input is invalid. Permanent: the operator maps
#: it to ``FailJob`` in the Job's podFailurePolicy and never retries it.
EXIT_INVALID_INPUT = 65
#: Exit status of a stage program whose input stage has no ``_manifest.json`` (yet): retryable.
#: The operator re-merges a sharded producer whose Job succeeded, then retries the consumer.
EXIT_INPUT_MISSING = 66

#: Version of the resolved stage config's schema (``ResolvedStageConfig.schemaVersion``). Raise it
#: with every field added to a stage's parameters: a stage program reading a config of a newer
#: schema ignores the fields it does not know while they are at their defaults (which the writer
#: sends along, ``paramDefaults``) and refuses, naming them, those set to anything else.
CONFIG_SCHEMA = 1


@functools.cache
def package_version() -> str:
    """The installed visionr1's version (what a config's ``writtenBy`` and a refusal name).
    Read once: the lookup scans the installed distributions (3% of the operator's CPU at 1,000
    runs when it was read for every stage config)."""
    try:
        return metadata.version("visionr1")
    except metadata.PackageNotFoundError:
        return "unknown"


#: spec.baseModel and its revision, as the operator and the local executor pass them to every
#: stage process; :func:`model_revision` tells a loader which revision to load.
BASE_MODEL_ENV = "VISIONR1_BASE_MODEL"
BASE_MODEL_REVISION_ENV = "VISIONR1_BASE_MODEL_REVISION"

#: Where a stage writes the one-line reason it failed: Kubernetes reads the file at the
#: container's terminationMessagePath and shows it as the container's termination message (the
#: operator passes that path in this variable; in a pod without it, the default path is used).
TERMINATION_LOG_ENV = "VISIONR1_TERMINATION_LOG"
DEFAULT_TERMINATION_LOG = "/dev/termination-log"


#: Where a stage pod finds its hub base model already downloaded, read-only: the folder the
#: operator's fetch init container (``python -m visionr1_jobs.fetch_model``) renamed into place
#: with the completion marker in it. Unset on a laptop and for a base model that is a folder.
BASE_MODEL_DIR_ENV = "VISIONR1_BASE_MODEL_DIR"
#: The completion marker the fetch writes into a downloaded model's folder before it renames
#: the folder into place: a folder with it holds the whole model.
FETCH_MARKER = ".visionr1-fetch.json"


def local_base_model(model: Any) -> str:
    """``model``, or the folder the fetch downloaded it into when it is the run's hub base model
    and that folder is complete (:data:`BASE_MODEL_DIR_ENV`, :data:`FETCH_MARKER`). Every other
    model (a teacher, a checkpoint, a laptop run) is returned as it is."""
    folder = os.environ.get(BASE_MODEL_DIR_ENV)
    if folder and str(model) == os.environ.get(BASE_MODEL_ENV):
        if os.path.isfile(os.path.join(folder, FETCH_MARKER)):
            return folder
    return str(model)


def model_revision(model: Any) -> str | None:
    """The hub revision (commit or tag) to load ``model`` at: ``spec.baseModel.revision`` when
    ``model`` is the run's base model, else None (the hub's default; ignored for local paths)."""
    revision = os.environ.get(BASE_MODEL_REVISION_ENV) or None
    return revision if revision and str(model) == os.environ.get(BASE_MODEL_ENV) else None


class Model(BaseModel):
    """Base for every manifest and config model: camelCase aliases, unknown fields refused."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        validate_default=True,
    )

    def dump(self) -> dict[str, Any]:
        """The camelCase JSON form, as written into manifests and stage configs."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


def _cel(*rules: tuple[str, str]) -> dict[str, Any]:
    """CEL rules for the CRD (``x-kubernetes-validations``); each is mirrored by a validator."""
    return {"x-kubernetes-validations": [{"rule": r, "message": m} for r, m in rules]}


# --------------------------------------------------------------------------- shared pieces

DatasetFormat = Literal[
    "auto",
    "visionr1",  # the pipeline's own sharded parquet (what our stages write)
    "toy",  # the toy world written by `visionr1 toy data`
    "llava_cot",
    "mulberry",
    "sharegpt",  # Vision-R1-cold (LLaMA-Factory sharegpt, both variants)
    "geometry3k",  # Vision-R1-rl parquet: images, problem, answer
    "jsonl",
    "hf_disk",  # a datasets.save_to_disk directory
]

BackendKind = Literal["toy", "transformers", "vllm", "openai", "auto"]


class SecretKeyRef(Model):
    """A key of a Kubernetes Secret in the run's namespace."""

    name: str = Field(description="Secret name.", min_length=1, max_length=253)
    key: str = Field(description="Key inside the Secret.", min_length=1, max_length=253)


class Sampling(Model):
    """Sampling parameters of one generation call."""

    temperature: float = Field(
        1.0, ge=0.0, le=5.0, description="Sampling temperature (0 = greedy)."
    )
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    max_tokens: int = Field(
        4096, ge=1, le=131072, description="Maximum new tokens per response (tokens)."
    )
    seed: int | None = Field(None, ge=0, description="Sampling seed; unset = nondeterministic.")


#: Per-request timeout of an API backend whose ``timeoutS`` is unset (seconds).
DEFAULT_TIMEOUT_S = 600.0
#: ... and of the synthesis reasoner's (16K-token outputs; seconds).
REASONER_TIMEOUT_S = 1800.0


class Backend(Model):
    """Where text is generated: one interface over toy stand-ins, transformers, vLLM, or an API."""

    model_config = ConfigDict(
        json_schema_extra=_cel(
            (
                "!has(self.kind) || self.kind != 'openai' || has(self.baseUrl)",
                "kind 'openai' needs baseUrl (e.g. http://vllm:8000/v1)",
            )
        )
    )

    kind: BackendKind = Field(
        "auto",
        description=(
            "toy = the toy-world stand-in (toy data only); transformers = HF generate (CPU or GPU); "
            "vllm = vLLM offline engine (GPU image only); openai = any OpenAI-compatible chat "
            "endpoint; auto = vllm when installed and a GPU is present, else transformers."
        ),
    )
    model: str | None = Field(
        None,
        description="Model: a path, a hub id, or the served model name for `openai`. "
        "Unset = the stage's own model (the run's base model or the checkpoint under test). "
        "Kind toy: unset (default behaviour) or a JSON file of the stand-ins' own settings.",
        max_length=512,
    )
    base_url: str | None = Field(
        None,
        description="Base URL of the OpenAI-compatible endpoint, e.g. http://vllm:8000/v1.",
        max_length=2048,
        pattern=r"^https?://",
    )
    api_key_env: str | None = Field(
        None,
        description="Environment variable holding the API key (fill it from a Secret with the "
        "stage's `env`).",
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        max_length=128,
    )
    max_concurrency: int = Field(16, ge=1, le=4096, description="Requests in flight (openai).")
    timeout_s: float | None = Field(
        None,
        gt=0,
        le=86400,
        description="Per-request timeout (seconds, openai). Unset = 600, and 1,800 for the "
        "synthesis reasoner: a 16K-token chain of thought at 10-20 tokens/s takes 14-27 minutes.",
    )
    max_retries: int = Field(5, ge=0, le=50, description="Retries on 429/5xx/timeouts (openai).")
    batch_size: int = Field(8, ge=1, le=4096, description="Prompts per batch (transformers).")
    tensor_parallel_size: int | None = Field(
        None,
        ge=1,
        le=64,
        description="vLLM: GPUs per engine (tensor parallel). Unset = all of the pod's GPUs.",
    )
    data_parallel_size: int | None = Field(
        None,
        ge=1,
        le=64,
        description="vLLM: engines per pod, each on its own tensorParallelSize GPUs, sharing "
        "every batch. Unset = the pod's GPUs / tensorParallelSize.",
    )
    max_model_len: int | None = Field(
        None,
        ge=256,
        le=1048576,
        description="vLLM: context length (prompt + completion tokens). Unset = the model's own.",
    )
    max_images_per_prompt: int = Field(
        4, ge=1, le=64, description="vLLM: images one prompt may carry (limit_mm_per_prompt)."
    )
    gpu_memory_utilization: float = Field(
        0.9, gt=0.0, le=1.0, description="Share of GPU memory vLLM may take."
    )
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="Weights dtype (auto = bf16 on GPU, fp32 on CPU)."
    )

    @model_validator(mode="after")
    def _openai_needs_url(self) -> Backend:
        if self.kind == "openai" and not self.base_url:
            raise ValueError("kind 'openai' needs baseUrl (e.g. http://vllm:8000/v1)")
        return self


class Teacher(Model):
    """A model used by synthesis, with its backend and sampling parameters."""

    backend: Backend = Field(default_factory=Backend, description="How to generate.")
    sampling: Sampling = Field(default_factory=Sampling, description="Sampling parameters.")


class DatasetRef(Model):
    """A dataset on the run's storage (relative paths are under the workspace)."""

    path: str = Field(description="Directory or file.", min_length=1, max_length=4096)
    format: DatasetFormat = Field("auto", description="Layout of the data; auto = detect.")
    image_root: str | None = Field(
        None,
        description="Folder that image paths are relative to (default: beside the data).",
        max_length=4096,
    )
    limit: int | None = Field(None, ge=1, description="Use at most this many rows (rows).")


# --------------------------------------------------------------------------- synthesis


class SynthesisParams(Model):
    """Modality bridging (method.md §2): pseudo-CoT → detailed description → text reasoner."""

    describer: Teacher = Field(
        default_factory=lambda: Teacher(
            backend=Backend(
                kind="vllm", model="Qwen/Qwen2.5-VL-72B-Instruct", tensor_parallel_size=8
            ),
            sampling=Sampling(temperature=0.7, top_p=0.95, max_tokens=4096),
        ),
        description="Multimodal teacher for steps 1–2 (paper: Qwen2.5-VL-72B).",
    )
    reasoner: Teacher = Field(
        default_factory=lambda: Teacher(
            backend=Backend(
                kind="openai",
                model="deepseek-reasoner",
                base_url="https://api.deepseek.com/v1",
                api_key_env="DEEPSEEK_API_KEY",
            ),
            sampling=Sampling(temperature=0.6, top_p=0.95, max_tokens=16384),
        ),
        description="Text-only reasoning model for step 3 (paper: DeepSeek-R1).",
    )
    prompts_version: str = Field(
        "v1", pattern=r"^v[0-9]+$", description="Version of the prompt files to use (logged)."
    )
    pipeline: bool = Field(
        True,
        description="Run the reasoner on chunk i while the describer does chunk i+1 (when the "
        "two teachers can run at once: not two transformers backends in one process); chunks "
        "are still written in order. false = one teacher at a time.",
    )
    give_answer_to_reasoner: bool = Field(
        True, description="Show the ground-truth answer to the reasoner (the authors say they did)."
    )
    rows_per_shard: int = Field(
        512, ge=1, le=1_000_000, description="Rows per output parquet file (rows)."
    )
    limit: int | None = Field(None, ge=1, description="Process at most this many input rows.")
    max_failed_fraction: float = Field(
        0.05,
        ge=0.0,
        le=1.0,
        description="Share of a shard's rows whose teacher calls may fail for good (content "
        "filter, context length, other 4xx, retries spent; each dropped with its reason and "
        "counted) before the shard fails.",
    )


# --------------------------------------------------------------------------- filter


class Replacement(Model):
    """One wording replacement (regular expression, case-insensitive)."""

    pattern: str = Field(min_length=1, max_length=1024, description="Regex to find.")
    replacement: str = Field(max_length=1024, description="Replacement text.")


DEFAULT_REPLACEMENTS: list[dict[str, str]] = [
    {
        "pattern": r"\b(?:the|this) (?:detailed )?description (?:says|states|mentions|notes)",
        "replacement": "the image shows",
    },
    {
        "pattern": r"\b(?:the|this) (?:detailed )?description (?:shows|indicates)",
        "replacement": "the image shows",
    },
    {
        "pattern": r"\baccording to the (?:detailed )?description\b",
        "replacement": "according to the image",
    },
    {"pattern": r"\b(?:the|this) (?:detailed )?description\b", "replacement": "the image"},
    {
        "pattern": r"\b(?:the|this) (?:given )?text\b(?= (?:says|states|shows|mentions))",
        "replacement": "the image",
    },
    {"pattern": r"\bas described\b", "replacement": "as shown"},
    {"pattern": r"\bis described as\b", "replacement": "is shown as"},
    {"pattern": r"\bdescribed\b", "replacement": "shown"},
]


class FilterParams(Model):
    """Rules that turn raw reasoner outputs into Vision-R1-cold (method.md §3–4)."""

    require_correct: bool = Field(
        True, description="Keep only answers that match the ground truth."
    )
    check_consistency: bool = Field(
        True, description="Drop CoTs whose final answer contradicts the thinking's last conclusion."
    )
    max_chars: int = Field(
        65536, ge=64, le=10_000_000, description="Drop responses longer than this (characters)."
    )
    min_think_chars: int = Field(
        16, ge=0, le=1_000_000, description="Drop thinking shorter than this (characters)."
    )
    repetition_ngram: int = Field(
        8, ge=2, le=256, description="n-gram size (words) for the runaway-repetition rule."
    )
    max_repeated_ngram_share: float = Field(
        0.3,
        gt=0.0,
        le=1.0,
        description="Drop when the most frequent n-gram covers more than this share of the thinking.",
    )
    replacements: list[Replacement] = Field(
        default_factory=lambda: [Replacement(**r) for r in DEFAULT_REPLACEMENTS],
        description="Wording that reveals the reasoner saw text, rewritten as about the image.",
        max_length=256,
    )
    dedupe: bool = Field(
        True, description="Drop duplicate (image, question) pairs, keep the first."
    )
    workers: int = Field(
        1, ge=1, le=256, description="Worker processes for answer checking (processes)."
    )
    verify_timeout_s: float = Field(
        5.0, gt=0, le=600, description="Time bound for one answer check (seconds)."
    )
    rows_per_shard: int = Field(
        4096, ge=1, le=1_000_000, description="Rows per output file (rows)."
    )
    sample_rows: int = Field(
        50,
        ge=0,
        le=10_000,
        description="Kept and dropped rows logged to MLflow as a sample (rows).",
    )


# --------------------------------------------------------------------------- training shared

DeepSpeedMode = Literal["none", "zero2", "zero3"]
AttnImplementation = Literal["eager", "sdpa", "flash_attention_2"]


class TrainCommon(Model):
    """Parameters shared by SFT and GRPO."""

    bf16: bool = Field(True, description="bf16 on GPU (CPU always trains in fp32).")
    deepspeed: DeepSpeedMode = Field("zero3", description="DeepSpeed ZeRO stage (none on CPU).")
    gradient_checkpointing: bool = Field(True, description="Activation checkpointing.")
    freeze_vision_tower: bool = Field(False, description="Do not train the vision encoder.")
    min_pixels: int | None = Field(
        None,
        ge=784,
        le=100_000_000,
        description="Processor min_pixels (pixels); unset = model default.",
    )
    max_pixels: int | None = Field(
        None,
        ge=784,
        le=100_000_000,
        description="Processor max_pixels (pixels); unset = model default.",
    )
    save_steps: int = Field(
        50, ge=1, le=1_000_000, description="Checkpoint every N optimizer steps."
    )
    save_total_limit: int = Field(2, ge=1, le=1000, description="Checkpoints kept on disk.")
    logging_steps: int = Field(1, ge=1, le=10_000, description="Log metrics every N steps.")
    seed: int = Field(42, ge=0, description="Training seed.")
    register_model: str | None = Field(
        None,
        max_length=256,
        description="Register the final model in the MLflow Model Registry under this name.",
    )
    attn_implementation: AttnImplementation | None = Field(
        None,
        description="Attention kernel of the trained model and its KL reference (the model's "
        "attn_implementation). Unset = transformers' default (sdpa). flash_attention_2 needs a "
        "GPU and the flash-attn package (the trainer image built with FLASH_ATTN=1).",
    )
    use_liger_kernel: bool = Field(
        False,
        description="Liger's Triton kernels (TRL use_liger_kernel; needs the liger-kernel "
        "package, not in the trainer image, and a GPU). SFT: RMSNorm, RoPE, SwiGLU and the "
        "fused linear cross-entropy (no full-vocabulary logits at 16K tokens). GRPO: the layer "
        "kernels only: TRL's GRPO already computes log-probabilities with its own chunked, "
        "fused LM head and refuses Liger's fused loss.",
    )

    @model_validator(mode="after")
    def _pixels_order(self) -> TrainCommon:
        if self.min_pixels and self.max_pixels and self.min_pixels > self.max_pixels:
            raise ValueError("minPixels must not exceed maxPixels")
        return self


_PIXELS_CEL = (
    "!has(self.minPixels) || !has(self.maxPixels) || self.minPixels <= self.maxPixels",
    "minPixels must not exceed maxPixels",
)


class SFTParams(TrainCommon):
    """Cold-start SFT (method.md §5): full fine-tune, bf16, ZeRO-3."""

    model_config = ConfigDict(json_schema_extra=_cel(_PIXELS_CEL))

    learning_rate: float = Field(5e-6, gt=0, le=1.0, description="Peak learning rate.")
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = Field(
        "cosine", description="Learning-rate schedule."
    )
    warmup_ratio: float = Field(0.05, ge=0, le=1, description="Share of steps spent warming up.")
    epochs: float = Field(2.0, gt=0, le=100, description="Training epochs.")
    max_steps: int | None = Field(
        None, ge=1, description="Stop after this many optimizer steps (overrides epochs)."
    )
    global_batch_size: int = Field(
        32, ge=1, le=65536, description="Sequences per optimizer step across all GPUs."
    )
    per_device_batch_size: int = Field(
        1, ge=1, le=1024, description="Sequences per GPU per micro-step."
    )
    weight_decay: float = Field(0.0, ge=0, le=1, description="AdamW weight decay.")
    max_length: int = Field(
        16384,
        ge=16,
        le=262144,
        description="Max sequence length (tokens): a row longer than this (prompt + answer, "
        "image tokens included, as the trainer's processor counts them) is dropped before "
        "training and counted (rows_dropped_too_long), never truncated.",
    )


class PTSTStage(Model):
    """One row of the Progressive Thinking Suppression table."""

    max_completion_length: int = Field(
        ge=1, le=131072, description="Completion budget of this sub-stage (tokens)."
    )
    num_generations: int = Field(
        ge=2, le=512, description="Samples per prompt (GRPO needs at least 2 to compare)."
    )
    steps: int = Field(ge=1, le=1_000_000, description="Optimizer steps in this sub-stage.")


PAPER_PTST: list[dict[str, int]] = [
    {"max_completion_length": 4096, "num_generations": 16, "steps": 100},
    {"max_completion_length": 8192, "num_generations": 8, "steps": 100},
]


class GRPOParams(TrainCommon):
    """GRPO with PTST and the hard formatting result reward (method.md §6)."""

    model_config = ConfigDict(
        json_schema_extra=_cel(
            _PIXELS_CEL,
            (
                "!has(self.rollout) || self.rollout != 'vllm_server' || has(self.vllmServerUrl)",
                "rollout 'vllm_server' needs vllmServerUrl",
            ),
            (
                "!has(self.promptsPerRollout) || self.promptsPerRollout % "
                "(has(self.promptsPerStep) ? self.promptsPerStep : 32) == 0",
                "promptsPerRollout must be a multiple of promptsPerStep (a rollout is trained on "
                "as whole optimizer steps)",
            ),
        )
    )

    dataset: DatasetRef | None = Field(
        None,
        description="RL problems (paper: ~10K, geometry3k format: images, problem, answer). "
        "Required when the stage is enabled.",
    )
    ptst: Annotated[list[PTSTStage], Field(min_length=1, max_length=16)] = Field(
        default_factory=lambda: [PTSTStage(**row) for row in PAPER_PTST],
        description="PTST table: sub-stages run in order, each from the previous one's weights.",
    )
    learning_rate: float = Field(
        1e-6, gt=0, le=1.0, description="Learning rate (not published; EasyR1's default)."
    )
    warmup_steps: int = Field(
        0,
        ge=0,
        le=100000,
        description="Linear learning-rate warmup at the start of every PTST sub-stage, in "
        "optimizer steps (each sub-stage starts a fresh optimizer; 0 = constant from the first "
        "step).",
    )
    beta: float = Field(
        0.01, ge=0, le=10, description="KL coefficient to the reference model (k3)."
    )
    epsilon: float = Field(0.2, gt=0, le=1, description="PPO clip range.")
    loss_type: Literal["grpo", "dapo", "dr_grpo", "bnpo"] = Field(
        "grpo", description="TRL loss type."
    )
    reward: Literal["hard_format_result", "format_plus_accuracy"] = Field(
        "hard_format_result",
        description="hard_format_result = format × accuracy (Vision-R1); format_plus_accuracy = "
        "0.5·format + 0.5·accuracy (Vision-R1-Zero).",
    )
    system_prompt: str | None = Field(
        None,
        max_length=16384,
        description="System prompt for rollouts (Vision-R1 uses none; Zero used a format instruction).",
    )
    prompts_per_step: int = Field(
        32, ge=1, le=65536, description="Prompts per optimizer step, all GPUs (not published)."
    )
    per_device_batch_size: int | None = Field(
        None,
        ge=1,
        le=65536,
        description="Completions per process per micro-step (gradient accumulation makes up the "
        "rest); unset = each process's whole share of a step, promptsPerStep × numGenerations / "
        "processes, at once.",
    )
    prompts_per_rollout: int | None = Field(
        None,
        ge=1,
        le=1_048_576,
        description="Prompts generated together in one rollout, all GPUs (EasyR1's "
        "rollout_batch_size; TRL's generation batch is this × numGenerations completions), then "
        "trained on as promptsPerRollout / promptsPerStep optimizer steps. A multiple of "
        "promptsPerStep; unset = promptsPerStep (one rollout per optimizer step).",
    )
    num_iterations: int = Field(
        1,
        ge=1,
        le=64,
        description="Passes over each rollout (GRPO's μ, TRL num_iterations): >1 trains on the "
        "same completions again for as many more optimizer steps.",
    )
    temperature: float = Field(1.0, gt=0, le=5, description="Rollout temperature (not published).")
    top_p: float = Field(1.0, gt=0, le=1, description="Rollout nucleus mass.")
    max_prompt_length: int = Field(
        4096,
        ge=16,
        le=262144,
        description="Prompts longer than this are dropped and counted (tokens).",
    )
    reset_reference_each_stage: bool = Field(
        False,
        description="Use each sub-stage's starting weights as its KL reference (not published).",
    )
    rollout: Literal["auto", "vllm_colocate", "vllm_server", "transformers"] = Field(
        "auto", description="How completions are generated (auto = vLLM colocate when installed)."
    )
    vllm_server_url: str | None = Field(
        None,
        max_length=2048,
        pattern=r"^https?://",
        description="TRL vLLM server for rollout=vllm_server.",
    )
    vllm_gpu_memory_utilization: float = Field(
        0.35, gt=0, le=1, description="GPU share for colocated vLLM."
    )
    vllm_enable_sleep_mode: bool = Field(
        False,
        description="Colocated vLLM: while the trainer runs, drop vLLM's weights and KV cache "
        "from the GPU (TRL vllm_enable_sleep_mode); training gets that memory back, each "
        "rollout reloads the weights.",
    )
    vllm_tensor_parallel_size: int = Field(
        1,
        ge=1,
        le=64,
        description="Colocated vLLM: GPUs per engine (TRL vllm_tensor_parallel_size); must "
        "divide the GPUs per pod. 1 = one engine per GPU (a 7B model fits one). The engine's "
        "context (vllm_max_model_length) is maxPromptLength + the sub-stage's "
        "maxCompletionLength.",
    )
    verify_timeout_s: float = Field(
        5.0, gt=0, le=600, description="Time bound per reward check (s)."
    )

    @model_validator(mode="after")
    def _server_needs_url(self) -> GRPOParams:
        if self.rollout == "vllm_server" and not self.vllm_server_url:
            raise ValueError("rollout 'vllm_server' needs vllmServerUrl")
        return self

    @model_validator(mode="after")
    def _rollout_whole_steps(self) -> GRPOParams:
        rollout = self.prompts_per_rollout
        if rollout is not None and rollout % self.prompts_per_step:
            step = self.prompts_per_step
            raise ValueError(
                f"promptsPerRollout ({rollout}) must be a multiple of promptsPerStep ({step}) "
                "(a rollout is trained on as whole optimizer steps); e.g. set promptsPerRollout "
                f"to {max(step, rollout // step * step)}"
            )
        return self

    def steps_per_rollout(self) -> int:
        """Optimizer steps one rollout feeds: promptsPerRollout / promptsPerStep × numIterations."""
        rollout = self.prompts_per_rollout or self.prompts_per_step
        return rollout // self.prompts_per_step * self.num_iterations


@dataclass(frozen=True)
class GRPOBatchPlan:
    """How one PTST sub-stage's rollouts and optimizer steps split over the processes.

    ``per_device × processes × grad_accum`` completions make one optimizer step
    (``promptsPerStep × numGenerations``); a rollout generates ``steps_per_rollout`` of them at
    once (``promptsPerRollout × numGenerations``, TRL's ``generation_batch_size``), and TRL
    counts that rollout in micro-steps (``steps_per_generation = grad_accum × steps_per_rollout``).
    """

    per_device: int
    grad_accum: int
    steps_per_rollout: int
    steps_per_generation: int
    generation_batch_size: int
    rollout_per_process: int


def grpo_batch_plan(
    params: GRPOParams, index: int, world_size: int, prefix: str = "params."
) -> GRPOBatchPlan:
    """The batch plan of PTST row ``index`` (0-based) on ``world_size`` processes.

    Raises ValueError naming the fields (``prefix`` + camelCase name) and a fix when the numbers
    cannot divide: the completions of a step over the processes and their micro-batches, the
    sub-stage's steps over the optimizer steps each rollout feeds.
    """
    row = params.ptst[index]
    p, g, w = params.prompts_per_step, row.num_generations, world_size
    gens = f"{prefix}ptst[{index}].numGenerations"
    total = p * g
    if total % w:
        raise ValueError(
            f"{prefix}promptsPerStep ({p}) × {gens} ({g}) = {total} completions per step "
            f"cannot be split over {w} processes (nodes × GPUs per pod); make promptsPerStep "
            f"× numGenerations a multiple of {w}, e.g. promptsPerStep: {_next_multiple(p, g, w)}"
        )
    share = total // w
    per_device = params.per_device_batch_size
    micro = share if per_device is None else per_device
    if share % micro:
        fits = max(d for d in range(1, micro + 1) if share % d == 0)
        raise ValueError(
            f"{prefix}perDeviceBatchSize ({per_device}) must divide the {share} completions each "
            f"of the {w} processes trains per optimizer step ({prefix}promptsPerStep {p} × {gens} "
            f"{g} / {w} processes); e.g. set perDeviceBatchSize to {fits}"
        )
    grad_accum = share // micro
    rollout_steps = (params.prompts_per_rollout or p) // p
    feeds = rollout_steps * params.num_iterations
    if row.steps % feeds:
        raise ValueError(
            f"{prefix}ptst[{index}].steps ({row.steps}) must be a multiple of the optimizer steps "
            f"one rollout feeds ({prefix}promptsPerRollout / promptsPerStep × numIterations = "
            f"{rollout_steps} × {params.num_iterations} = {feeds}), so every rollout is trained "
            f"on in full; e.g. set steps to {max(feeds, row.steps // feeds * feeds)}"
        )
    return GRPOBatchPlan(
        per_device=micro,
        grad_accum=grad_accum,
        steps_per_rollout=rollout_steps,
        steps_per_generation=grad_accum * rollout_steps,
        generation_batch_size=total * rollout_steps,
        rollout_per_process=share * rollout_steps,
    )


def _next_multiple(prompts: int, generations: int, world: int) -> int:
    """The smallest promptsPerStep ≥ ``prompts`` whose completions split over ``world``."""
    n = prompts
    while (n * generations) % world:
        n += 1
    return n


def sft_batch_problem(
    global_batch: int, per_device: int, world_size: int, prefix: str = "params."
) -> str | None:
    """Why ``global_batch`` sequences per step cannot split over the processes, or None."""
    denom = per_device * world_size
    if global_batch % denom:
        return (
            f"{prefix}globalBatchSize ({global_batch}) must be a multiple of "
            f"{prefix}perDeviceBatchSize ({per_device}) × processes ({world_size}) = {denom}; "
            f"e.g. set globalBatchSize to {max(denom, global_batch // denom * denom)}"
        )
    return None


# --------------------------------------------------------------------------- eval

BenchmarkName = Literal["mathvista", "mathverse", "mmmath", "dynamath", "toy"]


class Benchmark(Model):
    """One benchmark to evaluate on, from a local dataset directory."""

    name: BenchmarkName = Field(description="Benchmark (layout and scoring rules follow from it).")
    path: str = Field(
        min_length=1, max_length=4096, description="Dataset directory on the storage."
    )
    limit: int | None = Field(None, ge=1, description="Evaluate only the first N problems.")
    versions: list[str] | None = Field(
        None, max_length=16, description="MathVerse problem versions to include (unset = all)."
    )
    judge: Literal["rule", "llm"] | None = Field(
        None,
        description="How this benchmark is scored: rule, or llm (the stage's llmJudge, rules "
        "kept beside). Unset = the stage's judge setting.",
    )


#: Benchmarks the paper scored with an LLM judge (gpt-4o-mini); MM-Math and DynaMath by rules.
PAPER_JUDGED_BENCHMARKS: frozenset[str] = frozenset({"mathvista", "mathverse"})


class EvalParams(Model):
    """Evaluation (method.md §7): the released harness's protocol, rule-based by default."""

    model_config = ConfigDict(
        json_schema_extra=_cel(
            (
                "!has(self.judge) || self.judge == 'rule' || has(self.llmJudge)",
                "judge 'paper' or 'llm' needs llmJudge",
            ),
            (
                "has(self.llmJudge) || !has(self.benchmarks) || "
                "self.benchmarks.all(b, !has(b.judge) || b.judge != 'llm')",
                "benchmarks[].judge 'llm' needs llmJudge",
            ),
        )
    )

    benchmarks: Annotated[list[Benchmark], Field(min_length=1, max_length=32)] = Field(
        default_factory=lambda: [
            Benchmark(name="mathvista", path="/data/benchmarks/mathvista"),
            Benchmark(name="mathverse", path="/data/benchmarks/mathverse"),
            Benchmark(name="mmmath", path="/data/benchmarks/mm-math"),
            Benchmark(name="dynamath", path="/data/benchmarks/dynamath"),
        ],
        description="Benchmarks to run.",
    )
    checkpoints: list[str] = Field(
        default_factory=lambda: ["base", "sft", "grpo"],
        max_length=64,
        description="Checkpoints to evaluate: base, sft, grpo (the final model), grpo/stage-N, or a path.",
    )
    backend: Backend = Field(default_factory=Backend, description="Generation backend (auto).")
    temperature: float = Field(0.6, ge=0, le=5, description="Sampling temperature (paper: 0.6).")
    top_p: float = Field(0.95, gt=0, le=1, description="Nucleus mass (paper: 0.95).")
    max_new_tokens: int = Field(
        16000, ge=1, le=131072, description="Max new tokens (paper: 16,000)."
    )
    retries_missing_answer: int = Field(
        4,
        ge=0,
        le=16,
        description="Ask again up to N times when `</answer>` is missing (paper: 4).",
    )
    batch_size: int = Field(
        256,
        ge=1,
        le=100000,
        description="Prompts generated together; each batch's predictions are saved when done, "
        "so a restarted pod resumes after the last saved batch.",
    )
    judge: Literal["rule", "paper", "llm"] | None = Field(
        None,
        description="Which benchmarks the llmJudge scores (a benchmark's own judge overrides): "
        "rule = none, every benchmark by rules (the reproducible default); paper = MathVista and "
        "MathVerse, as the paper judged them (gpt-4o-mini), the others by rules; llm = every "
        "benchmark. Unset = paper when llmJudge is set, else rule. Judged benchmarks keep the "
        "rule verdict and accuracy beside the judge's.",
    )
    llm_judge: Teacher | None = Field(
        None,
        description="Judge model for the judged benchmarks, usually backend kind openai (the "
        "served model id, prompt version and sha256 are recorded). The judge runs greedy "
        "(temperature 0); sampling.maxTokens and sampling.seed apply.",
    )
    system_prompts: dict[str, Annotated[str, Field(max_length=16384)]] = Field(
        default_factory=dict,
        max_length=64,
        description="System prompt per checkpoint name (a key of checkpoints); the others get "
        "none, as the paper evaluates. The operator fills in a GRPO checkpoint's training "
        "systemPrompt (the Vision-R1-Zero ablation's format instruction) unless set here.",
    )
    seed: int = Field(0, ge=0, description="Sampling seed.")

    @model_validator(mode="after")
    def _llm_judge(self) -> EvalParams:
        if self.llm_judge is None:
            if self.judge in ("paper", "llm"):
                raise ValueError(
                    f"judge {self.judge!r} needs llmJudge (the judge model); set llmJudge, or "
                    "judge 'rule'"
                )
            for i, b in enumerate(self.benchmarks):
                if b.judge == "llm":
                    raise ValueError(
                        f"benchmarks[{i}].judge 'llm' ({b.name}) needs llmJudge (the judge "
                        "model); set llmJudge, or remove that benchmark's judge"
                    )
        return self

    @model_validator(mode="after")
    def _system_prompt_keys(self) -> EvalParams:
        unknown = sorted(set(self.system_prompts) - set(self.checkpoints))
        if unknown:
            raise ValueError(
                f"systemPrompts has key(s) {unknown} that are not in checkpoints "
                f"{self.checkpoints}; key each system prompt by a checkpoint name"
            )
        return self

    def judge_mode(self) -> Literal["rule", "paper", "llm"]:
        """The stage-wide judge setting with its default resolved."""
        if self.judge is not None:
            return self.judge
        return "paper" if self.llm_judge is not None else "rule"

    def judged(self, bench: Benchmark) -> bool:
        """Whether the llmJudge scores ``bench`` (its own setting, else the stage's)."""
        if bench.judge is not None:
            return bench.judge == "llm"
        mode = self.judge_mode()
        return mode == "llm" or (mode == "paper" and bench.name in PAPER_JUDGED_BENCHMARKS)

    def system_prompt(self, checkpoint: str) -> str | None:
        """The system prompt ``checkpoint`` is evaluated with (None: no system turn)."""
        return self.system_prompts.get(checkpoint) or None


PARAMS_BY_STAGE: dict[str, type[Model]] = {
    "synthesis": SynthesisParams,
    "filter": FilterParams,
    "sft": SFTParams,
    "grpo": GRPOParams,
    "eval": EvalParams,
}


# --------------------------------------------------------------------------- resolved config


class InputLocation(Model):
    """A resolved input of a stage program."""

    path: str = Field(description="Absolute path, or relative to the workspace.")
    format: str = Field(
        "auto",
        description="Data layout, 'model' for a model directory or hub id, or 'stage' for another "
        "stage's output folder (read its _manifest.json).",
    )
    stage: StageName | None = Field(None, description="Producing stage when format == 'stage'.")


class MlflowRef(Model):
    tracking_uri: str | None = None
    experiment: str = "visionr1"
    parent_run_id: str | None = None
    run_id: str | None = None


class RunRef(Model):
    namespace: str = "default"
    name: str = "local"
    uid: str | None = None


class ResolvedStageConfig(Model):
    """What the operator (or the local executor) hands a stage program as ``--config FILE``."""

    stage: StageName
    run: RunRef = Field(default_factory=RunRef)
    workspace: str = Field(description="Root of the run's workspace (PVC mount or local dir).")
    output_dir: str = Field(description="This stage's folder, relative to the workspace.")
    base_model: str = Field(description="The run's base model (path or hub id).")
    inputs: dict[str, InputLocation] = Field(default_factory=dict)
    params: dict[str, Any] = Field(default_factory=dict)
    mlflow: MlflowRef = Field(default_factory=MlflowRef)
    schema_version: int = Field(
        1, ge=1, description="CONFIG_SCHEMA of the writer (1: written before it was recorded)."
    )
    written_by: str | None = Field(None, description="visionr1 version of the writer.")
    param_defaults: dict[str, Any] = Field(
        default_factory=dict,
        description="The writer's defaults of the stage's parameters (param_defaults()): lets an "
        "older stage program ignore a newer field left at its default.",
    )

    def stage_params(self) -> Model:
        """The stage's parameter model, validated."""
        return PARAMS_BY_STAGE[self.stage].model_validate(self.params)


# --------------------------------------------------------------------------- newer writers

_DEFAULT = "default"
_FIELDS = "fields"


def _nested(annotation: Any) -> tuple[str, type[BaseModel]] | None:
    """("model" | "list" | "dict", the model) when values of ``annotation`` hold a model."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "model", annotation
    origin = get_origin(annotation)
    args = get_args(annotation)
    if origin in (list, tuple) and args:
        inner = _nested(args[0])
        return ("list", inner[1]) if inner else None
    if origin is dict and len(args) == 2:
        inner = _nested(args[1])
        return ("dict", inner[1]) if inner else None
    for arg in args:  # Optional[...], Annotated[...], unions
        inner = _nested(arg)
        if inner is not None:
            return inner
    return None


def param_defaults(model: type[BaseModel]) -> dict[str, Any]:
    """Per field (by its camelCase name): ``{"default": <JSON>}`` when it has a default, and
    ``{"fields": {...}}`` (the same, recursively) when its values are or hold a model."""
    from pydantic_core import to_jsonable_python

    out: dict[str, Any] = {}
    for name, info in model.model_fields.items():
        entry: dict[str, Any] = {}
        if not info.is_required():
            value = info.get_default(call_default_factory=True, validated_data={})
            if value is not None:  # None is never written (Model.dump excludes it)
                entry[_DEFAULT] = to_jsonable_python(value, by_alias=True, exclude_none=True)
        nested = _nested(info.annotation)
        if nested is not None and nested[1] is not model:
            entry[_FIELDS] = param_defaults(nested[1])
        if entry:
            out[info.alias or name] = entry
    return out


def _check_unknown(
    model: type[BaseModel], data: Any, defaults: dict[str, Any], path: str
) -> tuple[Any, list[str], list[str]]:
    """``data`` without the fields ``model`` does not know that are at the writer's default;
    (cleaned data, ignored "path = value", refused "path = value (default ...)")."""
    if not isinstance(data, dict):
        return data, [], []
    ignored: list[str] = []
    refused: list[str] = []
    fields = {(info.alias or name): info for name, info in model.model_fields.items()}
    fields.update({name: info for name, info in model.model_fields.items()})
    out: dict[str, Any] = {}
    for key, value in data.items():
        where = f"{path}.{key}"
        info = fields.get(key)
        entry = defaults.get(key) if isinstance(defaults.get(key), dict) else {}
        if info is None:
            if _DEFAULT in entry and entry[_DEFAULT] == value:
                ignored.append(f"{where} = {value!r}")
            else:
                known = f" (its default: {entry[_DEFAULT]!r})" if _DEFAULT in entry else ""
                refused.append(f"{where} = {value!r}{known}")
            continue
        nested = _nested(info.annotation)
        sub = entry.get(_FIELDS) if isinstance(entry.get(_FIELDS), dict) else {}
        if nested is not None:
            kind, inner = nested
            if kind == "list" and isinstance(value, list):
                checked = [
                    _check_unknown(inner, v, sub, f"{where}[{i}]") for i, v in enumerate(value)
                ]
                value = [c[0] for c in checked]
            elif kind == "dict" and isinstance(value, dict):
                checked = [_check_unknown(inner, v, sub, f"{where}.{k}") for k, v in value.items()]
                value = dict(zip(value, (c[0] for c in checked), strict=True))
            else:
                checked = [_check_unknown(inner, value, sub, where)]
                value = checked[0][0]
            for _, i, r in checked:
                ignored += i
                refused += r
        out[key] = value
    return out, ignored, refused


def compatible_params(cfg: ResolvedStageConfig) -> tuple[dict[str, Any], list[str]]:
    """The stage's parameters as this program knows them, and a warning per field of a newer
    writer that was left at its default and is ignored. Raises ValueError naming every newer
    field set to anything else, and the trainer image that knows it."""
    model = PARAMS_BY_STAGE[cfg.stage]
    where = f"spec.stages.{cfg.stage}.params"
    params, ignored, refused = _check_unknown(model, cfg.params, cfg.param_defaults, where)
    mine = f"visionr1 {package_version()}, config schema {CONFIG_SCHEMA}"
    writer = f"visionr1 {cfg.written_by or 'unknown'}, config schema {cfg.schema_version}"
    if refused:
        newer = cfg.schema_version > CONFIG_SCHEMA
        fix = (
            f"use a trainer image >= {cfg.written_by or 'the operator'} (the config was written "
            f"by {writer}), or leave these fields at their defaults"
            if newer
            else "remove these fields"
        )
        raise ValueError(f"{'; '.join(refused)}: not known to this trainer image ({mine}); {fix}")
    warnings = [
        f"{field}: not known to this trainer image ({mine}); ignored, it is at the default of "
        f"its writer ({writer})"
        for field in ignored
    ]
    return params, warnings
