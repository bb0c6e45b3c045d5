"""Fixtures shared by the unit tests: the prediction log's database and spill directory, a migrated SQLite."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine

from control_plane.db.engine import make_engine, migrate
from tests.unit.test_predlog import BreakableDatabase


@pytest.fixture
def db(tmp_path) -> BreakableDatabase:
    """A real SQLite file that a test can take down."""
    return BreakableDatabase(tmp_path / "recsys.db")


@pytest.fixture
def spill_dir(tmp_path) -> Path:
    return tmp_path / "spill"


@pytest.fixture
def engine(tmp_path) -> Iterator[Engine]:
    """An empty SQLite database, migrated."""
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    migrate(url)
    engine = make_engine(url)
    yield engine
    engine.dispose()
