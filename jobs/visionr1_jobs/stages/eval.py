"""The eval stage: generate on each benchmark for each checkpoint, score, report, log to MLflow.

Protocol (method.md §7): the benchmark prompt as the only user turn (no system prompt, except
for a checkpoint with its own in ``systemPrompts``: one trained with a system prompt, such as
Vision-R1-Zero with its format instruction, is evaluated with it; the operator fills that in),
temperature 0.6, top_p 0.95, ``maxNewTokens``, and up to ``retriesMissingAnswer`` more asks for a
response without ``</answer>`` (the last answered attempt is scored; every attempt is saved).
Attempt ``k`` (0 = the first ask) samples with seed ``seed + k``: a seeded server or engine given
the first ask's seed again would return the same cut answer again.

Sharding (Indexed Job, :mod:`visionr1_jobs.shards`): shard ``i`` of ``n`` (JOB_COMPLETION_INDEX /
VISIONR1_SHARDS) takes rows ``i, i+n, …`` of every (checkpoint, benchmark). It generates them
``batchSize`` prompts at a time and saves each batch's predictions as soon as it is done
(``eval/<checkpoint>/<benchmark>.shard-<i>-of-<n>.part-<k>.jsonl``, atomically), so a killed pod's
replacement resumes after the last saved batch without asking again for finished prompts. When
its rows are done the shard writes them in row order to ``….shard-<i>-of-<n>.jsonl`` (the parts
are then deleted), and when every (checkpoint, benchmark) is done, its marker
``eval/_shards/shard-<i>.done.json``. The shard that finds every marker merges: scores all
predictions, writes ``eval/<checkpoint>/<benchmark>.json`` (summary), ``….verdicts.jsonl`` (every
response, extraction and verdict), ``report.json``, ``report.md``, ``accuracy.png``, logs to MLflow
and writes the manifest; :func:`merge` does the same on its own (e.g. after a merging pod died).

A request that still fails after the backend's retries (a remote API's 4xx, retries spent) does
not lose its batch, nor does a row a local vLLM engine refuses (it raises for the whole batch,
which is bisected to the refused rows as synthesis does,
:func:`visionr1_jobs.synthesis.failures.generate_rows`): the row is saved with ``failed: true``
and the error, scored wrong, and counted (``failed`` in the summaries and the report, ``<checkpoint>.<benchmark>.failed_rows`` in
MLflow).

On the benchmarks the judge scores (``judge``, per benchmark ``benchmarks[].judge``; by default
only MathVista and MathVerse, as the paper, once ``llmJudge`` is set) the merge also asks
``llmJudge`` for a verdict on every response (``visionr1_jobs.eval.llm_judge``): ``correct`` and
the headline accuracy become the judge's, ``rule_correct`` keeps the rule-based verdict, and the
summaries carry both accuracies. The judged rows are saved a part at a time as the judge answers
(``visionr1_jobs.eval.judge_parts``), so a merge that dies resumes after the last saved part. A
row whose judge request fails for good keeps its rule verdict, with the error recorded on the
row and counted (``judge_errors``).

While it generates, shard 0 logs its progress into the stage's MLflow run, for the operator's
STEP, ETA and METRIC columns (:class:`LiveMetrics`): the rows it has done as the MLflow step (and
as ``items_scored``), the rows it will do in all as ``total_steps`` (the key the training stages
log their planned steps under), and per (checkpoint, benchmark) ``<checkpoint>.<benchmark>.
running_accuracy``, the rule verdicts of its rows done so far. Only shard 0 logs: every shard
owns the same number of rows of each benchmark (shard 0 one more where they do not divide) and
the shards generate at once, so shard 0's progress and ETA stand for the stage's without the
shards reading each other's files or the operator adding up runs. With ``n`` shards STEP
counts shard 0's rows (about 1/n of the stage's) and its running accuracy is over every n-th
row. The final metrics (``<checkpoint>.<benchmark>.accuracy``, the judge's where a judge
scores) are logged by the merge, as before.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from visionr1_jobs import shards
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
)
from visionr1_jobs.eval.judge_parts import JUDGE_DIR

if TYPE_CHECKING:
    from visionr1_jobs.generation import Generation, GenerationBackend

log = logging.getLogger(__name__)

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
    """The shared generation backend for one checkpoint; ``backend.model`` unset means
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


def attempt_sampling(sampling: dict[str, Any], attempt: int) -> dict[str, Any]:
    """The sampling of attempt ``attempt`` (0 = the first ask): its own seed, ``seed + attempt``,
    so each re-ask can differ on a backend that is deterministic for a given seed."""
    seed = sampling.get("seed")
    return {**sampling, "seed": None if seed is None else seed + attempt}


def _ask(
    backend: GenerationBackend,
    prompts: list[Prompt],
    sampling: dict[str, Any],
    system: str | None = None,
) -> list[Generation]:
    # The benchmark prompt is the only user turn, its images before the text; a system turn only
    # for a checkpoint trained with one.
    from visionr1_jobs.generation import Generation
    from visionr1_jobs.synthesis.failures import RowFailure, classify_any, generate_rows

    head = [{"role": "system", "content": system}] if system else []
    requests = [
        {"messages": [*head, {"role": "user", "content": text}], "images": images}
        for text, images in prompts
    ]
    # An API reports a failed request in its result; a local engine (vLLM) raises for the whole
    # batch, which is then bisected to the rows it refused, as synthesis does.
    outs = generate_rows(backend, requests, classify_error=classify_any, **sampling)
    return [
        Generation(text="", finish_reason="error", error=o.detail)
        if isinstance(o, RowFailure)
        else o
        for o in outs
    ]


def generate_with_retries(
    backend: GenerationBackend,
    prompts: list[Prompt],
    sampling: dict[str, Any],
    retries: int,
    system: str | None = None,
) -> list[dict[str, Any]]:
    """Generate; ask again (up to ``retries`` times, each with its own seed) for each response
    missing ``</answer>``.

    A request that failed for good (``Generation.error``) is not asked again: its row keeps the
    last answered attempt, or, when none answered, is ``failed`` with the error."""
    outs = _ask(backend, prompts, attempt_sampling(sampling, 0), system)
    attempts: list[list[Generation]] = [[o] for o in outs]
    for attempt in range(1, retries + 1):
        todo = [
            i
            for i, a in enumerate(attempts)
            if a[-1].error is None and "</answer>" not in a[-1].text
        ]
        if not todo:
            break
        again = _ask(
            backend, [prompts[i] for i in todo], attempt_sampling(sampling, attempt), system
        )
        for i, out in zip(todo, again, strict=True):
            attempts[i].append(out)
    rows = []
    for a in attempts:
        answered = [g for g in a if g.error is None]
        last = answered[-1] if answered else None
        row: dict[str, Any] = {
            "response": last.text if last else "",
            "response_tokens": int(last.completion_tokens) if last else 0,
            "attempts": len(a),
            "responses": [g.text for g in a],
        }
        errors = [g.error for g in a if g.error is not None]
        if errors:
            row["errors"] = errors
        if last is None:
            row.update(failed=True, error=errors[-1])
        rows.append(row)
    return rows


# --------------------------------------------------------------------------- progress in MLflow

#: Shard 0's rows done so far (also the MLflow step of every progress point).
ITEMS_METRIC = "items_scored"
#: The rows shard 0 will do in all (what SFT and GRPO log their planned steps under).
TOTAL_METRIC = "total_steps"
#: ``<checkpoint>.<benchmark>.running_accuracy``: the rule verdicts of shard 0's rows so far.
RUNNING_ACCURACY = "running_accuracy"
#: At most one progress point per this many seconds, plus one when a benchmark is done.
PROGRESS_EVERY_S = 15.0


class LiveMetrics:
    """Shard 0's progress and running accuracies, into the stage's MLflow run while it generates.

    Through the workspace's MLflow outbox (:mod:`visionr1_jobs.mlflow_spool`): generation never
    waits on MLflow and never fails for it. Off (every method does nothing) on the other shards,
    off rank 0 and without a known stage run id (the operator and the local executor pass one;
    the merge logs into that run too)."""

    def __init__(
        self,
        cfg: ResolvedStageConfig,
        index: int,
        total: int,
        every_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        from visionr1_jobs.tracking import STAGE_ENV, is_rank_zero

        run_id = cfg.mlflow.run_id or os.environ.get(STAGE_ENV)
        self.run_id = run_id if index == 0 and is_rank_zero() else None
        self.cfg, self.total, self.clock = cfg, total, clock
        self.every_s = PROGRESS_EVERY_S if every_s is None else every_s
        self.verdicts: dict[str, dict[int, bool]] = {}  # "<slug>.<bench>" -> row index -> correct
        self.changed: set[str] = set()
        self.last: float | None = None  # clock() at the last point logged
        self.step: int | None = None  # its step

    def score(self, name: str, bench: str, lines: Any) -> None:
        """Score rows of ``name`` on ``bench`` (again: a row's verdict is kept by its index)."""
        if self.run_id is None:
            return
        from visionr1_jobs.eval.scoring import score_row

        key = f"{checkpoint_slug(name)}.{bench}"
        mine = self.verdicts.setdefault(key, {})
        for line in lines:
            mine[int(line["row_index"])] = bool(score_row(bench, line)["correct"])
            self.changed.add(key)

    def log(self, done: int, *, force: bool = False) -> None:
        """A progress point at step ``done`` unless nothing changed since the last one: the first
        at once, then at most one per ``every_s`` seconds (``force``: now)."""
        if self.run_id is None or (done == self.step and not self.changed):
            return
        now = self.clock()
        if not force and self.last is not None and now - self.last < self.every_s:
            return
        values = {ITEMS_METRIC: float(done), TOTAL_METRIC: float(self.total)}
        for key in sorted(self.changed):
            mine = self.verdicts[key]
            values[f"{key}.{RUNNING_ACCURACY}"] = sum(mine.values()) / len(mine)
        self.changed.clear()
        self.last, self.step = now, done
        try:
            from visionr1_jobs.tracking import outbox

            outbox(self.cfg).metrics(self.run_id, values, step=done)
        except Exception as exc:  # a progress point MLflow refuses must not fail the eval
            log.warning("eval progress not logged to MLflow run %s: %s", self.run_id, exc)


# --------------------------------------------------------------------------- files of a shard


def _shard_file(folder: Path, bench: str, index: int, count: int) -> Path:
    return folder / f"{bench}.shard-{index:05d}-of-{count:05d}.jsonl"


def _part_files(folder: Path, bench: str, index: int, count: int) -> list[Path]:
    """The saved batches of an unfinished (checkpoint, benchmark) shard, in order."""
    return sorted(folder.glob(f"{bench}.shard-{index:05d}-of-{count:05d}.part-*.jsonl"))


def _part_file(folder: Path, bench: str, index: int, count: int, k: int) -> Path:
    return folder / f"{bench}.shard-{index:05d}-of-{count:05d}.part-{k:05d}.jsonl"


def _clean_stale_temps(folder: Path, bench: str, index: int, count: int) -> None:
    """The hidden temp files (``.name.*.tmp``) a killed pod of this shard left behind."""
    for p in folder.glob(f".{bench}.shard-{index:05d}-of-{count:05d}.*.tmp"):
        p.unlink(missing_ok=True)


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


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _plan(benches: dict[str, Any], count: int, params: EvalParams) -> dict[str, Any]:
    """What decides which rows a shard owns and how they are asked: resuming under another plan
    would mix layouts, or responses to different system prompts."""
    plan: dict[str, Any] = {
        "shards": count,
        "rows": {b: len(res.rows) for b, res in benches.items()},
    }
    if params.system_prompts:  # absent otherwise: plans written before the field still agree
        plan["system_prompts_sha256"] = {k: _sha(v) for k, v in params.system_prompts.items()}
    return plan


def _generate_shards(
    cfg: ResolvedStageConfig,
    params: EvalParams,
    checkpoints: dict[str, str],
    benches: dict[str, Any],
    index: int,
    count: int,
    factory: GeneratorFactory,
) -> dict[str, Any]:
    """Generate this shard's missing rows; returns its marker."""
    total = sum(len(b.rows[index::count]) for b in benches.values()) * len(checkpoints)
    done = 0
    live = LiveMetrics(cfg, index, total)
    files: dict[str, dict[str, Any]] = {}
    for name, model in checkpoints.items():
        folder = stage_dir(cfg) / checkpoint_slug(name)
        pending = {
            b: res
            for b, res in benches.items()
            if not _shard_file(folder, b, index, count).exists()
        }
        done += sum(len(res.rows[index::count]) for b, res in benches.items() if b not in pending)
        if pending:
            backend = factory(model, params)
            try:
                for bench, res in pending.items():
                    done = _generate_bench(
                        params, name, backend, bench, res, folder, index, count, done, total, live
                    )
            finally:
                backend.close()
        for bench in benches:
            path = _shard_file(folder, bench, index, count)
            for part in _part_files(folder, bench, index, count):  # a kill after the rename
                part.unlink(missing_ok=True)
            rows = _read_jsonl(path)
            if bench not in pending:  # done by an earlier pod: its rows count from the start
                live.score(name, bench, rows)
            files[f"{checkpoint_slug(name)}/{bench}"] = {
                "file": str(path.relative_to(stage_dir(cfg))),
                "rows": len(rows),
                "failed": sum(bool(r.get("failed")) for r in rows),
                "sha256": sha256_file(path),
            }
        progress("eval", done, total, checkpoint=name, shard=index)
        live.log(done, force=True)
    return {"shard": index, "shards": count, "files": files}


def _generate_bench(
    params: EvalParams,
    name: str,
    backend: GenerationBackend,
    bench: str,
    res: Any,
    folder: Path,
    index: int,
    count: int,
    done: int,
    total: int,
    live: LiveMetrics,
) -> int:
    """One (checkpoint, benchmark) of this shard, a saved batch at a time; returns rows done."""
    from visionr1_jobs.eval.scoring import scorer

    rows = res.rows[index::count]
    prompt_of = scorer(bench).prompt
    _clean_stale_temps(folder, bench, index, count)
    parts = _part_files(folder, bench, index, count)
    saved: dict[int, dict[str, Any]] = {}
    for part in parts:
        for line in _read_jsonl(part):
            saved[int(line["row_index"])] = line
    # Row k of this shard is row index + k*count of the benchmark (the layout the plan fixes).
    todo = [k for k in range(len(rows)) if index + k * count not in saved]
    if saved:
        print(
            f"[eval] {name}/{bench} shard {index}: resuming, {len(saved)} of {len(rows)} rows "
            "already saved",
            flush=True,
        )
    done += len(saved)
    live.score(name, bench, saved.values())
    live.log(done)
    sampling = _sampling(params)
    system = params.system_prompt(name)
    # Numbered on from the last saved part (the names sort in that order).
    next_part = int(parts[-1].name.rsplit(".part-", 1)[1].split(".")[0]) + 1 if parts else 0
    for start in range(0, len(todo), params.batch_size):
        batch = todo[start : start + params.batch_size]
        prompts = [(prompt_of(rows[k]), list(rows[k].get("images") or [])) for k in batch]
        outs = generate_with_retries(
            backend, prompts, sampling, params.retries_missing_answer, system
        )
        lines = []
        for k, p, o in zip(batch, prompts, outs, strict=True):
            line = {**rows[k], "checkpoint": name, "prompt": p[0], "row_index": index + k * count}
            if system:
                line["system_prompt"] = system
            line.update(o)
            saved[line["row_index"]] = line
            lines.append(json.dumps(line, ensure_ascii=False))
        atomic_write(
            _part_file(folder, bench, index, count, next_part), "".join(x + "\n" for x in lines)
        )
        next_part += 1
        done += len(batch)
        live.score(name, bench, (saved[index + k * count] for k in batch))
        live.log(done)
        progress("eval", done, total, checkpoint=name, benchmark=bench, shard=index)
    ordered = [saved[index + k * count] for k in range(len(rows))]
    atomic_write(
        _shard_file(folder, bench, index, count),
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ordered),
    )
    for part in _part_files(folder, bench, index, count):
        part.unlink(missing_ok=True)
    live.log(done, force=True)  # the benchmark's last running accuracy is over all its rows
    return done


def _judged(params: EvalParams) -> list[str]:
    """The benchmarks the LLM judge scores."""
    return [b.name for b in params.benchmarks if params.judged(b)]


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
    folder: Path,
    bench: str,
) -> dict[str, Any]:
    """Add the LLM verdict to every rule verdict (``rule_correct`` keeps the rule's; ``correct``
    becomes the judge's, or stays the rule's when the judge's reply was unparseable or its
    request failed) and return the summary fields comparing the two."""
    from visionr1_jobs.eval.judge_parts import judge_in_parts
    from visionr1_jobs.eval.llm_judge import load_prompt

    assert params.llm_judge is not None
    judged, reused = judge_in_parts(
        judge,
        rows,
        verdicts,
        teacher=params.llm_judge,
        prompt=load_prompt(),
        folder=folder,
        bench=bench,
        part_rows=params.batch_size,
    )
    for v, j in zip(verdicts, judged, strict=True):
        v["rule_correct"] = v["correct"]
        v.update(j)
    n = len(verdicts)
    parsed = [v for v in verdicts if v["llm_correct"] is not None]
    return {
        "rule_accuracy": sum(v["rule_correct"] for v in verdicts) / n if n else 0.0,
        "llm_accuracy": sum(v["correct"] for v in verdicts) / n if n else 0.0,
        "judge_unparsed": sum(v["judge_status"] == "unparsed" for v in verdicts),
        "judge_errors": sum(v["judge_status"] == "error" for v in verdicts),
        "judge_reused": reused,
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
    markers: list[dict[str, Any]],
) -> StageManifest:
    """Score every shard's predictions, write the summaries and reports, log to MLflow and
    return the manifest. A pure function of the shard files: safe to run again."""
    from visionr1_jobs.eval.report import markdown, plot
    from visionr1_jobs.eval.scoring import score_row, summarize
    from visionr1_jobs.tracking import stage_run

    out_dir = stage_dir(cfg)
    count = len(markers)
    started = min((m["started_at"] for m in markers if m.get("started_at")), default=None)
    judged_benches = [b for b in _judged(params) if b in benches]
    results: dict[str, dict[str, dict[str, Any]]] = {}
    outputs: dict[str, str] = {}
    rows_count: dict[str, int] = {}
    settings = {
        "temperature": params.temperature,
        "top_p": params.top_p,
        "max_new_tokens": params.max_new_tokens,
        "retries_missing_answer": params.retries_missing_answer,
        "judge": params.judge_mode(),
        "judged_benchmarks": judged_benches,
        # Per checkpoint: "none" (the paper's protocol) or the sha256 of its system prompt (the
        # text is in each summary's system_prompt).
        "system_prompts": {
            n: "none" if params.system_prompt(n) is None else _sha(params.system_prompt(n) or "")
            for n in checkpoints
        },
        "seed": params.seed,
        "backend": params.backend.kind,
        "shards": count,
    }
    judge: GenerationBackend | None = None
    if judged_benches:
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
                path = _shard_file(folder, bench, i, count)
                if not path.exists():
                    raise shards.ShardsIncomplete(
                        f"{path} is missing: shard {i} has not evaluated {name}/{bench}; "
                        "rerun that shard before merging"
                    )
                rows += _read_jsonl(path)
            verdicts = [score_row(bench, r) for r in rows]
            compared = (
                _apply_judge(
                    judge, params, rows, verdicts, out_dir / JUDGE_DIR / folder.name, bench
                )
                if judge is not None and bench in judged_benches
                else {}
            )
            served.update(compared.get("judge_models", ()))
            summary = summarize(bench, rows, verdicts)
            summary.update(compared)
            summary.update(
                checkpoint=name,
                model=model,
                system_prompt=params.system_prompt(name),
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
            metrics[f"{base}.failed_rows"] = float(s["failed"])
            if s.get("mean_response_tokens") is not None:
                metrics[f"{base}.mean_response_tokens"] = s["mean_response_tokens"]
            for k, v in s.items():
                if k.endswith("_accuracy") and isinstance(v, float):
                    metrics[f"{base}.{k}"] = v
            if "judge_unparsed" in s:
                metrics[f"{base}.judge_unparsed"] = float(s["judge_unparsed"])
                metrics[f"{base}.judge_errors"] = float(s["judge_errors"])
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
    return manifest


def _setup(
    cfg: ResolvedStageConfig,
) -> tuple[EvalParams, dict[str, str], dict[str, Any]]:
    params = cfg.stage_params()
    assert isinstance(params, EvalParams)
    keys = [k for k in cfg.inputs if k.startswith("checkpoint:")]
    if not keys:
        raise InvalidInput("config.inputs has no 'checkpoint:<name>' entry; nothing to evaluate")
    checkpoints = {k.split(":", 1)[1]: resolve_checkpoint(cfg, k) for k in keys}
    return params, checkpoints, _load_benchmarks(cfg, params)


def run(
    cfg: ResolvedStageConfig, generator_factory: GeneratorFactory | None = None
) -> StageManifest | None:
    """The stage program (see the module docstring)."""
    started = time.time()
    params = cfg.stage_params()
    assert isinstance(params, EvalParams)
    if _judged(params):
        _check_judge(params)  # before loading anything
    params, checkpoints, benches = _setup(cfg)
    index, count = shard_from_env()
    shards.agree_on_plan(stage_dir(cfg), _plan(benches, count, params), "eval")
    marker = _generate_shards(
        cfg, params, checkpoints, benches, index, count, generator_factory or _default_generator
    )
    previous = shards.read_marker(stage_dir(cfg), index) or {}
    marker["started_at"] = previous.get("started_at", started)
    manifest = shards.finish_shard(
        cfg,
        index,
        count,
        marker,
        lambda markers: _merge(cfg, params, checkpoints, benches, markers),
    )
    if manifest is None:
        # Not the last shard: done without a manifest; the last shard to finish merges.
        print(
            f"[eval] shard {index}/{count} done; waiting for the other shards to merge",
            flush=True,
        )
    return manifest


def merge(cfg: ResolvedStageConfig) -> StageManifest:
    """Merge the finished shards again and write the manifest (no generation): for a Job whose
    pods all finished but whose merging pod died before ``_manifest.json``. Raises
    :class:`visionr1_jobs.shards.ShardsIncomplete` naming the shards that have not finished."""
    params, checkpoints, benches = _setup(cfg)
    return shards.merge_again(
        cfg, lambda markers: _merge(cfg, params, checkpoints, benches, markers)
    )
