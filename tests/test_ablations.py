"""`visionr1 ablations`: the four variants as VisionR1Runs, their summary, and a reduced run end
to end through run-local (real SFT, GRPO and eval on the toy world)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from visionr1_operator import ablations as A
from visionr1_operator.validate import validate_object

from repo_paths import REPO

BASE = yaml.safe_load((REPO / "examples" / "tiny-cpu.yaml").read_text())


@pytest.mark.parametrize("variant", A.VARIANTS)
def test_each_variant_is_a_valid_run_of_the_demo(variant: str, tmp_path: Path) -> None:
    run = A.variant_manifest(BASE, variant, 5, tmp_path / "seed-5")
    assert validate_object(run) == []
    st = run["spec"]["stages"]
    assert run["spec"]["mlflow"]["trackingUri"] == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert st["eval"]["params"]["seed"] == 5
    ptst = BASE["spec"]["stages"]["grpo"]["params"]["ptst"]
    per_step = BASE["spec"]["stages"]["grpo"]["params"]["promptsPerStep"]
    if variant == "recipe":
        assert st["sft"]["params"]["seed"] == 5 and st["grpo"]["params"]["ptst"] == ptst
    else:
        assert all(st[s] == {"enabled": False} for s in ("synthesis", "filter", "sft"))
    if variant in ("long", "zero"):
        [row] = st["grpo"]["params"]["ptst"]
        assert row["maxCompletionLength"] == ptst[-1]["maxCompletionLength"]
        # Same number of sampled completions as the PTST table.
        assert A.total_completions([row], per_step) >= A.total_completions(ptst, per_step)
        assert A.total_completions([row], per_step) < A.total_completions(ptst, per_step) + (
            row["numGenerations"] * per_step
        )
    if variant == "long":
        assert st["grpo"]["from"] == {"checkpoint": str(tmp_path / "seed-5/recipe/sft/final")}
    if variant == "zero":
        assert st["grpo"]["from"] == {"baseModel": True}
        assert st["grpo"]["params"]["reward"] == "format_plus_accuracy"
    if variant == "sft_only":
        assert st["grpo"] == {"enabled": False}
        assert st["eval"]["params"]["checkpoints"] == [str(tmp_path / "seed-5/recipe/sft/final")]


def test_unknown_variant_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown ablation variant 'ci'"):
        A.variant_manifest(BASE, "ci", 0, tmp_path)


def test_wilson_interval_matches_the_formula() -> None:
    low, high = A.wilson(50, 100)
    assert low == pytest.approx(0.4038, abs=1e-4) and high == pytest.approx(0.5962, abs=1e-4)
    low, high = A.wilson(0, 30)
    assert low == pytest.approx(0.0, abs=1e-9) and high == pytest.approx(0.1135, abs=1e-4)


def test_variant_result_is_computed_from_the_verdicts(tmp_path: Path) -> None:
    folder = tmp_path / "eval" / "grpo"
    folder.mkdir(parents=True)
    rows = [
        {"response_tokens": 10 + i, "verdict": {"correct": i % 4 == 0, "format_ok": i % 5 != 0}}
        for i in range(40)
    ]
    (folder / "toy.verdicts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = A.variant_result(tmp_path, "grpo")
    assert (r["n"], r["correct"]) == (40, 10)
    assert r["accuracy"] == 0.25 and r["format_rate"] == 32 / 40
    assert r["mean_tokens"] == pytest.approx(29.5)
    assert (r["ci_low"], r["ci_high"]) == pytest.approx(A.wilson(10, 40))
    assert r["tokens_ci_low"] < 29.5 < r["tokens_ci_high"]
    with pytest.raises(FileNotFoundError, match="no verdicts"):
        A.variant_result(tmp_path, "sft")


def test_cli_refuses_bad_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    from visionr1_operator.cli import main

    assert main(["ablations", "--variants", "recipe,ci"]) == 2
    assert "unknown ci" in capsys.readouterr().err
    assert main(["ablations", "--base", "nope.yaml"]) == 2
    assert "no such manifest" in capsys.readouterr().err


@pytest.mark.slow
def test_reduced_ablation_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """All four variants through run-local on a small world: the summary holds every variant,
    its numbers are the evals' (cross-checked against MLflow), and the parent runs compare."""
    import io

    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    small = {
        "spec": {
            "stages": {
                "sft": {"params": {"maxSteps": 6, "saveSteps": 3}},
                "grpo": {
                    "params": {
                        "promptsPerStep": 2,
                        "warmupSteps": 0,  # one step per sub-stage: let it learn
                        "ptst": [
                            {"maxCompletionLength": 16, "numGenerations": 4, "steps": 1},
                            {"maxCompletionLength": 24, "numGenerations": 2, "steps": 1},
                        ],
                    }
                },
                "eval": {
                    "params": {
                        "benchmarks": [{"name": "toy", "path": "toy/bench", "limit": 6}],
                        "maxNewTokens": 24,
                    }
                },
            }
        }
    }
    out = io.StringIO()
    summary = A.run_ablations(
        REPO / "examples" / "tiny-cpu.yaml",
        7,
        tmp_path / "abl",
        sizes=A.ToySizes(n=18, n_rl=8, n_bench=6),
        overrides=small,
        out=out,
    )
    root = tmp_path / "abl"
    on_disk = json.loads((root / "summary.json").read_text())
    assert set(on_disk) == set(A.VARIANTS) and on_disk == json.loads(json.dumps(summary))
    for variant, s in on_disk.items():
        assert {"accuracy", "ci_low", "ci_high", "format_rate", "mean_tokens", "n"} <= set(s)
        assert s["n"] == 6 and 0 <= s["ci_low"] <= s["accuracy"] <= s["ci_high"] <= 1
        # The numbers are the variant's own eval: recount its verdict file.
        ws = root / "seed-7" / variant
        again = A.variant_result(ws, s["checkpoint"])
        assert again["correct"] == s["correct"] and again["mean_tokens"] == s["mean_tokens"]
        report = json.loads((ws / "eval" / "report.json").read_text())
        assert report["results"][s["checkpoint"]]["toy"]["accuracy"] == s["accuracy"]
    # long and zero sampled as many completions in one stage as the recipe's two.
    for variant in ("long", "zero"):
        done = json.loads((root / "seed-7" / variant / "grpo/stage-1/_done.json").read_text())
        assert done["steps"] * done["num_generations"] == 1 * 4 + 1 * 2
    md = (root / "summary.md").read_text()
    assert "| recipe |" in md and "Vision-R1-Zero" in md
    assert (root / "summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    exp = client.get_experiment_by_name(A.EXPERIMENT)
    assert exp.tags.get("mlflow.experimentKind") == "custom_model_development"
    parents = {
        r.info.run_name: r
        for r in client.search_runs([exp.experiment_id])
        if r.data.tags.get("visionr1.executor") == "local"
    }
    assert set(parents) == {f"{v.replace('_', '-')}-seed7" for v in A.VARIANTS}
    recipe = parents["recipe-seed7"]
    assert recipe.data.metrics["final.toy.accuracy"] == on_disk["recipe"]["accuracy"]
    assert recipe.data.metrics["final.toy.format_rate"] == on_disk["recipe"]["format_rate"]
    assert recipe.data.params["grpo.ptst"] == "16×4×1 → 24×2×1"
    assert recipe.data.metrics["data.cold-start_rows"] > 0
    assert recipe.data.metrics["time.grpo_s"] > 0
    contexts = {d.dataset.name: d.tags[0].value for d in recipe.inputs.dataset_inputs}
    assert contexts == {"raw": "synthesis", "cold-start": "sft", "rl": "grpo", "bench-toy": "eval"}
    assert recipe.data.tags["visionr1.final_model"].startswith("models:/")
    assert parents["zero-seed7"].data.params["grpo.from"] == "base"
    assert {r.data.tags["visionr1.variant"] for r in parents.values()} == set(A.VARIANTS)
    # The runs table opens on a saved view whose columns compare the variants.
    view = json.loads(exp.tags[f"mlflow.sharedViewState.{A.SHARED_VIEW}"])
    assert "metrics.`final.toy.accuracy`" in view["selectedColumns"]
    assert (root / "reward_curve.png").read_bytes()[:4] == b"\x89PNG"
    assert (
        parents["sft-only-seed7"].data.metrics["final.toy.accuracy"]
        == (on_disk["sft_only"]["accuracy"])
    )


def test_a_failed_recipe_stops_the_variants_that_need_its_sft(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The scheduler never starts sft_only/long without the recipe's SFT checkpoint, names the
    failed variant and its log, and writes no summary."""
    import io
    import subprocess
    import sys

    started: list[str] = []

    def failing_run(variant: str, manifest: Path, workdir: Path, log: Path) -> Any:
        started.append(variant)
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text("synthesis exited 65 (invalid input)\n")
        return subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])

    monkeypatch.setattr(A, "_start", failing_run)
    monkeypatch.setattr(A, "_prepare", lambda *args: None)
    out = io.StringIO()
    with pytest.raises(SystemExit) as exc:
        A.run_ablations(
            REPO / "examples" / "tiny-cpu.yaml",
            1,
            tmp_path,
            variants=("recipe", "sft_only", "long"),
            out=out,
        )
    assert started == ["recipe"]
    message = str(exc.value.code)
    assert "recipe: exit 3; log: " in message and str(tmp_path) in message
    assert "sft_only: the recipe's SFT checkpoint was not made" in message
    assert "long: the recipe's SFT checkpoint was not made" in message
    assert "synthesis exited 65" in out.getvalue()  # the failed variant's log tail is shown
    assert not (tmp_path / "summary.json").exists()
