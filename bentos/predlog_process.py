"""The prediction log's writer in a process of its own, fed by the Bento through a pipe.

In the Bento's process a request only appends its row to a deque. Every flush interval a sender
thread pickles what has gathered (0.5 us a row) and writes it to the child's stdin as one frame.
The child (`python -m bentos.predlog_process`) runs the `PredictionLogWriter` that formats the
rows, COPYs them into the database and spills them when it cannot, and writes that writer's stats
back on its stdout for the Bento's /metrics.

Why a process: in the Bento's own process the writer thread formatted each batch and drove
psycopg2 while holding the GIL, and the request loop waited for it. Measured on one Bento at eight
connections: the log on cost 13-15 % of requests/s and doubled the p99 (docs/performance.md).

What is lost is what was lost with the writer in the Bento's process: rows still in memory when
a process is killed with SIGKILL. Rows the child cannot take (it died, or never started) are
spilled by the Bento to the same spill directory, and a child replays them from there. The child
ignores SIGTERM and SIGINT: it ends when its stdin closes, which happens when the Bento closes the
log or dies, and then drains everything it holds to the database or to a spill file.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import logging
import os
import pickle
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
)

log = logging.getLogger("recsys.predlog")

CONFIG_ENV = "RECSYS_PREDLOG_CHILD_CONFIG"
STATS_INTERVAL_S = 1.0
_HEADER = struct.Struct(">I")  # each frame: its length, then a pickle
_COUNTERS = tuple(
    f.name for f in dataclasses.fields(WriterStats) if f.name.startswith(("rows_", "write_failures"))
)


def write_frame(stream: BinaryIO, obj) -> None:
    data = pickle.dumps(obj, protocol=5)
    stream.write(_HEADER.pack(len(data)) + data)
    stream.flush()


def read_frame(stream: BinaryIO):
    """The next object on `stream`; None at its end (a frame cut short counts as the end)."""
    header = stream.read(_HEADER.size)
    if len(header) < _HEADER.size:
        return None
    (size,) = _HEADER.unpack(header)
    data = stream.read(size)
    if len(data) < size:
        return None
    return pickle.loads(data)


class ProcessLogWriter(_WriterBase):
    """The `PredictionLogWriter` interface (start, log, close, stats), the writing done in a child process."""

    def __init__(
        self,
        database_url: str,
        spill_dir: Path | str,
        *,
        batch_size: int = 500,
        flush_interval_s: float = 0.2,
        max_queue: int = 10_000,
        restart_interval_s: float = 1.0,
        on_stats: Callable[[WriterStats], None] | None = None,
    ) -> None:
        self.database_url = database_url
        self.spill_dir = Path(spill_dir)
        self.batch_size = batch_size
        self.flush_interval_s = flush_interval_s
        self.max_queue = max_queue
        self.restart_interval_s = restart_interval_s
        self._on_stats = on_stats
        self._rows: collections.deque[PredictionRow] = collections.deque()
        # Spills here only what the child cannot take; its spill file is closed after each use, so
        # that the child can claim and replay it.
        self._fallback = PredictionLogWriter(lambda: None, self.spill_dir)  # never started: no thread
        self._child: subprocess.Popen | None = None
        self._next_start = 0.0
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
        """Keep `row` for the next frame; never blocks: past `max_queue` rows it spills here."""
        if not self._closed and len(self._rows) < self.max_queue:
            self._rows.append(row)
            return
        self._spill([row])

    def close(self, timeout_s: float = 15.0) -> None:
        """Send what is held, let the child drain to the database (or spill), wait for it. Safe twice."""
        if self._closed:
            return
        self._closed = True
        self._stopping.set()
        deadline = time.monotonic() + timeout_s
        if self._sender is not None:
            self._sender.join(timeout_s)
        if self._sender is None or self._sender.is_alive():
            self._spill(self._take(len(self._rows)))  # the sender is stuck: keep the rows here
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
            reader.join(1.0)
        self._publish_stats()

    def stats(self) -> WriterStats:
        with self._stats_lock:
            child, ended = self._child_stats, dict(self._ended_children)
        own = self._fallback.stats()
        counters = {n: ended[n] + getattr(child, n) + getattr(own, n) for n in _COUNTERS}
        return dataclasses.replace(
            child,
            queue_depth=child.queue_depth + len(self._rows),
            spill_rows=child.spill_rows + own.spill_rows,
            spill_bytes=max(child.spill_bytes, own.spill_bytes),  # both measure the same directory
            **counters,
        )

    # ---- the sender thread -------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            stopping = self._stopping.wait(self.flush_interval_s)
            while self._rows:
                self._send(self._take(self.batch_size * 4))
            if stopping:
                return

    def _take(self, n: int) -> list[PredictionRow]:
        rows = []
        popleft = self._rows.popleft
        try:
            for _ in range(n):
                rows.append(popleft())
        except IndexError:
            pass
        return rows

    def _send(self, rows: list[PredictionRow]) -> None:
        child = self._child
        if child is None or child.poll() is not None:
            child = self._restart_child()
        if child is None:
            self._spill(rows)
            return
        try:
            write_frame(child.stdin, rows)
        except (OSError, ValueError) as exc:  # BrokenPipeError, or stdin already closed
            log.warning("prediction log: writer process %d unreachable (%s); rows spilled", child.pid, exc)
            self._spill(rows)

    def _spill(self, rows: list[PredictionRow]) -> None:
        if rows:
            self._fallback.spill_for_replay(rows)
            self._publish_stats()

    # ---- the child process -------------------------------------------------------------------

    def _restart_child(self) -> subprocess.Popen | None:
        if self._stopping.is_set() or time.monotonic() < self._next_start:
            return None
        old = self._child
        if old is not None:
            log.warning(
                "prediction log: writer process %d exited with %s; starting another", old.pid, old.poll()
            )
            self._end_stdin(old)
        return self._start_child()

    def _start_child(self) -> subprocess.Popen | None:
        self._next_start = time.monotonic() + self.restart_interval_s
        config = {
            "database_url": self.database_url,
            "spill_dir": str(self.spill_dir),
            "batch_size": self.batch_size,
            "flush_interval_s": self.flush_interval_s,
            "max_queue": self.max_queue,
        }
        package_root = str(Path(__file__).resolve().parent.parent)
        env = {
            **os.environ,
            CONFIG_ENV: json.dumps(config),
            "PYTHONPATH": os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p),
        }
        try:
            child = subprocess.Popen(
                [sys.executable, "-m", "bentos.predlog_process"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                env=env,
            )
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
                if child is self._child:
                    self._child_stats = stats
            self._publish_stats()

    @staticmethod
    def _end_stdin(child: subprocess.Popen) -> None:
        with contextlib.suppress(OSError):
            child.stdin.close()


# ---- the child's side -------------------------------------------------------------------------


def child_main(stdin: BinaryIO, stdout: BinaryIO, config: dict) -> None:
    """Feed every row read from `stdin` to a PredictionLogWriter until EOF, then close it."""
    stats_out = _StatsOut(stdout)
    writer = PredictionLogWriter(
        default_engine_factory(config["database_url"]),
        config["spill_dir"],
        batch_size=config["batch_size"],
        flush_interval_s=config["flush_interval_s"],
        max_queue=config["max_queue"],
        on_stats=stats_out.send,
    ).start()
    try:
        while (rows := read_frame(stdin)) is not None:
            for row in rows:
                writer.log(row)
    finally:
        writer.close()
        stats_out.send(writer.stats(), force=True)


class _StatsOut:
    """The writer's stats to the Bento: at once when its state changes, else at most once a STATS_INTERVAL_S.

    The writer reports after every batch; passing each report on cost the Bento about 1 us per
    request in its reader thread.
    """

    _STATE = ("db_up", "rows_spilled", "rows_rejected", "rows_corrupt", "write_failures", "spill_rows")

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
