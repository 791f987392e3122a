"""`visionr1 run-local` end to end on the real stages: toy data → synthesis → filter → SFT →
GRPO (two PTST sub-stages) → eval, the demo manifest shrunk to fit a test."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from repo_paths import REPO

pytestmark = pytest.mark.slow


def _small_demo(workdir: Path) -> dict:
    run = yaml.safe_load((REPO / "examples" / "tiny-cpu.yaml").read_text())
    run = copy.deepcopy(run)
    run["metadata"]["name"] = "demo-test"
    run["spec"]["storage"]["localDir"] = str(workdir)
    stages = run["spec"]["stages"]
    stages["sft"]["params"].update({"maxSteps": 4, "saveSteps": 2})
    stages["grpo"]["params"]["ptst"] = [
        {"maxCompletionLength": 32, "numGenerations": 4, "steps": 1},
        {"maxCompletionLength": 64, "numGenerations": 2, "steps": 1},
    ]
    ev = stages["eval"]["params"]
    ev["benchmarks"] = [{"name": "toy", "path": "toy/bench", "limit": 4}]
    ev["maxNewTokens"] = 24
    return run


def test_run_local_end_to_end(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "HF_HUB_OFFLINE": "1"}
    cli = [sys.executable, "-m", "visionr1_operator.cli"]
    subprocess.run(
        [*cli, "toy", "data", "--out", str(ws / "toy"), "--n", "24", "--seed", "1"],
        check=True,
        env=env,
        capture_output=True,
    )
    subprocess.run(
        [*cli, "toy", "model", "--out", str(ws / "models" / "tiny-qwen25vl")],
        check=True,
        env=env,
        capture_output=True,
    )
    manifest = tmp_path / "run.yaml"
    manifest.write_text(yaml.safe_dump(_small_demo(ws)))

    proc = subprocess.run(
        [*cli, "run-local", str(manifest), "--workdir", str(ws)],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "run succeeded: 5 stage(s) succeeded" in out
    for stage in ("synthesis", "filter", "sft", "grpo", "eval"):
        assert (ws / stage / "_manifest.json").exists(), stage
    assert (ws / "sft" / "final" / "config.json").exists()
    assert (ws / "grpo" / "stage-2" / "final" / "config.json").exists()
    # The summary shows each checkpoint's eval accuracy.
    summary = out[out.index("eval per checkpoint") :]
    for ckpt in ("base", "sft", "grpo-stage-1", "grpo"):
        assert f"    {ckpt} " in summary and "toy: acc=" in summary

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{ws / 'mlflow.db'}")
    exp = client.get_experiment_by_name("visionr1-tiny-cpu")
    runs = client.search_runs([exp.experiment_id])
    [parent] = [r for r in runs if r.data.tags.get("visionr1.executor") == "local"]
    assert parent.info.status == "FINISHED"
    stage_runs = {
        r.data.tags.get("visionr1.stage"): r
        for r in runs
        if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id
    }
    assert set(stage_runs) == {"synthesis", "filter", "sft", "grpo", "eval"}
    assert all(r.info.status == "FINISHED" for r in stage_runs.values())
    assert "sft.toy.accuracy" in stage_runs["eval"].data.metrics
    ptst = [
        r for r in runs if r.data.tags.get("mlflow.parentRunId") == stage_runs["grpo"].info.run_id
    ]
    assert len(ptst) == 2  # one nested run per PTST sub-stage

    # Rerunning a finished run does nothing.
    again = subprocess.run(
        [*cli, "run-local", str(manifest), "--workdir", str(ws)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert again.returncode == 0 and "already Succeeded" in again.stdout
