"""Trainer callbacks: metrics into an MLflow run, progress lines, and the zero-signal warning."""

from __future__ import annotations

import logging
from typing import Any

from transformers import TrainerCallback

from visionr1_jobs.config import ResolvedStageConfig
from visionr1_jobs.contract import progress
from visionr1_jobs.training.mlflow_log import log_metrics

log = logging.getLogger(__name__)

# The per-step figures worth a progress line (the operator surfaces the latest one).
_PROGRESS_KEYS = (
    "loss",
    "reward",
    "reward_std",
    "rewards/format/mean",
    "rewards/accuracy/mean",
    "completions/mean_length",
    "completions/clipped_ratio",
)


class MlflowMetrics(TrainerCallback):
    """Every numeric value the trainer logs goes into each target run at the trainer's global
    step (plus that target's offset).

    Attached on global rank 0 only. Uses MLflow's client with explicit run ids (not the fluent
    active run), so a PTST sub-stage logs into its own nested run and, offset by the steps of
    the sub-stages before it, into the GRPO stage run (one RL curve across sub-stages).
    """

    def __init__(self, cfg: ResolvedStageConfig, targets: dict[str, int]) -> None:
        self.cfg = cfg
        self.targets = targets  # run id -> step offset

    def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        # The steps the trainer plans (the operator shows step/total and an ETA from them).
        if state.is_world_process_zero and state.max_steps:
            for run_id, offset in self.targets.items():
                total = {"total_steps": state.max_steps + offset}
                log_metrics(run_id, self.cfg, total, step=state.global_step + offset)

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kw: Any
    ) -> None:
        if logs and state.is_world_process_zero:
            for run_id, offset in self.targets.items():
                log_metrics(run_id, self.cfg, logs, step=state.global_step + offset)


class ProgressLines(TrainerCallback):
    """``VISIONR1_PROGRESS`` lines on stderr (rank 0) after each logged step."""

    def __init__(self, label: str, **extra: Any) -> None:
        self.label = label
        self.extra = extra

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kw: Any
    ) -> None:
        if not state.is_world_process_zero or not logs:
            return
        picked = {
            k: round(float(v), 4)
            for k, v in logs.items()
            if k in _PROGRESS_KEYS and isinstance(v, int | float)
        }
        progress(self.label, state.global_step, state.max_steps or None, **self.extra, **picked)


class RewardSignalWatch(TrainerCallback):
    """Warns when a whole step's rewards had zero spread: every prompt group scored all its
    completions alike, so every advantage is 0 and the step teaches nothing.

    TRL logs ``frac_reward_zero_std`` (share of groups with zero std) and ``reward_std``.
    """

    def __init__(self) -> None:
        self.zero_signal_steps: list[int] = []

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kw: Any
    ) -> None:
        if not logs or "frac_reward_zero_std" not in logs:
            return
        frac = logs.get("frac_reward_zero_std")
        if frac is not None and frac >= 1.0 - 1e-9:
            self.zero_signal_steps.append(state.global_step)
            if state.is_world_process_zero:
                log.warning(
                    "step %d: reward std is 0 in every prompt group (mean reward %.3f): all "
                    "advantages are 0, nothing is being learned. Check the reward, the completion "
                    "budget and the data's difficulty.",
                    state.global_step,
                    float(logs.get("reward") or 0.0),
                )
