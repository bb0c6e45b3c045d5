"""The prediction log writer batches rows into the database and never drops one."""

from __future__ import annotations

import json
import math
import threading
import time
import uuid
from pathlib import Path

import pytest
from sqlalchemy import event, func, select
from sqlalchemy.exc import OperationalError

from bentos.predlog import (
    NullLogWriter,
    PredictionLogWriter,
    PredictionRow,
    _floats_text,
    row_dict,
    row_from_dict,
)
from control_plane.db.engine import make_engine
from control_plane.db.schema import metadata, predictions


class BreakableDatabase:
    """A real SQLite file whose every statement fails while `down` is set."""

    def __init__(self, path: Path) -> None:
        self.url = f"sqlite:///{path}"
        self.down = False
        self.commits = 0
        setup = make_engine(self.url)
        metadata.create_all(setup)
        setup.dispose()

    def engine(self):
        engine = make_engine(self.url)

        @event.listens_for(engine, "before_cursor_execute")
        def _maybe_fail(*_args, **_kwargs):
            if self.down:
                raise OperationalError("INSERT", {}, ConnectionRefusedError("database is down (test)"))

        @event.listens_for(engine, "commit")
        def _count(_conn):
            self.commits += 1

        return engine

    def request_ids(self) -> list[str]:
        engine = make_engine(self.url)
        with engine.connect() as conn:
            ids = [r[0] for r in conn.execute(select(predictions.c.request_id))]
        engine.dispose()
        return ids

    def count(self) -> int:
        engine = make_engine(self.url)
        with engine.connect() as conn:
            n = conn.execute(select(func.count()).select_from(predictions)).scalar_one()
        engine.dispose()
        return n


def row(i: int | str, **overrides) -> PredictionRow:
    r = {
        "request_id": f"req-{i}",
        "ts": 1_700_000_000.0 + (i if isinstance(i, int) else 0),
        "model_version": 2,
        "role": "canary",
        "route": "weighted",
        "endpoint": "predict",
        "features": [0.5] * 16,
        "score": 0.25,
        "latency_ms": 1.5,
        "status": 200,
    }
    r.update(overrides)
    return row_from_dict(r)


def wait_until(predicate, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.02)


def spill_lines(spill_dir: Path) -> list[dict]:
    return [
        json.loads(line)
        for p in sorted(spill_dir.glob("predlog-*.jsonl"))
        for line in p.read_text().splitlines()
    ]


def writer(db: BreakableDatabase, spill_dir: Path, **kwargs) -> PredictionLogWriter:
    kwargs.setdefault("flush_interval_s", 0.02)
    kwargs.setdefault("retry_interval_s", 0.1)
    return PredictionLogWriter(db.engine, spill_dir, **kwargs)


def test_writes_rows_in_batches(db, spill_dir):
    w = writer(db, spill_dir, batch_size=500)
    for i in range(1200):
        w.log(row(i))
    w.start()
    wait_until(lambda: w.stats().rows_written == 1200)
    w.close()
    assert sorted(db.request_ids()) == sorted(f"req-{i}" for i in range(1200))
    assert db.commits == 3  # 500 + 500 + 200
    assert not spill_lines(spill_dir)


def test_rows_keep_every_column(db, spill_dir):
    with writer(db, spill_dir) as w:
        w.log(row(1, features=None, score=None, status=500, endpoint="recommend", route="direct"))
    engine = make_engine(db.url)
    with engine.connect() as conn:
        got = conn.execute(select(predictions)).mappings().one()
    engine.dispose()
    assert row_from_dict(got) == row(
        1, features=None, score=None, status=500, endpoint="recommend", route="direct"
    )


@pytest.mark.parametrize("how", ["log", "log_many"])
def test_half_a_queue_waiting_wakes_the_writer_before_its_interval(db, spill_dir, how):
    # A long flush interval must not let the queue fill up and spill under a steady stream of rows.
    with writer(db, spill_dir, flush_interval_s=60, batch_size=10, max_queue=100) as w:
        time.sleep(0.1)  # the writer thread is in its 60 s wait
        rows = [row(i) for i in range(50)]
        if how == "log":
            for r in rows:
                w.log(r)
        else:
            w.log_many(rows)
        wait_until(lambda: db.count() == 50, timeout_s=5)
        assert w.stats().rows_spilled == 0
        w.log_many([row(i) for i in range(50, 60)])  # fewer than half: they wait for the interval
        time.sleep(0.3)
        assert db.count() == 50
    assert db.count() == 60  # close() writes them at once


class ThreadRecordingOpener:
    """`open`, remembering which threads opened files for writing."""

    def __init__(self) -> None:
        self.writers: set[str] = set()

    def __call__(self, path, mode="r", buffering=-1, **kwargs):
        if "a" in mode or "w" in mode:
            self.writers.add(threading.current_thread().name)
        return open(path, mode, buffering=buffering, **kwargs)  # noqa: SIM115 - the caller closes it


def test_a_full_queue_spills_on_a_thread_of_its_own_instead_of_dropping(db, spill_dir):
    opener = ThreadRecordingOpener()
    w = writer(db, spill_dir, max_queue=5, open_file=opener)  # not started: nothing drains the queue
    for i in range(8):
        w.log(row(i))  # returns at once: the three that do not fit wait for the overflow's thread
    wait_until(lambda: len(spill_lines(spill_dir)) == 3)
    assert [r["request_id"] for r in spill_lines(spill_dir)] == ["req-5", "req-6", "req-7"]
    assert opener.writers == {"predlog-overflow"}, "the caller's thread never touches the disk"
    wait_until(lambda: w.stats().rows_spilled == 3 and w.stats().rows_settled == 3)
    assert w.stats().queue_depth == 5 and w.stats().rows_lost == 0
    w.start()
    wait_until(lambda: db.count() == 8)
    w.close()
    assert sorted(db.request_ids()) == sorted(f"req-{i}" for i in range(8))
    assert not list(spill_dir.glob("predlog-*.jsonl"))


def test_past_the_queue_and_its_overflow_rows_are_counted_lost_and_settled(db, spill_dir):
    w = writer(db, spill_dir, max_queue=5)  # not started
    w._overflow._start = lambda: None  # no spill thread: the overflow fills
    for i in range(13):
        w.log(row(i))
    s = w.stats()
    assert s.queue_depth == 10 and s.rows_lost == 3 and s.rows_settled == 3 and s.rows_spilled == 0
    w.close()  # spills the overflow's five, writes the queue's five (or spills them)
    s = w.stats()
    assert s.rows_lost == 3 and s.rows_settled == 13
    assert len(spill_lines(spill_dir)) + db.count() >= 10


def test_a_frame_logged_at_once_fills_the_queue_and_spills_only_what_does_not_fit(db, spill_dir):
    w = writer(db, spill_dir, max_queue=5)  # not started: nothing drains the queue
    w.log_many([row(i) for i in range(3)])
    w.log_many([row(i) for i in range(3, 8)])
    assert [r["request_id"] for r in spill_lines(spill_dir)] == ["req-5", "req-6", "req-7"]
    assert w.stats().rows_spilled == 3 and w.stats().queue_depth == 5
    w.log_many([row(8)])  # full: all of it spills
    assert w.stats().rows_spilled == 4 and w.stats().rows_settled == 4
    w.start()
    wait_until(lambda: db.count() == 9)
    w.close()
    w.log_many([row(9), row(10)])  # after close: spilled, not dropped
    assert w.stats().rows_spilled == 6
    assert sorted(db.request_ids()) == sorted(f"req-{i}" for i in range(9))


def test_a_whole_batch_waiting_is_written_without_waiting_for_the_flush_interval(db, spill_dir):
    w = writer(db, spill_dir, batch_size=10, flush_interval_s=30)
    w.log_many([row(i) for i in range(25)])
    w.start()
    try:
        wait_until(lambda: db.count() == 20, timeout_s=10)  # two whole batches; the last five wait
        time.sleep(0.2)
        assert db.count() == 20 and w.stats().queue_depth == 5
    finally:
        w.close()  # ends the wait and writes the rest
    assert db.count() == 25


def test_floats_are_written_as_text_that_reads_back_exactly():
    values = [0.1, 1795763670.669882, 2.0, -0.0, 1e22, 1e16, 1e-7, 5e-324, 1.7976931348623157e308]
    values += [float("inf"), float("-inf"), float("nan")]
    text = _floats_text(values)
    assert len(text) == len(values)
    for value, written in zip(values, text, strict=True):
        back = float(written)
        assert (math.isnan(value) and math.isnan(back)) or (back == value and repr(back) == repr(value))
    assert _floats_text([]) == []


def test_database_down_spills_batches_and_replays_them_when_it_is_back(db, spill_dir):
    db.down = True
    w = writer(db, spill_dir).start()
    for i in range(50):
        w.log(row(i))
    wait_until(lambda: w.stats().rows_spilled == 50)
    stats = w.stats()
    assert stats.write_failures >= 1 and not stats.db_up and stats.spill_rows == 50 and stats.spill_bytes > 0
    assert len(spill_lines(spill_dir)) == 50

    db.down = False
    wait_until(lambda: w.stats().rows_replayed == 50)
    for i in range(50, 60):
        w.log(row(i))
    wait_until(lambda: db.count() == 60)
    w.close()
    stats = w.stats()
    assert sorted(db.request_ids()) == sorted(f"req-{i}" for i in range(60))
    assert stats.db_up and stats.spill_rows == 0 and stats.spill_bytes == 0
    assert not list(spill_dir.glob("predlog-*.jsonl"))


def test_replay_never_duplicates_rows_already_written(db, spill_dir):
    with writer(db, spill_dir) as w:
        for i in range(10):
            w.log(row(i))
    # A process that inserted rows 5..9 and died before deleting the spill file holding 0..14.
    spill_dir.mkdir(parents=True, exist_ok=True)
    lines = "".join(json.dumps(row_dict(row(i))) + "\n" for i in range(15))
    (spill_dir / "predlog-deadhost-1-1-0001.jsonl").write_text(lines)
    with writer(db, spill_dir) as w2:
        wait_until(lambda: w2.stats().rows_replayed == 15)
    assert sorted(db.request_ids()) == sorted(f"req-{i}" for i in range(15))


def test_the_next_process_replays_a_dead_one_s_spill_file_and_skips_a_torn_last_line(db, spill_dir):
    spill_dir.mkdir(parents=True)
    torn = json.dumps(row_dict(row(3)))[:40]  # killed in the middle of a write
    (spill_dir / "predlog-deadhost-99-1-0001.jsonl").write_text(
        json.dumps(row_dict(row(1))) + "\n" + json.dumps(row_dict(row(2))) + "\n" + torn
    )
    w = writer(db, spill_dir).start()
    wait_until(lambda: w.stats().rows_replayed == 2)
    w.close()
    assert sorted(db.request_ids()) == ["req-1", "req-2"]
    assert w.stats().rows_corrupt == 1
    assert not list(spill_dir.glob("predlog-*.jsonl"))


def test_a_live_writer_s_spill_file_is_left_alone_until_it_lets_go(db, spill_dir):
    db_a = BreakableDatabase(spill_dir.parent / "a.db")
    db_a.down = True
    a = writer(db_a, spill_dir).start()
    for i in range(5):
        a.log(row(i))
    wait_until(lambda: a.stats().rows_spilled == 5)

    b = writer(db, spill_dir, scan_interval_s=0.05).start()
    time.sleep(0.3)
    assert db.count() == 0  # a's open (locked) file is not b's to replay
    a.close()  # releases the lock; a's database is still down, so the file stays
    wait_until(lambda: db.count() == 5)
    b.close()
    assert sorted(db.request_ids()) == [f"req-{i}" for i in range(5)]


def test_close_drains_the_queue(db, spill_dir):
    w = writer(db, spill_dir, flush_interval_s=5.0, batch_size=100).start()
    for i in range(1000):
        w.log(row(i))
    w.close()
    assert db.count() == 1000
    assert w.stats().queue_depth == 0


def test_close_with_the_database_down_spills_everything_and_the_next_writer_replays_it(db, spill_dir):
    db.down = True
    w = writer(db, spill_dir, retry_interval_s=60.0).start()
    for i in range(300):
        w.log(row(i))
    w.close()
    assert sorted(r["request_id"] for r in spill_lines(spill_dir)) == sorted(f"req-{i}" for i in range(300))

    db.down = False
    with writer(db, spill_dir) as w2:
        wait_until(lambda: w2.stats().rows_replayed == 300)
    assert db.count() == 300


def test_rows_logged_after_close_are_spilled_not_dropped(db, spill_dir):
    w = writer(db, spill_dir).start()
    w.close()
    w.log(row("late"))
    assert [r["request_id"] for r in spill_lines(spill_dir)] == ["req-late"]


def test_close_is_idempotent_and_works_when_never_started(db, spill_dir):
    w = writer(db, spill_dir)
    w.log(row(1))
    w.close()
    w.close()
    assert [r["request_id"] for r in spill_lines(spill_dir)] == ["req-1"]


def test_the_engine_is_created_on_the_writer_thread_not_in_the_constructor(spill_dir):
    created = []

    def factory():
        import threading

        created.append(threading.current_thread().name)
        raise OperationalError("connect", {}, ConnectionRefusedError("no database"))

    w = PredictionLogWriter(factory, spill_dir, flush_interval_s=0.02)
    assert created == []
    w.start()
    w.log(row(1))
    wait_until(lambda: w.stats().rows_spilled == 1)
    w.close()
    assert created and set(created) == {"predlog-writer"}


def test_stats_callback_sees_the_counters(db, spill_dir):
    seen = []
    with writer(db, spill_dir, on_stats=seen.append) as w:
        w.log(row(1))
        wait_until(lambda: any(s.rows_written == 1 for s in seen))


def test_the_null_writer_accepts_and_keeps_nothing():
    w = NullLogWriter().start()
    w.log(row(uuid.uuid4().hex))
    w.close()
    assert w.stats().rows_written == 0


def test_a_row_the_database_refuses_is_set_aside_and_does_not_hold_the_others_back(db, spill_dir):
    with writer(db, spill_dir) as w:
        w.log(row(1))
        w.log(row(2, status=None))  # NOT NULL: refused for good, retrying cannot help
        w.log(row(3))
        wait_until(lambda: w.stats().rows_written == 2)
    assert sorted(db.request_ids()) == ["req-1", "req-3"]
    stats = w.stats()
    assert stats.rows_rejected == 1 and stats.db_up and stats.rows_spilled == 0
    (rejected,) = spill_dir.glob("rejected-*.jsonl")
    assert json.loads(rejected.read_text())["row"]["request_id"] == "req-2"


def test_a_missing_table_is_not_bad_data_the_rows_wait_in_the_spill_file(tmp_path, spill_dir):
    url = f"sqlite:///{tmp_path / 'not-migrated.db'}"
    w = PredictionLogWriter(lambda: make_engine(url), spill_dir, flush_interval_s=0.02).start()
    w.log(row(1))
    wait_until(lambda: w.stats().rows_spilled == 1)
    w.close()
    assert w.stats().rows_rejected == 0 and [r["request_id"] for r in spill_lines(spill_dir)] == ["req-1"]


def test_a_served_list_goes_to_copy_text_as_escaped_json_and_a_row_without_it_reads_back():
    from bentos.predlog import copy_text

    served = ["a", "tab\there", "new\nline", 'quo"te']
    line = copy_text([row(1, endpoint="recommend", served=served)])
    *_, user, last, pair = line.rstrip("\n").split("\t")
    assert user == "\\N" and pair == "\\N"  # no user named, no shadow phase
    assert last == json.dumps(served, separators=(",", ":")).replace("\\", "\\\\")
    assert copy_text([row(2)]).rstrip("\n").endswith("\t\\N\t\\N")  # /predict: no served list
    old = {k: v for k, v in row_dict(row(3)).items() if k not in ("user_key", "served", "pair_key")}
    assert row_from_dict(old) == row(3)  # a spill line written before these columns


def test_a_pair_key_is_the_last_column_of_copy_text():
    from bentos.predlog import copy_text

    assert copy_text([row(1, pair_key="0f" * 16)]).rstrip("\n").split("\t")[-1] == "0f" * 16
