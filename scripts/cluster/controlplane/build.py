"""Build the pinned binaries once, from Go modules, into the cache; check a cached build still runs.

``go install k8s.io/kubernetes/cmd/...@vX`` is refused (that module replaces its staging modules
with local folders), so each component is built through a small generated wrapper module: it
requires the component's module at the pinned version, replaces each Kubernetes staging module with
its published version of the same release, and ``go build``s the commands. The Go build and module
caches are the user's own (``go env``), so a second clone on the machine builds warm.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from controlplane.config import Layout

Echo = Callable[[str], None]

K8S_COMMANDS = (
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kubectl",
    "kubelet",
    "kube-proxy",
)
CNI_PLUGINS = {
    "bridge": "plugins/main/bridge",
    "loopback": "plugins/main/loopback",
    "host-local": "plugins/ipam/host-local",
    "portmap": "plugins/meta/portmap",
}
NODE = (
    "containerd",
    "ctr",
    "containerd-shim-runc-v2",
    "runc",
    "crictl",
    "coredns",
    "local-path-provisioner",
    "registry",
    *(f"cni/{p}" for p in CNI_PLUGINS),
)
REQUIRED = (*K8S_COMMANDS, "etcd", "helm", *NODE)
OPTIONAL = ("kwok",)
WRAPPER = "visionr1.local/control-plane"


class ClusterError(Exception):
    """A failure the user can act on; ``str()`` is the one line to print."""


class GoMissing(ClusterError):
    pass


class BuildFailed(ClusterError):
    pass


class DamagedCache(ClusterError):
    pass


@dataclass(frozen=True)
class Component:
    name: str  # the wrapper module's folder
    module: str  # what the wrapper requires
    version: str
    commands: dict[str, str]  # binary → Go package
    ldflags: tuple[str, ...] = ()
    staging: str | None = None  # Kubernetes only: the published version of each staging module
    main: str | None = None  # a wrapper main.go instead of building the module's own command
    tags: tuple[str, ...] = ()
    cgo: bool = False  # runc's seccomp support links libseccomp
    optional: bool = False  # built only when asked for (KWOK: the load benchmark)


ETCD_MAIN = """// Command etcd: the etcd server of the pinned release, started exactly as etcd's own main does.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
"""


def components(layout: Layout) -> list[Component]:
    v = layout.versions
    k8s = v.kubernetes.version
    major, minor = k8s.lstrip("v").split(".")[:2]
    stamp = []
    for pkg in ("k8s.io/component-base/version", "k8s.io/client-go/pkg/version"):
        stamp += [
            f"-X {pkg}.gitVersion={k8s}",
            f"-X {pkg}.gitMajor={major}",
            f"-X {pkg}.gitMinor={minor}",
            f"-X {pkg}.gitTreeState=clean",
        ]
    return [
        Component(
            "kubernetes",
            "k8s.io/kubernetes",
            k8s,
            {c: f"k8s.io/kubernetes/cmd/{c}" for c in K8S_COMMANDS},
            ldflags=tuple(stamp),
            staging=v.kubernetes.staging,
        ),
        Component(
            "etcd",
            "go.etcd.io/etcd/server/v3",
            v.etcd.version,
            {"etcd": f"{WRAPPER}/etcd"},
            main=ETCD_MAIN,
        ),
        Component(
            "helm",
            "helm.sh/helm/v3",
            v.helm.version,
            {"helm": "helm.sh/helm/v3/cmd/helm"},
            ldflags=(f"-X helm.sh/helm/v3/internal/version.version={v.helm.version}",),
        ),
        Component(
            "kwok",
            "sigs.k8s.io/kwok",
            v.kwok.version,
            {"kwok": "sigs.k8s.io/kwok/cmd/kwok"},
            optional=True,
        ),
        Component(
            "containerd",
            "github.com/containerd/containerd/v2",
            v.containerd.version,
            {
                c: f"github.com/containerd/containerd/v2/cmd/{c}"
                for c in ("containerd", "ctr", "containerd-shim-runc-v2")
            },
            ldflags=(
                f"-X github.com/containerd/containerd/v2/version.Version={v.containerd.version}",
            ),
            tags=("no_btrfs", "no_devmapper", "no_zfs"),
        ),
        Component(
            "runc",
            "github.com/opencontainers/runc",
            v.runc.version,
            {"runc": "github.com/opencontainers/runc"},
            ldflags=(f"-X main.version={v.runc.version.lstrip('v')}",),
            tags=("seccomp",),
            cgo=True,
        ),
        Component(
            "cri-tools",
            "sigs.k8s.io/cri-tools",
            v.cri_tools.version,
            {"crictl": "sigs.k8s.io/cri-tools/cmd/crictl"},
        ),
        Component(
            "cni-plugins",
            "github.com/containernetworking/plugins",
            v.cni_plugins.version,
            {
                f"cni/{name}": f"github.com/containernetworking/plugins/{pkg}"
                for name, pkg in CNI_PLUGINS.items()
            },
        ),
        Component(
            "coredns",
            "github.com/coredns/coredns",
            v.coredns.version,
            {"coredns": "github.com/coredns/coredns"},
        ),
        Component(
            "local-path-provisioner",
            "github.com/rancher/local-path-provisioner",
            v.local_path_provisioner.version,
            {"local-path-provisioner": "github.com/rancher/local-path-provisioner"},
        ),
        Component(
            "registry",
            "github.com/distribution/distribution/v3",
            v.registry.version,
            {"registry": "github.com/distribution/distribution/v3/cmd/registry"},
        ),
    ]


def go_env(*, cgo: bool = False) -> dict[str, str]:
    """The environment for ``go``: the user's caches even when XDG_CACHE_HOME points elsewhere
    (the test suite does that), no cgo unless asked (static binaries), no VCS stamping."""
    env = dict(os.environ)
    home = Path.home()
    env.setdefault("GOCACHE", str(home / ".cache" / "go-build"))
    env.setdefault("GOPATH", str(home / "go"))
    env.setdefault("GOMODCACHE", str(Path(env["GOPATH"].split(os.pathsep)[0]) / "pkg" / "mod"))
    env["CGO_ENABLED"] = "1" if cgo else "0"
    env["GOFLAGS"] = "-buildvcs=false -mod=mod"
    env.setdefault("GOTOOLCHAIN", "local")
    return env


def check_go(minimum: str) -> str:
    go = shutil.which("go")
    if go is None:
        raise GoMissing(
            f"Go not found on PATH: the control plane is built from Go modules once; "
            f"install Go >= {minimum} (https://go.dev/dl) and rerun"
        )
    out = subprocess.run([go, "env", "GOVERSION"], capture_output=True, text=True, env=go_env())
    found = out.stdout.strip()
    have = tuple(int(x) for x in re.findall(r"\d+", found)[:2])
    want = tuple(int(x) for x in minimum.split(".")[:2])
    if out.returncode != 0 or have < want:
        raise GoMissing(
            f"Go {found or '(unknown)'} at {go} is older than {minimum}: install Go >= {minimum}"
        )
    return found


def _go(args: list[str], cwd: Path, what: str, log: Path, *, cgo: bool = False) -> None:
    with log.open("a") as out:
        out.write(f"$ go {' '.join(args)}\n")
        out.flush()
        proc = subprocess.run(
            ["go", *args],
            cwd=cwd,
            env=go_env(cgo=cgo),
            stdout=out,
            stderr=subprocess.PIPE,
            text=True,
        )
        out.write(proc.stderr)
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
        last = lines[-1] if lines else f"exit {proc.returncode}"
        raise BuildFailed(f"building {what} failed: {last} (full output: {log})")


def _staging_modules(module_version: str, cwd: Path, log: Path) -> list[str]:
    """The modules ``k8s.io/kubernetes`` replaces with its own staging folders."""
    proc = subprocess.run(
        ["go", "mod", "download", "-json", module_version],
        cwd=cwd,
        env=go_env(),
        capture_output=True,
        text=True,
    )
    with log.open("a") as out:
        out.write(f"$ go mod download -json {module_version}\n{proc.stdout}{proc.stderr}")
    if proc.returncode != 0:
        try:  # go reports the reason in the JSON's Error field
            why = json.loads(proc.stdout)["Error"]
        except (ValueError, KeyError):
            why = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
        why = " ".join(why.split())  # one line
        raise BuildFailed(f"downloading {module_version} failed: {why} (log: {log})")
    gomod = Path(json.loads(proc.stdout)["GoMod"]).read_text()
    return sorted(set(re.findall(r"^\s*(k8s\.io/[\w.-]+)\s*=>\s*\./staging/", gomod, re.M)))


def _write_wrapper(comp: Component, src: Path, log: Path) -> None:
    src.mkdir(parents=True, exist_ok=True)
    lines = [
        f"module {WRAPPER}/{comp.name}",
        "",
        "go 1.26",
        "",
        f"require {comp.module} {comp.version}",
        "",
    ]
    if comp.staging:
        staging = _staging_modules(f"{comp.module}@{comp.version}", src, log)
        if not staging:
            raise BuildFailed(
                f"{comp.module}@{comp.version}: no staging modules found in its go.mod"
            )
        lines += ["replace (", *(f"\t{m} => {m} {comp.staging}" for m in staging), ")", ""]
    (src / "go.mod").write_text("\n".join(lines))
    if comp.main:
        (src / "main.go").write_text(comp.main)
    else:
        imports = "\n".join(f'\t_ "{pkg}"' for pkg in comp.commands.values())
        (src / "tools.go").write_text(
            f"//go:build tools\n\n// The commands this module builds.\npackage tools\n\nimport (\n{imports}\n)\n"
        )


# How to ask each binary for its version (``--version`` when not listed): the cache check.
VERSION_ARGS = {
    "helm": ["version"],
    "kwok": ["version"],
    "kubectl": ["version", "--client"],
    "containerd-shim-runc-v2": ["-v"],
    "coredns": ["-version"],
    "registry": ["--version"],
}


def _runs(binary: Path) -> tuple[bool, str]:
    argv = [str(binary), *VERSION_ARGS.get(binary.name, ["--version"])]
    env = None
    if binary.parent.name == "cni":  # a CNI plugin answers CNI_COMMAND=VERSION on stdin's behalf
        argv, env = [str(binary)], {"CNI_COMMAND": "VERSION", "PATH": os.environ.get("PATH", "")}
    try:
        proc = subprocess.run(
            argv, capture_output=True, text=True, timeout=30, env=env, stdin=subprocess.DEVNULL
        )
    except OSError as err:
        return False, str(err)
    except subprocess.TimeoutExpired:
        return False, "timed out"
    text = (proc.stdout + proc.stderr).strip()
    return proc.returncode == 0, text.splitlines()[0] if text else f"exit {proc.returncode}"


def is_built(layout: Layout) -> bool:
    return all(layout.binary(b).is_file() for b in REQUIRED)


def verify(layout: Layout) -> None:
    """Raise :class:`DamagedCache` when a cached binary is missing or does not run."""

    def check(name: str) -> tuple[str, bool, str]:
        path = layout.binary(name)
        return (name, *(_runs(path) if path.is_file() else (False, "missing")))

    with ThreadPoolExecutor(len(REQUIRED)) as pool:  # together: this runs on every up
        results = list(pool.map(check, REQUIRED))
    for name, ok, why in results:
        path = layout.binary(name)
        if not ok:
            raise DamagedCache(
                f"the cached {name} ({path}) does not run ({why}): rebuild with "
                f"`python scripts/cluster/cli.py build --rebuild` (or delete {layout.cache})"
            )


def ensure_built(
    layout: Layout, echo: Echo, *, rebuild: bool = False, optional: bool = False
) -> dict[str, float]:
    """Build what the cache lacks (the optional KWOK too when ``optional``); return the build
    time of each component built now (seconds). One ``go build`` per component: the commands
    of a module share most of their packages, and one invocation compiles them in parallel."""
    wanted = [c for c in components(layout) if optional or not c.optional]
    missing = [c for c in wanted if any(not layout.binary(b).is_file() for b in c.commands)]
    if not rebuild and not missing:
        return {}
    check_go(layout.versions.go.minimum)
    layout.cache.mkdir(parents=True, exist_ok=True)
    log = layout.cache / "build.log"
    times: dict[str, float] = {}
    with (layout.cache / ".build.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second session waits for the first one's build
        if rebuild:
            shutil.rmtree(layout.bin_dir, ignore_errors=True)
        layout.bin_dir.mkdir(parents=True, exist_ok=True)
        todo_comps = [c for c in wanted if any(not layout.binary(b).is_file() for b in c.commands)]
        for n, comp in enumerate(todo_comps, 1):
            todo = [b for b in comp.commands if not layout.binary(b).is_file()]
            what = f"{comp.module}@{comp.version}"
            src = layout.src_dir / comp.name
            out_dir = layout.bin_dir / f".build-{comp.name}"
            start = time.monotonic()
            try:
                echo(f"[{n}/{len(todo_comps)}] building {what} ({', '.join(todo)})")
                _write_wrapper(comp, src, log)
                _go(["mod", "tidy"], src, what, log, cgo=comp.cgo)
                shutil.rmtree(out_dir, ignore_errors=True)
                out_dir.mkdir(parents=True)
                flags = ["-trimpath", "-ldflags", " ".join(("-s", "-w", *comp.ldflags))]
                if comp.tags:
                    flags += ["-tags", ",".join(comp.tags)]
                pkgs = [comp.commands[b] for b in todo]
                _go(["build", *flags, "-o", f"{out_dir}/", *pkgs], src, what, log, cgo=comp.cgo)
                for binary in todo:  # only a complete binary gets its name
                    target = layout.binary(binary)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    (out_dir / Path(binary).name).replace(target)
                times[comp.name] = round(time.monotonic() - start, 1)
                echo(f"[{n}/{len(todo_comps)}] built {comp.name} in {times[comp.name]:.0f} s")
            except BuildFailed as err:
                if not comp.optional:
                    raise
                echo(f"skipped optional {', '.join(todo)}: {err}")
            finally:
                shutil.rmtree(out_dir, ignore_errors=True)
        record = layout.cache / "build-times.json"
        previous = json.loads(record.read_text()) if record.exists() else {}
        record.write_text(json.dumps({**previous, **times}, indent=2) + "\n")
    return times


# KWOK's own stage definitions (in its module), used as published: nodes initialize and keep
# their lease; pods become Ready, Job pods complete (exit 0), deleted pods go away.
KWOK_STAGES = (
    "kustomize/stage/node/fast/node-initialize.yaml",
    "kustomize/stage/node/heartbeat-with-lease/node-heartbeat-with-lease.yaml",
    "kustomize/stage/pod/fast/pod-ready.yaml",
    "kustomize/stage/pod/fast/pod-complete.yaml",
    "kustomize/stage/pod/fast/pod-delete.yaml",
)


def kwok_stages(layout: Layout) -> Path | None:
    """``<cache>/kwok-stages.yaml``, assembled once from the pinned KWOK module's stage files;
    None when KWOK is not built or its module cannot be read."""
    out = layout.cache / "kwok-stages.yaml"
    if out.exists() or not layout.binary("kwok").is_file():
        return out if out.exists() else None
    proc = subprocess.run(
        ["go", "mod", "download", "-json", f"sigs.k8s.io/kwok@{layout.versions.kwok.version}"],
        capture_output=True,
        text=True,
        env=go_env(),
        cwd=layout.cache,
    )
    if proc.returncode != 0:
        return None
    root = Path(json.loads(proc.stdout)["Dir"])
    docs = [(root / rel).read_text() for rel in KWOK_STAGES if (root / rel).exists()]
    if len(docs) != len(KWOK_STAGES):
        return None
    out.write_text("\n---\n".join(d.strip() for d in docs) + "\n")
    return out


def build_times(layout: Layout) -> dict[str, float]:
    """The recorded first-build time of each binary (seconds)."""
    record = layout.cache / "build-times.json"
    return json.loads(record.read_text()) if record.exists() else {}
