"""Helpers of the cluster tests: kubectl as JSON, waiting, the CRD, the operator as a local
process or as the chart's Deployment, port-forwards, and the tiny run's manifest for a cluster.

Everything here reads what the real API server stores; nothing stands in for a controller.
"""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import yaml

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"
CRD_NAME = "visionr1runs.visionr1.io"
STAGES = ["synthesis", "filter", "sft", "grpo", "eval"]

T = TypeVar("T")


# --------------------------------------------------------------------------- kubectl


def kget(cp: Any, *args: str) -> dict[str, Any]:
    """``kubectl get ARGS -o json`` as a dict."""
    return json.loads(cp.kubectl("get", *args, "-o", "json").stdout)


def kget_or_none(cp: Any, *args: str) -> dict[str, Any] | None:
    out = cp.kubectl("get", *args, "-o", "json", check=False)
    if out.returncode != 0:
        if "NotFound" in out.stderr or "not found" in out.stderr:
            return None
        raise AssertionError(f"kubectl get {' '.join(args)} failed: {out.stderr}")
    return json.loads(out.stdout)


def items(cp: Any, *args: str) -> list[dict[str, Any]]:
    return list(kget(cp, *args).get("items") or [])


def apply(cp: Any, objs: list[dict[str, Any]] | dict[str, Any], *extra: str, check: bool = True):
    docs = objs if isinstance(objs, list) else [objs]
    return cp.kubectl("apply", *extra, "-f", "-", input=yaml.safe_dump_all(docs), check=check)


def wait_for(predicate: Callable[[], T], timeout: float, what: str, interval: float = 0.25) -> T:
    """Poll ``predicate`` until it returns something truthy; fail naming ``what``."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r})")


def mlflow_login(cp: Any, release_namespace: str, fullname: str) -> dict[str, str]:
    """The chart's generated MLflow admin login (its Secret's keys, decoded)."""
    import base64

    secret = kget(cp, "secret", f"{fullname}-mlflow-auth", "-n", release_namespace)
    return {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}


def copy_login(cp: Any, login: dict[str, str], namespace: str, name: str = "mlflow-login") -> None:
    """The login as a Secret of ``namespace``: what a run's spec.mlflow.credentialsSecret names."""
    args = [f"--from-literal={k}={v}" for k, v in sorted(login.items())]
    out = cp.kubectl("create", "secret", "generic", name, "-n", namespace, *args, check=False)
    if out.returncode != 0 and "AlreadyExists" not in out.stderr:
        raise AssertionError(out.stderr)


def create_namespace(cp: Any, name: str) -> None:
    out = cp.kubectl("create", "namespace", name, check=False)
    if out.returncode != 0 and "AlreadyExists" not in out.stderr:
        raise AssertionError(out.stderr)


def crd_object() -> dict[str, Any]:
    from visionr1_operator.crd import crd

    return crd()


def ensure_crd(cp: Any) -> None:
    """The VisionR1Run CRD exists and is Established (created from `visionr1 crd` if absent:
    another test module may have installed it with the chart, which keeps it on uninstall)."""
    if kget_or_none(cp, "crd", CRD_NAME) is None:
        cp.kubectl("create", "-f", "-", input=yaml.safe_dump(crd_object()))
    wait_for(
        lambda: (
            (condition(kget_or_none(cp, "crd", CRD_NAME) or {}, "Established") or {}).get("status")
            == "True"
        ),
        60,
        f"CRD {CRD_NAME} Established",
    )


def condition(obj: dict[str, Any], type_: str) -> dict[str, Any] | None:
    for c in (obj.get("status") or {}).get("conditions") or []:
        if c.get("type") == type_:
            return c
    return None


# --------------------------------------------------------------------------- the operator


# An HTTP 403 in an access line, or the API server's "forbidden" reason (not a ",403" of a log timestamp).
FORBIDDEN = re.compile(r"\" 403\b|\bHTTP/[0-9.]+ 403\b|forbidden", re.IGNORECASE)


class OperatorProcess:
    """``visionr1 operator`` as a local process, logged in with a kubeconfig (a ServiceAccount
    token: the API server enforces that account's RBAC). Its log accumulates across restarts."""

    def __init__(
        self,
        kubeconfig: Path,
        namespaces: list[str],
        log_path: Path,
        *,
        mlflow_uri: str | None = None,
        retry_backoff: float = 1.0,
        extra_args: list[str] | None = None,
    ) -> None:
        self.kubeconfig = kubeconfig
        self.namespaces = namespaces
        self.log_path = log_path
        self.mlflow_uri = mlflow_uri
        self.retry_backoff = retry_backoff
        self.extra_args = extra_args or []
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "visionr1_operator.cli", "operator", "--liveness", ""]
        for ns in self.namespaces:
            cmd += ["--namespace", ns]
        if self.mlflow_uri:
            cmd += ["--mlflow-uri", self.mlflow_uri]
        return [*cmd, "--retry-backoff", str(self.retry_backoff), *self.extra_args]

    def start(self) -> None:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        env = {
            **os.environ,
            "KUBECONFIG": str(self.kubeconfig),
            "MLFLOW_DISABLE_TELEMETRY": "true",
            "PYTHONUNBUFFERED": "1",
        }
        env.pop("VISIONR1_MLFLOW_URI", None)
        with self.log_path.open("ab") as log:
            log.write(f"=== start {self.starts} {time.strftime('%H:%M:%S')}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                self.command(), env=env, stdout=log, stderr=subprocess.STDOUT
            )
        self.starts += 1

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def kill(self) -> None:
        """SIGKILL: no cleanup handler runs (a crashed or OOM-killed operator pod)."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def forbidden(self) -> list[str]:
        """Log lines that show the API server refusing the operator (RBAC too narrow)."""
        return [line for line in self.log().splitlines() if FORBIDDEN.search(line)]


class PortForward:
    """``kubectl port-forward`` to a Service: the way a user reaches the in-cluster MLflow from
    a laptop. ``url`` is ``http://127.0.0.1:<local port>``."""

    def __init__(self, cp: Any, namespace: str, target: str, port: int) -> None:
        self.cp, self.namespace, self.target, self.port = cp, namespace, target, port
        self.proc: subprocess.Popen[str] | None = None
        self.url = ""

    def __enter__(self) -> PortForward:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        argv = [
            str(self.cp.kubectl_bin),
            f"--kubeconfig={self.cp.kubeconfig}",
            "port-forward",
            "-n",
            self.namespace,
            self.target,
            f":{self.port}",
        ]
        self.proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()  # "Forwarding from 127.0.0.1:40123 -> 5000"
        match = re.search(r"127\.0\.0\.1:(\d+)", line)
        if not match:
            self.stop()
            raise AssertionError(f"kubectl port-forward {self.target}: {line.strip()}")
        self.url = f"http://127.0.0.1:{match.group(1)}"

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)


class ChartOperator:
    """The operator as the chart's Deployment runs it, from the operator image on the node."""

    def __init__(self, cp: Any, namespace: str, deployment: str) -> None:
        self.cp, self.namespace, self.deployment = cp, namespace, deployment

    def pods(self) -> list[dict[str, Any]]:
        return [
            p
            for p in items(
                self.cp, "pods", "-n", self.namespace, "-l", "app.kubernetes.io/component=operator"
            )
            if not p["metadata"].get("deletionTimestamp")
        ]

    def wait_ready(self, timeout: float = 180) -> None:
        self.cp.kubectl(
            "rollout", "status", f"deployment/{self.deployment}", "-n", self.namespace,
            f"--timeout={int(timeout)}s", timeout=timeout + 10,
        )  # fmt: skip

    def log(self) -> str:
        """Every container the Deployment ran, the current one and the one before a restart."""
        out = []
        for pod in self.pods():
            name = pod["metadata"]["name"]
            for previous in (True, False):
                args = ["logs", name, "-n", self.namespace, "-c", "operator"]
                text = self.cp.kubectl(
                    *args, *(["--previous"] if previous else []), check=False
                ).stdout
                out.append(text)
        return "\n".join(out)

    def alive(self) -> bool:
        return any(
            all(cs.get("ready") for cs in p["status"].get("containerStatuses") or [{}])
            and p["status"].get("phase") == "Running"
            for p in self.pods()
        )

    def kill(self) -> None:
        """SIGKILL the operator process (no cleanup handler runs), then keep the Deployment at
        zero replicas so it stays down until ``start``."""
        pids = [
            pid
            for p in self.pods()
            for pid in self.cp.container_pids(self.namespace, p["metadata"]["name"])
        ]
        assert pids, "no running operator container found on the node"
        for pid in pids:
            os.kill(pid, 9)
        self.cp.kubectl(
            "scale", f"deployment/{self.deployment}", "-n", self.namespace, "--replicas=0"
        )
        wait_for(lambda: not self.pods(), 120, "the operator pod gone")

    def start(self) -> None:
        self.cp.kubectl(
            "scale", f"deployment/{self.deployment}", "-n", self.namespace, "--replicas=1"
        )
        self.wait_ready()

    def forbidden(self) -> list[str]:
        return [line for line in self.log().splitlines() if FORBIDDEN.search(line)]


# --------------------------------------------------------------------------- manifests


def tiny_cluster_run(
    name: str, namespace: str, pvc: str, image: str | None = None
) -> dict[str, Any]:
    """examples/tiny-cluster.yaml (the laptop demo with every size cut, its data and model on the
    PVC's shared folder at /data) as ``namespace/name`` on ``pvc``, running ``image``."""
    run = yaml.safe_load((EXAMPLES / "tiny-cluster.yaml").read_text())
    run["metadata"] = {"name": name, "namespace": namespace}
    spec = run["spec"]
    spec["storage"] = {"pvc": pvc}
    spec["mlflow"] = {**spec["mlflow"], "experiment": f"cluster-{namespace}"}  # its login kept
    if image:  # the trainer image the stage pods run, pinned by digest
        spec["images"] = {"trainer": image, "pullPolicy": "IfNotPresent"}
    return run


def with_stages(run: dict[str, Any], enabled: list[str]) -> dict[str, Any]:
    """``run`` with only ``enabled`` stages on (the rest ``enabled: false``)."""
    out = copy.deepcopy(run)
    for stage in STAGES:
        if stage not in enabled:
            out["spec"]["stages"][stage] = {"enabled": False}
    return out
