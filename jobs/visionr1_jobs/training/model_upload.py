"""The final model of a training stage into MLflow: an HF folder logged as a pyfunc model (a
models-from-code wrapper around transformers' generate), registered when asked; once per run."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MODEL_NAME = "model"
_PYFUNC = Path(__file__).with_name("hf_pyfunc.py")


def upload_model(uri: str, run_id: str, model_dir: Path, register_as: str | None) -> dict[str, str]:
    """Log ``model_dir`` into ``run_id`` at ``uri``; register it when ``register_as`` is set.

    Once per stage: a retry that finds the model already logged into this run (a READY logged
    model named ``model`` whose source run is ``run_id``) reuses it, and one already registered
    from this run keeps its version, so a pod that died after logging does not upload the
    weights again nor add a second registry version.
    The weights are copied into the artifact store once, at the end of the stage; the pip
    requirements are given explicitly so MLflow never imports the model to infer them.
    """
    import mlflow

    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient(uri)
    model_uri = _logged_model_uri(client, run_id)
    if model_uri is not None:
        log.warning(
            "MLflow run %s already holds the final model (%s); not logging it again",
            run_id,
            model_uri,
        )
    else:
        active = mlflow.active_run()
        ctx = (
            contextlib.nullcontext()
            if active and active.info.run_id == run_id
            else mlflow.start_run(run_id=run_id, nested=active is not None)
        )
        with ctx:
            info = mlflow.pyfunc.log_model(
                name=MODEL_NAME,
                python_model=str(_PYFUNC),
                artifacts={"hf_model": str(model_dir)},
                pip_requirements=_requirements(),
            )
        model_uri = info.model_uri
    out = {"model_uri": model_uri}
    if register_as:
        versions = client.search_model_versions(f"name='{register_as}' and run_id='{run_id}'")
        if versions:
            version = str(max(int(v.version) for v in versions))
        else:
            version = str(mlflow.register_model(model_uri, register_as).version)
        out |= {"registered_model": register_as, "registered_model_version": version}
    return out


def _logged_model_uri(client: Any, run_id: str) -> str | None:
    """The URI of the final model an earlier attempt logged into ``run_id``, if it finished."""
    from mlflow.entities import LoggedModelStatus

    run = client.get_run(run_id)
    found = client.search_logged_models(
        experiment_ids=[run.info.experiment_id],
        filter_string=f"source_run_id = '{run_id}' AND name = '{MODEL_NAME}'",
    )
    ready = [m for m in found if m.status == LoggedModelStatus.READY]
    return ready[0].model_uri if ready else None


def _requirements() -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    reqs = []
    for name in ("torch", "transformers", "pillow", "pandas"):
        try:
            reqs.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            continue
    return reqs
