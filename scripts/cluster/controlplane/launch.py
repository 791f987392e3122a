"""Start one container's process: ``unshare --mount --uts -- python -m controlplane.launch SPEC``.

Runs as root inside a private mount and UTS namespace (the node runner starts it so), so what it
does is seen by this process alone: set the pod's host name, bind-mount each volume (its folder,
a subPath of it, or a file) at its mount path, read-only where asked, then drop to the pod's
user and groups and exec the container's command. The mount points themselves are created on the
host's root filesystem when missing (empty folders or files; bind mounts need a target).

A failure before the command runs (a mount, a missing executable) exits 128 and leaves
``<spec>.error``, which the runner reports as StartError, the way a container runtime does.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import socket
import sys
from pathlib import Path

MS_RDONLY = 1
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384

_libc = ctypes.CDLL(None, use_errno=True)


def _mount(source: str | None, target: str, flags: int) -> None:
    src = source.encode() if source else None
    if _libc.mount(src, target.encode(), None, flags, None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {source} on {target}: {os.strerror(err)}")


def _target(path: Path, is_file: bool) -> None:
    if path.exists():
        return
    if is_file:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
    else:
        path.mkdir(parents=True, exist_ok=True)


def _expose(masks: dict[str, list[str]]) -> None:
    """Make the node's Python reachable for a non-root pod user when a folder above it is not
    (here /root is 0700 and holds the interpreter): cover that folder with an empty tmpfs in this
    namespace and bind back only the paths the pod needs. The host's folder is not changed."""
    for hidden, keep in masks.items():
        fds = {path: os.open(path, os.O_PATH) for path in keep}  # reachable only before the tmpfs
        if _libc.mount(b"tmpfs", hidden.encode(), b"tmpfs", 0, b"mode=0755") != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"tmpfs on {hidden}: {os.strerror(err)}")
        for path, fd in fds.items():
            Path(path).mkdir(parents=True, exist_ok=True)
            _mount(f"/proc/self/fd/{fd}", path, MS_BIND | MS_REC)
            os.close(fd)


def main(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    try:
        socket.sethostname(spec["hostname"])
        _expose(spec.get("masks") or {})
        # Mount the shallow targets first so a deeper one lands inside its parent's bind mount.
        for m in sorted(spec["mounts"], key=lambda m: len(Path(m["target"]).parts)):
            target = Path(m["target"])
            _target(target, m["file"])
            _mount(m["source"], str(target), MS_BIND | MS_REC)
            if m["readOnly"]:
                _mount(None, str(target), MS_BIND | MS_REMOUNT | MS_RDONLY)
        cwd = Path(spec["cwd"])
        cwd.mkdir(parents=True, exist_ok=True)
        env = spec["env"]
        argv = spec["argv"]
        if not argv:
            raise RuntimeError(
                "no command: the node runner has no images, so set the container's command"
            )
        exe = argv[0] if "/" in argv[0] else shutil.which(argv[0], path=env.get("PATH", ""))
        if exe is None:
            raise RuntimeError(f'exec: "{argv[0]}": executable file not found in $PATH')
        os.setgroups(spec["groups"])
        os.setgid(spec["gid"])
        os.setuid(spec["uid"])
        os.chdir(cwd)
        os.execve(exe, argv, env)
    except Exception as err:  # anything before the command runs is a failed start
        print(f"visionr1 node: failed to start container: {err}", file=sys.stderr, flush=True)
        with contextlib.suppress(OSError):
            Path(spec_path + ".error").write_text(str(err))
        return 128
    return 127  # not reached: execve replaced this process


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
