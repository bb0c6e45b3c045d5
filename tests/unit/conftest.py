"""Fixtures shared by the prediction log's unit tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.unit.test_predlog import BreakableDatabase


@pytest.fixture
def db(tmp_path) -> BreakableDatabase:
    """A real SQLite file that a test can take down."""
    return BreakableDatabase(tmp_path / "recsys.db")


@pytest.fixture
def spill_dir(tmp_path) -> Path:
    return tmp_path / "spill"
