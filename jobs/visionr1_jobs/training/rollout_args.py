"""The GRPOConfig arguments that size a PTST sub-stage's rollouts: micro-batches and gradient
accumulation, the generation batch and its reuse, and the colocated vLLM engine TRL builds.

Pure (no torch, no TRL import), so the tests check each field against the installed TRL's
GRPOConfig without a GPU or vLLM. Names are TRL 1.16's (``steps_per_generation``,
``num_iterations``, ``vllm_max_model_length``, ``vllm_enable_sleep_mode``,
``vllm_tensor_parallel_size``).
"""

from __future__ import annotations

from typing import Any

from visionr1_jobs.config import GRPOBatchPlan, GRPOParams


def vllm_max_model_length(params: GRPOParams, index: int) -> int:
    """Context the rollout engine needs for sub-stage ``index``: the longest prompt kept
    (``maxPromptLength``; longer ones are dropped) plus the sub-stage's completion budget."""
    return params.max_prompt_length + params.ptst[index].max_completion_length


def grpo_rollout_kwargs(
    params: GRPOParams, index: int, plan: GRPOBatchPlan, vllm_mode: str | None
) -> dict[str, Any]:
    """GRPOConfig keyword arguments for PTST row ``index`` (0-based) under ``plan``.

    ``steps_per_generation`` is TRL's count of micro-steps per rollout, so one rollout feeds
    ``plan.steps_per_rollout`` optimizer steps (times ``num_iterations`` passes). vLLM's engine
    settings apply to the colocated engine only; a ``vllm_server`` is sized where it is started.
    """
    row = params.ptst[index]
    kwargs: dict[str, Any] = {
        "num_generations": row.num_generations,
        "max_completion_length": row.max_completion_length,
        "per_device_train_batch_size": plan.per_device,
        "gradient_accumulation_steps": plan.grad_accum,
        "steps_per_generation": plan.steps_per_generation,
        "num_iterations": params.num_iterations,
        "use_vllm": vllm_mode is not None,
    }
    if vllm_mode is None:
        return kwargs
    kwargs["vllm_mode"] = vllm_mode
    if vllm_mode == "server":
        kwargs["vllm_server_base_url"] = params.vllm_server_url
        return kwargs
    # TRL sizes the colocated engine's max_num_seqs as per_device × tensor parallel ×
    # steps_per_generation: each engine takes its processes' whole rollout at once.
    return kwargs | {
        "vllm_gpu_memory_utilization": params.vllm_gpu_memory_utilization,
        "vllm_max_model_length": vllm_max_model_length(params, index),
        "vllm_enable_sleep_mode": params.vllm_enable_sleep_mode,
        "vllm_tensor_parallel_size": params.vllm_tensor_parallel_size,
    }
