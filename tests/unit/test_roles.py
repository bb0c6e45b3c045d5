"""The Bento learns its role from traffic_config and keeps the last one when the database is away."""

from __future__ import annotations

import time

import pytest
from sqlalchemy import insert

from bentos.roles import UNKNOWN, RoleWatcher, pick_role
from control_plane.db.engine import make_engine
from control_plane.db.schema import metadata, traffic_config


@pytest.mark.parametrize(
    ("rows", "role"),
    [
        ([], UNKNOWN),
        ([("canary", 10)], "canary"),
        ([("canary", 10), ("baseline", 90)], "baseline"),  # the heavier wins
        ([("canary", 50), ("baseline", 50)], "baseline"),  # a tie goes to baseline, then canary
        ([("control", 5), ("canary", 5)], "canary"),
    ],
)
def test_pick_role(rows, role):
    assert pick_role(rows) == role


def test_watcher_reads_the_role_and_keeps_it_when_the_database_fails(tmp_path):
    url = f"sqlite:///{tmp_path / 'recsys.db'}"
    engine = make_engine(url)
    metadata.create_all(engine)
    available = {"up": True}

    def factory():
        if not available["up"]:
            raise ConnectionRefusedError("down")
        return make_engine(url)

    watcher = RoleWatcher(factory, version=3)
    assert watcher.refresh() == UNKNOWN  # no row names version 3
    with engine.begin() as conn:
        conn.execute(
            insert(traffic_config),
            [{"role": "canary", "version": 3, "weight": 10, "updated_at": time.time()}],
        )
    assert watcher.refresh() == "canary"

    watcher._engine = None  # the next refresh needs a new engine, and the database is gone
    available["up"] = False
    assert watcher.refresh() == "canary"
    engine.dispose()
