"""MLflow for stage programs: one nested run per stage under the VisionR1Run's parent run.

The operator (or the local executor) creates the parent run and passes its id, and usually the
stage's own run id, in the resolved config (``cfg.mlflow``) or in the environment
(``VISIONR1_PARENT_RUN_ID``, ``VISIONR1_STAGE_RUN_ID``, ``MLFLOW_TRACKING_URI``,
``MLFLOW_EXPERIMENT_NAME``). A retried pod resumes the same stage run, so its metrics continue.
Only global rank 0 logs; other ranks get ``None`` and must skip logging.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from visionr1_jobs.config import ResolvedStageConfig
from visionr1_jobs.mlflow_params import log_params_noting_changes
from visionr1_jobs.mlflow_spool import Spool, quick_requests, transient

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

log = logging.getLogger(__name__)

PARENT_ENV = "VISIONR1_PARENT_RUN_ID"
STAGE_ENV = "VISIONR1_STAGE_RUN_ID"


def is_rank_zero() -> bool:
    return int(os.environ.get("RANK", "0") or 0) == 0


def tracking_uri(cfg: ResolvedStageConfig) -> str:
    """The config's URI, else MLFLOW_TRACKING_URI, else sqlite in the workspace."""
    uri = cfg.mlflow.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{Path(cfg.workspace).resolve() / 'mlflow.db'}"


def outbox(cfg: ResolvedStageConfig) -> Spool:
    """The run's MLflow outbox on its workspace (:mod:`visionr1_jobs.mlflow_spool`)."""
    return Spool(cfg.workspace, tracking_uri(cfg))


def flatten(params: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested params → flat dotted keys with JSON-ish values (MLflow caps a value at 6000 chars)."""
    out: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, name + "."))
        else:
            text = value if isinstance(value, str) else json.dumps(value, default=str)
            out[name] = text[:6000]
    return out


@contextlib.contextmanager
def stage_run(
    cfg: ResolvedStageConfig,
    name: str | None = None,
    *,
    nested_under: str | None = None,
    log_config: bool = True,
) -> Iterator[Any]:
    """Start (or resume) the MLflow run of this stage; yields the ActiveRun, or None off rank 0.

    ``nested_under``: a run id to nest under instead of the parent (PTST sub-stages nest under
    the GRPO stage run). ``name`` defaults to the stage name.
    """
    if not is_rank_zero():
        yield None
        return
    import mlflow

    _flush_quietly(cfg)
    mlflow.set_tracking_uri(tracking_uri(cfg))
    mlflow.set_experiment(_experiment(cfg))
    resume = None if nested_under else (cfg.mlflow.run_id or os.environ.get(STAGE_ENV))
    tags = _tags(cfg, nested_under)
    if resume:
        run = mlflow.start_run(run_id=resume)
    else:
        run = mlflow.start_run(run_name=name or cfg.stage, tags=tags)
    try:
        if log_config:
            # A resumed run already holds its params; a changed value is noted, not dropped.
            log_params_noting_changes(mlflow.MlflowClient(), run.info.run_id, flatten(cfg.params))
        yield run
    except BaseException:
        mlflow.end_run(status="FAILED")
        raise
    else:
        mlflow.end_run(status="FINISHED")


def _experiment(cfg: ResolvedStageConfig) -> str:
    return os.environ.get("MLFLOW_EXPERIMENT_NAME") or cfg.mlflow.experiment


def _tags(cfg: ResolvedStageConfig, nested_under: str | None) -> dict[str, str]:
    tags = {
        "visionr1.stage": cfg.stage,
        "visionr1.run": cfg.run.name,
        "visionr1.namespace": cfg.run.namespace,
    }
    parent = nested_under or cfg.mlflow.parent_run_id or os.environ.get(PARENT_ENV)
    if parent:
        tags["mlflow.parentRunId"] = parent
    return tags


def _flush_quietly(cfg: ResolvedStageConfig) -> None:
    """Send what an earlier stage of the run left in the outbox while MLflow was down."""
    try:
        outbox(cfg).flush(force=True)
    except Exception as exc:  # a row MLflow refuses must not fail the stage that found it
        log.warning("MLflow outbox of %s not sent: %s", cfg.workspace, exc)


@contextlib.contextmanager
def durable_run(
    cfg: ResolvedStageConfig,
    name: str | None = None,
    *,
    nested_under: str | None = None,
    run_id: str | None = None,
    log_config: bool = True,
) -> Iterator[Any]:
    """Like :func:`stage_run`, for stages that must not depend on MLflow (training): no fluent
    active run, every write goes through the workspace's outbox, and MLflow being unreachable
    at the start is no error when the run's id is known (``run_id``, else the operator's stage
    run id): its metrics wait in the outbox. Without a known id and without MLflow the stage
    runs untracked (a warning says so). Yields an object with ``.info.run_id``, or None.
    """
    if not is_rank_zero():
        yield None
        return
    import mlflow

    box = outbox(cfg)
    _flush_quietly(cfg)
    resume = run_id or (None if nested_under else (cfg.mlflow.run_id or os.environ.get(STAGE_ENV)))
    uri = tracking_uri(cfg)
    try:
        with quick_requests():
            client = mlflow.MlflowClient(uri)
            if resume:
                client.update_run(resume, status="RUNNING")
            else:
                experiment = _experiment(cfg)
                found = client.get_experiment_by_name(experiment)
                exp_id = found.experiment_id if found else client.create_experiment(experiment)
                created = client.create_run(
                    exp_id, run_name=name or cfg.stage, tags=_tags(cfg, nested_under)
                )
                resume = created.info.run_id
    except Exception as exc:
        if not transient(exc):
            raise
        if not resume:
            log.warning(
                "MLflow at %s is unreachable and no run id is known for %s: this stage's "
                "metrics are not recorded (it trains on)", uri, name or cfg.stage,
            )  # fmt: skip
            yield None
            return
        log.warning(
            "MLflow at %s is unreachable (%s): run %s is logged through the outbox in %s",
            uri, str(exc).splitlines()[0][:200], resume, box.dir,
        )  # fmt: skip
    try:
        if log_config:
            box.params(resume, flatten(cfg.params))
        yield SimpleNamespace(info=SimpleNamespace(run_id=resume))
    except BaseException:
        box.terminated(resume, "FAILED")
        raise
    else:
        box.terminated(resume, "FINISHED")
