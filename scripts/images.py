"""``python scripts/images.py build|push``: the container images, built without a daemon.

build: Debian root filesystems from packages (mmdebstrap, at the suite of
scripts/cluster/versions.toml's ``[debian]``, from the mirror this host's apt uses), imported into
buildah as ``localhost/visionr1/base-python:<suite>`` and ``base-python-slim:<suite>`` (each
built again only when its suite, packages or options change); then ``buildah bud --layers
--isolation chroot`` of each image on them, never pulling: ``operator``, ``trainer-cpu``, ``mlflow``
and ``postgresql`` (on ``base-postgresql``, Debian's postgresql package)
(``--gpu`` adds the CUDA ``trainer``, whose base is pulled from its registry). Each image is
tagged ``localhost/visionr1/<name>:<tag>`` in containers-storage; one line per image says its
build time and size, and ``.visionr1/images/images.json`` records them.

The host's CA bundle, pip config and pip cache reach the build steps only, never an image:
``--build-ca`` (a folder, bind-mounted over /etc/ssl/certs, or a bundle file over its
ca-certificates.crt), ``--pip-conf`` (the build secret ``pip.conf``, which the Dockerfiles' pip
steps mount at /etc/pip.conf) and ``--pip-cache`` (bind-mounted at /root/.cache/pip, pip's cache
for the steps). The proxy variables of the environment (HTTP_PROXY, HTTPS_PROXY, NO_PROXY) are
passed on as build arguments, which buildah gives the RUN steps and does not record.

push: ``skopeo copy`` of each image to ``--repo`` (``HOST:PORT/PATH``), plain HTTP for local
addresses (or ``--insecure yes``); prints each digest, the ``helm install`` line that pins the
operator and MLflow images by digest and the trainer reference for ``spec.images.trainer``, and
writes what it pushed to ``.visionr1/images/pushed.json``
(``{"operator": "HOST:PORT/PATH/operator:TAG@sha256:...", "trainer-cpu": ..., "mlflow": ...}``).

Standard library only; Python >= 3.11. Every failure prints one line (``images: ...``) and exits 1.
"""

from __future__ import annotations

import argparse
import hashlib
import ipaddress
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import tomllib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
VERSIONS = REPO / "scripts" / "cluster" / "versions.toml"
RECORD_DIR = REPO / ".visionr1" / "images"
CACHE = Path.home() / ".cache" / "visionr1" / "images"
LOCAL = "localhost/visionr1"

# -- the base ------------------------------------------------------------------------------------

# What each base is made of: a change here (or of the suite) builds that base again, and only then.
# `base-python` is what the build stages and the trainer-cpu and mlflow images run on;
# `base-python-slim` is the operator's runtime: Essential packages only (no apt, no venv/pip
# wheels), about 30 MB less.
COMMON_OPTIONS = (
    # usr-is-merged instead of the usrmerge package, which would pull in perl (~45 MB).
    "--hook-dir=/usr/share/mmdebstrap/hooks/merged-usr",
    '--aptopt=APT::Install-Recommends "false"',
    '--aptopt=Acquire::Languages "none"',
    # No manuals, documentation (the copyright files stay), translations or info pages.
    "--dpkgopt=path-exclude=/usr/share/man/*",
    "--dpkgopt=path-exclude=/usr/share/doc/*",
    "--dpkgopt=path-include=/usr/share/doc/*/copyright",
    "--dpkgopt=path-exclude=/usr/share/locale/*",
    "--dpkgopt=path-exclude=/usr/share/info/*",
    "--dpkgopt=path-exclude=/usr/share/lintian/*",
    # Backup copies dpkg and debconf leave behind (apt lists and caches: mmdebstrap's cleanup).
    '--customize-hook=rm -f "$1"/var/cache/debconf/*-old "$1"/var/lib/dpkg/*-old',
)
BASE_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
}
BASE_FORMAT = 1  # bump to rebuild every base (a change of how it is imported)


@dataclass(frozen=True)
class Base:
    name: str
    variant: str
    packages: tuple[str, ...]

    def options(self) -> tuple[str, ...]:
        return (f"--variant={self.variant}", *COMMON_OPTIONS)

    def key(self, suite: str) -> str:
        """What decides the content (not the mirror: the same suite from another mirror)."""
        spec = {
            "format": BASE_FORMAT,
            "suite": suite,
            "packages": sorted(self.packages),
            "options": list(self.options()),
            "env": BASE_ENV,
        }
        return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]

    def ref(self, suite: str) -> str:
        return f"{LOCAL}/{self.name}:{suite}"


BASES = {
    "base-python": Base(
        "base-python",
        "minbase",
        ("python3", "python3-venv", "python-is-python3", "ca-certificates"),
    ),
    "base-python-slim": Base(
        "base-python-slim", "essential", ("python3", "python-is-python3", "ca-certificates")
    ),
    # The bundled MLflow's PostgreSQL, from Debian's postgresql package (the chart's default is
    # the official image; the local cluster pulls nothing).
    "base-postgresql": Base("base-postgresql", "minbase", ("postgresql",)),
}


def debian_suite(versions: Path = VERSIONS) -> str:
    return tomllib.loads(versions.read_text())["debian"]["suite"]


@dataclass(frozen=True)
class AptSource:
    uri: str
    suite: str
    components: tuple[str, ...]
    signed_by: str = ""

    def line(self) -> str:
        options = f"[signed-by={self.signed_by}] " if self.signed_by else ""
        return f"deb {options}{self.uri} {self.suite} {' '.join(self.components)}"


def parse_apt_sources(text: str, deb822: bool) -> list[AptSource]:
    """The binary (``deb``) entries of a sources.list (one-line) or a .sources (deb822) file."""
    out: list[AptSource] = []
    if not deb822:
        for raw in text.splitlines():
            line = raw.split("#", 1)[0].strip()
            if not line.startswith("deb "):
                continue
            options = {}
            match = re.match(r"deb\s+\[([^\]]*)\]\s+(.*)", line)
            if match:
                for item in match.group(1).split():
                    key, _, value = item.partition("=")
                    options[key.lower()] = value
                rest = match.group(2).split()
            else:
                rest = line.split()[1:]
            if len(rest) >= 2:
                out.append(
                    AptSource(rest[0], rest[1], tuple(rest[2:]), options.get("signed-by", ""))
                )
        return out
    for paragraph in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        key = ""
        for raw in paragraph.splitlines():
            if raw.startswith("#") or not raw.strip():
                continue
            if raw[0] in " \t" and key:  # a continuation line
                fields[key] += "\n" + raw.strip()
                continue
            key, _, value = raw.partition(":")
            key = key.strip().lower()
            fields[key] = value.strip()
        if "deb" not in fields.get("types", "").split():
            continue
        if fields.get("enabled", "yes").lower() == "no":
            continue
        signed_by = fields.get("signed-by", "")
        if "\n" in signed_by:  # an inline key block, not a keyring path
            signed_by = ""
        for uri in fields.get("uris", "").split():
            for suite in fields.get("suites", "").split():
                out.append(
                    AptSource(uri, suite, tuple(fields.get("components", "").split()), signed_by)
                )
    return out


def host_mirrors(
    target_suite: str, etc_apt: Path = Path("/etc/apt"), codename: str = ""
) -> list[str]:
    """mmdebstrap's mirror lines: the host's Debian entries, moved to ``target_suite``.

    Only this host's mirror is reachable in some places (a proxy or a cache), so the base comes
    from the same one. Entries of the host's release (``bookworm``, ``bookworm-updates``,
    ``bookworm-security``) are kept, with the codename replaced by the target suite; third-party
    repositories are not.
    """
    codename = codename or _os_release().get("VERSION_CODENAME", "")
    if not codename:
        raise ImagesError("cannot tell this host's Debian release (/etc/os-release)")
    files = [etc_apt / "sources.list"] + sorted((etc_apt / "sources.list.d").glob("*"))
    sources: list[AptSource] = []
    for path in files:
        if path.is_file() and path.suffix in (".list", ".sources"):
            sources += parse_apt_sources(path.read_text(), deb822=path.suffix == ".sources")
    lines = []
    for src in sources:
        if src.suite == codename or src.suite.startswith(codename + "-"):
            moved = AptSource(
                src.uri, target_suite + src.suite[len(codename) :], src.components, src.signed_by
            )
            if moved.line() not in lines:
                lines.append(moved.line())
    if not lines:
        raise ImagesError(
            f"no Debian {codename} entry in {etc_apt}/sources.list(.d): no mirror to use"
        )
    return lines


def _os_release() -> dict[str, str]:
    out = {}
    for line in Path("/etc/os-release").read_text().splitlines():
        key, _, value = line.partition("=")
        out[key] = value.strip().strip('"')
    return out


def mmdebstrap_command(base: Base, suite: str, out: Path, mirrors: Sequence[str]) -> list[str]:
    return [
        "mmdebstrap",
        *base.options(),
        "--include=" + ",".join(base.packages),
        "--format=tar",
        suite,
        str(out),
        *mirrors,
    ]


def strip_device_nodes(src: Path, dst: Path) -> None:
    """Copy the tarball without /dev's entries (the runtime mounts /dev; images ship it empty)."""
    with tarfile.open(src) as tin, tarfile.open(dst, "w", format=tarfile.PAX_FORMAT) as tout:
        for member in tin:
            name = member.name.removeprefix("./")
            if name.startswith("dev/") and name != "dev/":
                continue
            tout.addfile(member, tin.extractfile(member) if member.isfile() else None)


def base_tarball(base: Base, suite: str) -> Path:
    """The root filesystem mmdebstrap made, kept: a lost image is imported again from it."""
    return CACHE / f"{base.name}-{suite}-{base.key(suite)}.tar"


def ensure_base(base: Base, suite: str, log: Log, rebuild: bool = False) -> dict:
    """The base image, built only when its key (suite, packages, options) has no image yet."""
    key = base.key(suite)
    ref = base.ref(suite)
    existing = inspect_image(ref)
    if existing and not rebuild:
        if existing["labels"].get("io.visionr1.base.key") == key:
            log.line(f"{base.name:<16} {ref} (cached, key {key})")
            return {"ref": ref, "key": key, "id": existing["id"], "cached": True}
    tarball = base_tarball(base, suite)
    tarball.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    if not tarball.exists() or rebuild:
        mirrors = host_mirrors(suite)
        with tempfile.TemporaryDirectory(dir=tarball.parent) as tmp:
            raw = Path(tmp) / "rootfs.tar"
            log.run(mmdebstrap_command(base, suite, raw, mirrors), name=base.name)
            strip_device_nodes(raw, Path(tmp) / "base.tar")
            os.replace(Path(tmp) / "base.tar", tarball)
    container = capture(["buildah", "from", "--pull=never", "scratch"]).strip()
    try:
        run(["buildah", "add", "--quiet", container, str(tarball), "/"])
        config = ["buildah", "config"]
        for name, value in BASE_ENV.items():
            config += ["--env", f"{name}={value}"]
        labels = {
            "org.opencontainers.image.title": f"visionr1-{base.name}",
            "org.opencontainers.image.description": (
                f"Debian {suite} ({base.variant}) with {', '.join(base.packages)}, by mmdebstrap"
            ),
            "io.visionr1.debian.suite": suite,
            "io.visionr1.base.key": key,
            "io.visionr1.base.packages": ",".join(base.packages),
        }
        for name, value in labels.items():
            config += ["--label", f"{name}={value}"]
        run([*config, "--cmd", '["python3"]', container])
        image_id = capture(["buildah", "commit", "--quiet", "--rm", container, ref]).strip()
    except BaseException:
        subprocess.run(["buildah", "rm", container], capture_output=True)
        raise
    seconds = time.monotonic() - started
    size = inspect_image(ref)["size"]
    log.line(f"{base.name:<16} {ref} built in {seconds:.0f} s, {size / 1e6:.0f} MB (key {key})")
    return {"ref": ref, "key": key, "id": image_id, "seconds": round(seconds, 1), "size": size}


# -- the images ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Image:
    name: str
    # Build argument -> our Debian base it names (built from packages, never pulled). Empty: the
    # Dockerfile's own upstream bases, pulled when missing.
    bases: dict[str, str] = field(default_factory=lambda: {"PYTHON_IMAGE": "base-python"})
    gpu: bool = False
    # Commands run in the built image (buildah run, no network): it must run them.
    checks: tuple[tuple[str, ...], ...] = ()
    build_args: dict[str, str] = field(default_factory=dict)

    @property
    def dockerfile(self) -> Path:
        return REPO / "images" / self.name / "Dockerfile"

    @property
    def ignorefile(self) -> Path:
        return self.dockerfile.with_name("Dockerfile.dockerignore")

    def local_ref(self, tag: str) -> str:
        return f"{LOCAL}/{self.name}:{tag}"


IMAGES = {
    "operator": Image(
        "operator",
        bases={"PYTHON_IMAGE": "base-python", "RUNTIME_IMAGE": "base-python-slim"},
        checks=(
            ("visionr1", "--help"),
            ("python", "-c", "import visionr1_operator.handlers, kopf, lightkube, mlflow.tracking"),
        ),
    ),
    "trainer-cpu": Image(
        "trainer-cpu",
        checks=(
            ("python", "-c", "import torch, trl, transformers, visionr1_jobs, mlflow, math_verify"),
            ("python", "-m", "visionr1_jobs", "--help"),
        ),
    ),
    "mlflow": Image(
        "mlflow",
        checks=(
            ("mlflow", "--version"),
            ("mlflow", "server", "--help"),
            ("python", "-c", "import flask_wtf, psycopg2, mlflow.server.auth"),
        ),
    ),
    "postgresql": Image(
        "postgresql",
        bases={"POSTGRES_BASE_IMAGE": "base-postgresql"},
        checks=(("postgres", "--version"), ("initdb", "--version")),
    ),
    # The CUDA image: gigabytes of CUDA toolkit pulled from nvidia/cuda (needs a registry).
    "trainer": Image("trainer", bases={}, gpu=True),
}
DEFAULT_IMAGES = ("operator", "trainer-cpu", "mlflow", "postgresql")

# Where the mounts land in the build containers.
CA_DIR_TARGET = "/etc/ssl/certs"
CA_FILE_TARGET = "/etc/ssl/certs/ca-certificates.crt"
PIP_CONF_SECRET = "pip.conf"
PIP_CACHE_TARGET = "/root/.cache/pip"
PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "no_proxy")


@dataclass(frozen=True)
class BuildHost:
    """What the host lends the build steps, never the images."""

    build_ca: Path | None = None
    pip_conf: Path | None = None
    pip_cache: Path | None = None
    proxies: dict[str, str] = field(default_factory=dict)

    def volumes(self) -> list[str]:
        out = []
        if self.build_ca:
            target = CA_DIR_TARGET if self.build_ca.is_dir() else CA_FILE_TARGET
            out.append(f"{self.build_ca}:{target}:ro")
        if self.pip_cache:
            out.append(f"{self.pip_cache}:{PIP_CACHE_TARGET}")
        return out

    def secrets(self) -> list[str]:
        """The pip config as a build secret: mounted at /etc/pip.conf by the RUN steps that ask
        for it (``--mount=type=secret,id=pip.conf``), leaving no file behind (a ``-v`` file mount
        leaves an empty mount point in the layer)."""
        return [f"id={PIP_CONF_SECRET},src={self.pip_conf}"] if self.pip_conf else []

    def build_args(self) -> dict[str, str]:
        args = dict(self.proxies)
        if self.pip_cache:
            args["PIP_CACHE_DIR"] = PIP_CACHE_TARGET
        return args


def build_host(
    build_ca: str | None, pip_conf: str | None, pip_cache: str | None, environ=os.environ
) -> BuildHost:
    """Paths given as empty strings are off; missing paths are an error (a typo is not ignored)."""

    def path(value: str | None, what: str, create: bool = False) -> Path | None:
        if not value:
            return None
        p = Path(value).expanduser().absolute()
        if create:
            p.mkdir(parents=True, exist_ok=True)
        if not p.exists():
            raise ImagesError(f"{what} {value}: no such file or folder")
        return p

    return BuildHost(
        build_ca=path(build_ca, "--build-ca"),
        pip_conf=path(pip_conf, "--pip-conf"),
        pip_cache=path(pip_cache, "--pip-cache", create=True),
        proxies={k: environ[k] for k in PROXY_VARIABLES if environ.get(k)},
    )


@dataclass(frozen=True)
class Source:
    """The labels' facts: the project's version and git commit, the Debian suite."""

    version: str
    revision: str
    suite: str


def source_facts(suite: str) -> Source:
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    git = ["git", "-C", str(REPO)]
    try:
        revision = capture([*git, "rev-parse", "HEAD"]).strip()
        if capture([*git, "status", "--porcelain", "--untracked-files=no"]).strip():
            revision += "-dirty"
    except ImagesError:
        revision = "unknown"
    return Source(version=version, revision=revision, suite=suite)


def pinned_version(constraints: Path, package: str) -> str:
    for line in constraints.read_text().splitlines():
        name, sep, version = line.split("#", 1)[0].strip().partition("==")
        if sep and name.strip().lower() == package:
            return version.strip()
    raise ImagesError(f"{constraints}: {package} is not pinned")


def dockerfile_args(dockerfile: Path) -> set[str]:
    """The names of the build arguments a Dockerfile declares (ARG NAME[=default])."""
    names = set()
    for line in dockerfile.read_text().splitlines():
        match = re.match(r"\s*ARG\s+([A-Za-z_][A-Za-z0-9_]*)", line, re.IGNORECASE)
        if match:
            names.add(match.group(1))
    return names


CONFIG_SCHEMA_LABEL = "io.visionr1.config-schema"


def config_schema(config: Path = REPO / "jobs" / "visionr1_jobs" / "config.py") -> str:
    """``CONFIG_SCHEMA`` of the stage programs, read from their source (no import: stdlib only)."""
    match = re.search(r"(?m)^CONFIG_SCHEMA = (\d+)$", config.read_text())
    if match is None:
        raise ImagesError(f"{config}: no CONFIG_SCHEMA = <int> line")
    return match.group(1)


def labels(image: Image, source: Source) -> dict[str, str]:
    """The OCI labels that vary per build, given as ``buildah bud --label``: buildah's layer cache
    keys a LABEL instruction by its text before build arguments are substituted, so a cached
    image would keep the commit of the build that made it; a --label is keyed by its value."""
    if image.name == "mlflow":
        version = pinned_version(image.dockerfile.with_name("constraints.txt"), "mlflow")
    else:
        version = source.version
    out = {
        "org.opencontainers.image.version": version,
        "org.opencontainers.image.revision": source.revision,
    }
    if image.name.startswith("trainer"):
        # The stage config schema its stage programs read (visionr1_jobs.config.CONFIG_SCHEMA):
        # what an operator's configs must not exceed with fields set off their defaults.
        out[CONFIG_SCHEMA_LABEL] = config_schema()
    if image.bases:
        final_base = image.bases.get("RUNTIME_IMAGE") or next(iter(image.bases.values()))
        out["org.opencontainers.image.base.name"] = BASES[final_base].ref(source.suite)
        out["io.visionr1.debian.suite"] = source.suite
    return out


def bud_command(
    image: Image,
    tag: str,
    source: Source,
    host: BuildHost,
    iidfile: Path,
    flash_attn: str = "0",
) -> list[str]:
    args: dict[str, str] = {}
    for arg, base in image.bases.items():
        args[arg] = BASES[base].ref(source.suite)
    if image.gpu:
        args["FLASH_ATTN"] = flash_attn
    # The host's arguments that this Dockerfile takes (the proxies: every RUN step takes them).
    declared = dockerfile_args(image.dockerfile)
    args |= {k: v for k, v in host.build_args().items() if k in declared or k in PROXY_VARIABLES}
    args |= image.build_args
    cmd = [
        "buildah",
        "bud",
        "--layers",
        "--isolation",
        "chroot",
        # Our base is local: never pull. The GPU image's upstream bases are pulled once.
        "--pull=never" if image.bases else "--pull=false",
        "-f",
        str(image.dockerfile),
        "--ignorefile",
        str(image.ignorefile),
        "--iidfile",
        str(iidfile),
        "-t",
        image.local_ref(tag),
    ]
    for name, value in sorted(args.items()):
        cmd += ["--build-arg", f"{name}={value}"]
    for name, value in labels(image, source).items():
        cmd += ["--label", f"{name}={value}"]
    for volume in host.volumes():
        cmd += ["-v", volume]
    for secret in host.secrets():
        cmd += ["--secret", secret]
    cmd.append(str(REPO))
    return cmd


def inspect_image(ref: str) -> dict | None:
    """id, size (bytes, uncompressed), layers (their sizes), labels, user; None if absent."""
    result = subprocess.run(
        ["podman", "image", "inspect", ref], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        return None
    info = json.loads(result.stdout)[0]
    history = json.loads(capture(["podman", "history", "--format", "json", info["Id"]]))
    layer_sizes = [h["size"] for h in reversed(history) if not h.get("comment") == "empty"]
    return {
        "id": "sha256:" + info["Id"],
        "size": info["Size"],
        "layers": len(info["RootFS"]["Layers"]),
        "layer_sizes": [s for s in layer_sizes if s > 0],
        "labels": info.get("Labels") or {},
        "user": info["Config"].get("User", ""),
        "created": info.get("Created", ""),
    }


def check_commands(container: str, argv: Sequence[str], isolate_network: bool) -> list[str]:
    """``buildah run`` of argv in a container of the image, as the image's user, in its working
    folder and environment; without a network when ``unshare --net`` can give it one (podman run
    needs cgroups and rlimits that some sandboxes refuse; buildah's chroot isolation does not)."""
    cmd = ["buildah", "run", "--isolation", "chroot", container, "--", *argv]
    return ["unshare", "--net", *cmd] if isolate_network else cmd


def run_checks(image: Image, ref: str, log: Log) -> float:
    started = time.monotonic()
    isolate = os.geteuid() == 0 and shutil.which("unshare") is not None
    container = capture(["buildah", "from", "--pull=never", ref]).strip()
    try:
        for argv in image.checks:
            log.run(check_commands(container, argv, isolate), name=f"{image.name}-check")
    finally:
        subprocess.run(["buildah", "rm", container], capture_output=True)
    return time.monotonic() - started


def build(
    names: Sequence[str],
    tag: str,
    host: BuildHost,
    log: Log,
    check: bool = True,
    flash_attn: str = "0",
    rebuild_base: bool = False,
    no_cache: bool = False,
) -> dict:
    suite = debian_suite()
    source = source_facts(suite)
    record = {
        k: v for k, v in read_json(RECORD_DIR / "images.json").items() if k in IMAGES or k in BASES
    }
    for base in sorted({b for n in names for b in IMAGES[n].bases.values()}):
        record[base] = ensure_base(BASES[base], suite, log, rebuild=rebuild_base)
    for name in names:
        image = IMAGES[name]
        with tempfile.TemporaryDirectory() as tmp:
            iidfile = Path(tmp) / "iid"
            started = time.monotonic()
            cmd = bud_command(image, tag, source, host, iidfile, flash_attn)
            if no_cache:
                cmd.insert(2, "--no-cache")
            log.run(cmd, name=name)
            seconds = time.monotonic() - started
        ref = image.local_ref(tag)
        info = inspect_image(ref)
        if info is None:
            raise ImagesError(f"{name}: built, but {ref} is not in containers-storage")
        entry = {
            "ref": ref,
            "id": info["id"],
            "size": info["size"],
            "layers": info["layers"],
            "layer_sizes": info["layer_sizes"],
            "build_seconds": round(seconds, 1),
            "built_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "revision": source.revision,
            "debian_suite": suite,
        }
        line = (
            f"{name:<12} {ref} built in {seconds:.1f} s, {info['size'] / 1e6:.0f} MB, "
            f"{info['layers']} layers"
        )
        if check and image.checks:
            entry["check_seconds"] = round(run_checks(image, ref, log), 1)
            line += f" (checks passed in {entry['check_seconds']:.0f} s)"
        log.line(line)
        record[name] = entry
        write_json(RECORD_DIR / "images.json", record)
    return record


# -- push ----------------------------------------------------------------------------------------


def registry_host(repo: str) -> str:
    """``HOST[:PORT]`` of ``HOST[:PORT]/PATH``, without the port."""
    host = repo.split("/", 1)[0]
    if host.startswith("["):  # [::1]:5000
        return host[1 : host.index("]")]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def is_local(repo: str) -> bool:
    """Loopback, private or link-local addresses and localhost names: assumed plain HTTP."""
    host = registry_host(repo).lower()
    if host == "localhost" or host.endswith((".localhost", ".local")):
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return address.is_loopback or address.is_private or address.is_link_local


def insecure_for(repo: str, insecure: str) -> bool:
    if insecure in ("1", "yes", "true"):
        return True
    if insecure in ("0", "no", "false"):
        return False
    if insecure != "auto":
        raise ImagesError(f"--insecure {insecure}: use auto, 1 or 0")
    return is_local(repo)


def skopeo_command(src: str, dest: str, insecure: bool, digestfile: Path) -> list[str]:
    cmd = ["skopeo", "copy", "--retry-times", "2", "--digestfile", str(digestfile)]
    if insecure:
        cmd.append("--dest-tls-verify=false")
    return [*cmd, f"containers-storage:{src}", f"docker://{dest}"]


CHART_IMAGE_KEYS = (  # values.yaml's image keys and the image each one deploys
    ("image", "operator"),
    ("mlflow.image", "mlflow"),
    ("mlflow.postgresql.image", "postgresql"),
)


def helm_sets(pushed: dict[str, str]) -> list[tuple[str, str]]:
    """The chart values that pin the pushed operator, MLflow and PostgreSQL images by digest and
    allow runs the pushed trainer-cpu image (the operator denies other images by default)."""
    sets: list[tuple[str, str]] = []
    for key, name in CHART_IMAGE_KEYS:
        if name not in pushed:
            continue
        name_tag, _, digest = pushed[name].partition("@")
        repository, _, tag = name_tag.rpartition(":")
        sets += [(f"{key}.repository", repository), (f"{key}.tag", tag), (f"{key}.digest", digest)]
    if "trainer-cpu" in pushed:
        sets.append(("operator.trainerImage", pushed["trainer-cpu"]))
    return sets


def helm_values(pushed: dict[str, str]) -> dict[str, Any]:
    """``helm_sets`` as a values file (``helm install -f``)."""
    values: dict[str, Any] = {}
    for key, value in helm_sets(pushed):
        *parents, leaf = key.split(".")
        node = values
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = value
    return values


def helm_install_line(pushed: dict[str, str]) -> str:
    """The chart install pinning the pushed images by digest, as ``--set`` flags."""
    return " \\\n    ".join(
        [
            "helm install visionr1-operator charts/visionr1-operator -n visionr1-system "
            "--create-namespace",
            *(f"--set {key}={value}" for key, value in helm_sets(pushed)),
        ]
    )


def push(names: Sequence[str], repo: str, tag: str, insecure: str, log: Log) -> dict[str, str]:
    repo = repo.rstrip("/")
    plain_http = insecure_for(repo, insecure)
    pushed: dict[str, str] = {}
    for name in names:
        src = IMAGES[name].local_ref(tag)
        if inspect_image(src) is None:
            raise ImagesError(f"{src} is not in containers-storage: make images first")
        dest = f"{repo}/{name}:{tag}"
        with tempfile.TemporaryDirectory() as tmp:
            digestfile = Path(tmp) / "digest"
            started = time.monotonic()
            log.run(skopeo_command(src, dest, plain_http, digestfile), name=f"{name}-push")
            digest = digestfile.read_text().strip()
        pushed[name] = f"{dest}@{digest}"
        log.line(f"{name:<12} {dest}@{digest} ({time.monotonic() - started:.0f} s)")
    # An --only push updates its images' entries; those of the same repository stay.
    earlier = read_json(RECORD_DIR / "pushed.json")
    kept = {k: v for k, v in earlier.items() if k not in pushed and v.startswith(f"{repo}/")}
    record = {**kept, **pushed}
    write_json(RECORD_DIR / "pushed.json", record)
    # The same pins as a values file: a node that cached an older image under the same tag never
    # runs it (a tag with imagePullPolicy IfNotPresent would).
    write_json(RECORD_DIR / "helm-values.json", helm_values(record))
    log.line("")
    log.line("Install the chart with these images, pinned by digest:")
    log.line("    " + helm_install_line(pushed))
    for name in ("trainer-cpu", "trainer"):
        if name in pushed:
            log.line(f"A VisionR1Run's spec.images.trainer ({name}): {pushed[name]}")
    log.line(f"Or: helm install ... -f {RECORD_DIR / 'helm-values.json'}")
    log.line(f"Written: {RECORD_DIR / 'pushed.json'}, {RECORD_DIR / 'helm-values.json'}")
    return pushed


# -- plumbing ------------------------------------------------------------------------------------


class ImagesError(Exception):
    pass


class Log:
    """One line per step on stdout; each command's output in .visionr1/images/logs/NAME.log."""

    def __init__(self, verbose: bool = False, folder: Path = RECORD_DIR / "logs") -> None:
        self.verbose = verbose
        self.folder = folder
        self._started: set[str] = set()  # logs begun by this process (older ones are replaced)

    def line(self, text: str) -> None:
        print(text, flush=True)

    def run(self, cmd: Sequence[str], name: str) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"{name}.log"
        mode = "a" if name in self._started else "w"
        self._started.add(name)
        with path.open(mode) as out:
            out.write(f"\n$ {shlex.join(cmd)}\n")
            out.flush()
            if self.verbose:
                print(f"$ {shlex.join(cmd)}", flush=True)
                proc = subprocess.Popen(
                    cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
                )
                assert proc.stdout
                for line in proc.stdout:
                    out.write(line)
                    sys.stdout.write(line)
                code = proc.wait()
            else:
                code = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT).returncode
        if code != 0:
            tail = path.read_text().splitlines()[-25:]
            sys.stderr.write("\n".join(tail) + "\n")
            raise ImagesError(f"{name}: {cmd[0]} {cmd[1]} exited {code} (log: {path})")


def run(cmd: Sequence[str]) -> None:
    capture(cmd)


def capture(cmd: Sequence[str]) -> str:
    try:
        result = subprocess.run(cmd, capture_output=True, text=True)
    except FileNotFoundError as exc:
        raise ImagesError(f"{cmd[0]} not found: {exc}") from exc
    if result.returncode != 0:
        raise ImagesError(
            f"{shlex.join(cmd[:3])} exited {result.returncode}: {result.stderr.strip()}"
        )
    return result.stdout


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def selected(only: Iterable[str] | None, gpu: bool) -> list[str]:
    names = list(only) if only else [*DEFAULT_IMAGES, *(["trainer"] if gpu else [])]
    unknown = [n for n in names if n not in IMAGES]
    if unknown:
        raise ImagesError(f"unknown image {unknown[0]}: one of {', '.join(IMAGES)}")
    return names


def truthy(value: str) -> bool:
    return value.strip().lower() in ("1", "yes", "true", "on")


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="images", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tag", default="dev", help="image tag (the Makefile's TAG)")
    parser.add_argument("--gpu", default="0", help="1: also the CUDA trainer image (huge)")
    parser.add_argument(
        "--only", default="", metavar="A,B", help=f"comma-separated, of {', '.join(IMAGES)}"
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="stream every command's output"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build the base (when needed) and the images")
    b.add_argument("--build-ca", default="", help="CA folder or bundle mounted for the build steps")
    b.add_argument("--pip-conf", default="", help="pip config file, a build secret of the steps")
    b.add_argument("--pip-cache", default="", help="pip cache folder mounted for the build steps")
    b.add_argument("--flash-attn", default="0", help="the GPU trainer's FLASH_ATTN build argument")
    b.add_argument("--no-check", action="store_true", help="skip running commands in the images")
    b.add_argument("--rebuild-base", action="store_true", help="run mmdebstrap again")
    b.add_argument(
        "--no-cache", action="store_true", help="rebuild every layer (buildah --no-cache)"
    )
    p = sub.add_parser("push", help="push the built images with skopeo")
    p.add_argument("--repo", required=True, help="HOST:PORT/PATH, e.g. 127.0.0.1:5000/visionr1")
    p.add_argument("--insecure", default="auto", help="plain HTTP: auto (local addresses), 1, 0")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    log = Log(verbose=args.verbose)
    try:
        names = selected([n for n in args.only.split(",") if n], truthy(args.gpu))
        if args.command == "build":
            host = build_host(args.build_ca, args.pip_conf, args.pip_cache)
            build(
                names,
                args.tag,
                host,
                log,
                check=not args.no_check,
                flash_attn=args.flash_attn,
                rebuild_base=args.rebuild_base,
                no_cache=args.no_cache,
            )
        else:
            push(names, args.repo, args.tag, args.insecure, log)
    except ImagesError as exc:
        print(f"images: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
