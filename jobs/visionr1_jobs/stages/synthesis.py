"""The synthesis stage: modality bridging (method.md §2), sharded over an Indexed Job.

Each pod takes the contiguous rows of shard ``JOB_COMPLETION_INDEX`` of ``VISIONR1_SHARDS``,
cuts them into chunks of ``params.rowsPerShard`` rows, and for every chunk not yet on disk runs
the three teacher steps (:mod:`visionr1_jobs.synthesis.bridge`) and writes
``synthesis/shard-SSSSS-CCCCC.parquet`` atomically, with every raw teacher output in the rows'
``raw`` field. A restarted pod skips finished chunks and redoes the one it was killed in.
When its chunks are done a pod writes its shard marker; the pod that then finds every shard's
marker writes ``_manifest.json`` (outputs ``{"data": "synthesis"}``), and the others exit 0
without one (see :mod:`visionr1_jobs.shards` for why this is safe under concurrency).

The describer (steps 1–2) and the reasoner (step 3) are pipelined across chunks: the reasoner of
chunk ``i`` runs on a background thread, writing its chunk when done, while the describer does
chunk ``i+1`` (``params.pipeline``; only when the two may run at once: an API reasoner beside
any describer, not two transformers models in one process). Chunks are still written in order,
one at a time, so the resume contract is unchanged; the stage waits for a chunk's reasoner
before starting the next one's. The reasoner's API timeout defaults to 1,800 s (a 16K-token
chain of thought).

A teacher request that fails for good (content filter, context length, another 4xx, retries
spent) drops its row with a reason (:mod:`visionr1_jobs.synthesis.failures`); the dropped rows of
a chunk are listed in ``_shards/shard-SSSSS-CCCCC.failed.json`` (written before the chunk) and
counted per reason in the marker and the manifest. The shard fails once more than
``params.maxFailedFraction`` of its rows are dropped.

MLflow (the stage's nested run): the prompts as artifacts with their sha256 (params
``prompt.<step>.sha256``), the teachers as tags (toy stand-ins say so), per-chunk samples/s and
tokens/s, and the totals from the pod that writes the manifest.
"""

from __future__ import annotations

import functools
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from visionr1_jobs import shards
from visionr1_jobs.config import (
    REASONER_TIMEOUT_S,
    Backend,
    ResolvedStageConfig,
    SynthesisParams,
    Teacher,
)
from visionr1_jobs.contract import (
    InvalidInput,
    StageManifest,
    input_path,
    progress,
    sha256_file,
    shard_from_env,
    stage_dir,
)

DATA_OUTPUT = "data"
# (backend config, default model) → a GenerationBackend; tests may pass their own.
BackendFactory = Callable[[Backend, str | None], Any]


def teacher_name(teacher: Teacher, role: str, default_model: str | None = None) -> str:
    """How a teacher is named in rows, logs and MLflow (toy stand-ins are named as such)."""
    if teacher.backend.kind == "toy":
        from visionr1_jobs.synthesis.toy_teachers import stand_in_name

        return stand_in_name(teacher.backend, role) or "toy"
    return f"{teacher.backend.kind}:{teacher.backend.model or default_model}"


def _load_input(cfg: ResolvedStageConfig, params: SynthesisParams) -> tuple[Path, list[Any]]:
    from visionr1_jobs.data.load import load_dataset_dir

    loc = cfg.inputs.get("data")
    path = input_path(cfg, "data", "data")
    fmt = (
        "visionr1" if loc is not None and loc.format == "stage" else (loc.format if loc else "auto")
    )
    samples = load_dataset_dir(path, fmt, limit=params.limit)
    if params.describer.backend.kind == "toy":
        missing = next((s.id for s in samples if "scene" not in s.metadata), None)
        if missing is not None:
            raise InvalidInput(
                f"config.inputs.data ({path}): row {missing!r} has no toy scene; the toy "
                "describer stand-in works on toy data only (`visionr1 toy data`): use a real "
                "describer backend for this dataset"
            )
    return path, samples


def _log_setup(params: SynthesisParams, prompts: dict[str, Any], names: dict[str, str]) -> None:
    import mlflow

    for step, prompt in prompts.items():
        mlflow.log_text(prompt.text, f"prompts/{prompt.version}/{step}.txt")
    from visionr1_jobs.mlflow_params import log_params_noting_changes

    with_hash = {f"prompt.{step}.sha256": p.sha256 for step, p in prompts.items()}
    # A resumed run holds these already; changed prompts are noted on the run, not dropped.
    log_params_noting_changes(mlflow.MlflowClient(), mlflow.active_run().info.run_id, with_hash)
    tags = {
        "visionr1.describer": names["describer"],
        "visionr1.reasoner": names["reasoner"],
        "visionr1.prompts_version": params.prompts_version,
    }
    toy = [role for role in ("describer", "reasoner") if "TOY STAND-IN" in names[role]]
    if toy:
        tags["visionr1.toy_stand_in"] = ",".join(toy)
    mlflow.set_tags(tags)


def reasoner_backend(params: SynthesisParams) -> Backend:
    """The reasoner's backend config, its API timeout defaulting to one a 16K-token chain of
    thought fits in (:data:`~visionr1_jobs.config.REASONER_TIMEOUT_S`)."""
    backend = params.reasoner.backend
    if backend.kind == "openai" and backend.timeout_s is None:
        return backend.model_copy(update={"timeout_s": REASONER_TIMEOUT_S})
    return backend


def can_overlap(describer: Any, reasoner: Any) -> bool:
    """Whether the two teachers may generate at the same time: one backend only when it is
    reentrant (an API), two unless both use this process's own torch state (two transformers
    models would share its RNG and accelerator; beside an API or vLLM's own processes, fine)."""
    if describer is reasoner:
        return bool(getattr(describer, "reentrant", False))
    return not (
        getattr(describer, "process_bound", False) and getattr(reasoner, "process_bound", False)
    )


def _teachers(
    params: SynthesisParams, default_model: str | None, factory: BackendFactory
) -> tuple[Callable[..., Any], Callable[..., Any], list[Any], bool]:
    """Generate callables for describer and reasoner (one backend when both configs are equal),
    and whether they may run at once."""
    d_backend = factory(params.describer.backend, default_model)
    r_config = reasoner_backend(params)
    same = r_config.dump() == params.describer.backend.dump()
    r_backend = d_backend if same else factory(r_config, default_model)

    from visionr1_jobs.synthesis.failures import generate_rows

    def tolerant(backend: Any, sampling: Any) -> Callable[[list[Any]], list[Any]]:
        return lambda requests: generate_rows(backend, requests, sampling=sampling)

    describer = tolerant(d_backend, params.describer.sampling)
    reasoner = tolerant(r_backend, params.reasoner.sampling)
    overlap = params.pipeline and can_overlap(d_backend, r_backend)
    return describer, reasoner, [d_backend] if same else [d_backend, r_backend], overlap


def _in_background(fn: Callable[[], Any]) -> Future[Any]:
    """``fn()`` on a daemon thread: a failing stage exits without waiting for a long request."""
    future: Future[Any] = Future()

    def run() -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(fn())
        except BaseException as exc:  # re-raised by future.result() in the stage's thread
            future.set_exception(exc)

    threading.Thread(target=run, name="synthesis-reasoner", daemon=True).start()
    return future


def _now(fn: Callable[[], Any]) -> Future[Any]:
    future: Future[Any] = Future()
    future.set_running_or_notify_cancel()
    try:
        future.set_result(fn())
    except BaseException as exc:
        future.set_exception(exc)
    return future


def _default_factory(backend: Backend, default_model: str | None) -> Any:
    from visionr1_jobs.generation import get_backend

    return get_backend(backend, default_model)


def run(
    cfg: ResolvedStageConfig, backend_factory: BackendFactory | None = None
) -> StageManifest | None:
    """The stage program (see the module docstring)."""
    from visionr1_jobs.synthesis import shards as S
    from visionr1_jobs.synthesis.prompts import load_prompts
    from visionr1_jobs.tracking import stage_run

    started = time.time()
    params = cfg.stage_params()
    assert isinstance(params, SynthesisParams)
    index, count = shard_from_env()
    prompts = load_prompts(params.prompts_version)
    out_dir = stage_dir(cfg)
    in_path, samples = _load_input(cfg, params)
    S.agree_on_plan(
        out_dir,
        {
            "shards": count,
            "rows_per_shard": params.rows_per_shard,
            "rows": len(samples),
            "input": str(in_path),
            "limit": params.limit,
        },
    )
    chunks = S.plan_chunks(len(samples), index, count, params.rows_per_shard)
    S.clean_stale_temps(out_dir, index)
    todo = [c for c in chunks if not S.chunk_path(out_dir, c).exists()]
    names = {
        "describer": teacher_name(params.describer, "describer", cfg.base_model),
        "reasoner": teacher_name(params.reasoner, "reasoner", cfg.base_model),
    }
    shard_rows = sum(c.rows for c in chunks)
    print(
        f"[synthesis] shard {index}/{count}: {shard_rows} rows in {len(chunks)} chunk(s), "
        f"{len(chunks) - len(todo)} already done; describer = {names['describer']}; "
        f"reasoner = {names['reasoner']}",
        flush=True,
    )
    run_name = "synthesis" if count == 1 else f"synthesis-shard-{index:05d}"
    with stage_run(cfg, name=run_name) as mlrun:
        if mlrun is not None:
            _log_setup(params, prompts, names)
        marker = _generate(
            cfg,
            params,
            prompts,
            names,
            samples,
            index,
            chunks,
            todo,
            backend_factory or _default_factory,
            mlrun,
        )
        manifest = shards.finish_shard(
            cfg,
            index,
            count,
            marker,
            lambda markers: _merged(cfg, params, prompts, names, markers, started, mlrun),
        )
    if manifest is None:
        print(
            f"[synthesis] shard {index}/{count} done; the last shard to finish writes the manifest",
            flush=True,
        )
        # Not the last shard: done without a manifest; the last shard to finish writes it.
    return manifest


def _merged(
    cfg: ResolvedStageConfig,
    params: SynthesisParams,
    prompts: dict[str, Any],
    names: dict[str, str],
    markers: list[dict[str, Any]],
    started: float | None,
    mlrun: Any,
) -> StageManifest:
    """The merge: the chunks stay where the shards wrote them, so it is the manifest (and its
    metrics logged to the MLflow run)."""
    manifest = _manifest(cfg, params, prompts, names, markers, started)
    if mlrun is not None:
        import mlflow

        mlflow.log_metrics(manifest.metrics)
        manifest.mlflow_run_id = mlrun.info.run_id
    return manifest


def merge(cfg: ResolvedStageConfig) -> StageManifest:
    """Merge the finished shards again and write the manifest (no generation): for a Job whose
    pods all finished but whose merging pod died before ``_manifest.json``. Raises
    :class:`visionr1_jobs.shards.ShardsIncomplete` naming the shards that have not finished."""
    from visionr1_jobs.synthesis.prompts import load_prompts
    from visionr1_jobs.tracking import stage_run

    params = cfg.stage_params()
    assert isinstance(params, SynthesisParams)
    prompts = load_prompts(params.prompts_version)
    names = {
        "describer": teacher_name(params.describer, "describer", cfg.base_model),
        "reasoner": teacher_name(params.reasoner, "reasoner", cfg.base_model),
    }
    with stage_run(cfg, name="synthesis", log_config=False) as mlrun:
        return shards.merge_again(
            cfg, lambda markers: _merged(cfg, params, prompts, names, markers, None, mlrun)
        )


def _generate(
    cfg: ResolvedStageConfig,
    params: SynthesisParams,
    prompts: dict[str, Any],
    names: dict[str, str],
    samples: list[Any],
    index: int,
    chunks: list[Any],
    todo: list[Any],
    factory: BackendFactory,
    mlrun: Any,
) -> dict[str, Any]:
    """Generate the missing chunks of this shard; returns the shard's marker."""
    from visionr1_jobs.data.io import write_shard
    from visionr1_jobs.synthesis import shards as S
    from visionr1_jobs.synthesis.bridge import describe_batch, reason_batch

    out_dir = stage_dir(cfg)

    shard_rows = sum(c.rows for c in chunks)
    done_rows = shard_rows - sum(c.rows for c in todo)
    gen_s, tokens = 0.0, {"pseudo_cot": 0, "description": 0, "reasoner": 0}
    done = [c for c in chunks if c not in todo]
    failed = {c: S.read_failed(out_dir, c) for c in done}
    _check_failures(params, index, shard_rows, failed)
    backends: list[Any] = []

    def reason_and_write(chunk: Any, described: Any) -> tuple[Any, list[Any], float]:
        rows, stats, dropped = reason_batch(
            described,
            prompts,
            reasoner,
            give_answer_to_reasoner=params.give_answer_to_reasoner,
            describer_name=names["describer"],
            reasoner_name=names["reasoner"],
        )
        # The drop list first: a chunk file on disk means its drops are on disk too. Chunks are
        # written in order: the next chunk's reasoner starts only after this returns.
        S.write_failed(out_dir, chunk, dropped)
        write_shard(rows, S.chunk_path(out_dir, chunk))
        return stats, dropped, time.perf_counter()

    def finish(chunk: Any, t0: float, future: Future[Any]) -> None:
        nonlocal done_rows
        stats, dropped, t1 = future.result()
        failed[chunk] = dropped
        dt = t1 - t0
        for step, n in stats.tokens.items():
            tokens[step] += n
        done_rows += chunk.rows
        chunk_metrics = {
            "chunk.samples_per_s": chunk.rows / dt if dt > 0 else 0.0,
            "chunk.tokens_per_s": stats.total_tokens / dt if dt > 0 else 0.0,
            "chunk.seconds": dt,
            "chunk.failed_rows": float(len(dropped)),
        }
        if mlrun is not None:
            import mlflow

            mlflow.log_metrics(chunk_metrics, step=chunk.start)
        progress(
            "synthesis",
            done_rows,
            shard_rows,
            shard=chunk.shard,
            chunk=chunk.chunk,
            samples_per_s=round(chunk_metrics["chunk.samples_per_s"], 3),
            tokens_per_s=round(chunk_metrics["chunk.tokens_per_s"], 1),
            failed_rows=sum(len(f) for f in failed.values()),
        )
        _check_failures(params, index, shard_rows, failed)

    try:
        if todo:
            describer, reasoner, backends, overlap = _teachers(params, cfg.base_model, factory)
            print(
                f"[synthesis] teachers {'pipelined' if overlap else 'in turn'}: the reasoner "
                f"{'runs on chunk i while the describer does chunk i+1' if overlap else 'waits'}",
                flush=True,
            )
        t_start = time.perf_counter()
        pending: tuple[Any, float, Future[Any]] | None = None
        for chunk in todo:
            t0 = time.perf_counter()
            # While the previous chunk's reasoner runs (pipelined), the describer does this one.
            described = describe_batch(samples[chunk.start : chunk.end], prompts, describer)
            if pending is not None:
                finish(*pending)
                pending = None
            job = functools.partial(reason_and_write, chunk, described)
            if overlap:
                pending = (chunk, t0, _in_background(job))
            else:
                finish(chunk, t0, _now(job))
        if pending is not None:
            finish(*pending)
        if todo:
            gen_s = time.perf_counter() - t_start  # wall time: pipelined chunks overlap
    finally:
        for backend in backends:
            backend.close()
    previous = _previous_marker(out_dir, index)
    generated = sum(c.rows for c in todo)
    return {
        "shard": index,
        "rows": shard_rows - sum(len(f) for f in failed.values()),
        "input_rows": shard_rows,
        "failed": _failure_counts(failed),
        "chunks": [
            {
                "file": S.chunk_path(out_dir, c).name,
                "rows": c.rows - len(failed[c]),
                "start": c.start,
                "end": c.end,
                "sha256": sha256_file(S.chunk_path(out_dir, c)),
            }
            for c in chunks
        ],
        # Throughput of the rows this shard generated, over all its attempts.
        "generated_rows": generated + previous.get("generated_rows", 0),
        "generate_seconds": gen_s + previous.get("generate_seconds", 0.0),
        "tokens": {k: v + previous.get("tokens", {}).get(k, 0) for k, v in tokens.items()},
    }


def _failure_counts(failed: dict[Any, list[dict[str, str]]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for rows in failed.values():
        for row in rows:
            counts[row["reason"]] = counts.get(row["reason"], 0) + 1
    return dict(sorted(counts.items()))


def _check_failures(
    params: SynthesisParams, index: int, shard_rows: int, failed: dict[Any, list[dict[str, str]]]
) -> None:
    """Fail the shard once its dropped rows pass ``maxFailedFraction`` of its rows (the chunks
    already written stay: a rerun with a higher fraction, or fixed inputs, continues)."""
    n = sum(len(f) for f in failed.values())
    if shard_rows and n > params.max_failed_fraction * shard_rows:
        raise RuntimeError(
            f"synthesis shard {index}: {n} of its {shard_rows} rows failed at the teachers "
            f"({_failure_counts(failed)}), more than params.maxFailedFraction = "
            f"{params.max_failed_fraction:g}; see the _shards/*.failed.json files for each row's "
            "error, then fix the teachers or inputs, or raise maxFailedFraction, and rerun "
            "(finished chunks are kept)"
        )


def _previous_marker(out_dir: Path, index: int) -> dict[str, Any]:
    import json

    from visionr1_jobs.synthesis.shards import marker_path

    try:
        return json.loads(marker_path(out_dir, index).read_text())
    except FileNotFoundError:
        return {}


def _manifest(
    cfg: ResolvedStageConfig,
    params: SynthesisParams,
    prompts: dict[str, Any],
    names: dict[str, str],
    markers: list[dict[str, Any]],
    started: float | None,
) -> StageManifest:
    out_dir = stage_dir(cfg)
    rows = sum(m["rows"] for m in markers)
    failed: dict[str, int] = {}
    for m in markers:
        for reason, n in m.get("failed", {}).items():
            failed[reason] = failed.get(reason, 0) + n
    gen_rows = sum(m["generated_rows"] for m in markers)
    gen_s = sum(m["generate_seconds"] for m in markers)
    tokens = {step: sum(m["tokens"].get(step, 0) for m in markers) for step in markers[0]["tokens"]}
    metrics: dict[str, float] = {
        "rows": rows,
        "shards": len(markers),
        "generate_seconds": gen_s,
        # Per pod: rows (tokens) generated per second of generation, summed over shards.
        "samples_per_s": gen_rows / gen_s if gen_s > 0 else 0.0,
        "tokens_per_s": sum(tokens.values()) / gen_s if gen_s > 0 else 0.0,
    }
    metrics.update({f"tokens.{k}": v for k, v in tokens.items()})
    metrics["failed_rows"] = float(sum(failed.values()))
    metrics.update({f"failed.{k}": float(v) for k, v in failed.items()})
    ws = cfg.workspace
    hashes = {
        os.path.relpath(out_dir / c["file"], ws): c["sha256"] for m in markers for c in m["chunks"]
    }
    return StageManifest(
        stage=cfg.stage,
        outputs={DATA_OUTPUT: os.path.relpath(out_dir, ws)},
        rows={DATA_OUTPUT: rows},
        hashes=hashes,
        metrics=metrics,
        started_at=started,
        extra={
            "prompts_version": params.prompts_version,
            "prompts_sha256": {step: p.sha256 for step, p in prompts.items()},
            "describer": names["describer"],
            "reasoner": names["reasoner"],
            "give_answer_to_reasoner": params.give_answer_to_reasoner,
            "input_rows": sum(m.get("input_rows", m["rows"]) for m in markers),
            "failed_rows": failed,
        },
    )
