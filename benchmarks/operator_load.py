"""Operator load: N VisionR1Runs created at once; prints JSON.

Two targets (``--against``):

* ``kmock`` (default): an in-memory API server; this script plays the Job controller, marking
  every Job succeeded as soon as it appears. Latency = kmock's timestamp of the PATCH that marks a
  Job succeeded → its timestamp of the POST creating the next stage's Job.
* ``control-plane``: the real kube-apiserver, Job controller and scheduler of ``make cluster-up``
  (or one started for the benchmark and stopped after it). Pods are completed by KWOK's fake nodes
  when the control plane runs KWOK, otherwise by the local node runner (each stage program finds
  its output already written and exits 0 at once). Latency = when a watch on the namespace's Jobs
  saw a Job's Complete condition → when the same watch saw the next stage's Job appear. Also the
  API server's CPU seconds (from /proc of its pid) during the round.

In both, the operator runs as a real ``visionr1 operator`` subprocess, so its RSS and CPU are its
own; against the control plane it logs in with a token of the chart's ServiceAccount.
Targets: p99 < 1 s at 200 runs, RSS < 200 MB.

    python benchmarks/operator_load.py [--against kmock|control-plane] [--runs 50 200]
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
import threading
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


# --------------------------------------------------------------------------- the control plane

LOAD_NS = "vr1-load"
RELEASE, RELEASE_NS = "vr1-load", "vr1-load-system"
SERVICE_ACCOUNT = f"{RELEASE}-visionr1-operator"  # the chart's <release>-<chart> fullname
KWOK_TOLERATION = {"key": "kwok.x-k8s.io/node", "operator": "Exists", "effect": "NoSchedule"}


class Watch(threading.Thread):
    """One watch on a namespaced resource, reading raw JSON lines (no model deserialisation keeps
    this process's CPU out of the measurement), re-watching after a dropped connection and
    re-listing after 410 Gone. Subclasses record what they need in ``seen(obj, now)``."""

    def __init__(self, list_fn: Any, namespace: str) -> None:
        super().__init__(daemon=True)
        self.list_fn, self.namespace = list_fn, namespace
        self.stopping = threading.Event()
        self.ready = threading.Event()

    def seen(self, obj: dict[str, Any], now: float) -> None:
        raise NotImplementedError

    def _list(self) -> str:
        resp = self.list_fn(self.namespace, _preload_content=False)
        body = json.loads(resp.data)
        now = time.monotonic()
        for obj in body.get("items") or []:
            self.seen(obj, now)
        return body["metadata"]["resourceVersion"]

    def run(self) -> None:
        rv = self._list()
        self.ready.set()
        while not self.stopping.is_set():
            try:
                resp = self.list_fn(
                    self.namespace,
                    watch=True,
                    resource_version=rv,
                    allow_watch_bookmarks=True,
                    timeout_seconds=5,
                    _preload_content=False,
                )
                for line in resp:
                    now = time.monotonic()
                    event = json.loads(line)
                    obj = event["object"]
                    if event["type"] == "ERROR":  # 410 Gone: too old a resourceVersion
                        rv = self._list()
                        break
                    rv = obj["metadata"].get("resourceVersion", rv)
                    if event["type"] in ("ADDED", "MODIFIED"):
                        self.seen(obj, now)
                resp.release_conn()
            except Exception:  # noqa: BLE001 (a dropped watch under load: watch again)
                time.sleep(0.5)


class JobWatch(Watch):
    """When each Job was first seen, and first seen with its Complete condition."""

    def __init__(self, api_client: Any, namespace: str) -> None:
        from kubernetes import client

        super().__init__(client.BatchV1Api(api_client).list_namespaced_job, namespace)
        self.created: dict[str, float] = {}
        self.completed: dict[str, float] = {}

    def seen(self, obj: dict[str, Any], now: float) -> None:
        name = obj["metadata"]["name"]
        self.created.setdefault(name, now)
        for cond in (obj.get("status") or {}).get("conditions") or []:
            if cond["type"] == "Complete" and cond["status"] == "True":
                self.completed.setdefault(name, now)


class RunWatch(Watch):
    """The latest phase of every VisionR1Run (a watch: polling 200 runs' lists loads the server
    whose CPU is being measured)."""

    def __init__(self, api_client: Any, namespace: str) -> None:
        from functools import partial

        from kubernetes import client

        list_fn = partial(
            client.CustomObjectsApi(api_client).list_namespaced_custom_object,
            "visionr1.io",
            "v1alpha1",
        )
        super().__init__(lambda ns, **kw: list_fn(ns, "visionr1runs", **kw), namespace)
        self.phases: dict[str, str | None] = {}

    def seen(self, obj: dict[str, Any], now: float) -> None:
        self.phases[obj["metadata"]["name"]] = (obj.get("status") or {}).get("phase")


def _cpu_s(pid: int | None) -> float:
    if not pid:
        return 0.0
    try:
        t = psutil.Process(pid).cpu_times()
    except psutil.Error:
        return 0.0
    return t.user + t.system


def _load_run(name: str, kwok_nodes: list[str], pvc: str | None) -> dict[str, Any]:
    run = yaml.safe_load((REPO / "examples" / "tiny-cpu.yaml").read_text())
    run["metadata"] = {"name": name, "namespace": LOAD_NS}
    if pvc:
        run["spec"]["storage"] = {"pvc": pvc}
    for stage in STAGES:
        if kwok_nodes:  # pods go to KWOK's fake nodes, which complete them
            run["spec"]["stages"][stage]["nodeSelector"] = {"type": "kwok"}
            run["spec"]["stages"][stage]["tolerations"] = [KWOK_TOLERATION]
    return run


def _prewrite_outputs(pv: Path, name: str) -> None:
    """Node-runner mode: every stage's manifest already there, so the real stage program starts,
    sees its stage done, and exits 0 (the contract's skip-when-done path)."""
    from visionr1_jobs.contract import StageManifest

    for stage in STAGES:
        folder = pv / LOAD_NS / name / stage
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "_manifest.json").write_text(json.dumps(StageManifest(stage=stage).dump()))


def control_plane_rounds(counts: list[int], timeout: float) -> dict[str, Any]:
    sys.path.insert(0, str(REPO / "scripts" / "cluster"))
    from concurrent.futures import ThreadPoolExecutor

    from kubernetes import client

    from controlplane import build
    from controlplane.config import Layout
    from controlplane.handle import session_control_plane

    # KWOK's fake nodes complete the pods; it is built only for this benchmark.
    build.ensure_built(
        Layout.for_repo(REPO), lambda line: print(line, file=sys.stderr), optional=True
    )
    from visionr1_operator.crd import crd

    results = []
    with session_control_plane(REPO) as cp:
        crd_name = crd()["metadata"]["name"]
        if cp.kubectl("get", "crd", crd_name, check=False).returncode != 0:
            cp.kubectl("create", "-f", "-", input=yaml.safe_dump(crd()))
        jsonpath = '{.status.conditions[?(@.type=="Established")].status}'
        deadline = time.monotonic() + 60
        while cp.kubectl("get", "crd", crd_name, "-o", f"jsonpath={jsonpath}",
                         check=False).stdout != "True":  # fmt: skip
            if time.monotonic() > deadline:
                raise RuntimeError(f"CRD {crd_name} not Established within 60 s")
            time.sleep(0.5)
        if cp.kubectl("get", "namespace", LOAD_NS, check=False).returncode != 0:
            cp.kubectl("create", "namespace", LOAD_NS)
        off_node = {"nodeSelector": {"visionr1.io/benchmark-no-such-node": "true"}}
        cp.helm(
            "upgrade", "--install", RELEASE, str(REPO / "charts" / "visionr1-operator"),
            "-n", RELEASE_NS, "--create-namespace", "-f", "-",
            input=yaml.safe_dump({
                "crds": {"install": False},
                "watchNamespaces": [LOAD_NS],
                "operator": off_node,
                "mlflow": {"enabled": False},
            }),
        )  # fmt: skip
        kubeconfig = cp.token_kubeconfig(RELEASE_NS, SERVICE_ACCOUNT, seconds=7200)
        kwok_nodes = list(getattr(cp, "kwok_nodes", None) or [])
        pv = None if kwok_nodes else Path(cp.make_pvc(LOAD_NS, "load-data", "1Gi"))
        api = cp.api_client()
        custom = client.CustomObjectsApi(api)
        pids = cp.pids()
        for n in counts:
            prefix = f"load{n}-{int(time.time()) % 100000}"
            names = [f"{prefix}-{i:04d}" for i in range(n)]
            if pv is not None:
                for name in names:
                    _prewrite_outputs(pv, name)
            watch, run_watch = JobWatch(api, LOAD_NS), RunWatch(api, LOAD_NS)
            for w in (watch, run_watch):
                w.start()
                w.ready.wait(30)
            tmp = Path(tempfile.mkdtemp(prefix="vr1-load-"))
            log = open(tmp / "operator.log", "wb")  # noqa: SIM115 (closed below)
            env = {**os.environ, "KUBECONFIG": str(kubeconfig), "MLFLOW_DISABLE_TELEMETRY": "true"}
            env.pop("VISIONR1_MLFLOW_URI", None)
            proc = subprocess.Popen(
                [sys.executable, "-m", "visionr1_operator.cli", "operator", "-n", LOAD_NS,
                 "--liveness", "", "--allowed-node-selector=type=kwok",
                 f"--allowed-toleration={KWOK_TOLERATION['key']}",
                 *os.environ.get("VR1_LOAD_OPERATOR_ARGS", "").split()],
                env=env, stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
            ps = psutil.Process(proc.pid)
            rss_peak = 0
            succeeded = 0
            try:
                time.sleep(5.0)  # the operator logs in and starts its watches
                cpu0 = {k: _cpu_s(pids.get(k)) for k in ("kube-apiserver", "etcd",
                        "kube-controller-manager", "kube-scheduler", "node")}  # fmt: skip
                op_cpu0 = _cpu_s(proc.pid)
                t0 = time.monotonic()
                with ThreadPoolExecutor(16) as pool:
                    list(pool.map(
                        lambda name: custom.create_namespaced_custom_object(
                            "visionr1.io", "v1alpha1", LOAD_NS, "visionr1runs",
                            _load_run(name, kwok_nodes, "load-data" if pv else None)),
                        names,
                    ))  # fmt: skip
                created_s = time.monotonic() - t0
                deadline = t0 + timeout
                while time.monotonic() < deadline:
                    rss_peak = max(rss_peak, ps.memory_info().rss)
                    phases = [run_watch.phases.get(name) for name in names]
                    succeeded = phases.count("Succeeded")
                    if succeeded + phases.count("Failed") >= n:
                        break
                    time.sleep(0.5)
                wall = time.monotonic() - t0
                rss_end = ps.memory_info().rss
                cpu = {k: round(_cpu_s(pids.get(k)) - v, 1) for k, v in cpu0.items()}
                cpu["operator"] = round(_cpu_s(proc.pid) - op_cpu0, 1)
                # Runs carry the operator's finalizer: delete them while it still runs.
                cp.kubectl("delete", "vr1", "--all", "-n", LOAD_NS, "--timeout=600s",
                           timeout=660, check=False)  # fmt: skip
            finally:
                proc.terminate()
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                log.close()
                watch.stopping.set()
                run_watch.stopping.set()
            forbidden = [
                line
                for line in (tmp / "operator.log").read_text(errors="replace").splitlines()
                if " 403" in line or "Forbidden" in line
            ]
            latencies = []
            by_pair: dict[str, list[float]] = {}
            for name in names:
                for prev, nxt in zip(STAGES, STAGES[1:], strict=False):
                    a = watch.completed.get(f"{name}-{prev}-0")
                    b = watch.created.get(f"{name}-{nxt}-0")
                    if a is not None and b is not None:
                        latencies.append(b - a)
                        by_pair.setdefault(f"{prev}->{nxt}", []).append(b - a)
            results.append(
                {
                    "runs": n,
                    "runs_succeeded": succeeded,
                    "jobs_created": sum(j.startswith(prefix) for j in watch.created),
                    "transitions_measured": len(latencies),
                    "success_to_next_job_s": _summary(latencies),
                    # the first transitions meet the burst of n runs starting at once
                    "by_transition_s": {k: _summary(v) for k, v in by_pair.items()},
                    "operator_rss_mb": {
                        "peak": round(rss_peak / 2**20, 1),
                        "end": round(rss_end / 2**20, 1),
                    },
                    "wall_s": round(wall, 2),
                    "create_runs_s": round(created_s, 2),
                    "cpu_s": cpu,
                    "pods_completed_by": "kwok" if kwok_nodes else "node-runner",
                    "operator_forbidden_lines": len(forbidden),
                }
            )
        cp.helm("uninstall", RELEASE, "-n", RELEASE_NS, check=False)
        version = _server_version(cp)
    return {"kubernetes": version, "results": results}


def _server_version(cp: Any) -> str:
    out = cp.kubectl("version", "-o", "json", check=False).stdout
    try:
        return json.loads(out)["serverVersion"]["gitVersion"]
    except (ValueError, KeyError):
        return "unknown"


def _summary(latencies: list[float]) -> dict[str, float | None]:
    return {
        "p50": round(statistics.median(latencies), 4) if latencies else None,
        "p99": round(_percentile(latencies, 0.99), 4) if latencies else None,
        "max": round(max(latencies), 4) if latencies else None,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--against", choices=["kmock", "control-plane"], default="kmock")
    parser.add_argument("--runs", type=int, nargs="+", default=[50, 200])
    parser.add_argument("--timeout", type=float, default=300.0)
    args = parser.parse_args()
    out: dict[str, Any] = {
        "benchmark": "operator_load",
        "against": args.against,
        "targets": {"p99_s_at_200": 1.0, "rss_mb": 200},
        "cpu_count": os.cpu_count(),
    }
    if args.against == "kmock":
        out["results"] = [asyncio.run(one_round(n, args.timeout)) for n in args.runs]
    else:
        out.update(control_plane_rounds(args.runs, args.timeout))
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
