"""Where and how a training stage runs: world size, precision, DeepSpeed, batches, model loading.

Pure helpers (``world_from_env``, ``sft_batches``, ``grpo_batches``, ``deepspeed_config``) are
separate from the ones that touch torch, so the arithmetic is testable without a GPU.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from visionr1_jobs.config import (
    GRPOBatchPlan,
    GRPOParams,
    ResolvedStageConfig,
    grpo_batch_plan,
    model_revision,
    sft_batch_problem,
)
from visionr1_jobs.contract import InvalidInput, StageManifest, atomic_write_json, write_manifest

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class World:
    """This process's place in a torchrun job (1 process when not launched by torchrun)."""

    rank: int
    local_rank: int
    world_size: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def world_from_env(env: dict[str, str] | None = None) -> World:
    """RANK / LOCAL_RANK / WORLD_SIZE as torchrun sets them."""
    env = dict(os.environ) if env is None else env
    return World(
        rank=int(env.get("RANK", "0") or 0),
        local_rank=int(env.get("LOCAL_RANK", "0") or 0),
        world_size=int(env.get("WORLD_SIZE", "1") or 1),
    )


def has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def use_bf16(requested: bool) -> bool:
    """bf16 only on a GPU that supports it; the CPU always trains in fp32."""
    if not requested or not has_cuda():
        return False
    import torch

    return torch.cuda.is_bf16_supported()


def _peak_rss_mib() -> float:
    """This process image's peak resident memory (MiB).

    VmHWM, not getrusage's ru_maxrss: the kernel carries ru_maxrss across fork and exec, so a child
    started by a large parent would report the parent's peak as its own.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    import resource  # not Linux: the best there is

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def process_memory() -> dict[str, Any]:
    """This process's id and memory now: resident and peak resident host memory (MiB), and on a
    GPU the CUDA memory torch holds (allocated, reserved, peak allocated; MiB).

    A PTST sub-stage records it when it starts and when it ends: the peak a fresh process reports
    at its start is only its imports, so a sub-stage that inherited its predecessor's engines and
    tensors would show it there.
    """
    out: dict[str, Any] = {"pid": os.getpid(), "peak_rss_mib": _peak_rss_mib()}
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        out["rss_mib"] = pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):  # not Linux
        out["rss_mib"] = None
    if has_cuda():
        import torch

        device = world_from_env().local_rank  # this rank's GPU, not every rank's GPU 0
        free, total = torch.cuda.mem_get_info(device)
        out |= {
            # Every process's memory on this GPU (a predecessor's engine would show here).
            "cuda_device_used_mib": (total - free) / 2**20,
            "cuda_allocated_mib": torch.cuda.memory_allocated(device) / 2**20,
            "cuda_reserved_mib": torch.cuda.memory_reserved(device) / 2**20,
            "cuda_peak_allocated_mib": torch.cuda.max_memory_allocated(device) / 2**20,
        }
    return out


# --------------------------------------------------------------------------- batches


@dataclass(frozen=True)
class Batches:
    per_device: int
    grad_accum: int


def sft_batches(global_batch: int, per_device: int, world_size: int) -> Batches:
    """Gradient accumulation = global batch / (per-device batch × processes), exactly."""
    problem = sft_batch_problem(global_batch, per_device, world_size)
    if problem:
        raise InvalidInput(problem)
    return Batches(per_device, global_batch // (per_device * world_size))


def grpo_plan(params: GRPOParams, index: int, world_size: int) -> GRPOBatchPlan:
    """:func:`visionr1_jobs.config.grpo_batch_plan`, refusing (exit 65) what cannot divide."""
    try:
        return grpo_batch_plan(params, index, world_size)
    except ValueError as exc:
        raise InvalidInput(str(exc)) from exc


def grpo_batches(
    prompts_per_step: int, num_generations: int, world_size: int, per_device: int | None
) -> Batches:
    """Split one optimizer step's ``prompts × generations`` completions over processes
    (one rollout per step; see :func:`grpo_plan` for the whole plan).

    ``per_device`` None = each process takes its whole share in one micro-batch.
    """
    params = GRPOParams(
        prompts_per_step=prompts_per_step,
        per_device_batch_size=per_device,
        ptst=[{"max_completion_length": 1, "num_generations": num_generations, "steps": 1}],
    )
    plan = grpo_plan(params, 0, world_size)
    return Batches(plan.per_device, plan.grad_accum)


# --------------------------------------------------------------------------- DeepSpeed


def deepspeed_config(mode: str, bf16: bool) -> dict[str, Any] | None:
    """A DeepSpeed config for ZeRO-2/3 whose "auto" values the HF integration fills in."""
    if mode == "none":
        return None
    stage = {"zero2": 2, "zero3": 3}[mode]
    zero: dict[str, Any] = {
        "stage": stage,
        "overlap_comm": True,
        "contiguous_gradients": True,
        "reduce_bucket_size": "auto",
    }
    if stage == 2:
        zero |= {"allgather_partitions": True, "allgather_bucket_size": 5e8, "reduce_scatter": True}
    else:
        zero |= {
            "stage3_prefetch_bucket_size": "auto",
            "stage3_param_persistence_threshold": "auto",
            "stage3_max_live_parameters": 1e9,
            "stage3_max_reuse_distance": 1e9,
            # Full weights on save, so the final folder is a plain HF checkpoint.
            "stage3_gather_16bit_weights_on_model_save": True,
        }
    return {
        "bf16": {"enabled": bf16},
        "fp16": {"enabled": False},
        "zero_optimization": zero,
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "train_batch_size": "auto",
        "train_micro_batch_size_per_gpu": "auto",
        "steps_per_print": 1_000_000,
        "wall_clock_breakdown": False,
    }


def write_deepspeed_config(mode: str, bf16: bool, folder: Path) -> str | None:
    """Generate the DeepSpeed JSON into the stage folder; None for mode "none".

    Refuses (exit 65) when DeepSpeed is asked for where it cannot run: without CUDA or without
    the package (the CPU image has neither).
    """
    cfg = deepspeed_config(mode, bf16)
    if cfg is None:
        return None
    if not has_cuda():
        raise InvalidInput(
            f"params.deepspeed is {mode!r} but no GPU is visible; DeepSpeed needs CUDA: set "
            "params.deepspeed: none for CPU runs"
        )
    if importlib.util.find_spec("deepspeed") is None:
        raise InvalidInput(
            f"params.deepspeed is {mode!r} but the deepspeed package is not installed in this "
            "image: use the GPU trainer image or set params.deepspeed: none"
        )
    path = folder / f"deepspeed-{mode}.json"
    atomic_write_json(path, cfg)
    return str(path)


# --------------------------------------------------------------------------- kernels


def check_kernels(params: Any, cuda: bool | None = None) -> None:
    """Refuse (exit 65) kernels this pod cannot run, before any process starts: Liger and
    FlashAttention need a GPU and their packages (neither is in the CPU image; flash-attn is in
    the GPU image only when built with FLASH_ATTN=1, liger-kernel not at all)."""
    cuda = has_cuda() if cuda is None else cuda
    wanted = []
    if params.use_liger_kernel:
        wanted.append(("params.useLigerKernel: true", "liger_kernel", "liger-kernel"))
    if params.attn_implementation == "flash_attention_2":
        wanted.append(("params.attnImplementation: flash_attention_2", "flash_attn", "flash-attn"))
    for setting, module, package in wanted:
        if not cuda:
            raise InvalidInput(f"{setting} needs a GPU and this pod has none; unset it on CPU")
        if importlib.util.find_spec(module) is None:
            raise InvalidInput(
                f"{setting} needs the {package} package, which this image lacks; install it in "
                "the trainer image or unset the field"
            )


def check_vllm_tensor_parallel(params: Any, world_size: int) -> None:
    """TRL groups consecutive ranks into one colocated engine: the group must divide them."""
    tp = params.vllm_tensor_parallel_size
    if world_size % tp:
        raise InvalidInput(
            f"params.vllmTensorParallelSize ({tp}) must divide the {world_size} training "
            "processes (nodes × GPUs per pod); set it to a divisor of the GPUs per pod"
        )


# --------------------------------------------------------------------------- model + processor


def load_processor(path: str, min_pixels: int | None, max_pixels: int | None) -> Any:
    """AutoProcessor with the image budget applied (Qwen2-VL style min/max pixels, which the
    image processor turns into its ``size`` shortest/longest edge)."""
    from transformers import AutoProcessor

    budget = {
        k: v for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)) if v is not None
    }
    try:
        proc = AutoProcessor.from_pretrained(path, revision=model_revision(path), **budget)
    except OSError as exc:
        raise InvalidInput(f"model {path}: cannot load its processor ({exc})") from exc
    tok = getattr(proc, "tokenizer", proc)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return proc


def load_model(
    path: str,
    bf16: bool,
    reference: str | None = None,
    attn_implementation: str | None = None,
) -> Any:
    """The image-text-to-text model in the training dtype.

    ``reference``: where TRL's GRPO builds its KL reference from (it reloads the policy's
    ``config.name_or_path``); set when the policy starts from other weights than the reference.
    ``attn_implementation``: the attention kernel (None = transformers' default); TRL builds the
    KL reference with the policy's, so both use it.
    """
    import torch
    from transformers import AutoModelForImageTextToText

    dtype = torch.bfloat16 if bf16 else torch.float32
    extra = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    try:
        model = AutoModelForImageTextToText.from_pretrained(
            path, dtype=dtype, revision=model_revision(path), **extra
        )
    except OSError as exc:
        raise InvalidInput(f"model {path}: cannot load it ({exc})") from exc
    if reference is not None:
        model.config.name_or_path = reference
    cpu_threads_for(model)
    return model


#: Below this many parameters a CPU run uses one intra-op thread (see :func:`cpu_threads_for`).
SMALL_MODEL_PARAMETERS = 50_000_000


def cpu_threads_for(model: Any) -> int | None:
    """On CPU, run a small model's ops on one thread unless OMP_NUM_THREADS says otherwise.

    A tiny model's matrix products take microseconds, so thread hand-off dominates; on a busy
    2-core machine two OpenMP threads made a 8×64·64×3000 product 100× slower (23 ms vs 0.2 ms)
    and a GRPO rollout 12× slower. Returns the thread count set, or None when left alone.
    """
    if has_cuda() or os.environ.get("OMP_NUM_THREADS"):
        return None
    if sum(p.numel() for p in model.parameters()) >= SMALL_MODEL_PARAMETERS:
        return None
    import torch

    torch.set_num_threads(1)
    return 1


def freeze_vision_tower(model: Any) -> int:
    """Freeze the vision encoder, keep its merger (the projector into the LLM) trainable.

    Returns the number of frozen parameters (0 means the model has no recognisable tower, which
    is an error for a vision-language model).
    """
    frozen = 0
    for name, param in model.named_parameters():
        parts = name.split(".")
        if ("visual" in parts or "vision_tower" in parts) and "merger" not in parts:
            param.requires_grad_(False)
            frozen += param.numel()
    if frozen == 0:
        raise InvalidInput(
            "params.freezeVisionTower: the model has no 'visual'/'vision_tower' parameters to freeze"
        )
    return frozen


def count_parameters(model: Any) -> dict[str, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"parameters": total, "trainable_parameters": trainable}


def dump_json(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=True, default=str)


def common_training_kwargs(
    params: Any, output_dir: Path, bf16: bool, deepspeed: str | None
) -> dict[str, Any]:
    """TrainingArguments shared by SFTConfig and GRPOConfig (TrainCommon params)."""
    cuda = has_cuda()
    kwargs: dict[str, Any] = {
        "output_dir": str(output_dir),
        "bf16": bf16,
        "fp16": False,
        "use_cpu": not cuda,
        "gradient_checkpointing": params.gradient_checkpointing,
        "save_strategy": "steps",
        "save_steps": params.save_steps,
        "save_total_limit": params.save_total_limit,
        "logging_steps": params.logging_steps,
        "seed": params.seed,
        # Our own callback logs into the right (nested) MLflow run on rank 0 only.
        "report_to": "none",
        "dataloader_num_workers": 0,
        "deepspeed": deepspeed,
        "use_liger_kernel": params.use_liger_kernel,
    }
    if params.gradient_checkpointing:
        kwargs["gradient_checkpointing_kwargs"] = {"use_reentrant": False}
    return kwargs


def barrier() -> None:
    """Wait for every rank (no-op outside a process group)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def publish(
    cfg: ResolvedStageConfig, manifest: StageManifest, world: World
) -> StageManifest | None:
    """Rank 0 marks the stage done; other ranks return None so the contract writes nothing for
    them.

    No barrier here: by now every collective is over (the final weights are saved), and rank 0
    may have spent minutes uploading the final model to MLflow. The other ranks exit at once
    instead of waiting on it with a collective's timeout; torchrun's agents wait for each other
    on their own store (and give up after its exit-barrier timeout without failing anything)."""
    if world.is_main:
        write_manifest(cfg, manifest)
    return manifest if world.is_main else None
