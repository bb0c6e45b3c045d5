"""The prediction log's writer in a process of its own, fed by the Bento through a pipe.

In the Bento's process a request only appends its row to a deque. Every flush interval a sender
thread pickles what has gathered (0.3 us a row) and writes it to the child's stdin as one frame.
The child (`python -m bentos.predlog_process`) runs the `PredictionLogWriter` that formats the
rows, COPYs them into the database and spills them when it cannot, and writes that writer's stats
back on its stdout for the Bento's /metrics.

Why a process: in the Bento's own process the writer thread formatted each batch and drove
psycopg2 while holding the GIL, and the request loop waited for it. Measured on one Bento at eight
connections: the log on cost 13-15 % of requests/s and doubled the p99 (docs/performance.md).

What is lost: rows still in the Bento's memory (at most a flush interval's) when it is killed with
SIGKILL, the frame it was writing included: the child drops a frame cut short. The Bento keeps
every frame it sent until the child reports its rows settled (in the database, a spill file or the
rejected file); when a child dies, the Bento spills the rows it had not settled, and
the next child replays it (a row written twice is deduplicated by ON CONFLICT DO NOTHING). A child
that keeps dying is restarted ever less often, and meanwhile the Bento spills. Rows the Bento can
neither hand on nor spill (the spill disk full or failing) are counted in `rows_lost`, never dropped
silently; a request never waits for the disk and never fails because of the log: `log()` only appends
to a bounded deque, and past `max_queue` rows to a bounded overflow that a thread of its own spills
for the child to replay (bentos/predlog_overflow.py); past that too, the row is counted lost. The child ignores
SIGTERM and SIGINT: it ends when its stdin closes, which happens when the Bento closes the log or
dies, and then drains everything it holds to the database or to a spill file.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import fcntl
import gc
import io
import json
import logging
import os
import pickle
import select
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from bentos.predlog import (
    PredictionLogWriter,
    PredictionRow,
    WriterStats,
    _WriterBase,
    default_engine_factory,
    take,
)
from bentos.predlog_overflow import OverflowSpiller

log = logging.getLogger("recsys.predlog")

CONFIG_ENV = "RECSYS_PREDLOG_CHILD_CONFIG"
STATS_INTERVAL_S = 1.0
MAX_RESTART_INTERVAL_S = 30.0
STUCK_AFTER_UNSETTLED = 5  # times max_queue: a child this far behind is taken for hung
STABLE_AFTER_S = 10.0  # a child that lived this long restarts after restart_interval_s again
# The child's young generation: a collection once this many container objects more were made than
# freed (Python's default: 700). See child_main.
CHILD_GC_THRESHOLD = 50_000
PIPE_SIZE = 1 << 20  # bytes the pipe to the child may hold: a whole frame, mostly
_HEADER = struct.Struct(">I")  # each frame: its length, then a pickle
_COUNTERS = tuple(
    f.name for f in dataclasses.fields(WriterStats) if f.name.startswith(("rows_", "write_failures"))
)


def frame(obj) -> bytes:
    """`obj` pickled, after its length. Pickled without a memo (`Pickler.fast`): a frame holds flat
    rows (or stats) and never a cycle, and the memo's bookkeeping was most of what pickling a row
    cost the Bento: 0.86 -> 0.36 us a row, and the frame 5 % smaller (docs/performance.md). The
    attribute is documented as deprecated since Python 3.0 but kept in CPython; an object nested
    deeper than 50 levels there is checked for cycles, which raise ValueError."""
    buf = io.BytesIO()
    pickler = pickle.Pickler(buf, protocol=5)
    pickler.fast = True
    pickler.dump(obj)
    data = buf.getvalue()
    return _HEADER.pack(len(data)) + data


def write_frame(stream: BinaryIO, obj) -> None:
    stream.write(frame(obj))
    stream.flush()


def write_all(fd: int, data: bytes, timeout_s: float) -> None:
    """Write `data` to the non-blocking `fd`; TimeoutError when the reader takes none of it for `timeout_s`."""
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view) :]
            continue
        except BlockingIOError:
            pass
        if not select.select([], [fd], [], timeout_s)[1]:
            raise TimeoutError(f"the writer process took no data for {timeout_s:g} s")


def widen_pipe(fd: int) -> None:
    """Let the pipe hold a whole frame (Linux: up to fs/pipe-max-size, 1 MiB by default).

    With the default 64 KiB a frame of a busy Bento's 200 ms (1,400 rows, about 400 KiB) went over
    in seven writes, each waiting in select() for the child to read the last: 3 % of the Bento's
    samples. Measured on one Bento at eight connections: 2.5-5 us of its CPU a request less.
    """
    try:
        limit = int(Path("/proc/sys/fs/pipe-max-size").read_text())
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, min(limit, PIPE_SIZE))
    except (OSError, ValueError, AttributeError):  # not Linux, or over the user's pipe quota
        pass


def read_frame(stream: BinaryIO):
    """The next object on `stream`; None at its end (a frame cut short counts as the end)."""
    header = _read_exactly(stream, _HEADER.size)
    if header is None:
        return None
    data = _read_exactly(stream, _HEADER.unpack(header)[0])
    return None if data is None else pickle.loads(data)


def _read_exactly(stream: BinaryIO, size: int) -> bytes | None:
    """`size` bytes, reading as often as it takes (a pipe hands over what it has); None at the end."""
    chunks, missing = [], size
    while missing:
        chunk = stream.read(missing)
        if not chunk:
            return None
        chunks.append(chunk)
        missing -= len(chunk)
    return b"".join(chunks)


class ProcessLogWriter(_WriterBase):
    """The `PredictionLogWriter` interface (start, log, close, stats), the writing done in a child process."""

    def __init__(
        self,
        database_url: str,
        spill_dir: Path | str,
        *,
        batch_size: int = 500,
        flush_interval_s: float = 0.2,
        write_interval_s: float = 1.0,
        max_queue: int = 10_000,
        restart_interval_s: float = 1.0,
        send_timeout_s: float = 5.0,
        child_command: list[str] | None = None,
        on_stats: Callable[[WriterStats], None] | None = None,
        open_file: Callable[..., BinaryIO] = open,
    ) -> None:
        self.database_url = database_url
        self.spill_dir = Path(spill_dir)
        self.batch_size = batch_size
        # How often the rows gathered go to the child: a Bento killed with SIGKILL loses at most this
        # long's rows. How often the child writes what it has to the database: the child loses
        # nothing when it dies (the Bento spills what it had not settled), and each write wakes it
        # and a Postgres backend and commits. Measured in the gateway at eight connections, beside
        # the same gateway writing every 200 ms: the writers and Postgres 15.9 -> 12.9 us of CPU a
        # request, the log's cost in throughput 16.5 -> 10.7 % (medians of 10 pairs; in another run
        # 14.3 -> 11.1 us and 13.0 -> 2.0 %, 8 pairs; docs/performance.md). Rows then reach the
        # database up to 1.2 s late, each Bento's at its own moment: the control plane's windows stop
        # RECSYS_LOG_SETTLE_S (2 s) short of now, or a step a few seconds long would count the arms
        # unevenly enough to see a sample-ratio mismatch (the end-to-end demo once halted so).
        self.flush_interval_s = flush_interval_s
        self.write_interval_s = write_interval_s
        self.max_queue = max_queue
        self.restart_interval_s = restart_interval_s
        self.send_timeout_s = send_timeout_s  # a child that reads nothing for this long is taken for hung
        self.child_command = child_command or [sys.executable, "-m", "bentos.predlog_process"]
        self._on_stats = on_stats
        self._rows: collections.deque[PredictionRow] = collections.deque()
        # Spills here only what the child cannot take; its spill file is closed after each use, so
        # that the child can claim and replay it.
        self._fallback = PredictionLogWriter(  # never started: no thread
            lambda: None, self.spill_dir, retry_interval_s=restart_interval_s, open_file=open_file
        )
        # Rows log() finds no room for: spilled by a thread of their own, for the child to replay.
        self._overflow = OverflowSpiller(
            self._spill_overflow,
            self._fallback.count_lost,
            max_rows=max_queue,
            batch_size=batch_size,
        )
        self._child: subprocess.Popen | None = None
        self._next_start = 0.0
        self._started_at = 0.0
        self._restart_delay = restart_interval_s
        # Frames sent to the current child whose rows it has not all reported settled (in the
        # database, a spill file or the rejected file): if it dies, those rows are spilled here.
        # Duplicates that creates are harmless (ON CONFLICT DO NOTHING when replayed); lost rows
        # would not be. A frame is kept as the bytes sent, not as its rows, which are freed once
        # pickled: a row is about 1.7 KB of objects and 350 bytes pickled. Measured: a child 40,000
        # rows behind held 81 MB of the Bento's memory as rows, 17 MB as frames (docs/performance.md).
        self._unacked: collections.deque[_SentFrame] = collections.deque()
        self._unacked_rows = 0  # rows in _unacked not yet settled
        self._acked = 0  # the current child's rows_settled already taken off _unacked
        self._ack_lock = threading.Lock()
        self._child_stats = WriterStats()
        self._ended_children = dict.fromkeys(_COUNTERS, 0)  # counters of children that have exited
        self._stats_lock = threading.Lock()
        self._stopping = threading.Event()
        self._closed = False
        self._sender: threading.Thread | None = None
        self._readers: list[threading.Thread] = []

    # ---- the caller's side -------------------------------------------------------------------

    def start(self) -> ProcessLogWriter:
        if self._sender is None:
            self._start_child()
            self._sender = threading.Thread(target=self._run, name="predlog-sender", daemon=True)
            self._sender.start()
        return self

    def log(self, row: PredictionRow) -> None:
        """Keep `row` for the next frame; never blocks, never raises, never touches the disk.

        Past `max_queue` rows (the sender has taken nothing for that long: a child that takes no data
        for up to send_timeout_s at thousands of requests/s) the row goes to the overflow, which a
        thread of its own spills for the child to replay (bentos/predlog_overflow.py): spilling it here
        cost an fsync on the serving path for every request, and raised with the disk full. Past
        another `max_queue` rows there, or with the disk full, it is counted lost.
        """
        # Not shared with PredictionLogWriter.log: no thread to wake here; late rows go to the child's replay.
        if not self._closed and len(self._rows) < self.max_queue:
            self._rows.append(row)
            return
        if self._closed:
            self._spill([row])  # a request that finishes after close(): nothing else will send it
        else:
            self._overflow.put(row)

    def close(self, timeout_s: float = 15.0) -> None:
        """Send what is held, let the child drain to the database (or spill), wait for it. Safe twice."""
        if self._closed:
            return
        self._closed = True
        deadline = time.monotonic() + timeout_s
        self._overflow.close(timeout_s)
        self._stopping.set()
        if self._sender is not None:
            self._sender.join(timeout_s)
        if self._sender is None or self._sender.is_alive():
            self._spill(take(self._rows, len(self._rows)))  # the sender is stuck: keep the rows here
        child = self._child
        if child is not None:
            self._end_stdin(child)
            try:
                child.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("prediction log: writer process %d did not finish in time; killed", child.pid)
                child.kill()
                child.wait()
        for reader in self._readers:
            reader.join(1.0)  # the child's last report settles what it drained
        self._spill(self._abandon_unacked())
        self._publish_stats()

    def stats(self) -> WriterStats:
        with self._stats_lock:
            child, ended = self._child_stats, dict(self._ended_children)
        self._fallback.refresh_spill_state()  # the child replays the files spilled here
        own = self._fallback.stats()
        counters = {n: ended[n] + getattr(child, n) + getattr(own, n) for n in _COUNTERS}
        return dataclasses.replace(
            child,
            queue_depth=child.queue_depth + len(self._rows) + len(self._overflow),
            spill_rows=child.spill_rows + own.spill_rows,
            spill_bytes=max(child.spill_bytes, own.spill_bytes),  # both measure the same directory
            disk_ok=child.disk_ok and own.disk_ok,
            # A child that keeps dying (restarted at the longest interval) replays nothing.
            writer_alive=self._child is not None or self._restart_delay < MAX_RESTART_INTERVAL_S,
            **counters,
        )

    # ---- the sender thread -------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            stopping = self._stopping.wait(self.flush_interval_s)
            try:
                self._round(stopping)
            except Exception:  # the thread must not die: with no sender every later row is lost
                log.exception("prediction log: the sender's round failed; it goes on")
            if stopping:
                return

    def _round(self, stopping: bool) -> None:
        child = self._child
        if child is not None and not stopping and child.poll() is not None:
            # Gone with rows unsettled: spill them now, not when the next row comes.
            self._give_up_on(child, f"exited with {child.returncode}")
        while self._rows:
            rows = take(self._rows, self.batch_size * 4)
            try:
                self._send(rows)
            except Exception:  # it did die on ENOSPC; these rows go to the disk, or are counted lost
                log.exception("prediction log: sending %d rows failed; spilling them", len(rows))
                self._spill(rows)

    def _send(self, rows: list[PredictionRow]) -> None:
        child = self._child
        if child is not None and child.poll() is not None:
            self._give_up_on(child, f"exited with {child.returncode}")
        elif child is not None and self._unacked_rows > STUCK_AFTER_UNSETTLED * self.max_queue:
            self._give_up_on(child, "settles no rows (hung)")
        if self._child is None and time.monotonic() >= self._next_start and not self._stopping.is_set():
            self._start_child()
        child = self._child
        if child is None:
            self._spill(rows)
            return
        data = frame(rows)
        with self._ack_lock:  # before the write: the child may report the rows settled at once
            self._unacked.append(_SentFrame(data, len(rows)))
            self._unacked_rows += len(rows)
        try:
            write_all(child.stdin.fileno(), data, self.send_timeout_s)
        except TimeoutError as exc:
            self._give_up_on(child, f"hung ({exc})")
        except (OSError, ValueError) as exc:  # BrokenPipeError, or stdin already closed
            self._give_up_on(child, f"unreachable ({exc})")

    def _give_up_on(self, child: subprocess.Popen, why: str) -> None:
        """The child is dead or hung: make sure it is gone, and spill the rows it never settled."""
        log.warning("prediction log: writer process %d %s; its unsettled rows spilled", child.pid, why)
        if child.poll() is None:
            child.kill()
        child.wait()
        self._end_stdin(child)
        self._child = None  # the next frame starts another, once the backoff allows
        self._spill(self._abandon_unacked())

    def _abandon_unacked(self) -> list[PredictionRow]:
        """The rows the current child was sent and never reported settled, forgotten here."""
        with self._ack_lock:
            frames = list(self._unacked)
            self._unacked.clear()
            self._unacked_rows = 0
            self._acked = 0
        return [row for sent in frames for row in sent.unsettled_rows()]

    def _settle(self, settled: int) -> None:
        """The child has settled `settled` rows in all: take that many off the oldest frames."""
        with self._ack_lock:
            n = min(settled - self._acked, self._unacked_rows)
            self._acked = settled
            self._unacked_rows -= n
            while n > 0:
                oldest = self._unacked[0]
                taken = min(n, oldest.rows - oldest.settled)
                oldest.settled += taken
                n -= taken
                if oldest.settled == oldest.rows:
                    self._unacked.popleft()

    def _spill(self, rows: list[PredictionRow]) -> None:
        """Spill `rows` here for the child to replay; when the disk takes none, count them lost."""
        if not rows:
            return
        try:
            kept = self._fallback.spill_for_replay(rows)
        except Exception:  # not a disk error (those return False): a row that cannot be written as JSON
            log.exception("prediction log: cannot spill %d rows", len(rows))
            kept = False
        if not kept:
            self._fallback.count_lost(
                len(rows), "no writer process took them and the spill file is not writable"
            )
        self._publish_stats()

    def _spill_overflow(self, rows: list[PredictionRow]) -> bool:
        """The overflow's spill: `rows` in a spill file for the child to replay, reported at once so that
        /predlog shows them waiting (the control plane waits for them before it evaluates)."""
        kept = self._fallback.spill_for_replay(rows)
        self._publish_stats()
        return kept

    # ---- the child process -------------------------------------------------------------------

    def _start_child(self) -> subprocess.Popen | None:
        # A child that keeps dying soon after it starts (it cannot import, say) is restarted ever
        # less often, up to once every MAX_RESTART_INTERVAL_S: each start costs half a second of CPU.
        now = time.monotonic()
        short_lived = self._started_at > 0 and now - self._started_at < STABLE_AFTER_S
        self._restart_delay = (
            min(self._restart_delay * 2, MAX_RESTART_INTERVAL_S) if short_lived else self.restart_interval_s
        )
        self._next_start = now + self._restart_delay
        self._started_at = now
        config = {
            "database_url": self.database_url,
            "spill_dir": str(self.spill_dir),
            # the child's PredictionLogWriter batches as this writer was told to
            "writer": {
                "batch_size": self.batch_size,
                "flush_interval_s": self.write_interval_s,
                "max_queue": self.max_queue,
            },
        }
        package_root = str(Path(__file__).resolve().parent.parent)
        env = {
            **os.environ,
            CONFIG_ENV: json.dumps(config),
            "PYTHONPATH": os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p),
        }
        try:
            child = subprocess.Popen(
                self.child_command,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                bufsize=0,  # frames go straight to the pipe (write_all), never through a locked buffer
                env=env,
            )
            os.set_blocking(child.stdin.fileno(), False)
            widen_pipe(child.stdin.fileno())
        except OSError as exc:
            log.error("prediction log: cannot start the writer process: %s", exc)
            return None
        self._child = child
        with self._stats_lock:
            for name in _COUNTERS:
                self._ended_children[name] += getattr(self._child_stats, name)
            self._child_stats = WriterStats()
        reader = threading.Thread(target=self._read_stats, args=(child,), name="predlog-stats", daemon=True)
        reader.start()
        self._readers = [r for r in self._readers if r.is_alive()] + [reader]
        return child

    def _read_stats(self, child: subprocess.Popen) -> None:
        while True:
            try:
                stats = read_frame(child.stdout)
            except Exception:  # a torn or foreign frame: stop listening to this child
                log.exception("prediction log: unreadable stats from writer process %d", child.pid)
                return
            if stats is None:
                return
            with self._stats_lock:
                current = child is self._child
                if current:
                    self._child_stats = stats
            if current:
                self._settle(stats.rows_settled)
            self._publish_stats()

    @staticmethod
    def _end_stdin(child: subprocess.Popen) -> None:
        with contextlib.suppress(OSError):
            child.stdin.close()


@dataclasses.dataclass
class _SentFrame:
    """A frame as written to the child, and how many of its rows (the first ones) it has settled."""

    data: bytes
    rows: int
    settled: int = 0

    def unsettled_rows(self) -> list[PredictionRow]:
        return pickle.loads(memoryview(self.data)[_HEADER.size :])[self.settled :]


# ---- the child's side -------------------------------------------------------------------------


def child_main(stdin: BinaryIO, stdout: BinaryIO, config: dict) -> None:
    """Feed every row read from `stdin` to a PredictionLogWriter until EOF, then close it.

    The rows of a frame live until their batch is written, up to a few thousand at a time, and each
    is two container objects (its tuple and its features). At Python's default threshold the cycle
    collector ran every 350 rows unpickled and walked every row still waiting, again and again: 8 %
    of this process's CPU. Rows hold no cycles and are freed by reference counting; what is left
    for the collector (the odd exception's traceback) can wait for a larger young generation.
    """
    gc.set_threshold(CHILD_GC_THRESHOLD, *gc.get_threshold()[1:])
    stats_out = _StatsOut(stdout)
    writer = PredictionLogWriter(
        default_engine_factory(config["database_url"]),
        config["spill_dir"],
        **config["writer"],
        on_stats=stats_out.send,
    ).start()
    try:
        while (rows := read_frame(stdin)) is not None:
            writer.log_many(rows)
    finally:
        writer.close()
        stats_out.send(writer.stats(), force=True)


class _StatsOut:
    """The writer's stats to the Bento: at once when its state changes, else at most once a STATS_INTERVAL_S.

    The writer reports after every batch; passing each report on cost the Bento about 1 us per
    request in its reader thread.
    """

    _STATE = (
        "db_up",
        "disk_ok",
        "rows_spilled",
        "rows_rejected",
        "rows_corrupt",
        "rows_lost",
        "write_failures",
        "spill_rows",
    )

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream
        self._lock = threading.Lock()
        self._last: WriterStats | None = None
        self._sent_at = 0.0

    def send(self, stats: WriterStats, force: bool = False) -> None:
        with self._lock:
            now = time.monotonic()
            last = self._last
            changed = last is None or any(getattr(stats, n) != getattr(last, n) for n in self._STATE)
            if not (force or changed or now - self._sent_at >= STATS_INTERVAL_S):
                return
            try:
                write_frame(self._stream, stats)
            except (OSError, ValueError):
                return  # the Bento has gone: the rows still go to the database or the spill file
            self._last, self._sent_at = stats, now


def main() -> None:
    # The Bento's process group may be signalled as a whole; this process ends when its stdin
    # closes, after the rows it holds are written or spilled.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s predlog-process %(message)s")
    config = json.loads(os.environ.pop(CONFIG_ENV))
    frames = os.fdopen(os.dup(1), "wb")  # stats frames only: anything else printed goes to stderr
    os.dup2(2, 1)
    child_main(sys.stdin.buffer, frames, config)


if __name__ == "__main__":
    main()
