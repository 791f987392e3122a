"""The local node: kubelet, containerd with runc, the CNI bridge, kube-proxy and CoreDNS in a
network namespace of their own, the image registry the node pulls from, and
local-path-provisioner for PersistentVolumeClaims.

Networking stays inside what ``up`` creates. One network namespace (``visionr1``) holds the node;
one veth pair joins it to the host: the host's end carries the API server's address, the node's
end the node's address (the kubelet's node IP, the registry, cluster DNS). Pods sit on a bridge
inside the node's namespace, with Services (kube-proxy's iptables rules) there too. The node's
namespace has no default route, so nothing a pod sends can leave the machine, and every iptables
rule the kubelet, kube-proxy and the CNI plugins write lives in that namespace and goes with it.

The node shares the host's mount namespace (``nsenter --net``, not ``ip netns exec``, which would
give the kubelet a private one and hide its tmpfs and bind mounts from containerd).

Where things live: the node's data (containerd's images, the kubelet's root, the registry's
blobs, the PersistentVolumes' folders) under ``~/.cache/visionr1/node/`` so pulled and unpacked
images survive ``down``; sockets and container state under ``/run/visionr1/``. ``down`` removes
every pod through the CRI, then every process, mount, cgroup, netns and link ``up`` made.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import yaml

from controlplane.build import ClusterError, Echo, go_env
from controlplane.config import Layout, cache_root

NETNS = "visionr1"
HOST_LINK, NODE_LINK = "vr1-host", "vr1-node"
HOST_IP, NODE_IP, LINK_PREFIX = "10.213.0.1", "10.213.0.2", 30
POD_CIDR = "10.244.0.0/24"
BRIDGE = "vr1-br0"
REGISTRY_PORT = 5000
REGISTRY = f"{NODE_IP}:{REGISTRY_PORT}"
PAUSE_IMAGE = f"{REGISTRY}/visionr1/pause:3.10"
HELPER_IMAGE = f"{REGISTRY}/visionr1/volume-helper:1"
RUN_DIR = Path("/run/visionr1")
CGROUP_ROOT = "visionr1"
CGROUP_V1 = Path("/sys/fs/cgroup")
CGROUP_V2 = Path("/sys/fs/cgroup/unified")
LOCAL_PATH_NS = "local-path-storage"
LOCAL_PATH_CLASS = "local-path"
GPU_RESOURCE = "nvidia.com/gpu"


def data_root() -> Path:
    return cache_root().parent / "node"


@dataclass(frozen=True)
class NodePaths:
    data: Path
    run: Path

    @classmethod
    def default(cls) -> NodePaths:
        return cls(data=data_root(), run=RUN_DIR)

    @property
    def containerd_root(self) -> Path:
        return self.data / "containerd"

    @property
    def kubelet_root(self) -> Path:
        return self.data / "kubelet"

    @property
    def registry_root(self) -> Path:
        return self.data / "registry"

    @property
    def storage(self) -> Path:
        """local-path-provisioner's folder: one sub-folder per PersistentVolume."""
        return self.data / "storage"

    @property
    def images(self) -> Path:
        """The node's own small images (pause, volume helper), built once."""
        return self.data / "images"

    @property
    def pod_logs(self) -> Path:
        return self.data / "pod-logs"

    @property
    def containerd_state(self) -> Path:
        return self.run / "containerd"

    @property
    def containerd_sock(self) -> Path:
        return self.run / "containerd.sock"

    @property
    def config(self) -> Path:
        return self.run / "config"

    @property
    def cni_conf(self) -> Path:
        return self.run / "cni" / "net.d"

    @property
    def cni_data(self) -> Path:
        return self.run / "cni" / "networks"

    @property
    def certs_d(self) -> Path:
        return self.run / "certs.d"


def owner(paths: NodePaths) -> dict | None:
    """Which checkout's cluster holds the node (``{"repo": ..., "pid": <kube-apiserver>}``)."""
    try:
        return json.loads((paths.run / "owner.json").read_text())
    except (OSError, ValueError):
        return None


def claim(paths: NodePaths, repo: Path, apiserver_pid: int) -> None:
    paths.run.mkdir(parents=True, exist_ok=True)
    tmp = paths.run / ".owner.tmp"
    tmp.write_text(json.dumps({"repo": str(repo), "pid": apiserver_pid}))
    tmp.replace(paths.run / "owner.json")


def sh(*argv: str, check: bool = True, input: str | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(argv), capture_output=True, text=True, input=input, timeout=120)
    if check and proc.returncode != 0:
        raise ClusterError(f"{' '.join(argv[:6])} failed: {proc.stderr.strip() or proc.stdout}")
    return proc


def in_node(*argv: str) -> list[str]:
    """``argv`` run inside the node's network namespace (and the host's mount namespace)."""
    return ["nsenter", f"--net=/run/netns/{NETNS}", "--", *argv]


# -- network ------------------------------------------------------------------------------------


def netns_exists() -> bool:
    return Path(f"/run/netns/{NETNS}").exists()


def network_up() -> None:
    """The node's namespace and the veth pair to the host; forwarding and bridge filtering on
    inside the namespace only (they are per-namespace settings)."""
    if shutil.which("ip") is None or shutil.which("nsenter") is None:
        raise ClusterError("the node needs iproute2 (ip) and util-linux (nsenter)")
    network_down()
    sh("ip", "netns", "add", NETNS)
    sh("ip", "link", "add", HOST_LINK, "type", "veth", "peer", "name", NODE_LINK)
    sh("ip", "link", "set", NODE_LINK, "netns", NETNS)
    sh("ip", "addr", "add", f"{HOST_IP}/{LINK_PREFIX}", "dev", HOST_LINK)
    sh("ip", "link", "set", HOST_LINK, "up")
    n = ["ip", "-n", NETNS]
    sh(*n, "link", "set", "lo", "up")
    sh(*n, "addr", "add", f"{NODE_IP}/{LINK_PREFIX}", "dev", NODE_LINK)
    sh(*n, "link", "set", NODE_LINK, "up")
    for key, value in (
        ("net.ipv4.ip_forward", "1"),
        ("net.bridge.bridge-nf-call-iptables", "1"),
        ("net.bridge.bridge-nf-call-ip6tables", "1"),
    ):
        sh(*in_node("sysctl", "-q", "-w", f"{key}={value}"))


def network_down() -> list[str]:
    removed = []
    if netns_exists():
        sh("ip", "netns", "del", NETNS, check=False)  # its links, bridge and rules go with it
        removed.append(f"netns {NETNS}")
    if Path(f"/sys/class/net/{HOST_LINK}").exists():
        sh("ip", "link", "del", HOST_LINK, check=False)
        removed.append(f"link {HOST_LINK}")
    return removed


# -- cgroups ------------------------------------------------------------------------------------


def v1_hierarchies() -> list[Path]:
    if not CGROUP_V1.is_dir():
        return []
    return [
        p
        for p in sorted(CGROUP_V1.iterdir())
        if p.is_dir() and p.name != "unified" and not p.is_symlink()
    ]


def cgroups_v1() -> bool:
    return (CGROUP_V1 / "memory").is_dir()


def cgroups_up() -> None:
    """The kubelet's cgroupRoot in every v1 hierarchy (cpuset needs cpus and mems copied down)."""
    for hier in v1_hierarchies():
        path = hier / CGROUP_ROOT
        path.mkdir(exist_ok=True)
        if hier.name == "cpuset":
            for f in ("cpuset.cpus", "cpuset.mems"):
                if not (path / f).read_text().strip():
                    (path / f).write_text((hier / f).read_text())


def _cgroup_dirs() -> list[Path]:
    roots = [h / CGROUP_ROOT for h in v1_hierarchies()] + [CGROUP_V2 / CGROUP_ROOT]
    out = []
    for root in roots:
        if root.is_dir():
            out += [Path(d) for d, _, _ in os.walk(root)]
    return sorted(out, key=lambda p: len(p.parts), reverse=True)  # deepest first


def cgroups_down() -> list[str]:
    """Kill whatever still runs in the node's cgroups, then remove them deepest first."""
    dirs = _cgroup_dirs()
    for d in dirs:
        for pid in _cgroup_pids(d):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    removed = 0
    deadline = time.monotonic() + 10
    for d in dirs:
        while True:
            try:
                d.rmdir()
                removed += 1
                break
            except FileNotFoundError:
                break
            except OSError:
                if time.monotonic() > deadline:
                    break
                for pid in _cgroup_pids(d):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                time.sleep(0.1)
    return [f"{removed} cgroups"] if removed else []


def _cgroup_pids(d: Path) -> list[int]:
    try:
        return [int(x) for x in (d / "cgroup.procs").read_text().split()]
    except (OSError, ValueError):
        return []


# -- mounts -------------------------------------------------------------------------------------


def mounts_under(*roots: Path) -> list[str]:
    prefixes = [str(r.resolve()) if r.exists() else str(r) for r in roots]
    out = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        target = line.split()[4].replace("\\040", " ")
        if any(target == p or target.startswith(p + "/") for p in prefixes):
            out.append(target)
    return out


def unmount_under(*roots: Path) -> list[str]:
    targets = sorted(set(mounts_under(*roots)), key=len, reverse=True)
    for target in targets:
        subprocess.run(["umount", "-l", target], capture_output=True)
    return [f"{len(targets)} mounts"] if targets else []


# Folders the kubelet and containerd use whatever they are configured with (the device-plugin
# socket, the container-log symlinks, the shims' sockets, the netns mount point): removed at
# down when nothing else is in them.
FIXED_DIRS = (
    Path("/var/lib/kubelet/device-plugins"),
    Path("/var/lib/kubelet"),
    Path("/var/log/containers"),
    Path("/var/log/pods"),
    Path("/run/containerd/s"),
    Path("/run/containerd"),
    Path("/run/netns"),
)


def fixed_dirs_down(paths: NodePaths) -> list[str]:
    """Our entries in the fixed folders (the kubelet's socket, log symlinks into our pod logs),
    then each folder if it is empty."""
    removed = []
    Path("/var/lib/kubelet/device-plugins/kubelet.sock").unlink(missing_ok=True)
    logs = Path("/var/log/containers")
    if logs.is_dir():
        for link in logs.iterdir():
            if link.is_symlink() and str(paths.pod_logs) in os.readlink(link):
                link.unlink()
    shutil.rmtree(paths.pod_logs, ignore_errors=True)
    for d in FIXED_DIRS:
        with contextlib.suppress(OSError):
            d.rmdir()  # only when empty: another runtime on the host may use it
            removed.append(str(d))
    return removed


# -- configuration files ------------------------------------------------------------------------


def containerd_config(layout: Layout, paths: NodePaths) -> str:
    runc = layout.binary("runc")
    cni_bin = layout.binary("cni/bridge").parent
    # NRI is off: it would open a socket under /var/run/nri that nothing here uses.
    return f"""version = 3
root = "{paths.containerd_root}"
state = "{paths.containerd_state}"
disabled_plugins = ["io.containerd.nri.v1.nri"]

[grpc]
  address = "{paths.containerd_sock}"

[ttrpc]
  address = "{paths.run / "containerd-ttrpc.sock"}"

[plugins."io.containerd.cri.v1.images"]
  snapshotter = "overlayfs"
  [plugins."io.containerd.cri.v1.images".pinned_images]
    sandbox = "{PAUSE_IMAGE}"
  [plugins."io.containerd.cri.v1.images".registry]
    config_path = "{paths.certs_d}"

[plugins."io.containerd.transfer.v1.local"]
  config_path = "{paths.certs_d}"

[plugins."io.containerd.cri.v1.runtime"]
  enable_selinux = false
  # These machines refuse a negative oom_score_adj; without this every sandbox fails to start.
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  [plugins."io.containerd.cri.v1.runtime".containerd]
    default_runtime_name = "runc"
    [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc.options]
        BinaryName = "{runc}"
        Root = "{paths.run / "runc"}"
        SystemdCgroup = false
  [plugins."io.containerd.cri.v1.runtime".cni]
    bin_dirs = ["{cni_bin}"]
    conf_dir = "{paths.cni_conf}"

[plugins."io.containerd.grpc.v1.cri"]
  stream_server_address = "127.0.0.1"
"""


def cni_config(paths: NodePaths) -> dict:
    return {
        "cniVersion": "1.0.0",
        "name": "visionr1",
        "plugins": [
            {
                "type": "bridge",
                "bridge": BRIDGE,
                "isGateway": True,
                "ipMasq": True,  # pods reach the API server on the host as the node's address
                "hairpinMode": True,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": POD_CIDR}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                    "dataDir": str(paths.cni_data),
                },
            },
            {"type": "portmap", "capabilities": {"portMappings": True}},
        ],
    }


def registry_hosts(paths: NodePaths) -> None:
    """containerd pulls from the local registry over plain HTTP (hosts.toml, as kind documents)."""
    d = paths.certs_d / REGISTRY
    d.mkdir(parents=True, exist_ok=True)
    (d / "hosts.toml").write_text(
        f'server = "http://{REGISTRY}"\n\n[host."http://{REGISTRY}"]\n'
        '  capabilities = ["pull", "resolve"]\n'
    )


def kubelet_config(layout: Layout, paths: NodePaths) -> dict:
    pk = layout.pki
    return {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "address": NODE_IP,
        "port": 10250,
        "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1",
        "healthzPort": 10248,
        "authentication": {
            "anonymous": {"enabled": False},
            "webhook": {"enabled": True},
            "x509": {"clientCAFile": str(pk / "ca.crt")},
        },
        "authorization": {"mode": "Webhook"},
        "tlsCertFile": str(pk / "kubelet.crt"),
        "tlsPrivateKeyFile": str(pk / "kubelet.key"),
        "containerRuntimeEndpoint": f"unix://{paths.containerd_sock}",
        "cgroupDriver": "cgroupfs",
        "cgroupRoot": f"/{CGROUP_ROOT}",
        "cgroupsPerQOS": True,
        # cgroup v1 hosts: kubelet >= 1.35 refuses them unless told (still honoured in 1.37).
        "failCgroupV1": False,
        "failSwapOn": False,
        "clusterDomain": "cluster.local",
        "clusterDNS": [NODE_IP],
        "resolvConf": str(paths.config / "resolv.conf"),
        "podLogsDir": str(paths.pod_logs),
        "staticPodPath": "",
        "serializeImagePulls": False,
        "maxPods": layout.versions.node.pods,
        # A developer's disk is rarely 85% free: evict only when it is really full, and never
        # garbage-collect the images a test is about to run.
        "evictionHard": {
            "memory.available": "100Mi",
            "nodefs.available": "1%",
            "imagefs.available": "1%",
            "nodefs.inodesFree": "1%",
        },
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        "enforceNodeAllocatable": ["pods"],
        "rotateCertificates": False,
        "serverTLSBootstrap": False,
        "nodeStatusReportFrequency": "10s",
        "shutdownGracePeriod": "0s",
    }


def kube_proxy_config(layout: Layout) -> dict:
    return {
        "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
        "kind": "KubeProxyConfiguration",
        "mode": "iptables",
        "clientConnection": {"kubeconfig": str(layout.state / "kube-proxy.kubeconfig")},
        "clusterCIDR": POD_CIDR,
        "hostnameOverride": layout.versions.node.name,
        "bindAddress": NODE_IP,
        "healthzBindAddress": "127.0.0.1:10256",
        "metricsBindAddress": "127.0.0.1:10249",
        # Leave the machine-wide conntrack table size alone.
        "conntrack": {"maxPerCore": 0, "min": 0},
    }


def corefile(layout: Layout) -> str:
    # cluster.local from the API server; every other name is answered NXDOMAIN here, so a pod's
    # lookup never leaves the machine.
    return f"""cluster.local:53 in-addr.arpa:53 ip6.arpa:53 {{
    bind {NODE_IP}
    errors
    kubernetes cluster.local in-addr.arpa ip6.arpa {{
        kubeconfig {layout.kubeconfig}
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
    }}
    cache 5
}}
.:53 {{
    bind {NODE_IP}
    template ANY ANY {{
        rcode NXDOMAIN
    }}
}}
"""


def registry_config(paths: NodePaths) -> dict:
    return {
        "version": 0.1,
        "log": {"level": "warn", "accesslog": {"disabled": True}},
        "storage": {
            "filesystem": {"rootdirectory": str(paths.registry_root)},
            "delete": {"enabled": True},
        },
        "http": {"addr": f"0.0.0.0:{REGISTRY_PORT}"},  # 0.0.0.0 of the node's namespace
    }


def write_configs(layout: Layout, paths: NodePaths) -> dict[str, Path]:
    for d in (
        paths.config,
        paths.cni_conf,
        paths.cni_data,
        paths.containerd_root,
        paths.kubelet_root,
        paths.registry_root,
        paths.storage,
    ):
        d.mkdir(parents=True, exist_ok=True)
    files = {
        "containerd": paths.config / "containerd.toml",
        "kubelet": paths.config / "kubelet.yaml",
        "kube-proxy": paths.config / "kube-proxy.yaml",
        "coredns": paths.config / "Corefile",
        "registry": paths.config / "registry.yaml",
    }
    files["containerd"].write_text(containerd_config(layout, paths))
    (paths.cni_conf / "10-visionr1.conflist").write_text(json.dumps(cni_config(paths), indent=2))
    files["kubelet"].write_text(yaml.safe_dump(kubelet_config(layout, paths)))
    files["kube-proxy"].write_text(yaml.safe_dump(kube_proxy_config(layout)))
    files["coredns"].write_text(corefile(layout))
    files["registry"].write_text(yaml.safe_dump(registry_config(paths)))
    # Pods with dnsPolicy Default: no name server that could send a query off the machine.
    (paths.config / "resolv.conf").write_text(f"nameserver {NODE_IP}\n")
    (paths.config / "local-path.json").write_text(json.dumps(local_path_config(paths)))
    registry_hosts(paths)
    return files


def argv(layout: Layout, paths: NodePaths, files: dict[str, Path]) -> dict[str, list[str]]:
    node = layout.versions.node
    b = layout.binary
    return {
        "registry": in_node(str(b("registry")), "serve", str(files["registry"])),
        "containerd": in_node(str(b("containerd")), "--config", str(files["containerd"])),
        "kubelet": in_node(
            str(b("kubelet")),
            f"--config={files['kubelet']}",
            f"--kubeconfig={layout.state / 'node.kubeconfig'}",
            f"--root-dir={paths.kubelet_root}",
            f"--hostname-override={node.name}",
            f"--node-ip={NODE_IP}",
            f"--node-labels=nvidia.com/gpu.product={node.gpu_product},visionr1.io/local-node=true",
            "--v=1",
        ),
        "kube-proxy": in_node(str(b("kube-proxy")), f"--config={files['kube-proxy']}", "--v=1"),
        "coredns": in_node(str(b("coredns")), "-conf", str(files["coredns"])),
        "local-path-provisioner": [
            str(b("local-path-provisioner")),
            "--debug",
            "start",
            f"--config={paths.config / 'local-path.json'}",
            f"--provisioner-name=rancher.io/{LOCAL_PATH_CLASS}",
            f"--namespace={LOCAL_PATH_NS}",
            f"--helper-image={HELPER_IMAGE}",
            "--service-account-name=local-path-provisioner-service-account",
        ],
    }


def node_env(layout: Layout) -> dict[str, str]:
    """containerd finds its shim on PATH; the rest of the node's tools (iptables, mount) are the
    host's."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(layout.bin_dir), env.get("PATH", "/usr/sbin:/usr/bin")])
    env["KUBECONFIG"] = str(layout.kubeconfig)
    return env


# -- the node's own images (pause, volume helper) -----------------------------------------------


def registry_has(ref: str) -> bool:
    """``ref`` (host:port/repo:tag) is in the local registry."""
    host, rest = ref.split("/", 1)
    repo, tag = rest.rsplit(":", 1)
    req = urllib.request.Request(
        f"http://{host}/v2/{repo}/manifests/{tag}",
        method="HEAD",
        headers={"Accept": "application/vnd.oci.image.manifest.v1+json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _pause_source(layout: Layout) -> Path:
    proc = subprocess.run(
        [
            "go",
            "mod",
            "download",
            "-json",
            f"k8s.io/kubernetes@{layout.versions.kubernetes.version}",
        ],
        capture_output=True,
        text=True,
        env=go_env(),
        cwd=layout.cache,
    )
    if proc.returncode != 0:
        raise ClusterError(f"cannot read the Kubernetes module for pause.c: {proc.stderr.strip()}")
    return Path(json.loads(proc.stdout)["Dir"]) / "build" / "pause" / "linux" / "pause.c"


def _buildah(*args: str) -> str:
    return sh("buildah", *args).stdout.strip()


def _push_scratch_image(ref: str, files: dict[str, Path], config: list[str]) -> None:
    """An image made of ``files`` (path in image → file here) on nothing, pushed to ``ref``."""
    ctr = _buildah("from", "scratch")
    try:
        for dest, src in files.items():
            _buildah("copy", "--chmod", "0755", ctr, str(src), dest)
        _buildah("config", *config, ctr)
        _buildah("commit", "--rm", ctr, ref)
    except BaseException:
        sh("buildah", "rm", ctr, check=False)
        raise
    _buildah("push", "--tls-verify=false", ref, f"docker://{ref}")


def ensure_node_images(layout: Layout, paths: NodePaths, echo: Echo) -> None:
    """The sandbox (pause) image, compiled from the pinned Kubernetes source with gcc, and the
    small image local-path-provisioner's helper pods run (busybox, for mkdir/rm), both pushed to
    the local registry once."""
    if shutil.which("buildah") is None:
        raise ClusterError("the node's images are built with buildah: apt-get install buildah")
    paths.images.mkdir(parents=True, exist_ok=True)
    if not registry_has(PAUSE_IMAGE):
        pause = paths.images / "pause"
        if not pause.exists():
            src = _pause_source(layout)
            sh("gcc", "-Os", "-static", "-o", str(pause), str(src))
            sh("strip", str(pause), check=False)
        _push_scratch_image(
            PAUSE_IMAGE, {"/pause": pause}, ["--entrypoint", '["/pause"]', "--user", "65535:65535"]
        )
        echo(f"pushed {PAUSE_IMAGE}")
    if not registry_has(HELPER_IMAGE):
        busybox = shutil.which("busybox")
        if busybox is None:
            raise ClusterError(
                "the volume helper image needs a static busybox: apt-get install busybox-static"
            )
        # busybox answers to the name it is called by: /bin/sh is the shell local-path's helper
        # pods run their scripts with; the scripts call /bin/busybox for mkdir and rm.
        _push_scratch_image(
            HELPER_IMAGE,
            {"/bin/busybox": Path(busybox), "/bin/sh": Path(busybox)},
            ["--entrypoint", '["/bin/sh"]', "--env", "PATH=/bin"],
        )
        echo(f"pushed {HELPER_IMAGE}")


# -- objects the node needs in the API ----------------------------------------------------------


def local_path_config(paths: NodePaths) -> dict:
    return {
        "nodePathMap": [
            {"node": "DEFAULT_PATH_FOR_NON_LISTED_NODES", "paths": [str(paths.storage)]}
        ]
    }


def local_path_objects(paths: NodePaths) -> list[dict]:
    """local-path-provisioner's namespace, account, rights and configuration, and the default
    StorageClass (the shape kind ships; the helper pod's scripts run under busybox)."""
    ns = LOCAL_PATH_NS
    sa = "local-path-provisioner-service-account"
    config = local_path_config(paths)
    setup = '#!/bin/sh\nset -eu\n/bin/busybox mkdir -m 0777 -p "$VOL_DIR"\n'
    teardown = '#!/bin/sh\nset -eu\n/bin/busybox rm -rf "$VOL_DIR"\n'
    helper = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "helper-pod"},
        "spec": {
            "priorityClassName": "system-node-critical",
            "tolerations": [
                {
                    "key": "node.kubernetes.io/disk-pressure",
                    "operator": "Exists",
                    "effect": "NoSchedule",
                }
            ],
            "containers": [
                {"name": "helper-pod", "image": HELPER_IMAGE, "imagePullPolicy": "IfNotPresent"}
            ],
        },
    }
    return [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}},
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": sa, "namespace": ns}},
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "local-path-config", "namespace": ns},
            "data": {
                "config.json": json.dumps(config),
                "setup": setup,
                "teardown": teardown,
                "helperPod.yaml": yaml.safe_dump(helper),
            },
        },
        {
            "apiVersion": "storage.k8s.io/v1",
            "kind": "StorageClass",
            "metadata": {
                "name": LOCAL_PATH_CLASS,
                "annotations": {"storageclass.kubernetes.io/is-default-class": "true"},
            },
            "provisioner": f"rancher.io/{LOCAL_PATH_CLASS}",
            "volumeBindingMode": "WaitForFirstConsumer",
            "reclaimPolicy": "Delete",
        },
    ]


def patch_gpus(layout: Layout, kubectl) -> None:  # noqa: ANN001 - cluster.kubectl
    """Advertise the GPUs as an extended resource (the documented way: a status patch); none is
    ever assigned, pods that ask for them are scheduled here and run on the CPU."""
    node = layout.versions.node
    patch = json.dumps(
        [
            {
                "op": "add",
                "path": "/status/capacity/nvidia.com~1gpu",
                "value": str(node.gpus),
            }
        ]
    )
    kubectl(layout, "patch", "node", node.name, "--subresource=status", "--type=json", "-p", patch)


# -- stopping -----------------------------------------------------------------------------------


def remove_pods(layout: Layout, paths: NodePaths) -> int:
    """Stop and remove every pod sandbox through the CRI (CNI tears each pod's network down)."""
    if not paths.containerd_sock.exists():
        return 0
    crictl = [
        str(layout.binary("crictl")),
        f"--runtime-endpoint=unix://{paths.containerd_sock}",
        "--timeout=30s",
    ]
    proc = subprocess.run([*crictl, "pods", "-q"], capture_output=True, text=True, timeout=60)
    ids = proc.stdout.split()
    if ids:
        subprocess.run([*crictl, "rmp", "-f", *ids], capture_output=True, text=True, timeout=120)
    return len(ids)


def shim_pids(paths: NodePaths) -> list[int]:
    """containerd's shims for this node (they outlive containerd by design)."""
    out = []
    needle = str(paths.containerd_sock).encode()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if b"containerd-shim-runc-v2" in cmd and needle in cmd:
            out.append(int(proc.name))
    return out
