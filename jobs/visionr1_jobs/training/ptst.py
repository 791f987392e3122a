"""Progressive Thinking Suppression Training bookkeeping: sub-stage folders, the row each
sub-stage trains with, done markers, and the per-run summary (accuracy and completion length per
sub-stage) as JSON and a plot.

A sub-stage's *row* is everything that decides what it trains: its PTST table row (budget,
samples per prompt, steps), the GRPO settings shared by all rows (learning rate, β, clip, loss,
reward, sampling, batch) and the models it starts from and is held to (KL reference). It is
written to ``stage-N/_row.json`` before the sub-stage trains and kept in its done marker; a
resumed run whose rows differ is refused (exit 65) naming the field, because reusing a finished
or half-trained sub-stage under other settings would silently mix two recipes.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from visionr1_jobs.contract import InvalidInput, atomic_savefig, atomic_write_json

DONE = "_done.json"
ROW = "_row.json"

#: The PTST table's own fields, then the GRPO params every sub-stage trains with.
TABLE_FIELDS = ("max_completion_length", "num_generations", "steps")
SHARED_FIELDS = (
    "learning_rate",
    "beta",
    "epsilon",
    "loss_type",
    "reward",
    "temperature",
    "top_p",
    "prompts_per_step",
    "prompts_per_rollout",
    "num_iterations",
    "per_device_batch_size",
    "max_prompt_length",
    "system_prompt",
    "seed",
    "reset_reference_each_stage",
)
MODEL_FIELDS = {
    "start_model": "the weights it starts from (the GRPO input for stage-1, else the previous "
    "sub-stage's final weights)",
    "reference_model": "its KL reference (the GRPO input, or its own start with "
    "resetReferenceEachStage)",
}

# TRL's log keys → the summary's names.
SERIES = {
    "reward": "reward",
    "rewards/accuracy/mean": "accuracy",
    "rewards/format/mean": "format",
    "completions/mean_length": "completion_length",
    "completions/clipped_ratio": "clipped_ratio",
    "reward_std": "reward_std",
    "kl": "kl",
}


def substage_name(index: int) -> str:
    """``stage-1``, ``stage-2``, … (1-based, as in the paper's table)."""
    return f"stage-{index}"


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(w.title() for w in rest)


def plan_rows(params: Any, folder: Path, source: str) -> list[dict[str, Any]]:
    """The row of each sub-stage of ``params.ptst`` (a GRPOParams), in order."""
    rows, start = [], source
    for index, row in enumerate(params.ptst, start=1):
        reference = start if params.reset_reference_each_stage else source
        out: dict[str, Any] = {k: getattr(row, k) for k in TABLE_FIELDS}
        out |= {k: getattr(params, k) for k in SHARED_FIELDS}
        out |= {"start_model": start, "reference_model": reference}
        rows.append(out)
        start = str(folder / substage_name(index) / "final")
    return rows


def recorded_row(folder: Path) -> dict[str, Any] | None:
    """The row a sub-stage was (or is being) trained with, or None if it never started."""
    done = read_done(folder)
    if done is not None and "row" in done:
        return dict(done["row"])
    path = folder / ROW
    if path.exists():
        return dict(json.loads(path.read_text()))
    if done is not None:  # a marker from before rows were recorded: what it did record
        return {k: done[k] for k in (*TABLE_FIELDS, *MODEL_FIELDS) if k in done}
    return None


def write_row(folder: Path, row: dict[str, Any]) -> None:
    atomic_write_json(folder / ROW, row)


def check_rows(folder: Path, rows: list[dict[str, Any]]) -> None:
    """Refuse (exit 65) a run whose sub-stages already started under other rows."""
    for index, row in enumerate(rows, start=1):
        name = substage_name(index)
        before = recorded_row(folder / name)
        if before is None:
            continue
        for key, now in row.items():
            if key not in before or before[key] == now:
                continue
            if key in TABLE_FIELDS:
                field = f"params.ptst[{index - 1}].{_camel(key)}"
            elif key in MODEL_FIELDS:
                field = f"{key} ({MODEL_FIELDS[key]}; set by inputs.model and params.ptst)"
            else:
                field = f"params.{_camel(key)}"
            raise InvalidInput(
                f"{field}: grpo/{name} was trained with {before[key]!r}, the config now says "
                f"{now!r}; PTST sub-stages are not retrained under other settings. Rerun with "
                f"the old value, or delete {folder / name} and the sub-stages after it to train "
                "them again"
            )


def read_done(folder: Path) -> dict[str, Any] | None:
    path = folder / DONE
    if not path.exists():
        return None
    return json.loads(path.read_text())


def write_done(folder: Path, record: dict[str, Any]) -> None:
    atomic_write_json(folder / DONE, record)


def step_series(log_history: list[dict[str, Any]]) -> list[dict[str, float]]:
    """One row per logged training step with the PTST-relevant values."""
    rows = []
    for entry in log_history:
        if "step" not in entry or not any(k in entry for k in SERIES):
            continue
        row = {"step": float(entry["step"])}
        for key, name in SERIES.items():
            value = entry.get(key)
            if isinstance(value, int | float):
                row[name] = float(value)
        rows.append(row)
    return rows


def aggregate(series: list[dict[str, float]]) -> dict[str, float]:
    """Means over a sub-stage's steps, plus the last step's values (``last_*``)."""
    out: dict[str, float] = {"steps_logged": float(len(series))}
    for name in SERIES.values():
        values = [r[name] for r in series if name in r]
        if values:
            out[f"mean_{name}"] = statistics.fmean(values)
            out[f"last_{name}"] = values[-1]
    return out


def summary(substages: list[dict[str, Any]]) -> dict[str, Any]:
    """The run's PTST table: per sub-stage its budget, samples, steps and aggregates."""
    return {"substages": substages}


def write_summary(folder: Path, substages: list[dict[str, Any]]) -> tuple[Path, Path]:
    """``ptst_summary.json`` and ``ptst_summary.png`` in ``folder``."""
    data = summary(substages)
    json_path = atomic_write_json(folder / "ptst_summary.json", data)
    png_path = folder / "ptst_summary.png"
    _plot(substages, png_path)
    return json_path, png_path


def _plot(substages: list[dict[str, Any]], dest: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    offset = 0.0
    for sub in substages:
        series = sub.get("series", [])
        label = f"{sub['name']}: {sub['max_completion_length']} tok × {sub['num_generations']}"
        xs = [offset + r["step"] for r in series]
        for ax, key in zip(axes, ("accuracy", "completion_length"), strict=True):
            ys = [r.get(key) for r in series]
            pts = [(x, y) for x, y in zip(xs, ys, strict=True) if y is not None]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=label)
        if sub.get("max_completion_length"):
            axes[1].hlines(
                sub["max_completion_length"],
                offset + 1,
                offset + max(len(series), 1),
                colors="gray",
                linestyles="dotted",
            )
        offset += float(sub.get("steps", len(series)))
        axes[0].axvline(offset + 0.5, color="lightgray", lw=0.8)
        axes[1].axvline(offset + 0.5, color="lightgray", lw=0.8)
    axes[0].set(
        title="accuracy of rollouts", xlabel="GRPO step", ylabel="accuracy", ylim=(-0.02, 1.02)
    )
    axes[1].set(
        title="mean completion length (dotted: budget)", xlabel="GRPO step", ylabel="tokens"
    )
    axes[0].legend(fontsize=7, loc="best")
    fig.suptitle("Progressive Thinking Suppression: per sub-stage")
    fig.tight_layout()
    atomic_savefig(fig, dest, dpi=100)
