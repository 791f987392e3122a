"""MLflow for training stages: resumable (nested) runs, per-step metrics, the final model.

Only global rank 0 touches MLflow (:func:`visionr1_jobs.tracking.durable_run` yields None
elsewhere and the callbacks here are only attached on rank 0). TRL's own ``report_to`` stays
"none": the metrics callback logs straight into the run it is given, so PTST sub-stages can each
log into their own nested run while the GRPO stage run stays the parent.

Training never depends on MLflow: every write goes through the run's outbox on the workspace
(:mod:`visionr1_jobs.mlflow_spool`), which sends at once when MLflow answers and keeps the rows
(bounded) while it does not; a stage that ends during an outage leaves them for the next stage.
The final model is uploaded by rank 0 after every other rank has finished (no collective waits
on the upload); during an outage it waits in the outbox too (the folder stays on the workspace).
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from visionr1_jobs.config import ResolvedStageConfig
from visionr1_jobs.contract import atomic_write
from visionr1_jobs.mlflow_spool import transient
from visionr1_jobs.tracking import durable_run, is_rank_zero, outbox, tracking_uri
from visionr1_jobs.training.model_upload import upload_model

log = logging.getLogger(__name__)

RUN_ID_FILE = "_mlflow_run_id"


def _saved_run_id(cfg: ResolvedStageConfig, state_dir: Path) -> str | None:
    path = state_dir / RUN_ID_FILE
    if not path.exists():
        return None
    run_id = path.read_text().strip()
    import mlflow

    from visionr1_jobs.mlflow_spool import quick_requests

    try:
        with quick_requests():
            mlflow.MlflowClient(tracking_uri(cfg)).get_run(run_id)
    except Exception as exc:
        if transient(exc):  # MLflow down: the run we created earlier is still the one
            return run_id
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
    """:func:`~visionr1_jobs.tracking.durable_run`, but a retried pod continues the run its
    first attempt created.

    The run id is kept in ``state_dir/_mlflow_run_id``; a config that names the stage's run id
    (``cfg.mlflow.runId``, the operator's choice) wins for the stage run itself. Yields an
    object with ``.info.run_id``, or None off rank 0 (and when MLflow is down and no id is known).
    """
    if not is_rank_zero():
        yield None
        return
    saved = None if (cfg.mlflow.run_id and nested_under is None) else _saved_run_id(cfg, state_dir)
    ctx = durable_run(
        cfg, name, nested_under=nested_under, run_id=saved, log_config=nested_under is None
    )
    with ctx as run:
        if run is not None and not saved:
            atomic_write(state_dir / RUN_ID_FILE, run.info.run_id + "\n")
        yield run


def log_params(run_id: str, cfg: ResolvedStageConfig, params: dict[str, Any]) -> None:
    """Log params into ``run_id`` through the outbox; a retried attempt with the same values is
    a no-op and a changed value keeps the first attempt's param and is recorded as a tag and in
    the run's note (:func:`visionr1_jobs.mlflow_params.log_params_noting_changes`)."""
    outbox(cfg).params(run_id, {k: str(v) for k, v in params.items()})


def log_metrics(
    run_id: str, cfg: ResolvedStageConfig, metrics: dict[str, float], step: int | None = None
) -> None:
    """Numeric values into ``run_id`` at ``step``, through the outbox (never blocks on MLflow)."""
    clean = _numeric(metrics)
    if clean:
        outbox(cfg).metrics(run_id, clean, step or 0)


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


def log_model(
    run_id: str, cfg: ResolvedStageConfig, model_dir: Path, register_as: str | None
) -> dict[str, str]:
    """Log the final HF folder into ``run_id`` (and register it) once per stage run
    (:func:`visionr1_jobs.training.model_upload.upload_model`); returns what to record in the
    manifest. While MLflow is unreachable the upload waits in the outbox instead, and the
    result says ``model_upload: pending``: the stage still succeeds."""
    box = outbox(cfg)
    if box.flush(force=True):
        try:
            return upload_model(tracking_uri(cfg), run_id, model_dir, register_as)
        except Exception as exc:
            if not transient(exc):
                raise
            log.warning("MLflow unreachable during the model upload (%s)", exc)
    box.model(run_id, model_dir, register_as)
    log.warning(
        "the final model of run %s waits in the MLflow outbox %s (uploaded when MLflow answers)",
        run_id,
        box.dir,
    )
    return {"model_upload": "pending"}


def log_artifact(
    run_id: str, cfg: ResolvedStageConfig, path: Path, artifact_path: str | None = None
) -> None:
    """A workspace file into ``run_id``'s artifacts, through the outbox."""
    outbox(cfg).artifact(run_id, path, artifact_path)
