"""Cold-start SFT (method.md §5) on TRL's SFTTrainer.

Input ``data``: the filter's output (``<think>…</think><answer> Final Answer:X </answer>``
responses, no system prompt) or a dataset; input ``model``: the base model. Trains on the
completion only, with images; rows longer than ``maxLength`` tokens (text + image tokens, as the
trainer's processor counts them) are dropped before training and counted (log line, MLflow
metric ``rows_dropped_too_long``, the manifest's ``rows`` and ``extra.dropped_too_long``),
never truncated; writes ``sft/checkpoints/checkpoint-N`` every ``saveSteps`` and
resumes from the newest complete one after a restart; saves ``sft/final`` (model + processor, HF
format) atomically and logs/registers it in MLflow. Several processes or nodes: see
:mod:`visionr1_jobs.training.launch`.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from visionr1_jobs.config import ResolvedStageConfig, SFTParams
from visionr1_jobs.contract import StageManifest, read_manifest, stage_dir
from visionr1_jobs.training import checkpoints as ckpt
from visionr1_jobs.training import runtime
from visionr1_jobs.training.inputs import load_samples, model_input

log = logging.getLogger("visionr1.sft")


def run(cfg: ResolvedStageConfig) -> StageManifest | None:
    params = cfg.stage_params()
    assert isinstance(params, SFTParams)
    folder = stage_dir(cfg)
    folder.mkdir(parents=True, exist_ok=True)
    from visionr1_jobs.training.launch import launch_failed, planned_world_size, relaunch

    # Refuse bad batch arithmetic before spawning processes (their exit 65 would be lost).
    runtime.sft_batches(
        params.global_batch_size, params.per_device_batch_size, planned_world_size()
    )
    runtime.check_kernels(params)
    rc = relaunch("sft", cfg.model_dump_json(by_alias=True), folder)
    if rc is not None:
        manifest = read_manifest(cfg.workspace, cfg.output_dir)
        if rc != 0 or manifest is None:
            raise RuntimeError(launch_failed("sft", rc))
        return manifest
    return train(cfg, params, folder)


def train(cfg: ResolvedStageConfig, params: SFTParams, folder: Path) -> StageManifest | None:
    from visionr1_jobs.training.mlflow_log import log_metrics, log_model, log_params, resumable_run

    started = time.time()
    world = runtime.world_from_env()
    final = folder / "final"
    checkpoints_dir = folder / "checkpoints"
    base = model_input(cfg)
    samples, skipped = load_samples(cfg, folder / "image-cache")
    from visionr1_jobs.training.data import drop_long_sft_rows, sft_rows, to_dataset

    # Validated before anything is started: a row without a response is exit 65, not a crash.
    rows = sft_rows(samples)
    processor = runtime.load_processor(base, params.min_pixels, params.max_pixels)
    rows, dropped = drop_long_sft_rows(rows, [s.id for s in samples], processor, params.max_length)
    dataset = to_dataset(rows)
    batches = runtime.sft_batches(
        params.global_batch_size, params.per_device_batch_size, world.world_size
    )
    bf16 = runtime.use_bf16(params.bf16)
    metrics: dict[str, float] = {
        "rows": float(len(samples)),
        "rows_skipped": float(sum(skipped.values())),
        "rows_dropped_too_long": float(len(dropped)),
        "rows_trained": float(len(rows)),
    }
    extra: dict[str, Any] = {
        "world_size": world.world_size,
        "per_device_batch_size": batches.per_device,
        "gradient_accumulation_steps": batches.grad_accum,
        "bf16": bf16,
        "deepspeed": params.deepspeed,
        "base_model": base,
    }
    if dropped:
        # Every dropped row with its length, so a user can see what maxLength cost them.
        extra["dropped_too_long"] = dropped
    with resumable_run(cfg, folder) as run:
        run_id = run.info.run_id if run is not None else None
        if run_id:
            log_params(
                run_id,
                cfg,
                {f"derived.{k}": v for k, v in extra.items() if k != "dropped_too_long"},
            )
            log_metrics(
                run_id,
                cfg,
                {k: metrics[k] for k in ("rows_dropped_too_long", "rows_trained")},
            )
        if ckpt.is_complete_model(final):
            log.warning(
                "sft: %s is already complete (a previous attempt died after saving it)", final
            )
            # what that attempt trained, as it saved it beside the weights
            metrics.update(_saved_state(final))
        else:
            result = _fit(
                cfg,
                params,
                dataset,
                base,
                processor,
                checkpoints_dir,
                final,
                batches,
                bf16,
                world,
                run_id,
            )
            metrics.update(result)
        if run_id:
            extra |= log_model(run_id, cfg, final, params.register_model)
    manifest = StageManifest(
        stage="sft",
        outputs={"model": f"{cfg.output_dir}/final"},
        rows={"train": len(rows), "dropped_too_long": len(dropped)},
        metrics=metrics,
        mlflow_run_id=run_id,
        started_at=started,
        extra=extra,
    )
    return runtime.publish(cfg, manifest, world)


TRAINER_STATE = "trainer_state.json"


def _saved_state(final: Path) -> dict[str, float]:
    """global_step of a final model saved by an earlier attempt (none from an older image)."""
    path = final / TRAINER_STATE
    if not path.exists():
        return {}
    return {"global_step": float(json.loads(path.read_text())["global_step"])}


def _fit(
    cfg: ResolvedStageConfig,
    params: SFTParams,
    dataset: Any,
    base: str,
    processor: Any,
    checkpoints_dir: Path,
    final: Path,
    batches: runtime.Batches,
    bf16: bool,
    world: runtime.World,
    run_id: str | None,
) -> dict[str, float]:
    import torch
    from trl import SFTConfig, SFTTrainer

    from visionr1_jobs.training.callbacks import MlflowMetrics, ProgressLines

    ds_path = runtime.write_deepspeed_config(params.deepspeed, bf16, final.parent)
    # The config comes first: with ZeRO-3 it makes from_pretrained partition the weights.
    args = SFTConfig(
        **runtime.common_training_kwargs(params, checkpoints_dir, bf16, ds_path),
        learning_rate=params.learning_rate,
        lr_scheduler_type=params.lr_scheduler,
        warmup_steps=params.warmup_ratio,  # a float below 1 is a share of the total steps
        num_train_epochs=params.epochs,
        max_steps=params.max_steps or -1,
        per_device_train_batch_size=batches.per_device,
        gradient_accumulation_steps=batches.grad_accum,
        weight_decay=params.weight_decay,
        # Rows over params.maxLength were dropped above; None means TRL never cuts a sequence,
        # so no answer can be lost to truncation even if a count were off.
        max_length=None,
        completion_only_loss=True,
    )
    resume = ckpt.resume_point(checkpoints_dir, world.is_main, "sft")
    model = runtime.load_model(
        ckpt.starting_weights(base, resume), bf16, attn_implementation=params.attn_implementation
    )
    if params.freeze_vision_tower:
        runtime.freeze_vision_tower(model)
    callbacks: list[Any] = [ProgressLines("sft")]
    if run_id:
        callbacks.append(MlflowMetrics(cfg, {run_id: 0}))
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        processing_class=processor,
        callbacks=callbacks,
    )
    t0 = time.time()
    result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    seconds = time.time() - t0

    def write(tmp: Path) -> None:
        trainer.save_model(str(tmp))
        if world.is_main:
            processor.save_pretrained(str(tmp))
            # the step the weights are from, for an attempt that finds them already saved
            trainer.state.save_to_json(str(tmp / TRAINER_STATE))

    ckpt.save_final_atomically(final, write, world.is_main)
    out = {k: float(v) for k, v in (result.metrics or {}).items() if isinstance(v, int | float)}
    out["global_step"] = float(trainer.state.global_step)
    out["train_seconds_this_attempt"] = seconds
    out.update(runtime.count_parameters(model))
    out["cpu_threads"] = float(torch.get_num_threads()) if not runtime.has_cuda() else 0.0
    if resume is not None:
        out["resumed_from_step"] = float(ckpt.checkpoint_step(resume) or 0)
    return out
