"""Paths the tests share, importable by name from any test folder.

They are not kept in conftest.py: with tests/cluster/conftest.py beside it, ``from conftest import``
resolves to whichever conftest pytest imported first.
"""

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Public benchmark and data-format samples with their official verdicts, committed so every clone
# tests the same rows; test_realdata_copy.py checks them against the committed SHA256SUMS.
REALDATA = REPO / "tests" / "data" / "realdata"
