"""SFT and GRPO with PTST, end to end on the tiny model and toy data, CPU only (method.md §5–6).

Real TRL trainers, a real MLflow sqlite store, real subprocesses: SFT then GRPO with two PTST
sub-stages; GRPO killed with SIGKILL during sub-stage 2 and resumed; both stages under torchrun
with two gloo processes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from train_world import make_train_world, sft_config, stand_in_filter

from visionr1_jobs.__main__ import main as stage_main
from visionr1_jobs.config import ResolvedStageConfig
from visionr1_jobs.contract import StageManifest, atomic_write_json, read_manifest

pytestmark = pytest.mark.slow

RESPONSE = "<think> Let me look at the image. The answer is {a}. </think><answer> Final Answer:{a} </answer>"


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny model, toy data, and a filter-like cold-start dataset (responses attached)."""
    root = tmp_path_factory.mktemp("train-world")
    return make_train_world(root, seed=3, n_rl=16, n_bench=12, response=RESPONSE)


def _workspace(world: dict[str, Path], tmp_path: Path) -> Path:
    return stand_in_filter(tmp_path / "ws", world)


def _sft_config(ws: Path, world: dict[str, Path], **params: Any) -> Path:
    return sft_config(ws, world, "train-test", **params)


def _grpo_config(
    ws: Path,
    world: dict[str, Path],
    model: dict[str, str],
    ptst: list[dict[str, int]],
    **params: Any,
) -> Path:
    cfg = ResolvedStageConfig(
        stage="grpo",
        workspace=str(ws),
        output_dir="grpo",
        base_model=str(world["model"]),
        inputs={"model": model, "data": {"path": str(world["rl"]), "format": "toy"}},
        params={
            "dataset": {"path": str(world["rl"]), "format": "toy"},
            "deepspeed": "none",
            "bf16": False,
            "gradientCheckpointing": False,
            "learningRate": 1e-4,
            "promptsPerStep": 2,
            "maxPromptLength": 512,
            "rollout": "transformers",
            "saveSteps": 1,
            "ptst": ptst,
            **params,
        },
        # Named explicitly, as the operator does: mlflow.set_tracking_uri exports
        # MLFLOW_TRACKING_URI, which would otherwise leak from one in-process stage to the next.
        mlflow={"experiment": "train-test", "trackingUri": _uri(ws)},
    )
    path = ws / "grpo.json"
    path.write_text(cfg.model_dump_json(by_alias=True))
    return path


def _uri(ws: Path) -> str:
    return f"sqlite:///{ws.resolve() / 'mlflow.db'}"


def _client(ws: Path) -> Any:
    import mlflow

    return mlflow.MlflowClient(_uri(ws))


def _runs(ws: Path) -> list[Any]:
    client = _client(ws)
    exp = client.get_experiment_by_name("train-test")
    return client.search_runs([exp.experiment_id]) if exp else []


def _load(path: Path) -> tuple[Any, Any]:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    return AutoModelForImageTextToText.from_pretrained(path), AutoProcessor.from_pretrained(path)


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("MLFLOW_TRACKING_URI", None)
    src = str(Path(__file__).resolve().parents[1] / "jobs")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def test_sft_then_grpo_with_two_ptst_substages(world: dict[str, Path], tmp_path: Path) -> None:
    import torch

    ws = _workspace(world, tmp_path)
    sft_cfg = _sft_config(
        ws,
        world,
        freezeVisionTower=True,
        maxPixels=112 * 112,
        minPixels=28 * 28,
        registerModel="tiny-sft",
    )
    assert stage_main(["sft", "--config", str(sft_cfg)]) == 0
    sft = read_manifest(ws, "sft")
    assert sft is not None and sft.outputs == {"model": "sft/final"}
    assert sft.metrics["global_step"] == 4
    assert sft.extra["gradient_accumulation_steps"] == 2
    assert sft.metrics["trainable_parameters"] < sft.metrics["parameters"]
    # Checkpoints every 2 steps, each complete and loadable; the final model and processor too.
    ckpts = sorted(p.name for p in (ws / "sft" / "checkpoints").glob("checkpoint-*"))
    assert ckpts == ["checkpoint-2", "checkpoint-4"]
    base, _ = _load(world["model"])
    tuned, proc = _load(ws / "sft" / "final")
    _load(ws / "sft" / "checkpoints" / "checkpoint-2")
    assert proc.image_processor.size["longest_edge"] == 112 * 112
    base_p, tuned_p = dict(base.named_parameters()), dict(tuned.named_parameters())
    frozen = [n for n in base_p if ".visual." in f".{n}" and "merger" not in n]
    assert frozen and all(torch.equal(base_p[n], tuned_p[n]) for n in frozen)
    assert not torch.equal(base_p["lm_head.weight"], tuned_p["lm_head.weight"])
    # MLflow: the SFT run holds the loss per step and the registered model.
    sft_run = _client(ws).get_run(sft.mlflow_run_id)
    assert sft_run.info.status == "FINISHED"
    assert [m.step for m in _client(ws).get_metric_history(sft.mlflow_run_id, "loss")] == [
        1,
        2,
        3,
        4,
    ]
    assert sft.extra["registered_model"] == "tiny-sft"
    assert _client(ws).get_registered_model("tiny-sft").name == "tiny-sft"
    # The logged model loads back from MLflow and generates.
    import mlflow
    import pandas as pd

    mlflow.set_tracking_uri(_uri(ws))
    served = mlflow.pyfunc.load_model(f"models:/tiny-sft/{sft.extra['registered_model_version']}")
    question = pd.DataFrame([{"question": "How many circles are there?", "image": None}])
    answers = served.predict(question, params={"max_new_tokens": 4})
    assert len(answers) == 1 and isinstance(answers[0], str)

    ptst = [
        {"maxCompletionLength": 64, "numGenerations": 4, "steps": 2},
        {"maxCompletionLength": 128, "numGenerations": 2, "steps": 2},
    ]
    grpo_cfg = _grpo_config(
        ws, world, {"path": "sft", "format": "stage", "stage": "sft"}, ptst, warmupSteps=1
    )
    assert stage_main(["grpo", "--config", str(grpo_cfg)]) == 0
    grpo = read_manifest(ws, "grpo")
    assert grpo is not None
    assert grpo.outputs == {
        "model": "grpo/stage-2/final",
        "stage-1": "grpo/stage-1/final",
        "stage-2": "grpo/stage-2/final",
    }
    assert grpo.rows["prompts"] == 16 and grpo.rows["prompts_dropped_too_long"] == 0
    for name in ("stage-1", "stage-2"):
        _load(ws / "grpo" / name / "final")
        _load(ws / "grpo" / name / "checkpoints" / "checkpoint-2")
    done1 = json.loads((ws / "grpo" / "stage-1" / "_done.json").read_text())
    done2 = json.loads((ws / "grpo" / "stage-2" / "_done.json").read_text())
    # Sub-stage 2 starts from sub-stage 1's weights; the KL reference stays the SFT model.
    assert done2["start_model"] == str(ws / "grpo" / "stage-1" / "final")
    assert done1["reference_model"] == done2["reference_model"] == str(ws / "sft" / "final")
    # Each sub-stage starts a fresh optimizer and warms its learning rate up again (the
    # trainer's own record: 0 on the warmup step, then the full rate).
    for name in ("stage-1", "stage-2"):
        state = json.loads(
            (ws / "grpo" / name / "checkpoints" / "checkpoint-2" / "trainer_state.json").read_text()
        )
        lrs = [h["learning_rate"] for h in state["log_history"] if "learning_rate" in h]
        assert lrs == pytest.approx([0.0, 1e-4]), (name, lrs)
    # The budgets were applied: no completion longer than its sub-stage's budget.
    assert max(r["completion_length"] for r in done1["series"]) <= 64
    assert max(r["completion_length"] for r in done2["series"]) <= 128

    # MLflow: the GRPO run, with one nested run per sub-stage carrying the RL metrics.
    client = _client(ws)
    runs = {r.info.run_id: r for r in _runs(ws)}
    grpo_run = runs[grpo.mlflow_run_id]
    children = [
        r for r in runs.values() if r.data.tags.get("mlflow.parentRunId") == grpo.mlflow_run_id
    ]
    assert sorted(r.info.run_name for r in children) == ["stage-1", "stage-2"]
    for child in children:
        for key in (
            "reward",
            "reward_std",
            "rewards/format/mean",
            "rewards/accuracy/mean",
            "completions/mean_length",
            "completions/clipped_ratio",
            "kl",
        ):
            steps = [m.step for m in client.get_metric_history(child.info.run_id, key)]
            assert steps == [1, 2], (child.info.run_name, key, steps)
        assert child.info.status == "FINISHED"
    # The parent run shows one RL curve across sub-stages (steps 1–4) and the PTST summary.
    assert [m.step for m in client.get_metric_history(grpo.mlflow_run_id, "reward")] == [1, 2, 3, 4]
    assert grpo_run.info.status == "FINISHED"
    artifacts = {a.path for a in client.list_artifacts(grpo.mlflow_run_id)}
    assert {"ptst_summary.json", "ptst_summary.png"} <= artifacts
    summary = json.loads((ws / "grpo" / "ptst_summary.json").read_text())
    assert [
        (s["name"], s["max_completion_length"], s["num_generations"]) for s in summary["substages"]
    ] == [
        ("stage-1", 64, 4),
        ("stage-2", 128, 2),
    ]
    assert all(
        "mean_accuracy" in s["metrics"] and "mean_completion_length" in s["metrics"]
        for s in summary["substages"]
    )
    assert grpo.extra["model_uri"].startswith("models:/")


def _wait_for(predicate: Any, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            raise AssertionError(f"the stage exited ({proc.returncode}) before the kill point")
        time.sleep(0.2)
    raise AssertionError("timed out waiting for the kill point")


def test_grpo_killed_in_substage_2_resumes_there(world: dict[str, Path], tmp_path: Path) -> None:
    from visionr1_jobs.training.checkpoints import is_complete_checkpoint

    ws = tmp_path / "ws"
    ws.mkdir()
    ptst = [
        {"maxCompletionLength": 32, "numGenerations": 2, "steps": 1},
        {"maxCompletionLength": 32, "numGenerations": 2, "steps": 3},
    ]
    # The GRPO input may also be a plain checkpoint folder (here the base model).
    cfg = _grpo_config(ws, world, {"path": str(world["model"]), "format": "model"}, ptst)
    log = (tmp_path / "first.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "visionr1_jobs", "grpo", "--config", str(cfg)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=_env(),
        start_new_session=True,
    )
    first_ckpt = ws / "grpo" / "stage-2" / "checkpoints" / "checkpoint-1"
    try:
        _wait_for(lambda: is_complete_checkpoint(first_ckpt), proc, timeout=400)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert read_manifest(ws, "grpo") is None
    assert not (ws / "grpo" / "stage-2" / "_done.json").exists()
    done1 = ws / "grpo" / "stage-1" / "_done.json"
    before = (
        done1.stat().st_mtime_ns,
        done1.read_text(),
        (ws / "grpo" / "stage-1" / "final" / "model.safetensors").stat().st_mtime_ns,
    )
    stage2_run = (ws / "grpo" / "stage-2" / "_mlflow_run_id").read_text().strip()

    assert stage_main(["grpo", "--config", str(cfg)]) == 0
    grpo = read_manifest(ws, "grpo")
    assert grpo is not None and grpo.outputs["model"] == "grpo/stage-2/final"
    # Sub-stage 1 was not redone: its marker and weights are untouched.
    after = (
        done1.stat().st_mtime_ns,
        done1.read_text(),
        (ws / "grpo" / "stage-1" / "final" / "model.safetensors").stat().st_mtime_ns,
    )
    assert after == before
    # Sub-stage 2 resumed from its last complete checkpoint and finished all 3 steps.
    done2 = json.loads((ws / "grpo" / "stage-2" / "_done.json").read_text())
    assert done2["resumed_from"] in ("checkpoint-1", "checkpoint-2")
    state = json.loads((ws / "grpo" / "stage-2" / "final" / "trainer_state.json").read_text())
    assert state["global_step"] == 3
    assert [r["step"] for r in done2["series"]] == [1.0, 2.0, 3.0]
    # ...into the same MLflow run, and there is still one run per sub-stage.
    assert done2["mlflow_run_id"] == stage2_run
    names = sorted(r.info.run_name for r in _runs(ws) if r.data.tags.get("mlflow.parentRunId"))
    assert names == ["stage-1", "stage-2"]
    steps = [m.step for m in _client(ws).get_metric_history(stage2_run, "reward")]
    assert sorted(set(steps)) == [1, 2, 3]
    # Steps up to the checkpoint resumed from are logged once; a step the killed attempt logged
    # after that checkpoint (the kill races the next step) is trained again and logged again.
    resumed = int(done2["resumed_from"].removeprefix("checkpoint-"))
    assert all(steps.count(step) == 1 for step in range(1, resumed + 1)), steps


def test_two_processes_under_torchrun(world: dict[str, Path], tmp_path: Path) -> None:
    ws = _workspace(world, tmp_path)
    env = _env(VISIONR1_NPROC_PER_NODE="2", MASTER_PORT="29517", OMP_NUM_THREADS="1")
    sft_cfg = _sft_config(
        ws, world, globalBatchSize=4, perDeviceBatchSize=1, maxSteps=2, saveSteps=1
    )
    out = subprocess.run(
        [sys.executable, "-m", "visionr1_jobs", "sft", "--config", str(sft_cfg)],
        env=env,
        capture_output=True,
        text=True,
        timeout=500,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    assert "torch.distributed.run" in out.stderr and "--nproc_per_node=2" in out.stderr
    sft = read_manifest(ws, "sft")
    assert sft is not None and sft.extra["world_size"] == 2
    assert sft.extra["gradient_accumulation_steps"] == 2  # 4 = 1 per process × 2 processes × 2
    _load(ws / "sft" / "final")

    # Two sub-stages: each is a torchrun launch of its own on the same rendezvous port.
    ptst = [
        {"maxCompletionLength": 16, "numGenerations": 2, "steps": 2},
        {"maxCompletionLength": 16, "numGenerations": 2, "steps": 1},
    ]
    grpo_cfg = _grpo_config(
        ws, world, {"path": "sft", "format": "stage", "stage": "sft"}, ptst, saveSteps=2
    )
    env["MASTER_PORT"] = "29518"
    out = subprocess.run(
        [sys.executable, "-m", "visionr1_jobs", "grpo", "--config", str(grpo_cfg)],
        env=env,
        capture_output=True,
        text=True,
        timeout=500,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    grpo = read_manifest(ws, "grpo")
    assert grpo is not None and grpo.extra["world_size"] == 2
    assert out.stderr.count("torch.distributed.run") == 2  # a launch per sub-stage
    done = json.loads((ws / "grpo" / "stage-1" / "_done.json").read_text())
    done2 = json.loads((ws / "grpo" / "stage-2" / "_done.json").read_text())
    assert [r["step"] for r in done["series"]] == [1.0, 2.0]
    assert [r["step"] for r in done2["series"]] == [1.0]
    assert done["world_size"] == done2["world_size"] == 2
    assert done["process_at_start"]["pid"] != done2["process_at_start"]["pid"]
    _load(ws / "grpo" / "stage-2" / "final")
    # Only rank 0 wrote to MLflow: one run per stage/sub-stage, one value per step.
    runs = _runs(ws)
    assert sorted(r.info.run_name for r in runs) == ["grpo", "sft", "stage-1", "stage-2"]
    client = _client(ws)
    assert [m.step for m in client.get_metric_history(sft.mlflow_run_id, "loss")] == [1, 2]
    stage1 = next(r for r in runs if r.info.run_name == "stage-1")
    assert [m.step for m in client.get_metric_history(stage1.info.run_id, "reward")] == [1, 2]


def test_sft_restart_resumes_from_newest_complete_checkpoint(
    world: dict[str, Path], tmp_path: Path
) -> None:
    import shutil

    ws = _workspace(world, tmp_path)
    cfg = _sft_config(ws, world, maxSteps=3, saveSteps=1, globalBatchSize=2, perDeviceBatchSize=2)
    assert stage_main(["sft", "--config", str(cfg)]) == 0
    first = read_manifest(ws, "sft")
    assert first is not None and first.metrics["global_step"] == 3
    # Simulate a pod killed while saving checkpoint 3, before the final model: checkpoint-3
    # lacks trainer_state.json, and neither sft/final nor the manifest exist.
    ckpts = ws / "sft" / "checkpoints"
    (ckpts / "checkpoint-3" / "trainer_state.json").unlink()
    shutil.rmtree(ws / "sft" / "final")
    (ws / "sft" / "_manifest.json").unlink()
    assert stage_main(["sft", "--config", str(cfg)]) == 0
    again = read_manifest(ws, "sft")
    assert again is not None
    assert again.metrics["resumed_from_step"] == 2  # not the half-written checkpoint-3
    assert again.metrics["global_step"] == 3
    # Same MLflow run as the first attempt; the re-run step 3 logged again into it.
    assert again.mlflow_run_id == first.mlflow_run_id
    _load(ws / "sft" / "final")


def test_bad_training_input_exits_65(world: dict[str, Path], tmp_path: Path) -> None:
    from visionr1_jobs.config import EXIT_INVALID_INPUT

    ws = _workspace(world, tmp_path)
    # Problems without responses are not SFT data.
    atomic_write_json(
        ws / "filter" / "_manifest.json",
        StageManifest(stage="filter", outputs={"data": str(world["rl"])}).dump(),
    )
    assert stage_main(["sft", "--config", str(_sft_config(ws, world))]) == EXIT_INVALID_INPUT
    assert read_manifest(ws, "sft") is None
    # 2 prompts × 3 samples = 6 completions per step cannot be cut into micro-batches of 4:
    # refused before any model is loaded.
    cfg = _grpo_config(
        ws,
        world,
        {"path": str(world["model"]), "format": "model"},
        [{"maxCompletionLength": 16, "numGenerations": 3, "steps": 1}],
        perDeviceBatchSize=4,
    )
    assert stage_main(["grpo", "--config", str(cfg)]) == EXIT_INVALID_INPUT


def test_prompts_over_the_budget_are_dropped_and_counted(world: dict[str, Path]) -> None:
    from visionr1_jobs.data.load import load_dataset_dir
    from visionr1_jobs.training.data import drop_long_prompts, grpo_rows, prompt_lengths
    from visionr1_jobs.training.runtime import load_processor

    proc = load_processor(str(world["model"]), None, None)
    rows = grpo_rows(load_dataset_dir(world["rl"], "toy"))
    lengths = prompt_lengths(rows, proc)
    # Image placeholders are expanded: a 112×112 toy image is 16 tokens of the prompt.
    assert min(lengths) > 16
    cut = sorted(lengths)[len(lengths) // 2]
    kept, dropped = drop_long_prompts(rows, proc, cut)
    assert dropped == sum(n > cut for n in lengths) and dropped > 0
    assert len(kept) + dropped == len(rows)
    assert drop_long_prompts(rows, proc, max(lengths))[1] == 0
