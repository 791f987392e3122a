"""Screenshot what a user sees in the MLflow UI: the ablations' runs table on its saved view.

    python scripts/mlflow_screenshot.py --root .visionr1/ablations --out docs/img/mlflow-ablations.png

Starts ``mlflow ui`` on the ablations' sqlite store (a free loopback port), waits until it
answers, opens the URL ``visionr1 ablations`` printed (the experiment's runs table on the saved
comparison view) in headless Chromium (Debian's ``chromium``), writes the PNG and stops the
server. Nothing is left running, also on Ctrl-C or a failure.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--hide-scrollbars",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until_up(url: str, proc: subprocess.Popen[bytes], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"mlflow ui exited with {proc.returncode} before answering")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise SystemExit(f"mlflow ui did not answer at {url} within {timeout_s:.0f} s")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", default=".visionr1/ablations", help="the ablations' ROOT folder")
    p.add_argument("--out", default="docs/img/mlflow-ablations.png", help="PNG to write")
    p.add_argument("--size", default="1600,700", help="window width,height in pixels")
    p.add_argument("--wait-ms", type=int, default=15000, help="time the page gets to render")
    args = p.parse_args()

    from mlflow.tracking import MlflowClient

    from visionr1_operator.ablations import EXPERIMENT, SHARED_VIEW

    root = Path(args.root).resolve()
    db = root / "mlflow.db"
    if not db.is_file():
        print(f"error: --root {root}: no mlflow.db (run `make ablations` first)", file=sys.stderr)
        return 2
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        print("error: chromium not found (Debian: apt-get install chromium)", file=sys.stderr)
        return 2
    uri = f"sqlite:///{db}"
    exp = MlflowClient(uri).get_experiment_by_name(EXPERIMENT)
    if exp is None:
        print(f"error: {db} has no experiment {EXPERIMENT!r}", file=sys.stderr)
        return 2
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = dict(os.environ, MLFLOW_DISABLE_TELEMETRY="true")
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_until_up(f"{base}/health", server, 120)
        url = (
            f"{base}/#/experiments/{exp.experiment_id}/runs?workflowType=machine_learning"
            f"&viewStateShareKey={SHARED_VIEW}"
        )
        out = Path(args.out).resolve()
        out.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [
                chromium,
                *CHROMIUM_FLAGS,
                f"--window-size={args.size}",
                f"--virtual-time-budget={args.wait_ms}",
                f"--screenshot={out}",
                url,
            ],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=180,
        )
        print(f"{out} ({url})")
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
