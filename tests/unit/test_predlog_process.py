"""The writer process's framing and its throttled stats (the process itself: tests/integration)."""

from __future__ import annotations

import dataclasses
import fcntl
import io
import json
import os
import time
from pathlib import Path

from bentos.predlog import WriterStats, row_from_dict
from bentos.predlog_process import PIPE_SIZE, ProcessLogWriter, _StatsOut, read_frame, widen_pipe, write_frame
from tests.conftest import wait_for


def test_frames_round_trip_and_a_cut_frame_reads_as_the_end():
    buf = io.BytesIO()
    write_frame(buf, [{"request_id": "a", "features": [0.5] * 16}])
    write_frame(buf, WriterStats(rows_written=3))
    whole = buf.getvalue()
    stream = io.BytesIO(whole)
    assert read_frame(stream) == [{"request_id": "a", "features": [0.5] * 16}]
    assert read_frame(stream) == WriterStats(rows_written=3)
    assert read_frame(stream) is None
    cut = io.BytesIO(whole[:-1])
    read_frame(cut)
    assert read_frame(cut) is None, "a frame cut short is the end, not an error"


def test_a_frame_of_rows_that_share_objects_reads_back_equal():
    """Frames are pickled without a memo: an object two rows share is written twice, and read back so."""
    features = [0.25, -1.5, float("inf")]
    rows = [(f"r{i}", 0.0, 1, "baseline", "direct", "predict", features, None, 1.0, 200) for i in range(3)]
    buf = io.BytesIO()
    write_frame(buf, rows)
    back = read_frame(io.BytesIO(buf.getvalue()))
    assert back == rows
    assert back[0][6] is not back[1][6]


def test_the_pipe_to_the_child_is_widened_to_hold_a_frame():
    r, w = os.pipe()
    try:
        before = fcntl.fcntl(w, fcntl.F_GETPIPE_SZ)
        widen_pipe(w)
        limit = int(Path("/proc/sys/fs/pipe-max-size").read_text())
        assert fcntl.fcntl(w, fcntl.F_GETPIPE_SZ) == min(limit, PIPE_SIZE) > before
    finally:
        os.close(r)
        os.close(w)


def sent(buf: io.BytesIO) -> list[WriterStats]:
    stream, out = io.BytesIO(buf.getvalue()), []
    while (frame := read_frame(stream)) is not None:
        out.append(frame)
    return out


def test_stats_go_out_at_once_on_a_change_of_state_and_otherwise_at_most_once_a_second(monkeypatch):
    now = [100.0]
    monkeypatch.setattr("bentos.predlog_process.time.monotonic", lambda: now[0])
    buf = io.BytesIO()
    out = _StatsOut(buf)
    base = WriterStats(rows_written=10)
    out.send(base)  # the first report always goes
    out.send(dataclasses.replace(base, rows_written=20))  # only progress, 0 s later: held back
    out.send(dataclasses.replace(base, rows_written=30, db_up=False))  # the database went away: at once
    now[0] += 0.5
    out.send(dataclasses.replace(base, rows_written=40, db_up=False))
    now[0] += 0.6
    out.send(dataclasses.replace(base, rows_written=50, db_up=False))  # a second since the last
    out.send(dataclasses.replace(base, rows_written=60, db_up=False), force=True)  # the final report
    assert [s.rows_written for s in sent(buf)] == [10, 30, 50, 60]


def _row(request_id: str) -> tuple:
    return row_from_dict(
        {
            "request_id": request_id,
            "ts": 0.0,
            "model_version": 1,
            "role": "baseline",
            "route": "direct",
            "endpoint": "predict",
            "features": [0.5] * 16,
            "score": 0.25,
            "latency_ms": 1.0,
            "status": 200,
        }
    )


def test_a_child_that_keeps_dying_is_restarted_ever_less_often_and_its_rows_are_spilled(tmp_path):
    """A child that exits at once (here /bin/false) costs a start per attempt: the attempts back off."""
    w = ProcessLogWriter(
        "sqlite://",
        tmp_path / "spill",
        flush_interval_s=0.02,
        restart_interval_s=0.05,
        child_command=["false"],
    )
    starts = []
    start_child = w._start_child

    def counted():
        starts.append(time.monotonic())
        return start_child()

    w._start_child = counted
    w.start()
    deadline = time.monotonic() + 2.0
    n = 0
    while time.monotonic() < deadline:
        w.log(_row(f"r{n}"))
        n += 1
        time.sleep(0.005)
    w.close()
    # Every 0.05 s for 2 s would be 40 starts; doubling from 0.05 s gives at most 7.
    assert 3 <= len(starts) <= 7, starts
    gaps = [b - a for a, b in zip(starts, starts[1:], strict=False)]
    assert gaps[-1] > 2 * gaps[0], gaps
    assert w.stats().rows_spilled == n, "every row the child never took is in a spill file"


def test_frames_are_kept_as_sent_until_settled_and_only_their_unsettled_rows_are_spilled(tmp_path):
    """The child's reports settle rows oldest first, across frames; a frame can be settled in part."""
    # A child that takes every frame and never reports: nothing settles unless the test says so.
    w = ProcessLogWriter(
        "sqlite://", tmp_path / "spill", flush_interval_s=0.01, child_command=["sh", "-c", "cat >/dev/null"]
    )
    w.start()
    ids = [f"r{i}" for i in range(9)]
    for group in (ids[:3], ids[3:5], ids[5:]):
        for rid in group:
            w.log(_row(rid))
        deadline = time.monotonic() + 5
        while w._rows and time.monotonic() < deadline:
            time.sleep(0.005)
        time.sleep(0.05)  # the sender has written the frame
    assert [f.rows for f in w._unacked] == [3, 2, 4] and w._unacked_rows == 9
    assert all(isinstance(f.data, bytes) for f in w._unacked), "the frame's bytes, not its rows, are kept"
    w._settle(4)  # the first frame and the first row of the second
    assert [(f.rows, f.settled) for f in w._unacked] == [(2, 1), (4, 0)] and w._unacked_rows == 5
    w._settle(4)  # reports are running totals: the same total again settles nothing more
    assert w._unacked_rows == 5
    w.close()
    spilled = [json.loads(line) for p in (tmp_path / "spill").glob("predlog-*.jsonl") for line in p.open()]
    assert sorted(r["request_id"] for r in spilled) == ids[4:]
    assert row_from_dict(spilled[0]) == _row(spilled[0]["request_id"])


def test_the_child_writes_once_a_write_interval_while_rows_reach_it_once_a_flush_interval(tmp_path):
    # The Bento sends often (what a SIGKILL of it can lose); the child, which loses nothing when it
    # dies, writes less often: each write wakes it and a database backend and commits.
    seen = tmp_path / "config.json"
    w = ProcessLogWriter(
        "sqlite://",
        tmp_path / "spill",
        flush_interval_s=0.05,
        write_interval_s=2.5,
        child_command=["sh", "-c", f'printf %s "$RECSYS_PREDLOG_CHILD_CONFIG" > {seen}; cat >/dev/null'],
    ).start()
    try:
        wait_for(lambda: seen.exists() and seen.read_text(), 10, "the child's config", every_s=0.05)
    finally:
        w.close(timeout_s=2)
    assert json.loads(seen.read_text())["writer"]["flush_interval_s"] == 2.5
