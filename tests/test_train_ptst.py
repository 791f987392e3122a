"""PTST verified by weights, on the tiny model and toy RL data (CPU, real TRL GRPOTrainer).

The tensors the trainer actually holds are compared with the tensors on disk: sub-stage 2's
policy starts from sub-stage 1's final weights, and the KL reference is the model the config
names (the GRPO input). A resumed run whose PTST rows changed is refused with exit 65 naming the
field, and touches nothing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from visionr1_jobs.__main__ import main as stage_main
from visionr1_jobs.config import ResolvedStageConfig
from visionr1_jobs.contract import read_manifest

pytestmark = pytest.mark.slow

PTST = [
    {"maxCompletionLength": 8, "numGenerations": 2, "steps": 1},
    {"maxCompletionLength": 12, "numGenerations": 2, "steps": 1},
]


def _grpo_config(ws: Path, model: Path, rl: Path, ptst: list[dict[str, int]], **kw: Any) -> Path:
    cfg = ResolvedStageConfig(
        stage="grpo",
        workspace=str(ws),
        output_dir="grpo",
        base_model=str(model),
        inputs={
            "model": {"path": str(model), "format": "model"},
            "data": {"path": str(rl), "format": "toy"},
        },
        params={
            "dataset": {"path": str(rl), "format": "toy"},
            "deepspeed": "none",
            "bf16": False,
            "gradientCheckpointing": False,
            "learningRate": 1e-2,
            "promptsPerStep": 1,
            "maxPromptLength": 512,
            "rollout": "transformers",
            "saveSteps": 1,
            "ptst": ptst,
            **kw,
        },
        mlflow={"experiment": "ptst", "trackingUri": f"sqlite:///{ws / 'mlflow.db'}"},
    )
    path = ws / "grpo.json"
    path.write_text(cfg.model_dump_json(by_alias=True))
    return path


def _weights(folder: Path) -> dict[str, Any]:
    """The weights saved in ``folder``, named as the model names them."""
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(folder)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    import torch

    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One GRPO run with two PTST sub-stages; what each GRPOTrainer held when it started."""
    import trl

    from visionr1_jobs.toy.dataset import write_toy_dataset
    from visionr1_jobs.toy.model import create_tiny_model
    from visionr1_jobs.training import rewards

    root = tmp_path_factory.mktemp("ptst")
    model = create_tiny_model(root / "tiny")
    write_toy_dataset(root / "toy", 2, seed=3, n_rl=4, n_bench=1)
    ws = root / "ws"
    ws.mkdir()
    seen: list[dict[str, Any]] = []

    class Recording(trl.GRPOTrainer):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            seen.append(
                {
                    "policy": {k: v.detach().clone() for k, v in self.model.state_dict().items()},
                    "reference": {
                        k: v.detach().clone() for k, v in self.ref_model.state_dict().items()
                    },
                }
            )

    def signal(kind: str, timeout_s: float = 5.0) -> tuple[list[Any], list[float]]:
        # The random tiny model never earns the real reward, so every advantage would be 0 and
        # no weight would move; a length-based reward gives the policy a gradient to follow.
        def by_length(completions: list[Any], **_: Any) -> list[float]:
            return [float(len(str(c))) for c in completions]

        return [by_length], [1.0]

    mp = pytest.MonkeyPatch()
    mp.setattr(trl, "GRPOTrainer", Recording)
    mp.setattr(rewards, "reward_functions", signal)
    try:
        cfg = _grpo_config(ws, model, root / "toy" / "rl", PTST)
        assert stage_main(["grpo", "--config", str(cfg)]) == 0
    finally:
        mp.undo()
    return {"ws": ws, "model": model, "rl": root / "toy" / "rl", "seen": seen}


def test_substage_2_starts_from_substage_1_and_the_reference_is_the_input(
    trained: dict[str, Any],
) -> None:
    ws, seen = trained["ws"], trained["seen"]
    assert read_manifest(ws, "grpo") is not None and len(seen) == 2
    base = _weights(trained["model"])
    final1 = _weights(ws / "grpo" / "stage-1" / "final")
    final2 = _weights(ws / "grpo" / "stage-2" / "final")
    assert not _same(final1, base), "sub-stage 1 must move the weights for this test to mean much"
    # Sub-stage 1: the policy and the reference are both the GRPO input.
    assert _same(seen[0]["policy"], base) and _same(seen[0]["reference"], base)
    # Sub-stage 2: the policy is sub-stage 1's final weights; the reference is still the input.
    assert _same(seen[1]["policy"], final1)
    assert _same(seen[1]["reference"], base) and not _same(seen[1]["reference"], final1)
    assert not _same(final2, final1)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"ptst": [PTST[0], {**PTST[1], "steps": 3}]}, r"params\.ptst\[1\]\.steps"),
        (
            {"ptst": [{**PTST[0], "maxCompletionLength": 16}, PTST[1]]},
            r"ptst\[0\]\.maxCompletionLength",
        ),
        ({"learningRate": 5e-3}, r"params\.learningRate"),
        ({"resetReferenceEachStage": True}, r"params\.resetReferenceEachStage"),
    ],
)
def test_a_resumed_run_with_changed_ptst_rows_is_refused(
    trained: dict[str, Any], change: dict[str, Any], field: str, capsys: pytest.CaptureFixture[str]
) -> None:
    import re

    ws = trained["ws"]
    (ws / "grpo" / "_manifest.json").rename(ws / "grpo" / "manifest.bak")  # "not finished"
    try:
        before = {p: p.stat().st_mtime_ns for p in (ws / "grpo").rglob("*") if p.is_file()}
        params = {"ptst": PTST} | change
        cfg = _grpo_config(ws, trained["model"], trained["rl"], params.pop("ptst"), **params)
        assert stage_main(["grpo", "--config", str(cfg)]) == 65
        err = capsys.readouterr().err
        assert re.search(field, err), err
        after = {p: p.stat().st_mtime_ns for p in (ws / "grpo").rglob("*") if p.is_file()}
        assert after == before  # refused before anything was written
    finally:
        (ws / "grpo" / "manifest.bak").rename(ws / "grpo" / "_manifest.json")


def test_done_markers_record_their_rows(trained: dict[str, Any]) -> None:
    ws = trained["ws"]
    for index, row in enumerate(PTST, start=1):
        done = json.loads((ws / "grpo" / f"stage-{index}" / "_done.json").read_text())
        assert done["row"]["steps"] == row["steps"]
        assert done["row"]["max_completion_length"] == row["maxCompletionLength"]
        assert done["row"]["learning_rate"] == 1e-2
