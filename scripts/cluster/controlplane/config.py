"""The pinned versions (versions.toml) and where everything lives.

Two places: the build cache outside the repository (one folder per versions.toml content, shared
by every clone on the machine) and the running state inside the repository
(``.visionr1/cluster/``, gitignored): PKI, kubeconfigs, logs, etcd data, PV folders, pod folders.
"""

from __future__ import annotations

import hashlib
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

VERSIONS_FILE = Path(__file__).resolve().parents[1] / "versions.toml"
STATE_DIR = Path(".visionr1") / "cluster"
# The cache is under the home folder on purpose, not $XDG_CACHE_HOME: the test suite points
# XDG_CACHE_HOME at a temporary folder, which would rebuild Kubernetes in every session.
CACHE_ROOT_ENV = "VISIONR1_CONTROL_PLANE_CACHE"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class GoVersions(_Strict):
    minimum: str


class KubernetesVersions(_Strict):
    version: str = Field(pattern=r"^v1\.\d+\.\d+$")
    staging: str = Field(pattern=r"^v0\.\d+\.\d+$")


class Pinned(_Strict):
    version: str = Field(pattern=r"^v\d+\.\d+\.\d+$")


class NodeConfig(_Strict):
    name: str
    cpu: str
    memory: str
    gpus: int = Field(ge=0)
    pods: int = Field(ge=1)
    gpu_product: str


class DebianVersions(_Strict):
    suite: str


class Versions(_Strict):
    go: GoVersions
    kubernetes: KubernetesVersions
    etcd: Pinned
    helm: Pinned
    kwok: Pinned
    node: NodeConfig
    containerd: Pinned
    runc: Pinned
    cri_tools: Pinned
    cni_plugins: Pinned
    coredns: Pinned
    local_path_provisioner: Pinned
    registry: Pinned
    debian: DebianVersions

    @classmethod
    def load(cls, path: Path = VERSIONS_FILE) -> tuple[Versions, str]:
        """The versions and the hash of the file (the cache key)."""
        raw = path.read_bytes()
        return cls.model_validate(tomllib.loads(raw.decode())), hashlib.sha256(raw).hexdigest()[:12]


def cache_root() -> Path:
    if env := os.environ.get(CACHE_ROOT_ENV):
        return Path(env)
    return Path.home() / ".cache" / "visionr1" / "control-plane"


@dataclass(frozen=True)
class Layout:
    """Every path the control plane uses, from the repository root and the versions."""

    repo: Path
    versions: Versions
    versions_hash: str

    @classmethod
    def for_repo(cls, repo: Path) -> Layout:
        versions, digest = Versions.load()
        return cls(repo=repo.resolve(), versions=versions, versions_hash=digest)

    # -- the build cache (outside the repository) --
    @property
    def cache(self) -> Path:
        return cache_root() / f"k8s-{self.versions.kubernetes.version}-{self.versions_hash}"

    @property
    def bin_dir(self) -> Path:
        return self.cache / "bin"

    @property
    def src_dir(self) -> Path:
        return self.cache / "src"

    def binary(self, name: str) -> Path:
        return self.bin_dir / name

    # -- the running state (inside the repository, gitignored) --
    @property
    def state(self) -> Path:
        return self.repo / STATE_DIR

    @property
    def state_file(self) -> Path:
        return self.state / "state.json"

    @property
    def kubeconfig(self) -> Path:
        return self.state / "kubeconfig"

    @property
    def pki(self) -> Path:
        return self.state / "pki"

    @property
    def logs(self) -> Path:
        return self.state / "logs"

    @property
    def etcd_data(self) -> Path:
        return self.state / "etcd"

    @property
    def pv_root(self) -> Path:
        return self.state / "pv"

    @property
    def pods(self) -> Path:
        return self.state / "pods"

    @property
    def tokens(self) -> Path:
        return self.state / "tokens"
