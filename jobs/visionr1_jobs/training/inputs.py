"""Resolve a training stage's ``model`` and ``data`` inputs (another stage's output, a dataset
folder, a checkpoint path or a hub id)."""

from __future__ import annotations

from visionr1_jobs.config import ResolvedStageConfig
from visionr1_jobs.contract import InvalidInput, input_path
from visionr1_jobs.data.record import Sample


def model_input(cfg: ResolvedStageConfig) -> str:
    """A model folder or hub id; a stage input follows the producer's manifest to its model."""
    return str(input_path(cfg, "model", "model"))


def data_format(cfg: ResolvedStageConfig, name: str = "data") -> str:
    loc = cfg.inputs.get(name)
    if loc is None:
        raise InvalidInput(f"config.inputs.{name} is missing; the {cfg.stage} stage needs it")
    # Our stages write the pipeline's own parquet.
    return "visionr1" if loc.format == "stage" else loc.format


def load_samples(
    cfg: ResolvedStageConfig, name: str = "data", limit: int | None = None
) -> list[Sample]:
    from visionr1_jobs.data.load import load_dataset_dir

    path = input_path(cfg, name, "data")
    return load_dataset_dir(path, data_format(cfg, name), limit=limit)
