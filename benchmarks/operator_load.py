"""Operator load: N VisionR1Runs created at once against kmock; prints JSON.

The operator runs as a real ``visionr1 operator`` subprocess (logged in through a kubeconfig that
points at kmock), so its RSS is its own. This script plays the Job controller: every Job the
operator creates is marked succeeded as soon as it appears. Measured per stage transition: the
time from the PATCH that marks a Job succeeded to the POST that creates the next stage's Job
(both timestamped inside kmock). Targets: p99 < 1 s at 200 runs, RSS < 200 MB.

    python benchmarks/operator_load.py [--runs 50 200] [--timeout 300]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

import kmock_cluster as kc  # noqa: E402

STAGES = ["synthesis", "filter", "sft", "grpo", "eval"]


class TimedEmulator(kc.Emulator):
    """Records when each Job was created and when it was marked succeeded."""

    created: dict[str, float]
    succeeded: dict[str, float]

    async def _handle(self, request: Any) -> Any:
        res = request.resource
        if res is not None and res.plural == "jobs":
            if request.action == kc.kmock.action.CREATE:
                self.created[request.data["metadata"]["name"]] = time.monotonic()
            elif request.subresource == "status" and "succeeded" in str(request.data):
                self.succeeded[request.name] = time.monotonic()
        return await super()._handle(request)


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


async def one_round(n: int, timeout: float) -> dict[str, Any]:
    emulator = TimedEmulator()
    emulator.created, emulator.succeeded = {}, {}
    async with emulator as k8s, kc.kmock.Server(k8s):
        for key, (kind, sub) in kc.RESOURCES.items():
            k8s.resources[key] = kc.kmock.ResourceInfo(
                kind=kind, namespaced=True, verbs=kc.VERBS, subresources=sub
            )
        for key, kind in kc.CLUSTER_RESOURCES.items():
            k8s.resources[key] = kc.kmock.ResourceInfo(kind=kind, namespaced=False, verbs=kc.VERBS)
        url = str(k8s.url).rstrip("/")
        tmp = Path(tempfile.mkdtemp(prefix="vr1-load-"))
        kubeconfig = tmp / "kubeconfig"
        kubeconfig.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "current-context": "kmock",
                    "clusters": [{"name": "kmock", "cluster": {"server": url}}],
                    "users": [{"name": "u", "user": {}}],
                    "contexts": [
                        {
                            "name": "kmock",
                            "context": {"cluster": "kmock", "user": "u", "namespace": kc.NS},
                        }
                    ],
                }
            )
        )
        env = {**os.environ, "KUBECONFIG": str(kubeconfig), "MLFLOW_DISABLE_TELEMETRY": "true"}
        env.pop("VISIONR1_MLFLOW_URI", None)
        log = open(tmp / "operator.log", "wb")  # noqa: SIM115 (closed below)
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "visionr1_operator.cli",
                "operator",
                "-n",
                kc.NS,
                "--liveness",
                "",
                *os.environ.get("VR1_LOAD_OPERATOR_ARGS", "").split(),
            ],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        ps = psutil.Process(proc.pid)
        rss_peak = 0
        manifest = yaml.safe_load((REPO / "examples" / "tiny-cpu.yaml").read_text())
        try:
            async with httpx.AsyncClient(base_url=url, timeout=30) as client:
                await asyncio.sleep(3.0)  # let the operator start and begin watching
                t0 = time.monotonic()
                await asyncio.gather(
                    *(
                        kc.create_run(client, kc.run_object(manifest, name=f"load-{i:04d}"))
                        for i in range(n)
                    )
                )
                done: set[str] = set()
                total = n * len(STAGES)
                deadline = time.monotonic() + timeout
                while len(done) < total and time.monotonic() < deadline:
                    fresh = [j for j in list(emulator.created) if j not in done]
                    if fresh:
                        done.update(fresh)
                        await asyncio.gather(*(kc.job_succeeded(client, j) for j in fresh))
                    else:
                        await asyncio.sleep(0.01)
                    rss_peak = max(rss_peak, ps.memory_info().rss)
                # the last Jobs' success must still turn into Succeeded runs
                while time.monotonic() < deadline:
                    runs = kc.objects(k8s, "visionr1.io/v1alpha1/visionr1runs")
                    if (
                        sum(
                            (r.get("status") or {}).get("phase") == "Succeeded"
                            for r in runs.values()
                        )
                        == n
                    ):
                        break
                    rss_peak = max(rss_peak, ps.memory_info().rss)
                    await asyncio.sleep(0.1)
                wall = time.monotonic() - t0
                rss_end = ps.memory_info().rss
                cpu_operator = sum(ps.cpu_times()[:2])
                cpu_kmock = sum(psutil.Process().cpu_times()[:2])
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
            log.close()
        runs = kc.objects(k8s, "visionr1.io/v1alpha1/visionr1runs")
        succeeded_runs = sum(
            (r.get("status") or {}).get("phase") == "Succeeded" for r in runs.values()
        )
        latencies = []
        for i in range(n):
            for prev, nxt in zip(STAGES, STAGES[1:], strict=False):
                a = emulator.succeeded.get(f"load-{i:04d}-{prev}-0")
                b = emulator.created.get(f"load-{i:04d}-{nxt}-0")
                if a is not None and b is not None:
                    latencies.append(b - a)
        return {
            "runs": n,
            "runs_succeeded": succeeded_runs,
            "jobs_created": len(emulator.created),
            "transitions_measured": len(latencies),
            "success_to_next_job_s": {
                "p50": round(statistics.median(latencies), 4) if latencies else None,
                "p99": round(_percentile(latencies, 0.99), 4) if latencies else None,
                "max": round(max(latencies), 4) if latencies else None,
            },
            "operator_rss_mb": {
                "peak": round(rss_peak / 2**20, 1),
                "end": round(rss_end / 2**20, 1),
            },
            "wall_s": round(wall, 2),
            # CPU seconds used by the operator process and by this one (kmock + the Job
            # controller): which side is the bottleneck
            "cpu_s": {"operator": round(cpu_operator, 1), "kmock": round(cpu_kmock, 1)},
        }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, nargs="+", default=[50, 200])
    parser.add_argument("--timeout", type=float, default=300.0)
    args = parser.parse_args()
    results = [asyncio.run(one_round(n, args.timeout)) for n in args.runs]
    out = {
        "benchmark": "operator_load",
        "targets": {"p99_s_at_200": 1.0, "rss_mb": 200},
        "cpu_count": os.cpu_count(),
        "results": results,
    }
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
