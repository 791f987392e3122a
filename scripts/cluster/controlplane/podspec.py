"""Pure pieces of the node runner: a pod's env, its mounts, its status, the way a kubelet computes them.

Nothing here talks to the API server or starts a process; ``noderunner`` does, with these.
"""

from __future__ import annotations

import datetime as dt
import math
import os
import re
from collections.abc import Callable, Mapping
from decimal import Decimal
from pathlib import Path, PurePosixPath
from typing import Any

Pod = Mapping[str, Any]
Lookup = Callable[[str, str], Mapping[str, str] | None]  # (kind, name) → data, None if missing

JOB_COMPLETION_INDEX = "batch.kubernetes.io/job-completion-index"
NODE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class ConfigError(Exception):
    """The container cannot start as specified (a kubelet's CreateContainerConfigError)."""


class NotReady(Exception):
    """Something the pod needs does not exist yet (a kubelet keeps the pod Pending and retries)."""


def now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# -- quantities (resourceFieldRef) ----------------------------------------------------------------

_SUFFIX = {
    "": 1, "m": Decimal("0.001"), "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15,
    "E": 10**18, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
}  # fmt: skip


def quantity(text: str) -> Decimal:
    m = re.fullmatch(r"([+-]?[0-9.]+(?:[eE][+-]?\d+)?)([a-zA-Z]*)", str(text).strip())
    if not m or m.group(2) not in _SUFFIX:
        raise ConfigError(f"invalid quantity {text!r}")
    return Decimal(m.group(1)) * Decimal(_SUFFIX[m.group(2)])


def resource_field(
    pod: Pod,
    container: Mapping[str, Any] | None,
    ref: Mapping[str, Any],
    allocatable: Mapping[str, str],
) -> str:
    """limits.cpu etc.: the container's value, or the node's allocatable when it sets none (as the
    kubelet does), divided by the divisor and rounded up."""
    if container is None:
        name = ref.get("containerName")
        container = next((c for c in pod["spec"]["containers"] if c["name"] == name), None)
        if container is None:
            raise ConfigError(f"resourceFieldRef names unknown container {name!r}")
    kind, _, res = ref["resource"].partition(".")
    resources = container.get("resources") or {}
    value = (resources.get(kind) or {}).get(res)
    if value is None and kind == "requests":
        value = (resources.get("limits") or {}).get(res)
    if value is None:
        value = allocatable.get(res, "0")
    divisor = quantity(ref.get("divisor") or "1")
    return str(math.ceil(quantity(value) / divisor))


# -- fieldRef -------------------------------------------------------------------------------------


def field_value(pod: Pod, path: str, status: Mapping[str, Any]) -> str:
    meta = pod["metadata"]
    m = re.fullmatch(r"metadata\.(labels|annotations)\['([^']+)'\]", path)
    if m:
        return (meta.get(m.group(1)) or {}).get(m.group(2), "")
    simple = {
        "metadata.name": meta.get("name", ""),
        "metadata.namespace": meta.get("namespace", ""),
        "metadata.uid": meta.get("uid", ""),
        "spec.nodeName": pod["spec"].get("nodeName", ""),
        "spec.serviceAccountName": pod["spec"].get("serviceAccountName", ""),
        "status.hostIP": status.get("hostIP", ""),
        "status.hostIPs": status.get("hostIP", ""),
        "status.podIP": status.get("podIP", ""),
        "status.podIPs": status.get("podIP", ""),
    }
    if path in simple:
        return simple[path]
    if path in ("metadata.labels", "metadata.annotations"):  # downwardAPI volume files only
        items = meta.get(path.split(".")[1]) or {}
        return "\n".join(f'{k}="{v}"' for k, v in sorted(items.items()))
    raise ConfigError(f"fieldRef {path!r} is not supported")


# -- env ------------------------------------------------------------------------------------------

_REF = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


def expand(text: str, env: Mapping[str, str]) -> str:
    """$(VAR) → its value when VAR is defined, else left as is; $$ → $ (the kubelet's rules)."""

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        return env.get(m.group(1), m.group(0))

    return _REF.sub(sub, text)


def container_env(
    pod: Pod,
    container: Mapping[str, Any],
    lookup: Lookup,
    *,
    status: Mapping[str, Any],
    base: Mapping[str, str],
    allocatable: Mapping[str, str],
) -> dict[str, str]:
    """The process environment: ``base`` (PATH, HOSTNAME, KUBERNETES_SERVICE_*), then envFrom,
    then env, each value expanded against what came before."""
    env: dict[str, str] = dict(base)
    for source in container.get("envFrom") or []:
        prefix = source.get("prefix", "")
        for kind in ("configMapRef", "secretRef"):
            ref = source.get(kind)
            if ref is None:
                continue
            data = lookup(kind, ref["name"])
            if data is None:
                if ref.get("optional"):
                    continue
                raise ConfigError(
                    f'{"configmap" if kind == "configMapRef" else "secret"} "{ref["name"]}" not found'
                )
            for key, value in data.items():
                env[prefix + key] = value
    for var in container.get("env") or []:
        name = var["name"]
        if "value" in var or "valueFrom" not in var:
            env[name] = expand(var.get("value", ""), env)
            continue
        src = var["valueFrom"]
        if "fieldRef" in src:
            env[name] = field_value(pod, src["fieldRef"]["fieldPath"], status)
        elif "resourceFieldRef" in src:
            env[name] = resource_field(pod, container, src["resourceFieldRef"], allocatable)
        else:
            kind = "configMapRef" if "configMapKeyRef" in src else "secretRef"
            ref = src.get("configMapKeyRef") or src.get("secretKeyRef")
            data = lookup(kind, ref["name"])
            what = "configmap" if kind == "configMapRef" else "secret"
            if data is None or ref["key"] not in data:
                if ref.get("optional"):
                    continue
                missing = (
                    f'{what} "{ref["name"]}" not found'
                    if data is None
                    else f"couldn't find key {ref['key']} in {what} {ref['name']}"
                )
                raise ConfigError(missing)
            env[name] = data[ref["key"]]
    return env


# -- mounts ---------------------------------------------------------------------------------------


def safe_join(root: Path, sub: str) -> Path:
    """``root/sub`` for a relative ``sub`` that stays inside ``root`` (no .., not absolute)."""
    pure = PurePosixPath(sub)
    if pure.is_absolute() or ".." in pure.parts:
        raise ConfigError(f"subPath {sub!r} must be a relative path without '..'")
    return root.joinpath(*pure.parts)


def make_sub_path(root: Path, sub: str) -> Path:
    """The subPath folder, created if missing the way the kubelet does it: every missing
    component owned by root with the mode of the volume's root folder."""
    target = safe_join(root, sub)
    if target.exists():
        return target
    mode = root.stat().st_mode & 0o7777
    current = root
    for part in target.relative_to(root).parts:
        current = current / part
        if not current.exists():
            current.mkdir()
            os.chown(current, 0, 0)
            current.chmod(mode)  # after mkdir, so the umask does not change it (as the kubelet)
    return target


def user_of(pod: Pod, container: Mapping[str, Any]) -> tuple[int, int, list[int]]:
    """(uid, gid, supplementary groups): the container's securityContext over the pod's; an image
    without USER runs as root, which runAsNonRoot refuses (as the kubelet does)."""
    pod_sc = pod["spec"].get("securityContext") or {}
    sc = container.get("securityContext") or {}
    uid = sc.get("runAsUser", pod_sc.get("runAsUser", 0))
    gid = sc.get("runAsGroup", pod_sc.get("runAsGroup", 0 if uid == 0 else uid))
    if sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) and uid == 0:
        raise ConfigError("container has runAsNonRoot and image will run as root")
    groups = list(pod_sc.get("supplementalGroups") or [])
    if "fsGroup" in pod_sc:
        groups.append(pod_sc["fsGroup"])
    return int(uid), int(gid), sorted(set(groups))


# -- status ---------------------------------------------------------------------------------------


def terminated_reason(code: int) -> str:
    return "Completed" if code == 0 else "Error"


def exit_code(returncode: int) -> int:
    """Popen's returncode → a container's exitCode (a signal N reads 128+N, as runtimes report)."""
    return 128 - returncode if returncode < 0 else returncode


def condition(kind: str, ok: bool, reason: str | None = None) -> dict[str, Any]:
    cond: dict[str, Any] = {
        "type": kind,
        "status": "True" if ok else "False",
        "lastTransitionTime": now(),
        "lastProbeTime": None,
    }
    if reason and not ok:
        cond["reason"] = reason
    return cond
