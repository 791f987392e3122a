"""MLflow on retries, against a real MLflow sqlite store: the final model is logged and
registered once per stage run, and params that changed on a resumed run are recorded."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from visionr1_jobs.config import MlflowRef, ResolvedStageConfig


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


def _cfg(ws: Path, uri: str, run_id: str | None = None, **params: Any) -> ResolvedStageConfig:
    return ResolvedStageConfig(
        stage="sft",
        workspace=str(ws),
        output_dir="sft",
        base_model="unused",
        params=params,
        mlflow=MlflowRef(tracking_uri=uri, experiment="once", run_id=run_id),
    )


def test_changed_params_on_a_resumed_run_are_recorded(tmp_path: Path, store: str) -> None:
    import mlflow

    from visionr1_jobs.tracking import stage_run

    with stage_run(_cfg(tmp_path, store, learningRate=1e-5, epochs=2)) as run:
        run_id = run.info.run_id
    # The retried pod resumes the same run with another learning rate and a new field.
    with stage_run(_cfg(tmp_path, store, run_id, learningRate=3e-5, epochs=2, maxSteps=7)):
        pass
    got = mlflow.MlflowClient(store).get_run(run_id)
    assert got.data.params["learningRate"] == "1e-05"  # MLflow params are write-once
    assert got.data.params["maxSteps"] == "7"
    assert got.data.tags["visionr1.param_changed.learningRate"] == "1e-05 -> 3e-05"
    assert "visionr1.param_changed.epochs" not in got.data.tags
    assert "learningRate: 1e-05 -> 3e-05" in got.data.tags["mlflow.note.content"]


def test_the_final_model_is_logged_and_registered_once(tmp_path: Path, store: str) -> None:
    import mlflow

    from visionr1_jobs.tracking import stage_run
    from visionr1_jobs.training.mlflow_log import log_model

    model_dir = tmp_path / "final"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    cfg = _cfg(tmp_path, store)
    with stage_run(cfg) as run:
        run_id = run.info.run_id
        first = log_model(run_id, cfg, model_dir, "once-model")
    # A retry that finds the stage's model complete logs it again into the same run.
    with stage_run(_cfg(tmp_path, store, run_id)):
        second = log_model(run_id, cfg, model_dir, "once-model")
    assert second == first and first["registered_model_version"] == "1"
    client = mlflow.MlflowClient(store)
    exp = client.get_run(run_id).info.experiment_id
    logged = client.search_logged_models([exp], filter_string=f"source_run_id = '{run_id}'")
    assert len(logged) == 1
    assert [str(v.version) for v in client.search_model_versions("name='once-model'")] == ["1"]
    # A model logged before the registry name was set gets registered on the retry, once.
    third = log_model(run_id, cfg, model_dir, "once-model-b")
    assert third["model_uri"] == first["model_uri"] and third["registered_model_version"] == "1"
    assert len(client.search_logged_models([exp], filter_string=f"source_run_id = '{run_id}'")) == 1
