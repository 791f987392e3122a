"""The Kubernetes Pod Security Standards, "restricted" profile (which includes "baseline"), as
checks on a pod spec: what the API server's PodSecurity admission enforces in a namespace
labelled ``pod-security.kubernetes.io/enforce=restricted``.

Written from https://kubernetes.io/docs/concepts/security/pod-security-standards/ (policy
version "latest", Kubernetes 1.33), one function per control of the two tables; each returns the
violations it finds, as "<field path>: <what is wrong>". Only what a pod spec can carry is
checked (the AppArmor annotations of the metadata too, when given).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

# Baseline "Capabilities": what a container may add.
BASELINE_CAPABILITIES = frozenset(
    {
        "AUDIT_WRITE",
        "CHOWN",
        "DAC_OVERRIDE",
        "FOWNER",
        "FSETID",
        "KILL",
        "MKNOD",
        "NET_BIND_SERVICE",
        "SETFCAP",
        "SETGID",
        "SETPCAP",
        "SETUID",
        "SYS_CHROOT",
    }
)
# Baseline "Sysctls": the safe set.
SAFE_SYSCTLS = frozenset(
    {
        "kernel.shm_rmid_forced",
        "net.ipv4.ip_local_port_range",
        "net.ipv4.ip_unprivileged_port_start",
        "net.ipv4.tcp_syncookies",
        "net.ipv4.ping_group_range",
        "net.ipv4.ip_local_reserved_ports",
        "net.ipv4.tcp_keepalive_time",
        "net.ipv4.tcp_fin_timeout",
        "net.ipv4.tcp_keepalive_intvl",
        "net.ipv4.tcp_keepalive_probes",
    }
)
# Baseline "SELinux": allowed types.
SELINUX_TYPES = frozenset({"", "container_t", "container_init_t", "container_kvm_t"})
# Restricted "Volume Types": the only volume sources allowed.
RESTRICTED_VOLUMES = frozenset(
    {
        "configMap",
        "csi",
        "downwardAPI",
        "emptyDir",
        "ephemeral",
        "image",
        "persistentVolumeClaim",
        "projected",
        "secret",
    }
)

Violations = Iterator[str]


def containers(spec: Mapping[str, Any]) -> Iterator[tuple[str, Mapping[str, Any]]]:
    """(field path, container) of every container, init and ephemeral ones included."""
    for kind in ("initContainers", "containers", "ephemeralContainers"):
        for i, c in enumerate(spec.get(kind) or []):
            yield f"spec.{kind}[{i}]({c.get('name')})", c


def _sc(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    return obj.get("securityContext") or {}


# ------------------------------------------------------------------------------------ baseline


def host_process(spec: Mapping[str, Any]) -> Violations:
    if (_sc(spec).get("windowsOptions") or {}).get("hostProcess"):
        yield "spec.securityContext.windowsOptions.hostProcess: must be unset or false"
    for path, c in containers(spec):
        if (_sc(c).get("windowsOptions") or {}).get("hostProcess"):
            yield f"{path}.securityContext.windowsOptions.hostProcess: must be unset or false"


def host_namespaces(spec: Mapping[str, Any]) -> Violations:
    for field in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(field):
            yield f"spec.{field}: must be unset or false"


def privileged(spec: Mapping[str, Any]) -> Violations:
    for path, c in containers(spec):
        if _sc(c).get("privileged"):
            yield f"{path}.securityContext.privileged: must be unset or false"


def capabilities_baseline(spec: Mapping[str, Any]) -> Violations:
    for path, c in containers(spec):
        added = set((_sc(c).get("capabilities") or {}).get("add") or [])
        if added - BASELINE_CAPABILITIES:
            yield f"{path}.securityContext.capabilities.add: {sorted(added)} not allowed"


def host_path_volumes(spec: Mapping[str, Any]) -> Violations:
    for i, v in enumerate(spec.get("volumes") or []):
        if "hostPath" in v:
            yield f"spec.volumes[{i}]({v.get('name')}).hostPath: forbidden"


def host_ports(spec: Mapping[str, Any]) -> Violations:
    for path, c in containers(spec):
        for j, port in enumerate(c.get("ports") or []):
            if port.get("hostPort"):
                yield f"{path}.ports[{j}].hostPort: must be unset or 0"


def app_armor(spec: Mapping[str, Any], meta: Mapping[str, Any]) -> Violations:
    allowed = {None, "RuntimeDefault", "Localhost"}
    if (_sc(spec).get("appArmorProfile") or {}).get("type") not in allowed:
        yield "spec.securityContext.appArmorProfile.type: must be RuntimeDefault or Localhost"
    for path, c in containers(spec):
        if (_sc(c).get("appArmorProfile") or {}).get("type") not in allowed:
            yield f"{path}.securityContext.appArmorProfile.type: RuntimeDefault or Localhost"
    for key, value in (meta.get("annotations") or {}).items():
        if key.startswith("container.apparmor.security.beta.kubernetes.io/"):
            if value != "runtime/default" and not value.startswith("localhost/"):
                yield f"metadata.annotations[{key}]: must be runtime/default or localhost/*"


def se_linux(spec: Mapping[str, Any]) -> Violations:
    for path, obj in [("spec", spec), *containers(spec)]:
        opts = _sc(obj).get("seLinuxOptions") or {}
        if opts.get("type", "") not in SELINUX_TYPES:
            yield f"{path}.securityContext.seLinuxOptions.type: {opts['type']!r} not allowed"
        for field in ("user", "role"):
            if opts.get(field):
                yield f"{path}.securityContext.seLinuxOptions.{field}: must be unset"


def proc_mount(spec: Mapping[str, Any]) -> Violations:
    for path, c in containers(spec):
        if _sc(c).get("procMount", "Default") != "Default":
            yield f"{path}.securityContext.procMount: must be unset or Default"


def seccomp_baseline(spec: Mapping[str, Any]) -> Violations:
    for path, obj in [("spec", spec), *containers(spec)]:
        if (_sc(obj).get("seccompProfile") or {}).get("type") == "Unconfined":
            yield f"{path}.securityContext.seccompProfile.type: must not be Unconfined"


def sysctls(spec: Mapping[str, Any]) -> Violations:
    for s in _sc(spec).get("sysctls") or []:
        if s.get("name") not in SAFE_SYSCTLS:
            yield f"spec.securityContext.sysctls: {s.get('name')} is not a safe sysctl"


# ---------------------------------------------------------------------------------- restricted


def volume_types(spec: Mapping[str, Any]) -> Violations:
    for i, v in enumerate(spec.get("volumes") or []):
        sources = set(v) - {"name"}
        if not sources <= RESTRICTED_VOLUMES:
            yield f"spec.volumes[{i}]({v.get('name')}): {sorted(sources)} not allowed"


def privilege_escalation(spec: Mapping[str, Any]) -> Violations:
    for path, c in containers(spec):
        if _sc(c).get("allowPrivilegeEscalation") is not False:
            yield f"{path}.securityContext.allowPrivilegeEscalation: must be false"


def run_as_non_root(spec: Mapping[str, Any]) -> Violations:
    pod = _sc(spec).get("runAsNonRoot")
    for path, c in containers(spec):
        own = _sc(c).get("runAsNonRoot")
        if own is False or (own is None and pod is not True):
            yield f"{path}.securityContext.runAsNonRoot: must be true (here or on the pod)"


def run_as_user(spec: Mapping[str, Any]) -> Violations:
    for path, obj in [("spec", spec), *containers(spec)]:
        if _sc(obj).get("runAsUser") == 0:
            yield f"{path}.securityContext.runAsUser: must not be 0"


def seccomp_restricted(spec: Mapping[str, Any]) -> Violations:
    allowed = {"RuntimeDefault", "Localhost"}
    pod = (_sc(spec).get("seccompProfile") or {}).get("type")
    for path, c in containers(spec):
        own = (_sc(c).get("seccompProfile") or {}).get("type")
        if (own or pod) not in allowed:
            yield f"{path}.securityContext.seccompProfile.type: RuntimeDefault or Localhost"


def capabilities_restricted(spec: Mapping[str, Any]) -> Violations:
    for path, c in containers(spec):
        caps = _sc(c).get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or []):
            yield f"{path}.securityContext.capabilities.drop: must include ALL"
        if set(caps.get("add") or []) - {"NET_BIND_SERVICE"}:
            yield f"{path}.securityContext.capabilities.add: only NET_BIND_SERVICE"


BASELINE: tuple[Callable[..., Violations], ...] = (
    host_process,
    host_namespaces,
    privileged,
    capabilities_baseline,
    host_path_volumes,
    host_ports,
    se_linux,
    proc_mount,
    seccomp_baseline,
    sysctls,
)
RESTRICTED: tuple[Callable[..., Violations], ...] = (
    volume_types,
    privilege_escalation,
    run_as_non_root,
    run_as_user,
    seccomp_restricted,
    capabilities_restricted,
)


def restricted_violations(
    spec: Mapping[str, Any], meta: Mapping[str, Any] | None = None
) -> list[str]:
    """Every way the pod ``spec`` breaks the restricted profile (empty: admitted)."""
    out = [v for check in (*BASELINE, *RESTRICTED) for v in check(spec)]
    return out + list(app_armor(spec, meta or {}))
