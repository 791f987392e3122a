"""A failing stage leaves its one-line reason as the container's termination message (the file
Kubernetes reads at terminationMessagePath), and a workspace it cannot write is a clear exit 65.

The stage entry point runs as the pod runs it (``python -m visionr1_jobs STAGE --config FILE``,
a subprocess), with the termination-message path pointed into the test's folder."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest

from visionr1_jobs import contract
from visionr1_jobs.config import (
    EXIT_INVALID_INPUT,
    TERMINATION_LOG_ENV,
    FilterParams,
    InputLocation,
    ResolvedStageConfig,
)
from visionr1_jobs.contract import run_stage

from repo_paths import REPO


def filter_config(tmp_path: Path, dataset: str = "toy/train") -> Path:
    workspace = tmp_path / "workspace"
    workspace.mkdir(exist_ok=True)
    cfg = ResolvedStageConfig(
        stage="filter",
        workspace=str(workspace),
        output_dir="filter",
        base_model="m",
        inputs={"data": InputLocation(path=dataset, format="toy")},
        params=FilterParams().dump(),
    )
    path = tmp_path / "config.json"
    path.write_text(cfg.model_dump_json(by_alias=True))
    return path


def stage(
    args: list[str], log: Path | None, *, code: str | None = None
) -> subprocess.CompletedProcess[str]:
    """The stage entry point in a process of its own, as in a pod (``code``: instead of ``-m``,
    Python that calls the entry point itself)."""
    env = {k: v for k, v in os.environ.items() if k != TERMINATION_LOG_ENV}
    if log is not None:
        env[TERMINATION_LOG_ENV] = str(log)
    cmd = [sys.executable, "-c", code, *args] if code else [sys.executable, "-m", "visionr1_jobs"]
    return subprocess.run(
        cmd if code else [*cmd, *args],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def error_line(stderr: str) -> str:
    """What the stage printed as its reason (the ``error: ...`` line, and what follows it up to
    the exit-code hint), on one line."""
    text = stderr[stderr.index("error: ") + len("error: ") :]
    return " ".join(text[: text.index("(exit ")].split())


def test_invalid_input_is_the_termination_message(tmp_path: Path) -> None:
    log = tmp_path / "termination-log"
    done = stage(["filter", "--config", str(filter_config(tmp_path))], log)
    assert done.returncode == EXIT_INVALID_INPUT, done.stderr
    message = log.read_text()
    # exactly the reason the stage printed, one line: the missing dataset, by its path
    assert message == error_line(done.stderr)
    assert "\n" not in message and str(tmp_path / "workspace" / "toy" / "train") in message


def test_an_invalid_config_is_one_line(tmp_path: Path) -> None:
    config = tmp_path / "config.json"
    config.write_text('{"stage": "filter", "workspace": "/w", "outputDir": "filter"}')
    log = tmp_path / "termination-log"
    done = stage(["filter", "--config", str(config)], log)
    assert done.returncode == EXIT_INVALID_INPUT
    message = log.read_text()
    # the printed reason spans several lines (pydantic's); the message is all of it, on one
    assert len(error_line(done.stderr)) > 0 and message == error_line(done.stderr)
    assert "\n" not in message and "baseModel" in message


def test_an_unexpected_error_leaves_the_exceptions_last_line(tmp_path: Path) -> None:
    log = tmp_path / "termination-log"
    code = (
        "import sys\n"
        "import visionr1_jobs.stages.filter as f\n"
        "from visionr1_jobs.__main__ import main\n"
        "def run(cfg):\n"
        "    raise ZeroDivisionError('shard 3 has no rows\\nsecond line')\n"
        "f.run = run\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    done = stage(["filter", "--config", str(filter_config(tmp_path))], log, code=code)
    assert done.returncode == 1  # not 65: retryable, as before
    assert "Traceback" in done.stderr  # the log keeps the whole traceback
    assert log.read_text() == "ZeroDivisionError: shard 3 has no rows second line"


def test_no_termination_log_is_never_a_failure_of_its_own(tmp_path: Path) -> None:
    """Locally there is no /dev/termination-log (nothing is created there), and a path that
    cannot be written is skipped: the stage's outcome is its own."""
    config = str(filter_config(tmp_path))
    plain = stage(["filter", "--config", config], None)
    unwritable = stage(["filter", "--config", config], tmp_path / "no" / "such" / "folder")
    assert plain.returncode == unwritable.returncode == EXIT_INVALID_INPUT
    assert error_line(plain.stderr) == error_line(unwritable.stderr)
    assert not (tmp_path / "no").exists()
    if not Path("/dev/termination-log").exists():
        assert contract.termination_log_path() is None


def test_an_unwritable_workspace_fails_at_once_saying_what_to_do(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    workspace = tmp_path / "workspace"
    cfg = ResolvedStageConfig(
        stage="filter", workspace=str(workspace), output_dir="filter", base_model="m"
    )
    path = tmp_path / "config.json"
    path.write_text(cfg.model_dump_json(by_alias=True))
    workspace.mkdir(mode=0o555)  # as the kubelet leaves a fresh subPath: root's, 0755
    if os.geteuid() == 0:  # root writes anyway: the volume refuses, as it does uid 1000

        def refused(*args: object, **kwargs: object) -> None:
            raise PermissionError(errno.EACCES, "Permission denied")

        monkeypatch.setattr(contract.tempfile, "mkstemp", refused)
    log = tmp_path / "termination-log"
    monkeypatch.setenv(TERMINATION_LOG_ENV, str(log))
    ran: list[str] = []
    assert run_stage(lambda c: ran.append(c.stage), str(path)) == EXIT_INVALID_INPUT
    assert ran == [], "the stage did not start"
    message = log.read_text()
    assert f"workspace {workspace} is not writable by uid {os.getuid()}" in message
    # what to do: fsGroup, or the folder's owner, or the root init container where allowed
    for fix in ("fsGroup 1000", "chown", "spec.storage.workspaceInit: RootInitContainer"):
        assert fix in message


def test_a_writable_workspace_leaves_nothing_behind(tmp_path: Path) -> None:
    cfg = ResolvedStageConfig(
        stage="filter", workspace=str(tmp_path / "ws"), output_dir="filter", base_model="m"
    )
    (tmp_path / "ws").mkdir()
    path = tmp_path / "config.json"
    path.write_text(cfg.model_dump_json(by_alias=True))
    assert run_stage(lambda c: None, str(path)) == 0
    assert list((tmp_path / "ws").iterdir()) == []


def test_a_torchrun_rank_keeps_the_first_failing_ranks_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from visionr1_jobs.training import launch

    log = tmp_path / "termination-log"
    monkeypatch.setenv(TERMINATION_LOG_ENV, str(log))
    folder = tmp_path / "sft"
    folder.mkdir()
    log.write_text("from an earlier launch")
    # Stands in for torchrun: two ranks fail, rank 1 first (its reason stays), then torchrun 1.
    child = (
        "import os, sys\n"
        "from visionr1_jobs.contract import write_termination_message as w\n"
        "os.environ['LOCAL_RANK'] = '1'; w('RuntimeError: CUDA out of memory on rank 1')\n"
        "os.environ['LOCAL_RANK'] = '0'; w('RuntimeError: NCCL: remote process exited')\n"
        "sys.exit(1)\n"
    )
    monkeypatch.setattr(launch, "torchrun_command", lambda *a: [sys.executable, "-c", child])
    rc = launch.relaunch("sft", "{}", folder)
    assert rc == 1
    assert launch.launch_failed("sft", rc) == (
        "sft: torchrun exited with status 1; a rank failed with: "
        "RuntimeError: CUDA out of memory on rank 1"
    )
