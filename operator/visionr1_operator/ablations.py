"""``visionr1 ablations``: the paper's ablations at toy scale, each variant a real ``run-local``.

From one base manifest (``examples/tiny-cpu.yaml``) and one seed it runs four variants, two at a
time by default (``recipe`` and ``zero`` first; ``long`` and ``sft_only`` once the recipe's SFT
checkpoint exists):

* ``recipe``: cold start (synthesis → filter → SFT) + GRPO with the PTST table (Vision-R1);
* ``sft_only``: the recipe's SFT checkpoint alone (Vision-R1-CI): an eval-only run;
* ``long``: the same SFT checkpoint + one GRPO stage at the final PTST budget, with as many
  completions in all as the PTST table samples (Vision-R1-Long);
* ``zero``: GRPO straight from the base model, no cold start, with the 0.5·format + 0.5·accuracy
  reward and a format instruction as the system prompt (Vision-R1-Zero), same completions.

Every variant is a VisionR1Run of its own (manifest written to ``ROOT/seed-N/manifests/``),
executed by its own ``visionr1 run-local`` process in ``ROOT/seed-N/<variant>/`` (log:
``ROOT/seed-N/logs/<variant>.log``) and tracked in one MLflow store
(``ROOT/mlflow.db``, experiment ``visionr1-ablations``) so the runs table compares them. The toy
data and the tiny model are drawn from the seed, and every stage is seeded with it. Afterwards
``ROOT/summary.json``, ``summary.md`` and ``summary.png`` hold accuracy (95% Wilson interval),
format rate and mean length per variant, read from each run's eval report.
"""

from __future__ import annotations

import copy
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

VARIANTS: tuple[str, ...] = ("recipe", "sft_only", "long", "zero")
EXPERIMENT = "visionr1-ablations"
MODEL_DIR = "models/tiny-qwen25vl"
# The paper's ablation (Table 4 of Vision-R1): average accuracy over the math benchmarks and
# average completion tokens. Shapes to compare against, not numbers to match.
PAPER: dict[str, dict[str, float]] = {
    "zero": {"accuracy": 50.7, "tokens": 1285},
    "sft_only": {"accuracy": 44.5, "tokens": 3566},
    "long": {"accuracy": 47.7, "tokens": 3107},
    "recipe": {"accuracy": 55.4, "tokens": 2057},
}
PAPER_NAMES = {
    "recipe": "Vision-R1",
    "sft_only": "Vision-R1-CI",
    "long": "Vision-R1-Long",
    "zero": "Vision-R1-Zero",
}
ZERO_SYSTEM_PROMPT = (
    "Think step by step inside <think> </think> tags, then give the final answer inside "
    '<answer> </answer> tags as "Final Answer:X".'
)


# --------------------------------------------------------------------------- manifests (pure)


def total_completions(ptst: list[dict[str, int]], prompts_per_step: int) -> int:
    """Completions a PTST table samples in all: Σ steps × samples per prompt × prompts per step."""
    return sum(r["steps"] * r["numGenerations"] for r in ptst) * prompts_per_step


def long_stage(ptst: list[dict[str, int]]) -> dict[str, int]:
    """One stage at the table's final budget and samples, with as many completions in all."""
    last = ptst[-1]
    samples = sum(r["steps"] * r["numGenerations"] for r in ptst)
    steps = math.ceil(samples / last["numGenerations"])
    return {
        "maxCompletionLength": last["maxCompletionLength"],
        "numGenerations": last["numGenerations"],
        "steps": steps,
    }


def variant_manifest(base: dict[str, Any], variant: str, seed: int, root: Path) -> dict[str, Any]:
    """The VisionR1Run of one ablation variant, derived from the demo manifest ``base``.

    ``root`` is the seed's folder (absolute); the variant runs in ``root/<variant>`` and shares
    ``root/toy`` (data) and ``root/models`` (the tiny model) with the others; ``sft_only``,
    ``long`` read the recipe's SFT checkpoint.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown ablation variant {variant!r}; known: {', '.join(VARIANTS)}")
    run = copy.deepcopy(base)
    run["metadata"] = {"name": f"{variant.replace('_', '-')}-seed{seed}"}
    spec = run["spec"]
    spec["baseModel"] = {"name": str(root / MODEL_DIR)}
    spec["storage"] = {"localDir": str(root / variant)}
    spec["mlflow"] = {
        "experiment": EXPERIMENT,
        "trackingUri": f"sqlite:///{root.parent / 'mlflow.db'}",
    }
    st = spec["stages"]
    st["synthesis"]["from"]["dataset"] = str(root / "toy" / "train")
    for role in ("describer", "reasoner"):
        st["synthesis"]["params"].setdefault(role, {}).setdefault("sampling", {})["seed"] = seed
    st["sft"]["params"]["seed"] = seed
    grpo = st["grpo"]["params"]
    grpo["seed"] = seed
    grpo["dataset"]["path"] = str(root / "toy" / "rl")
    ev = st["eval"]["params"]
    ev["seed"] = seed
    for bench in ev["benchmarks"]:
        bench["path"] = str(root / "toy" / "bench")
    sft_final = str(root / "recipe" / "sft" / "final")
    if variant == "recipe":
        ev["checkpoints"] = ["grpo/stage-1", "grpo"] if len(grpo["ptst"]) > 1 else ["grpo"]
        return run
    for stage in ("synthesis", "filter", "sft"):
        st[stage] = {"enabled": False}
    if variant == "sft_only":
        st["grpo"] = {"enabled": False}
        ev["checkpoints"] = [sft_final]
    elif variant == "long":
        st["grpo"]["from"] = {"checkpoint": sft_final}
        grpo["ptst"] = [long_stage(grpo["ptst"])]
        ev["checkpoints"] = ["grpo"]
    else:  # zero
        st["grpo"]["from"] = {"baseModel": True}
        grpo["ptst"] = [long_stage(grpo["ptst"])]
        grpo["reward"] = "format_plus_accuracy"
        grpo["systemPrompt"] = ZERO_SYSTEM_PROMPT
        ev["checkpoints"] = ["grpo"]
    return run


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``extra`` merged in (nested dicts merged, anything else replaced)."""
    out = copy.deepcopy(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


# --------------------------------------------------------------------------- summary (pure)


def wilson(correct: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """The Wilson score interval of a proportion (scipy's binomtest)."""
    from scipy.stats import binomtest

    if n == 0:
        return (0.0, 1.0)
    ci = binomtest(correct, n).proportion_ci(confidence_level=confidence, method="wilson")
    return (float(ci.low), float(ci.high))


def mean_ci(values: list[float], z: float = 1.96) -> tuple[float, float, float]:
    """Mean and its normal-approximation 95% interval."""
    n = len(values)
    if n == 0:
        return (math.nan, math.nan, math.nan)
    m = sum(values) / n
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    half = z * sd / math.sqrt(n)
    return (m, m - half, m + half)


def variant_result(workdir: Path, checkpoint: str, benchmark: str = "toy") -> dict[str, Any]:
    """Accuracy (Wilson 95%), format rate and mean tokens (95%) of one variant's final eval,
    recomputed from the per-problem verdicts the eval stage wrote."""
    from visionr1_jobs.stages.eval import checkpoint_slug

    path = workdir / "eval" / checkpoint_slug(checkpoint) / f"{benchmark}.verdicts.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no verdicts (did the variant's eval stage finish?)")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    n = len(rows)
    correct = sum(bool(r["verdict"]["correct"]) for r in rows)
    formatted = sum(bool(r["verdict"].get("format_ok")) for r in rows)
    tokens = [float(r["response_tokens"]) for r in rows if r.get("response_tokens") is not None]
    low, high = wilson(correct, n)
    mean_tokens, tok_low, tok_high = mean_ci(tokens)
    return {
        "accuracy": correct / n if n else 0.0,
        "ci_low": low,
        "ci_high": high,
        "format_rate": formatted / n if n else 0.0,
        "mean_tokens": mean_tokens,
        "tokens_ci_low": tok_low,
        "tokens_ci_high": tok_high,
        "n": n,
        "correct": correct,
        "checkpoint": checkpoint,
    }


def final_checkpoint(manifest: dict[str, Any]) -> str:
    return manifest["spec"]["stages"]["eval"]["params"]["checkpoints"][-1]


def markdown(summary: dict[str, dict[str, Any]], seed: int, wall_s: float | None = None) -> str:
    lines = [
        f"# Ablations at toy scale (seed {seed})",
        "",
        "Accuracy on held-out toy problems with its 95% Wilson interval; the paper's averages "
        "(Vision-R1 Table 4) beside, for the shape, not the scale.",
        "",
        "| variant | accuracy (%) | 95% interval | format rate (%) | mean tokens | n "
        "| paper | paper accuracy (%) | paper tokens |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for v in VARIANTS:
        if v not in summary:
            continue
        s = summary[v]
        p = PAPER[v]
        lines.append(
            f"| {v} | {100 * s['accuracy']:.1f} | {100 * s['ci_low']:.1f}–{100 * s['ci_high']:.1f}"
            f" | {100 * s['format_rate']:.1f} | {s['mean_tokens']:.0f} | {s['n']} | "
            f"{PAPER_NAMES[v]} | {p['accuracy']:.1f} | {p['tokens']:.0f} |"
        )
    if "recipe" in summary and "sft_only" in summary:
        r, c = summary["recipe"], summary["sft_only"]
        gain = 100 * (r["accuracy"] - c["accuracy"])
        apart = r["ci_low"] > c["ci_high"]
        lines += [
            "",
            f"GRPO over the cold start: {gain:+.1f} points; the 95% intervals "
            f"{'do not overlap' if apart else 'overlap'}.",
        ]
    if wall_s is not None:
        lines.append(f"Wall time of the four runs: {wall_s / 60:.1f} min.")
    return "\n".join(lines) + "\n"


def plot(summary: dict[str, dict[str, Any]], path: Path, seed: int) -> Path:
    """Two panels: accuracy with its Wilson interval, mean length with its 95% interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [v for v in VARIANTS if v in summary]
    xs = range(len(names))
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.6))
    acc = [100 * summary[v]["accuracy"] for v in names]
    lo = [a - 100 * summary[v]["ci_low"] for a, v in zip(acc, names, strict=True)]
    hi = [100 * summary[v]["ci_high"] - a for a, v in zip(acc, names, strict=True)]
    a1.bar(xs, acc, yerr=[lo, hi], capsize=4, color="#4c72b0")
    a1.set_xticks(list(xs), names)
    a1.set_ylabel("accuracy (%)")
    a1.set_ylim(0, 100)
    a1.set_title("accuracy, 95% Wilson interval")
    tok = [summary[v]["mean_tokens"] for v in names]
    tlo = [t - summary[v]["tokens_ci_low"] for t, v in zip(tok, names, strict=True)]
    thi = [summary[v]["tokens_ci_high"] - t for t, v in zip(tok, names, strict=True)]
    a2.bar(xs, tok, yerr=[tlo, thi], capsize=4, color="#dd8452")
    a2.set_xticks(list(xs), names)
    a2.set_ylabel("mean completion tokens")
    a2.set_title("length, 95% interval")
    n = max(summary[v]["n"] for v in names)
    fig.suptitle(f"toy ablations, seed {seed}, n = {n} held-out problems", fontsize=10)
    fig.tight_layout()
    from visionr1_jobs.contract import atomic_savefig

    return atomic_savefig(fig, path)


def reward_curves(uri: str, experiment_id: str, seed: int, path: Path) -> Path | None:
    """Reward and completion length per GRPO step of each variant with RL, read back from the
    MLflow metric history of its GRPO stage run (the PTST sub-stages on one step axis)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    runs = client.search_runs(
        [experiment_id], filter_string=f"tags.`visionr1.seed` = '{seed}'", max_results=50
    )
    series: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for parent in runs:
        variant = parent.data.tags.get("visionr1.variant")
        stage = client.search_runs(
            [experiment_id],
            filter_string=(
                f"tags.mlflow.parentRunId = '{parent.info.run_id}' and "
                "tags.`visionr1.stage` = 'grpo'"
            ),
            max_results=1,
        )
        if not variant or not stage:
            continue
        rid = stage[0].info.run_id
        series[variant] = {
            key: sorted((m.step, m.value) for m in client.get_metric_history(rid, key))
            for key in ("reward", "completions/mean_length")
        }
    if not series:
        return None
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.4))
    for variant in VARIANTS:
        if variant not in series:
            continue
        for ax, key in ((a1, "reward"), (a2, "completions/mean_length")):
            pts = series[variant][key]
            if not pts:
                continue
            xs, ys = zip(*pts, strict=True)
            k = 5  # a 5-step moving average: one step sees only promptsPerStep prompts
            smooth = [
                sum(ys[max(0, i - k + 1) : i + 1]) / len(ys[max(0, i - k + 1) : i + 1])
                for i in range(len(ys))
            ]
            ax.plot(xs, smooth, label=variant)
    a1.set_title("GRPO reward (5-step mean)", fontsize=9)
    a1.set_xlabel("step")
    a1.set_ylim(0, 1)
    a2.set_title("mean completion tokens", fontsize=9)
    a2.set_xlabel("step")
    a1.legend(fontsize=8)
    fig.suptitle(f"toy ablations, seed {seed}: from MLflow metric history", fontsize=10)
    fig.tight_layout()
    from visionr1_jobs.contract import atomic_savefig

    return atomic_savefig(fig, path)


# --------------------------------------------------------------------------- running


@dataclass(frozen=True)
class ToySizes:
    """How much toy data to draw (the same defaults as ``make demo``)."""

    n: int = 800
    n_rl: int = 800
    n_bench: int = 300


def _prepare(root: Path, seed: int, sizes: ToySizes, out: Any) -> None:
    """Toy data and tiny model of this seed (skipped when already there)."""
    from visionr1_jobs.toy.dataset import write_toy_dataset
    from visionr1_jobs.toy.model import create_tiny_model

    if not (root / "toy" / "bench").exists():
        rows = write_toy_dataset(
            root / "toy", sizes.n, seed, n_rl=sizes.n_rl, n_bench=sizes.n_bench
        )
        print(f"toy data (seed {seed}): {rows}", file=out, flush=True)
    if not (root / MODEL_DIR / "config.json").exists():
        create_tiny_model(root / MODEL_DIR, seed=seed)
        print(f"tiny model (seed {seed}): {root / MODEL_DIR}", file=out, flush=True)


def _experiment(root: Path) -> str:
    """Create the shared experiment with its artifacts beside the store (not in one variant)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    exp = client.get_experiment_by_name(EXPERIMENT)
    if exp is not None:
        return exp.experiment_id
    return client.create_experiment(EXPERIMENT, artifact_location=(root / "mlartifacts").as_uri())


#: The runs-table columns that compare the variants (the MLflow UI's column keys).
TABLE_COLUMNS: tuple[str, ...] = (
    "metrics.`final.toy.accuracy`",
    "metrics.`final.toy.format_rate`",
    "metrics.`final.toy.mean_tokens`",
    "params.`grpo.from`",
    "params.`grpo.ptst`",
    "params.`grpo.reward`",
    "metrics.`time.grpo_s`",
    "metrics.`time.eval_s`",
    "tags.`visionr1.seed`",
)
SHARED_VIEW = "ablations"


def share_view(uri: str, experiment_id: str) -> str:
    """Save a runs-table view of the parent runs with the comparison columns, the way the UI's
    Share button does (an experiment tag ``mlflow.sharedViewState.<key>``); returns the URL
    path that opens it (append to the MLflow server's address)."""
    from mlflow.tracking import MlflowClient

    state = {
        "searchFilter": "tags.`visionr1.executor` = 'local'",
        "orderByKey": "attributes.start_time",
        "orderByAsc": True,
        "selectedColumns": list(TABLE_COLUMNS),
        "columnWidths": {c: 150 for c in TABLE_COLUMNS},
    }
    MlflowClient(uri).set_experiment_tag(
        experiment_id, f"mlflow.sharedViewState.{SHARED_VIEW}", json.dumps(state)
    )
    return (
        f"/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
        f"&viewStateShareKey={SHARED_VIEW}"
    )


def _tag_parent(uri: str, workdir: Path, tags: dict[str, str]) -> None:
    """Tag a variant's parent run (its id is in the executor's state file)."""
    from visionr1_operator.local import STATE
    from visionr1_operator.mlflow_runs import set_tags

    state = json.loads((workdir / STATE).read_text())
    if state.get("parentRunId"):
        set_tags(uri, state["parentRunId"], tags)


#: What a variant waits for: ``sft_only`` and ``long`` start from the recipe's SFT checkpoint.
NEEDS_RECIPE_SFT = ("sft_only", "long")
#: The order variants start in when a slot is free: the two that need nothing first (the
#: recipe, whose SFT the others wait for, and zero), then long (long) before sft_only (an eval).
START_ORDER: tuple[str, ...] = ("recipe", "zero", "long", "sft_only")


def _sft_done(seed_root: Path) -> bool:
    """The recipe's SFT stage finished (its output manifest is the contract's done marker)."""
    return (seed_root / "recipe" / "sft" / "_manifest.json").exists()


@dataclass
class _Lane:
    """One variant's ``visionr1 run-local`` subprocess."""

    variant: str
    proc: Any
    log: Path
    started: float


def _default_sigint() -> None:
    """In the child before exec: SIGINT at its default, so Python turns it into the executor's
    KeyboardInterrupt even when we were started with SIGINT ignored (a background job of a
    non-interactive shell, some CI runners), which the child would otherwise inherit."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start(variant: str, manifest: Path, workdir: Path, log: Path) -> Any:
    import subprocess

    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as fh:
        # A session of its own: a Ctrl-C reaches it once, forwarded by us (see _stop), so its
        # executor stops its stage and marks the MLflow runs KILLED exactly once.
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "visionr1_operator.cli",
                "run-local",
                str(manifest),
                "--workdir",
                str(workdir),
            ],
            stdout=fh,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=_default_sigint,
        )


def _stop(lanes: dict[str, _Lane], out: Any) -> None:
    """Forward Ctrl-C to every running variant and wait for them to save their state."""
    import signal
    import subprocess

    for lane in lanes.values():
        if lane.proc.poll() is None:
            lane.proc.send_signal(signal.SIGINT)
    for lane in lanes.values():
        try:
            lane.proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            lane.proc.kill()
            lane.proc.wait()
    print("interrupted: rerun the same command to resume where each variant stopped", file=out)


def _terminate_as_interrupt() -> Any:
    """Treat SIGTERM (``kill``, a CI runner's timeout) like Ctrl-C while variants run: the
    variants are sessions of their own and would outlive us otherwise. Returns the undo."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    return lambda: signal.signal(signal.SIGTERM, previous)


def _last_line(log: Path) -> str:
    """The newest progress or status line of a variant's log (for the heartbeat)."""
    try:
        with open(log, "rb") as fh:
            fh.seek(max(0, fh.seek(0, 2) - 4096))
            lines = [ln.strip() for ln in fh.read().decode("utf-8", "replace").splitlines()]
    except OSError:
        return ""
    lines = [ln for ln in lines if ln]
    return lines[-1][:100] if lines else ""


def _fmt_min(seconds: float) -> str:
    return f"{int(seconds // 60)}:{int(seconds % 60):02d}"


def run_ablations(
    base_path: Path,
    seed: int,
    root: Path,
    *,
    variants: tuple[str, ...] = VARIANTS,
    sizes: ToySizes = ToySizes(),
    overrides: dict[str, Any] | None = None,
    jobs: int = 2,
    heartbeat_s: float = 60.0,
    out: Any = sys.stdout,
) -> dict[str, dict[str, Any]]:
    """Run the variants through the local executor, ``jobs`` at a time, and write the summary.

    Each variant is its own ``visionr1 run-local`` process (log: ``ROOT/seed-N/logs/V.log``);
    ``sft_only`` and ``long`` start once the recipe's SFT has finished. With the stages on one
    thread each (``make ablations`` sets OMP_NUM_THREADS=1), two lanes use two cores.
    """
    root = root.resolve()
    seed_root = root / f"seed-{seed}"
    seed_root.mkdir(parents=True, exist_ok=True)
    base = yaml.safe_load(base_path.read_text())
    if overrides:
        base = _merge(base, overrides)
    _prepare(seed_root, seed, sizes, out)
    experiment_id = _experiment(root)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    order = [v for v in VARIANTS if v in variants]
    if any(v in NEEDS_RECIPE_SFT for v in order) and "recipe" not in order:
        if not _sft_done(seed_root):
            raise SystemExit("sft_only and long reuse the recipe's SFT checkpoint: run recipe too")
    manifests: dict[str, dict[str, Any]] = {}
    paths: dict[str, Path] = {}
    for variant in order:
        manifests[variant] = variant_manifest(base, variant, seed, seed_root)
        paths[variant] = seed_root / "manifests" / f"{variant}.yaml"
        paths[variant].parent.mkdir(parents=True, exist_ok=True)
        paths[variant].write_text(yaml.safe_dump(manifests[variant], sort_keys=False))

    started = time.monotonic()
    pending = [v for v in START_ORDER if v in order]
    lanes: dict[str, _Lane] = {}
    summary: dict[str, dict[str, Any]] = {}
    failed: dict[str, str] = {}
    last_beat = time.monotonic()
    restore = _terminate_as_interrupt()
    try:
        while pending or lanes:
            for variant in list(pending):
                if len(lanes) >= max(1, jobs):
                    break
                if variant in NEEDS_RECIPE_SFT and not _sft_done(seed_root):
                    if "recipe" in failed or ("recipe" not in lanes and "recipe" not in pending):
                        pending.remove(variant)
                        failed[variant] = "the recipe's SFT checkpoint was not made"
                    continue
                pending.remove(variant)
                log = seed_root / "logs" / f"{variant}.log"
                proc = _start(variant, paths[variant], seed_root / variant, log)
                lanes[variant] = _Lane(variant, proc, log, time.monotonic())
                print(f"▶ {variant} (seed {seed}) · log: {log}", file=out, flush=True)
            for variant, lane in list(lanes.items()):
                rc = lane.proc.poll()
                if rc is None:
                    continue
                del lanes[variant]
                took = time.monotonic() - lane.started
                if rc != 0:
                    failed[variant] = f"exit {rc}; log: {lane.log}"
                    print(f"✗ {variant} failed (exit {rc}) after {_fmt_min(took)}", file=out)
                    for line in lane.log.read_text(errors="replace").splitlines()[-12:]:
                        print(f"    {line}", file=out)
                    continue
                _tag_parent(
                    uri,
                    seed_root / variant,
                    {"visionr1.variant": variant, "visionr1.seed": str(seed)},
                )
                result = variant_result(seed_root / variant, final_checkpoint(manifests[variant]))
                result["wall_s"] = round(took, 1)
                summary[variant] = result
                print(
                    f"✓ {variant} done in {_fmt_min(took)}: accuracy "
                    f"{100 * result['accuracy']:.1f}% ({100 * result['ci_low']:.1f}–"
                    f"{100 * result['ci_high']:.1f}), {result['mean_tokens']:.0f} tokens",
                    file=out,
                    flush=True,
                )
            if lanes and time.monotonic() - last_beat >= heartbeat_s:
                last_beat = time.monotonic()
                for variant, lane in lanes.items():
                    print(f"  {variant:<8} {_last_line(lane.log)}", file=out, flush=True)
            time.sleep(0.5)
    except KeyboardInterrupt:
        _stop(lanes, out)
        raise SystemExit(130) from None
    finally:
        restore()
    if failed:
        raise SystemExit(
            "ablation variants failed: "
            + "; ".join(f"{v}: {why}" for v, why in failed.items())
            + " (rerun the same command to resume)"
        )
    wall = time.monotonic() - started
    doc = {v: summary[v] for v in order}
    from visionr1_jobs.contract import atomic_write, atomic_write_json

    atomic_write_json(root / "summary.json", doc)
    atomic_write(root / "summary.md", markdown(doc, seed, wall))
    plot(doc, root / "summary.png", seed)
    reward_curves(uri, experiment_id, seed, root / "reward_curve.png")
    # One copy per seed as well, so a second seed does not hide the first.
    atomic_write_json(seed_root / "summary.json", doc)
    atomic_write(seed_root / "summary.md", markdown(doc, seed, wall))
    print("\n" + markdown(doc, seed, wall), file=out, flush=True)
    print(
        f"summary: {root / 'summary.json'}, {root / 'summary.md'}, {root / 'summary.png'}",
        file=out,
    )
    view = share_view(uri, experiment_id)
    print(
        f"MLflow: mlflow ui --backend-store-uri {uri}, then open http://127.0.0.1:5000{view}",
        file=out,
    )
    return doc


# --------------------------------------------------------------------------- CLI


def add_arguments(parser: Any) -> None:
    parser.description = (
        "Run the toy ablations (recipe, sft_only, long, zero) through run-local and write "
        "ROOT/summary.json, summary.md and summary.png."
    )
    parser.add_argument("--seed", type=int, default=3, help="seed of data, model and every stage")
    parser.add_argument(
        "--base", default="examples/tiny-cpu.yaml", help="demo manifest the variants derive from"
    )
    parser.add_argument("--out", default=".visionr1/ablations", help="ROOT folder")
    parser.add_argument("--n", type=int, default=800, help="toy training problems (cold start)")
    parser.add_argument("--n-rl", type=int, default=800, help="toy RL problems")
    parser.add_argument("--n-bench", type=int, default=300, help="held-out toy problems")
    parser.add_argument(
        "--jobs",
        type=int,
        default=2,
        help="variants run at once (each stage on OMP_NUM_THREADS threads; default 2)",
    )
    parser.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help=f"comma-separated subset of {','.join(VARIANTS)} (default: all)",
    )


def main(args: Any) -> int:
    variants = tuple(v.strip() for v in args.variants.split(",") if v.strip())
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        print(
            f"error: --variants: unknown {', '.join(unknown)}; known: {', '.join(VARIANTS)}",
            file=sys.stderr,
        )
        return 2
    if args.seed < 0:
        print("error: --seed must be >= 0", file=sys.stderr)
        return 2
    base = Path(args.base)
    if not base.is_file():
        print(f"error: --base {base}: no such manifest", file=sys.stderr)
        return 2
    for name in ("n", "n_rl", "n_bench"):
        if getattr(args, name) < 1:
            print(f"error: --{name.replace('_', '-')} must be >= 1", file=sys.stderr)
            return 2
    if args.jobs < 1:
        print("error: --jobs must be >= 1", file=sys.stderr)
        return 2
    sizes = ToySizes(args.n, args.n_rl, args.n_bench)
    run_ablations(base, args.seed, Path(args.out), variants=variants, sizes=sizes, jobs=args.jobs)
    return 0
