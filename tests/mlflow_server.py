"""A real ``mlflow server`` for tests: the kmock operator tests and the cluster tests start it
the same way (loopback, one worker, a sqlite store under the given folder)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx


def free_port() -> int:
    """A loopback TCP port nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def mlflow_server(
    workdir: Path,
    *,
    serve_artifacts: bool = False,
    start_timeout_s: float = 120.0,
    port: int | None = None,
) -> Iterator[str]:
    """``mlflow server`` on 127.0.0.1 with a sqlite store under ``workdir``; yields its URI.

    ``serve_artifacts``: artifacts are uploaded through the server (as the chart runs it: stage
    pods run as another user and write through HTTP, never to a path); otherwise clients write
    them straight into ``workdir/artifacts``. The server log is ``workdir/mlflow-server.log``,
    its tail in the error when the server does not answer within ``start_timeout_s``.
    ``port``: listen there (a server started again on the same folder and port is the same
    server to its clients, as after an outage); default a free one.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    exe = shutil.which("mlflow", path=str(Path(sys.executable).parent)) or "mlflow"
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    artifacts = str(workdir / "artifacts")
    if serve_artifacts:
        artifact_args = ["--serve-artifacts", "--artifacts-destination", artifacts]
    else:
        artifact_args = ["--default-artifact-root", artifacts]
    log_path = workdir / "mlflow-server.log"
    log = log_path.open("ab")
    proc = subprocess.Popen(
        [
            exe,
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{workdir / 'mlflow.db'}",
            *artifact_args,
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + start_timeout_s
        while True:
            try:
                if httpx.get(f"{uri}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("mlflow server did not start:\n" + log_path.read_text()[-3000:])
            time.sleep(0.2)
        yield uri
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
