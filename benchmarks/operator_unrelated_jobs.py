"""The operator's RSS and CPU with many unrelated Jobs in the cluster; prints JSON.

Against the real control plane (``make cluster-up``): N Jobs that are not the operator's
(suspended, so no pods) are created in another namespace, then ``visionr1 operator
--all-namespaces`` runs for a while with no VisionR1Run at all. Whatever it uses then is the
cost of the Jobs it should not care about. With ``--before-ref REF`` the same is measured for the
operator's code at a git ref (extracted with ``git archive``), e.g. the commit before the
server-side label selector, so the two figures come from one cluster and one run of this script.

    python benchmarks/operator_unrelated_jobs.py [--jobs 5000] [--seconds 60] [--before-ref REF]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from io import BytesIO
from pathlib import Path
from typing import Any

import psutil
import yaml

REPO = Path(__file__).resolve().parents[1]
NOISE_NS = "vr1-unrelated"


def unrelated_job(i: int) -> dict[str, Any]:
    """A Job of someone else: no visionr1 label, suspended (the Job controller makes no pods)."""
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": f"other-{i:05d}", "labels": {"app": "someone-else"}},
        "spec": {
            "suspend": True,
            "template": {
                "metadata": {"labels": {"app": "someone-else"}},
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [
                        {
                            "name": "c",
                            "image": "busybox:1.36",
                            "command": ["sh", "-c", "echo " + "x" * 200],
                            "env": [{"name": f"E{k}", "value": "v" * 40} for k in range(8)],
                        }
                    ],
                },
            },
        },
    }


def extract(ref: str, into: Path) -> Path:
    """The operator and jobs packages at git ``ref``, unpacked under ``into``."""
    data = subprocess.run(
        ["git", "-C", str(REPO), "archive", "--format=tar", ref, "operator", "jobs"],
        check=True,
        capture_output=True,
    ).stdout
    with tarfile.open(fileobj=BytesIO(data)) as tar:
        tar.extractall(into, filter="data")
    return into


def measure(src: Path, kubeconfig: Path, seconds: float) -> dict[str, Any]:
    """Run the operator from ``src`` (a tree with operator/ and jobs/) and sample it."""
    env = {
        **os.environ,
        "KUBECONFIG": str(kubeconfig),
        "PYTHONPATH": f"{src / 'operator'}:{src / 'jobs'}",
        "MLFLOW_DISABLE_TELEMETRY": "true",
    }
    env.pop("VISIONR1_MLFLOW_URI", None)
    log = tempfile.NamedTemporaryFile(prefix="vr1-op-", suffix=".log", delete=False)  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "visionr1_operator.cli", "operator", "--all-namespaces",
         "--liveness", ""],
        env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    ps = psutil.Process(proc.pid)
    samples: list[int] = []
    t0 = time.monotonic()
    try:
        while time.monotonic() - t0 < seconds and proc.poll() is None:
            samples.append(ps.memory_info().rss)
            time.sleep(0.5)
        cpu = ps.cpu_times()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
    if not samples:
        raise RuntimeError(f"operator exited at once; see {log.name}")
    return {
        "rss_mb": {
            "peak": round(max(samples) / 2**20, 1),
            "end": round(samples[-1] / 2**20, 1),
        },
        "cpu_s": round(cpu.user + cpu.system, 2),
        "seconds": seconds,
        "log": log.name,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=5000)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--before-ref", help="also measure the operator at this git ref")
    args = parser.parse_args()

    sys.path.insert(0, str(REPO / "scripts" / "cluster"))
    from controlplane.handle import session_control_plane
    from visionr1_operator.crd import crd

    with session_control_plane(REPO) as cp:
        crd_name = crd()["metadata"]["name"]
        if cp.kubectl("get", "crd", crd_name, check=False).returncode != 0:
            cp.kubectl("create", "-f", "-", input=yaml.safe_dump(crd()))
        if cp.kubectl("get", "namespace", NOISE_NS, check=False).returncode != 0:
            cp.kubectl("create", "namespace", NOISE_NS)
        have = cp.kubectl("get", "jobs", "-n", NOISE_NS, "-o", "name", check=False).stdout
        missing = [i for i in range(args.jobs) if f"job.batch/other-{i:05d}" not in have]
        t0 = time.monotonic()
        batches = [missing[i : i + 250] for i in range(0, len(missing), 250)]

        def create(batch: list[int]) -> None:
            items = {"apiVersion": "v1", "kind": "List", "items": [unrelated_job(i) for i in batch]}
            cp.kubectl("create", "-n", NOISE_NS, "-f", "-", input=yaml.safe_dump(items))

        with ThreadPoolExecutor(4) as pool:
            list(pool.map(create, batches))
        created_s = time.monotonic() - t0
        out: dict[str, Any] = {
            "unrelated_jobs": args.jobs,
            "create_jobs_s": round(created_s, 1),
            "after": measure(REPO, cp.kubeconfig, args.seconds),
        }
        if args.before_ref:
            with tempfile.TemporaryDirectory(prefix="vr1-before-") as tmp:
                out["before"] = measure(
                    extract(args.before_ref, Path(tmp)), cp.kubeconfig, args.seconds
                )
                out["before"]["ref"] = args.before_ref
        cp.kubectl("delete", "namespace", NOISE_NS, "--wait=false", check=False)
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
