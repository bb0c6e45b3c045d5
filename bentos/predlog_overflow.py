"""Rows that find the prediction log's queue full, spilled by a thread of their own.

A request only ever appends its row to a deque. When the log's queue is full (its writer has taken
nothing for `max_queue` rows' time: a database call that hangs in thread mode, a writer process that
reads nothing for up to its send timeout), the row goes to this overflow instead, and a thread spills
the overflow to the spill directory in batches (fsync'd, replayed by the writer like any spill file).
Before, the request spilled its row itself, an fsync on the serving path for every row (and an
exception with the disk full), or, in the Bento's process, counted it lost at once.

The overflow holds at most `max_rows` rows: past that, or when the disk refuses a batch (ENOSPC,
EIO), the rows are counted lost (`count_lost`: the rows_lost metric, a log line and an alert), never
dropped silently. `close()` spills what is left.
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger("recsys.predlog")


Row = Any  # a prediction row (bentos.predlog.Row); this module sits below that one


class OverflowSpiller:
    """A bounded deque of rows and the thread that spills it."""

    def __init__(
        self,
        spill: Callable[[list[Row]], bool],
        count_lost: Callable[[int, str], None],
        *,
        max_rows: int,
        settled: Callable[[int], None] | None = None,
        batch_size: int = 500,
        name: str = "predlog-overflow",
    ) -> None:
        self._spill = spill  # True when the rows are in a spill file, False when the disk took none
        self._count_lost = count_lost
        self._settled = settled or (lambda n: None)
        self.max_rows = max_rows
        self.batch_size = batch_size
        self._name = name
        self._rows: collections.deque[Row] = collections.deque()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self.rows_taken = 0  # rows put here (tests and stats)

    def __len__(self) -> int:
        return len(self._rows)

    def put(self, row: Row) -> None:
        """Keep `row` for the spill thread, or count it lost when the overflow is full; never blocks on the disk."""
        if self._stopping.is_set() or len(self._rows) >= self.max_rows:
            self._count_lost(1, f"the log's queue and its overflow of {self.max_rows} rows are full")
            self._settled(1)
            return
        self._rows.append(row)
        self.rows_taken += 1
        if self._thread is None:
            self._start()
        self._wake.set()

    def _start(self) -> None:
        with self._start_lock:
            if self._thread is None and not self._stopping.is_set():
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop the thread and spill (or count lost) whatever is left. Safe twice."""
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
        if self._thread is None or not self._thread.is_alive():
            self._drain()

    def _run(self) -> None:
        while not self._stopping.is_set():
            self._wake.wait()
            self._wake.clear()
            try:
                self._drain()
            except Exception:  # the thread must not die: with no spiller every overflowing row is lost
                log.exception("prediction log: spilling the overflow failed; it goes on")
        self._drain()

    def _drain(self) -> None:
        while self._rows:
            rows = _take(self._rows, self.batch_size)
            if not rows:
                return
            try:
                kept = self._spill(rows)
            except Exception:  # not a disk error (those return False): a row that cannot be written
                log.exception("prediction log: cannot spill %d overflowing rows", len(rows))
                kept = False
            if not kept:
                self._count_lost(len(rows), "the log's queue is full and the spill file is not writable")
            self._settled(len(rows))


def _take(rows: collections.deque, n: int) -> list:
    """Up to `n` rows off the left of `rows`; safe while other threads append to it."""
    out = []
    try:
        for _ in range(n):
            out.append(rows.popleft())
    except IndexError:
        pass
    return out
