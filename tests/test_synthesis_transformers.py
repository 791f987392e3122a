"""Synthesis through a real generation backend: transformers on the tiny Qwen2.5-VL, tiny budget.

Random weights cannot write the Vision-R1 format in 8 tokens, so the filter must drop every row,
each with a reason; what matters here is the real code path (chat template, images, batching,
token counts, the raw audit fields) from the config to the parquet rows.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from visionr1_jobs.config import (
    Backend,
    FilterParams,
    InputLocation,
    MlflowRef,
    ResolvedStageConfig,
    Sampling,
    SynthesisParams,
    Teacher,
)
from visionr1_jobs.data.io import read_records
from visionr1_jobs.filtering.rules import REASONS


@pytest.mark.slow  # builds the tiny model (~30 s on 2 busy cores)
def test_synthesis_with_the_transformers_backend_on_the_tiny_model(tmp_path: Path) -> None:
    import mlflow

    from visionr1_jobs.stages import filter as filter_stage
    from visionr1_jobs.stages import synthesis
    from visionr1_jobs.toy.dataset import write_toy_dataset
    from visionr1_jobs.toy.model import create_tiny_model

    model = create_tiny_model(tmp_path / "models" / "tiny")
    write_toy_dataset(tmp_path / "toy", n=4, seed=1, n_rl=1, n_bench=1)
    backend = Backend(kind="transformers", batch_size=4)  # model unset: the run's base model
    params = SynthesisParams(
        describer=Teacher(backend=backend, sampling=Sampling(temperature=0, max_tokens=8)),
        reasoner=Teacher(backend=backend, sampling=Sampling(temperature=1.0, max_tokens=8, seed=0)),
        rows_per_shard=3,
    )
    mlflow_ref = MlflowRef(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", experiment="tf")
    cfg = ResolvedStageConfig(
        stage="synthesis",
        workspace=str(tmp_path),
        output_dir="synthesis",
        base_model=str(model),
        inputs={"data": InputLocation(path="toy/train", format="toy")},
        params=params.dump(),
        mlflow=mlflow_ref,
    )
    man = synthesis.run(cfg)
    assert man.rows == {"data": 4} and len(man.hashes) == 2  # chunks of 3 + 1
    assert man.extra["describer"] == man.extra["reasoner"] == f"transformers:{model}"
    rows = read_records(tmp_path / "synthesis")
    assert [r.id for r in rows] == [s.id for s in read_records(tmp_path / "toy" / "train")]
    for row in rows:
        tokens = row.raw["tokens"]
        assert 1 <= tokens["pseudo_cot"] <= 8 and 1 <= tokens["description"] <= 8
        assert 1 <= tokens["reasoner"] <= 8
        assert (
            isinstance(row.raw["description"], str)
            and row.raw["description"] in row.raw["reasoner_prompt"]
        )
        assert row.raw["finish_reasons"]["reasoner"] in ("stop", "length")
        assert "toy_behaviour" not in row.raw  # a real backend: real rows carry no toy field
    client = mlflow.MlflowClient(mlflow_ref.tracking_uri)
    run = client.get_run(man.mlflow_run_id)
    assert run.data.metrics["tokens_per_s"] > 0 and run.data.metrics["rows"] == 4
    assert "visionr1.toy_stand_in" not in run.data.tags
    assert run.data.params["describer.sampling.maxTokens"] == "8"

    fcfg = cfg.model_copy(
        update={
            "stage": "filter",
            "output_dir": "filter",
            "inputs": {"data": InputLocation(path="synthesis", format="stage", stage="synthesis")},
            "params": FilterParams().dump(),
        }
    )
    fman = filter_stage.run(fcfg)
    assert fman.rows == {"data": 0, "input": 4}
    reasons = fman.extra["drop_reasons"]
    assert sum(reasons.values()) == 4 and set(reasons) <= set(REASONS)
