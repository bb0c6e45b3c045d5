"""The label spill: a poisoned line, a full disk and two replayers at once cost nothing but that line."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from sqlalchemy.exc import DataError, OperationalError

from control_plane.label_spill import LabelSpill, SpillFull, dead_letter_lines
from tests.full_disk import FullDisk


class FakeLabels:
    """The database's labels table: refuses ids with a NUL as bad data, everything while `down`."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.rows: dict[str, tuple[int, float]] = {}
        self.writes: Counter[str] = Counter()
        self.down = False
        self.delay_s = delay_s
        self._lock = threading.Lock()

    def write(self, items: list[tuple[str, int]], ts: float) -> None:
        if self.down:
            raise OperationalError("INSERT", {}, ConnectionRefusedError("database is down (test)"))
        if any("\x00" in rid for rid, _ in items):
            raise DataError(
                "INSERT", {}, ValueError("A string literal cannot contain NUL (0x00) characters.")
            )
        time.sleep(self.delay_s)
        with self._lock:
            for rid, label in items:
                self.writes[rid] += 1
                if rid not in self.rows or self.rows[rid][1] <= ts:
                    self.rows[rid] = (label, ts)


@pytest.fixture
def store() -> FakeLabels:
    return FakeLabels()


def spill(store: FakeLabels, spill_dir: Path, **kwargs) -> tuple[LabelSpill, Counter]:
    counts: Counter[str] = Counter()
    kwargs.setdefault("on_rows", lambda outcome, n: counts.update({outcome: n}))
    return LabelSpill(spill_dir, store.write, **kwargs), counts


def dead(spill_dir: Path) -> list[dict]:
    return [
        json.loads(x) for p in spill_dir.glob("rejected-labels-*.jsonl") for x in p.read_text().splitlines()
    ]


def test_a_poisoned_label_is_set_aside_and_every_other_label_of_its_file_is_replayed(store, tmp_path):
    s, counts = spill(store, tmp_path)
    s.keep([("a", 1), ("bad\x00id", 0), ("b", 0)], ts=10.0)
    s.keep([("c", 1)], ts=11.0)
    with open(next(tmp_path.glob("labels-*.jsonl")), "ab") as f:
        f.write(b'{"request_id": "torn", "la')  # a worker killed half-way through a line
    result = s.replay()
    assert {rid: label for rid, (label, _) in store.rows.items()} == {"a": 1, "b": 0, "c": 1}
    assert result.replayed == 3 and result.dead_letter == 2 and result.lost == 0 and result.complete
    assert sorted(json.loads(d["line"])["request_id"] for d in dead(tmp_path) if "refused" in d["error"]) == [
        "bad\x00id"
    ]
    assert any("is not a label" in d["error"] for d in dead(tmp_path))
    assert not s.pending(), "the file is gone once replayed"
    assert counts == Counter(spilled=4, replayed=3, dead_letter=2)
    assert dead_letter_lines(tmp_path) == 2
    assert s.replay().replayed == 0, "nothing left to replay"


def test_replay_stops_when_the_database_goes_away_and_the_next_one_finishes_the_file(store, tmp_path):
    s, counts = spill(store, tmp_path)
    s.keep([("a", 1)], ts=1.0)
    s.keep([("bad\x00", 1)], ts=2.0)
    store.down = True
    assert s.replay().complete is False
    assert len(s.pending()) == 1 and s.pending()[0].name.startswith("claimed-labels-"), "the claim is kept"
    assert dead(tmp_path) == []
    store.down = False
    result = s.replay()
    assert result.replayed == 1 and result.dead_letter == 1 and not s.pending()
    assert len(dead(tmp_path)) == 1, "set aside once, not once per attempt"


def test_an_older_spilled_label_never_replaces_a_newer_one(store, tmp_path):
    s, _ = spill(store, tmp_path)
    s.keep([("r", 0)], ts=5.0)
    store.write([("r", 1)], 9.0)  # the client's later label, stored directly
    s.replay()
    assert store.rows["r"] == (1, 9.0)


def test_with_the_disk_full_keep_refuses_and_counts_and_leaves_no_partial_line(store, tmp_path):
    disk = FullDisk()
    s, counts = spill(store, tmp_path, open_file=disk)
    s.keep([("a", 1)], ts=1.0)
    disk.full, disk.partial = True, 10
    with pytest.raises(SpillFull, match="not writable"):
        s.keep([("b", 1), ("c", 0)], ts=2.0)
    assert counts["refused"] == 2
    disk.full = False
    s.keep([("d", 1)], ts=3.0)
    s.replay()
    assert sorted(store.rows) == ["a", "d"] and dead(tmp_path) == []


def test_a_bad_line_the_full_disk_cannot_set_aside_is_counted_lost_and_the_file_still_replays(
    store, tmp_path
):
    disk = FullDisk()
    s, counts = spill(store, tmp_path, open_file=disk)
    s.keep([("a", 1), ("bad\x00", 0)], ts=1.0)
    disk.full = True
    result = s.replay()
    assert result.replayed == 1 and result.lost == 1 and not s.pending()
    assert counts["lost"] == 1 and sorted(store.rows) == ["a"]


def test_two_replayers_at_once_write_each_label_once_and_remove_each_file_once(tmp_path):
    store = FakeLabels(delay_s=0.01)
    writers = [LabelSpill(tmp_path, store.write) for _ in range(4)]
    for i in range(40):
        writers[i % 4].keep([(f"r{i}", i % 2)], ts=float(i))
    # Four "workers" replay the same directory at the same moment (their files share one pid here).
    replayers = [LabelSpill(tmp_path, store.write) for _ in range(4)]
    results = []
    threads = [threading.Thread(target=lambda r=r: results.append(r.replay())) for r in replayers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    leftover = sum(r.replay().replayed for r in replayers)  # a file skipped while locked is done now
    assert sum(r.replayed for r in results) + leftover == 40
    assert set(store.writes.values()) == {1}, "no label written twice"
    assert not list(tmp_path.glob("*labels-*.jsonl"))


def test_labels_kept_while_a_replay_claims_the_file_go_to_a_new_file_and_are_not_lost(tmp_path):
    store = FakeLabels(delay_s=0.002)
    s = LabelSpill(tmp_path, store.write)
    for i in range(50):
        s.keep([(f"early{i}", 1)], ts=float(i))
    done = threading.Event()

    def keep_more():
        for i in range(200):
            s.keep([(f"late{i}", 0)], ts=100.0 + i)
        done.set()

    t = threading.Thread(target=keep_more)
    t.start()
    while not done.is_set():
        s.replay()
    t.join()
    s.replay()
    assert len(store.rows) == 250 and set(store.writes.values()) == {1}


def test_replay_soon_runs_off_the_caller_at_most_once_an_interval_and_never_raises(store, tmp_path):
    s, _ = spill(store, tmp_path, replay_interval_s=60)
    s.keep([("a", 1)], ts=1.0)
    store.down = True
    s.replay_soon()  # fails on its thread; the caller sees nothing
    deadline = time.monotonic() + 5
    while s._replaying.locked() and time.monotonic() < deadline:
        time.sleep(0.01)
    store.down = False
    s.replay_soon()  # not due yet: nothing happens
    time.sleep(0.1)
    assert store.rows == {}
    s.keep([("b", 0)], ts=2.0)  # a new spill makes a replay due at once
    s.replay_soon()
    deadline = time.monotonic() + 5
    while len(store.rows) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sorted(store.rows) == ["a", "b"]
