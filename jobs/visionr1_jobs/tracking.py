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
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from visionr1_jobs.config import ResolvedStageConfig

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

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

    mlflow.set_tracking_uri(tracking_uri(cfg))
    experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME") or cfg.mlflow.experiment
    mlflow.set_experiment(experiment)
    parent = nested_under or cfg.mlflow.parent_run_id or os.environ.get(PARENT_ENV)
    resume = None if nested_under else (cfg.mlflow.run_id or os.environ.get(STAGE_ENV))
    tags = {
        "visionr1.stage": cfg.stage,
        "visionr1.run": cfg.run.name,
        "visionr1.namespace": cfg.run.namespace,
    }
    if parent:
        tags["mlflow.parentRunId"] = parent
    if resume:
        run = mlflow.start_run(run_id=resume)
    else:
        run = mlflow.start_run(run_name=name or cfg.stage, tags=tags)
    try:
        if log_config:
            # A resumed run already holds the same params; logging them again is a no-op unless
            # they changed, which MLflow refuses: keep the first attempt's values then.
            with contextlib.suppress(mlflow.exceptions.MlflowException):
                mlflow.log_params(flatten(cfg.params))
        yield run
    except BaseException:
        mlflow.end_run(status="FAILED")
        raise
    else:
        mlflow.end_run(status="FINISHED")
