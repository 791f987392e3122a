"""Real Kueue (sigs.k8s.io/kueue) next to the local control plane: build, install, run, stop.

    python scripts/cluster/kueue.py build     # go install the pinned release once (cached)
    python scripts/cluster/kueue.py up        # CRDs, webhooks, the controller (background)
    python scripts/cluster/kueue.py down      # webhooks removed first, then the controller
    python scripts/cluster/kueue.py status

Kueue's module builds as it is published (``go install sigs.k8s.io/kueue/cmd/kueue@VERSION``:
no replace directives), into ``~/.cache/visionr1/control-plane/kueue-VERSION/bin``. Its CRDs come
from the same module (``config/components/crd/bases``), installed as published: only v1beta2 is
used here (the storage version), so no conversion webhook is needed.

Kueue runs as a local process with the admin kubeconfig, as in its Deployment but:

* Certificates: Kueue's built-in cert management (cert-controller) expects the kubelet to mount
  the Secret it writes, and names the serving cert ``<service>.<namespace>.svc``; neither exists
  for a local process. So certificate management is off and this script makes one CA and one
  serving certificate for 127.0.0.1, given to Kueue through ``webhook.certDir``. Kueue then also
  reads a metrics certificate from a fixed path, ``/etc/kueue/metrics/certs`` (cmd/kueue: not
  configurable); rather than writing into the host's /etc, Kueue runs in a private mount
  namespace where /etc is an overlay whose upper layer holds that folder (``unshare``; root, or
  a user namespace where unprivileged overlay mounts are allowed, Linux >= 5.11).
* Webhooks: the API server runs on this host, so the Mutating/ValidatingWebhookConfigurations
  point at ``https://127.0.0.1:<port>/<path>`` with the CA as caBundle. Only the webhooks of the
  integrations enabled here are registered (batch/v1 Jobs and Kueue's own kinds), and the Job
  webhooks only see Jobs that carry ``kueue.x-k8s.io/queue-name``: other Jobs on the shared
  control plane never depend on Kueue being up. ``down`` removes them before stopping Kueue.
* Integrations: ``batch/job`` only; no leader election; the visibility API server is off
  (it is an aggregated API server: nothing here uses it).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

VERSION = "v0.17.0"
MODULE = "sigs.k8s.io/kueue"
NAMESPACE = "kueue-system"
WEBHOOK_PREFIX = "visionr1-kueue"
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
# The integrations enabled, and the API groups whose webhooks are registered for them.
FRAMEWORKS = ["batch/job"]
WEBHOOK_GROUPS = {"batch", "kueue.x-k8s.io"}
REPO = Path(__file__).resolve().parents[2]
STATE = REPO / ".visionr1" / "kueue"  # gitignored (.visionr1/)

Echo = Callable[[str], None]


class Unavailable(RuntimeError):
    """Kueue cannot be built here (no Go toolchain and no cached binary)."""


def cache_dir() -> Path:
    root = os.environ.get("VISIONR1_CONTROL_PLANE_CACHE")
    base = Path(root) if root else Path.home() / ".cache" / "visionr1" / "control-plane"
    return base / f"kueue-{VERSION}"


def binary() -> Path:
    return cache_dir() / "bin" / "kueue"


# --------------------------------------------------------------------------- build


def module_dir() -> Path:
    """The module's source in Go's module cache (downloaded once)."""
    out = subprocess.run(
        ["go", "mod", "download", "-json", f"{MODULE}@{VERSION}"],
        capture_output=True,
        text=True,
        check=True,
        cwd=cache_dir(),
    )
    return Path(json.loads(out.stdout)["Dir"])


def build(echo: Echo = print) -> Path:
    """``go install`` the pinned Kueue once; the build time is kept in build.json."""
    exe = binary()
    if exe.exists():
        return exe
    if shutil.which("go") is None:
        raise Unavailable(f"building Kueue {VERSION} needs Go >= 1.25 on PATH (https://go.dev/dl)")
    cache_dir().mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "GOBIN": str(exe.parent), "GOFLAGS": "-trimpath -buildvcs=false"}
    echo(f"building {MODULE}/cmd/kueue@{VERSION} (once) into {exe.parent}")
    start = time.monotonic()
    log = cache_dir() / "build.log"
    with log.open("w") as fh:
        proc = subprocess.run(
            ["nice", "-n", "10", "go", "install", f"{MODULE}/cmd/kueue@{VERSION}"],
            env=env,
            stdout=fh,
            stderr=subprocess.STDOUT,
            cwd=cache_dir(),
        )
    seconds = round(time.monotonic() - start, 1)
    if proc.returncode != 0:
        raise RuntimeError(f"go install of Kueue failed after {seconds}s; see {log}")
    components()
    go_version = subprocess.run(["go", "version"], capture_output=True, text=True).stdout.strip()
    (cache_dir() / "build.json").write_text(
        json.dumps({"version": VERSION, "seconds": seconds, "go": go_version}, indent=2)
    )
    echo(f"built Kueue {VERSION} in {seconds}s")
    return exe


def components() -> Path:
    """The release's config/components (CRDs, webhook manifests), copied next to the binary at
    build time, so running Kueue later needs no Go toolchain."""
    copy = cache_dir() / "components"
    if not copy.is_dir():
        src = module_dir() / "config" / "components"
        shutil.copytree(src / "crd" / "bases", copy / "crd" / "bases")
        shutil.copytree(src / "webhook", copy / "webhook")
        for path in copy.rglob("*"):  # the module cache is read-only; the copy need not be
            path.chmod(0o755 if path.is_dir() else 0o644)
    return copy


def crd_files() -> list[Path]:
    return sorted((components() / "crd" / "bases").glob("*.yaml"))


# --------------------------------------------------------------------------- certificates


def make_certs(folder: Path) -> bytes:
    """A CA and a serving cert for 127.0.0.1 (tls.crt/tls.key in ``folder``); returns the CA."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    folder.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "visionr1-kueue-ca")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kueue-webhook")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    (folder / "tls.crt").write_bytes(cert.public_bytes(pem))
    (folder / "tls.key").write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    (folder / "tls.key").chmod(0o600)
    ca_pem = ca.public_bytes(pem)
    (folder / "ca.crt").write_bytes(ca_pem)
    return ca_pem


# --------------------------------------------------------------------------- configuration


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class Ports:
    webhook: int
    health: int
    metrics: int


def configuration(ports: Ports, cert_dir: Path) -> dict[str, Any]:
    """Kueue's Configuration (config.kueue.x-k8s.io/v1beta2) for a local process."""
    return {
        "apiVersion": "config.kueue.x-k8s.io/v1beta2",
        "kind": "Configuration",
        "namespace": NAMESPACE,
        "health": {"healthProbeBindAddress": f"127.0.0.1:{ports.health}"},
        "metrics": {"bindAddress": f"127.0.0.1:{ports.metrics}"},
        "webhook": {"host": "127.0.0.1", "port": ports.webhook, "certDir": str(cert_dir)},
        "leaderElection": {"leaderElect": False},
        "internalCertManagement": {"enable": False},
        "manageJobsWithoutQueueName": False,
        "integrations": {"frameworks": FRAMEWORKS},
        "featureGates": {"VisibilityOnDemand": False},
        "clientConnection": {"qps": 50, "burst": 100},
    }


def webhook_configurations(ca_pem: bytes, port: int) -> list[dict[str, Any]]:
    """Kueue's published webhook manifests, cut to the enabled integrations, pointed at the
    local process."""
    import base64

    path = components() / "webhook" / "manifests.yaml"
    ca_b64 = base64.b64encode(ca_pem).decode()
    out: list[dict[str, Any]] = []
    for doc in yaml.safe_load_all(path.read_text()):
        if not doc:
            continue
        kind = doc["kind"]
        hooks = []
        for hook in doc.get("webhooks") or []:
            groups = {g for rule in hook.get("rules") or [] for g in rule.get("apiGroups") or []}
            if not groups or not groups <= WEBHOOK_GROUPS:
                continue
            svc = hook["clientConfig"]["service"]
            hook["clientConfig"] = {
                "url": f"https://127.0.0.1:{port}{svc['path']}",
                "caBundle": ca_b64,
            }
            hook["timeoutSeconds"] = 10
            if groups == {"batch"}:
                # only queued Jobs: the rest of the cluster never waits on Kueue
                hook["objectSelector"] = {
                    "matchExpressions": [{"key": QUEUE_LABEL, "operator": "Exists"}]
                }
            hooks.append(hook)
        short = "mutating" if kind.startswith("Mutating") else "validating"
        out.append(
            {
                "apiVersion": doc["apiVersion"],
                "kind": kind,
                "metadata": {"name": f"{WEBHOOK_PREFIX}-{short}"},
                "webhooks": hooks,
            }
        )
    return out


# --------------------------------------------------------------------------- run


def _kubectl(
    kubectl: Path, kubeconfig: Path, *args: str, input: str | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [str(kubectl), f"--kubeconfig={kubeconfig}", *args],
        input=input,
        capture_output=True,
        text=True,
        timeout=180,
    )
    if check and proc.returncode != 0:
        raise RuntimeError(f"kubectl {' '.join(args[:3])}: {proc.stderr.strip()}")
    return proc


def _mount_namespace_prefix() -> list[str]:
    if shutil.which("unshare") is None:
        raise RuntimeError("running Kueue locally needs util-linux's unshare (see module doc)")
    user = [] if os.geteuid() == 0 else ["--user", "--map-root-user"]
    return ["unshare", *user, "--mount", "--propagation", "private"]


@dataclass
class Kueue:
    """A running Kueue controller (started by :func:`up`)."""

    pid: int
    ports: Ports
    log: Path
    kubectl: Path
    kubeconfig: Path

    def alive(self) -> bool:
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        return True


def _wait_ready(k: Kueue, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    url = f"http://127.0.0.1:{k.ports.health}/readyz"
    while time.monotonic() < deadline:
        if not k.alive():
            raise RuntimeError(f"Kueue exited; last log lines:\n{_tail(k.log)}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:  # noqa: S310 (loopback)
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"Kueue not ready within {timeout:.0f}s; last log lines:\n{_tail(k.log)}")


def _wait_webhook(port: int, ca: Path, timeout: float) -> None:
    """The webhook server answers TLS with our certificate."""
    ctx = ssl.create_default_context(cafile=str(ca))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as raw:
                with ctx.wrap_socket(raw, server_hostname="127.0.0.1"):
                    return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"Kueue's webhook server did not answer on 127.0.0.1:{port}")


def _tail(path: Path, n: int = 40) -> str:
    if not path.exists():
        return "(no log)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:])


def install_crds(kubectl: Path, kubeconfig: Path) -> None:
    files = crd_files()
    args = ["apply", "--server-side", "--force-conflicts"]
    for f in files:
        args += ["-f", str(f)]
    _kubectl(kubectl, kubeconfig, *args)
    names = [f"crd/{yaml.safe_load(f.read_text())['metadata']['name']}" for f in files]
    _kubectl(kubectl, kubeconfig, "wait", "--for=condition=Established", "--timeout=120s", *names)


def up(kubectl: Path, kubeconfig: Path, state: Path = STATE, echo: Echo = print) -> Kueue:
    """Install Kueue's CRDs and webhooks and start the controller; returns when it is ready
    and its webhooks answer."""
    exe = build(echo)
    state.mkdir(parents=True, exist_ok=True)
    certs = state / "certs"
    ca_pem = make_certs(certs)
    # the upper layer of Kueue's private /etc: /etc/kueue/metrics/certs (see the module doc)
    overlay = state / "etc-overlay"
    shutil.rmtree(overlay, ignore_errors=True)
    metrics_certs = overlay / "upper" / "kueue" / "metrics" / "certs"
    metrics_certs.mkdir(parents=True)
    (overlay / "work").mkdir()
    for name in ("tls.crt", "tls.key"):
        shutil.copy2(certs / name, metrics_certs / name)
    ports = Ports(webhook=free_port(), health=free_port(), metrics=free_port())
    config = state / "config.yaml"
    config.write_text(yaml.safe_dump(configuration(ports, certs)))

    _kubectl(kubectl, kubeconfig, "create", "namespace", NAMESPACE, check=False)
    install_crds(kubectl, kubeconfig)

    mount = (
        f"mount -t overlay overlay -o lowerdir=/etc,upperdir={overlay / 'upper'},"
        f"workdir={overlay / 'work'} /etc && exec {exe} --config={config}"
    )
    log = state / "kueue.log"
    env = {**os.environ, "KUBECONFIG": str(kubeconfig)}
    with log.open("ab") as fh:
        proc = subprocess.Popen(
            [*_mount_namespace_prefix(), "sh", "-c", mount],
            env=env,
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    k = Kueue(pid=proc.pid, ports=ports, log=log, kubectl=kubectl, kubeconfig=kubeconfig)
    (state / "state.json").write_text(
        json.dumps({"pid": proc.pid, "ports": ports.__dict__, "log": str(log)})
    )
    try:
        _wait_ready(k, 120)
        _wait_webhook(ports.webhook, certs / "ca.crt", 30)
        _kubectl(
            kubectl,
            kubeconfig,
            "apply",
            "-f",
            "-",
            input=yaml.safe_dump_all(webhook_configurations(ca_pem, ports.webhook)),
        )
    except Exception:
        down(kubectl, kubeconfig, state)
        raise
    echo(f"Kueue {VERSION} running (pid {proc.pid}, webhooks on 127.0.0.1:{ports.webhook})")
    return k


def down(kubectl: Path, kubeconfig: Path, state: Path = STATE) -> None:
    """Remove the webhook configurations first (nothing may call a stopped Kueue), then stop it.
    CRDs and Kueue objects stay (a later ``up`` reuses them)."""
    for short in ("mutating", "validating"):
        kind = f"{short}webhookconfiguration"
        _kubectl(
            kubectl,
            kubeconfig,
            "delete",
            kind,
            f"{WEBHOOK_PREFIX}-{short}",
            "--ignore-not-found",
            check=False,
        )
    state_file = state / "state.json"
    if not state_file.exists():
        return
    pid = int(json.loads(state_file.read_text())["pid"])
    for sig, wait in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            # reap it when it is our child
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass
            time.sleep(0.2)
        else:
            continue
        break
    state_file.unlink(missing_ok=True)


def running(state: Path = STATE) -> dict[str, Any] | None:
    state_file = state / "state.json"
    if not state_file.exists():
        return None
    info = json.loads(state_file.read_text())
    try:
        os.kill(int(info["pid"]), 0)
    except ProcessLookupError:
        return None
    return info


def _iter_cp_paths() -> Iterator[tuple[Path, Path]]:
    """kubectl and the admin kubeconfig of the control plane (scripts/cluster/controlplane)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from controlplane.config import Layout  # type: ignore[import-not-found]

    layout = Layout.for_repo(REPO)
    yield layout.binary("kubectl"), layout.kubeconfig


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["build", "up", "down", "status"])
    args = parser.parse_args(argv)
    if args.command == "build":
        build()
        print(
            (cache_dir() / "build.json").read_text()
            if (cache_dir() / "build.json").exists()
            else binary()
        )
        return 0
    kubectl, kubeconfig = next(_iter_cp_paths())
    if args.command == "up":
        if running():
            print("Kueue already running:", running())
            return 0
        up(kubectl, kubeconfig)
    elif args.command == "down":
        down(kubectl, kubeconfig)
    else:
        info = running()
        print(json.dumps(info) if info else "Kueue not running")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
