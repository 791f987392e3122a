"""A resumed SFT continues the uninterrupted run exactly (tiny model, toy data, CPU, real TRL).

One uninterrupted run writes a checkpoint every 2 steps; a second workspace starts with one of
those checkpoints already on disk (what a run killed right after saving it leaves behind) and
resumes from it. The steps after the checkpoint must log the same loss and learning rate as the
uninterrupted run: the loss of a step is a function of the weights before it and its batch only,
so it checks that weights, data order, optimizer and scheduler state all came back.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from train_world import make_train_world, sft_config, stand_in_filter

from visionr1_jobs.__main__ import main as stage_main
from visionr1_jobs.contract import read_manifest

pytestmark = pytest.mark.slow

RESPONSE = "<think> I count them. The answer is {a}. </think><answer> Final Answer:{a} </answer>"
STEPS = 8  # 2 epochs of 4 steps: 16 rows, batch 4
# Same process, same ops, same thread count: a correct resume reproduces the logged figures up
# to float reduction order (observed: identical to all printed digits). A resume that loses
# the weights, the data order, the optimizer moments or the warmup is off by percents at once.
REL_TOL = 1e-4


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sft-resume")
    return make_train_world(root, seed=1, n_rl=4, n_bench=4, response=RESPONSE)


def _config(world: dict[str, Path], ws: Path) -> Path:
    return sft_config(
        stand_in_filter(ws, world),
        world,
        "resume-test",
        # The laptop demo's settings, scaled down: a high constant rate after a warmup
        # given as a share of the steps (here 3 of 8, so a resume from step 2 is mid-warmup).
        lrScheduler="constant_with_warmup",
        warmupRatio=0.3,
        epochs=2,
        maxSteps=None,
        perDeviceBatchSize=4,
        saveTotalLimit=10,
        seed=0,
    )


def _logged(ws: Path) -> dict[int, dict[str, Any]]:
    """The trainer's own per-step log (``log_history`` of its last checkpoint)."""
    state = json.loads(
        (ws / "sft" / "checkpoints" / f"checkpoint-{STEPS}" / "trainer_state.json").read_text()
    )
    return {e["step"]: e for e in state["log_history"] if "loss" in e}


@pytest.fixture(scope="module")
def uninterrupted(world: dict[str, Path]) -> Path:
    ws = world["root"] / "uninterrupted"
    assert stage_main(["sft", "--config", str(_config(world, ws))]) == 0
    return ws


@pytest.mark.parametrize("at", [2, 4], ids=["mid-epoch-in-warmup", "epoch-boundary"])
def test_resumed_sft_matches_uninterrupted_run(
    world: dict[str, Path], uninterrupted: Path, tmp_path: Path, at: int
) -> None:
    ws = tmp_path / "resumed"
    cfg = _config(world, ws)
    # What a run killed right after writing checkpoint-<at> leaves on disk.
    shutil.copytree(
        uninterrupted / "sft" / "checkpoints" / f"checkpoint-{at}",
        ws / "sft" / "checkpoints" / f"checkpoint-{at}",
    )
    assert stage_main(["sft", "--config", str(cfg)]) == 0
    manifest = read_manifest(ws, "sft")
    assert manifest is not None and manifest.metrics["resumed_from_step"] == at

    want, got = _logged(uninterrupted), _logged(ws)
    assert sorted(want) == sorted(got) == list(range(1, STEPS + 1))
    after = range(at + 1, STEPS + 1)
    # The warmup is 3 steps: the rate ramps, then holds at the peak, with or without a resume.
    assert [want[s]["learning_rate"] for s in range(1, STEPS + 1)] == pytest.approx(
        [0.0, 1e-2 / 3, 2e-2 / 3] + [1e-2] * (STEPS - 3)
    )
    assert [got[s]["learning_rate"] for s in after] == pytest.approx(
        [want[s]["learning_rate"] for s in after], rel=REL_TOL
    )
    assert [got[s]["loss"] for s in after] == pytest.approx(
        [want[s]["loss"] for s in after], rel=REL_TOL
    )
    # The run learned something, so equal losses are not equal because nothing moved.
    assert want[STEPS]["loss"] < 0.8 * want[1]["loss"]


def test_an_attempt_that_finds_the_final_model_saved_reports_its_step(
    world: dict[str, Path], uninterrupted: Path, tmp_path: Path
) -> None:
    """An attempt killed after saving the final model but before the manifest: the next one
    trains nothing, and its manifest still says which step the weights are from."""
    ws = tmp_path / "saved"
    cfg = _config(world, ws)
    shutil.copytree(uninterrupted / "sft" / "final", ws / "sft" / "final")
    assert stage_main(["sft", "--config", str(cfg)]) == 0
    manifest = read_manifest(ws, "sft")
    assert manifest is not None and manifest.metrics["global_step"] == STEPS
    assert "train_seconds_this_attempt" not in manifest.metrics  # nothing was trained
    assert not (ws / "sft" / "checkpoints").exists() or not any(
        (ws / "sft" / "checkpoints").iterdir()
    )
