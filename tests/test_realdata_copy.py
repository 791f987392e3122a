"""The committed real-data samples are complete and unmodified: every file matches the committed
checksum list (``tests/data/realdata/SHA256SUMS``), and no file is missing or unlisted."""

from __future__ import annotations

import hashlib

from conftest import REALDATA


def test_copy_is_complete_and_unmodified() -> None:
    listed = {}
    for line in (REALDATA / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split(maxsplit=1)
        listed[name.lstrip("*")] = digest
    present = sorted(p.name for p in REALDATA.iterdir() if p.name != "SHA256SUMS")
    assert sorted(listed) == present and "README.md" in present and len(present) >= 12
    changed = [
        name
        for name, digest in listed.items()
        if hashlib.sha256((REALDATA / name).read_bytes()).hexdigest() != digest
    ]
    assert not changed, f"modified samples (restore them from git): {changed}"
