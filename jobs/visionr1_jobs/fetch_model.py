"""``python -m visionr1_jobs.fetch_model``: download one hub model at one revision, once.

The operator runs this as the ``model-fetch`` init container of every stage pod that loads the
run's hub base model. It is the only container that mounts the model's folder of the model cache
(``<namespace>/<spec.storage.modelCache>/models--<owner>--<name>/<revision>``) read-write; the
stage container mounts the same folder read-only and loads :data:`SNAPSHOT` from it
(``VISIONR1_BASE_MODEL_DIR``). Layout of that folder (``--dest``)::

    snapshot/                the whole model, with FETCH_MARKER in it
    .partial-*/              a download in progress (or left by a killed pod)
    .lock                    taken (flock) by the one fetch that downloads
    .hf-home/                huggingface_hub's own caches (HF_HOME of this container)

One writer, and readers see all or nothing: the download goes into a ``.partial-*`` folder, the
marker is written into it last, and the folder is then renamed to ``snapshot`` (one atomic
rename). A fetch that finds ``snapshot`` with its marker downloads nothing. Concurrent fetches of
the same model (the pods of one Job, runs starting together) wait on ``.lock`` so one downloads
and the others find its snapshot; on a volume without working locks each downloads on its own
and the first rename wins, the others discard theirs. A download that fails leaves no
``snapshot``: the next attempt starts again (resuming the files already there when it holds the
lock).

Exit status: 0 when the snapshot is there; 65 (permanent, the operator fails the run) when the
model or revision does not exist or cannot be accessed with the run's token, saying which field to
fix; anything else (the network, the hub) is retried by the operator as any failed attempt.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
import signal
import socket
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from visionr1_jobs.config import EXIT_INVALID_INPUT, FETCH_MARKER
from visionr1_jobs.contract import write_termination_message

SNAPSHOT = "snapshot"
LOCK = ".lock"
PARTIAL = ".partial"
_COMMIT = re.compile(r"^[0-9a-f]{40}$")


class FetchRefused(Exception):
    """The model or revision cannot be fetched whatever the retry (exit 65)."""


def is_complete(folder: Path) -> bool:
    return (folder / FETCH_MARKER).is_file()


@contextlib.contextmanager
def _lock(dest: Path) -> Iterator[bool]:
    """Hold ``dest/.lock`` (True), or go on without it (False) where the volume has no locks."""
    fd = os.open(dest / LOCK, os.O_RDWR | os.O_CREAT, 0o664)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            held = True
        except OSError as exc:
            if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise
            held = False
        yield held
    finally:
        os.close(fd)  # releases the lock


def _resolve_and_download(name: str, revision: str, local_dir: Path) -> str:
    """Download ``name`` at ``revision`` into ``local_dir``; the commit it resolved to."""
    import huggingface_hub
    from huggingface_hub.errors import (
        GatedRepoError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        # A branch or tag is resolved once, so every file comes from the same commit.
        commit = (
            revision
            if _COMMIT.match(revision)
            else huggingface_hub.model_info(name, revision=revision).sha
        )
        huggingface_hub.snapshot_download(name, revision=commit, local_dir=local_dir)
    except GatedRepoError as exc:
        raise FetchRefused(
            f"spec.baseModel.name: {name!r} is gated and the run's token may not read it; set "
            "spec.hfTokenSecret to a Secret holding the token of an account granted access "
            f"({type(exc).__name__})"
        ) from exc
    except RevisionNotFoundError as exc:
        raise FetchRefused(
            f"spec.baseModel.revision: {revision!r} is no revision of {name!r}; set a commit, "
            "tag or branch of the model"
        ) from exc
    except RepositoryNotFoundError as exc:
        raise FetchRefused(
            f"spec.baseModel.name: {name!r} is no model on the hub, or a private one the run's "
            "token (spec.hfTokenSecret) may not read; fix the id or the Secret"
        ) from exc
    return str(commit or "")


def _discard(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def fetch(name: str, revision: str, dest: Path) -> Path:
    """The complete snapshot of ``name`` at ``revision`` under ``dest`` (see the module
    docstring), downloading it unless it is there already."""
    snapshot = dest / SNAPSHOT
    if is_complete(snapshot):
        return snapshot
    dest.mkdir(parents=True, exist_ok=True)
    with _lock(dest) as held:
        if is_complete(snapshot):  # another fetch finished while this one waited
            return snapshot
        if held:
            # The only writer: what is left is a killed fetch's. Its files are resumed from.
            partial = dest / PARTIAL
            for stale in dest.glob(f"{PARTIAL}-*"):
                _discard(stale)
        else:
            partial = dest / f"{PARTIAL}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex}"
        if snapshot.exists():
            # Not the fetch's (no marker): never loaded; moved aside and fetched again.
            aside = dest / f"{PARTIAL}-unmarked-{uuid.uuid4().hex}"
            with contextlib.suppress(FileNotFoundError):
                snapshot.rename(aside)
            _discard(aside)
        try:
            partial.mkdir(exist_ok=True)
            commit = _resolve_and_download(name, revision, partial)
            _discard(partial / ".cache")  # huggingface_hub's download bookkeeping
            marker: dict[str, Any] = {
                "name": name,
                "revision": revision,
                "commit": commit,
                "fetchedAt": time.time(),
                "files": sorted(
                    str(p.relative_to(partial)) for p in partial.rglob("*") if p.is_file()
                ),
            }
            with open(partial / FETCH_MARKER, "w", encoding="utf-8") as fh:
                json.dump(marker, fh, indent=2)
                fh.flush()
                os.fsync(fh.fileno())
            try:
                partial.rename(snapshot)
            except OSError as exc:
                # Another fetch (no lock on this volume) renamed its complete one first.
                if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY) or not is_complete(snapshot):
                    raise
                _discard(partial)
        except BaseException:
            if not held:  # with the lock held the files stay for the next attempt to resume
                _discard(partial)
            raise
    return snapshot


def _terminated(signum: int, frame: Any) -> None:
    raise SystemExit(143)  # as the stage programs: PID 1 ignores a signal it has no handler for


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _terminated)
    parser = argparse.ArgumentParser(
        prog="python -m visionr1_jobs.fetch_model", description=__doc__
    )
    parser.add_argument("--name", required=True, help="hub model id (spec.baseModel.name)")
    parser.add_argument("--revision", required=True, help="spec.baseModel.revision (or main)")
    parser.add_argument("--dest", required=True, help="the model's folder of the model cache")
    parser.add_argument(
        "--workspace",
        help="the run's workspace: a folder there named like the model is loaded instead",
    )
    args = parser.parse_args(argv)
    if args.workspace and (Path(args.workspace) / args.name).is_dir():
        # The stage loads a folder of the workspace before a hub id (visionr1_jobs.contract).
        print(f"{args.name}: a folder of the run's workspace; nothing to fetch", flush=True)
        return 0
    try:
        snapshot = fetch(args.name, args.revision, Path(args.dest))
    except FetchRefused as exc:
        write_termination_message(str(exc))
        print(exc, file=sys.stderr, flush=True)
        return EXIT_INVALID_INPUT
    except Exception as exc:
        write_termination_message(f"fetching {args.name}@{args.revision}: {exc}")
        raise
    marker = json.loads((snapshot / FETCH_MARKER).read_text())
    print(
        f"{args.name}@{args.revision}: commit {marker.get('commit')}, "
        f"{len(marker.get('files', []))} files in {snapshot}",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
