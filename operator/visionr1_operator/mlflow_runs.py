"""The operator's side of MLflow: the VisionR1Run's parent run and one nested run per stage.

The stage programs resume their stage run by id (``VISIONR1_STAGE_RUN_ID``) and log into it; the
operator only opens and ends runs. Runs are found again by tags before one is created, so an
operator that crashed between creating a run and recording its id does not leave a duplicate.
MlflowClient is synchronous: call these functions through ``asyncio.to_thread``.
"""

from __future__ import annotations

import os
import threading
from functools import lru_cache
from typing import Any

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

TAG_UID = "visionr1.uid"
TAG_RUN = "visionr1.run"
TAG_NAMESPACE = "visionr1.namespace"
TAG_STAGE = "visionr1.stage"
TAG_KIND = "visionr1.kind"  # "run" (the parent) or "stage"

_lock = threading.Lock()


@lru_cache(maxsize=16)
def _client(uri: str) -> Any:
    # MLflow's client retries a failing request 7 times with backoff (minutes) by default: an
    # outage would hold a reconcile that long. The operator retries on its own schedule instead.
    # (Set here, in the operator's process only, not at import: run-local imports this module.)
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _experiment_id(uri: str, name: str) -> str:
    from mlflow.exceptions import MlflowException

    client = _client(uri)
    with _lock:  # two runs starting at once must not both create the experiment
        exp = client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        try:
            return client.create_experiment(name)
        except MlflowException:
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
            return exp.experiment_id


def _find(uri: str, experiment_id: str, tags: dict[str, str]) -> str | None:
    query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in sorted(tags.items()))
    found = _client(uri).search_runs([experiment_id], filter_string=query, max_results=1)
    return found[0].info.run_id if found else None


def run_tags(run: Any) -> dict[str, str]:
    """Tags of a VisionR1Run's parent run: what it trains, from which model revision."""
    tags = {
        "visionr1.image": run.spec.images.trainer,
        "visionr1.baseModel": run.spec.base_model.name,
    }
    if run.spec.base_model.revision:
        tags["visionr1.baseModel.revision"] = run.spec.base_model.revision
    return tags


def open_parent(
    uri: str,
    experiment: str,
    *,
    namespace: str,
    name: str,
    uid: str,
    extra_tags: dict[str, str] | None = None,
) -> str:
    """The parent run of a VisionR1Run (found by uid, else created). Returns its id."""
    exp = _experiment_id(uri, experiment)
    key = {TAG_UID: uid, TAG_KIND: "run"}
    run_id = _find(uri, exp, key)
    if run_id:
        return run_id
    tags = {**key, TAG_RUN: name, TAG_NAMESPACE: namespace, **(extra_tags or {})}
    return _client(uri).create_run(exp, run_name=name, tags=tags).info.run_id


def open_stage(
    uri: str,
    experiment: str,
    *,
    parent_run_id: str,
    uid: str,
    stage: str,
    namespace: str,
    name: str,
) -> str:
    """The nested run of one stage (shared by its attempts). Returns its id."""
    exp = _experiment_id(uri, experiment)
    key = {TAG_UID: uid, TAG_KIND: "stage", TAG_STAGE: stage}
    run_id = _find(uri, exp, key)
    if run_id:
        return run_id
    tags = {**key, TAG_RUN: name, TAG_NAMESPACE: namespace, "mlflow.parentRunId": parent_run_id}
    return _client(uri).create_run(exp, run_name=stage, tags=tags).info.run_id


def end(uri: str, run_id: str, status: str) -> None:
    """End a run (FINISHED, FAILED or KILLED) unless it already ended."""
    client = _client(uri)
    if client.get_run(run_id).info.status in ("RUNNING", "SCHEDULED"):
        client.set_terminated(run_id, status=status)


def set_tags(uri: str, run_id: str, tags: dict[str, str]) -> None:
    client = _client(uri)
    for k, v in tags.items():
        client.set_tag(run_id, k, v)
