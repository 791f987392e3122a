"""A bounded, durable outbox of MLflow writes on the workspace, so that no stage waits on MLflow.

Every metric, param, tag, run status and end-of-stage upload a training stage sends to MLflow
goes through here: the row is appended to ``<workspace>/_mlflow_spool/pending.jsonl`` first, then
the whole file is sent in order, and what was sent is removed. While MLflow is unreachable the
rows stay on the workspace volume (which outlives the pod) and the stage trains on; the next
send, by this stage or by the next stage program of the run (every stage run flushes the
workspace's outbox when it starts), delivers them with their original timestamps.

Nothing is sent twice: a metric row keeps the timestamp it was taken at, and MLflow's store
skips a metric whose (key, step, timestamp, value) it already holds, so a row re-sent after a
crash between "sent" and "removed" changes nothing; params are only logged when missing.

Bounded: at most ``VISIONR1_MLFLOW_SPOOL_ROWS`` rows (default 20,000) wait; beyond that the
oldest are dropped and counted in ``state.json``, and the count is set as the tag
``visionr1.mlflow_dropped_rows`` on the runs once MLflow answers again.

While MLflow is down a send costs one quick failed request (no retries, a short timeout) and
then none for ``VISIONR1_MLFLOW_RETRY_S`` seconds (default 30): a training step never waits
minutes on MLflow's default retry schedule.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SPOOL_DIR = "_mlflow_spool"
PENDING = "pending.jsonl"
STATE = "state.json"
ROWS_ENV = "VISIONR1_MLFLOW_SPOOL_ROWS"
RETRY_ENV = "VISIONR1_MLFLOW_RETRY_S"
DEFAULT_ROWS = 20_000
DEFAULT_RETRY_S = 30.0
DROPPED_TAG = "visionr1.mlflow_dropped_rows"
# MLflow's limits for one log_batch call.
_BATCH_METRICS = 1000
_BATCH_PARAMS = 100

# When MLflow last failed to answer, per (process, tracking URI): sends wait RETRY_S after it.
_last_failure: dict[str, float] = {}


def transient(exc: BaseException) -> bool:
    """An error that a later send may not meet (MLflow down, a proxy's 5xx, a timeout), as
    opposed to MLflow refusing the row itself (4xx: a deleted run, an invalid value)."""
    from mlflow.exceptions import MlflowException

    if isinstance(exc, MlflowException):
        return exc.get_http_status_code() >= 500
    return (
        isinstance(exc, OSError | ConnectionError | TimeoutError)
        or "requests" in type(exc).__module__
    )


@contextlib.contextmanager
def quick_requests(timeout_s: int = 10) -> Iterator[None]:
    """MLflow's HTTP client without its retry schedule (7 retries, minutes) while inside: the
    outbox is the retry. The variables are read per request, so this applies to this block."""
    saved = {
        k: os.environ.get(k)
        for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")
    }
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(timeout_s)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


class Spool:
    """The outbox of one workspace, sending to ``uri``."""

    def __init__(self, workspace: str | Path, uri: str, max_rows: int | None = None) -> None:
        self.dir = Path(workspace) / SPOOL_DIR
        self.uri = uri
        self.max_rows = max_rows or int(os.environ.get(ROWS_ENV) or DEFAULT_ROWS)
        self.retry_s = float(os.environ.get(RETRY_ENV) or DEFAULT_RETRY_S)

    # ------------------------------------------------------------------ writing rows

    def metrics(self, run_id: str, metrics: dict[str, float], step: int = 0) -> bool:
        now = int(time.time() * 1000)
        return self.add({"kind": "metrics", "run_id": run_id, "ts": now, "step": step,
                         "values": metrics})  # fmt: skip

    def params(self, run_id: str, params: dict[str, str]) -> bool:
        return self.add({"kind": "params", "run_id": run_id, "values": params})

    def terminated(self, run_id: str, status: str) -> bool:
        return self.add({"kind": "terminated", "run_id": run_id, "status": status})

    def artifact(self, run_id: str, path: Path, artifact_path: str | None = None) -> bool:
        row = {"kind": "artifact", "run_id": run_id, "path": str(path), "to": artifact_path}
        return self.add(row)

    def model(self, run_id: str, model_dir: Path, register_as: str | None) -> bool:
        """The final model, uploaded (and registered) when MLflow answers: the folder stays on
        the workspace."""
        row = {"kind": "model", "run_id": run_id, "path": str(model_dir), "register": register_as}
        return self.add(row)

    def add(self, row: dict[str, Any]) -> bool:
        """Queue ``row`` and send everything queued; True when nothing is left waiting."""
        with self._locked():
            line = json.dumps(row, sort_keys=True) + "\n"
            rows = self._read()
            over = len(rows) + 1 - self.max_rows
            if over > 0:
                # Oldest first: the newest rows are the ones a person looks at after an outage.
                self._write(rows[over:] + [row])
                state = self.state()
                state["dropped_rows"] = int(state.get("dropped_rows", 0)) + over
                self._write_state(state)
                log.warning(
                    "MLflow outbox %s is full (%d rows): dropped the %d oldest (%d in all)",
                    self.dir, self.max_rows, over, state["dropped_rows"],
                )  # fmt: skip
            else:
                with (self.dir / PENDING).open("a") as fh:
                    fh.write(line)
                    fh.flush()
                    os.fsync(fh.fileno())
            return self._send_locked()

    # ------------------------------------------------------------------ sending

    def flush(self, *, force: bool = False) -> bool:
        """Send what waits; True when nothing is left. ``force``: even within RETRY_S of the
        last failure (the end of a stage, a flush by hand)."""
        if not (self.dir / PENDING).exists():
            return True
        with self._locked():
            return self._send_locked(force=force)

    def pending(self) -> int:
        with self._locked():
            return len(self._read())

    def state(self) -> dict[str, Any]:
        path = self.dir / STATE
        return json.loads(path.read_text()) if path.exists() else {}

    def _send_locked(self, *, force: bool = False) -> bool:
        rows = self._read()
        if not rows:
            return True
        failed_at = _last_failure.get(self.uri)
        if not force and failed_at is not None and time.monotonic() - failed_at < self.retry_s:
            return False
        sent = 0
        try:
            with quick_requests():
                while sent < len(rows):
                    sent += self._send_some(rows, sent)
                self._note_dropped(rows)
        except Exception as exc:
            if not transient(exc):
                raise
            _last_failure[self.uri] = time.monotonic()
            if failed_at is None:  # one warning per outage, not one per step
                log.warning(
                    "MLflow at %s is unreachable (%s): %d row(s) wait in %s and are sent when it "
                    "answers; training goes on",
                    self.uri, str(exc).splitlines()[0][:200], len(rows) - sent, self.dir,
                )  # fmt: skip
            self._write(rows[sent:])
            return False
        if failed_at is not None:
            log.warning("MLflow at %s answers again: sent %d waiting row(s)", self.uri, sent)
        _last_failure.pop(self.uri, None)
        self._write([])
        return True

    def _send_some(self, rows: list[dict[str, Any]], start: int) -> int:
        """Send rows[start] (and the metric rows of the same run right after it, in one batch);
        returns how many rows are done. A row MLflow refuses (4xx) is dropped with a warning."""
        import mlflow
        from mlflow.entities import Metric

        client = mlflow.MlflowClient(self.uri)
        row = rows[start]
        try:
            if row["kind"] == "metrics":
                batch: list[Any] = []
                n = 0
                for nxt in rows[start:]:
                    if nxt["kind"] != "metrics" or nxt["run_id"] != row["run_id"]:
                        break
                    more = [
                        Metric(k, float(v), int(nxt["ts"]), int(nxt["step"]))
                        for k, v in nxt["values"].items()
                    ]
                    if batch and len(batch) + len(more) > _BATCH_METRICS:
                        break
                    batch += more
                    n += 1
                for i in range(0, len(batch), _BATCH_METRICS):
                    client.log_batch(
                        row["run_id"], metrics=batch[i : i + _BATCH_METRICS], synchronous=True
                    )
                return n
            if row["kind"] == "params":
                from visionr1_jobs.mlflow_params import log_params_noting_changes

                log_params_noting_changes(client, row["run_id"], row["values"])
            elif row["kind"] == "terminated":
                client.set_terminated(row["run_id"], row["status"])
            elif row["kind"] == "artifact":
                client.log_artifact(row["run_id"], row["path"], row.get("to"))
            elif row["kind"] == "model":
                from visionr1_jobs.training.model_upload import upload_model

                upload_model(self.uri, row["run_id"], Path(row["path"]), row.get("register"))
            else:
                log.warning("MLflow outbox: unknown row kind %r dropped", row["kind"])
        except Exception as exc:
            if transient(exc):
                raise
            log.warning("MLflow refused an outbox row (%s), dropped: %s", exc, str(row)[:300])
        return 1

    def _note_dropped(self, rows: list[dict[str, Any]]) -> None:
        """Tag the runs of the rows sent with how many rows the full outbox dropped (once per
        new count)."""
        state = self.state()
        dropped = int(state.get("dropped_rows", 0))
        if dropped <= int(state.get("dropped_tagged", 0)):
            return
        import mlflow

        client = mlflow.MlflowClient(self.uri)
        for run_id in sorted({r["run_id"] for r in rows}):
            client.set_tag(run_id, DROPPED_TAG, str(dropped))
        self._write_state(state | {"dropped_tagged": dropped})

    # ------------------------------------------------------------------ the files

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        # One writer at a time: a stage's rank 0 and a next stage's flush may share the volume.
        self.dir.mkdir(parents=True, exist_ok=True)
        with (self.dir / ".lock").open("a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def _read(self) -> list[dict[str, Any]]:
        path = self.dir / PENDING
        if not path.exists():
            return []
        rows = []
        for line in path.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):  # a line torn by a crash
                rows.append(json.loads(line))
        return rows

    def _write(self, rows: list[dict[str, Any]]) -> None:
        from visionr1_jobs.contract import atomic_write

        path = self.dir / PENDING
        if not rows:
            path.unlink(missing_ok=True)
            return
        atomic_write(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))

    def _write_state(self, state: dict[str, Any]) -> None:
        from visionr1_jobs.contract import atomic_write

        atomic_write(self.dir / STATE, json.dumps(state, sort_keys=True) + "\n")
