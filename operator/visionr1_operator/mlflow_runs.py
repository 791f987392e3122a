"""The operator's side of MLflow: the VisionR1Run's parent run and one nested run per stage.

The stage programs resume their stage run by id (``VISIONR1_STAGE_RUN_ID``) and log into it; the
operator only opens and ends runs. Runs are found again by tags before one is created, so an
operator that crashed between creating a run and recording its id does not leave a duplicate.
MlflowClient is synchronous: call these functions through ``asyncio.to_thread``.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

TAG_UID = "visionr1.uid"
TAG_RUN = "visionr1.run"
TAG_NAMESPACE = "visionr1.namespace"
TAG_STAGE = "visionr1.stage"
TAG_KIND = "visionr1.kind"  # "run" (the parent) or "stage"

_lock = threading.Lock()


@dataclass(frozen=True)
class Server:
    """A tracking server and the credentials the operator uses there for one run.

    The operator tracks runs on several servers with different credentials (a run's own
    ``spec.mlflow.credentialsSecret``, or the operator's for its own server), in one process:
    MLflow's client reads credentials from process-wide environment variables, so a client of a
    :class:`Server` is given its credentials explicitly and never reads them from there.
    """

    uri: str
    username: str | None = field(default=None, repr=False)
    password: str | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)

    def __str__(self) -> str:
        return self.uri


Tracking = str | Server  # a plain URI: MLflow's own credentials lookup (run-local)

# The keys of a credentials Secret (the environment variables MLflow's client reads, so the same
# Secret is the stage pods' envFrom) → Server's fields.
CREDENTIAL_KEYS = {
    "MLFLOW_TRACKING_USERNAME": "username",
    "MLFLOW_TRACKING_PASSWORD": "password",
    "MLFLOW_TRACKING_TOKEN": "token",
}


def credentials_from_secret(data: dict[str, str]) -> dict[str, str]:
    """A Secret's ``data`` (base64) → Server's credential fields (the keys it has)."""
    import base64

    return {
        field_: base64.b64decode(data[key]).decode()
        for key, field_ in CREDENTIAL_KEYS.items()
        if data.get(key)
    }


def credentials_from_env(env: dict[str, str]) -> dict[str, str]:
    """The operator's own credentials from its environment (the chart's Secret, envFrom)."""
    return {field_: env[key] for key, field_ in CREDENTIAL_KEYS.items() if env.get(key)}


@lru_cache(maxsize=64)
def _client(where: Tracking) -> Any:
    # MLflow's client retries a failing request 7 times with backoff (minutes) by default: an
    # outage would hold a reconcile that long. The operator retries on its own schedule instead.
    # (Set here, in the operator's process only, not at import: run-local imports this module.)
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    from mlflow.tracking import MlflowClient

    if isinstance(where, str):
        return MlflowClient(tracking_uri=where)
    client = MlflowClient(tracking_uri=where.uri)
    if where.uri.startswith(("http://", "https://")):
        client._tracking_client = _ExplicitCredentials(where)
    return client


def _explicit_store(server: Server) -> Any:
    from mlflow.environment_variables import (
        MLFLOW_TRACKING_INSECURE_TLS,
        MLFLOW_TRACKING_SERVER_CERT_PATH,
    )
    from mlflow.store.tracking.rest_store import RestStore
    from mlflow.utils.rest_utils import MlflowHostCreds

    def creds() -> Any:
        return MlflowHostCreds(
            host=server.uri,
            username=server.username,
            password=server.password,
            token=server.token,
            # TLS settings are the operator's, not a credential: still from its environment
            ignore_tls_verification=MLFLOW_TRACKING_INSECURE_TLS.get(),
            server_cert_path=MLFLOW_TRACKING_SERVER_CERT_PATH.get(),
        )

    return RestStore(creds)


def _explicit_credentials_class() -> type:
    from mlflow.tracking._tracking_service.client import TrackingServiceClient

    class ExplicitCredentials(TrackingServiceClient):  # type: ignore[misc]
        """MlflowClient's tracking client, with a store holding ``server``'s credentials."""

        def __init__(self, server: Server) -> None:
            self._server = server
            self._store = _explicit_store(server)
            super().__init__(server.uri)

        @property
        def store(self) -> Any:
            return self._store

    return ExplicitCredentials


def _ExplicitCredentials(server: Server) -> Any:  # noqa: N802 (a class, made on first use)
    global _explicit_class
    if _explicit_class is None:
        _explicit_class = _explicit_credentials_class()
    return _explicit_class(server)


_explicit_class: type | None = None


def _experiment_id(uri: Tracking, name: str) -> str:
    from mlflow.exceptions import MlflowException

    client = _client(uri)
    with _lock:  # two runs starting at once must not both create the experiment
        exp = client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        try:
            return client.create_experiment(name, tags=dict([EXPERIMENT_KIND]))
        except MlflowException:
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
            return exp.experiment_id


def _find(uri: Tracking, experiment_id: str, tags: dict[str, str]) -> str | None:
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
    uri: Tracking,
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
    uri: Tracking,
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


def end(uri: Tracking, run_id: str, status: str) -> None:
    """End a run (FINISHED, FAILED or KILLED) unless it already ended."""
    client = _client(uri)
    if client.get_run(run_id).info.status in ("RUNNING", "SCHEDULED"):
        client.set_terminated(run_id, status=status)


def stage_metrics(uri: Tracking, run_id: str, stage: str) -> tuple[dict[str, float], list[Any]]:
    """A stage run's latest metrics, and the history of the metric that gives its step
    (watch.STEP_METRIC: SFT's loss, GRPO's reward, eval's rows done; MLflow Metric objects, []
    when not logged yet). Read only: what ``kubectl get vr1`` shows."""
    from visionr1_operator.watch import STEP_METRIC

    client = _client(uri)
    latest = dict(client.get_run(run_id).data.metrics)
    key = STEP_METRIC.get(stage)
    if key is None or key not in latest:
        return latest, []
    return latest, list(client.get_metric_history(run_id, key))


def set_tags(uri: Tracking, run_id: str, tags: dict[str, str]) -> None:
    client = _client(uri)
    for k, v in tags.items():
        client.set_tag(run_id, k, v)


# --------------------------------------------------------------------------- the parent's summary

#: Tag that makes the MLflow UI open the experiment on its training runs (not on GenAI traces).
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
HEADLINE = ("accuracy", "format_rate", "mean_response_tokens")


def mark_training_experiment(uri: Tracking, experiment_id: str) -> None:
    """Tag the experiment as model development, so its page opens on the runs table."""
    _client(uri).set_experiment_tag(experiment_id, *EXPERIMENT_KIND)


def git_commit(start: str | os.PathLike[str] = ".") -> str | None:
    """The checkout's commit (``VISIONR1_GIT_COMMIT`` wins, e.g. baked into an image)."""
    import subprocess

    env = os.environ.get("VISIONR1_GIT_COMMIT")
    if env:
        return env
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=start,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def _slug(name: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "checkpoint"


def ptst_schedule(rows: list[Any]) -> str:
    """``64×8×20 → 128×4×20``: budget × samples per prompt × steps of each PTST sub-stage."""
    return " → ".join(f"{r.max_completion_length}×{r.num_generations}×{r.steps}" for r in rows)


def summary_params(run: Any) -> dict[str, str]:
    """Key params of a VisionR1Run for the parent run (run: the validated VisionR1Run)."""
    st = run.spec.stages
    enabled = [s for s in ("synthesis", "filter", "sft", "grpo", "eval") if st.get(s).enabled]
    params: dict[str, str] = {
        "base_model": run.spec.base_model.name,
        "stages": ",".join(enabled),
    }
    if st.synthesis.enabled and st.synthesis.from_ is not None:
        params["data.raw"] = str(st.synthesis.from_.dataset or st.synthesis.from_.stage)
    if st.sft.enabled:
        p = st.sft.params
        params |= {"sft.epochs": str(p.epochs), "sft.learning_rate": str(p.learning_rate)}
    if st.grpo.enabled:
        g = st.grpo.params
        src = st.grpo.from_
        start = "sft"
        if src is not None:
            start = "base" if src.base_model else str(src.checkpoint or src.stage)
        params |= {
            "grpo.ptst": ptst_schedule(g.ptst),
            "grpo.reward": g.reward,
            "grpo.from": start,
            "grpo.learning_rate": str(g.learning_rate),
            "grpo.prompts_per_step": str(g.prompts_per_step),
            "grpo.temperature": str(g.temperature),
        }
        if g.dataset is not None:
            params["data.rl"] = g.dataset.path
    if st.eval.enabled:
        e = st.eval.params
        params["eval.checkpoints"] = ",".join(e.checkpoints)
        for b in e.benchmarks:
            params[f"eval.{b.name}.limit"] = str(b.limit or "all")
    return params


def _datasets(run: Any, workspace: str | None, counts: dict[str, float]) -> list[Any]:
    """DatasetInputs of the run: raw data, filtered cold start, RL problems, each benchmark."""
    import warnings

    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag

    def where(path: str) -> str:
        if workspace and not path.startswith("/") and "://" not in path:
            return os.path.join(workspace, path)
        return path

    st = run.spec.stages
    found: list[tuple[str, str, str]] = []  # (name, path, context)
    if st.synthesis.enabled and st.synthesis.from_ is not None and st.synthesis.from_.dataset:
        found.append(("raw", st.synthesis.from_.dataset, "synthesis"))
    if st.filter.enabled:
        found.append(("cold-start", "filter/data", "sft"))
    elif st.sft.enabled and st.sft.from_ is not None and st.sft.from_.dataset:
        found.append(("cold-start", st.sft.from_.dataset, "sft"))
    if st.grpo.enabled and st.grpo.params.dataset is not None:
        found.append(("rl", st.grpo.params.dataset.path, "grpo"))
    if st.eval.enabled:
        for b in st.eval.params.benchmarks:
            found.append((f"bench-{b.name}", b.path, "eval"))
    out = []
    for name, path, context in found:
        with warnings.catch_warnings():  # local paths match two equivalent source kinds
            warnings.simplefilter("ignore")
            source = resolve_dataset_source(where(path))
        ds = MetaDataset(source, name=name)
        tags = [InputTag("mlflow.data.context", context)]
        rows = counts.get(name)
        if rows is not None:
            tags.append(InputTag("rows", str(int(rows))))
        out.append(DatasetInput(ds._to_mlflow_entity(), tags=tags))
    return out


def summarize_parent(
    uri: Tracking, parent_run_id: str, run: Any, *, workspace: str | None = None
) -> dict[str, float]:
    """Put the run's headline on its parent run, read back from the stage runs under it:
    final accuracy, format rate and mean length per benchmark (``final.<bench>.<metric>``, and
    ``<checkpoint>.<bench>.accuracy`` for each evaluated checkpoint), stage wall times
    (``time.<stage>_s``), data counts, key params, tags (version, git commit, image), the
    datasets as run inputs and the final logged model as a model input. Returns the metrics."""
    from mlflow.entities import LoggedModelInput

    client = _client(uri)
    parent = client.get_run(parent_run_id)
    exp = parent.info.experiment_id
    children = client.search_runs(
        [exp], filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'"
    )
    by_stage = {r.data.tags.get(TAG_STAGE, r.info.run_name): r for r in children}
    metrics: dict[str, float] = {}
    for stage, r in by_stage.items():
        if r.info.end_time and r.info.start_time:
            metrics[f"time.{stage}_s"] = round((r.info.end_time - r.info.start_time) / 1000, 1)
    counts: dict[str, float] = {}
    if "synthesis" in by_stage and "rows" in by_stage["synthesis"].data.metrics:
        counts["raw"] = by_stage["synthesis"].data.metrics["rows"]
    if "filter" in by_stage and "kept" in by_stage["filter"].data.metrics:
        counts["cold-start"] = by_stage["filter"].data.metrics["kept"]
    if "grpo" in by_stage and "prompts" in by_stage["grpo"].data.metrics:
        counts["rl"] = by_stage["grpo"].data.metrics["prompts"]
    for name, value in counts.items():
        metrics[f"data.{name}_rows"] = value
    if "eval" in by_stage and run.spec.stages.eval.enabled:
        em = by_stage["eval"].data.metrics
        ckpts = [_slug(c) for c in run.spec.stages.eval.params.checkpoints]
        benches = [b.name for b in run.spec.stages.eval.params.benchmarks]
        present = [c for c in ckpts if any(k.startswith(f"{c}.") for k in em)]
        for c in present:
            for b in benches:
                if f"{c}.{b}.accuracy" in em:
                    metrics[f"{c}.{b}.accuracy"] = em[f"{c}.{b}.accuracy"]
        if present:
            final = present[-1]
            for b in benches:
                for m in HEADLINE:
                    if f"{final}.{b}.{m}" in em:
                        short = "mean_tokens" if m == "mean_response_tokens" else m
                        metrics[f"final.{b}.{short}"] = em[f"{final}.{b}.{m}"]
    if metrics:
        client.log_batch(
            parent_run_id,
            # Four decimals read at a glance in the runs table; the stage runs keep full precision.
            metrics=[_metric(k, round(v, 4)) for k, v in sorted(metrics.items())],
        )
    existing = parent.data.params
    for k, v in summary_params(run).items():
        if k not in existing:  # params are write-once; a resumed run keeps the first value
            client.log_param(parent_run_id, k, v[:6000])
    tags = {
        "visionr1.version": _version(),
        "visionr1.image": run.spec.images.trainer,
        "visionr1.baseModel": run.spec.base_model.name,
    }
    commit = git_commit()
    if commit:
        tags["visionr1.git_commit"] = commit
        tags["mlflow.source.git.commit"] = commit
    set_tags(uri, parent_run_id, tags)
    try:
        client.log_inputs(parent_run_id, datasets=_datasets(run, workspace, counts))
    except Exception:  # noqa: BLE001 - a tracking server without dataset support keeps the rest
        pass
    if "grpo" in by_stage or "sft" in by_stage:
        final_stage = "grpo" if "grpo" in by_stage else "sft"
        models = client.search_logged_models(
            [exp], filter_string=f"source_run_id = '{by_stage[final_stage].info.run_id}'"
        )
        if models:
            model = models[0]
            client.log_inputs(parent_run_id, models=[LoggedModelInput(model.model_id)])
            set_tags(uri, parent_run_id, {"visionr1.final_model": f"models:/{model.model_id}"})
    return metrics


def _metric(key: str, value: float) -> Any:
    import time

    from mlflow.entities import Metric

    return Metric(key, float(value), int(time.time() * 1000), 0)


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("visionr1")
    except Exception:  # noqa: BLE001 - running from a source tree without metadata
        return "unknown"
