"""Trainer checkpoints that survive a killed pod, and the final model written atomically.

transformers writes ``checkpoint-N/`` in place, ``trainer_state.json`` last (after the weights,
optimizer, scheduler and RNG states). A checkpoint is complete when that file parses and the
weights are there; a pod killed mid-save leaves an incomplete folder, which is ignored and
removed before training resumes from the newest complete one.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from visionr1_jobs.contract import fsync_dir

log = logging.getLogger(__name__)

_CKPT = re.compile(r"^checkpoint-(\d+)$")
_WEIGHTS = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "adapter_model.safetensors",
)


def checkpoint_step(path: Path) -> int | None:
    m = _CKPT.match(path.name)
    return int(m.group(1)) if m else None


def is_complete_checkpoint(path: Path) -> bool:
    """trainer_state.json parses and names this step, and model weights (or a DeepSpeed
    ``global_step*`` state) are present."""
    state = path / "trainer_state.json"
    try:
        data = json.loads(state.read_text())
    except (OSError, ValueError):
        return False
    if data.get("global_step") != checkpoint_step(path):
        return False
    has_weights = any((path / w).exists() for w in _WEIGHTS)
    has_ds_state = any(p.is_dir() for p in path.glob("global_step*"))
    return has_weights or has_ds_state


def checkpoints(folder: Path) -> list[Path]:
    """``checkpoint-N`` folders, oldest first."""
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and checkpoint_step(p) is not None]
    return sorted(found, key=lambda p: checkpoint_step(p) or 0)


def latest_complete_checkpoint(folder: Path) -> Path | None:
    for path in reversed(checkpoints(folder)):
        if is_complete_checkpoint(path):
            return path
    return None


def remove_incomplete_checkpoints(folder: Path) -> list[Path]:
    """Delete half-written checkpoints (call on the main process before training resumes)."""
    removed = []
    for path in checkpoints(folder):
        if not is_complete_checkpoint(path):
            log.warning("removing incomplete checkpoint %s (killed mid-save)", path)
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def resume_point(folder: Path, is_main: bool, label: str) -> Path | None:
    """Where a restarted trainer resumes: rank 0 first clears half-written checkpoints, then
    every rank picks the newest complete one (None = start fresh)."""
    if is_main:
        remove_incomplete_checkpoints(folder)
    _barrier()
    resume = latest_complete_checkpoint(folder)
    if resume is not None:
        log.warning("%s: resuming from %s", label, resume.name)
        indexed_cpu_loadable()
    return resume


_INDEXED_CPU_REGISTERED = False


def indexed_cpu_loadable() -> None:
    """Let ``torch.load`` map storages to an indexed CPU device (``cpu:0``).

    On CPU with several processes, transformers before 5.18 (the version vLLM allows, in our
    images) loads the optimizer state with ``map_location=args.device``, which is ``cpu:0`` there,
    and torch knows no such location: every multi-process CPU resume failed with "don't know how
    to restore data location ... (tagged with cpu:0)". A CPU index means nothing, so such a
    location is plain CPU. Registered once per process, through torch's public registry.
    """
    global _INDEXED_CPU_REGISTERED
    if _INDEXED_CPU_REGISTERED:
        return
    import torch

    def tag(storage: Any) -> str | None:
        return None  # saving is unchanged

    def restore(storage: Any, location: str) -> Any:
        return storage.cpu() if location.startswith("cpu:") else None

    torch.serialization.register_package(30, tag, restore)
    _INDEXED_CPU_REGISTERED = True


def starting_weights(base: str, resume: Path | None) -> str:
    """Where a (re)started trainer loads its model from: the checkpoint it resumes from when that
    holds Hugging Face weights, else ``base``.

    Why not leave the weights to ``trainer.train(resume_from_checkpoint=...)``: transformers'
    Trainer (v5, as installed) restores them with ``model.load_state_dict(raw_file, strict=False)``,
    but ``save_pretrained`` writes checkpoints in the original Hub layout while a model with a
    key-conversion mapping (Qwen2.5-VL: ``model.layers.*``/``visual.*`` on disk,
    ``model.language_model.*``/``model.visual.*`` in memory) uses other names in memory. Every
    renamed tensor is then skipped with only a logged warning; training continued from the base
    weights (all but ``lm_head``) with the restored optimizer moments at the full learning rate,
    and the loss jumped from ~0.1 to 3-15. ``from_pretrained`` applies the renaming; the
    Trainer's own partial load afterwards rewrites only the tensors whose names match, with the
    same values, so it is harmless (and stays correct once transformers renames on resume).
    A DeepSpeed-only checkpoint (no HF weights) is left to DeepSpeed, which keeps module names.
    """
    if resume is not None and is_complete_model(resume):
        log.warning(
            "loading the weights from %s (the Trainer's own restore misses renamed tensors; "
            "its 'missing/unexpected keys' warning below is expected)",
            resume.name,
        )
        return str(resume)
    return base


def is_complete_model(path: Path) -> bool:
    """A final model folder: config + weights (only ever renamed into place complete)."""
    return (path / "config.json").exists() and any((path / w).exists() for w in _WEIGHTS)


def save_final_atomically(dest: Path, write: Callable[[Path], None], is_main: bool = True) -> Path:
    """Run ``write(tmp_dir)`` (every rank: ZeRO-3 gathers weights collectively) and, on the main
    process, rename the folder onto ``dest``; readers see no folder or a complete one.

    The temporary folder's name is fixed (``.<name>.tmp``) so all ranks write into the same one;
    a leftover from a killed attempt is cleared first.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.tmp"
    if is_main and tmp.exists():
        shutil.rmtree(tmp)
    _barrier()
    write(tmp)
    _barrier()
    if is_main:
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        old = None
        if dest.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent))
            os.replace(dest, old / dest.name)
        os.replace(tmp, dest)
        fsync_dir(dest.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return dest


def _barrier() -> None:
    from visionr1_jobs.training.runtime import barrier

    barrier()
