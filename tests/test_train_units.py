"""Training plumbing without a trainer: batch arithmetic, DeepSpeed configs, checkpoint
completeness, atomic final folders, the torchrun command, PTST summaries, rollout choice."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest

from visionr1_jobs.config import GRPOParams
from visionr1_jobs.contract import InvalidInput
from visionr1_jobs.training import checkpoints as ckpt
from visionr1_jobs.training import ptst
from visionr1_jobs.training.launch import planned_world_size, torchrun_command
from visionr1_jobs.training.runtime import (
    Batches,
    deepspeed_config,
    grpo_batches,
    sft_batches,
    world_from_env,
    write_deepspeed_config,
)


def test_sft_gradient_accumulation_from_global_batch() -> None:
    # The paper: global 32, per-device 1 on 32 GPUs → no accumulation; on 8 GPUs → 4.
    assert sft_batches(32, 1, 32) == Batches(1, 1)
    assert sft_batches(32, 1, 8) == Batches(1, 4)
    assert sft_batches(8, 4, 1) == Batches(4, 2)
    with pytest.raises(InvalidInput, match="globalBatchSize .*multiple of.*perDeviceBatchSize"):
        sft_batches(30, 4, 2)


def test_grpo_batches_hold_whole_steps() -> None:
    # 4 prompts × 4 samples = 16 completions per step: one process takes all of them at once,
    # two processes take 8 each, and a micro-batch of 2 makes 4 accumulation steps.
    assert grpo_batches(4, 4, 1, None) == Batches(16, 1)
    assert grpo_batches(4, 4, 2, None) == Batches(8, 1)
    assert grpo_batches(4, 4, 2, 2) == Batches(2, 4)
    # The paper's stage 1 on 64 GPUs: 32 prompts × 16 samples → 8 completions per GPU.
    assert grpo_batches(32, 16, 64, 4) == Batches(4, 2)
    with pytest.raises(InvalidInput, match="cannot be split over 3 processes"):
        grpo_batches(2, 4, 3, None)
    with pytest.raises(InvalidInput, match="perDeviceBatchSize .*must divide"):
        grpo_batches(4, 4, 1, 3)


def test_deepspeed_configs() -> None:
    assert deepspeed_config("none", False) is None
    z2 = deepspeed_config("zero2", True)
    z3 = deepspeed_config("zero3", True)
    assert z2 is not None and z3 is not None
    assert z2["zero_optimization"]["stage"] == 2 and z3["zero_optimization"]["stage"] == 3
    assert z3["bf16"] == {"enabled": True}
    # ZeRO-3 must gather full weights when saving, or sft/final would hold shards only.
    assert z3["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    # Batch sizes are left to the HF integration, which knows the derived values.
    assert z3["train_micro_batch_size_per_gpu"] == "auto"
    json.dumps(z3)


def test_deepspeed_refused_without_a_gpu(tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this checks the CPU refusal")
    with pytest.raises(InvalidInput, match="params.deepspeed is 'zero3'.*deepspeed: none"):
        write_deepspeed_config("zero3", False, tmp_path)
    assert write_deepspeed_config("none", False, tmp_path) is None
    assert not list(tmp_path.iterdir())


def _checkpoint(folder: Path, step: int, *, state: str | None = "ok", weights: bool = True) -> Path:
    path = folder / f"checkpoint-{step}"
    path.mkdir(parents=True)
    if weights:
        (path / "model.safetensors").write_bytes(b"x")
    if state == "ok":
        (path / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    elif state == "truncated":
        (path / "trainer_state.json").write_text('{"global_step": ')
    elif state == "other-step":
        (path / "trainer_state.json").write_text(json.dumps({"global_step": step - 1}))
    return path


def test_newest_complete_checkpoint_wins_and_half_written_ones_go(tmp_path: Path) -> None:
    good2 = _checkpoint(tmp_path, 2)
    good10 = _checkpoint(tmp_path, 10)  # numeric order, not lexical (10 > 4)
    _checkpoint(tmp_path, 4, state="ok", weights=False)
    _checkpoint(tmp_path, 12, state=None)  # killed before trainer_state.json
    _checkpoint(tmp_path, 14, state="truncated")  # killed while writing it
    _checkpoint(tmp_path, 16, state="other-step")
    (tmp_path / "README.md").write_text("not a checkpoint")
    assert ckpt.latest_complete_checkpoint(tmp_path) == good10
    removed = ckpt.remove_incomplete_checkpoints(tmp_path)
    assert sorted(p.name for p in removed) == [
        "checkpoint-12",
        "checkpoint-14",
        "checkpoint-16",
        "checkpoint-4",
    ]
    assert ckpt.checkpoints(tmp_path) == [good2, good10]
    assert ckpt.latest_complete_checkpoint(tmp_path / "absent") is None


def test_final_folder_is_swapped_in_whole(tmp_path: Path) -> None:
    dest = tmp_path / "final"

    def write_v1(tmp: Path) -> None:
        tmp.mkdir()
        (tmp / "config.json").write_text("{}")
        (tmp / "model.safetensors").write_text("v1")

    ckpt.save_final_atomically(dest, write_v1)
    assert ckpt.is_complete_model(dest)

    def crash(tmp: Path) -> None:
        tmp.mkdir()
        (tmp / "config.json").write_text("{}")
        raise RuntimeError("killed mid-save")

    with pytest.raises(RuntimeError):
        ckpt.save_final_atomically(dest, crash)
    # The old complete folder is untouched; the leftover temp folder is cleared next time.
    assert (dest / "model.safetensors").read_text() == "v1"

    def write_v2(tmp: Path) -> None:
        tmp.mkdir()
        (tmp / "config.json").write_text("{}")
        (tmp / "model.safetensors").write_text("v2")

    ckpt.save_final_atomically(dest, write_v2)
    assert (dest / "model.safetensors").read_text() == "v2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]


def test_torchrun_command_from_an_indexed_job() -> None:
    env = {
        "VISIONR1_NNODES": "4",
        "VISIONR1_NPROC_PER_NODE": "8",
        "JOB_COMPLETION_INDEX": "3",
        "MASTER_ADDR": "run-sft-0.run-sft",
        "MASTER_PORT": "29600",
    }
    cmd = torchrun_command("sft", "/cfg/sft.json", env)
    assert cmd is not None
    assert cmd[1:3] == ["-m", "torch.distributed.run"]
    assert "--nnodes=4" in cmd and "--nproc_per_node=8" in cmd and "--node_rank=3" in cmd
    assert "--master_addr=run-sft-0.run-sft" in cmd and "--master_port=29600" in cmd
    assert cmd[-5:] == ["-m", "visionr1_jobs", "sft", "--config", "/cfg/sft.json"]
    assert planned_world_size(env) == 32
    # One process: no relaunch. Already under torchrun: no relaunch either.
    assert torchrun_command("sft", "c", {"VISIONR1_NPROC_PER_NODE": "1"}) is None
    under = {"LOCAL_RANK": "1", "WORLD_SIZE": "2", "RANK": "1", "VISIONR1_NPROC_PER_NODE": "2"}
    assert torchrun_command("sft", "c", under) is None
    assert planned_world_size(under) == 2
    assert world_from_env(under).rank == 1 and not world_from_env(under).is_main
    # One node, two processes: a local rendezvous.
    local = torchrun_command("grpo", "c", {"VISIONR1_NPROC_PER_NODE": "2"})
    assert local is not None and "--master_addr=127.0.0.1" in local
    with pytest.raises(InvalidInput, match="MASTER_ADDR"):
        torchrun_command("sft", "c", {"VISIONR1_NNODES": "2", "VISIONR1_NPROC_PER_NODE": "1"})
    with pytest.raises(InvalidInput, match="JOB_COMPLETION_INDEX=2"):
        torchrun_command(
            "sft",
            "c",
            {"VISIONR1_NNODES": "2", "JOB_COMPLETION_INDEX": "2", "MASTER_ADDR": "h"},
        )


def test_ptst_summary_json_and_plot(tmp_path: Path) -> None:
    history = [
        {"step": 1, "reward": 0.25, "rewards/accuracy/mean": 0.25, "completions/mean_length": 60.0},
        {"step": 2, "reward": 0.5, "rewards/accuracy/mean": 0.5, "completions/mean_length": 50.0},
        {"train_runtime": 3.0, "step": 2},  # the end-of-training entry has no PTST values
    ]
    series = ptst.step_series(history)
    assert [r["step"] for r in series] == [1.0, 2.0]
    agg = ptst.aggregate(series)
    assert agg["mean_accuracy"] == pytest.approx(0.375)
    assert agg["last_completion_length"] == 50.0
    subs = [
        {
            "name": "stage-1",
            "max_completion_length": 64,
            "num_generations": 4,
            "steps": 2,
            "series": series,
            "metrics": agg,
        },
        {
            "name": "stage-2",
            "max_completion_length": 128,
            "num_generations": 2,
            "steps": 2,
            "series": series,
            "metrics": agg,
        },
    ]
    json_path, png_path = ptst.write_summary(tmp_path, subs)
    data = json.loads(json_path.read_text())
    assert [s["max_completion_length"] for s in data["substages"]] == [64, 128]
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_rollout_choice_on_cpu() -> None:
    from visionr1_jobs.stages.grpo import rollout_mode

    assert rollout_mode(GRPOParams(rollout="transformers")) is None
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        assert rollout_mode(GRPOParams(rollout="auto")) is None
        with pytest.raises(InvalidInput, match="vLLM is not installed"):
            rollout_mode(GRPOParams(rollout="vllm_colocate"))


def test_zero_reward_spread_warns(caplog: pytest.LogCaptureFixture) -> None:
    from visionr1_jobs.training.callbacks import RewardSignalWatch

    watch = RewardSignalWatch()
    state = SimpleNamespace(global_step=3, is_world_process_zero=True)
    with caplog.at_level(logging.WARNING):
        watch.on_log(None, state, None, logs={"frac_reward_zero_std": 0.5, "reward": 0.5})
        assert watch.zero_signal_steps == []
        watch.on_log(None, state, None, logs={"frac_reward_zero_std": 1.0, "reward": 0.0})
    assert watch.zero_signal_steps == [3]
    assert "nothing is being learned" in caplog.text


def test_a_checkpoint_loads_onto_an_indexed_cpu_device(tmp_path: Path) -> None:
    """What a multi-process CPU resume does with transformers < 5.18 (our images): the optimizer
    state is loaded with map_location=cpu:0, which torch alone cannot restore."""
    import torch

    from visionr1_jobs.training.checkpoints import indexed_cpu_loadable

    path = tmp_path / "optimizer.pt"
    torch.save({"exp_avg": torch.arange(3.0)}, path)
    indexed_cpu_loadable()
    state = torch.load(path, map_location=torch.device("cpu", 0), weights_only=True)
    assert torch.equal(state["exp_avg"], torch.arange(3.0))
    assert state["exp_avg"].device.type == "cpu"
