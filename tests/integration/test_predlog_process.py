"""The prediction log's writer process, against the real Postgres: rows arrive, and survive its death and ours."""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import psutil
import pytest

from bentos.predlog import PredictionLogWriter
from bentos.predlog_process import PIPE_SIZE, ProcessLogWriter
from tests.conftest import wait_for
from tests.integration.test_predlog_postgres import count_ids, row

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def ids(n: int) -> list[str]:
    prefix = uuid.uuid4().hex[:8]
    return [f"proc-{prefix}-{i}" for i in range(n)]


def test_rows_reach_the_database_through_the_child_and_its_stats_reach_the_caller(
    pg_url, pg_engine, tmp_path
):
    seen = []
    rids = ids(3000)
    with ProcessLogWriter(pg_url, tmp_path / "spill", flush_interval_s=0.05, on_stats=seen.append) as w:
        child = w._child
        assert child is not None and child.pid != os.getpid()
        assert fcntl.fcntl(child.stdin.fileno(), fcntl.F_GETPIPE_SZ) == PIPE_SIZE  # a whole frame fits
        for rid in rids:
            w.log(row(rid))
        wait_for(lambda: w.stats().rows_written == len(rids), 20, "rows written by the child")
    assert count_ids(pg_engine, rids) == (3000, 3000)
    assert child.returncode == 0, "the child ends when the log closes"
    assert seen and seen[-1].rows_written == 3000 and seen[-1].db_up
    assert not list((tmp_path / "spill").glob("predlog-*.jsonl"))


def test_a_killed_child_is_replaced_and_the_rows_after_it_arrive(pg_url, pg_engine, tmp_path):
    first, second = ids(200), ids(200)
    with ProcessLogWriter(pg_url, tmp_path / "spill", flush_interval_s=0.05, restart_interval_s=0.2) as w:
        for rid in first:
            w.log(row(rid))
        wait_for(lambda: w.stats().rows_written == 200, 20, "first rows written")
        old = w._child
        old.send_signal(signal.SIGKILL)
        old.wait()
        for rid in second:
            w.log(row(rid))
        wait_for(lambda: count_ids(pg_engine, second) == (200, 200), 30, "rows after the kill written")
        assert w._child is not old and w._child.poll() is None
        assert w.stats().rows_written >= 400, "the dead child's count is kept"
    assert count_ids(pg_engine, first) == (200, 200)


def test_rows_a_child_dies_holding_are_spilled_by_the_caller_and_arrive_exactly_once(
    pg_url, pg_engine, tmp_path
):
    """Frames in the pipe or the child's memory when it is killed: the caller kept them until settled."""
    settled, held, after = ids(100), ids(300), ids(100)
    with ProcessLogWriter(pg_url, tmp_path / "spill", flush_interval_s=0.05, restart_interval_s=0.2) as w:
        for rid in settled:
            w.log(row(rid))
        wait_for(lambda: w.stats().rows_settled == 100, 20, "the first rows settled")
        old = w._child
        old.send_signal(signal.SIGSTOP)  # it can neither read nor write now
        for rid in held:
            w.log(row(rid))
        wait_for(lambda: not w._rows, 5, "the held rows sent down the pipe")
        assert w._unacked_rows == 300
        old.send_signal(signal.SIGKILL)
        old.wait()
        for rid in after:
            w.log(row(rid))
        wait_for(lambda: count_ids(pg_engine, held + after) == (400, 400), 40, "held and later rows written")
    assert count_ids(pg_engine, settled) == (100, 100)
    assert not list((tmp_path / "spill").glob("predlog-*.jsonl")), "the spilled rows were replayed"


def test_rows_the_child_never_got_are_spilled_by_the_caller_and_replayed(
    pg_url, pg_engine, tmp_path, monkeypatch
):
    def cannot_start(*args, **kwargs):
        raise OSError("no such interpreter")

    rids = ids(50)
    monkeypatch.setattr(subprocess, "Popen", cannot_start)
    w = ProcessLogWriter(pg_url, tmp_path / "spill", flush_interval_s=0.05).start()
    for rid in rids:
        w.log(row(rid))
    w.close()
    monkeypatch.undo()
    assert w.stats().rows_spilled == 50
    (spilled,) = (tmp_path / "spill").glob("predlog-*.jsonl")
    with PredictionLogWriter(pg_url, tmp_path / "spill", flush_interval_s=0.02) as replayer:
        wait_for(lambda: replayer.stats().rows_replayed == 50, 20, "the caller's spill file replayed")
    assert count_ids(pg_engine, rids) == (50, 50)
    assert not spilled.exists()


def test_rows_handed_to_the_child_survive_the_sigkill_of_the_caller(pg_url, pg_engine, tmp_path):
    """The Bento's worker killed outright: the child still writes every row it was sent, then exits."""
    # 200 rows make a frame of about 50 KB, which fits in the pipe's buffer: it is written whole at
    # once even while the child is still importing. (1000 rows, 244 KB, left the sender blocked
    # mid-frame on a loaded machine, and the caller was killed before the frame was handed over.)
    rids = ids(200)
    script = textwrap.dedent(
        f"""
        import os, signal, sys, time
        sys.path.insert(0, {str(ROOT)!r})
        from bentos.predlog_process import ProcessLogWriter
        from tests.integration.test_predlog_postgres import row
        w = ProcessLogWriter({pg_url!r}, {str(tmp_path / "spill")!r}, flush_interval_s=0.05).start()
        for rid in {rids!r}:
            w.log(row(rid))
        while w._rows:
            time.sleep(0.01)
        time.sleep(0.2)  # the last frame is in the pipe
        print(w._child.pid, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == -signal.SIGKILL, out.stderr
    child_pid = int(out.stdout.split()[0])
    wait_for(lambda: not psutil.pid_exists(child_pid), 20, "the orphaned child finishes and exits")
    assert count_ids(pg_engine, rids) == (200, 200)


def test_the_child_ignores_sigterm_and_drains_when_its_input_closes(pg_url, pg_engine, tmp_path):
    """A signal to the Bento's process group must not cut the log short: the end of input does."""
    rids = ids(300)
    w = ProcessLogWriter(pg_url, tmp_path / "spill", flush_interval_s=0.05).start()
    child = w._child
    w.log(row(rids[0]))
    wait_for(lambda: w.stats().rows_written == 1, 20, "the child up and writing")
    child.send_signal(signal.SIGTERM)
    for rid in rids[1:]:
        w.log(row(rid))
    wait_for(lambda: w.stats().rows_written == 300, 20, "rows written after SIGTERM")
    assert child.poll() is None
    w.close()
    assert child.returncode == 0
    assert count_ids(pg_engine, rids) == (300, 300)


@pytest.mark.parametrize(
    ("max_queue", "n"),
    [(50, 400), (10_000, 8000)],  # 8,000 rows overfill the pipe (PIPE_SIZE) of a child that reads none
    ids=["too-many-unsettled-rows", "a-full-pipe-for-half-a-second"],
)
def test_a_hung_child_is_replaced_and_the_rows_it_held_arrive(pg_url, pg_engine, tmp_path, max_queue, n):
    rids = ids(n)
    with ProcessLogWriter(
        pg_url,
        tmp_path / "spill",
        flush_interval_s=0.05,
        max_queue=max_queue,
        restart_interval_s=0.1,
        send_timeout_s=0.5,
    ) as w:
        w.log(row(rids[0]))
        wait_for(lambda: w.stats().rows_settled == 1, 20, "the child up")
        hung = w._child
        hung.send_signal(signal.SIGSTOP)
        for i, rid in enumerate(rids[1:]):
            w.log(row(rid))
            if i % (n // 400) == 0:  # spread over some 400 ms: several frames
                time.sleep(0.001)
        wait_for(lambda: hung.poll() is not None, 20, "the hung child killed")
        # Every row arrives, but for those counted lost: with a 50-row queue, the requests of the moment
        # the sender spends replacing the child go to the overflow, which its own thread spills (a request
        # never spills: no fsync on the serving path); past its 50 rows too they are counted lost.
        wait_for(
            lambda: count_ids(pg_engine, rids) == (n - w.stats().rows_lost,) * 2,
            40,
            "every row written or counted",
        )
    assert w._child is not hung
    assert w.stats().rows_lost < n // 4, w.stats()
