"""TrafficStore on the real Postgres: upserts in one transaction, seeding once, concurrent seeders."""

from __future__ import annotations

import threading

import pytest

from control_plane.rollout.assignment import Assignment, Slot
from control_plane.traffic import InvalidWeights, TrafficStore

pytestmark = pytest.mark.integration

SPLIT = {"baseline": 85, "canary": 10, "control": 5}
VERSIONS = {"baseline": 1, "canary": 2, "control": 0}


def test_save_upserts_every_role_and_load_reads_them_back(pg_engine):
    store = TrafficStore(pg_engine)
    assert store.load().empty
    store.save(Assignment(Slot(1, 90), Slot(2, 10)))
    store.save(Assignment(baseline=Slot(2, 95), control=Slot(0, 5)))
    assert store.load() == Assignment(Slot(2, 95), Slot(None, 0), Slot(0, 5))


def test_a_refused_save_changes_nothing(pg_engine):
    store = TrafficStore(pg_engine)
    store.save(Assignment(Slot(1, 100)))
    with pytest.raises(InvalidWeights, match="no version"):
        store.save(Assignment(Slot(1, 90), Slot(None, 10)))
    assert store.load().baseline == Slot(1, 100)


def test_concurrent_seeders_seed_exactly_once(pg_engine):
    results = []

    def seed(weights):
        results.append(TrafficStore(pg_engine).seed_if_empty(weights, VERSIONS))

    threads = [threading.Thread(target=seed, args=(SPLIT if i % 2 else {"baseline": 100},)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    loaded = TrafficStore(pg_engine).load()
    assert loaded in (
        Assignment(**{role: Slot(VERSIONS[role], w) for role, w in SPLIT.items()}),
        Assignment(Slot(1, 100), Slot(2, 0), Slot(0, 0)),
    )
    assert results.count(True) == 1
