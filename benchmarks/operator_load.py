"""Operator load: N VisionR1Runs created at once; prints JSON, exits 1 when a round came short.

Two targets (``--against``):

* ``kmock`` (default; 50 and 200 runs): an in-memory API server; this script plays the Job
  controller, marking every Job succeeded as soon as it appears. Latency = kmock's timestamp of
  the PATCH that marks a Job succeeded → its timestamp of the POST creating the next stage's Job.
* ``control-plane`` (1,000 runs): the real kube-apiserver, Job controller and scheduler of
  ``make cluster-up`` (or one started for the benchmark and stopped after it), with KWOK's fake
  nodes completing the pods (KWOK is built and started on demand). Latency = when a watch on the
  namespace's Jobs saw a Job's Complete condition → when the same watch saw the next stage's Job
  appear. Each count runs twice: first the floor, ``kopf_floor.py`` (a bare kopf operator that
  only creates a chain's next Job when one completes), then the real operator, so the figures
  read as ratios to what kopf and this API server do on this machine at the same moment. Also:
  CPU seconds of the operator, the floor and each control-plane process (from /proc), and the
  API server's own count of write requests (``apiserver_request_total``) per transition.

The operator runs as a real ``visionr1 operator`` subprocess, so its RSS and CPU are its own;
against the control plane it (and the floor) log in with a token of the chart's ServiceAccount.
A round that measured fewer transitions than its runs make (4 per run) fails the script.
Targets: p99 < 1 s at 1,000 runs and within 1.5x of the floor, RSS < 200 MB.

    python benchmarks/operator_load.py [--against kmock|control-plane] [--runs N ...]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
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


def _finished(k8s: Any) -> int:
    runs = kc.objects(k8s, "visionr1.io/v1alpha1/visionr1runs")
    return sum(
        (r.get("status") or {}).get("phase") in ("Succeeded", "Failed") for r in runs.values()
    )


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
        manifest["spec"]["storage"] = {"pvc": "data"}  # a cluster run needs one
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
                        if _finished(k8s) >= n:  # failed runs make no more Jobs
                            break
                    rss_peak = max(rss_peak, ps.memory_info().rss)
                # the last Jobs' success must still turn into Succeeded runs
                while time.monotonic() < deadline:
                    if _finished(k8s) >= n:
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
PVC = "load-data-kwok"
WRITE_VERBS = frozenset({"POST", "PUT", "PATCH", "DELETE", "DELETECOLLECTION", "APPLY"})
# Reads that cost the API server per request (watches are long-lived: not counted); a LIST of
# Events reads etcd itself (no watch cache), which made today's 200-run tail
READ_VERBS = frozenset({"GET", "LIST"})
METRIC = re.compile(r"^apiserver_request_total\{(?P<labels>[^}]*)\} (?P<value>\S+)$")


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
    """The latest phase of every VisionR1Run (a watch: polling 1,000 runs' lists loads the
    server whose CPU is being measured)."""

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


def _api_requests(cp: Any) -> Counter[str]:
    """The API server's own count of write and read requests so far (``apiserver_request_total``),
    by ``VERB resource[/subresource]``: every client together (the operator, the Job controller,
    the scheduler, KWOK, the garbage collector)."""
    text = cp.kubectl("get", "--raw", "/metrics", timeout=60).stdout
    out: Counter[str] = Counter()
    for line in text.splitlines():
        m = METRIC.match(line)
        if not m:
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m["labels"]))
        if labels.get("verb") not in WRITE_VERBS | READ_VERBS:
            continue
        what = labels.get("resource", "") + (
            f"/{labels['subresource']}" if labels.get("subresource") else ""
        )
        out[f"{labels['verb']} {what}"] += int(float(m["value"]))
    return out


def _events_by_reason(cp: Any, since: float) -> dict[str, int]:
    """Events of the load namespace posted during the round, by ``component: reason`` (what
    the operator, the Job controller and the scheduler each said)."""
    template = (
        '{range .items[*]}{.source.component}{.reportingComponent}{"\\t"}{.reason}{"\\t"}'
        '{.firstTimestamp}{.eventTime}{"\\n"}{end}'
    )
    out = cp.kubectl(
        "get", "events", "-n", LOAD_NS, "-o", f"jsonpath={template}", timeout=300, check=False
    ).stdout
    cutoff = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(since))
    counts: Counter[str] = Counter()
    for line in out.splitlines():
        parts = line.split("\t")
        if len(parts) == 3 and parts[2][:19] >= cutoff:
            counts[f"{parts[0] or '?'}: {parts[1]}"] += 1
    return dict(counts.most_common(15))


def _load_run(name: str) -> dict[str, Any]:
    from kopf_floor import KWOK_NODE_SELECTOR, KWOK_TOLERATION

    run = yaml.safe_load((REPO / "examples" / "tiny-cpu.yaml").read_text())
    run["metadata"] = {"name": name, "namespace": LOAD_NS}
    run["spec"]["storage"] = {"pvc": PVC}
    for stage in STAGES:  # pods go to KWOK's fake nodes, which complete them
        run["spec"]["stages"][stage]["nodeSelector"] = dict(KWOK_NODE_SELECTOR)
        run["spec"]["stages"][stage]["tolerations"] = [KWOK_TOLERATION]
    return run


def _wait_empty(cp: Any, timeout: float) -> float:
    """Delete every run and Job of the load namespace and wait for their pods to go (the
    garbage collector's and KWOK's deletes stay out of the next round); seconds it took. One
    delete-collection request per kind (kubectl deletes 5,000 Jobs one request each)."""
    from kubernetes import client

    t0 = time.monotonic()
    api = cp.api_client()
    client.CustomObjectsApi(api).delete_collection_namespaced_custom_object(
        "visionr1.io", "v1alpha1", LOAD_NS, "visionr1runs", _request_timeout=300
    )
    client.BatchV1Api(api).delete_collection_namespaced_job(
        LOAD_NS, propagation_policy="Background", _request_timeout=300
    )
    left = "?"
    while time.monotonic() - t0 < timeout:
        left = " ".join(
            cp.kubectl(
                "get", "vr1,jobs,pods", "-n", LOAD_NS, "-o", "name", check=False
            ).stdout.split()
        )
        if not left:
            return round(time.monotonic() - t0, 1)
        time.sleep(2)
    raise RuntimeError(f"{LOAD_NS} not empty {timeout:.0f} s after deleting: {left[:300]}")


# Packages of this checkout's environment (the scripts' and tests' official client) that the
# operator image does not install; kopf imports ``kubernetes`` whenever it can (about 20 MB of
# RSS), so the operator and the floor run with them hidden, as their processes are in the image.
NOT_IN_OPERATOR_IMAGE = ("kubernetes", "kubernetes_validate")
IMAGE_CONSTRAINTS = REPO / "images" / "operator" / "constraints.txt"


def as_in_image(tmp: Path) -> Path:
    """A folder for PYTHONPATH whose sitecustomize hides ``NOT_IN_OPERATOR_IMAGE`` and
    records each full (oldest generation) garbage collection's pause into ``gc-pauses.txt``
    next to it (:func:`gc_pauses`); refuses when the operator image's constraints install one
    of them after all."""
    pinned = {
        line.split("==")[0].strip().lower().replace("-", "_")
        for line in IMAGE_CONSTRAINTS.read_text().splitlines()
        if "==" in line and not line.lstrip().startswith("#")
    }
    if pinned & set(NOT_IN_OPERATOR_IMAGE):
        raise RuntimeError(
            f"{IMAGE_CONSTRAINTS} installs {sorted(pinned & set(NOT_IN_OPERATOR_IMAGE))}: "
            "drop it from NOT_IN_OPERATOR_IMAGE"
        )
    folder = tmp / "as-in-image"
    folder.mkdir(exist_ok=True)
    (folder / "sitecustomize.py").write_text(
        "import sys\n"
        f"_HIDDEN = {NOT_IN_OPERATOR_IMAGE!r}\n"
        "class _NotInImage:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in _HIDDEN:\n"
        "            raise ModuleNotFoundError(f'No module named {name!r} (not in the image)')\n"
        "sys.meta_path.insert(0, _NotInImage())\n"
        "import gc, time\n"
        f"_PAUSES = open({str(tmp / GC_PAUSES)!r}, 'a', buffering=1)\n"
        "_started = [0.0, 0.0]\n"
        "def _pause(phase, info):\n"
        "    if phase == 'start':\n"
        "        _started[:] = time.perf_counter(), time.thread_time()\n"
        "    elif info['generation'] == 2:\n"
        "        wall, cpu = time.perf_counter() - _started[0], time.thread_time() - _started[1]\n"
        "        _PAUSES.write(f'{wall * 1000:.1f} {cpu * 1000:.1f}\\n')\n"
        "gc.callbacks.append(_pause)\n"
    )
    return folder


GC_PAUSES = "gc-pauses.txt"


def gc_pauses(tmp: Path) -> dict[str, Any]:
    """The full garbage collections the process of ``tmp`` made: how many, their pauses, and
    the CPU time of those pauses (a pause much longer than its CPU time waited for a core)."""
    path = tmp / GC_PAUSES
    rows = [line.split() for line in path.read_text().splitlines()] if path.exists() else []
    ms = [float(row[0]) for row in rows]
    cpu_ms = [float(row[1]) for row in rows if len(row) > 1]
    return {
        "count": len(ms),
        "total_s": round(sum(ms) / 1000, 2),
        "max_ms": round(max(ms, default=0.0), 1),
        "p50_ms": round(statistics.median(ms), 1) if ms else None,
        "cpu_total_s": round(sum(cpu_ms) / 1000, 2),
        "cpu_p50_ms": round(statistics.median(cpu_ms), 1) if cpu_ms else None,
    }


def _one_round(
    cp: Any, api: Any, kind: str, n: int, timeout: float, kubeconfig: Path
) -> dict[str, Any]:
    """``n`` five-stage runs started at once, driven by ``kind`` (``operator``: the real
    ``visionr1 operator``; ``floor``: benchmarks/kopf_floor.py, chains of bare Jobs)."""
    from concurrent.futures import ThreadPoolExecutor

    from kopf_floor import KWOK_TOLERATION, chain_job
    from kubernetes import client

    prefix = f"{'op' if kind == 'operator' else 'fl'}{n}-{int(time.time()) % 100000}"
    names = [f"{prefix}-{i:04d}" for i in range(n)]
    watch = JobWatch(api, LOAD_NS)
    run_watch = RunWatch(api, LOAD_NS) if kind == "operator" else None
    for w in (watch, run_watch):
        if w is not None:
            w.start()
            if not w.ready.wait(60):
                raise RuntimeError(f"{type(w).__name__} did not list {LOAD_NS} within 60 s")
    tmp = Path(tempfile.mkdtemp(prefix=f"vr1-load-{kind}-"))
    log = open(tmp / f"{kind}.log", "wb")  # noqa: SIM115 (closed below)
    env = {**os.environ, "KUBECONFIG": str(kubeconfig), "MLFLOW_DISABLE_TELEMETRY": "true"}
    env.pop("VISIONR1_MLFLOW_URI", None)
    env["PYTHONPATH"] = os.pathsep.join(
        [
            str(as_in_image(tmp)),
            str(REPO / "operator"),
            str(REPO / "jobs"),
            env.get("PYTHONPATH", ""),
        ]
    )
    if kind == "operator":
        # the runs' pods go to KWOK's nodes: the cluster's lists must admit its selector and
        # toleration (deny by default)
        argv = [sys.executable, "-m", "visionr1_operator.cli", "operator", "-n", LOAD_NS,
                "--liveness", "", "--allowed-node-selector=type=kwok",
                f"--allowed-toleration={KWOK_TOLERATION['key']}",
                *os.environ.get("VR1_LOAD_OPERATOR_ARGS", "").split()]  # fmt: skip
    else:
        argv = [sys.executable, str(Path(__file__).with_name("kopf_floor.py")), "-n", LOAD_NS]
    proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
    ps = psutil.Process(proc.pid)
    pids = cp.pids()
    components = ("kube-apiserver", "etcd", "kube-controller-manager", "kube-scheduler", "kwok")
    rss_peak = 0
    last_jobs = [f"{name}-{STAGES[-1]}-0" for name in names]
    try:
        time.sleep(5.0)  # it logs in and starts its watches
        rss_start = ps.memory_info().rss  # imports and empty watches: what no run costs
        if proc.poll() is not None:
            raise RuntimeError(f"the {kind} exited at start: see {tmp / (kind + '.log')}")
        writes0 = _api_requests(cp)
        cpu0 = {k: _cpu_s(pids.get(k)) for k in components}
        own_cpu0 = _cpu_s(proc.pid)
        load0 = os.getloadavg()[0]
        wall_clock0 = time.time()
        t0 = time.monotonic()
        custom, batch = client.CustomObjectsApi(api), client.BatchV1Api(api)

        def start(name: str) -> None:
            if kind == "operator":
                custom.create_namespaced_custom_object(
                    "visionr1.io", "v1alpha1", LOAD_NS, "visionr1runs", _load_run(name)
                )
            else:
                batch.create_namespaced_job(LOAD_NS, chain_job(LOAD_NS, name, 0))

        with ThreadPoolExecutor(16) as pool:
            list(pool.map(start, names))
        created_s = time.monotonic() - t0
        deadline = t0 + timeout
        while time.monotonic() < deadline and proc.poll() is None:
            rss_peak = max(rss_peak, ps.memory_info().rss)
            if run_watch is not None:
                phases = [run_watch.phases.get(name) for name in names]
                if sum(p in ("Succeeded", "Failed") for p in phases) >= n:
                    break
            elif all(j in watch.completed for j in last_jobs):
                break
            time.sleep(0.5)
        wall = time.monotonic() - t0
        rss_peak = max(rss_peak, ps.memory_info().rss)
        load1 = os.getloadavg()[0]
        cpu = {k: round(_cpu_s(pids.get(k)) - v, 1) for k, v in cpu0.items() if pids.get(k)}
        cpu[kind] = round(_cpu_s(proc.pid) - own_cpu0, 1)
        requests = _api_requests(cp) - writes0
        writes = Counter({k: v for k, v in requests.items() if k.split()[0] in WRITE_VERBS})
        reads = Counter({k: v for k, v in requests.items() if k.split()[0] in READ_VERBS})
        events = _events_by_reason(cp, since=wall_clock0)
        # Delete while it still runs (a finalizer, if an operator ever adds one, is removed).
        print(f"{kind}: {n} runs measured, cleaning up", file=sys.stderr, flush=True)
        cleanup_s = _wait_empty(cp, 900)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        watch.stopping.set()
        if run_watch is not None:
            run_watch.stopping.set()
    latencies: list[float] = []
    by_pair: dict[str, list[float]] = {}
    for name in names:
        for prev, nxt in zip(STAGES, STAGES[1:], strict=False):
            a = watch.completed.get(f"{name}-{prev}-0")
            b = watch.created.get(f"{name}-{nxt}-0")
            if a is not None and b is not None:
                latencies.append(b - a)
                by_pair.setdefault(f"{prev}->{nxt}", []).append(b - a)
    total_writes = sum(writes.values())
    out: dict[str, Any] = {
        "transitions_measured": len(latencies),
        "complete_to_next_job_s": _summary(latencies),
        # the first transitions meet the burst of n runs starting at once
        "by_transition_s": {k: _summary(v) for k, v in by_pair.items()},
        "rss_mb_peak": round(rss_peak / 2**20, 1),
        "rss_mb_at_start": round(rss_start / 2**20, 1),
        "cpu_s": cpu,
        # Python's full collections stop the whole process: a pause delays every transition
        "gc_full_collections": gc_pauses(tmp),
        "api_writes": {
            "total": total_writes,
            "per_transition": round(total_writes / max(1, len(latencies)), 2),
            "by_request": dict(writes.most_common(12)),
        },
        "api_reads": {
            "total": sum(reads.values()),
            "by_request": dict(reads.most_common(8)),
        },
        "events": events,
        "wall_s": round(wall, 2),
        "start_all_s": round(created_s, 2),
        "cleanup_s": cleanup_s,
        "load_avg_1m": [round(load0, 2), round(load1, 2)],
        "jobs_seen": sum(j.startswith(prefix) for j in watch.created),
        "log": str(tmp / f"{kind}.log"),
    }
    if run_watch is not None:
        phases = [run_watch.phases.get(name) for name in names]
        out["runs_succeeded"] = phases.count("Succeeded")
        out["runs_failed"] = phases.count("Failed")
    if proc.returncode not in (None, 0, -15):
        out["exited"] = proc.returncode
    return out


def control_plane_rounds(counts: list[int], timeout: float) -> dict[str, Any]:
    sys.path.insert(0, str(REPO / "scripts" / "cluster"))
    from controlplane import build, cluster
    from controlplane.config import Layout
    from controlplane.handle import session_control_plane

    # KWOK's fake nodes complete the pods; it is built only for this benchmark.
    layout = Layout.for_repo(REPO)
    build.ensure_built(layout, lambda line: print(line, file=sys.stderr), optional=True)
    from visionr1_operator.crd import crd

    results = []
    with session_control_plane(REPO, echo=lambda line: print(line, file=sys.stderr)) as cp:
        cp.state = cluster.ensure_kwok(layout)  # a cluster started before KWOK was built
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
        # The chart gives the operator's ServiceAccount and RBAC; its Deployment stays off every
        # node (this script runs the operator itself, to read its RSS and CPU).
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
        # KWOK's pods mount nothing, but the scheduler still checks the PV's node affinity.
        cp.make_pvc(LOAD_NS, PVC, "1Gi", nodes=[cp.node_name, *cp.kwok_nodes])
        api = cp.api_client()
        _wait_empty(cp, 900)  # what an interrupted earlier run left
        for n in counts:
            floor = _one_round(cp, api, "floor", n, timeout, kubeconfig)
            print(json.dumps({"runs": n, "floor": floor}), file=sys.stderr, flush=True)
            operator = _one_round(cp, api, "operator", n, timeout, kubeconfig)
            print(json.dumps({"runs": n, "operator": operator}), file=sys.stderr, flush=True)
            results.append({"runs": n, "transitions_expected": n * (len(STAGES) - 1),
                            "operator": operator, "floor": floor,
                            **_compare(operator, floor)})  # fmt: skip
        cp.helm("uninstall", RELEASE, "-n", RELEASE_NS, check=False)
        version = _server_version(cp)
    return {"kubernetes": version, "kwok_nodes": len(cp.kwok_nodes), "results": results}


def _compare(operator: dict[str, Any], floor: dict[str, Any]) -> dict[str, Any]:
    """The operator's figures over the floor's, and the goals they meet."""
    op, fl = operator["complete_to_next_job_s"], floor["complete_to_next_job_s"]
    ratio = {
        q: round(op[q] / fl[q], 2) if op[q] is not None and fl[q] else None for q in ("p50", "p99")
    }
    return {
        "ratio_to_floor": ratio,
        "extra_api_writes_per_transition": round(
            operator["api_writes"]["per_transition"] - floor["api_writes"]["per_transition"], 2
        ),
        "goals": {
            "p99_under_1s": op["p99"] is not None and op["p99"] < 1.0,
            "p99_within_1.5x_floor": ratio["p99"] is not None and ratio["p99"] <= 1.5,
            "rss_under_200mb": operator["rss_mb_peak"] < 200,
        },
    }


def _short(result: dict[str, Any], n_expected: int) -> list[str]:
    """Why a round does not count: fewer transitions measured than its runs make."""
    out = []
    for kind in ("floor", "operator"):
        got = result[kind]["transitions_measured"]
        if got < n_expected:
            out.append(
                f"{result['runs']} runs, {kind}: {got} of {n_expected} stage transitions "
                f"measured ({result[kind]['jobs_seen']} Jobs seen; log: {result[kind]['log']})"
            )
    return out


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
    parser.add_argument("--runs", type=int, nargs="+", default=None)
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per round")
    args = parser.parse_args()
    counts = args.runs or ([50, 200] if args.against == "kmock" else [1000])
    out: dict[str, Any] = {
        "benchmark": "operator_load",
        "against": args.against,
        "targets": {"p99_s": 1.0, "p99_ratio_to_floor": 1.5, "rss_mb": 200},
        "cpu_count": os.cpu_count(),
    }
    failures: list[str] = []
    if args.against == "kmock":
        out["results"] = [asyncio.run(one_round(n, args.timeout)) for n in counts]
        for r in out["results"]:
            if r["transitions_measured"] < r["runs"] * (len(STAGES) - 1):
                failures.append(f"{r['runs']} runs: {r['transitions_measured']} transitions")
    else:
        out.update(control_plane_rounds(counts, args.timeout))
        for r in out["results"]:
            failures += _short(r, r["transitions_expected"])
    out["failures"] = failures
    print(json.dumps(out, indent=2))
    for line in failures:
        print(f"operator_load: FAILED: {line}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
