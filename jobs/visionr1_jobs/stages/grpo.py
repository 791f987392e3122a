"""GRPO with Progressive Thinking Suppression and the hard formatting result reward
(method.md §6), on TRL's GRPOTrainer.

Each row of ``params.ptst`` runs as a sub-stage ``grpo/stage-N`` (its budget, samples per
prompt and steps), starting from the previous sub-stage's final weights and logging into its own
MLflow run nested under the GRPO stage run. A finished sub-stage leaves ``stage-N/_done.json`` and
is never redone; an interrupted one resumes from its newest complete checkpoint. The KL reference
is the GRPO input model throughout (``resetReferenceEachStage`` makes it each sub-stage's start).

Outputs: ``{"model": "grpo/stage-K/final", "stage-1": "grpo/stage-1/final", …}`` and the PTST
summary (``grpo/ptst_summary.json`` + ``.png``, also MLflow artifacts).
"""

from __future__ import annotations

import importlib.util
import logging
import time
from pathlib import Path
from typing import Any

from visionr1_jobs.config import GRPOParams, PTSTStage, ResolvedStageConfig
from visionr1_jobs.contract import (
    InvalidInput,
    StageManifest,
    read_manifest,
    stage_dir,
)
from visionr1_jobs.training import checkpoints as ckpt
from visionr1_jobs.training import ptst, runtime
from visionr1_jobs.training.inputs import model_input

log = logging.getLogger("visionr1.grpo")


def run(cfg: ResolvedStageConfig) -> StageManifest | None:
    params = cfg.stage_params()
    assert isinstance(params, GRPOParams)
    folder = stage_dir(cfg)
    folder.mkdir(parents=True, exist_ok=True)
    from visionr1_jobs.training.launch import launch_failed, planned_world_size, relaunch

    world_size = planned_world_size()
    for index in range(len(params.ptst)):  # refuse impossible splits before spawning processes
        runtime.grpo_plan(params, index, world_size)
    runtime.check_kernels(params)
    if rollout_mode(params) == "colocate":
        runtime.check_vllm_tensor_parallel(params, world_size)
    # Before any process starts: a sub-stage already (partly) trained under other settings is
    # refused here, so its exit 65 is the stage's (see training.ptst).
    ptst.check_rows(folder, ptst.plan_rows(params, folder, model_input(cfg)))
    rc = relaunch("grpo", cfg.model_dump_json(by_alias=True), folder)
    if rc is not None:
        manifest = read_manifest(cfg.workspace, cfg.output_dir)
        if rc != 0 or manifest is None:
            raise RuntimeError(launch_failed("grpo", rc))
        return manifest
    return train(cfg, params, folder)


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


def train(cfg: ResolvedStageConfig, params: GRPOParams, folder: Path) -> StageManifest | None:
    from visionr1_jobs.training.data import drop_long_prompts, to_dataset
    from visionr1_jobs.training.mlflow_log import (
        log_artifact,
        log_metrics,
        log_model,
        log_params,
        resumable_run,
    )

    started = time.time()
    world = runtime.world_from_env()
    source = model_input(cfg)
    rows, skipped = _data_rows(cfg, params, folder)
    processor = runtime.load_processor(source, params.min_pixels, params.max_pixels)
    rows, dropped = drop_long_prompts(rows, processor, params.max_prompt_length)
    dataset = to_dataset(rows)
    bf16 = runtime.use_bf16(params.bf16)
    vllm_mode = rollout_mode(params)
    counts = {
        "prompts": float(len(rows)),
        "prompts_dropped_too_long": float(dropped),
        "rows_skipped_unusable": float(skipped),
    }

    # The stage run is ended before the sub-stages start: MLflow's fluent API cannot start a
    # second top-level run while one is active, and each sub-stage is its own (nested) run.
    with resumable_run(cfg, folder) as run:
        grpo_run_id = run.info.run_id if run is not None else None
        if grpo_run_id:
            log_params(
                grpo_run_id,
                cfg,
                {
                    "derived.world_size": world.world_size,
                    "derived.bf16": bf16,
                    "derived.rollout": vllm_mode or "transformers",
                    "derived.source_model": source,
                },
            )
            log_metrics(grpo_run_id, cfg, counts)

    rows_planned = ptst.plan_rows(params, folder, source)
    ptst.check_rows(folder, rows_planned)  # again on every rank (also when run without run())
    done_records: list[dict[str, Any]] = []
    start = source
    steps_before = 0
    try:
        for index, row in enumerate(params.ptst, start=1):
            sub_dir = folder / ptst.substage_name(index)
            record = ptst.read_done(sub_dir)
            if record is None:
                record = _substage(
                    cfg,
                    params,
                    index,
                    row,
                    rows_planned[index - 1],
                    sub_dir,
                    start,
                    source,
                    dataset,
                    processor,
                    bf16,
                    vllm_mode,
                    world,
                    grpo_run_id,
                    steps_before,
                )
            else:
                log.warning("grpo: %s already finished; not redoing it", sub_dir.name)
            done_records.append(record)
            start = str(sub_dir / "final")
            steps_before += row.steps
    except BaseException:
        if grpo_run_id:
            from visionr1_jobs.tracking import outbox

            outbox(cfg).terminated(grpo_run_id, "FAILED")
        raise

    outputs = {"model": f"{cfg.output_dir}/{ptst.substage_name(len(params.ptst))}/final"}
    for index in range(1, len(params.ptst) + 1):
        name = ptst.substage_name(index)
        outputs[name] = f"{cfg.output_dir}/{name}/final"
    metrics = dict(counts)
    for rec in done_records:
        for key, value in rec.get("metrics", {}).items():
            metrics[f"{rec['name']}/{key}"] = float(value)
    extra: dict[str, Any] = {
        "rollout": vllm_mode or "transformers",
        "world_size": world.world_size,
        "bf16": bf16,
    }
    json_path = png_path = None
    if world.is_main:
        json_path, png_path = ptst.write_summary(folder, done_records)
        extra["ptst_summary"] = f"{cfg.output_dir}/{json_path.name}"
    with resumable_run(cfg, folder) as run:
        if run is not None and json_path and png_path:
            rid = run.info.run_id
            log_metrics(rid, cfg, {k.replace("/", "."): v for k, v in metrics.items()})
            log_artifact(rid, cfg, json_path)
            log_artifact(rid, cfg, png_path)
            extra |= log_model(
                rid,
                cfg,
                folder / ptst.substage_name(len(params.ptst)) / "final",
                params.register_model,
            )
    manifest = StageManifest(
        stage="grpo",
        outputs=outputs,
        rows={"prompts": len(rows), "prompts_dropped_too_long": dropped},
        metrics=metrics,
        mlflow_run_id=grpo_run_id,
        started_at=started,
        extra=extra,
    )
    return runtime.publish(cfg, manifest, world)


def _substage(
    cfg: ResolvedStageConfig,
    params: GRPOParams,
    index: int,
    row: PTSTStage,
    planned: dict[str, Any],
    sub_dir: Path,
    start: str,
    source: str,
    dataset: Any,
    processor: Any,
    bf16: bool,
    vllm_mode: str | None,
    world: runtime.World,
    grpo_run_id: str | None,
    steps_before: int,
) -> dict[str, Any]:
    """Train one PTST sub-stage to its done marker (resuming from its last checkpoint)."""
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
    reference = start if params.reset_reference_each_stage else source
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
    }
    with resumable_run(cfg, sub_dir, name, nested_under=grpo_run_id) as run:
        run_id = run.info.run_id if run is not None else None
        if run_id:
            log_params(
                run_id, cfg, {f"ptst.{k}": v for k, v in record.items() if k != "row"} | planned
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
                **runtime.common_training_kwargs(params, checkpoints_dir, bf16, ds_path),
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
        if world.is_main:
            ptst.write_done(sub_dir, record)
    runtime.barrier()
    return record


def _history(final: Path) -> list[dict[str, Any]]:
    import json

    path = final / "trainer_state.json"
    if not path.exists():
        return []
    return list(json.loads(path.read_text()).get("log_history", []))
