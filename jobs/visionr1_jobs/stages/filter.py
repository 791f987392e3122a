"""The filter stage: synthesized reasoning → Vision-R1-cold, the cold-start SFT dataset.

Reads the synthesis output (or any dataset whose rows carry a ``response``), judges every row
with :mod:`visionr1_jobs.filtering.rules` in ``params.workers`` processes, drops duplicates,
and writes the kept rows (images + ``<think> … </think><answer> Final Answer:X </answer>``, no
system prompt) under ``filter/data/``. Every dropped row has a reason: ``filter/verdicts.jsonl``
holds one line per input row, the counts per reason are MLflow metrics, and a sample of kept and
dropped rows is an MLflow artifact (``filter_samples.json``).

The filter runs as one pod (dedupe needs every row); it parallelises with worker processes.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from visionr1_jobs.config import FilterParams, ResolvedStageConfig
from visionr1_jobs.contract import (
    InvalidInput,
    StageManifest,
    atomic_write,
    atomic_write_json,
    input_path,
    progress,
    sha256_file,
    shard_from_env,
    stage_dir,
    write_manifest,
)
from visionr1_jobs.data.record import Sample

DATA = "data"


def _load(cfg: ResolvedStageConfig) -> list[Sample]:
    from visionr1_jobs.data.load import load_dataset_dir

    loc = cfg.inputs.get("data")
    path = input_path(cfg, "data", "data")
    fmt = (
        "visionr1" if loc is not None and loc.format == "stage" else (loc.format if loc else "auto")
    )
    samples = load_dataset_dir(path, fmt)
    if not any(s.response for s in samples):
        raise InvalidInput(
            f"config.inputs.data ({path}): no row has a 'response'; the filter needs reasoner "
            "outputs (run synthesis first, or point it at a dataset with responses)"
        )
    return samples


def _sample_rows(samples: list[Sample], verdicts: list[Any], n: int) -> dict[str, Any]:
    """Up to ``n`` kept and ``n`` dropped rows (the dropped ones spread over the reasons)."""
    kept, dropped_by_reason = [], {}
    for s, v in zip(samples, verdicts, strict=True):
        if v.kept and len(kept) < n:
            kept.append(
                {
                    "id": s.id,
                    "question": s.question,
                    "answer": s.answer,
                    "response": v.response,
                    "original": s.response,
                    "replacements": v.replacements,
                }
            )
        elif not v.kept:
            dropped_by_reason.setdefault(v.reason, []).append(
                {
                    "id": s.id,
                    "question": s.question,
                    "answer": s.answer,
                    "reason": v.reason,
                    "detail": v.detail,
                    "final": v.final,
                    "response": s.response,
                }
            )
    dropped: list[dict[str, Any]] = []
    while len(dropped) < n and any(dropped_by_reason.values()):
        for rows in dropped_by_reason.values():
            if rows and len(dropped) < n:
                dropped.append(rows.pop(0))
    return {"kept": kept, "dropped": dropped}


def run(cfg: ResolvedStageConfig) -> StageManifest:
    """The stage program (see the module docstring)."""
    from visionr1_jobs.data.io import write_records
    from visionr1_jobs.filtering.rules import REASONS, RuleSet
    from visionr1_jobs.filtering.select import filter_samples
    from visionr1_jobs.tracking import stage_run

    started = time.time()
    params = cfg.stage_params()
    assert isinstance(params, FilterParams)
    _index, count = shard_from_env()
    if count > 1:
        raise InvalidInput(
            f"VISIONR1_SHARDS={count}: the filter runs as one pod (dedupe needs every row); set "
            "the filter stage's nodes to 1 and raise params.workers instead"
        )
    try:
        rules = RuleSet.from_params(params)
    except ValueError as exc:
        raise InvalidInput(str(exc)) from exc
    samples = _load(cfg)
    out_dir = stage_dir(cfg)
    data_dir = out_dir / DATA
    print(f"[filter] {len(samples)} rows, {params.workers} worker process(es)", flush=True)

    with stage_run(cfg) as run:
        t0 = time.perf_counter()
        last = [0.0]

        def on_progress(done: int) -> None:
            if time.perf_counter() - last[0] > 2 or done == len(samples):
                last[0] = time.perf_counter()
                progress("filter", done, len(samples), step="judge")

        result = filter_samples(
            samples, rules, workers=params.workers, dedupe=params.dedupe, on_progress=on_progress
        )
        judge_s = time.perf_counter() - t0
        if data_dir.exists():
            # A previous attempt died while writing: its shards are not referenced by any manifest.
            for stale in data_dir.glob("shard-*.parquet"):
                stale.unlink()
        files = write_records(result.kept, data_dir, rows_per_shard=params.rows_per_shard)
        verdict_lines = [
            json.dumps(
                {
                    "id": s.id,
                    "kept": v.kept,
                    "reason": v.reason,
                    "detail": v.detail,
                    "final": v.final,
                    "replacements": v.replacements,
                },
                ensure_ascii=False,
            )
            for s, v in zip(samples, result.verdicts, strict=True)
        ]
        atomic_write(out_dir / "verdicts.jsonl", "\n".join(verdict_lines) + "\n")
        n_in, n_kept = len(samples), len(result.kept)
        metrics: dict[str, float] = {
            "rows_in": n_in,
            "kept": n_kept,
            "dropped": n_in - n_kept,
            "keep_rate": n_kept / n_in if n_in else 0.0,
            "replacements": sum(v.replacements for v in result.verdicts if v.kept),
            "judge_seconds": judge_s,
            "samples_per_s": n_in / judge_s if judge_s > 0 else 0.0,
        }
        for reason in REASONS:
            metrics[f"dropped.{reason}"] = result.counts.get(reason, 0)
        sample = _sample_rows(samples, result.verdicts, params.sample_rows)
        atomic_write_json(out_dir / "filter_samples.json", sample)
        if run is not None:
            import mlflow

            mlflow.log_metrics(metrics)
            mlflow.log_dict(sample, "filter_samples.json")
            mlflow.log_dict(dict(result.counts), "filter_counts.json")
        progress("filter", n_in, n_in, kept=n_kept)
        print(
            f"[filter] kept {n_kept}/{n_in} ({metrics['keep_rate']:.1%}); dropped: "
            + ", ".join(f"{r}={c}" for r, c in result.counts.items() if c and r != "kept"),
            flush=True,
        )
        run_id = run.info.run_id if run is not None else None

    ws = cfg.workspace
    manifest = StageManifest(
        stage=cfg.stage,
        outputs={DATA: os.path.relpath(data_dir, ws)},
        rows={DATA: n_kept, "input": n_in},
        hashes={os.path.relpath(f, ws): sha256_file(f) for f in files},
        metrics=metrics,
        mlflow_run_id=run_id,
        started_at=started,
        extra={
            "drop_reasons": {r: c for r, c in result.counts.items() if r != "kept"},
            "verdicts": os.path.relpath(out_dir / "verdicts.jsonl", ws),
            "sample": os.path.relpath(Path(out_dir) / "filter_samples.json", ws),
        },
    )
    write_manifest(cfg, manifest)
    return manifest
