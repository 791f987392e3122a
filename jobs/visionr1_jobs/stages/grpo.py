"""GRPO with Progressive Thinking Suppression and the hard formatting result reward
(method.md §6), on TRL's GRPOTrainer.

Each row of ``params.ptst`` runs as a sub-stage ``grpo/stage-N`` (its budget, samples per
prompt and steps), starting from the previous sub-stage's final weights and logging into its own
MLflow run nested under the GRPO stage run. The KL reference is the GRPO input model throughout
(``resetReferenceEachStage`` makes it each sub-stage's start).

Every sub-stage trains in processes of its own: the stage program (the pod's PID 1) starts the
same program again per sub-stage, under torchrun with the pod's world when it has several
processes, and waits for it. When a sub-stage's processes exit, its DeepSpeed engine, colocated
vLLM engine, CUDA memory and process group go with them, so sub-stage 2 starts on a clean
device (an in-process trainer left the first engine beside the second). Each sub-stage records
its pid and memory at start and end in its done marker.

A finished sub-stage leaves ``stage-N/_done.json`` and is never redone; an interrupted one
resumes from its newest complete checkpoint. Sub-stages continue through the prompts: sub-stage
k takes the ones after sub-stage k-1's last (training.prompt_order), and samples with seed
``seed + k - 1``.

Outputs: ``{"model": "grpo/stage-K/final", "stage-1": "grpo/stage-1/final", …}`` and the PTST
summary (``grpo/ptst_summary.json`` + ``.png``, also MLflow artifacts); the manifest's
``extra.prompt_order`` holds each sub-stage's first and last prompt.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import time
from pathlib import Path
from typing import Any

from visionr1_jobs.config import GRPOParams, PTSTStage, ResolvedStageConfig
from visionr1_jobs.contract import InvalidInput, StageManifest, stage_dir
from visionr1_jobs.training import checkpoints as ckpt
from visionr1_jobs.training import prompt_order, ptst, runtime
from visionr1_jobs.training.inputs import model_input

log = logging.getLogger("visionr1.grpo")

#: Set by the stage program on the processes it starts for one sub-stage (1-based index), and
#: the GRPO stage's MLflow run id for the sub-stage's nested run (empty off the lead pod).
SUBSTAGE_ENV = "VISIONR1_PTST_SUBSTAGE"
STAGE_RUN_ENV = "VISIONR1_GRPO_RUN_ID"


def run(cfg: ResolvedStageConfig) -> StageManifest | None:
    params = cfg.stage_params()
    assert isinstance(params, GRPOParams)
    folder = stage_dir(cfg)
    folder.mkdir(parents=True, exist_ok=True)
    assigned = os.environ.get(SUBSTAGE_ENV)
    if assigned:
        index = int(assigned)
        if not 1 <= index <= len(params.ptst):
            raise InvalidInput(f"{SUBSTAGE_ENV}={assigned} is outside 1..{len(params.ptst)}")
        train_substage(cfg, params, folder, index, os.environ.get(STAGE_RUN_ENV) or None)
        return None  # the stage program that started this one writes the manifest
    from visionr1_jobs.training.launch import planned_world_size, under_torchrun

    if under_torchrun():
        raise InvalidInput(
            "the grpo stage starts its own processes for each PTST sub-stage (under torchrun "
            "when VISIONR1_NPROC_PER_NODE / VISIONR1_NNODES ask for several); run it as "
            "`python -m visionr1_jobs grpo --config FILE`, not under torchrun"
        )
    world_size = planned_world_size()
    for index in range(len(params.ptst)):  # refuse impossible splits before spawning processes
        runtime.grpo_plan(params, index, world_size)
    runtime.check_kernels(params)
    if rollout_mode(params) == "colocate":
        runtime.check_vllm_tensor_parallel(params, world_size)
    # Before any process starts: a sub-stage already (partly) trained under other settings is
    # refused here, so its exit 65 is the stage's (see training.ptst).
    ptst.check_rows(folder, ptst.plan_rows(params, folder, model_input(cfg)))
    return run_substages(cfg, params, folder, world_size)


def rollout_mode(params: GRPOParams) -> str | None:
    """The vLLM mode for TRL ("colocate"/"server"), or None for transformers generate.

    vLLM is only looked up (never imported here): TRL imports it when asked to use it.
    """
    have_vllm = importlib.util.find_spec("vllm") is not None
    if params.rollout == "transformers":
        return None
    if params.rollout == "auto":
        return "colocate" if have_vllm and runtime.has_cuda() else None
    if not have_vllm:
        raise InvalidInput(
            f"params.rollout is {params.rollout!r} but vLLM is not installed in this image; use "
            "the GPU trainer image or rollout: transformers"
        )
    if params.rollout == "vllm_colocate":
        if not runtime.has_cuda():
            raise InvalidInput(
                "params.rollout 'vllm_colocate' needs a GPU; use rollout: transformers on CPU"
            )
        return "colocate"
    return "server"


def _data_rows(
    cfg: ResolvedStageConfig, params: GRPOParams, folder: Path
) -> tuple[list[dict[str, Any]], int]:
    from visionr1_jobs.training.data import grpo_rows
    from visionr1_jobs.training.inputs import load_samples

    if "data" not in cfg.inputs:
        raise InvalidInput("params.dataset is required for the grpo stage (the RL problems)")
    samples, skipped = load_samples(cfg, folder / "image-cache", ref=params.dataset)
    return grpo_rows(samples, params.system_prompt), sum(skipped.values())


def run_substages(
    cfg: ResolvedStageConfig, params: GRPOParams, folder: Path, world_size: int
) -> StageManifest | None:
    """Train each unfinished sub-stage in its own processes, in order; then (on the lead pod)
    the PTST summary, the final model in MLflow and the stage manifest.

    Every pod of a multi-node job runs this loop, each starting its share of the sub-stage's
    torchrun world; the lead pod (node rank 0, whose rank 0 writes the done markers) also logs
    and publishes. Nothing here touches a GPU.
    """
    from visionr1_jobs.training.launch import launch_child, launch_failed
    from visionr1_jobs.training.mlflow_log import (
        log_params,
        resumable_run,
    )

    started = time.time()
    lead = int(os.environ.get("JOB_COMPLETION_INDEX", "0") or 0) == 0
    vllm_mode = rollout_mode(params)
    launcher = "torchrun" if world_size > 1 else "the sub-stage's process"
    config_json = cfg.model_dump_json(by_alias=True)
    records: list[dict[str, Any]] = []
    ctx = resumable_run(cfg, folder) if lead else contextlib.nullcontext(None)
    with ctx as run:  # a failure below ends the stage run FAILED
        grpo_run_id = run.info.run_id if run is not None else None
        if grpo_run_id:
            log_params(
                grpo_run_id,
                cfg,
                {
                    "derived.world_size": world_size,
                    "derived.rollout": vllm_mode or "transformers",
                    "derived.source_model": model_input(cfg),
                },
            )
        for index in range(1, len(params.ptst) + 1):
            name = ptst.substage_name(index)
            record = ptst.read_done(folder / name)
            if record is not None:
                log.warning("grpo: %s already finished; not redoing it", name)
            else:
                env = {SUBSTAGE_ENV: str(index), STAGE_RUN_ENV: grpo_run_id or ""}
                rc = launch_child("grpo", config_json, folder, env)
                record = ptst.read_done(folder / name)
                if rc != 0 or record is None:
                    raise RuntimeError(launch_failed(f"grpo/{name}", rc, launcher))
            records.append(record)
        if not lead:
            return None
        return _publish(cfg, params, folder, records, run, started, vllm_mode, world_size)


def _publish(
    cfg: ResolvedStageConfig,
    params: GRPOParams,
    folder: Path,
    records: list[dict[str, Any]],
    run: Any,
    started: float,
    vllm_mode: str | None,
    world_size: int,
) -> StageManifest:
    from visionr1_jobs.training.mlflow_log import log_artifact, log_metrics, log_model

    last = len(params.ptst)
    outputs = {"model": f"{cfg.output_dir}/{ptst.substage_name(last)}/final"}
    for index in range(1, last + 1):
        name = ptst.substage_name(index)
        outputs[name] = f"{cfg.output_dir}/{name}/final"
    # Every sub-stage prepares the same prompts; the newest marker that counted them says how.
    counts: dict[str, float] = next(
        (dict(r["data_counts"]) for r in reversed(records) if "data_counts" in r), {}
    )
    metrics = {k: float(v) for k, v in counts.items()}
    for rec in records:
        for key, value in rec.get("metrics", {}).items():
            metrics[f"{rec['name']}/{key}"] = float(value)
    extra: dict[str, Any] = {
        "rollout": vllm_mode or "transformers",
        "world_size": world_size,
        "bf16": bool(records[-1].get("bf16", False)),
        "prompt_order": {r["name"]: r["prompt_order"] for r in records if "prompt_order" in r},
    }
    json_path, png_path = ptst.write_summary(folder, records)
    extra["ptst_summary"] = f"{cfg.output_dir}/{json_path.name}"
    if run is not None:
        rid = run.info.run_id
        log_metrics(rid, cfg, {k.replace("/", "."): v for k, v in metrics.items()})
        log_artifact(rid, cfg, json_path)
        log_artifact(rid, cfg, png_path)
        extra |= log_model(
            rid, cfg, folder / ptst.substage_name(last) / "final", params.register_model
        )
    return StageManifest(
        stage="grpo",
        outputs=outputs,
        rows={k: int(v) for k, v in counts.items() if k in ("prompts", "prompts_dropped_too_long")},
        metrics=metrics,
        mlflow_run_id=run.info.run_id if run is not None else None,
        started_at=started,
        extra=extra,
    )


def train_substage(
    cfg: ResolvedStageConfig,
    params: GRPOParams,
    folder: Path,
    index: int,
    grpo_run_id: str | None,
) -> None:
    """One sub-stage, in the processes started for it: prepare the prompts, take this
    sub-stage's span of the prompt stream, train to the done marker."""
    from visionr1_jobs.training.data import drop_long_prompts, to_dataset

    at_start = runtime.process_memory()
    world = runtime.world_from_env()
    name = ptst.substage_name(index)
    sub_dir = folder / name
    if ptst.read_done(sub_dir) is not None:
        log.warning("grpo: %s already finished; not redoing it", name)
        return
    source = model_input(cfg)
    planned = ptst.plan_rows(params, folder, source)
    ptst.check_rows(folder, planned)  # again on every rank (also when started by hand)
    rows, skipped = _data_rows(cfg, params, folder)
    processor = runtime.load_processor(source, params.min_pixels, params.max_pixels)
    rows, dropped = drop_long_prompts(rows, processor, params.max_prompt_length)
    if not rows:
        raise InvalidInput(
            f"params.maxPromptLength ({params.max_prompt_length}) leaves no prompt: all {dropped} "
            "are longer (see the warning above for the longest); raise it"
            if dropped
            else "params.dataset has no usable prompts"
        )
    row = params.ptst[index - 1]
    steps_before = [r.steps for r in params.ptst[: index - 1]]
    span = prompt_order.span(
        len(rows),
        params.seed,
        prompt_order.substage_start(params, index - 1),
        prompt_order.prompts_taken(params, index - 1),
    )
    # The trainer keeps this order (shuffle_dataset off): rollout r generates for rows
    # r × promptsPerRollout onwards.
    dataset = to_dataset(rows).select(list(span.indices))
    bf16 = runtime.use_bf16(params.bf16)
    record = _substage(
        cfg,
        params,
        index,
        row,
        planned[index - 1],
        sub_dir,
        dataset,
        processor,
        bf16,
        rollout_mode(params),
        world,
        grpo_run_id,
        sum(steps_before),
        {
            "prompt_order": span.record([r["id"] for r in rows]),
            "data_counts": {
                "prompts": len(rows),
                "prompts_dropped_too_long": dropped,
                "rows_skipped_unusable": skipped,
            },
            "bf16": bf16,
            "world_size": world.world_size,
            "process_at_start": at_start,
        },
    )
    if world.is_main:
        ptst.write_done(sub_dir, record | {"process_at_end": runtime.process_memory()})
    runtime.barrier()


def _substage(
    cfg: ResolvedStageConfig,
    params: GRPOParams,
    index: int,
    row: PTSTStage,
    planned: dict[str, Any],
    sub_dir: Path,
    dataset: Any,
    processor: Any,
    bf16: bool,
    vllm_mode: str | None,
    world: runtime.World,
    grpo_run_id: str | None,
    steps_before: int,
    facts: dict[str, Any],
) -> dict[str, Any]:
    """Train one PTST sub-stage to its final weights (resuming from its last checkpoint) and
    return its done record; ``facts`` (its prompts, data counts, process) go into the record.

    The hand-off: the policy starts from the row's ``start_model`` (the GRPO input for stage-1,
    else the previous sub-stage's final weights) and the KL reference is its
    ``reference_model`` (the GRPO input, or the start with ``resetReferenceEachStage``), as
    :func:`ptst.plan_rows` decides.
    """
    import torch
    from trl import GRPOConfig, GRPOTrainer

    from visionr1_jobs.training.callbacks import MlflowMetrics, ProgressLines, RewardSignalWatch
    from visionr1_jobs.training.mlflow_log import log_params, resumable_run
    from visionr1_jobs.training.rewards import reward_functions
    from visionr1_jobs.training.rollout_args import grpo_rollout_kwargs

    name = ptst.substage_name(index)
    label = f"grpo/{name}"
    sub_dir.mkdir(parents=True, exist_ok=True)
    checkpoints_dir = sub_dir / "checkpoints"
    final = sub_dir / "final"
    plan = runtime.grpo_plan(params, index - 1, world.world_size)
    start, reference = planned["start_model"], planned["reference_model"]
    # Sub-stage k samples with its own seed, so its rollouts are no replay of stage k-1's.
    seed = params.seed + index - 1
    if world.is_main:
        ptst.write_row(sub_dir, planned)
    record: dict[str, Any] = {
        "row": planned,
        "name": name,
        "index": index,
        "max_completion_length": row.max_completion_length,
        "num_generations": row.num_generations,
        "steps": row.steps,
        "start_model": start,
        "reference_model": reference,
        "per_device_batch_size": plan.per_device,
        "gradient_accumulation_steps": plan.grad_accum,
        "steps_per_rollout": plan.steps_per_rollout,
        "num_iterations": params.num_iterations,
        "rollout_completions": plan.generation_batch_size,
        "rollout_completions_per_process": plan.rollout_per_process,
        "trainer_seed": seed,
    }
    order = facts["prompt_order"]
    with resumable_run(cfg, sub_dir, name, nested_under=grpo_run_id) as run:
        run_id = run.info.run_id if run is not None else None
        if run_id:
            log_params(
                run_id,
                cfg,
                {f"ptst.{k}": v for k, v in record.items() if k != "row"}
                | planned
                | {f"prompts.{k}": v for k, v in order.items()},
            )
        watch = RewardSignalWatch()
        if ckpt.is_complete_model(final):
            log.warning("%s: final weights already saved by an earlier attempt", label)
            resume = None
        else:
            funcs, weights = reward_functions(params.reward, params.verify_timeout_s)
            ds_path = runtime.write_deepspeed_config(params.deepspeed, bf16, sub_dir)
            # The config comes before the model: with ZeRO-3 it makes from_pretrained partition.
            args = GRPOConfig(
                **runtime.common_training_kwargs(params, checkpoints_dir, bf16, ds_path)
                | {"seed": seed},
                # The dataset holds this sub-stage's span of the prompt stream, in order.
                shuffle_dataset=False,
                learning_rate=params.learning_rate,
                # Every sub-stage starts a fresh Adam: without a warmup its first bias-corrected
                # steps move each weight by about the full learning rate at once.
                lr_scheduler_type="constant_with_warmup" if params.warmup_steps else "constant",
                warmup_steps=min(params.warmup_steps, row.steps),
                max_steps=row.steps,
                beta=params.beta,
                epsilon=params.epsilon,
                loss_type=params.loss_type,
                temperature=params.temperature,
                top_p=params.top_p,
                reward_weights=weights,
                remove_unused_columns=False,
                log_completions=False,
                # Batches, rollout size and reuse, the colocated vLLM engine.
                **grpo_rollout_kwargs(params, index - 1, plan, vllm_mode),
            )
            # The policy starts from the previous sub-stage; TRL builds the KL reference from
            # config.name_or_path, which load_model points at the reference.
            resume = ckpt.resume_point(checkpoints_dir, world.is_main, label)
            model = runtime.load_model(
                ckpt.starting_weights(start, resume),
                bf16,
                reference=reference,
                attn_implementation=params.attn_implementation,
            )
            if params.freeze_vision_tower:
                runtime.freeze_vision_tower(model)
            callbacks: list[Any] = [ProgressLines(label), watch]
            # A sub-stage that started while MLflow was down has no run of its own (nothing to
            # resume): its curve still goes into the GRPO stage run.
            targets = {rid: off for rid, off in ((run_id, 0), (grpo_run_id, steps_before)) if rid}
            if targets:
                callbacks.append(MlflowMetrics(cfg, targets))
            trainer = GRPOTrainer(
                model=model,
                reward_funcs=funcs,
                args=args,
                train_dataset=dataset,
                processing_class=processor,
                callbacks=callbacks,
            )
            t0 = time.time()
            trainer.train(resume_from_checkpoint=str(resume) if resume else None)
            record["train_seconds_last_attempt"] = time.time() - t0
            record["cpu_threads"] = None if runtime.has_cuda() else torch.get_num_threads()

            def write(tmp: Path) -> None:
                trainer.save_model(str(tmp))
                if world.is_main:
                    processor.save_pretrained(str(tmp))
                    # The sub-stage's step history travels with its weights (PTST summary).
                    trainer.state.save_to_json(str(tmp / "trainer_state.json"))

            ckpt.save_final_atomically(final, write, world.is_main)
        history = _history(final)
        series = ptst.step_series(history)
        record |= {
            "resumed_from": resume.name if resume is not None else None,
            "zero_signal_steps": watch.zero_signal_steps,
            "series": series,
            "metrics": ptst.aggregate(series),
            "mlflow_run_id": run_id,
            "finished_at": time.time(),
        }
        record |= facts
    return record


def _history(final: Path) -> list[dict[str, Any]]:
    import json

    path = final / "trainer_state.json"
    if not path.exists():
        return []
    return list(json.loads(path.read_text()).get("log_history", []))
