"""The committed real-data samples are byte-identical to the shared originals (when present)."""

from __future__ import annotations

import filecmp

import pytest

from conftest import REALDATA, SHARED


def test_copy_is_complete_and_unmodified() -> None:
    files = sorted(p.name for p in REALDATA.iterdir())
    assert "README.md" in files and len(files) >= 12
    original = SHARED / "realdata"
    if not original.is_dir():
        pytest.skip("../shared/realdata is not beside this clone; the committed copy is used")
    match, mismatch, errors = filecmp.cmpfiles(original, REALDATA, files, shallow=False)
    assert not mismatch and not errors
    assert sorted(p.name for p in original.iterdir()) == files
