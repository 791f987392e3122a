"""The local node: registers one Node, keeps it Ready, and runs the pods bound to it as processes.

It acts as that node's kubelet, with the node's own credentials (system:node:<name>), so the real
Node authorizer and NodeRestriction admission decide what it may read and write. For each pod the
scheduler binds here it resolves the volumes (ConfigMap, Secret, projected service-account token,
downward API, emptyDir, hostPath, and PVCs bound to hostPath/local PersistentVolumes), runs the init
containers in order and then the containers, each through ``controlplane.launch`` in a private
mount namespace where the volumes appear at their mount paths, as the pod's user, and reports the
pod status a kubelet reports. Deleting a pod ends its processes (SIGTERM, the grace period, SIGKILL)
and then removes the pod. What it does not emulate is listed in docs/local-control-plane.md.

``python -m controlplane.noderunner --repo R --kubeconfig K --apiserver-port P`` (cluster.up starts it).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import datetime as dt
import json
import logging
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kubernetes import client, config, watch
from kubernetes.client.exceptions import ApiException

from controlplane.config import Layout
from controlplane.podspec import (
    NODE_PATH,
    ConfigError,
    NotReady,
    condition,
    container_env,
    exit_code,
    expand,
    field_value,
    make_sub_path,
    now,
    resource_field,
    safe_join,
    terminated_reason,
    user_of,
)

log = logging.getLogger("visionr1.node")
LEASE_SECONDS = 40
RUNTIME = "visionr1-process"


def _micro(t: dt.datetime | None = None) -> str:
    return (t or dt.datetime.now(dt.UTC)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def node_ip() -> str:
    """The machine's primary IPv4 address (what hostNetwork pods report), else loopback.
    Loopback is avoided because Endpoints refuse it for Services that select our pods."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))  # no packet is sent: this only picks a route
            return s.getsockname()[0]
        except OSError:
            return "127.0.0.1"


def hidden_ancestors(paths: list[str]) -> dict[str, list[str]]:
    """For each path a non-root user cannot reach (a folder above it lacks o+x): that highest
    folder → the paths under it to bind back into the pod's view (see launch._expose)."""
    masks: dict[str, list[str]] = {}
    for raw in paths:
        path = Path(raw).resolve()
        if not path.exists():
            continue
        for parent in reversed(path.parents):
            if parent != Path("/") and not parent.stat().st_mode & 0o001:
                masks.setdefault(str(parent), []).append(str(path))
                break
    return masks


class Api:
    """The few calls the runner makes, on dicts (the JSON the API server speaks)."""

    def __init__(self, kubeconfig: str) -> None:
        cfg = client.Configuration()
        config.load_kube_config(config_file=kubeconfig, client_configuration=cfg)
        self.client = client.ApiClient(cfg)
        self.core = client.CoreV1Api(self.client)
        self.coordination = client.CoordinationV1Api(self.client)

    @staticmethod
    def _json(resp: Any) -> dict[str, Any]:
        return json.loads(resp.data)

    def get(self, kind: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        call = {
            "configMapRef": self.core.read_namespaced_config_map,
            "secretRef": self.core.read_namespaced_secret,
            "pvc": self.core.read_namespaced_persistent_volume_claim,
        }
        try:
            if kind == "pv":
                return self._json(self.core.read_persistent_volume(name, _preload_content=False))
            return self._json(call[kind](name, namespace, _preload_content=False))
        except ApiException as err:
            if err.status == 404:
                return None
            raise

    def patch_pod_status(self, namespace: str, name: str, status: Mapping[str, Any]) -> None:
        self.core.patch_namespaced_pod_status(
            name,
            namespace,
            {"status": status},
            _content_type="application/strategic-merge-patch+json",
            _preload_content=False,
        )

    def delete_pod(self, namespace: str, name: str, uid: str) -> None:
        with contextlib.suppress(ApiException):  # already gone, or another uid: nothing to do
            self.core.delete_namespaced_pod(
                name,
                namespace,
                body={"gracePeriodSeconds": 0, "preconditions": {"uid": uid}},
                _preload_content=False,
            )

    def token(
        self, namespace: str, sa: str, pod: Mapping[str, Any], seconds: int, audience: str | None
    ) -> str:
        body = {
            "spec": {
                # none given: the API server's own audiences (what the kubelet asks for; a node
                # may not name an audience a pod's volume does not)
                **({"audiences": [audience]} if audience else {}),
                "expirationSeconds": seconds,
                "boundObjectRef": {
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "name": pod["metadata"]["name"],
                    "uid": pod["metadata"]["uid"],
                },
            }
        }
        resp = self.core.create_namespaced_service_account_token(
            sa, namespace, body, _preload_content=False
        )
        return self._json(resp)["status"]["token"]


# The `kubernetes` Service as pods resolve it: kubernetes.default.svc:443 (in each pod's /etc/hosts)
# on a loopback address of its own, forwarded to the API server. A kube-proxy stand-in for this one
# Service only: in-cluster clients that use the name (kopf's service-account login does) connect.
SERVICE_ADDRESS = "127.0.96.1"
SERVICE_NAMES = (
    "kubernetes",
    "kubernetes.default",
    "kubernetes.default.svc",
    "kubernetes.default.svc.cluster.local",
)


class ServiceForwarder(threading.Thread):
    def __init__(self, target_port: int) -> None:
        super().__init__(name="kubernetes-service", daemon=True)
        self.target_port = target_port
        self.server = socket.socket()
        self.server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.server.bind((SERVICE_ADDRESS, 443))
        self.server.listen(64)

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)

    def run(self) -> None:
        while True:
            client_sock, _ = self.server.accept()
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=10)
            except OSError:
                client_sock.close()
                continue
            upstream.settimeout(None)
            for a, b in ((client_sock, upstream), (upstream, client_sock)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()


class Container:
    """One running container process."""

    def __init__(
        self, spec: Mapping[str, Any], proc: subprocess.Popen[bytes], spec_file: Path
    ) -> None:
        self.spec = spec
        self.proc = proc
        self.spec_file = spec_file
        self.started_at = now()


class PodWorker(threading.Thread):
    """Runs one pod, from its volumes to its final status and, once deleted, its removal."""

    def __init__(self, runner: NodeRunner, pod: dict[str, Any]) -> None:
        super().__init__(
            name=f"pod-{pod['metadata']['namespace']}/{pod['metadata']['name']}", daemon=True
        )
        self.runner = runner
        self.pod = pod
        self.meta = pod["metadata"]
        self.ns, self.name, self.uid = self.meta["namespace"], self.meta["name"], self.meta["uid"]
        self.dir = runner.layout.pods / self.uid
        self.delete_requested = threading.Event()
        self.grace = 30.0
        self.gone = threading.Event()  # the pod object no longer exists
        self.running: dict[str, Container] = {}
        self.lock = threading.Lock()
        ip = runner.ip
        self.status: dict[str, Any] = {
            "phase": "Pending",
            "hostIP": ip,
            "hostIPs": [{"ip": ip}],
            "podIP": ip,
            "podIPs": [{"ip": ip}],
            "startTime": now(),
        }
        self.conds: dict[str, dict[str, Any]] = {}
        self.init_status: dict[str, dict[str, Any]] = {}
        self.main_status: dict[str, dict[str, Any]] = {}
        self.restart_counts: dict[str, int] = {}

    # -- status -----------------------------------------------------------------------------

    def _cond(self, kind: str, ok: bool, reason: str | None = None) -> None:
        old = self.conds.get(kind)
        if old is None or (old["status"] == "True") != ok or old.get("reason") != reason:
            self.conds[kind] = condition(kind, ok, reason)

    def _cstatus(
        self,
        c: Mapping[str, Any],
        state: dict[str, Any],
        *,
        ready: bool = False,
        last: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        out = {
            "name": c["name"],
            "image": c.get("image", ""),
            "imageID": "",
            "ready": ready,
            "started": "running" in state,
            "restartCount": self.restart_counts.get(c["name"], 0),
            "state": state,
            "lastState": last or {},
        }
        if "containerID" in state.get("running", state.get("terminated", {})):
            out["containerID"] = (state.get("running") or state.get("terminated"))["containerID"]
        return out

    def publish(self) -> None:
        spec = self.pod["spec"]
        body = dict(self.status)
        body["conditions"] = list(self.conds.values())
        if spec.get("initContainers"):
            body["initContainerStatuses"] = [
                self.init_status[c["name"]]
                for c in spec["initContainers"]
                if c["name"] in self.init_status
            ]
        body["containerStatuses"] = [
            self.main_status[c["name"]] for c in spec["containers"] if c["name"] in self.main_status
        ]
        try:
            self.runner.api.patch_pod_status(self.ns, self.name, body)
        except ApiException as err:
            if err.status == 404:
                self.gone.set()
            else:
                log.warning(
                    "status of %s/%s not written: %s %s", self.ns, self.name, err.status, err.reason
                )

    def _waiting_all(self, reason: str, message: str | None = None) -> None:
        state = {"waiting": {"reason": reason, **({"message": message} if message else {})}}
        spec = self.pod["spec"]
        for c in spec.get("initContainers") or []:
            self.init_status.setdefault(c["name"], self._cstatus(c, state))
        for c in spec["containers"]:
            self.main_status[c["name"]] = self._cstatus(c, state)

    # -- volumes ----------------------------------------------------------------------------

    def _lookup(self, kind: str, name: str) -> dict[str, str] | None:
        obj = self.runner.api.get(kind, self.ns, name)
        if obj is None:
            return None
        data = dict(obj.get("data") or {})
        if kind == "secretRef":
            data = {k: base64.b64decode(v).decode(errors="replace") for k, v in data.items()}
        return data

    def _write_items(
        self, folder: Path, data: Mapping[str, bytes], items: list[dict[str, Any]] | None, mode: int
    ) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        chosen = (
            [(i["key"], i["path"], i.get("mode", mode)) for i in items]
            if items
            else [(k, k, mode) for k in data]
        )
        for key, rel, item_mode in chosen:
            if key not in data:
                raise NotReady(f"key {key} not found")
            path = safe_join(folder, rel)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data[key])
            path.chmod(item_mode)

    def _object_bytes(self, kind: str, name: str, optional: bool) -> dict[str, bytes] | None:
        obj = self.runner.api.get(kind, self.ns, name)
        if obj is None:
            if optional:
                return None
            what = "configmap" if kind == "configMapRef" else "secret"
            raise NotReady(f'{what} "{name}" not found')
        out: dict[str, bytes] = {}
        if kind == "secretRef":
            out = {k: base64.b64decode(v) for k, v in (obj.get("data") or {}).items()}
        else:
            out = {k: v.encode() for k, v in (obj.get("data") or {}).items()}
            out |= {k: base64.b64decode(v) for k, v in (obj.get("binaryData") or {}).items()}
        return out

    def _downward(self, items: list[dict[str, Any]]) -> dict[str, bytes]:
        out = {}
        for item in items:
            if "fieldRef" in item:
                value = field_value(self.pod, item["fieldRef"]["fieldPath"], self.status)
            else:
                value = resource_field(
                    self.pod, None, item["resourceFieldRef"], self.runner.allocatable
                )
            out[item["path"]] = value.encode()
        return out

    def volumes(self) -> dict[str, tuple[Path, bool]]:
        """Volume name → (host folder, read-only), making each ready; NotReady when one cannot be yet."""
        out: dict[str, tuple[Path, bool]] = {}
        root = self.dir / "volumes"
        for vol in self.pod["spec"].get("volumes") or []:
            name = vol["name"]
            folder = root / name
            if "emptyDir" in vol:
                folder.mkdir(parents=True, exist_ok=True)
                folder.chmod(0o777)  # as the kubelet makes it
                out[name] = (folder, False)
            elif "configMap" in vol or "secret" in vol:
                src = vol.get("configMap") or vol.get("secret")
                kind = "configMapRef" if "configMap" in vol else "secretRef"
                ref = src.get("name") or src.get("secretName")
                data = self._object_bytes(kind, ref, bool(src.get("optional")))
                self._write_items(
                    folder, data or {}, src.get("items"), src.get("defaultMode", 0o644)
                )
                out[name] = (folder, True)
            elif "downwardAPI" in vol:
                data = self._downward(vol["downwardAPI"].get("items") or [])
                self._write_items(folder, data, None, vol["downwardAPI"].get("defaultMode", 0o644))
                out[name] = (folder, True)
            elif "projected" in vol:
                proj = vol["projected"]
                mode = proj.get("defaultMode", 0o644)
                folder.mkdir(parents=True, exist_ok=True)
                for source in proj.get("sources") or []:
                    if "serviceAccountToken" in source:
                        t = source["serviceAccountToken"]
                        token = self.runner.api.token(
                            self.ns,
                            self.pod["spec"].get("serviceAccountName", "default"),
                            self.pod,
                            int(t.get("expirationSeconds", 3607)),
                            t.get("audience"),
                        )
                        self._write_items(folder, {t["path"]: token.encode()}, None, mode)
                    elif "configMap" in source or "secret" in source:
                        src = source.get("configMap") or source.get("secret")
                        kind = "configMapRef" if "configMap" in source else "secretRef"
                        data = self._object_bytes(kind, src["name"], bool(src.get("optional")))
                        self._write_items(folder, data or {}, src.get("items"), mode)
                    elif "downwardAPI" in source:
                        self._write_items(
                            folder,
                            self._downward(source["downwardAPI"].get("items") or []),
                            None,
                            mode,
                        )
                out[name] = (folder, True)
            elif "persistentVolumeClaim" in vol:
                claim = vol["persistentVolumeClaim"]
                pvc = self.runner.api.get("pvc", self.ns, claim["claimName"])
                if pvc is None:
                    raise NotReady(f'persistentvolumeclaim "{claim["claimName"]}" not found')
                if (pvc.get("status") or {}).get("phase") != "Bound":
                    raise NotReady(f'persistentvolumeclaim "{claim["claimName"]}" is not bound')
                pv = self.runner.api.get("pv", None, pvc["spec"]["volumeName"])
                if pv is None:
                    raise NotReady(f'persistentvolume "{pvc["spec"]["volumeName"]}" not found')
                src = pv["spec"].get("hostPath") or pv["spec"].get("local")
                if src is None:
                    raise ConfigError(
                        f'persistentvolume "{pv["metadata"]["name"]}": only hostPath and local volumes can be mounted on this node'
                    )
                path = Path(src["path"])
                if not path.is_dir():
                    raise NotReady(
                        f"the folder {path} of persistentvolume {pv['metadata']['name']} does not exist"
                    )
                out[name] = (path, bool(claim.get("readOnly")))
            elif "hostPath" in vol:
                path = Path(vol["hostPath"]["path"])
                if vol["hostPath"].get("type") == "DirectoryOrCreate":
                    path.mkdir(parents=True, exist_ok=True)
                elif not path.exists():
                    raise NotReady(f"hostPath {path} does not exist")
                out[name] = (path, False)
            else:
                kinds = sorted(k for k in vol if k != "name")
                raise ConfigError(
                    f"volume {name}: {', '.join(kinds)} volumes are not supported by the local node"
                )
        return out

    # -- containers -------------------------------------------------------------------------

    def _hosts(self, hostname: str) -> Path:
        path = self.dir / "etc-hosts"
        if not path.exists():
            spec = self.pod["spec"]
            names = [hostname]
            if spec.get("subdomain"):
                names.insert(0, f"{hostname}.{spec['subdomain']}.{self.ns}.svc.cluster.local")
            base = Path("/etc/hosts").read_text() if Path("/etc/hosts").exists() else ""
            path.write_text(
                base
                + f"\n# visionr1 local node: this pod\n{self.runner.ip}\t{' '.join(names)}\n127.0.0.1\t{hostname}\n"
                + (f"{SERVICE_ADDRESS}\t{' '.join(SERVICE_NAMES)}\n" if self.runner.service else "")
            )
            path.chmod(0o644)
        return path

    def _user_db(self, uid: int, gid: int, home: str) -> list[dict[str, Any]]:
        """An image names its user in its own /etc/passwd (getpass.getuser() and friends need it);
        the host's may not know the pod's uid, so the pod sees the host's files plus that entry."""
        mounts = []
        for name, ident, line in (
            ("passwd", uid, f"pod-{uid}:x:{uid}:{gid}:visionr1 pod user:{home}:/bin/sh\n"),
            ("group", gid, f"pod-{gid}:x:{gid}:\n"),
        ):
            host = Path("/etc") / name
            text = host.read_text() if host.exists() else ""
            if any(row.split(":")[2:3] == [str(ident)] for row in text.splitlines()):
                continue
            path = self.dir / f"etc-{name}"
            path.write_text(text + ("" if text.endswith("\n") or not text else "\n") + line)
            path.chmod(0o644)
            mounts.append(
                {"source": str(path), "target": str(host), "readOnly": True, "file": True}
            )
        return mounts

    def start_container(
        self, c: Mapping[str, Any], vols: dict[str, tuple[Path, bool]]
    ) -> Container:
        spec = self.pod["spec"]
        hostname = spec.get("hostname") or self.name
        uid, gid, groups = user_of(self.pod, c)
        base = {
            "PATH": f"{Path(self.runner.pod_python).parent}:{NODE_PATH}",
            "HOSTNAME": hostname,
            "HOME": "/root" if uid == 0 else str(self.dir / "home"),
            "KUBERNETES_SERVICE_HOST": "127.0.0.1",
            "KUBERNETES_SERVICE_PORT": str(self.runner.apiserver_port),
            "KUBERNETES_SERVICE_PORT_HTTPS": str(self.runner.apiserver_port),
            "KUBERNETES_PORT": f"tcp://127.0.0.1:{self.runner.apiserver_port}",
        }
        if self.runner.pod_pythonpath:
            base["PYTHONPATH"] = self.runner.pod_pythonpath
        env = container_env(
            self.pod,
            c,
            self._lookup,
            status=self.status,
            base=base,
            allocatable=self.runner.allocatable,
        )
        if uid != 0:
            home = self.dir / "home"
            home.mkdir(parents=True, exist_ok=True)
            os.chown(home, uid, gid)
        mounts = []
        for m in c.get("volumeMounts") or []:
            if m["name"] not in vols:
                raise ConfigError(f"volumeMount {m['name']} names no volume of the pod")
            folder, ro = vols[m["name"]]
            source = folder
            sub = m.get("subPath") or (m.get("subPathExpr") and expand(m["subPathExpr"], env))
            if sub:
                source = (
                    make_sub_path(folder, sub)
                    if not (folder / sub).is_file()
                    else safe_join(folder, sub)
                )
            mounts.append(
                {
                    "source": str(source),
                    "target": m["mountPath"],
                    "readOnly": bool(m.get("readOnly") or ro),
                    "file": source.is_file(),
                }
            )
        mounts.append(
            {
                "source": str(self._hosts(hostname)),
                "target": "/etc/hosts",
                "readOnly": True,
                "file": True,
            }
        )
        mounts += self._user_db(uid, gid, base["HOME"])
        argv = [*(c.get("command") or []), *(c.get("args") or [])]
        argv = [expand(a, env) for a in argv]
        launch = {
            "hostname": hostname[:63],
            "mounts": mounts,
            "cwd": c.get("workingDir") or "/",
            "env": env,
            "argv": argv,
            "uid": uid,
            "gid": gid,
            "groups": groups,
            "masks": self.runner.masks if uid != 0 else {},
        }
        spec_file = self.dir / f"{c['name']}.json"
        for stale in (spec_file.with_suffix(".json.error"),):
            stale.unlink(missing_ok=True)
        spec_file.write_text(json.dumps(launch))
        spec_file.chmod(0o600)
        logs = self.runner.layout.logs / "pods"
        logs.mkdir(parents=True, exist_ok=True)
        with (logs / f"{self.ns}_{self.name}_{c['name']}.log").open("ab") as out:
            proc = subprocess.Popen(
                [
                    "unshare",
                    "--mount",
                    "--uts",
                    "--propagation",
                    "private",
                    "--",
                    sys.executable,
                    "-m",
                    "controlplane.launch",
                    str(spec_file),
                ],  # fmt: skip
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env={"PATH": NODE_PATH, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
            )
        (self.dir / f"{c['name']}.pgid").write_text(str(proc.pid))
        return Container(c, proc, spec_file)

    def _terminated(self, ctr: Container, code: int) -> dict[str, Any]:
        err_file = ctr.spec_file.with_suffix(".json.error")
        if err_file.exists():  # never got to run: the runtime's StartError
            return {
                "terminated": {
                    "exitCode": 128,
                    "reason": "StartError",
                    "message": err_file.read_text()[:1000],
                    "startedAt": None,
                    "finishedAt": now(),
                    "containerID": f"{RUNTIME}://{ctr.proc.pid}",
                }
            }
        return {
            "terminated": {
                "exitCode": code,
                "reason": terminated_reason(code),
                "startedAt": ctr.started_at,
                "finishedAt": now(),
                "containerID": f"{RUNTIME}://{ctr.proc.pid}",
            }
        }

    def kill(self, grace: float) -> None:
        """SIGTERM every running container's process group, then SIGKILL after ``grace`` seconds."""
        with self.lock:
            procs = [c.proc for c in self.running.values()]
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(p.poll() is None for p in procs):
            time.sleep(0.1)
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
        for p in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=5)

    # -- the pod's life ---------------------------------------------------------------------

    def run(self) -> None:
        try:
            self._run()
        except Exception:
            log.exception("pod %s/%s", self.ns, self.name)
        finally:
            if self.running:
                self.kill(0)

    def _prepare(self) -> dict[str, tuple[Path, bool]] | None:
        """The volumes, retried while something is missing; None when the pod is deleted first."""
        spec = self.pod["spec"]
        self._cond("PodReadyToStartContainers", False)
        self._cond(
            "Initialized",
            not spec.get("initContainers"),
            None if not spec.get("initContainers") else "ContainersNotInitialized",
        )
        self._cond("Ready", False, "ContainersNotReady")
        self._cond("ContainersReady", False, "ContainersNotReady")
        self._waiting_all("ContainerCreating")
        self.publish()
        last = ""
        while not self.delete_requested.is_set():
            try:
                self.dir.mkdir(parents=True, exist_ok=True)
                vols = self.volumes()
                self._cond("PodReadyToStartContainers", True)
                return vols
            except NotReady as err:
                if str(err) != last:
                    last = str(err)
                    log.info("pod %s/%s waits: %s", self.ns, self.name, err)
                    self._waiting_all("ContainerCreating", f"MountVolume.SetUp failed: {err}")
                    self.publish()
            except (ConfigError, ApiException) as err:
                text = _api_message(err) if isinstance(err, ApiException) else str(err)
                if text != last:
                    last = text
                    log.info("pod %s/%s cannot start: %s", self.ns, self.name, text)
                    self._waiting_all("CreateContainerConfigError", text[:500])
                    self.publish()
            self.delete_requested.wait(2)
        return None

    def _finish(self, phase: str, reason: str | None = None) -> None:
        self.status["phase"] = phase
        if reason:
            self.status["reason"] = reason
        self._cond("Ready", False, "PodCompleted" if phase == "Succeeded" else "PodFailed")
        self._cond(
            "ContainersReady", False, "PodCompleted" if phase == "Succeeded" else "PodFailed"
        )
        self._cond("PodReadyToStartContainers", False)
        self.publish()

    def _run_one(
        self,
        c: Mapping[str, Any],
        vols: dict[str, tuple[Path, bool]],
        statuses: dict[str, dict[str, Any]],
    ) -> Container | None:
        """Start ``c``; on a config error mark it waiting and return None."""
        try:
            ctr = self.start_container(c, vols)
        except ConfigError as err:
            statuses[c["name"]] = self._cstatus(
                c, {"waiting": {"reason": "CreateContainerConfigError", "message": str(err)}}
            )
            return None
        with self.lock:
            self.running[c["name"]] = ctr
        statuses[c["name"]] = self._cstatus(
            c, {"running": {"startedAt": ctr.started_at}}, ready=statuses is self.main_status
        )
        statuses[c["name"]]["containerID"] = f"{RUNTIME}://{ctr.proc.pid}"
        return ctr

    def _run(self) -> None:
        spec = self.pod["spec"]
        policy = spec.get("restartPolicy", "Always")
        vols = self._prepare()
        if vols is None:
            return self._deleted()
        # init containers, one after another
        for c in spec.get("initContainers") or []:
            while True:
                ctr = self._run_one(c, vols, self.init_status)
                self.status["phase"] = "Pending"
                self.publish()
                if ctr is None:
                    if self.delete_requested.wait(2):
                        return self._deleted()
                    continue
                code = self._wait_one(ctr)
                if code is None:
                    return self._deleted()
                self.init_status[c["name"]] = self._cstatus(c, self._terminated(ctr, code))
                if code == 0:
                    break
                if policy == "Never":
                    self._cond("Initialized", False, "ContainersNotInitialized")
                    return self._finish("Failed")
                self.restart_counts[c["name"]] = self.restart_counts.get(c["name"], 0) + 1
                if self.delete_requested.wait(_backoff(self.restart_counts[c["name"]])):
                    return self._deleted()
        self._cond("Initialized", True)
        # the containers, together
        pending = list(spec["containers"])
        results: dict[str, int] = {}
        while True:
            for c in pending:
                if self._run_one(c, vols, self.main_status) is None:
                    results.setdefault(c["name"], -1)
            pending = []
            live = [n for n in self.running]
            if live:
                self.status["phase"] = "Running"
                all_ready = all(s.get("ready") for s in self.main_status.values())
                self._cond(
                    "ContainersReady", all_ready, None if all_ready else "ContainersNotReady"
                )
                self._cond("Ready", all_ready, None if all_ready else "ContainersNotReady")
            self.publish()
            if not live:
                if self.delete_requested.wait(2):
                    return self._deleted()
                pending = [c for c in spec["containers"] if results.get(c["name"]) == -1]
                if pending:
                    continue
            while not self.delete_requested.is_set():
                done = [
                    (n, ctr) for n, ctr in list(self.running.items()) if ctr.proc.poll() is not None
                ]
                if done:
                    break
                self.delete_requested.wait(0.2)
            if self.delete_requested.is_set():
                return self._deleted()
            for name, ctr in done:
                code = exit_code(ctr.proc.returncode)
                with self.lock:
                    del self.running[name]
                (self.dir / f"{name}.pgid").unlink(missing_ok=True)
                c = ctr.spec
                term = self._terminated(ctr, code)
                code = term["terminated"]["exitCode"]
                restart = policy == "Always" or (policy == "OnFailure" and code != 0)
                if restart:
                    self.restart_counts[name] = self.restart_counts.get(name, 0) + 1
                    self.main_status[name] = self._cstatus(
                        c, {"waiting": {"reason": "CrashLoopBackOff"}}, last=term
                    )
                    pending.append(c)
                else:
                    self.main_status[name] = self._cstatus(c, term)
                    results[name] = code
            self._cond("ContainersReady", False, "ContainersNotReady")
            self._cond("Ready", False, "ContainersNotReady")
            if not self.running and not pending:
                ok = all(code == 0 for code in results.values())
                return self._finish("Succeeded" if ok else "Failed")
            self.publish()
            if pending:
                longest = max(_backoff(self.restart_counts[c["name"]]) for c in pending)
                if self.delete_requested.wait(longest):
                    return self._deleted()

    def _wait_one(self, ctr: Container) -> int | None:
        while ctr.proc.poll() is None:
            if self.delete_requested.wait(0.2):
                return None
        with self.lock:
            self.running.pop(ctr.spec["name"], None)
        (self.dir / f"{ctr.spec['name']}.pgid").unlink(missing_ok=True)
        return exit_code(ctr.proc.returncode)

    def _deleted(self) -> None:
        """Deleted while running: end the processes, report them terminated, remove the pod."""
        with self.lock:
            live = dict(self.running)
        self.kill(self.grace)
        if not self.gone.is_set():
            for name, ctr in live.items():
                code = exit_code(
                    ctr.proc.returncode if ctr.proc.returncode is not None else -signal.SIGKILL
                )
                statuses = self.init_status if name in self.init_status else self.main_status
                statuses[name] = self._cstatus(ctr.spec, self._terminated(ctr, code))
                (self.dir / f"{name}.pgid").unlink(missing_ok=True)
            with self.lock:
                self.running.clear()
            if self.status["phase"] not in ("Succeeded", "Failed"):
                # as the kubelet: a deleted pod ends Succeeded only if every container exited 0
                codes = [
                    s["state"].get("terminated", {}).get("exitCode", 1)
                    for s in self.main_status.values()
                ]
                self._finish("Succeeded" if codes and not any(codes) else "Failed")
            self.runner.api.delete_pod(self.ns, self.name, self.uid)
        self.cleanup()

    def cleanup(self) -> None:
        shutil.rmtree(self.dir / "volumes", ignore_errors=True)

    def on_update(self, pod: dict[str, Any]) -> None:
        meta = pod["metadata"]
        if meta.get("deletionTimestamp") and not self.delete_requested.is_set():
            self.grace = float(meta.get("deletionGracePeriodSeconds") or 0)
            self.delete_requested.set()
            if not self.is_alive():  # it had finished already: just remove the pod
                self.runner.api.delete_pod(self.ns, self.name, self.uid)
                self.cleanup()


def _api_message(err: ApiException) -> str:
    """The API server's own message of a failed call (its Status), not the HTTP dump."""
    try:
        return json.loads(err.body)["message"]
    except (TypeError, ValueError, KeyError):
        return f"{err.status} {err.reason}"


def _backoff(restarts: int) -> float:
    """The kubelet's crash-loop back-off: 10 s doubling up to 5 minutes."""
    return min(10.0 * 2 ** max(restarts - 1, 0), 300.0)


class NodeRunner:
    def __init__(self, layout: Layout, kubeconfig: str, apiserver_port: int) -> None:
        self.layout = layout
        self.api = Api(kubeconfig)
        self.apiserver_port = apiserver_port
        self.node = layout.versions.node
        self.ip = node_ip()
        self.pod_python = sys.executable
        self.pod_pythonpath = os.environ.get("VISIONR1_POD_PYTHONPATH", "")
        self.allocatable = {
            "cpu": self.node.cpu,
            "memory": self.node.memory,
            "pods": str(self.node.pods),
            "ephemeral-storage": "1Ti",
            "nvidia.com/gpu": str(self.node.gpus),
        }
        self.workers: dict[str, PodWorker] = {}
        self.stopping = threading.Event()
        self.service = False
        self.masks = hidden_ancestors(
            [sys.base_prefix, sys.prefix, *filter(None, self.pod_pythonpath.split(os.pathsep))]
        )

    # -- the Node and its heartbeat ---------------------------------------------------------

    def register(self) -> None:
        labels = {
            "kubernetes.io/hostname": self.node.name,
            "kubernetes.io/os": "linux",
            "kubernetes.io/arch": {"x86_64": "amd64", "aarch64": "arm64"}.get(
                platform.machine(), platform.machine()
            ),
            "nvidia.com/gpu.present": "true",
            "nvidia.com/gpu.product": self.node.gpu_product,
            "nvidia.com/gpu.count": str(self.node.gpus),
        }
        body = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": self.node.name, "labels": labels},
        }
        try:
            self.api.core.create_node(body, _preload_content=False)
        except ApiException as err:
            if err.status != 409:
                raise
            self.api.core.patch_node(
                self.node.name,
                {"metadata": {"labels": labels}},
                _content_type="application/strategic-merge-patch+json",
                _preload_content=False,
            )
        self.post_status()

    def post_status(self) -> None:
        t = now()

        def cond(kind: str, status: str, reason: str, message: str) -> dict[str, str]:
            return {
                "type": kind,
                "status": status,
                "reason": reason,
                "message": message,
                "lastHeartbeatTime": t,
                "lastTransitionTime": self.since,
            }

        uname = platform.uname()
        status = {
            "capacity": self.allocatable,
            "allocatable": self.allocatable,
            "conditions": [
                cond(
                    "MemoryPressure",
                    "False",
                    "KubeletHasSufficientMemory",
                    "the node runner does not measure memory",
                ),
                cond(
                    "DiskPressure",
                    "False",
                    "KubeletHasNoDiskPressure",
                    "the node runner does not measure disk",
                ),
                cond(
                    "PIDPressure",
                    "False",
                    "KubeletHasSufficientPID",
                    "the node runner does not measure pids",
                ),
                cond(
                    "Ready", "True", "KubeletReady", "visionr1 node runner is posting ready status"
                ),
            ],
            "addresses": [
                {"type": "InternalIP", "address": self.ip},
                {"type": "Hostname", "address": self.node.name},
            ],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": 0}},
            "nodeInfo": {
                "machineID": "",
                "systemUUID": "",
                "bootID": "",
                "kernelVersion": uname.release,
                "osImage": f"{uname.system} (visionr1 local node)",
                "containerRuntimeVersion": f"{RUNTIME}://1",
                "kubeletVersion": self.layout.versions.kubernetes.version,
                "kubeProxyVersion": "",
                "operatingSystem": "linux",
                "architecture": {"x86_64": "amd64", "aarch64": "arm64"}.get(
                    uname.machine, uname.machine
                ),
            },
        }
        self.api.core.patch_node_status(
            self.node.name,
            {"status": status},
            _content_type="application/strategic-merge-patch+json",
            _preload_content=False,
        )

    def renew_lease(self) -> None:
        body = {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": self.node.name, "namespace": "kube-node-lease"},
            "spec": {
                "holderIdentity": self.node.name,
                "leaseDurationSeconds": LEASE_SECONDS,
                "renewTime": _micro(),
            },
        }
        try:
            self.api.coordination.patch_namespaced_lease(
                self.node.name,
                "kube-node-lease",
                {"spec": body["spec"]},
                _content_type="application/merge-patch+json",
                _preload_content=False,
            )
        except ApiException as err:
            if err.status != 404:
                raise
            self.api.coordination.create_namespaced_lease(
                "kube-node-lease", body, _preload_content=False
            )

    def heartbeat(self) -> None:
        beat = 0
        while not self.stopping.wait(10):
            try:
                self.renew_lease()
                beat += 1
                if beat % 3 == 0:
                    self.post_status()
            except Exception as err:  # the API server may be restarting: try again next time
                log.warning("heartbeat failed: %s", err)

    # -- pods -------------------------------------------------------------------------------

    def handle(self, kind: str, pod: dict[str, Any]) -> None:
        uid = pod["metadata"]["uid"]
        worker = self.workers.get(uid)
        if kind == "DELETED":
            worker = self.workers.pop(uid, None)
            if worker is not None:
                worker.gone.set()
                worker.grace = 0
                worker.delete_requested.set()
            return
        if worker is None:
            phase = (pod.get("status") or {}).get("phase")
            if phase in ("Succeeded", "Failed"):
                if pod["metadata"].get("deletionTimestamp"):
                    self.api.delete_pod(pod["metadata"]["namespace"], pod["metadata"]["name"], uid)
                return
            statuses = (pod.get("status") or {}).get("containerStatuses") or []
            if any("running" in (cs.get("state") or {}) for cs in statuses) and not pod[
                "metadata"
            ].get("deletionTimestamp"):
                self._lost(pod)
                return
            worker = PodWorker(self, pod)
            self.workers[uid] = worker
            if pod["metadata"].get("deletionTimestamp"):
                self.api.delete_pod(worker.ns, worker.name, uid)
                return
            worker.start()
            return
        worker.on_update(pod)

    def _lost(self, pod: dict[str, Any]) -> None:
        """A pod this node ran before the runner restarted: its processes are gone."""
        meta = pod["metadata"]
        statuses = [
            {
                **cs,
                "ready": False,
                "started": False,
                "state": {
                    "terminated": {
                        "exitCode": 137,
                        "reason": "Error",
                        "message": "the node runner restarted; the process was lost",
                        "finishedAt": now(),
                    }
                },
            }
            for cs in pod["status"].get("containerStatuses") or []
        ]
        with contextlib.suppress(ApiException):
            self.api.patch_pod_status(
                meta["namespace"], meta["name"], {"phase": "Failed", "containerStatuses": statuses}
            )

    def watch_pods(self) -> None:
        selector = f"spec.nodeName={self.node.name}"
        while not self.stopping.is_set():
            try:
                resp = self.api.core.list_pod_for_all_namespaces(
                    field_selector=selector, _preload_content=False
                )
                listing = json.loads(resp.data)
                for pod in listing["items"]:
                    self.handle("ADDED", pod)
                version = listing["metadata"]["resourceVersion"]
                stream = watch.Watch()
                for event in stream.stream(
                    self.api.core.list_pod_for_all_namespaces,
                    field_selector=selector,
                    resource_version=version,
                    timeout_seconds=300,
                    allow_watch_bookmarks=False,
                ):
                    if self.stopping.is_set():
                        stream.stop()
                        break
                    if event["type"] in ("ADDED", "MODIFIED", "DELETED"):
                        self.handle(event["type"], event["raw_object"])
            except ApiException as err:
                if err.status != 410:
                    log.warning("watching pods: %s %s", err.status, err.reason)
                    self.stopping.wait(1)
            except Exception as err:  # a dropped connection: list again
                log.warning("watching pods: %s", err)
                self.stopping.wait(1)

    def stop(self, *_: Any) -> None:
        """End every pod process (the node is going away) and exit."""
        self.stopping.set()
        for worker in list(self.workers.values()):
            worker.grace = min(worker.grace, 5)
            worker.kill(2)
        os._exit(0)

    def serve(self) -> None:
        self.since = now()
        self.layout.pods.mkdir(parents=True, exist_ok=True)
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)
        try:
            ServiceForwarder(self.apiserver_port).start()
            self.service = True
        except OSError as err:  # the address is taken: pods reach the API server by IP only
            log.warning("kubernetes.default.svc not served to pods: %s", err)
        self.register()
        self.renew_lease()
        threading.Thread(target=self.heartbeat, name="heartbeat", daemon=True).start()
        log.info("node %s registered (%s); watching its pods", self.node.name, self.ip)
        self.watch_pods()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="noderunner")
    parser.add_argument("--repo", type=Path, required=True)
    parser.add_argument("--kubeconfig", required=True)
    parser.add_argument("--apiserver-port", type=int, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(threadName)s %(message)s"
    )
    NodeRunner(Layout.for_repo(args.repo), args.kubeconfig, args.apiserver_port).serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
