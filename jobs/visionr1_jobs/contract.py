"""The stage contract (docs/design.md): atomic writes, the done-marker manifest, shards, exit codes.

A stage is done if and only if ``<workspace>/<stage>/_manifest.json`` exists. It is written last and
atomically; everything a stage writes on the way goes through :func:`atomic_write` too, so a
killed pod never leaves a half-written file under its final name.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from pydantic import Field

from visionr1_jobs.config import (
    DEFAULT_TERMINATION_LOG,
    EXIT_INPUT_MISSING,
    EXIT_INVALID_INPUT,
    TERMINATION_LOG_ENV,
    Model,
    ResolvedStageConfig,
    compatible_params,
    local_base_model,
)

MANIFEST = "_manifest.json"
# Written by a torchrun child that hit invalid input: torchrun reports any failing child as exit
# 1, so the launcher reads this marker to exit 65 (permanent) instead of being retried.
INVALID_MARKER = "_invalid_input.txt"
# Set in a stage program started by another one (a PTST sub-stage's own process): it reports
# invalid input through the same marker, for its launcher to exit 65.
CHILD_ENV = "VISIONR1_CHILD"


class InvalidInput(Exception):
    """Bad config or input data: permanent, the stage exits with EXIT_INVALID_INPUT."""


class InputNotReady(InvalidInput):
    """A stage input's producer has no manifest (yet): retryable, exit EXIT_INPUT_MISSING.

    On a weakly consistent filesystem the producer's last merge can be lost although its Job
    succeeded; the operator then runs the producer again (it merges) and retries this stage."""


class StageManifest(Model):
    """What a finished stage leaves behind (``<stage>/_manifest.json``)."""

    stage: str
    outputs: dict[str, str] = Field(
        default_factory=dict, description="Named outputs, paths relative to the workspace."
    )
    rows: dict[str, int] = Field(default_factory=dict, description="Row counts per output.")
    hashes: dict[str, str] = Field(default_factory=dict, description="sha256 of output files.")
    metrics: dict[str, float] = Field(default_factory=dict)
    mlflow_run_id: str | None = None
    started_at: float | None = None
    finished_at: float | None = None
    extra: dict[str, Any] = Field(default_factory=dict)


# --------------------------------------------------------------------------- atomic files


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()


def fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``dest``; on success fsync it and rename it over ``dest``.

    For writers that want a file name (pyarrow, save_pretrained of a single file, PIL).
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    # mkstemp creates 0600; outputs must be readable by the next stage's pod (maybe another uid).
    os.fchmod(fd, _FILE_MODE)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, dest)
        fsync_dir(dest.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()


def atomic_savefig(fig: Any, dest: str | os.PathLike[str], dpi: int = 110) -> Path:
    """Save a matplotlib figure as PNG at ``dest`` atomically, then close it (frees its memory)."""
    import matplotlib.pyplot as plt

    try:
        with atomic_path(dest) as tmp:
            fig.savefig(tmp, format="png", dpi=dpi)
    finally:
        plt.close(fig)
    return Path(dest)


def atomic_write(dest: str | os.PathLike[str], data: bytes | str) -> Path:
    """Write bytes or text to ``dest`` atomically (temp file, fsync, rename)."""
    with atomic_path(dest) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data.encode() if isinstance(data, str) else data)
    return Path(dest)


def atomic_write_json(dest: str | os.PathLike[str], obj: Any) -> Path:
    return atomic_write(dest, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def sha256_file(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------- manifests


def stage_dir(cfg: ResolvedStageConfig) -> Path:
    return Path(cfg.workspace) / cfg.output_dir


def resolve_path(workspace: str | os.PathLike[str], path: str) -> Path:
    """Relative paths are under the workspace; absolute paths stay."""
    p = Path(path)
    return p if p.is_absolute() else Path(workspace) / p


def manifest_path(workspace: str | os.PathLike[str], output_dir: str) -> Path:
    return Path(workspace) / output_dir / MANIFEST


def read_manifest(workspace: str | os.PathLike[str], output_dir: str) -> StageManifest | None:
    """The manifest of a finished stage, or None when the stage has not finished."""
    p = manifest_path(workspace, output_dir)
    if not p.exists():
        return None
    return StageManifest.model_validate_json(p.read_text())


def write_manifest(cfg: ResolvedStageConfig, manifest: StageManifest) -> Path:
    """Mark the stage done. Call last, after every output is in place."""
    manifest.finished_at = manifest.finished_at or time.time()
    return atomic_write_json(manifest_path(cfg.workspace, cfg.output_dir), manifest.dump())


def input_path(cfg: ResolvedStageConfig, name: str, output_key: str | None = None) -> Path:
    """Resolve input ``name``; for a stage input, follow the producer's manifest to ``output_key``.

    Raises InvalidInput when the input is missing or the producing stage has not finished.
    """
    loc = cfg.inputs.get(name)
    if loc is None:
        raise InvalidInput(f"config.inputs.{name} is missing; the {cfg.stage} stage needs it")
    if loc.format != "stage":
        if (
            loc.format == "model"
            and not Path(loc.path).is_absolute()
            and not resolve_path(cfg.workspace, loc.path).exists()
        ):
            # a hub id: the folder the fetch downloaded it into, when it is the base model
            return Path(local_base_model(loc.path))
        return resolve_path(cfg.workspace, loc.path)
    man = read_manifest(cfg.workspace, loc.path)
    if man is None:
        raise InputNotReady(
            f"config.inputs.{name}: stage {loc.stage or loc.path!r} has not finished "
            f"(no {loc.path}/{MANIFEST} in {cfg.workspace})"
        )
    key = output_key or name
    if key not in man.outputs:
        raise InvalidInput(
            f"config.inputs.{name}: stage {loc.stage!r} has no output {key!r} "
            f"(it has {sorted(man.outputs)})"
        )
    return resolve_path(cfg.workspace, man.outputs[key])


# --------------------------------------------------------------------------- shards, progress


def shard_from_env(env: dict[str, str] | None = None) -> tuple[int, int]:
    """(index, count) from an Indexed Job: JOB_COMPLETION_INDEX and VISIONR1_SHARDS."""
    env = dict(os.environ) if env is None else env
    index = int(env.get("JOB_COMPLETION_INDEX", "0") or 0)
    count = int(env.get("VISIONR1_SHARDS", "1") or 1)
    if count < 1 or not 0 <= index < count:
        raise InvalidInput(
            f"JOB_COMPLETION_INDEX={index} is outside 0..VISIONR1_SHARDS-1 ({count})"
        )
    return index, count


def progress(stage: str, done: int, total: int | None, **extra: Any) -> None:
    """A machine-readable progress line on stderr: ``VISIONR1_PROGRESS {json}``.

    The local executor and the operator (from pod logs) surface the latest one.
    """
    payload = {"stage": stage, "done": done, "total": total, "time": time.time(), **extra}
    print("VISIONR1_PROGRESS " + json.dumps(payload, default=str), file=sys.stderr, flush=True)


_PROGRESS_TAG = "VISIONR1_PROGRESS "


def parse_progress(line: str) -> dict[str, Any] | None:
    """The payload of a progress line, or None. The tag may follow other output on the same
    line: tqdm redraws with a carriage return and no newline."""
    at = line.rfind(_PROGRESS_TAG)
    if at < 0:
        return None
    try:
        payload = json.loads(line[at + len(_PROGRESS_TAG) :])
    except json.JSONDecodeError:
        return None
    return payload if isinstance(payload, dict) else None


# --------------------------------------------------------------------------- termination message

# The kubelet keeps at most 4096 bytes of a container's termination message.
TERMINATION_MESSAGE_BYTES = 4000


def termination_log_path() -> Path | None:
    """Where this process's termination message goes: $VISIONR1_TERMINATION_LOG (the pod's
    terminationMessagePath, set by the operator), else the default path only if it exists (the
    kubelet creates it in every container; nothing is created in /dev on a laptop)."""
    explicit = os.environ.get(TERMINATION_LOG_ENV)
    if explicit:
        return Path(explicit)
    default = Path(DEFAULT_TERMINATION_LOG)
    return default if default.exists() else None


def one_line(text: str) -> str:
    """``text`` on one line (every run of whitespace, newlines included, becomes one space)."""
    return " ".join(str(text).split())


def write_termination_message(text: str) -> None:
    """Write ``text``, on one line, as the container's termination message (``kubectl describe
    pod`` shows it and the operator puts it in the run's conditions). Best effort: a path that
    cannot be written (a laptop, a read-only /dev) is skipped, never an error of the stage."""
    path = termination_log_path()
    if path is None:
        return
    if text and "LOCAL_RANK" in os.environ and read_termination_message():
        return  # a torchrun child: the first failing rank's reason stays (the others follow it)
    data = one_line(text).encode()[:TERMINATION_MESSAGE_BYTES].decode(errors="ignore")
    with contextlib.suppress(OSError):
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(data)


def read_termination_message() -> str:
    """What this container's termination message says so far ("" when none or unreadable)."""
    path = termination_log_path()
    if path is None:
        return ""
    try:
        return path.read_text(encoding="utf-8", errors="replace").strip()
    except OSError:
        return ""


def exception_line(exc: BaseException) -> str:
    """The last line a traceback of ``exc`` prints ("Type: message"), on one line."""
    return one_line("".join(traceback.format_exception_only(type(exc), exc)))


# --------------------------------------------------------------------------- workspace


def check_workspace_writable(workspace: str | os.PathLike[str]) -> None:
    """InvalidInput, saying what to do, when this process cannot write to the workspace.

    On a cluster the run's folder of the PVC is made the stage user's either by the operator's
    root init container or, where Pod Security forbids one, by the pod's fsGroup, which only
    volumes whose driver applies fsGroup honour. Without this check the stage would fail
    later with a bare PermissionError deep inside a library. A workspace that does not exist
    yet (a laptop: the stage creates it) is not checked here.
    """
    folder = Path(workspace)
    if not folder.is_dir():
        return
    try:
        fd, probe = tempfile.mkstemp(prefix=".visionr1-write-check.", dir=folder)
    except OSError as exc:
        if exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise
        groups = ",".join(str(g) for g in sorted({os.getgid(), *os.getgroups()}))
        raise InvalidInput(
            f"workspace {folder} is not writable by uid {os.getuid()} (groups {groups}): "
            f"{exc.strerror}. Make the run's folder of the PVC writable by the stage user: use "
            "a StorageClass whose driver applies the pod's fsGroup 1000 (CSIDriver "
            "fsGroupPolicy File; not hostPath, local or most NFS volumes), or chown/chmod the "
            "folder for uid or gid 1000 once, or set spec.storage.workspaceInit: "
            "RootInitContainer (a root init container prepares the folder) in a namespace whose "
            "Pod Security level allows it (baseline, not restricted)"
        ) from exc
    os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(probe)


# --------------------------------------------------------------------------- entry point


def load_config(path: str | os.PathLike[str]) -> ResolvedStageConfig:
    try:
        raw = Path(path).read_text()
    except OSError as exc:
        raise InvalidInput(f"--config {path}: cannot read ({exc})") from exc
    try:
        cfg = ResolvedStageConfig.model_validate_json(raw)
        # A newer operator's fields at their defaults are dropped here (with a warning each), so
        # an upgrade of the operator does not fail runs on an older trainer image.
        cfg.params, warnings = compatible_params(cfg)
        cfg.stage_params()
    except ValueError as exc:
        raise InvalidInput(f"--config {path}: invalid stage config:\n{exc}") from exc
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr, flush=True)
    return cfg


def run_stage(
    fn: Callable[[ResolvedStageConfig], StageManifest | None],
    cfg_path: str,
    out: IO[str] | None = None,
) -> int:
    """Run a stage program under the contract: skip when done, map errors to exit codes.

    ``fn`` returns the stage's manifest, or None when this process finished only its own shard of
    an Indexed Job and another shard will write the manifest (the last one to finish merges).
    The one-line reason of an exit 65 or 66 is also the container's termination message
    (:func:`write_termination_message`), which the operator shows on the run.
    """
    out = out or sys.stderr
    cfg: ResolvedStageConfig | None = None
    try:
        cfg = load_config(cfg_path)
        done = read_manifest(cfg.workspace, cfg.output_dir)
        if done is not None:
            print(
                f"[{cfg.stage}] already done ({cfg.output_dir}/{MANIFEST}); nothing to do", file=out
            )
            return 0
        check_workspace_writable(cfg.workspace)
        manifest = fn(cfg)
        if manifest is not None and read_manifest(cfg.workspace, cfg.output_dir) is None:
            write_manifest(cfg, manifest)
        return 0
    except InputNotReady as exc:
        print(f"error: {exc}", file=out)
        write_termination_message(str(exc))
        print(f"(exit {EXIT_INPUT_MISSING}: input not there yet; retried)", file=out)
        return EXIT_INPUT_MISSING
    except InvalidInput as exc:
        print(f"error: {exc}", file=out)
        write_termination_message(str(exc))
        if cfg is not None and ("LOCAL_RANK" in os.environ or CHILD_ENV in os.environ):
            atomic_write(Path(cfg.workspace) / cfg.output_dir / INVALID_MARKER, f"{exc}\n")
        print(
            f"(exit {EXIT_INVALID_INPUT}: invalid config or input; retrying will not help)",
            file=out,
        )
        return EXIT_INVALID_INPUT
