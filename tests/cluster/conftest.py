"""The ``control_plane`` fixture: one real Kubernetes control plane for the whole test session.

Tests marked ``cluster`` take ``control_plane`` and get a :class:`controlplane.handle.ControlPlane`:

    cp.kubeconfig: Path              the admin kubeconfig (system:masters)
    cp.server: str                   https://127.0.0.1:<port>
    cp.kubectl(*args, check=True, input=None, timeout=120) -> subprocess.CompletedProcess[str]
                                     the real kubectl with --kubeconfig set; text in and out;
                                     check=True raises CalledProcessError with stderr in the message
    cp.helm(*args, check=True, input=None, timeout=300) -> subprocess.CompletedProcess[str]
                                     the real helm with --kubeconfig set
    cp.bin_dir: Path                 kube-apiserver, kube-controller-manager, kube-scheduler,
                                     kubectl, etcd, helm (and kwok when built)
    cp.kubectl_bin / cp.helm_bin: Path
    cp.kwok_bin: Path | None         None when KWOK was not built
    cp.kwok_nodes: list[str]         fake GPU nodes KWOK runs (kwok-gpu-0..3: label type=kwok, taint
                                     kwok.x-k8s.io/node=fake:NoSchedule, 500 pods, 8 GPUs each;
                                     Job pods there turn Running then Succeeded at once); [] without KWOK
    cp.node_name: str                the local node that really runs pods ("visionr1-local"):
                                     allocatable cpu, memory and nvidia.com/gpu, labelled
                                     nvidia.com/gpu.product=NVIDIA-H100-80GB-HBM3
    cp.pv_root: Path                 the folders behind the PersistentVolumes
    cp.logs_dir: Path                one log per component, and pods/<ns>_<pod>_<container>.log
    cp.make_pvc(namespace, name, size="10Gi", *, uid=1000, gid=1000, nodes=None) -> Path
                                     a PV (hostPath under pv_root, storage class visionr1-local)
                                     and a PVC bound to it (waits for Bound); returns the folder,
                                     owned by uid:gid, that pods see at the PVC's mount path
    cp.token_kubeconfig(namespace, serviceaccount, *, seconds=3600) -> Path
                                     a kubeconfig holding a TokenRequest token of that
                                     ServiceAccount: the real API server enforces its RBAC
    cp.api_client() -> kubernetes.client.ApiClient   an admin client of the maintained library
    cp.node_ip / cp.registry: str    the node's address; the registry it pulls from (host:port)
    cp.crictl(*args) -> CompletedProcess   the node's CRI (crictl), as a node administrator sees it
    cp.container_pids(ns, pod) -> list[int]   host pids of a pod's running containers
    cp.pids() -> dict[str, int]      component → pid of everything this cluster runs

The ``images`` fixture builds our images (scripts/images.py: operator, trainer-cpu, mlflow; a
warm build takes seconds) and pushes them to the node's registry; it returns name → pinned
reference (``host:port/visionr1/<name>:e2e@sha256:...``), the way a user's cluster pulls them.

The fixture reuses a control plane started by ``make cluster-up`` (it stays running after the
session); otherwise it starts its own and stops it at the end of the session, so no process
outlives the session. One test session per checkout at a time: a second session would reuse the
first one's control plane and lose it when the first ends. Without Go and without a cached
build, the cluster tests are set aside with one line that says how to enable them.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts" / "cluster"))

from controlplane.config import Layout  # noqa: E402
from controlplane.handle import (  # noqa: E402
    ControlPlane,
    Unavailable,
    session_control_plane,
    unavailable_reason,
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Without Go and without a cached build, set the cluster tests aside and say so in one line
    (a skip per test would print one line each)."""
    cluster = [item for item in items if item.get_closest_marker("cluster")]
    if not cluster or (reason := unavailable_reason(Layout.for_repo(REPO))) is None:
        return
    config.hook.pytest_deselected(items=cluster)
    items[:] = [item for item in items if not item.get_closest_marker("cluster")]
    config.stash[_SET_ASIDE] = f"{len(cluster)} cluster tests not run: {reason}"


def pytest_terminal_summary(
    terminalreporter: pytest.TerminalReporter, config: pytest.Config
) -> None:
    if line := config.stash.get(_SET_ASIDE, None):
        terminalreporter.write_line(line, yellow=True)


_SET_ASIDE = pytest.StashKey[str]()


def _say(config: pytest.Config, line: str) -> None:
    """A progress line on the terminal while pytest captures output (a cold start builds for
    many minutes: say what and how far)."""
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(f"[cluster] {line}")
        reporter.flush()  # a log file (CI) is block-buffered: show each line as it comes
    else:
        print(line, flush=True)


@pytest.fixture(scope="session")
def control_plane(request: pytest.FixtureRequest) -> Iterator[ControlPlane]:
    try:
        with session_control_plane(REPO, echo=lambda line: _say(request.config, line)) as cp:
            yield cp
    except Unavailable as why:
        pytest.skip(str(why))


IMAGES_TAG = "e2e"


@pytest.fixture(scope="session")
def images(control_plane: ControlPlane, request: pytest.FixtureRequest) -> dict[str, str]:
    """Our images, built (cached layers: seconds when nothing changed) and pushed to the node's
    registry; name → ``host:port/visionr1/<name>:e2e@sha256:...``."""
    script = [sys.executable, str(REPO / "scripts" / "images.py"), "--tag", IMAGES_TAG]
    # What `make images` mounts into the build steps: the host's CA bundle and pip config when
    # it has them (a proxy's CA), and its pip cache (torch is downloaded once).
    build = ["build", "--pip-cache", str(Path.home() / ".cache" / "pip")]
    if Path("/etc/ssl/certs").is_dir():
        build += ["--build-ca", "/etc/ssl/certs"]
    if Path("/etc/pip.conf").is_file():
        build += ["--pip-conf", "/etc/pip.conf"]
    for args in (build, ["push", "--repo", f"{control_plane.registry}/visionr1"]):
        start = time.monotonic()
        _say(request.config, f"images {args[0]} ...")
        proc = subprocess.Popen(
            [*script, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        assert proc.stdout is not None
        lines = []
        for line in proc.stdout:  # one line per image: say it as it comes
            lines.append(line)
            if line.strip() and not line.startswith(" "):
                _say(request.config, f"  {line.rstrip()}")
        if proc.wait() != 0:
            pytest.fail(f"scripts/images.py {args[0]} failed:\n{''.join(lines)[-5000:]}")
        _say(request.config, f"images {args[0]}: {time.monotonic() - start:.0f} s")
    return json.loads((REPO / ".visionr1" / "images" / "pushed.json").read_text())
