"""The eval stage: generate on each benchmark for each checkpoint, score, report, log to MLflow.

Protocol (VISION-R1.md §7): the benchmark prompt as the only user turn (no system prompt),
temperature 0.6, top_p 0.95, ``maxNewTokens``, and up to ``retriesMissingAnswer`` more asks for a
response without ``</answer>`` (the last attempt is scored; every attempt is saved).

Sharding (Indexed Job): shard ``i`` of ``n`` (JOB_COMPLETION_INDEX / VISIONR1_SHARDS) takes rows
``i, i+n, …`` of every (checkpoint, benchmark) and writes
``eval/<checkpoint>/<benchmark>.shard-<i>-of-<n>.jsonl`` atomically; a restarted shard skips the
files it already wrote. The shard that, after writing its own files, finds every shard's files
present merges: scores all predictions, writes ``eval/<checkpoint>/<benchmark>.json`` (summary),
``….verdicts.jsonl`` (every response, extraction and verdict), ``report.json``, ``report.md``,
``accuracy.png``, logs to MLflow and writes the manifest. The other shards exit 0 without a
manifest, so the Indexed Job succeeds when every index has, and by then the last one has merged
(two shards finishing together both merge; the outputs are identical and written atomically).

With ``judge: llm`` the merge also asks ``llmJudge`` for a verdict on every response
(``visionr1_jobs.eval.llm_judge``): ``correct`` and the headline accuracy become the judge's,
``rule_correct`` keeps the rule-based verdict, and the summaries carry both accuracies.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from visionr1_jobs.config import EvalParams, ResolvedStageConfig
from visionr1_jobs.contract import (
    InvalidInput,
    StageManifest,
    atomic_write,
    atomic_write_json,
    input_path,
    progress,
    resolve_path,
    sha256_file,
    shard_from_env,
    stage_dir,
    write_manifest,
)

if TYPE_CHECKING:
    from visionr1_jobs.generation import GenerationBackend

# (checkpoint model path or hub id, params) -> an open generation backend for it.
GeneratorFactory = Callable[[str, EvalParams], "GenerationBackend"]
Prompt = tuple[str, list[str]]


def checkpoint_slug(name: str) -> str:
    """A folder name for a checkpoint (``grpo/stage-1`` → ``grpo-stage-1``)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "checkpoint"


def resolve_checkpoint(cfg: ResolvedStageConfig, key: str) -> str:
    """Model path or hub id of input ``checkpoint:<name>``; ``grpo/stage-N`` → output ``stage-N``."""
    name = key.split(":", 1)[1]
    loc = cfg.inputs[key]
    output = "model"
    if loc.format == "stage" and "/" in name:
        output = name.split("/", 1)[1]
    return str(input_path(cfg, key, output))


def _default_generator(model: str, params: EvalParams) -> GenerationBackend:
    """The shared generation backend (issue 3) for one checkpoint; ``backend.model`` unset means
    the checkpoint itself."""
    from visionr1_jobs.generation import get_backend  # heavy libraries load with the kind

    return get_backend(params.backend, model)


def _sampling(params: EvalParams) -> dict[str, Any]:
    return {
        "temperature": params.temperature,
        "top_p": params.top_p,
        "max_tokens": params.max_new_tokens,
        "seed": params.seed,
    }


def _ask(
    backend: GenerationBackend, prompts: list[Prompt], sampling: dict[str, Any]
) -> list[tuple[str, int]]:
    # No system prompt: the benchmark prompt is the only user turn, its images before the text.
    requests = [
        {"messages": [{"role": "user", "content": text}], "images": images}
        for text, images in prompts
    ]
    return [(g.text, int(g.completion_tokens)) for g in backend.generate(requests, **sampling)]


def generate_with_retries(
    backend: GenerationBackend,
    prompts: list[Prompt],
    sampling: dict[str, Any],
    retries: int,
) -> list[dict[str, Any]]:
    """Generate; ask again (up to ``retries`` times) for each response missing ``</answer>``."""
    outs = _ask(backend, prompts, sampling)
    attempts: list[list[tuple[str, int]]] = [[o] for o in outs]
    for _ in range(retries):
        todo = [i for i, a in enumerate(attempts) if "</answer>" not in a[-1][0]]
        if not todo:
            break
        again = _ask(backend, [prompts[i] for i in todo], sampling)
        for i, out in zip(todo, again, strict=True):
            attempts[i].append(out)
    return [
        {
            "response": a[-1][0],
            "response_tokens": a[-1][1],
            "attempts": len(a),
            "responses": [t for t, _ in a],
        }
        for a in attempts
    ]


def _shard_file(folder: Path, bench: str, index: int, count: int) -> Path:
    return folder / f"{bench}.shard-{index:05d}-of-{count:05d}.jsonl"


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def _load_benchmarks(cfg: ResolvedStageConfig, params: EvalParams) -> dict[str, Any]:
    from visionr1_jobs.eval.readers import read_benchmark

    out = {}
    cache = stage_dir(cfg) / "_images"
    for bench in params.benchmarks:
        res = read_benchmark(
            bench.name,
            resolve_path(cfg.workspace, bench.path),
            limit=bench.limit,
            versions=bench.versions,
            image_cache=cache,
        )
        out[bench.name] = res
    return out


def _generate_shards(
    cfg: ResolvedStageConfig,
    params: EvalParams,
    checkpoints: dict[str, str],
    benches: dict[str, Any],
    index: int,
    count: int,
    factory: GeneratorFactory,
) -> None:
    total = sum(len(b.rows[index::count]) for b in benches.values()) * len(checkpoints)
    done = 0
    for name, model in checkpoints.items():
        folder = stage_dir(cfg) / checkpoint_slug(name)
        pending = {
            b: res
            for b, res in benches.items()
            if not _shard_file(folder, b, index, count).exists()
        }
        if not pending:
            done += sum(len(r.rows[index::count]) for r in benches.values())
            continue
        backend = factory(model, params)
        try:
            _generate_checkpoint(params, name, backend, pending, folder, index, count)
        finally:
            backend.close()
        done += sum(len(r.rows[index::count]) for r in pending.values())
        progress("eval", done, total, checkpoint=name, shard=index)


def _generate_checkpoint(
    params: EvalParams,
    name: str,
    backend: GenerationBackend,
    pending: dict[str, Any],
    folder: Path,
    index: int,
    count: int,
) -> None:
    from visionr1_jobs.eval.scoring import scorer

    sampling = _sampling(params)
    for bench, res in pending.items():
        rows = res.rows[index::count]
        prompt_of = scorer(bench).prompt
        prompts = [(prompt_of(r), list(r.get("images") or [])) for r in rows]
        retries = params.retries_missing_answer
        outs = generate_with_retries(backend, prompts, sampling, retries) if rows else []
        lines = [
            json.dumps({**r, "checkpoint": name, "prompt": p[0], **o}, ensure_ascii=False)
            for r, p, o in zip(rows, prompts, outs, strict=True)
        ]
        atomic_write(_shard_file(folder, bench, index, count), "".join(x + "\n" for x in lines))


def _all_present(
    cfg: ResolvedStageConfig, checkpoints: dict[str, str], benches: dict[str, Any], count: int
) -> bool:
    return all(
        _shard_file(stage_dir(cfg) / checkpoint_slug(c), b, i, count).exists()
        for c in checkpoints
        for b in benches
        for i in range(count)
    )


def _check_judge(params: EvalParams) -> None:
    """Fail before generating when the judge's prompt or API settings are wrong (an openai
    backend only checks its config when built; other kinds would load a model, so wait)."""
    from visionr1_jobs.eval.llm_judge import load_prompt

    load_prompt()
    assert params.llm_judge is not None  # EvalParams refuses judge 'llm' without it
    if params.llm_judge.backend.kind == "openai":
        from visionr1_jobs.generation import get_backend

        get_backend(params.llm_judge.backend).close()


def _apply_judge(
    judge: GenerationBackend,
    params: EvalParams,
    rows: list[dict[str, Any]],
    verdicts: list[dict[str, Any]],
) -> dict[str, Any]:
    """Add the LLM verdict to every rule verdict (``rule_correct`` keeps the rule's; ``correct``
    becomes the judge's, or stays the rule's when the judge's reply was unparseable) and return
    the summary fields comparing the two."""
    from visionr1_jobs.eval.llm_judge import judge_rows, load_prompt

    assert params.llm_judge is not None
    judged = judge_rows(
        judge,
        rows,
        verdicts,
        prompt=load_prompt(),
        max_tokens=params.llm_judge.sampling.max_tokens,
        seed=params.llm_judge.sampling.seed,
        model_name=params.llm_judge.backend.model,
    )
    for v, j in zip(verdicts, judged, strict=True):
        v["rule_correct"] = v["correct"]
        v.update(j)
    n = len(verdicts)
    parsed = [v for v in verdicts if v["llm_correct"] is not None]
    return {
        "rule_accuracy": sum(v["rule_correct"] for v in verdicts) / n if n else 0.0,
        "llm_accuracy": sum(v["correct"] for v in verdicts) / n if n else 0.0,
        "judge_unparsed": n - len(parsed),
        "judge_agreement": (
            sum(v["llm_correct"] == v["rule_correct"] for v in parsed) / len(parsed)
            if parsed
            else None
        ),
        "judge_models": sorted({str(v["judge_model"]) for v in verdicts if v["judge_model"]}),
    }


def _merge(
    cfg: ResolvedStageConfig,
    params: EvalParams,
    checkpoints: dict[str, str],
    benches: dict[str, Any],
    count: int,
    started: float,
) -> StageManifest:
    from visionr1_jobs.eval.report import markdown, plot
    from visionr1_jobs.eval.scoring import score_row, summarize
    from visionr1_jobs.tracking import stage_run

    out_dir = stage_dir(cfg)
    results: dict[str, dict[str, dict[str, Any]]] = {}
    outputs: dict[str, str] = {}
    rows_count: dict[str, int] = {}
    settings = {
        "temperature": params.temperature,
        "top_p": params.top_p,
        "max_new_tokens": params.max_new_tokens,
        "retries_missing_answer": params.retries_missing_answer,
        "judge": params.judge,
        "system_prompt": "none",
        "seed": params.seed,
        "backend": params.backend.kind,
        "shards": count,
    }
    judge: GenerationBackend | None = None
    if params.judge == "llm":
        from visionr1_jobs.eval.llm_judge import judge_identity, load_prompt
        from visionr1_jobs.generation import get_backend

        assert params.llm_judge is not None
        settings.update(judge_identity(params.llm_judge, load_prompt()))
        judge = get_backend(params.llm_judge.backend)
    served: set[str] = set()
    for name, model in checkpoints.items():
        folder = out_dir / checkpoint_slug(name)
        results[name] = {}
        for bench, res in benches.items():
            rows: list[dict[str, Any]] = []
            for i in range(count):
                rows += _read_jsonl(_shard_file(folder, bench, i, count))
            verdicts = [score_row(bench, r) for r in rows]
            compared = _apply_judge(judge, params, rows, verdicts) if judge is not None else {}
            served.update(compared.get("judge_models", ()))
            summary = summarize(bench, rows, verdicts)
            summary.update(compared)
            summary.update(
                checkpoint=name,
                model=model,
                settings=settings,
                skipped=res.skipped,
                n_skipped=len(res.skipped),
                source=res.source,
            )
            results[name][bench] = summary
            vpath = folder / f"{bench}.verdicts.jsonl"
            atomic_write(
                vpath,
                "".join(
                    json.dumps({**r, "verdict": v}, ensure_ascii=False, default=str) + "\n"
                    for r, v in zip(rows, verdicts, strict=True)
                ),
            )
            spath = atomic_write_json(folder / f"{bench}.json", summary)
            key = f"{checkpoint_slug(name)}/{bench}"
            outputs[key] = str(spath.relative_to(cfg.workspace))
            rows_count[key] = len(rows)
    if judge is not None:
        judge.close()
        # The id the endpoint answered with (a dated snapshot for hosted APIs) is the version.
        settings["judge_model_served"] = ",".join(sorted(served)) or "unknown"
    report = {"settings": settings, "results": results}
    rjson = atomic_write_json(out_dir / "report.json", report)
    rmd = atomic_write(out_dir / "report.md", markdown(results, settings))
    rpng = plot(results, out_dir / "accuracy.png")
    outputs.update(
        report=str(rjson.relative_to(cfg.workspace)),
        report_md=str(rmd.relative_to(cfg.workspace)),
        plot=str(rpng.relative_to(cfg.workspace)),
    )
    metrics: dict[str, float] = {}
    for name, per in results.items():
        slug = checkpoint_slug(name)
        for bench, s in per.items():
            base = f"{slug}.{bench}"
            metrics[f"{base}.accuracy"] = s["accuracy"]
            metrics[f"{base}.format_rate"] = s["format_rate"]
            metrics[f"{base}.mean_response_chars"] = s["mean_response_chars"]
            if s.get("mean_response_tokens") is not None:
                metrics[f"{base}.mean_response_tokens"] = s["mean_response_tokens"]
            for k, v in s.items():
                if k.endswith("_accuracy") and isinstance(v, float):
                    metrics[f"{base}.{k}"] = v
            if "judge_unparsed" in s:
                metrics[f"{base}.judge_unparsed"] = float(s["judge_unparsed"])
                if s["judge_agreement"] is not None:
                    metrics[f"{base}.judge_agreement"] = s["judge_agreement"]
            for dim, cats in s["per_category"].items():
                for label, c in cats.items():
                    clean = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{dim}.{label}")[:120]
                    metrics[f"{base}.cat.{clean}"] = c["accuracy"]
    run_id = None
    with stage_run(cfg) as run:
        if run is not None:
            import mlflow

            run_id = run.info.run_id
            mlflow.log_params({f"eval.setting.{k}": str(v) for k, v in settings.items()})
            mlflow.log_metrics(metrics)
            mlflow.log_artifact(str(rjson))
            mlflow.log_artifact(str(rmd))
            mlflow.log_artifact(str(rpng))
            for name in results:
                mlflow.log_artifacts(str(out_dir / checkpoint_slug(name)), checkpoint_slug(name))
    manifest = StageManifest(
        stage="eval",
        outputs=outputs,
        rows=rows_count,
        hashes={k: sha256_file(resolve_path(cfg.workspace, v)) for k, v in outputs.items()},
        metrics={k: v for k, v in metrics.items() if ".cat." not in k},
        mlflow_run_id=run_id,
        started_at=started,
    )
    write_manifest(cfg, manifest)
    return manifest


def run(
    cfg: ResolvedStageConfig, generator_factory: GeneratorFactory | None = None
) -> StageManifest | None:
    """The stage program (see the module docstring)."""
    started = time.time()
    params = cfg.stage_params()
    assert isinstance(params, EvalParams)
    if params.judge == "llm":
        _check_judge(params)
    keys = [k for k in cfg.inputs if k.startswith("checkpoint:")]
    if not keys:
        raise InvalidInput("config.inputs has no 'checkpoint:<name>' entry; nothing to evaluate")
    checkpoints = {k.split(":", 1)[1]: resolve_checkpoint(cfg, k) for k in keys}
    index, count = shard_from_env()
    benches = _load_benchmarks(cfg, params)
    _generate_shards(
        cfg, params, checkpoints, benches, index, count, generator_factory or _default_generator
    )
    if not _all_present(cfg, checkpoints, benches, count):
        print(
            f"[eval] shard {index}/{count} done; waiting for the other shards to merge",
            flush=True,
        )
        # Not the last shard: done without a manifest; the last shard to finish merges.
        return None
    return _merge(cfg, params, checkpoints, benches, count, started)
