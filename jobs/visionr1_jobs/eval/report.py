"""Eval reports: JSON, markdown and a plot comparing checkpoints, with the paper's numbers beside."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

# Vision-R1 paper (method.md §7), accuracy in percent. The paper judged MathVista and MathVerse
# with gpt-4o-mini; our default is rule-based, so expect a gap of a few points there.
PAPER: dict[str, dict[str, float]] = {
    "Qwen2.5-VL-7B (base)": {
        "mathvista": 68.1,
        "mathverse": 46.7,
        "mmmath": 34.1,
        "dynamath": 50.7,
    },
    "Vision-R1-7B": {"mathvista": 73.5, "mathverse": 52.4, "mmmath": 40.2, "dynamath": 56.3},
    "Vision-R1-72B": {"mathvista": 78.2, "mathverse": 63.2, "mmmath": 59.3, "dynamath": 66.4},
}
PAPER_JUDGE = {
    "mathvista": "gpt-4o-mini",
    "mathverse": "gpt-4o-mini",
    "mmmath": "rule",
    "dynamath": "rule",
}
# Categories shown in the markdown (others stay in the JSON).
HEADLINE_DIMS = {
    "mathvista": ("paper", "task"),
    "mathverse": ("problem_version",),
    "mmmath": ("difficulty",),
    "dynamath": ("level",),
    "toy": ("kind",),
}


def _rank(name: str) -> tuple[int, int]:
    """Pipeline position of a checkpoint: base, sft, each PTST sub-stage, the final model, then
    anything else (a path) in the order given."""
    if name == "base":
        return (0, 0)
    if name == "sft":
        return (1, 0)
    m = re.fullmatch(r"grpo/stage-(\d+)", name)
    if m:
        return (2, int(m.group(1)))
    if name == "grpo":
        return (3, 0)
    # A checkpoint named by path (an ablation evaluating another run's model) ranks by what
    # its folder says it is.
    parts = Path(name).parts
    if "sft" in parts:
        return (1, 1)
    if "grpo" in parts:
        return (3, 1)
    return (4, 0)


def pipeline_order(
    results: dict[str, dict[str, dict[str, Any]]],
) -> dict[str, dict[str, dict[str, Any]]]:
    """``results`` with its checkpoints in pipeline order (stable for the rest)."""
    return dict(sorted(results.items(), key=lambda kv: _rank(kv[0])))


def label(name: str) -> str:
    """A reader's name for a checkpoint: ``grpo/stage-1`` → ``GRPO PTST stage 1``."""
    if name == "base":
        return "base model"
    if name == "sft":
        return "SFT (cold start)"
    m = re.fullmatch(r"grpo/stage-(\d+)", name)
    if m:
        return f"GRPO PTST stage {m.group(1)}"
    if name == "grpo":
        return "GRPO final"
    parts = Path(name).parts
    if len(parts) > 1:
        # A model folder from elsewhere: its last folders say what it is and fit a table.
        what = "SFT model" if "sft" in parts else "GRPO model" if "grpo" in parts else "model"
        return f"{what} at …/{'/'.join(parts[-3:])}"
    return name


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def markdown(results: dict[str, dict[str, dict[str, Any]]], settings: dict[str, Any]) -> str:
    """``results[checkpoint][benchmark]`` summaries → a markdown report (pipeline order)."""
    results = pipeline_order(results)
    benches = sorted({b for per in results.values() for b in per})
    lines = ["# Vision-R1 evaluation", ""]
    lines.append("Settings: " + ", ".join(f"{k}={v}" for k, v in sorted(settings.items())))
    systems = {
        ckpt: next((s.get("system_prompt") for s in per.values()), None)
        for ckpt, per in results.items()
    }
    if any(systems.values()):
        lines += ["", "## System prompts", ""]
        lines += ["Evaluated as trained: the paper's protocol has no system prompt.", ""]
        for ckpt, text in systems.items():
            lines.append(f"- {ckpt}: " + (f"`{' '.join(text.split())}`" if text else "none"))
    lines += ["", "## Accuracy (%)", ""]
    lines.append("| checkpoint | " + " | ".join(benches) + " | what it is |")
    lines.append("|---" * (len(benches) + 2) + "|")
    for ckpt, per in results.items():
        cells = [_pct(per[b]["accuracy"]) if b in per else "–" for b in benches]
        lines.append(f"| {ckpt} | " + " | ".join(cells) + f" | {label(ckpt)} |")
    paper_benches = [b for b in benches if any(b in p for p in PAPER.values())]
    if paper_benches:
        for name, nums in PAPER.items():
            cells = [f"{nums[b]:.1f}" if b in nums else "–" for b in benches]
            lines.append(f"| paper: {name} | " + " | ".join(cells) + " | the paper's number |")
        judges = ", ".join(f"{b}: {PAPER_JUDGE[b]}" for b in paper_benches)
        judged = set(settings.get("judged_benchmarks") or ())
        ours = ", ".join(f"{b}: {'llm judge' if b in judged else 'rule'}" for b in paper_benches)
        lines += ["", f"Paper judges ({judges}); ours ({ours})."]
    lines += _judge_section(results, settings)
    lines += ["", "## Format and length", ""]
    lines.append(
        "| checkpoint | benchmark | n | format rate (%) | mean tokens | mean chars | failed |"
    )
    lines.append("|---|---|---|---|---|---|---|")
    for ckpt, per in results.items():
        for b, s in sorted(per.items()):
            tok = s.get("mean_response_tokens")
            lines.append(
                f"| {ckpt} | {b} | {s['n']} | {_pct(s['format_rate'])} | "
                f"{'–' if tok is None else f'{tok:.0f}'} | {s['mean_response_chars']:.0f} | "
                f"{s.get('failed', 0)} |"
            )
    lines += [
        "",
        "failed: requests that failed for good at generation (after the backend's retries); "
        "they count as wrong answers.",
    ]
    for b in benches:
        dims = HEADLINE_DIMS.get(b, ())
        for dim in dims:
            labels = sorted(
                {
                    lab
                    for per in results.values()
                    for lab in per.get(b, {}).get("per_category", {}).get(dim, {})
                }
            )
            if not labels:
                continue
            lines += ["", f"## {b}: by {dim} (%)", ""]
            lines.append("| checkpoint | " + " | ".join(labels) + " |")
            lines.append("|---" * (len(labels) + 1) + "|")
            for ckpt, per in results.items():
                cats = per.get(b, {}).get("per_category", {}).get(dim, {})
                cells = [_pct(cats[lab]["accuracy"]) if lab in cats else "–" for lab in labels]
                lines.append(f"| {ckpt} | " + " | ".join(cells) + " |")
    extras = [
        (ckpt, b, k, v)
        for ckpt, per in results.items()
        for b, s in per.items()
        for k, v in s.items()
        if k.endswith("_accuracy") and isinstance(v, float)
    ]
    if extras:
        lines += ["", "## Other metrics", ""]
        lines += [f"- {ckpt} / {b}: {k} = {_pct(v)}" for ckpt, b, k, v in extras]
    return "\n".join(lines) + "\n"


def _judge_section(
    results: dict[str, dict[str, dict[str, Any]]], settings: dict[str, Any]
) -> list[str]:
    """With the LLM judge: who judged, and rule vs LLM accuracy side by side per benchmark."""
    if not settings.get("judged_benchmarks"):
        return []
    sha = str(settings.get("judge_prompt_sha256", ""))[:12]
    lines = [
        "",
        "## Judge",
        "",
        f"Headline accuracy on {', '.join(settings['judged_benchmarks'])} uses the LLM judge "
        f"(the other benchmarks are scored by rules): model {settings.get('judge_model_served')} "
        f"(requested {settings.get('judge_model_requested')}, backend "
        f"{settings.get('judge_backend')}), prompt {settings.get('judge_prompt_version')} "
        f"(sha256 {sha}…), temperature {settings.get('judge_temperature')}. Replies without a "
        "verdict after the re-asks keep the rule-based verdict (column 'unparsed'), and so do "
        "rows whose judge request failed for good (column 'errors', each error on its row).",
        "",
        "| checkpoint | benchmark | n | rule (%) | llm (%) | agreement (%) | unparsed | errors |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for ckpt, per in results.items():
        for b, s in sorted(per.items()):
            if "rule_accuracy" not in s:
                continue
            lines.append(
                f"| {ckpt} | {b} | {s['n']} | {_pct(s['rule_accuracy'])} | "
                f"{_pct(s['llm_accuracy'])} | {_pct(s.get('judge_agreement'))} | "
                f"{s['judge_unparsed']} | {s.get('judge_errors', 0)} |"
            )
    return lines


def plot(results: dict[str, dict[str, dict[str, Any]]], path: str | Path) -> Path:
    """Grouped bars: accuracy per benchmark for each checkpoint (base, SFT, PTST stages, final),
    with the paper's Vision-R1-7B number as a marker where the benchmark matches."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from visionr1_jobs.contract import atomic_savefig

    results = pipeline_order(results)
    benches = sorted({b for per in results.values() for b in per})
    ckpts = list(results)
    width = 0.8 / max(len(ckpts), 1)
    fig, ax = plt.subplots(figsize=(max(4.0, 1.6 * len(benches) + 1), 3.6))
    for i, ckpt in enumerate(ckpts):
        xs = [j + (i - (len(ckpts) - 1) / 2) * width for j in range(len(benches))]
        ys = [100 * results[ckpt].get(b, {}).get("accuracy", 0.0) for b in benches]
        ax.bar(xs, ys, width, label=label(ckpt))
    with_paper = False
    for j, b in enumerate(benches):
        ref = PAPER["Vision-R1-7B"].get(b)
        if ref is not None:
            with_paper = True
            ax.plot([j - 0.4, j + 0.4], [ref, ref], "k--", lw=1)
    ax.set_xticks(range(len(benches)), benches)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    title = "accuracy by checkpoint, in pipeline order"
    ax.set_title(title + (" (dashed: paper Vision-R1-7B)" if with_paper else ""), fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return atomic_savefig(fig, path)
