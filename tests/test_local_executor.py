"""The local executor plays the Job controller for the operator's plan, with real MLflow.

The stage programs are replaced by a scripted interpreter (exit codes per attempt) so that these
tests cover the executor's own behaviour in seconds: order, retries, permanent failures, resume
after Ctrl-C, state and MLflow. The real stages run end to end in test_demo_pipeline.py.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml

from visionr1_operator import plan as planner
from visionr1_operator.api import VisionR1Run
from visionr1_operator.local import STATE, Executor, LocalState

FAKE = textwrap.dedent(
    """\
    import json, pathlib, sys, time
    stage, cfg_path = sys.argv[3], sys.argv[5]
    cfg = json.loads(pathlib.Path(cfg_path).read_text())
    ws = pathlib.Path(cfg["workspace"])
    script = json.loads((ws / "script.json").read_text()) if (ws / "script.json").exists() else {}
    count = ws / f"count-{stage}"
    n = int(count.read_text()) if count.exists() else 0
    count.write_text(str(n + 1))
    codes = script.get(stage, [0])
    code = codes[min(n, len(codes) - 1)]
    print(json.dumps({"stage": stage, "config": cfg["outputDir"]}))
    print('VISIONR1_PROGRESS {"stage": "%s", "done": 1, "total": 2}' % stage, file=sys.stderr)
    if code == "hang":
        (ws / f"hanging-{stage}").write_text("1")
        time.sleep(600)
    if code == 0:
        out = ws / cfg["outputDir"]
        out.mkdir(parents=True, exist_ok=True)
        man = {"stage": stage, "outputs": {}, "metrics": {"keep_rate": 0.5}}
        (out / "_manifest.json").write_text(json.dumps(man))
    else:
        print(f"failing with {code}", file=sys.stderr)
    sys.exit(code)
    """
)


def _manifest(workdir: Path, backoff: int = 3) -> dict[str, Any]:
    return {
        "apiVersion": "visionr1.io/v1alpha1",
        "kind": "VisionR1Run",
        "metadata": {"name": "exec-test"},
        "spec": {
            "baseModel": {"name": "models/tiny"},
            "storage": {"localDir": str(workdir)},
            "mlflow": {"experiment": "exec-test"},
            "stages": {
                "synthesis": {"from": {"dataset": "toy/train", "format": "toy"}},
                "sft": {"backoffLimit": backoff},
                "grpo": {"params": {"dataset": {"path": "toy/rl"}}},
            },
        },
    }


@pytest.fixture
def fake_python(tmp_path: Path) -> str:
    script = tmp_path / "fake_stage.py"
    script.write_text(FAKE)
    wrapper = tmp_path / "fake-python"
    wrapper.write_text(f'#!/bin/sh\nexec {sys.executable} {script} "$@"\n')
    wrapper.chmod(0o755)
    return str(wrapper)


def _executor(workdir: Path, python: str, backoff: int = 3) -> tuple[Executor, io.StringIO]:
    obj = _manifest(workdir, backoff)
    out = io.StringIO()
    run = VisionR1Run.model_validate(obj)
    ex = Executor(
        run,
        yaml.safe_dump(obj),
        workdir,
        python=python,
        out=out,
        policy=planner.RetryPolicy(base_s=0.01, max_s=0.02),
    )
    return ex, out


def _counts(workdir: Path) -> dict[str, int]:
    return {p.name[6:]: int(p.read_text()) for p in workdir.glob("count-*")}


def _mlflow_runs(workdir: Path) -> list[Any]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    exp = client.get_experiment_by_name("exec-test")
    return client.search_runs([exp.experiment_id])


def test_all_stages_succeed_in_order_with_mlflow_parent_and_children(
    tmp_path: Path, fake_python: str
) -> None:
    ex, out = _executor(tmp_path / "ws", fake_python)
    assert ex.execute() == 0
    ws = tmp_path / "ws"
    assert _counts(ws) == {s: 1 for s in ("synthesis", "filter", "sft", "grpo", "eval")}
    state = LocalState.load(ws / STATE)
    assert state.status.phase == "Succeeded" and state.status.progress == "5/5"
    assert [a.stage for a in state.attempts] == ["synthesis", "filter", "sft", "grpo", "eval"]
    text = out.getvalue()
    assert "keep_rate=0.5" in text  # the summary reads the stage manifests
    assert "mlflow ui --backend-store-uri sqlite:///" in text
    runs = _mlflow_runs(ws)
    parent = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == state.parent_run_id]
    assert len(parent) == 1 and parent[0].info.status == "FINISHED"
    assert sorted(r.data.tags["visionr1.stage"] for r in children) == sorted(
        ["synthesis", "filter", "sft", "grpo", "eval"]
    )
    # The stage program received the resolved config and the run ids in its environment.
    cfg = json.loads((ws / ".visionr1" / "configs" / "exec-test-sft-0.json").read_text())
    assert cfg["inputs"]["data"] == {"path": "filter", "format": "stage", "stage": "filter"}
    assert cfg["mlflow"]["parentRunId"] == state.parent_run_id
    assert (ws / "logs" / "exec-test-sft-0.log").read_text().count("VISIONR1_PROGRESS") == 1

    # A finished run is never run again.
    again, out2 = _executor(ws, fake_python)
    assert again.execute() == 0
    assert "already Succeeded" in out2.getvalue()
    assert _counts(ws)["synthesis"] == 1


def test_retryable_failures_are_retried_then_succeed(tmp_path: Path, fake_python: str) -> None:
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "script.json").write_text(json.dumps({"sft": [1, 137, 0]}))
    ex, out = _executor(ws, fake_python)
    assert ex.execute() == 0
    assert _counts(ws)["sft"] == 3 and _counts(ws)["grpo"] == 1
    assert "failing with 137" in out.getvalue()
    state = LocalState.load(ws / STATE)
    assert state.status.stages["sft"].attempts == 3


def test_invalid_input_fails_the_run_at_once(tmp_path: Path, fake_python: str) -> None:
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "script.json").write_text(json.dumps({"sft": [65]}))
    ex, out = _executor(ws, fake_python)
    assert ex.execute() == 1
    assert _counts(ws) == {"synthesis": 1, "filter": 1, "sft": 1}
    assert "invalid input (permanent)" in out.getvalue()
    state = LocalState.load(ws / STATE)
    assert state.status.phase == "Failed" and state.status.stages["sft"].phase == "Failed"
    parent = [r for r in _mlflow_runs(ws) if r.info.run_id == state.parent_run_id][0]
    assert parent.info.status == "FAILED"


def test_retries_are_bounded_by_backoff_limit(tmp_path: Path, fake_python: str) -> None:
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "script.json").write_text(json.dumps({"sft": [1]}))
    ex, _ = _executor(ws, fake_python, backoff=1)
    assert ex.execute() == 1
    assert _counts(ws)["sft"] == 2 and "grpo" not in _counts(ws)


DRIVER = textwrap.dedent(
    """\
    import sys, yaml
    from pathlib import Path
    from visionr1_operator.api import VisionR1Run
    from visionr1_operator.local import Executor
    obj = yaml.safe_load(Path(sys.argv[1]).read_text())
    ex = Executor(VisionR1Run.model_validate(obj), "", Path(sys.argv[2]), python=sys.argv[3])
    sys.exit(ex.execute())
    """
)


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def test_ctrl_c_then_rerun_continues_from_the_interrupted_stage(
    tmp_path: Path, fake_python: str
) -> None:
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "script.json").write_text(json.dumps({"grpo": ["hang"]}))
    manifest = tmp_path / "run.yaml"
    manifest.write_text(yaml.safe_dump(_manifest(ws)))
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    cmd = [sys.executable, str(driver), str(manifest), str(ws), fake_python]
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        # As in a terminal: SIGINT at its default and unblocked. An ignored or blocked SIGINT
        # is inherited across exec from the test process (after other tests' event loops and
        # threads), and then Ctrl-C never reaches run-local.
        preexec_fn=_default_sigint,
    )
    try:
        deadline = time.monotonic() + 120
        while not (ws / "hanging-grpo").exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        output, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:  # never leave the driver and its stage behind
            proc.kill()
            for child in psutil.process_iter(["cmdline"]):  # the stage runs in its own session
                if str(ws) in " ".join(child.info["cmdline"] or []):
                    with contextlib.suppress(psutil.Error):
                        child.kill()
    assert proc.returncode == 130, output
    assert "rerun the same command to continue" in output
    state = LocalState.load(ws / STATE)
    assert state.status.stages["sft"].phase == "Succeeded"
    assert state.attempts[-1].stage == "grpo" and state.attempts[-1].exit_code is None

    (ws / "script.json").write_text(json.dumps({"grpo": [0]}))
    rerun = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert "resuming grpo (attempt 1)" in rerun.stdout
    # Finished stages were not run again; grpo ran twice as the same attempt, not a retry.
    assert _counts(ws) == {"synthesis": 1, "filter": 1, "sft": 1, "grpo": 2, "eval": 1}
    state = LocalState.load(ws / STATE)
    assert state.status.phase == "Succeeded" and state.status.stages["grpo"].attempts == 1
