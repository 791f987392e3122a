"""The load benchmark against the local control plane, at a small size, so it cannot rot again:
it must measure every stage transition of every run, for the operator and for its floor (a bare
kopf operator), with KWOK's fake nodes completing the pods.

The benchmark's own exit code says whether a round came short; this test also reads what it
measured, so a benchmark that printed nulls and exited 0 (as it once did) fails here.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from controlplane.handle import ControlPlane

pytestmark = pytest.mark.cluster

REPO = Path(__file__).resolve().parents[2]
RUNS = 20
TRANSITIONS = RUNS * 4  # five stages: four transitions per run


def test_load_benchmark_measures_every_transition(control_plane: ControlPlane) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "operator_load.py"),
            "--against",
            "control-plane",
            "--runs",
            str(RUNS),
            "--timeout",
            "240",
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, f"exit {proc.returncode}: {proc.stderr[-3000:]}"
    out = json.loads(proc.stdout)
    assert out["failures"] == []
    assert out["kwok_nodes"] >= 1, "pods were completed by KWOK's fake nodes"
    (result,) = out["results"]
    assert result["transitions_expected"] == TRANSITIONS
    for kind in ("floor", "operator"):
        got = result[kind]
        assert got["transitions_measured"] == TRANSITIONS, (kind, got)
        assert got["jobs_seen"] == RUNS * 5, (kind, got)
        latency = got["complete_to_next_job_s"]
        assert 0 < latency["p50"] <= latency["p99"] <= latency["max"], (kind, latency)
        # the API server counted the round's writes: at least each Job's create and its pod's
        assert got["api_writes"]["by_request"].get("POST jobs", 0) >= RUNS * 5, (kind, got)
        assert got["api_writes"]["by_request"].get("POST pods", 0) >= RUNS * 5, (kind, got)
        assert got["cpu_s"]["kube-apiserver"] > 0, (kind, got)
    operator = result["operator"]
    assert operator["runs_succeeded"] == RUNS, operator
    assert operator["cpu_s"]["operator"] > 0 and operator["rss_mb_peak"] > 0
    # what the operator adds to the floor's writes: at least the runs' status
    assert operator["api_writes"]["by_request"].get("PATCH visionr1runs/status", 0) >= RUNS
    assert result["ratio_to_floor"]["p99"] is not None
    # the benchmark left nothing behind in its namespace (a second run starts clean)
    left = control_plane.kubectl("get", "vr1,jobs,pods", "-n", "vr1-load", "-o", "name").stdout
    assert left.strip() == ""
