"""MLflow for training stages: resumable (nested) runs, per-step metrics, the final model.

Only global rank 0 touches MLflow (:func:`visionr1_jobs.tracking.stage_run` yields None elsewhere
and the callbacks here are only attached on rank 0). TRL's own ``report_to`` stays "none": the
metrics callback below logs straight into the run it is given with MLflow's client, so PTST
sub-stages can each log into their own nested run while the GRPO stage run stays the parent.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from visionr1_jobs.config import ResolvedStageConfig
from visionr1_jobs.contract import atomic_write
from visionr1_jobs.tracking import (
    is_rank_zero,
    log_params_noting_changes,
    stage_run,
    tracking_uri,
)

log = logging.getLogger(__name__)

RUN_ID_FILE = "_mlflow_run_id"


def _saved_run_id(cfg: ResolvedStageConfig, state_dir: Path) -> str | None:
    path = state_dir / RUN_ID_FILE
    if not path.exists():
        return None
    run_id = path.read_text().strip()
    import mlflow

    try:
        mlflow.MlflowClient(tracking_uri(cfg)).get_run(run_id)
    except mlflow.exceptions.MlflowException:
        log.warning(
            "MLflow run %s from %s is not in the tracking store; starting a new one", run_id, path
        )
        return None
    return run_id


@contextlib.contextmanager
def resumable_run(
    cfg: ResolvedStageConfig,
    state_dir: Path,
    name: str | None = None,
    *,
    nested_under: str | None = None,
) -> Iterator[Any]:
    """:func:`stage_run`, but a retried pod continues the run its first attempt created.

    The run id is kept in ``state_dir/_mlflow_run_id``; a config that names the stage's run id
    (``cfg.mlflow.runId``, the operator's choice) wins for the stage run itself. Yields the
    ActiveRun, or None off rank 0.
    """
    if not is_rank_zero():
        yield None
        return
    saved = None if (cfg.mlflow.run_id and nested_under is None) else _saved_run_id(cfg, state_dir)
    if saved:
        resumed_cfg = cfg.model_copy(
            update={"mlflow": cfg.mlflow.model_copy(update={"run_id": saved})}
        )
        ctx = stage_run(resumed_cfg, name, log_config=nested_under is None)
    else:
        ctx = stage_run(cfg, name, nested_under=nested_under, log_config=nested_under is None)
    with ctx as run:
        if run is not None and not saved:
            atomic_write(state_dir / RUN_ID_FILE, run.info.run_id + "\n")
        yield run


def log_params(run_id: str, cfg: ResolvedStageConfig, params: dict[str, Any]) -> dict[str, Any]:
    """Log params into ``run_id``; a retried attempt with the same values is a no-op and a
    changed value keeps the first attempt's param and is recorded as a tag and in the run's note
    (:func:`visionr1_jobs.tracking.log_params_noting_changes`). Returns the changes."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri(cfg))
    return log_params_noting_changes(client, run_id, {k: str(v) for k, v in params.items()})


def log_metrics(
    run_id: str, cfg: ResolvedStageConfig, metrics: dict[str, float], step: int | None = None
) -> None:
    import mlflow
    from mlflow.entities import Metric

    clean = _numeric(metrics)
    if not clean:
        return
    client = mlflow.MlflowClient(tracking_uri(cfg))
    now = int(time.time() * 1000)
    client.log_batch(
        run_id, metrics=[Metric(k, v, now, step or 0) for k, v in clean.items()], synchronous=True
    )


def _numeric(metrics: dict[str, Any]) -> dict[str, float]:
    out: dict[str, float] = {}
    for key, value in metrics.items():
        if hasattr(value, "item") and getattr(value, "numel", lambda: 1)() == 1:
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if math.isnan(value) or math.isinf(value):
            continue
        # MLflow accepts letters, digits, _ - . space : / in metric names.
        out[re.sub(r"[^0-9A-Za-z_\-. :/]", "_", key)] = float(value)
    return out


# --------------------------------------------------------------------------- the final model

_PYFUNC = Path(__file__).with_name("hf_pyfunc.py")


def log_model(
    run_id: str, cfg: ResolvedStageConfig, model_dir: Path, register_as: str | None
) -> dict[str, str]:
    """Log the final HF folder as an MLflow pyfunc model (models-from-code wrapper around
    transformers' generate) into ``run_id``; register it when ``register_as`` is set.

    Once per stage: a retry that finds the model already logged into this run (a READY logged
    model named ``model`` whose source run is ``run_id``) reuses it, and one already registered
    from this run keeps its version, so a pod that died after logging does not upload the
    weights again nor add a second registry version.
    The weights are copied into the artifact store once, at the end of the stage; the pip
    requirements are given explicitly so MLflow never imports the model to infer them.
    """
    import mlflow

    mlflow.set_tracking_uri(tracking_uri(cfg))
    client = mlflow.MlflowClient(tracking_uri(cfg))
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


MODEL_NAME = "model"


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


def log_artifact(
    run_id: str, cfg: ResolvedStageConfig, path: Path, artifact_path: str | None = None
) -> None:
    import mlflow

    mlflow.MlflowClient(tracking_uri(cfg)).log_artifact(run_id, str(path), artifact_path)
