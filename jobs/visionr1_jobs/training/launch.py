"""Multi-process and multi-node training: the stage program re-launches itself under torchrun.

Every pod runs the same command, ``python -m visionr1_jobs sft|grpo --config FILE``. When the
environment asks for more than one process and this process was not started by torchrun, the
stage execs ``torchrun`` around itself with a static rendezvous:

=========================  =================================================================
``VISIONR1_NNODES``        nodes (pods) in the job: the Indexed Job's completions (default 1)
``VISIONR1_NPROC_PER_NODE`` processes per pod (default: the visible GPUs, else 1)
``JOB_COMPLETION_INDEX``   this pod's node rank (set by Kubernetes on an Indexed Job)
``MASTER_ADDR``            index 0's address: ``<job>-0.<headless service>`` (set by the operator)
``MASTER_PORT``            rendezvous port on index 0 (default 29500)
=========================  =================================================================

torchrun then sets RANK / LOCAL_RANK / WORLD_SIZE for each process; only global rank 0 logs to
MLflow and writes the stage manifest (all ranks share the workspace volume).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from visionr1_jobs.contract import InvalidInput


def under_torchrun(env: dict[str, str] | None = None) -> bool:
    env = dict(os.environ) if env is None else env
    return "LOCAL_RANK" in env and "WORLD_SIZE" in env


def _int_env(env: dict[str, str], name: str, default: int) -> int:
    raw = env.get(name, "")
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError as exc:
        raise InvalidInput(f"environment {name}={raw!r} is not an integer") from exc
    if value < (0 if name == "JOB_COMPLETION_INDEX" else 1):
        raise InvalidInput(f"environment {name}={value} is out of range")
    return value


def _gpus() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except ImportError:  # pragma: no cover - the trainer image always has torch
        return 0


def planned_world_size(env: dict[str, str] | None = None) -> int:
    """Processes the job will train with: WORLD_SIZE under torchrun, else nodes × processes."""
    env = dict(os.environ) if env is None else env
    if under_torchrun(env):
        return _int_env(env, "WORLD_SIZE", 1)
    return _int_env(env, "VISIONR1_NNODES", 1) * _int_env(
        env, "VISIONR1_NPROC_PER_NODE", max(_gpus(), 1)
    )


def torchrun_command(
    stage: str, config_path: str, env: dict[str, str] | None = None
) -> list[str] | None:
    """The torchrun command line for this pod, or None when one process is enough."""
    env = dict(os.environ) if env is None else env
    if under_torchrun(env):
        return None
    nnodes = _int_env(env, "VISIONR1_NNODES", 1)
    nproc = _int_env(env, "VISIONR1_NPROC_PER_NODE", max(_gpus(), 1))
    if nnodes * nproc <= 1:
        return None
    node_rank = _int_env(env, "JOB_COMPLETION_INDEX", 0)
    if node_rank >= nnodes:
        raise InvalidInput(
            f"JOB_COMPLETION_INDEX={node_rank} is outside 0..VISIONR1_NNODES-1 ({nnodes})"
        )
    master = env.get("MASTER_ADDR") or ("127.0.0.1" if nnodes == 1 else "")
    if not master:
        raise InvalidInput(
            "multi-node training needs MASTER_ADDR (index 0's pod address through the headless "
            "Service); the operator sets it on the Indexed Job"
        )
    port = _int_env(env, "MASTER_PORT", 29500)
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nnodes={nnodes}",
        f"--nproc_per_node={nproc}",
        f"--node_rank={node_rank}",
        f"--master_addr={master}",
        f"--master_port={port}",
        "-m",
        "visionr1_jobs",
        stage,
        "--config",
        config_path,
    ]


def relaunch(stage: str, config_json: str, folder: Path) -> int | None:
    """Run the stage under torchrun when the environment asks for several processes.

    Returns torchrun's exit status, or None when this process should train by itself.
    The resolved config is written into the stage folder for the children to read.
    """
    cmd = torchrun_command(stage, str(folder / LAUNCH_CONFIG))
    if cmd is None:
        return None
    return _run_child(stage, cmd, config_json, folder, None)


def launch_child(stage: str, config_json: str, folder: Path, env: dict[str, str]) -> int:
    """Run the stage program again in processes of its own, with ``env`` added: under torchrun
    (the same world the pod would get) when the environment asks for several processes, else
    one plain child. Returns the exit status; a child that refused its input raises
    :class:`InvalidInput` here with its reason.

    Why a child and not a call: everything the child allocated (a DeepSpeed engine, a colocated
    vLLM engine, CUDA memory, NCCL groups, leaked host memory) is gone when it exits, which no
    in-process teardown guarantees.
    """
    cmd = torchrun_command(stage, str(folder / LAUNCH_CONFIG)) or [
        sys.executable,
        "-m",
        "visionr1_jobs",
        stage,
        "--config",
        str(folder / LAUNCH_CONFIG),
    ]
    return _run_child(stage, cmd, config_json, folder, env)


LAUNCH_CONFIG = "_launch_config.json"


def _run_child(
    stage: str, cmd: list[str], config_json: str, folder: Path, env: dict[str, str] | None
) -> int:
    from visionr1_jobs.contract import (
        CHILD_ENV,
        INVALID_MARKER,
        atomic_write,
        write_termination_message,
    )

    marker = folder / INVALID_MARKER
    marker.unlink(missing_ok=True)
    # A failing rank writes its reason there (the container's file, shared by every process of
    # the pod): start empty, so that what is there afterwards is this launch's.
    write_termination_message("")
    atomic_write(folder / LAUNCH_CONFIG, config_json)
    child_env = None if env is None else {**os.environ, CHILD_ENV: "1", **env}
    print(f"[{stage}] launching {' '.join(cmd)}", file=sys.stderr, flush=True)
    rc = wait_forwarding_stop(subprocess.Popen(cmd, env=child_env))
    if rc != 0 and marker.exists():
        # A rank refused its input: permanent, whatever exit code torchrun chose.
        raise InvalidInput(marker.read_text().strip())
    return rc


def wait_forwarding_stop(proc: subprocess.Popen[bytes], grace_s: float = 30.0) -> int:
    """Wait for ``proc``; if this process is stopped meanwhile (SIGTERM raises SystemExit in the
    stage program, Ctrl-C KeyboardInterrupt), stop the child the same way first: in a pod only
    PID 1 gets the kubelet's SIGTERM, and torchrun passes it on to its ranks."""
    try:
        return proc.wait()
    except BaseException:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        raise


def launch_failed(stage: str, rc: int, launcher: str = "torchrun") -> str:
    """Why a launch failed, with the failing rank's own reason when it wrote one (a rank's last
    error line, as its termination message), for the stage's error. ``launcher`` names what
    exited (torchrun, or a stage's own child process)."""
    from visionr1_jobs.contract import read_termination_message

    said = read_termination_message()
    if rc != 0 and said:
        return f"{stage}: {launcher} exited with status {rc}; a rank failed with: {said}"
    return f"{stage}: {launcher} exited with status {rc}; see the ranks' logs above"
