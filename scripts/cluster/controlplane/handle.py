"""What a test (or a script) holds while a control plane runs: paths, the real CLIs, helpers.

``session_control_plane(repo)`` reuses a control plane that ``make cluster-up`` started (and
leaves it running), or starts one and stops it on exit, so no process outlives the caller.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from controlplane import build, cluster, node
from controlplane.config import Layout

STORAGE_CLASS = "visionr1-local"


class Unavailable(Exception):
    """The control plane cannot run here (no Go and no cached build); the message says how."""


class CommandFailed(subprocess.CalledProcessError):
    """A CLI call that failed; its text (what pytest reports) carries the tool's own message."""

    def __str__(self) -> str:
        args = " ".join(a for a in self.cmd if not a.startswith("--kubeconfig="))
        return f"`{args}` exited {self.returncode}: {(self.stderr or self.output or '').strip()}"


def _run(
    argv: list[str], *, check: bool, input: str | None, timeout: float
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise CommandFailed(proc.returncode, argv, output=proc.stdout, stderr=proc.stderr)
    return proc


@dataclass
class ControlPlane:
    layout: Layout
    state: cluster.State
    owned: bool  # started by this handle (and stopped by it)
    _tokens: dict[tuple[str, str], Path] = field(default_factory=dict)

    # -- paths --
    @property
    def kubeconfig(self) -> Path:
        return self.layout.kubeconfig

    @property
    def server(self) -> str:
        return self.state.server

    @property
    def bin_dir(self) -> Path:
        return self.layout.bin_dir

    @property
    def kubectl_bin(self) -> Path:
        return self.layout.binary("kubectl")

    @property
    def helm_bin(self) -> Path:
        return self.layout.binary("helm")

    @property
    def kwok_bin(self) -> Path | None:
        path = self.layout.binary("kwok")
        return path if path.exists() else None

    @property
    def kwok_nodes(self) -> list[str]:
        """The fake GPU nodes KWOK manages (label type=kwok, taint kwok.x-k8s.io/node=fake:
        NoSchedule; Job pods there complete at once), empty when KWOK is not running."""
        return list(self.state.kwok_nodes) if "kwok" in self.state.pids else []

    @property
    def node_name(self) -> str:
        return self.layout.versions.node.name

    @property
    def pv_root(self) -> Path:
        return self.layout.pv_root

    @property
    def logs_dir(self) -> Path:
        return self.layout.logs

    @property
    def node_ip(self) -> str:
        """The node's address (kubelet, registry, cluster DNS), inside its network namespace."""
        return node.NODE_IP

    @property
    def registry(self) -> str:
        """``host:port`` of the registry the node pulls from (plain HTTP)."""
        return node.REGISTRY

    @property
    def node_paths(self) -> node.NodePaths:
        return node.NodePaths.default()

    def pids(self) -> dict[str, int]:
        return dict(self.state.pids)

    def crictl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """The node's CRI, as an administrator on the node would look at it."""
        sock = self.node_paths.containerd_sock
        argv = [str(self.layout.binary("crictl")), f"--runtime-endpoint=unix://{sock}", *args]
        return _run(argv, check=check, input=None, timeout=60)

    def container_pids(self, namespace: str, pod: str) -> list[int]:
        """Host pids of the pod's running containers (their init process), read from the CRI."""
        ids = self.crictl(
            "ps", "-q", "--label", f"io.kubernetes.pod.namespace={namespace}",
            "--label", f"io.kubernetes.pod.name={pod}",
        ).stdout.split()  # fmt: skip
        pids = []
        for cid in ids:
            info = json.loads(self.crictl("inspect", cid).stdout).get("info", {})
            if info.get("pid"):
                pids.append(int(info["pid"]))
        return pids

    # -- the real CLIs --
    def kubectl(
        self, *args: str, check: bool = True, input: str | None = None, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        argv = [str(self.kubectl_bin), f"--kubeconfig={self.kubeconfig}", *args]
        return _run(argv, check=check, input=input, timeout=timeout)

    def helm(
        self, *args: str, check: bool = True, input: str | None = None, timeout: float = 300
    ) -> subprocess.CompletedProcess[str]:
        argv = [str(self.helm_bin), f"--kubeconfig={self.kubeconfig}", *args]
        return _run(argv, check=check, input=input, timeout=timeout)

    def api_client(self) -> Any:
        from kubernetes import client, config

        cfg = client.Configuration()
        config.load_kube_config(config_file=str(self.kubeconfig), client_configuration=cfg)
        return client.ApiClient(cfg)

    # -- storage --
    def make_pvc(
        self,
        namespace: str,
        name: str,
        size: str = "10Gi",
        *,
        uid: int = 1000,
        gid: int = 1000,
        nodes: list[str] | None = None,
    ) -> Path:
        """A hostPath PV under ``pv_root`` pre-bound to a new PVC ``namespace/name``.

        Returns the PV's folder, owned by ``uid:gid`` like a share prepared for the stage user.
        Waits until the real PV controller reports the claim Bound. ``nodes``: where pods using
        it may be scheduled (default: the local node; KWOK's fake nodes mount nothing, so the
        load benchmark adds them).
        """
        pv_name = f"pv-{namespace}-{name}"
        folder = self.pv_root / f"{namespace}-{name}"
        folder.mkdir(parents=True, exist_ok=True)
        os.chown(folder, uid, gid)
        pv = {
            "apiVersion": "v1",
            "kind": "PersistentVolume",
            "metadata": {"name": pv_name, "labels": {"visionr1.local/pvc": f"{namespace}.{name}"}},
            "spec": {
                "capacity": {"storage": size},
                "accessModes": ["ReadWriteOnce", "ReadWriteMany"],
                "persistentVolumeReclaimPolicy": "Retain",
                "storageClassName": STORAGE_CLASS,
                "hostPath": {"path": str(folder), "type": "Directory"},
                "claimRef": {"namespace": namespace, "name": name},
                "nodeAffinity": {
                    "required": {
                        "nodeSelectorTerms": [
                            {
                                "matchExpressions": [
                                    {
                                        "key": "kubernetes.io/hostname",
                                        "operator": "In",
                                        "values": nodes or [self.node_name],
                                    }
                                ]
                            }
                        ]
                    }
                },
            },
        }
        pvc = {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {
                "accessModes": ["ReadWriteMany"],
                "storageClassName": STORAGE_CLASS,
                "volumeName": pv_name,
                "resources": {"requests": {"storage": size}},
            },
        }
        self.kubectl("apply", "-f", "-", input=yaml.safe_dump_all([pv, pvc]))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            phase = self.kubectl(
                "get", "pvc", name, "-n", namespace, "-o", "jsonpath={.status.phase}"
            ).stdout
            if phase == "Bound":
                return folder
            time.sleep(0.5)
        raise TimeoutError(f"PVC {namespace}/{name} not Bound to {pv_name} within 60 s")

    # -- identities --
    def token_kubeconfig(self, namespace: str, serviceaccount: str, *, seconds: int = 3600) -> Path:
        """A kubeconfig that authenticates as ``system:serviceaccount:<namespace>:<serviceaccount>``
        with a TokenRequest token (no admin rights: the API server applies that account's RBAC)."""
        token = self.kubectl(
            "create", "token", serviceaccount, "-n", namespace, f"--duration={seconds}s"
        ).stdout.strip()
        ca = base64.b64encode(self.layout.pki.joinpath("ca.crt").read_bytes()).decode()
        user = f"{namespace}-{serviceaccount}"
        doc = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "local",
                    "cluster": {"server": self.server, "certificate-authority-data": ca},
                }
            ],
            "users": [{"name": user, "user": {"token": token}}],
            "contexts": [
                {
                    "name": user,
                    "context": {"cluster": "local", "user": user, "namespace": namespace},
                }
            ],
            "current-context": user,
        }
        self.layout.tokens.mkdir(parents=True, exist_ok=True)
        path = self.layout.tokens / f"{user}.kubeconfig"
        path.write_text(yaml.safe_dump(doc))
        path.chmod(0o600)
        return path


def unavailable_reason(layout: Layout) -> str | None:
    """Why the control plane cannot run here, in one line, or None."""
    if os.geteuid() != 0:
        return (
            "they run a real kubelet and containerd, which need root: run `make test` or "
            "`make e2e` as root (a VM or a disposable machine)"
        )
    if build.is_built(layout):
        return None
    if shutil.which("go") is None:
        return (
            f"they need Go >= {layout.versions.go.minimum} once, to build the control plane (go "
            "is not on PATH): install Go (https://go.dev/dl) and rerun `make test` or `make e2e`"
        )
    return None


@contextlib.contextmanager
def session_control_plane(
    repo: Path, echo: build.Echo = lambda line: print(line, flush=True)
) -> Iterator[ControlPlane]:
    """A running control plane for the duration of the ``with`` block (see the module doc);
    ``echo`` gets its progress lines (what is built, and how long it took)."""
    layout = Layout.for_repo(repo)
    if reason := unavailable_reason(layout):
        raise Unavailable(reason)
    running = cluster.running(layout)
    if running is not None:
        yield ControlPlane(layout=layout, state=running, owned=False)
        return
    before = host_footprint()
    state = cluster.up(layout, echo=echo)
    try:
        yield ControlPlane(layout=layout, state=state, owned=True)
    finally:
        cluster.down(layout, echo=lambda line: None)
        if left := footprint_diff(before, host_footprint()):
            raise AssertionError(f"cluster down left this behind on the host: {left}")


def host_footprint() -> dict[str, list[str]]:
    """What the host shows of a local cluster: network namespaces, links, routes, iptables and
    nftables rules (host namespace), mounts and cgroups under the node's paths, and processes
    running a binary of the cache. ``up`` adds to it; ``down`` must bring it back."""
    paths = node.NodePaths.default()

    def out(*argv: str) -> list[str]:
        proc = subprocess.run(list(argv), capture_output=True, text=True)
        return [ln for ln in proc.stdout.splitlines() if ln.strip() and not ln.startswith("#")]

    procs = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            with contextlib.suppress(OSError):
                exe = os.readlink(p / "exe")
                if "/.cache/visionr1/control-plane/" in exe:
                    procs.append(exe)
    cgroups = [
        str(d)
        for d in [
            *(h / node.CGROUP_ROOT for h in node.v1_hierarchies()),
            node.CGROUP_V2 / node.CGROUP_ROOT,
        ]
        if d.exists()
    ]
    iptables = [
        ln
        for ln in out("iptables-save") + out("ip6tables-save")
        if not ln.startswith(":") or "KUBE" in ln or "CNI" in ln
    ]
    return {
        "netns": out("ip", "netns", "list"),
        "links": [ln.split()[0] for ln in out("ip", "-br", "link")],
        "routes": out("ip", "route"),
        "iptables": [
            ln for ln in iptables if not ln.startswith("COMMIT") and not ln.startswith("*")
        ],
        "nftables": out("nft", "list", "ruleset") if shutil.which("nft") else [],
        "mounts": node.mounts_under(paths.run, paths.kubelet_root, paths.containerd_root),
        "cgroups": cgroups,
        "processes": sorted(procs),
        "folders": [str(d) for d in node.FIXED_DIRS if d.exists()],
    }


def footprint_diff(
    before: dict[str, list[str]], after: dict[str, list[str]]
) -> dict[str, list[str]]:
    """What ``after`` has that ``before`` did not, per kind."""
    return {
        k: sorted(set(after[k]) - set(before.get(k, [])))
        for k in after
        if set(after[k]) - set(before.get(k, []))
    }
