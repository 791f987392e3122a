"""The local cluster itself: the real node (kubelet, containerd, runc, CNI, kube-proxy, CoreDNS,
local-path-provisioner), the pods it runs from our images, the real Job controller, up and down.

Each check looks at an effect outside the code under test: the file a pod wrote into the PV's
folder, the owner and mode the folder got, the exit code the API server recorded, whether a process
still exists on the host, the memory cgroup's verdict, what the Job controller decided.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from controlplane import build, cluster
from controlplane.config import CACHE_ROOT_ENV, Layout
from controlplane.handle import ControlPlane

pytestmark = pytest.mark.cluster

REPO = Path(__file__).resolve().parents[2]
CLI = REPO / "scripts" / "cluster" / "cli.py"


def _until(what: str, check: Callable[[], Any], timeout: float = 90) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := check():
            return value
        time.sleep(0.3)
    raise AssertionError(f"{what} not within {timeout:.0f} s")


def _get(cp: ControlPlane, *args: str) -> dict[str, Any]:
    return json.loads(cp.kubectl("get", *args, "-o", "json").stdout)


def _apply(cp: ControlPlane, *docs: dict[str, Any]) -> None:
    cp.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(docs))


_CREATED: list[str] = []


@pytest.fixture(autouse=True)
def _remove_namespaces(request: pytest.FixtureRequest) -> Iterator[None]:
    """Each test's namespaces go when it ends, passed or failed (a rerun starts clean)."""
    yield
    if _CREATED:
        cp = request.getfixturevalue("control_plane")
        cp.kubectl("delete", "namespace", *_CREATED, "--wait=false", check=False)
        _CREATED.clear()


def _namespace(cp: ControlPlane) -> str:
    name = f"cp-{uuid.uuid4().hex[:8]}"
    _CREATED.append(name)
    cp.kubectl("create", "namespace", name)
    _until(
        "the default ServiceAccount",
        lambda: cp.kubectl("get", "sa", "default", "-n", name, check=False).returncode == 0,
    )
    return name


# Pods here run the operator image: the smallest of ours with a Python (set by the fixture).
PYTHON_IMAGE = ""


@pytest.fixture
def with_images(images: dict[str, str]) -> None:
    """Tests that run pods take this: our images are built and pushed first."""
    global PYTHON_IMAGE
    PYTHON_IMAGE = images["operator"]


def _pod(name: str, ns: str, script: str, **extra: Any) -> dict[str, Any]:
    container = {"name": "main", "image": PYTHON_IMAGE, "command": ["python", "-c", script]}
    container.update(extra.pop("container", {}))
    spec = {"restartPolicy": "Never", "containers": [container], **extra}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": ns},
        "spec": spec,
    }


def _terminal(cp: ControlPlane, ns: str, name: str) -> dict[str, Any]:
    return _until(
        f"pod {ns}/{name} finished",
        lambda: (
            (p := _get(cp, "pod", name, "-n", ns))["status"].get("phase") in ("Succeeded", "Failed")
            and p
        ),
    )


def test_node_is_ready_with_gpus(control_plane: ControlPlane) -> None:
    node = _get(control_plane, "node", control_plane.node_name)
    ready = {c["type"]: c["status"] for c in node["status"]["conditions"]}
    assert ready["Ready"] == "True"
    assert node["status"]["allocatable"]["nvidia.com/gpu"] == "8"
    assert node["metadata"]["labels"]["nvidia.com/gpu.product"] == "NVIDIA-H100-80GB-HBM3"
    assert not [
        t for t in node["spec"].get("taints", []) if t["key"].startswith("node.kubernetes.io/")
    ]
    lease = _get(control_plane, "lease", control_plane.node_name, "-n", "kube-node-lease")
    assert lease["spec"]["holderIdentity"] == control_plane.node_name


def test_pod_sees_env_configmap_and_pvc_subpath_as_its_user(
    with_images: None, control_plane: ControlPlane
) -> None:
    cp = control_plane
    ns = _namespace(cp)
    folder = cp.make_pvc(ns, "work", "1Gi")
    run_dir = folder / "runs" / "r1"
    run_dir.mkdir(parents=True)
    os.chown(run_dir, 1000, 1000)
    (folder / "shared.txt").write_text("raw data")
    _apply(
        cp,
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "cfg", "namespace": ns},
            "data": {"config.json": '{"lr": 0.1}', "mode": "tiny"},
        },
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "tok", "namespace": ns},
            "stringData": {"token": "s3cret"},
        },
    )
    script = (
        "import json, os, socket\n"
        "out = {'uid': os.getuid(), 'gid': os.getgid(), 'host': socket.gethostname(),\n"
        "       'env': {k: os.environ.get(k) for k in ('MODE', 'TOKEN', 'POD', 'GREETING')},\n"
        "       'config': open('/etc/cfg/config.json').read(), 'shared': open('/data/shared.txt').read()}\n"
        "try:\n    open('/data/nope', 'w')\nexcept OSError as err:\n    out['readonly'] = err.errno\n"
        "json.dump(out, open('/workspace/out.json', 'w'))\n"
    )
    pod = _pod(
        "reader",
        ns,
        script,
        container={
            "env": [
                {"name": "MODE", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "mode"}}},
                {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "tok", "key": "token"}}},
                {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                {"name": "GREETING", "value": "hello $(POD)"},
            ],
            "volumeMounts": [
                {"name": "work", "mountPath": "/workspace", "subPath": "runs/r1"},
                {"name": "work", "mountPath": "/data", "readOnly": True},
                {"name": "work", "mountPath": "/scratch", "subPath": "fresh/new"},
                {"name": "cfg", "mountPath": "/etc/cfg", "readOnly": True},
            ],
        },
        securityContext={"runAsUser": 1000, "runAsGroup": 1000, "runAsNonRoot": True},
        volumes=[
            {"name": "work", "persistentVolumeClaim": {"claimName": "work"}},
            {"name": "cfg", "configMap": {"name": "cfg"}},
        ],
    )
    _apply(cp, pod)
    try:
        _check_reader(cp, ns, folder, run_dir)
    finally:
        cp.kubectl("delete", "namespace", ns, "--wait=false")
        shutil.rmtree(folder, ignore_errors=True)


def _check_reader(cp: ControlPlane, ns: str, folder: Path, run_dir: Path) -> None:
    done = _terminal(cp, ns, "reader")
    assert done["status"]["phase"] == "Succeeded", done["status"]
    term = done["status"]["containerStatuses"][0]["state"]["terminated"]
    assert (term["exitCode"], term["reason"]) == (0, "Completed")
    conditions = {c["type"]: c["status"] for c in done["status"]["conditions"]}
    assert conditions["Initialized"] == "True" and conditions["PodScheduled"] == "True"
    out_file = run_dir / "out.json"
    out = json.loads(out_file.read_text())
    assert out_file.stat().st_uid == 1000
    assert (out["uid"], out["gid"], out["host"]) == (1000, 1000, "reader")
    assert out["env"] == {
        "MODE": "tiny",
        "TOKEN": "s3cret",
        "POD": "reader",
        "GREETING": "hello reader",
    }
    assert out["config"] == '{"lr": 0.1}' and out["shared"] == "raw data"
    assert out["readonly"] == 30  # EROFS: the readOnly mount really is read-only
    # The missing subPath was created as the kubelet does: root's, with the volume root's mode.
    for created in (folder / "fresh", folder / "fresh" / "new"):
        st = created.stat()
        assert (st.st_uid, oct(st.st_mode & 0o777)) == (0, oct(folder.stat().st_mode & 0o777))
    assert oct(folder.stat().st_mode & 0o777) == "0o755"


def test_failed_container_and_failed_start_are_reported(
    with_images: None, control_plane: ControlPlane
) -> None:
    cp = control_plane
    ns = _namespace(cp)
    _apply(cp, _pod("exits3", ns, "import sys; print('bye'); sys.exit(3)"))
    missing = _pod("nobinary", ns, "")
    missing["spec"]["containers"][0]["command"] = ["no-such-program"]
    _apply(cp, missing)
    failed = _terminal(cp, ns, "exits3")
    term = failed["status"]["containerStatuses"][0]["state"]["terminated"]
    assert failed["status"]["phase"] == "Failed"
    assert (term["exitCode"], term["reason"]) == (3, "Error")
    assert "bye" in cp.kubectl("logs", "exits3", "-n", ns).stdout
    start = _terminal(cp, ns, "nobinary")["status"]["containerStatuses"][0]["state"]["terminated"]
    assert (start["exitCode"], start["reason"]) == (128, "StartError")
    assert "no-such-program" in start["message"]


def test_deleting_a_pod_kills_its_process(with_images: None, control_plane: ControlPlane) -> None:
    cp = control_plane
    ns = _namespace(cp)
    _apply(cp, _pod("sleeper", ns, "import time; time.sleep(600)", terminationGracePeriodSeconds=3))
    _until(
        "the pod running",
        lambda: _get(cp, "pod", "sleeper", "-n", ns)["status"].get("phase") == "Running",
    )
    pids = cp.container_pids(ns, "sleeper")
    assert pids and all(cluster.alive(p) for p in pids)
    assert "time.sleep(600)" in Path(f"/proc/{pids[0]}/cmdline").read_bytes().decode(
        errors="replace"
    ).replace("\0", " ")
    cp.kubectl("delete", "pod", "sleeper", "-n", ns, "--wait=true", timeout=60)
    assert not any(cluster.alive(p) for p in pids)
    assert cp.kubectl("get", "pod", "sleeper", "-n", ns, check=False).returncode != 0
    cp.kubectl("delete", "namespace", ns, "--wait=false")


def test_memory_limit_is_enforced_by_the_kernel(
    with_images: None, control_plane: ControlPlane
) -> None:
    """A container over its memory limit is OOMKilled by the kernel (its memory cgroup)."""
    cp = control_plane
    ns = _namespace(cp)
    hog = "b = bytearray(0)\nchunks = []\nwhile True:\n    chunks.append(bytearray(8 << 20))\n"
    _apply(
        cp,
        _pod(
            "hog",
            ns,
            hog,
            container={"resources": {"limits": {"memory": "48Mi"}, "requests": {"memory": "48Mi"}}},
        ),
    )
    done = _terminal(cp, ns, "hog")
    term = done["status"]["containerStatuses"][0]["state"]["terminated"]
    assert (term["exitCode"], term["reason"]) == (137, "OOMKilled")
    cp.kubectl("delete", "namespace", ns, "--wait=false")


def test_pods_reach_services_by_name_and_the_api_server(
    with_images: None, control_plane: ControlPlane
) -> None:
    """The pod network, kube-proxy and CoreDNS: a pod reaches another pod through its Service's
    DNS name, and the API server through the `kubernetes` Service with its token."""
    cp = control_plane
    ns = _namespace(cp)
    server = {
        **_pod(
            "web",
            ns,
            "import http.server as h; h.HTTPServer(('', 8080), type('H', (h.BaseHTTPRequestHandler,), {'do_GET': lambda s: (s.send_response(200), s.end_headers(), s.wfile.write(b'hello from web'))})).serve_forever()",
        ),
    }
    server["metadata"]["labels"] = {"app": "web"}
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "web", "namespace": ns},
        "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": 8080}]},
    }
    client = (
        "import json, ssl, time, urllib.request as u\n"
        "for _ in range(60):\n"
        "    try:\n"
        "        body = u.urlopen('http://web/', timeout=2).read().decode(); break\n"
        "    except OSError:\n"
        "        time.sleep(1)\n"
        "sa = '/var/run/secrets/kubernetes.io/serviceaccount/'\n"
        "ctx = ssl.create_default_context(cafile=sa + 'ca.crt')\n"
        "req = u.Request('https://kubernetes.default.svc/api/v1/namespaces/' + open(sa + 'namespace').read() + '/services/web',\n"
        "                headers={'Authorization': 'Bearer ' + open(sa + 'token').read()})\n"
        "try:\n"
        "    api = u.urlopen(req, context=ctx, timeout=5).status\n"
        "except u.HTTPError as err:\n"
        "    api = err.code\n"
        "print(json.dumps({'body': body, 'api': api}))\n"
    )
    _apply(cp, server, service, _pod("client", ns, client))
    done = _terminal(cp, ns, "client")
    out = json.loads(cp.kubectl("logs", "client", "-n", ns).stdout.strip().splitlines()[-1])
    assert done["status"]["phase"] == "Succeeded"
    # 403: the API server answered and refused the default account (RBAC), over TLS it trusts.
    assert out == {"body": "hello from web", "api": 403}
    cp.kubectl("delete", "namespace", ns, "--wait=false")


def test_a_claim_of_the_default_storage_class_is_provisioned(
    with_images: None, control_plane: ControlPlane
) -> None:
    """local-path-provisioner, as kind ships it: the claim binds when a pod uses it, and the pod
    writes into a folder on the node."""
    cp = control_plane
    ns = _namespace(cp)
    claim = {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": "scratch", "namespace": ns},
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}},
    }
    writer = _pod(
        "writer",
        ns,
        "open('/data/hello.txt', 'w').write('written in a pod')",
        container={"volumeMounts": [{"name": "d", "mountPath": "/data"}]},
        volumes=[{"name": "d", "persistentVolumeClaim": {"claimName": "scratch"}}],
    )
    _apply(cp, claim, writer)
    done = _terminal(cp, ns, "writer")
    assert done["status"]["phase"] == "Succeeded", done["status"]
    pvc = _get(cp, "pvc", "scratch", "-n", ns)
    assert pvc["status"]["phase"] == "Bound"
    assert pvc["spec"]["storageClassName"] == "local-path"  # the default class, not named
    pv = _get(cp, "pv", pvc["spec"]["volumeName"])
    folder = Path((pv["spec"].get("hostPath") or pv["spec"]["local"])["path"])
    assert (folder / "hello.txt").read_text() == "written in a pod"
    cp.kubectl("delete", "namespace", ns, "--wait=true", timeout=120)
    _until("the volume's folder removed", lambda: not folder.exists(), 120)


def test_logs_and_exec_reach_the_container(with_images: None, control_plane: ControlPlane) -> None:
    cp = control_plane
    ns = _namespace(cp)
    _apply(cp, _pod("shell", ns, "import time; print('started', flush=True); time.sleep(600)"))
    _until(
        "the pod running",
        lambda: _get(cp, "pod", "shell", "-n", ns)["status"].get("phase") == "Running",
    )
    _until("its log", lambda: "started" in cp.kubectl("logs", "shell", "-n", ns).stdout)
    out = cp.kubectl(
        "exec", "shell", "-n", ns, "--", "python", "-c", "import os; print(os.getuid())"
    )
    assert out.stdout.strip() == "65532"  # the image's own numeric user
    cp.kubectl("delete", "namespace", ns, "--wait=false")


def test_job_pod_failure_policy_fails_the_job_on_exit_65(
    with_images: None, control_plane: ControlPlane
) -> None:
    cp = control_plane
    ns = _namespace(cp)
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "invalid", "namespace": ns},
        "spec": {
            "backoffLimit": 6,
            "podFailurePolicy": {
                "rules": [
                    {
                        "action": "FailJob",
                        "onExitCodes": {"containerName": "main", "operator": "In", "values": [65]},
                    }
                ]
            },
            "template": {"spec": _pod("x", ns, "import sys; sys.exit(65)")["spec"]},
        },
    }
    _apply(cp, job)

    def failed() -> dict[str, Any] | None:
        status = _get(cp, "job", "invalid", "-n", ns).get("status", {})
        return next(
            (
                c
                for c in status.get("conditions", [])
                if c["type"] == "Failed" and c["status"] == "True"
            ),
            None,
        )

    cond = _until("the Job failed", failed)
    assert cond["reason"] == "PodFailurePolicy"
    pods = _get(cp, "pods", "-n", ns, "-l", "job-name=invalid")["items"]
    assert len(pods) == 1  # FailJob: no retry despite backoffLimit 6


def _cli(
    repo: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(CLI), f"--repo={repo}", *args],
        capture_output=True,
        text=True,
        env=env or dict(os.environ),
        timeout=600,
    )


def test_bad_input_gives_one_line(control_plane: ControlPlane, tmp_path: Path) -> None:
    repo = tmp_path / "clone"
    repo.mkdir()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {**os.environ, "VISIONR1_CLUSTER_APISERVER_PORT": str(port)}
        proc = _cli(repo, "up", env=env)
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0
    assert f"port {port} for kube-apiserver is taken" in proc.stderr
    assert cluster.running(Layout.for_repo(repo)) is None
    # the machine has one node: a second checkout's up leaves the running one alone
    proc = _cli(repo, "up")
    assert proc.returncode == 1 and proc.stderr.strip().count("\n") == 0
    assert f"held by the cluster of {control_plane.layout.repo}" in proc.stderr
    assert cluster.running(Layout.for_repo(repo)) is None
    assert cluster.health(control_plane.layout, control_plane.state)["kubelet"] == "ok"
    # a damaged cache: every binary there but kube-apiserver is garbage
    cache = tmp_path / "cache"
    bin_dir = Layout.for_repo(repo).bin_dir.relative_to(Layout.for_repo(repo).bin_dir.parents[1])
    fake = cache / bin_dir
    fake.mkdir(parents=True)
    for binary in control_plane.bin_dir.iterdir():
        (fake / binary.name).symlink_to(binary)
    (fake / "kube-apiserver").unlink()
    (fake / "kube-apiserver").write_bytes(b"\x7fELF truncated")
    (fake / "kube-apiserver").chmod(0o755)
    proc = _cli(repo, "up", env={**os.environ, CACHE_ROOT_ENV: str(cache)})
    assert proc.returncode == 1 and proc.stderr.strip().count("\n") == 0
    assert "kube-apiserver" in proc.stderr and "--rebuild" in proc.stderr
    # no Go and nothing cached
    env = {**os.environ, CACHE_ROOT_ENV: str(tmp_path / "empty"), "PATH": "/usr/sbin:/sbin"}
    proc = _cli(repo, "up", env=env)
    assert proc.returncode == 1 and proc.stderr.strip().count("\n") == 0
    assert "Go not found on PATH" in proc.stderr


def test_a_failed_build_names_the_module_and_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A release that does not exist: the build stops with one line naming module and version."""
    if shutil.which("go") is None:
        pytest.skip("needs Go")
    monkeypatch.setenv(CACHE_ROOT_ENV, str(tmp_path / "cache"))
    real = Layout.for_repo(tmp_path)
    versions = real.versions.model_copy(
        update={"kubernetes": real.versions.kubernetes.model_copy(update={"version": "v1.37.999"})}
    )
    layout = Layout(repo=tmp_path, versions=versions, versions_hash="broken")
    lines: list[str] = []
    with pytest.raises(build.BuildFailed) as err:
        build.ensure_built(layout, lines.append)
    message = str(err.value)
    assert "k8s.io/kubernetes@v1.37.999" in message and "\n" not in message
    assert not layout.binary("kube-apiserver").exists()


def test_init_containers_run_in_order_before_the_container(
    with_images: None, control_plane: ControlPlane
) -> None:
    cp = control_plane
    ns = _namespace(cp)
    step = "import os; open('/shared/log', 'a').write(os.environ['STEP'] + ' ')"
    pod = _pod(
        "ordered",
        ns,
        "print(open('/shared/log').read().strip())",
        container={"volumeMounts": [{"name": "shared", "mountPath": "/shared"}]},
        initContainers=[
            {
                "name": f"init-{i}",
                "image": PYTHON_IMAGE,
                "command": ["python", "-c", step],
                "env": [{"name": "STEP", "value": str(i)}],
                "volumeMounts": [{"name": "shared", "mountPath": "/shared"}],
            }
            for i in (1, 2)
        ],
        volumes=[{"name": "shared", "emptyDir": {}}],
    )
    _apply(cp, pod)
    done = _terminal(cp, ns, "ordered")
    assert done["status"]["phase"] == "Succeeded"
    inits = done["status"]["initContainerStatuses"]
    assert [s["name"] for s in inits] == ["init-1", "init-2"]
    assert all(s["state"]["terminated"]["reason"] == "Completed" for s in inits)
    assert (
        inits[0]["state"]["terminated"]["finishedAt"]
        <= inits[1]["state"]["terminated"]["startedAt"]
    )
    assert cp.kubectl("logs", "ordered", "-n", ns).stdout.strip() == "1 2"
    cp.kubectl("delete", "namespace", ns, "--wait=false")
