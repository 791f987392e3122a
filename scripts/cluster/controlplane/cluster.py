"""Start, stop and inspect the local cluster: the control plane here, the node in node.py.

``up`` makes the node's network namespace, starts etcd, kube-apiserver, kube-controller-manager
and kube-scheduler, then the node (registry, containerd, kubelet, kube-proxy, CoreDNS,
local-path-provisioner), each in its own process group with its log under
``.visionr1/cluster/logs/``, and records their pids in ``.visionr1/cluster/state.json``. ``down``
removes every pod through the CRI, ends those process groups and removes every mount, cgroup,
network namespace and link ``up`` made; it says ``nothing running`` when there is nothing. A second ``up`` while one runs
starts nothing. Every failure is a :class:`build.ClusterError` whose text is the one line to print.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import yaml
from pydantic import BaseModel

from controlplane import build, node, pki
from controlplane.build import ClusterError, Echo
from controlplane.config import Layout

CONTROL_PLANE = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler")
NODE = ("registry", "containerd", "kubelet", "kube-proxy", "coredns", "local-path-provisioner")
# Start order; down goes the other way (the kubelet before containerd, so no pod restarts).
COMPONENTS = (*CONTROL_PLANE, *NODE, "kwok")
PORTS = {
    # name → (environment variable that fixes it, what uses it); 0 or unset picks a free port
    "etcd": ("VISIONR1_CLUSTER_ETCD_PORT", "etcd client"),
    "etcd-peer": ("VISIONR1_CLUSTER_ETCD_PEER_PORT", "etcd peer"),
    "apiserver": ("VISIONR1_CLUSTER_APISERVER_PORT", "kube-apiserver"),
    "controller-manager": ("VISIONR1_CLUSTER_CONTROLLER_MANAGER_PORT", "kube-controller-manager"),
    "scheduler": ("VISIONR1_CLUSTER_SCHEDULER_PORT", "kube-scheduler"),
    "kwok": ("VISIONR1_CLUSTER_KWOK_PORT", "kwok"),
}
# Fake GPU nodes KWOK manages when it is built (the load benchmark): their pods only pretend,
# Job pods complete at once. Tainted, so only pods that tolerate it land there.
KWOK_NODES = tuple(f"kwok-gpu-{i}" for i in range(4))
KWOK_LABEL = ("type", "kwok")
KWOK_TAINT = {"key": "kwok.x-k8s.io/node", "value": "fake", "effect": "NoSchedule"}
# The admission plugins a kubeadm cluster runs: the API server's defaults (named here so the
# list is visible) plus NodeRestriction, which limits the node runner to its own node and pods.
ADMISSION = (
    "NamespaceLifecycle,LimitRanger,ServiceAccount,TaintNodesByCondition,PodSecurity,Priority,"
    "DefaultTolerationSeconds,DefaultStorageClass,StorageObjectInUseProtection,"
    "PersistentVolumeClaimResize,RuntimeClass,CertificateApproval,CertificateSigning,"
    "ClusterTrustBundleAttest,CertificateSubjectRestriction,DefaultIngressClass,"
    "MutatingAdmissionWebhook,ValidatingAdmissionPolicy,ValidatingAdmissionWebhook,"
    "ResourceQuota,NodeRestriction"
)
# The controller manager's and scheduler's own client rate limits (20 and 50 requests/s by
# default, per controller) made the Job controller the bottleneck of the load benchmark: 5,000
# Jobs of 1,000 runs took 25 minutes whatever the operator did. Lifted as kwokctl lifts them
# for scale tests; the API server's own fairness (APF) still applies.
UNTHROTTLED = ("--kube-api-qps=1000", "--kube-api-burst=2000")
SERVICE_RANGE = "10.96.0.0/16"
ISSUER = "https://kubernetes.default.svc.cluster.local"
# Pre-bound folders for tests that fill a volume before any pod runs (handle.make_pvc); the
# default StorageClass is local-path-provisioner's (node.LOCAL_PATH_CLASS).
STORAGE_CLASS = "visionr1-local"


class State(BaseModel):
    """What ``up`` started (``.visionr1/cluster/state.json``)."""

    server: str
    ports: dict[str, int]
    pids: dict[str, int]
    versions_hash: str
    started_at: float
    start_seconds: float = 0.0
    kwok_nodes: list[str] = []


# -- processes ----------------------------------------------------------------------------------


def alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    with contextlib.suppress(ChildProcessError):
        if os.waitpid(pid, os.WNOHANG)[0] == pid:  # our own child that ended: reap it
            return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _ours(layout: Layout, name: str, pid: int) -> bool:
    """The pid still is the process we started (pids are reused)."""
    return str(layout.binary(name)) in _cmdline(pid)


def _stop_group(pid: int, grace: float) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and alive(pid):
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and alive(pid):
        time.sleep(0.05)


def _spawn(layout: Layout, name: str, argv: list[str], env: dict[str, str] | None = None) -> int:
    layout.logs.mkdir(parents=True, exist_ok=True)
    with (layout.logs / f"{name}.log").open("ab") as log:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=layout.repo,
            env=env,
            start_new_session=True,  # its own process group: down ends it and its children
        )
    return proc.pid


def _last_log_line(layout: Layout, name: str) -> str:
    path = layout.logs / f"{name}.log"
    lines = (
        [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
        if path.exists()
        else []
    )
    return lines[-1][:300] if lines else "(no output)"


# -- ports --------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_taken(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def pick_ports(env: dict[str, str] | None = None) -> dict[str, int]:
    env = os.environ if env is None else env
    ports: dict[str, int] = {}
    for name, (var, user) in PORTS.items():
        raw = env.get(var, "0").strip() or "0"
        if not raw.isdigit() or int(raw) > 65535:
            raise ClusterError(f"{var}={raw!r} is not a port number (0 picks a free one)")
        port = int(raw)
        if port and _port_taken(port):
            raise ClusterError(
                f"port {port} for {user} is taken ({var}): stop what listens there or unset {var} "
                "to pick a free port"
            )
        ports[name] = port or _free_port()
    return ports


# -- health -------------------------------------------------------------------------------------


def _tls(layout: Layout, *, verify: bool = True) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(layout.pki / "ca.crt"))
    if not verify:  # the controller manager and scheduler serve a self-signed certificate
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    ctx.load_cert_chain(layout.pki / "admin.crt", layout.pki / "admin.key")
    return ctx


def _get(url: str, ctx: ssl.SSLContext | None, timeout: float = 3) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, context=ctx, timeout=timeout) as resp:
            return resp.status, resp.read().decode(errors="replace")
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode(errors="replace")
    except (urllib.error.URLError, OSError) as err:
        return 0, str(err)


def health(layout: Layout, state: State) -> dict[str, str]:
    """Component → "ok" or what is wrong (one short phrase)."""
    p = state.ports
    checks: dict[str, tuple[str, ssl.SSLContext | None]] = {
        "etcd": (f"http://127.0.0.1:{p['etcd']}/health", None),
        "kube-apiserver": (f"{state.server}/readyz", _tls(layout)),
        "kube-controller-manager": (
            f"https://127.0.0.1:{p['controller-manager']}/healthz",
            _tls(layout, verify=False),
        ),
        "kube-scheduler": (
            f"https://127.0.0.1:{p['scheduler']}/healthz",
            _tls(layout, verify=False),
        ),
    }
    out: dict[str, str] = {}
    for name, (url, ctx) in checks.items():
        if not alive(state.pids.get(name, -1)):
            out[name] = "not running"
            continue
        code, body = _get(url, ctx)
        ok = code == 200 and ("true" in body if name == "etcd" else True)
        out[name] = "ok" if ok else f"unhealthy ({code or body[:80]})"
    for name in NODE:
        if not alive(state.pids.get(name, -1)):
            out[name] = "not running"
        elif name == "kubelet":
            out[name] = node_condition(layout, state)
        else:
            out[name] = "ok"
    if "kwok" in state.pids:
        out["kwok"] = "ok" if alive(state.pids["kwok"]) else "not running"
    return out


def node_condition(layout: Layout, state: State) -> str:
    name = layout.versions.node.name
    code, body = _get(f"{state.server}/api/v1/nodes/{name}", _tls(layout))
    if code != 200:
        return f"node {name} not registered ({code})"
    node = json.loads(body)
    ready = next((c for c in node["status"].get("conditions", []) if c["type"] == "Ready"), None)
    taints = [
        t["key"]
        for t in node["spec"].get("taints", [])
        if t["key"].startswith("node.kubernetes.io/")
    ]
    if not ready or ready["status"] != "True":
        return f"node {name} not Ready"
    if taints:
        return f"node {name} Ready, still tainted {','.join(taints)}"
    return "ok"


def _wait(
    what: str, check: Callable[[], bool], timeout: float, layout: Layout, pid_of: dict[str, int]
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for name, pid in pid_of.items():
            if not alive(pid):
                raise ClusterError(
                    f"{name} exited while starting: {_last_log_line(layout, name)} (log: {layout.logs / (name + '.log')})"
                )
        if check():
            return
        time.sleep(0.2)
    raise ClusterError(f"{what} not ready within {timeout:.0f} s (logs: {layout.logs})")


# -- state --------------------------------------------------------------------------------------


def _load_state(layout: Layout) -> State | None:
    try:
        return State.model_validate_json(layout.state_file.read_text())
    except (OSError, ValueError):
        return None


def running(layout: Layout) -> State | None:
    """The recorded control plane, when its API server process is still ours and alive."""
    state = _load_state(layout)
    if state is None:
        return None
    pid = state.pids.get("kube-apiserver", -1)
    return state if alive(pid) and _ours(layout, "kube-apiserver", pid) else None


@contextlib.contextmanager
def _locked(layout: Layout) -> Iterator[None]:
    layout.state.mkdir(parents=True, exist_ok=True)
    with (layout.state / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


# -- kubeconfigs --------------------------------------------------------------------------------


def _kubeconfig(layout: Layout, server: str, stem: str, user: str) -> dict:
    def b64(path: Path) -> str:
        return base64.b64encode(path.read_bytes()).decode()

    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "visionr1-local",
                "cluster": {
                    "server": server,
                    "certificate-authority-data": b64(layout.pki / "ca.crt"),
                },
            }
        ],
        "users": [
            {
                "name": user,
                "user": {
                    "client-certificate-data": b64(layout.pki / f"{stem}.crt"),
                    "client-key-data": b64(layout.pki / f"{stem}.key"),
                },
            }
        ],
        "contexts": [
            {"name": "visionr1-local", "context": {"cluster": "visionr1-local", "user": user}}
        ],
        "current-context": "visionr1-local",
    }


def _write_kubeconfigs(layout: Layout, server: str) -> dict[str, Path]:
    paths = {
        "admin": layout.kubeconfig,
        "controller-manager": layout.state / "controller-manager.kubeconfig",
        "scheduler": layout.state / "scheduler.kubeconfig",
        "node": layout.state / "node.kubeconfig",
        "kube-proxy": layout.state / "kube-proxy.kubeconfig",
    }
    for stem, path in paths.items():
        path.write_text(yaml.safe_dump(_kubeconfig(layout, server, stem, stem)))
        path.chmod(0o600)
    return paths


# -- up / down / status -------------------------------------------------------------------------


def _argv(
    layout: Layout, ports: dict[str, int], kubeconfigs: dict[str, Path]
) -> dict[str, list[str]]:
    pk = layout.pki
    etcd_url = f"http://127.0.0.1:{ports['etcd']}"
    peer_url = f"http://127.0.0.1:{ports['etcd-peer']}"
    cm, sch = str(kubeconfigs["controller-manager"]), str(kubeconfigs["scheduler"])
    return {
        # etcd listens on loopback only, in plain HTTP: only the API server talks to it.
        "etcd": [
            str(layout.binary("etcd")),
            "--name=visionr1",
            f"--data-dir={layout.etcd_data}",
            f"--listen-client-urls={etcd_url}",
            f"--advertise-client-urls={etcd_url}",
            f"--listen-peer-urls={peer_url}",
            f"--initial-advertise-peer-urls={peer_url}",
            f"--initial-cluster=visionr1={peer_url}",
            "--log-level=warn",
        ],
        "kube-apiserver": [
            str(layout.binary("kube-apiserver")),
            f"--etcd-servers={etcd_url}",
            # The host's end of the node link: pods reach it through the `kubernetes` Service.
            f"--bind-address={node.HOST_IP}",
            f"--advertise-address={node.HOST_IP}",
            f"--secure-port={ports['apiserver']}",
            # What the API server shows the kubelet for logs, exec and port-forward.
            f"--kubelet-client-certificate={pk / 'admin.crt'}",
            f"--kubelet-client-key={pk / 'admin.key'}",
            "--kubelet-preferred-address-types=InternalIP",
            f"--tls-cert-file={pk / 'apiserver.crt'}",
            f"--tls-private-key-file={pk / 'apiserver.key'}",
            f"--client-ca-file={pk / 'ca.crt'}",
            f"--service-account-issuer={ISSUER}",
            f"--api-audiences={ISSUER}",
            f"--service-account-key-file={pk / 'sa.pub'}",
            f"--service-account-signing-key-file={pk / 'sa.key'}",
            f"--service-cluster-ip-range={SERVICE_RANGE}",
            "--authorization-mode=Node,RBAC",
            f"--enable-admission-plugins={ADMISSION}",
            "--allow-privileged=true",
            "--profiling=false",
            f"--cert-dir={layout.state / 'apiserver'}",
        ],
        "kube-controller-manager": [
            str(layout.binary("kube-controller-manager")),
            f"--kubeconfig={cm}",
            f"--authentication-kubeconfig={cm}",
            f"--authorization-kubeconfig={cm}",
            "--bind-address=127.0.0.1",
            f"--secure-port={ports['controller-manager']}",
            f"--cert-dir={layout.state / 'controller-manager'}",
            "--leader-elect=false",
            "--use-service-account-credentials=true",
            f"--service-account-private-key-file={pk / 'sa.key'}",
            f"--root-ca-file={pk / 'ca.crt'}",
            f"--cluster-signing-cert-file={pk / 'ca.crt'}",
            f"--cluster-signing-key-file={pk / 'ca.key'}",
            "--cluster-name=visionr1-local",
            # Every default controller: job, garbage collector, namespace, serviceaccount(-token),
            # ttl-after-finished, persistentvolume-binder, node lifecycle, ...
            "--controllers=*",
            "--profiling=false",
            *UNTHROTTLED,
        ],
        "kube-scheduler": [
            str(layout.binary("kube-scheduler")),
            f"--kubeconfig={sch}",
            f"--authentication-kubeconfig={sch}",
            f"--authorization-kubeconfig={sch}",
            "--bind-address=127.0.0.1",
            f"--secure-port={ports['scheduler']}",
            f"--cert-dir={layout.state / 'scheduler'}",
            "--leader-elect=false",
            "--profiling=false",
            *UNTHROTTLED,
        ],
    }


def _bootstrap_objects(layout: Layout, paths: node.NodePaths) -> None:
    storage_class = {
        "apiVersion": "storage.k8s.io/v1",
        "kind": "StorageClass",
        "metadata": {"name": STORAGE_CLASS},
        # Folders under .visionr1/cluster/pv/, made by hand (handle.make_pvc): no provisioner.
        "provisioner": "kubernetes.io/no-provisioner",
        "volumeBindingMode": "WaitForFirstConsumer",
        "reclaimPolicy": "Retain",
    }
    docs = [storage_class, *node.local_path_objects(paths)]
    kubectl(layout, "apply", "-f", "-", input=yaml.safe_dump_all(docs))


def kubectl(layout: Layout, *args: str, input: str | None = None) -> str:
    proc = subprocess.run(
        [str(layout.binary("kubectl")), f"--kubeconfig={layout.kubeconfig}", *args],
        input=input,
        capture_output=True,
        text=True,
        timeout=60,
    )
    if proc.returncode != 0:
        raise ClusterError(f"kubectl {' '.join(args[:3])} failed: {proc.stderr.strip()}")
    return proc.stdout


def _kwok_argv(layout: Layout, ports: dict[str, int], stages: Path) -> list[str]:
    return [
        str(layout.binary("kwok")),
        f"--kubeconfig={layout.kubeconfig}",
        f"--config={stages}",
        f"--manage-nodes-with-label-selector={KWOK_LABEL[0]}={KWOK_LABEL[1]}",
        "--node-lease-duration-seconds=40",
        f"--server-address=127.0.0.1:{ports['kwok']}",
        f"--node-port={ports['kwok']}",
        "--node-ip=127.0.0.1",
    ]


def _kwok_nodes(layout: Layout) -> None:
    node = layout.versions.node
    docs = []
    for name in KWOK_NODES:
        allocatable = {
            "cpu": "256",
            "memory": "2Ti",
            "pods": "500",
            "nvidia.com/gpu": str(node.gpus),
        }
        docs.append(
            {
                "apiVersion": "v1",
                "kind": "Node",
                "metadata": {
                    "name": name,
                    "annotations": {
                        "kwok.x-k8s.io/node": "fake",
                        "node.alpha.kubernetes.io/ttl": "0",
                    },
                    "labels": {
                        KWOK_LABEL[0]: KWOK_LABEL[1],
                        "kubernetes.io/hostname": name,
                        "kubernetes.io/os": "linux",
                        "kubernetes.io/arch": "amd64",
                        "nvidia.com/gpu.product": node.gpu_product,
                    },
                },
                "spec": {"taints": [KWOK_TAINT]},
                "status": {"allocatable": allocatable, "capacity": allocatable},
            }
        )
    kubectl(layout, "apply", "-f", "-", input=yaml.safe_dump_all(docs))


def _start_kwok(layout: Layout, state: State) -> bool:
    """KWOK and its fake nodes, when KWOK is built; False when it is not."""
    if (stages := build.kwok_stages(layout)) is None:
        return False
    state.pids["kwok"] = _spawn(layout, "kwok", _kwok_argv(layout, state.ports, stages))
    _save(layout, state)
    _kwok_nodes(layout)
    state.kwok_nodes = list(KWOK_NODES)
    _save(layout, state)
    return True


def ensure_kwok(layout: Layout) -> State:
    """The running control plane with KWOK: started now when it was built after ``up`` (the
    load benchmark builds it on demand). Raises ClusterError when nothing runs or KWOK cannot
    be built or started."""
    with _locked(layout):
        state = running(layout)
        if state is None:
            raise ClusterError("nothing running: make cluster-up first")
        if alive(state.pids.get("kwok", -1)) and state.kwok_nodes:
            return state
        if not _start_kwok(layout, state):
            raise ClusterError(
                "KWOK is not built (or its stage files cannot be read from its Go module): "
                "python scripts/cluster/cli.py build --kwok"
            )
        _wait("KWOK's nodes", lambda: _kwok_ready(layout, state), 60, layout, state.pids)
        return state


def _kwok_ready(layout: Layout, state: State) -> bool:
    for name in state.kwok_nodes:
        code, body = _get(f"{state.server}/api/v1/nodes/{name}", _tls(layout))
        conds = json.loads(body)["status"].get("conditions", []) if code == 200 else []
        if not any(c["type"] == "Ready" and c["status"] == "True" for c in conds):
            return False
    return True


def _default_sa_exists(layout: Layout, server: str) -> bool:
    code, _ = _get(f"{server}/api/v1/namespaces/default/serviceaccounts/default", _tls(layout))
    return code == 200


def _check_host() -> None:
    if os.geteuid() != 0:
        raise ClusterError(
            "the local node (kubelet, containerd, its network namespace) needs root: run as root"
        )
    if not node.cgroups_v1() and not Path("/sys/fs/cgroup/cgroup.controllers").exists():
        raise ClusterError("no cgroup hierarchy found under /sys/fs/cgroup")
    for tool in ("ip", "nsenter", "iptables", "buildah", "gcc"):
        if shutil.which(tool) is None:
            raise ClusterError(f"{tool} not found on PATH: the local node needs it (see README)")


def _start_node(layout: Layout, state: State, paths: node.NodePaths, echo: Echo) -> None:
    files = node.write_configs(layout, paths)
    argv = node.argv(layout, paths, files)
    env = node.node_env(layout)

    def start(name: str) -> None:
        state.pids[name] = _spawn(layout, name, argv[name], env=env)
        _save(layout, state)

    start("registry")
    start("containerd")
    _wait(
        "the registry",
        lambda: _get(f"http://{node.REGISTRY}/v2/", None)[0] == 200,
        30,
        layout,
        state.pids,
    )
    node.ensure_node_images(layout, paths, echo)
    _wait("containerd", paths.containerd_sock.exists, 30, layout, state.pids)
    # The socket comes before the CRI answers ("server is not initialized yet"), and a kubelet
    # started in between exits: wait for the runtime API itself.
    _wait("containerd's CRI", lambda: _cri_ready(layout, paths), 60, layout, state.pids)
    for name in ("kubelet", "kube-proxy", "coredns", "local-path-provisioner"):
        start(name)
    _wait("the node", lambda: node_condition(layout, state) == "ok", 120, layout, state.pids)
    node.patch_gpus(layout, kubectl)


def _cri_ready(layout: Layout, paths: node.NodePaths) -> bool:
    """Whether containerd's CRI answers its version and status calls (what the kubelet asks
    first)."""
    argv = [str(layout.binary("crictl")), f"--runtime-endpoint=unix://{paths.containerd_sock}"]
    return all(
        subprocess.run([*argv, *call], capture_output=True, timeout=10).returncode == 0
        for call in (["version"], ["info"])
    )


def up(layout: Layout, echo: Echo, *, keep_data: bool = False) -> State:
    """Start the cluster (building it first if the cache lacks it); see the module doc."""
    with _locked(layout):
        if (current := running(layout)) is not None:
            echo(
                f"cluster already running (kube-apiserver pid {current.pids['kube-apiserver']}, {current.server}); nothing started"
            )
            return current
        paths = node.NodePaths.default()
        stale = _load_state(layout)
        if stale is not None:  # a previous set died without down: end whatever is left of it
            _stop_all(layout, stale, echo=lambda line: None)
        begin = time.monotonic()
        times = build.ensure_built(layout, echo)
        if times:
            echo("build times: " + ", ".join(f"{k} {v:.0f} s" for k, v in times.items()))
        build.verify(layout)
        _check_host()
        started = time.monotonic()
        ports = pick_ports()
        held = node.owner(paths)
        if held and held.get("repo") != str(layout.repo) and alive(int(held.get("pid", -1))):
            raise ClusterError(
                f"the machine's one local node is held by the cluster of {held['repo']}: run "
                "`make cluster-down` there first"
            )
        _node_cleanup(layout, paths)  # whatever a crashed earlier node left
        pki.ensure(layout.pki, layout.versions.node.name, node.HOST_IP, node.NODE_IP)
        node.network_up()
        node.cgroups_up()
        server = f"https://{node.HOST_IP}:{ports['apiserver']}"
        kubeconfigs = _write_kubeconfigs(layout, server)
        if not keep_data:  # a fresh cluster every up: nothing left over from an earlier session
            shutil.rmtree(layout.etcd_data, ignore_errors=True)
        for sub in ("apiserver", "controller-manager", "scheduler"):
            (layout.state / sub).mkdir(parents=True, exist_ok=True)
        argv = _argv(layout, ports, kubeconfigs)
        state = State(
            server=server,
            ports=ports,
            pids={},
            versions_hash=layout.versions_hash,
            started_at=time.time(),
        )
        try:
            state.pids["etcd"] = _spawn(layout, "etcd", argv["etcd"])
            _save(layout, state)
            _wait(
                "etcd",
                lambda: "true" in _get(f"http://127.0.0.1:{ports['etcd']}/health", None)[1],
                60,
                layout,
                state.pids,
            )
            state.pids["kube-apiserver"] = _spawn(layout, "kube-apiserver", argv["kube-apiserver"])
            _save(layout, state)
            node.claim(paths, layout.repo, state.pids["kube-apiserver"])
            ctx = _tls(layout)
            _wait(
                "kube-apiserver",
                lambda: _get(f"{server}/readyz", ctx)[0] == 200,
                120,
                layout,
                state.pids,
            )
            for name in ("kube-controller-manager", "kube-scheduler"):
                state.pids[name] = _spawn(layout, name, argv[name])
            _save(layout, state)
            _bootstrap_objects(layout, paths)
            _start_node(layout, state, paths, echo)
            _wait(
                "the default ServiceAccount",
                lambda: _default_sa_exists(layout, server),
                60,
                layout,
                state.pids,
            )
            _start_kwok(layout, state)
            for name, status in health(layout, state).items():
                if status != "ok":
                    raise ClusterError(f"{name}: {status} (log: {layout.logs / (name + '.log')})")
        except BaseException:
            _stop_all(layout, state, echo=lambda line: None)
            raise
        state.start_seconds = round(time.monotonic() - started, 1)
        _save(layout, state)
        echo(
            f"cluster up in {state.start_seconds:.1f} s"
            + (f" ({time.monotonic() - begin:.0f} s with the build)" if times else "")
            + f": {server}, kubeconfig {layout.kubeconfig.relative_to(layout.repo)}, "
            f"node {layout.versions.node.name} ({node.NODE_IP}), registry {node.REGISTRY}, "
            f"logs {layout.logs.relative_to(layout.repo)}/"
        )
        return state


def _save(layout: Layout, state: State) -> None:
    layout.state.mkdir(parents=True, exist_ok=True)
    tmp = layout.state_file.with_suffix(".tmp")
    tmp.write_text(state.model_dump_json(indent=2))
    tmp.replace(layout.state_file)


def _node_cleanup(layout: Layout, paths: node.NodePaths) -> list[str]:
    """Everything of the node that is not a recorded process: pods (through the CRI, while
    containerd runs), shims, mounts, cgroups, the network namespace and link."""
    done = []
    for pid in node.shim_pids(paths):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
            done.append(f"shim {pid}")
    done += node.unmount_under(paths.run, paths.kubelet_root, paths.containerd_root)
    done += node.cgroups_down()
    done += node.network_down()
    shutil.rmtree(paths.run, ignore_errors=True)
    if removed := node.fixed_dirs_down(paths):
        done.append(f"{len(removed)} empty folders")
    return done


def _stop_all(layout: Layout, state: State, echo: Echo) -> list[str]:
    stopped = []
    paths = node.NodePaths.default()
    for name in reversed(COMPONENTS):
        pid = state.pids.get(name)
        if name == "containerd" and pid and alive(pid):
            if n := node.remove_pods(layout, paths):
                stopped.append(f"{n} pods")
        if pid and alive(pid) and _ours(layout, name, pid):
            _stop_group(pid, grace=10)
            stopped.append(f"{name} ({pid})")
    held = node.owner(paths)
    if not held or held.get("repo") == str(layout.repo) or not alive(int(held.get("pid", -1))):
        stopped += _node_cleanup(layout, paths)  # never another checkout's running node
    layout.state_file.unlink(missing_ok=True)
    return stopped


def down(layout: Layout, echo: Echo) -> list[str]:
    """Stop everything ``up`` started; say ``nothing running`` when there is nothing."""
    with _locked(layout):
        state = _load_state(layout)
        stopped = _stop_all(layout, state, echo) if state else []
    echo(f"stopped {', '.join(stopped)}" if stopped else "nothing running")
    return stopped


def status(layout: Layout, echo: Echo) -> int:
    """Print what runs and its health; 1 when something that should run is unhealthy."""
    state = _load_state(layout)
    if state is None or not any(alive(p) for p in state.pids.values()):
        echo("nothing running (make cluster-up starts it)")
        return 0
    checks = health(layout, state)
    for name in COMPONENTS:
        pid = state.pids.get(name)
        echo(f"{name:<24} pid {pid if pid else '-':<8} {checks.get(name, 'not started')}")
    echo(
        f"server {state.server}; kubeconfig {layout.kubeconfig}; started in {state.start_seconds} s"
    )
    kwok = layout.binary("kwok")
    echo(f"binaries {layout.bin_dir}" + ("" if kwok.exists() else " (KWOK not built)"))
    return 0 if all(v == "ok" for v in checks.values()) else 1
