"""A training world for the SFT/GRPO tests: the tiny model, toy data, a cold-start set standing
in for the filter's output, and the SFT stage config the tests start from."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from visionr1_jobs.config import ResolvedStageConfig
from visionr1_jobs.contract import StageManifest, atomic_write_json


def make_train_world(
    root: Path, *, seed: int, n_rl: int, n_bench: int, response: str
) -> dict[str, Path]:
    """16 toy problems whose responses are ``response`` with ``{a}`` the answer, written as a
    dataset (``cold``); the tiny model; the toy RL split (``rl``)."""
    from visionr1_jobs.data.io import write_records
    from visionr1_jobs.data.load import load_dataset_dir
    from visionr1_jobs.toy.dataset import write_toy_dataset
    from visionr1_jobs.toy.model import create_tiny_model

    model = create_tiny_model(root / "models" / "tiny")
    write_toy_dataset(root / "toy", 16, seed=seed, n_rl=n_rl, n_bench=n_bench)
    cold = [
        s.model_copy(update={"response": response.format(a=s.answer)})
        for s in load_dataset_dir(root / "toy" / "train", "toy")
    ]
    write_records(cold, root / "cold")
    return {"root": root, "model": model, "rl": root / "toy" / "rl", "cold": root / "cold"}


def stand_in_filter(ws: Path, world: dict[str, Path]) -> Path:
    """A finished filter stage in workspace ``ws`` (SFT follows its manifest to the data)."""
    ws.mkdir(parents=True, exist_ok=True)
    atomic_write_json(
        ws / "filter" / "_manifest.json",
        StageManifest(stage="filter", outputs={"data": str(world["cold"])}).dump(),
    )
    return ws


def sft_config(ws: Path, world: dict[str, Path], experiment: str, **params: Any) -> Path:
    """``ws/sft.json``: SFT on the filter's data from the tiny model, CPU, 4 steps unless
    ``params`` say otherwise (a value of None drops the default)."""
    merged: dict[str, Any] = {
        "deepspeed": "none",
        "bf16": False,
        "gradientCheckpointing": False,
        "learningRate": 1e-2,
        "globalBatchSize": 4,
        "perDeviceBatchSize": 2,
        "maxSteps": 4,
        "saveSteps": 2,
        "maxLength": 512,
        **params,
    }
    cfg = ResolvedStageConfig(
        stage="sft",
        workspace=str(ws),
        output_dir="sft",
        base_model=str(world["model"]),
        inputs={
            "data": {"path": "filter", "format": "stage", "stage": "filter"},
            "model": {"path": str(world["model"]), "format": "model"},
        },
        params={k: v for k, v in merged.items() if v is not None},
        # Named explicitly, as the operator does: mlflow.set_tracking_uri exports
        # MLFLOW_TRACKING_URI, which would otherwise leak from one in-process stage to the next.
        mlflow={"experiment": experiment, "trackingUri": f"sqlite:///{ws.resolve() / 'mlflow.db'}"},
    )
    path = ws / "sft.json"
    path.write_text(cfg.model_dump_json(by_alias=True))
    return path
