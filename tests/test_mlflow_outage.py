"""MLflow outages against a real ``mlflow server`` that is stopped and started again on the same
store and port: training goes on, what was logged meanwhile arrives once MLflow answers, nothing
twice, the outbox stays bounded, and a stage's outcome never depends on MLflow."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from mlflow_server import free_port, mlflow_server
from train_world import make_train_world, sft_config, stand_in_filter

from visionr1_jobs.contract import StageManifest, read_manifest
from visionr1_jobs.mlflow_spool import PENDING, SPOOL_DIR, Spool

RESPONSE = "<think> I count them. The answer is {a}. </think><answer> Final Answer:{a} </answer>"


class Server:
    """One MLflow server that can be stopped and started again (same folder, same port)."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self._stack: contextlib.ExitStack | None = None

    def start(self) -> None:
        self._stack = contextlib.ExitStack()
        self._stack.enter_context(mlflow_server(self.workdir, port=self.port))

    def stop(self) -> None:
        assert self._stack is not None
        self._stack.close()
        self._stack = None

    def client(self) -> Any:
        import mlflow

        return mlflow.MlflowClient(self.uri)


@pytest.fixture
def server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Server]:
    # Every send tries MLflow again (the default waits 30 s after a failure).
    monkeypatch.setenv("VISIONR1_MLFLOW_RETRY_S", "0")
    srv = Server(tmp_path / "mlflow")
    srv.start()
    try:
        yield srv
    finally:
        if srv._stack is not None:
            srv.stop()


def _new_run(srv: Server) -> str:
    client = srv.client()
    exp = client.create_experiment(f"outage-{time.monotonic_ns()}")
    return client.create_run(exp).info.run_id


def _steps(srv: Server, run_id: str, key: str = "loss") -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in srv.client().get_metric_history(run_id, key))


def test_rows_logged_during_an_outage_arrive_once_after_it(server: Server, tmp_path: Path) -> None:
    run_id = _new_run(server)
    box = Spool(tmp_path / "ws", server.uri)
    assert box.metrics(run_id, {"loss": 1.0}, 1)  # sent at once
    server.stop()
    t0 = time.monotonic()
    assert not box.metrics(run_id, {"loss": 2.0}, 2)
    assert not box.params(run_id, {"lr": "0.1"})
    assert not box.metrics(run_id, {"loss": 3.0}, 3)
    # A failed send is one quick refused request, not MLflow's minutes of retries.
    assert time.monotonic() - t0 < 10
    assert box.pending() == 3
    held = (box.dir / PENDING).read_text()
    server.start()
    assert box.metrics(run_id, {"loss": 4.0}, 4)
    assert box.pending() == 0 and not (box.dir / PENDING).exists()
    assert _steps(server, run_id) == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0)]
    assert server.client().get_run(run_id).data.params == {"lr": "0.1"}
    # A pod killed after sending but before removing what it sent sends the same rows again:
    # MLflow keeps one of each (the rows carry the time they were taken).
    (box.dir / PENDING).write_text(held)
    assert box.flush()
    assert _steps(server, run_id) == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0)]


def test_a_full_outbox_drops_the_oldest_rows_and_says_how_many(
    server: Server, tmp_path: Path
) -> None:
    run_id = _new_run(server)
    server.stop()
    box = Spool(tmp_path / "ws", server.uri, max_rows=5)
    for step in range(1, 9):
        assert not box.metrics(run_id, {"loss": float(step)}, step)
    assert box.pending() == 5
    assert box.state()["dropped_rows"] == 3
    server.start()
    assert box.flush()
    assert [s for s, _ in _steps(server, run_id)] == [4, 5, 6, 7, 8]
    assert server.client().get_run(run_id).data.tags["visionr1.mlflow_dropped_rows"] == "3"


def test_a_row_mlflow_refuses_is_dropped_not_retried_forever(
    server: Server, tmp_path: Path
) -> None:
    run_id = _new_run(server)
    box = Spool(tmp_path / "ws", server.uri)
    assert box.metrics("0" * 32, {"loss": 1.0}, 1)  # no such run: 404, dropped with a warning
    assert box.metrics(run_id, {"loss": 2.0}, 2)
    assert box.pending() == 0 and _steps(server, run_id) == [(2, 2.0)]


# --------------------------------------------------------------------------- a real SFT stage

STEPS = 6


@pytest.fixture(scope="module")
def train_world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("outage-world")
    return make_train_world(root, seed=3, n_rl=4, n_bench=4, response=RESPONSE)


def _sft(
    world: dict[str, Path], ws: Path, srv: Server, monkeypatch: pytest.MonkeyPatch, events: dict
) -> tuple[int, StageManifest]:
    """The SFT stage program on the tiny model, logging to ``srv``; ``events``: {step: action}
    run by the metrics callback right after it logged that step (stop or start MLflow)."""
    from visionr1_jobs.__main__ import main as stage_main
    from visionr1_jobs.training import callbacks

    path = sft_config(
        stand_in_filter(ws, world), world, "outage", maxSteps=STEPS, saveSteps=100,
        perDeviceBatchSize=4, registerModel="outage-model",
    )  # fmt: skip
    cfg = json.loads(path.read_text())
    cfg["mlflow"]["trackingUri"] = srv.uri
    path.write_text(json.dumps(cfg))
    original = callbacks.MlflowMetrics.on_log

    def on_log(self: Any, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
        original(self, args, state, control, logs=logs, **kw)
        action = events.pop(state.global_step, None) if logs and "loss" in logs else None
        if action is not None:
            action()

    monkeypatch.setattr(callbacks.MlflowMetrics, "on_log", on_log)
    rc = stage_main(["sft", "--config", str(path)])
    manifest = read_manifest(str(ws), "sft")
    assert manifest is not None, "the SFT stage wrote no manifest"
    return rc, manifest


@pytest.mark.slow
def test_sft_trains_through_an_outage_and_its_metrics_arrive_after_it(
    train_world: dict[str, Path], server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ws = tmp_path / "ws"
    rc, manifest = _sft(train_world, ws, server, monkeypatch, {2: server.stop, 4: server.start})
    assert rc == 0 and manifest.metrics["global_step"] == STEPS
    run_id = manifest.mlflow_run_id
    # Steps 3 and 4 were logged while MLflow was down; the stage sent them once it answered.
    assert [s for s, _ in _steps(server, run_id)] == list(range(1, STEPS + 1))
    run = server.client().get_run(run_id)
    assert run.info.status == "FINISHED"
    assert manifest.extra["registered_model_version"] == "1"
    assert not (ws / SPOOL_DIR / PENDING).exists()


@pytest.mark.slow
def test_sft_that_ends_during_an_outage_succeeds_and_leaves_its_rows_for_later(
    train_world: dict[str, Path], server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from visionr1_jobs.config import ResolvedStageConfig
    from visionr1_jobs.tracking import durable_run

    ws = tmp_path / "ws"
    rc, manifest = _sft(train_world, ws, server, monkeypatch, {2: server.stop})
    # MLflow never came back: the stage still succeeded, its model upload waits on the volume.
    assert rc == 0 and manifest.metrics["global_step"] == STEPS
    assert manifest.extra["model_upload"] == "pending"
    run_id = manifest.mlflow_run_id
    box = Spool(ws, server.uri)
    assert box.pending() > 0
    server.start()
    assert [s for s, _ in _steps(server, run_id)] == [1, 2]
    # The next stage of the run sends what this one left when it starts its own MLflow run.
    nxt = ResolvedStageConfig(
        stage="grpo", workspace=str(ws), output_dir="grpo", base_model="unused",
        mlflow={"experiment": "outage", "trackingUri": server.uri},
    )  # fmt: skip
    with durable_run(nxt) as other:
        assert other is not None and other.info.run_id != run_id
    assert box.pending() == 0
    assert [s for s, _ in _steps(server, run_id)] == list(range(1, STEPS + 1))
    client = server.client()
    assert client.get_run(run_id).info.status == "FINISHED"
    versions = client.search_model_versions("name='outage-model'")
    assert [v.run_id for v in versions] == [run_id]
