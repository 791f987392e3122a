"""Resolve a training stage's ``model`` and ``data`` inputs (another stage's output, a dataset
folder in any supported layout, a checkpoint path or a hub id)."""

from __future__ import annotations

import logging
from pathlib import Path

from visionr1_jobs.config import DatasetRef, ResolvedStageConfig
from visionr1_jobs.contract import InvalidInput, input_path
from visionr1_jobs.data.record import Sample

log = logging.getLogger(__name__)


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
    cfg: ResolvedStageConfig,
    image_cache: Path,
    name: str = "data",
    ref: DatasetRef | None = None,
) -> tuple[list[Sample], dict[str, int]]:
    """The input's samples and the rows skipped as unusable (reason → count).

    Public layouts (geometry3k parquet with embedded images, sharegpt, …) go through the data
    readers; embedded images are written once into ``image_cache`` (content-addressed) so the
    trainer reads files, never bytes held in the dataset.
    """
    from visionr1_jobs.contract import resolve_path
    from visionr1_jobs.data.load import describe, load_dataset

    path = input_path(cfg, name, "data")
    root = resolve_path(cfg.workspace, ref.image_root) if ref and ref.image_root else None
    result = load_dataset(
        path,
        data_format(cfg, name),
        image_root=root,
        image_cache=image_cache,
        limit=ref.limit if ref else None,
        skip_bad=True,
    )
    if result.skipped:
        log.warning("%s: skipped unusable rows: %s", path, describe(result))
    return result.records, dict(result.skipped)
