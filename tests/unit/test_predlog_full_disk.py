"""The prediction log on a full or failing spill disk, and with poisoned spill files: it keeps going,
holds what it can, counts what it loses, and recovers by itself."""

from __future__ import annotations

import errno
import json
import sys
import threading
import time
from pathlib import Path

import pytest

from bentos import predlog_process
from bentos.predlog import PredictionLogWriter, row_dict
from bentos.predlog_process import ProcessLogWriter
from tests.full_disk import FullDisk
from tests.unit.test_predlog import BreakableDatabase, row, spill_lines, wait_until, writer


def bento_side(
    tmp_path: Path, child_command: list[str], restart_interval_s: float, **kwargs
) -> ProcessLogWriter:
    """The Bento's side of the log, started, with a child that does what `child_command` does."""
    return ProcessLogWriter(
        "sqlite://",
        tmp_path / "spill",
        flush_interval_s=0.02,
        restart_interval_s=restart_interval_s,
        child_command=child_command,
        **kwargs,
    ).start()


def dead_letters(spill_dir: Path) -> list[dict]:
    return [
        json.loads(line)
        for p in sorted(spill_dir.glob("rejected-*.jsonl"))
        for line in p.read_text().splitlines()
    ]


def test_with_the_database_down_and_the_disk_full_rows_wait_in_memory_and_reach_the_database_later(
    db, spill_dir
):
    disk = FullDisk()
    w = writer(db, spill_dir, open_file=disk, batch_size=10).start()
    try:
        db.down = True
        disk.full = True
        for i in range(30):
            w.log(row(i))
        wait_until(lambda: disk.refused > 0 and w.stats().write_failures > 0)
        time.sleep(0.3)  # several rounds of retries
        assert w._thread.is_alive(), "the writer thread survives ENOSPC"
        s = w.stats()
        assert s.rows_lost == 0 and s.rows_spilled == 0 and not s.disk_ok and not s.db_up
        # the rows are held, not dropped (a batch being retried is out of the queue for a moment)
        wait_until(lambda: w.stats().queue_depth == 30)
        db.down = False  # the database comes back first: everything goes there
        wait_until(lambda: db.count() == 30)
    finally:
        w.close()
    assert w.stats().rows_lost == 0 and w.stats().rows_settled == 30


def test_the_disk_coming_back_first_takes_the_held_rows_and_the_database_gets_them_on_replay(db, spill_dir):
    disk = FullDisk()
    w = writer(db, spill_dir, open_file=disk, batch_size=10, scan_interval_s=0.2).start()
    try:
        db.down = True
        disk.full = True
        disk.partial = 25  # the first refused write leaves part of a line behind
        for i in range(20):
            w.log(row(i))
        wait_until(lambda: disk.refused > 0)
        assert spill_lines(spill_dir) == [], "a write cut short by ENOSPC leaves no partial line"
        disk.full = False
        wait_until(lambda: w.stats().rows_spilled == 20)
        assert sorted(r["request_id"] for r in spill_lines(spill_dir)) == sorted(
            f"req-{i}" for i in range(20)
        )
        assert w.stats().disk_ok
        db.down = False
        wait_until(lambda: db.count() == 20 and not list(spill_dir.glob("predlog-*.jsonl")))
    finally:
        w.close()
    s = w.stats()
    assert s.rows_lost == 0 and s.rows_replayed == 20


def test_past_its_queue_rows_that_fit_nowhere_are_counted_lost_exactly(db, spill_dir):
    disk = FullDisk()
    w = writer(db, spill_dir, open_file=disk, batch_size=10, max_queue=40).start()
    db.down = True
    disk.full = True
    for i in range(100):
        w.log_many([row(i)])
    wait_until(lambda: w.stats().rows_lost > 0)
    assert w.stats().queue_depth >= 40  # held in memory, in-flight batch included
    db.down = False
    wait_until(lambda: db.count() + w.stats().rows_lost == 100)
    w.close()
    assert db.count() >= 40
    s = w.stats()
    assert s.rows_lost == 100 - db.count(), (s, db.count())
    assert s.rows_settled == 100


def test_closing_with_nowhere_to_put_the_rows_counts_them_lost(db, spill_dir):
    disk = FullDisk()
    w = writer(db, spill_dir, open_file=disk, retry_interval_s=30).start()
    db.down = True
    disk.full = True
    w.log_many([row(i) for i in range(7)])
    w.close(timeout_s=5)
    assert not w._thread.is_alive()
    assert w.stats().rows_lost == 7 and db.count() == 0


def test_an_unexpected_error_in_a_step_does_not_end_the_writer(db, spill_dir, monkeypatch):
    w = writer(db, spill_dir)
    calls = {"n": 0}
    replay_all = w._replay_all

    def failing_once():
        calls["n"] += 1
        if calls["n"] == 1:
            raise OSError(5, "Input/output error (test)")
        replay_all()

    monkeypatch.setattr(w, "_replay_all", failing_once)
    w.start()
    try:
        wait_until(lambda: calls["n"] >= 1)
        w.log(row(1))
        wait_until(lambda: db.count() == 1)
        assert w._thread.is_alive()
    finally:
        w.close()


def test_a_poisoned_spill_file_is_replayed_around_its_bad_lines_which_go_to_the_dead_letter_file(
    db, spill_dir
):
    spill_dir.mkdir()
    good = [json.dumps(row_dict(row(i))) for i in range(3)]
    refused = json.dumps(row_dict(row("bad", status=None)))  # the database cannot take it
    (spill_dir / "predlog-dead-1-0001.jsonl").write_text(
        "\n".join([good[0], "{torn", good[1], refused, "[1, 2]", good[2]]) + "\n"
    )
    w = writer(db, spill_dir).start()
    try:
        wait_until(lambda: not list(spill_dir.glob("predlog-*.jsonl")))
    finally:
        w.close()
    assert sorted(db.request_ids()) == ["req-0", "req-1", "req-2"]
    aside = dead_letters(spill_dir)
    assert len(aside) == 3
    assert {a.get("line", "").strip() for a in aside if "line" in a} == {"{torn", "[1, 2]"}
    assert [a["row"]["request_id"] for a in aside if "row" in a] == ["req-bad"]
    s = w.stats()
    assert s.rows_corrupt == 2 and s.rows_rejected == 1 and s.rows_lost == 0


def test_bad_lines_that_cannot_even_be_set_aside_are_counted_lost_and_the_rest_still_replays(db, spill_dir):
    spill_dir.mkdir()
    good = json.dumps(row_dict(row(1)))
    (spill_dir / "predlog-dead-1-0001.jsonl").write_text(f"{good}\n{{torn\n")
    disk = FullDisk()
    disk.full = True
    w = writer(db, spill_dir, open_file=disk).start()
    try:
        wait_until(lambda: not list(spill_dir.glob("predlog-*.jsonl")))
    finally:
        w.close()
    assert db.request_ids() == ["req-1"]
    assert w.stats().rows_lost == 1 and w.stats().rows_corrupt == 0


@pytest.mark.parametrize("full", [False, True], ids=["disk-with-room", "disk-full"])
def test_the_bento_side_never_raises_nor_touches_the_disk_on_the_request_when_its_queue_is_full(
    tmp_path, full
):
    """Past its queue a row goes to the overflow, which its own thread spills for the writer process to
    replay; with the disk full it is counted lost there. The request's thread never opens a file."""
    disk = FullDisk()
    disk.full = full
    opened_by: set[str] = set()

    def opener(path, mode="r", buffering=-1, **kwargs):
        opened_by.add(threading.current_thread().name)
        return disk(path, mode, buffering, **kwargs)

    w = ProcessLogWriter("sqlite://", tmp_path / "spill", max_queue=5, open_file=opener)  # not started
    for i in range(8):
        w.log(row(i))
    assert threading.current_thread().name not in opened_by
    if full:
        wait_until(lambda: w.stats().rows_lost == 3)
        assert w.stats().rows_spilled == 0 and spill_lines(tmp_path / "spill") == []
    else:
        wait_until(lambda: w.stats().rows_spilled == 3)
        assert [r["request_id"] for r in spill_lines(tmp_path / "spill")] == ["req-5", "req-6", "req-7"]
        assert w.stats().rows_lost == 0
    assert w.stats().queue_depth == 5
    assert opened_by == {"predlog-overflow"}
    w._overflow.close()


def test_the_sender_survives_a_full_disk_counts_what_it_loses_and_spills_again_once_space_returns(tmp_path):
    """No child can start (the command exits at once), so every row goes to the Bento's spill file."""
    disk = FullDisk()
    disk.full = True
    w = bento_side(tmp_path, [sys.executable, "-c", "pass"], 0.05, open_file=disk)
    try:
        for i in range(20):
            w.log(row(i))
        wait_until(lambda: w.stats().rows_lost == 20)
        assert w._sender.is_alive(), "the sender thread survives ENOSPC"
        assert not w.stats().disk_ok
        disk.full = False
        time.sleep(0.1)  # past the disk's retry interval (restart_interval_s)
        for i in range(20, 30):
            w.log(row(i))
        wait_until(lambda: w.stats().rows_spilled == 10)
    finally:
        w.close()
    s = w.stats()
    assert s.rows_lost == 20 and s.rows_spilled == 10
    assert sorted(r["request_id"] for r in spill_lines(tmp_path / "spill")) == sorted(
        f"req-{i}" for i in range(20, 30)
    )


def test_rows_sent_to_a_child_that_dies_are_counted_lost_when_the_disk_cannot_take_them(tmp_path):
    """The child reads a frame and dies without settling it; with the disk full the give-up counts it."""
    disk = FullDisk()
    disk.full = True
    w = bento_side(
        tmp_path, [sys.executable, "-c", "import sys; sys.stdin.buffer.read(8)"], 60, open_file=disk
    )
    try:
        w.log(row(1))
        time.sleep(0.5)  # the child takes the frame and exits
        w.log(row(2))
        wait_until(lambda: w.stats().rows_lost == 2)
    finally:
        w.close()
    assert w.stats().rows_lost == 2 and w.stats().rows_spilled == 0


def test_a_write_cut_short_by_a_full_disk_leaves_only_whole_lines_for_the_next_process(tmp_path):
    """A writer made after a full-disk episode replays only whole lines: the spill file is clean."""
    db = BreakableDatabase(tmp_path / "recsys.db")
    spill_dir = tmp_path / "spill"
    disk = FullDisk()
    w = PredictionLogWriter(
        db.engine, spill_dir, open_file=disk, flush_interval_s=0.02, retry_interval_s=0.05
    )
    db.down = True
    w.start()
    w.log_many([row(i) for i in range(5)])
    wait_until(lambda: w.stats().rows_spilled == 5)
    disk.full, disk.partial = True, 40
    w.log_many([row(i) for i in range(5, 9)])
    wait_until(lambda: disk.refused > 0)
    disk.full = False
    wait_until(lambda: w.stats().rows_spilled == 9)
    w.close()
    assert [r["request_id"] for r in spill_lines(spill_dir)] == [f"req-{i}" for i in range(9)]
    db.down = False
    again = PredictionLogWriter(db.engine, spill_dir, flush_interval_s=0.02).start()
    wait_until(lambda: db.count() == 9)
    again.close()
    assert again.stats().rows_corrupt == 0


def test_rows_the_bento_spilled_stop_counting_as_a_backlog_once_a_writer_replays_them(db, tmp_path):
    """The Bento's side never replays: it must still notice that the writer process did."""
    w = bento_side(tmp_path, [sys.executable, "-c", "pass"], 60)  # exits at once: the rows are spilled here
    try:
        for i in range(5):
            w.log(row(i))
        wait_until(lambda: w.stats().rows_spilled == 5)
        assert w.stats().spill_rows == 5 and w.stats().spill_bytes > 0
        replayer = PredictionLogWriter(db.engine, tmp_path / "spill", flush_interval_s=0.02).start()
        wait_until(lambda: db.count() == 5)
        replayer.close()
        s = w.stats()
        assert s.spill_rows == 0 and s.spill_bytes == 0, s
    finally:
        w.close()


def test_a_writer_process_that_keeps_dying_reports_no_writer_alive(tmp_path, monkeypatch):
    monkeypatch.setattr(predlog_process, "MAX_RESTART_INTERVAL_S", 0.3)
    w = bento_side(tmp_path, ["false"], 0.01)
    try:
        assert w.stats().writer_alive
        deadline = time.monotonic() + 20
        while w.stats().writer_alive and time.monotonic() < deadline:
            w.log(row(1))  # each row makes the sender find the child dead and start another
            time.sleep(0.01)
        assert not w.stats().writer_alive, "the restart interval reached its longest"
    finally:
        w.close()


def test_a_disk_that_fails_with_eio_is_handled_like_a_full_one(db, spill_dir):
    disk = FullDisk(errno.EIO)
    w = writer(db, spill_dir, open_file=disk, batch_size=10).start()
    try:
        db.down = True
        disk.full = True
        w.log_many([row(i) for i in range(12)])
        wait_until(lambda: disk.refused > 0 and not w.stats().disk_ok)
        disk.full = False
        wait_until(lambda: w.stats().rows_spilled == 12)
        db.down = False
        wait_until(lambda: db.count() == 12)
    finally:
        w.close()
    assert w.stats().rows_lost == 0
