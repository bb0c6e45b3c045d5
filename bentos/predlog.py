"""Every served prediction goes to the `predictions` table: batched off the request path, never dropped.

The request thread only appends a row to a bounded deque. One writer thread takes batches off it
(once a flush interval, or at once when a whole batch is waiting) and inserts them with ON CONFLICT
DO NOTHING on `request_id`, so writing a row twice is harmless. When the deque is full the row goes
to a bounded overflow that a thread of its own appends to the spill file (bentos/predlog_overflow.py),
never the request; when the database is unreachable the writer appends whole batches there. Spill files are fsync'd JSON lines, one file per process (locked with flock while its
owner has it open), and are replayed into the database once it answers again, including the files a
dead process left behind. A row the database refuses as bad data (a constraint, not the connection)
is set aside in rejected-*.jsonl instead of being retried for ever, and so is a spill line that cannot
be read back (the dead-letter files: `DEAD_LETTER_GLOB`).

A spill that fails (ENOSPC, EIO) is cut back to where it began, so a file never keeps half a batch, and
the disk is tried again after `retry_interval_s`. Meanwhile the writer keeps the rows it cannot place
in memory, up to `max_queue`, and writes them to whichever of the database and the disk comes back
first; a row that finds no room there either is counted in `rows_lost` (and logged), never dropped
silently. Nothing is restarted for the log to recover.

What is lost: rows counted in `rows_lost`; rows still in memory when the process is killed with
SIGKILL (or dies before `close()`); docs/what-it-survives.md gives the bounds.

A Bento runs this writer in a process of its own (`bentos/predlog_process.py`); `RECSYS_PREDLOG=thread`
runs it in the Bento's process.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import fcntl
import io
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from pydantic_core import PydanticSerializationError, to_json
from sqlalchemy import Engine, text

from bentos.predlog_overflow import OverflowSpiller
from control_plane.db.engine import make_engine
from control_plane.db.schema import predictions
from control_plane.queries import add_request_facts, first_of_each

log = logging.getLogger("recsys.predlog")

SPILL_GLOB = "predlog-*.jsonl"
LOST_LOG_INTERVAL_S = 10.0  # rows lost are logged (with the total) at most this often
DEAD_LETTER_GLOB = "rejected-*.jsonl"  # rows the database refused and spill lines that cannot be read


# One row of `predictions`, exactly as inserted: a tuple in the table's column order (`COLUMNS`):
# request_id, ts, model_version, role, route, endpoint, features, score, latency_ms, status, user_key,
# served (/recommend: the item ids served, in order; None for /predict), pair_key (the gateway's
# X-Recsys-Pair during a shadow phase, shared by the baseline's row and the shadow's copy; else None).
# A tuple, not a dict: a Bento builds one for every request and pickles it to the writer process,
# and a dict's ten keys went with every row, pickled and unpickled each time: 1.2 against 0.6 us a
# row to unpickle, 335 against 243 bytes (docs/performance.md). Files hold rows as JSON objects
# (`row_dict`), and SQLAlchemy gets dicts.
PredictionRow = tuple[
    str,
    float,
    int,
    str,
    str,
    str,
    "list[float] | None",
    "float | None",
    float,
    int,
    "str | None",
    "list[str] | None",
    "str | None",
]


@dataclass(frozen=True)
class WriterStats:
    """Counters since the writer started, and gauges as of now."""

    queue_depth: int = 0
    rows_written: int = 0  # inserted into the database, replays included
    rows_spilled: int = 0  # appended to a spill file (by the caller or the writer)
    rows_replayed: int = 0  # read back from spill files and inserted
    rows_corrupt: int = 0  # unreadable spill lines (a process killed mid-write)
    rows_rejected: int = 0  # refused by the database as bad data, kept in a rejected-*.jsonl file
    rows_lost: int = 0  # kept nowhere: database down and the spill (or dead-letter) file not writable
    rows_settled: int = 0  # rows given to log() now in the database, a spill file, the rejected file or lost
    write_failures: int = 0  # failed database round trips
    spill_bytes: int = 0  # size of the spill files waiting in the spill directory
    spill_rows: int = 0  # rows this process spilled that no one has replayed yet
    db_up: bool = True
    disk_ok: bool = True  # False while the last spill failed (ENOSPC, EIO)
    # False when no writer can write or replay the rows (a writer process that keeps dying): its spill
    # files wait for the next writer, and the control plane does not wait for them (log_backlog.py)
    writer_alive: bool = True


def default_engine_factory(url: str) -> Callable[[], Engine]:
    """An engine factory for `url` whose statements cannot hang the writer for long."""

    def factory() -> Engine:
        if url.startswith("postgresql"):
            return make_engine(url, pool_size=2, connect_args={"options": "-c statement_timeout=10000"})
        return make_engine(url)

    return factory


COLUMNS = tuple(str(c.name) for c in predictions.columns)  # plain str: SQLAlchemy names are a subclass


def row_dict(row: PredictionRow) -> dict:
    """`row` as a JSON object or SQLAlchemy parameters: column name -> value."""
    return dict(zip(COLUMNS, row, strict=True))


# added in revisions 0004, 0005 and 0006: spill files written before lack them
_OPTIONAL = frozenset({"user_key", "served", "pair_key"})


def row_from_dict(values: dict) -> PredictionRow:
    """The row a `row_dict` holds; KeyError when it lacks a column (other than an optional one)."""
    return tuple(values.get(c) if c in _OPTIONAL else values[c] for c in COLUMNS)


_STAGE = "predlog_stage"
_STAGE_DDL = (
    f"CREATE TEMP TABLE IF NOT EXISTS {_STAGE} (LIKE predictions INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"
)
_COPY = f"COPY {_STAGE} ({', '.join(COLUMNS)}) FROM STDIN"
_COPY_DIRECT = f"COPY predictions ({', '.join(COLUMNS)}) FROM STDIN"
_MERGE = (
    f"INSERT INTO predictions ({', '.join(COLUMNS)}) SELECT {', '.join(COLUMNS)} FROM {_STAGE} "
    "ON CONFLICT DO NOTHING RETURNING request_id"  # any key: (request_id, ts) once partitioned
)
_NULL = "\\N"


def _esc(value: str) -> str:
    """A text value as COPY's text format reads it back unchanged."""
    if "\\" in value or "\t" in value or "\n" in value or "\r" in value:
        return value.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")
    return value


_LINE = "%s\t%s\t%d\t%s\t%s\t%s\t%s\t%s\t%s\t%d\t%s\t%s\t%s\n"  # the columns of `COLUMNS`, in order


def _features_json(features: list[float]) -> str:
    """The features as JSON text, as json.dumps would write them (NaN too), in a fifth of its time.

    pydantic-core formats floats in Rust: 0.7 us for 16 features against 3.2 us for json.dumps,
    which was over half of a row's formatting (docs/performance.md).
    """
    try:
        return to_json(features, inf_nan_mode="constants").decode()
    except (TypeError, ValueError, PydanticSerializationError):
        return json.dumps(features)


def _served_json(served: list[str]) -> str:
    """A served list (item ids) as JSON text, formatted by pydantic-core like the features."""
    return to_json(served).decode()


def _floats_text(values: list[float]) -> list[str]:
    """Each float as text that Postgres reads back exactly: the shortest that round-trips, as repr()
    writes it, with NaN and Infinity as words. One pydantic-core call for a whole batch costs 0.1 us
    a value where repr() cost 0.5 (docs/performance.md). `values` must be floats: the text is split
    on the commas between them."""
    return to_json(values, inf_nan_mode="constants").decode()[1:-1].split(",") if values else []


def copy_text(rows: list[PredictionRow]) -> str:
    """The rows in COPY's text format (tab-separated, \\N for NULL), columns in `COLUMNS` order."""
    floats: list[float] = []
    for _, ts, _, _, _, _, _, score, latency_ms, _, _, _, _ in rows:
        floats += (float(ts), 0.0 if score is None else float(score), float(latency_ms))
    text = _floats_text(floats)
    lines = []
    for i, (
        request_id,
        _,
        version,
        role,
        route,
        endpoint,
        features,
        score,
        _,
        status,
        user,
        served,
        pair,
    ) in enumerate(rows):
        lines.append(
            _LINE
            % (
                _esc(str(request_id)),
                text[3 * i],
                int(version),
                _esc(str(role)),
                _esc(str(route)),
                _esc(str(endpoint)),
                _NULL if features is None else _esc(_features_json(features)),
                _NULL if score is None else text[3 * i + 1],
                text[3 * i + 2],
                int(status),
                _NULL if user is None else _esc(str(user)),
                _NULL if served is None else _esc(_served_json(served)),
                _NULL if pair is None else _esc(str(pair)),
            )
        )
    return "".join(lines)


def copy_batch(conn, rows: list[PredictionRow]) -> None:
    """Postgres: the batch as one COPY straight into `predictions`, on `conn` (a pooled DBAPI
    connection the writer holds); a batch that holds a row already there (a replay, typically) goes
    instead through a temporary table and one INSERT ... ON CONFLICT DO NOTHING, so that duplicates
    still cost nothing.

    The writer holds the GIL while it builds a batch: SQLAlchemy's multi-row INSERT cost about 28 us
    of Python per row, formatting COPY's text about a fifth of that, and Postgres parses COPY for
    less than VALUES. The direct COPY spares Postgres the temporary table: measured 12.7 -> 8.7 us of
    the backend's CPU per row (batches of 500).

    Raises what psycopg2 raises; after bad data the connection is rolled back and still usable,
    after anything else the caller must not use it again.
    """
    from psycopg2.errors import UniqueViolation

    text = copy_text(rows).encode()
    size = len(text) or 1  # one read of the buffer
    dbapi = conn.dbapi_connection
    staged = False
    try:
        with dbapi.cursor() as cur:
            try:
                cur.copy_expert(_COPY_DIRECT, io.BytesIO(text), size=size)
            except UniqueViolation:
                dbapi.rollback()  # nothing of the batch went in; a temporary table made now stays
                if not conn.info.get(_STAGE):  # once per database session
                    cur.execute(_STAGE_DDL)
                cur.copy_expert(_COPY, io.BytesIO(text), size=size)
                cur.execute(_MERGE)
                rows = first_of_each(rows, (r[0] for r in cur.fetchall()))
                staged = True
            add_request_facts(cur, "postgresql", rows)  # the aggregates of the rows this batch inserted
        dbapi.commit()
        if staged:
            conn.info[_STAGE] = True  # committed: the table now exists in this session
    except Exception as exc:
        conn.info.pop(_STAGE, None)  # a rollback may have undone its creation
        if _is_bad_data(exc):
            dbapi.rollback()
        raise


def insert_statement(engine: Engine):
    """INSERT ... ON CONFLICT DO NOTHING RETURNING request_id in the engine's dialect."""
    name = engine.dialect.name
    if name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert

        # RETURNING makes SQLAlchemy 2.1 send a batch as a few multi-row INSERTs ("insertmanyvalues");
        # with ON CONFLICT and no RETURNING it falls back to one round trip per row (SQLAlchemy
        # #13130). Measured: 50 -> 30 us of the writer's CPU per row, and far less server work.
        stmt = insert(predictions).on_conflict_do_nothing()  # any key: (request_id, ts) once partitioned
        return stmt.returning(predictions.c.request_id)
    if name == "sqlite":
        from sqlalchemy.dialects.sqlite import insert

        return insert(predictions).on_conflict_do_nothing().returning(predictions.c.request_id)
    raise NotImplementedError(f"prediction log: no ON CONFLICT insert for dialect {name!r}")


class _WriterBase:
    """The prediction log's interface (start, log, close, stats) and what its writers share: a
    context manager that starts and closes it, and the stats callback."""

    _on_stats: Callable[[WriterStats], None] | None = None

    def start(self):
        raise NotImplementedError

    def log(self, row: PredictionRow) -> None:
        raise NotImplementedError

    def close(self, timeout_s: float = 15.0) -> None:
        raise NotImplementedError

    def stats(self) -> WriterStats:
        raise NotImplementedError

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def _publish_stats(self) -> None:
        if self._on_stats is not None:
            try:
                self._on_stats(self.stats())
            except Exception:  # metrics must never stop the log
                log.exception("prediction log: stats callback failed")


class PredictionLogWriter(_WriterBase):
    """Bounded queue → batches → `predictions`; spill file when full or when the database is down."""

    def __init__(
        self,
        engine_factory: Callable[[], Engine] | str,
        spill_dir: Path | str,
        *,
        batch_size: int = 500,
        flush_interval_s: float = 0.2,
        max_queue: int = 10_000,
        retry_interval_s: float = 2.0,
        scan_interval_s: float = 30.0,
        on_stats: Callable[[WriterStats], None] | None = None,
        open_file: Callable[..., BinaryIO] = open,
    ) -> None:
        self._engine_factory = (
            default_engine_factory(engine_factory) if isinstance(engine_factory, str) else engine_factory
        )
        self.spill_dir = Path(spill_dir)
        self.batch_size = batch_size
        self.flush_interval_s = flush_interval_s
        self.retry_interval_s = retry_interval_s
        self.scan_interval_s = scan_interval_s
        self._on_stats = on_stats
        self.max_queue = max_queue
        self._open = open_file  # spill and dead-letter files are opened with it (unit tests: a full disk)
        self._rows: collections.deque[PredictionRow] = collections.deque()
        self._engine: Engine | None = None
        self._stmt = None
        self._conn = None  # Postgres: the pooled DBAPI connection the writer thread COPYs on
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        # Wakes the writer thread before its flush interval is up: set by close(), and by log() and
        # log_many() once half of max_queue is waiting, so that a long interval cannot fill the queue.
        self._wake = threading.Event()
        self._wake_at = max(1, max_queue // 2)
        self._closed = False
        self._inflight: list[PredictionRow] = []
        # Rows log() finds no room for, spilled by a thread of its own (started on the first one).
        self._overflow = OverflowSpiller(
            self._spill, self.count_lost, max_rows=max_queue, settled=self._settled, batch_size=batch_size
        )
        # Spill file state, shared by the writer thread and callers that find the queue full.
        self._spill_lock = threading.Lock()
        self._spill_file = None
        self._spill_name = ""
        self._spill_seq = 0
        self._spill_prefix = f"predlog-{socket.gethostname()}-{os.getpid()}-{time.time_ns()}"
        self._own_files: dict[str, int] = {}  # spill file name -> rows in it
        # Database state, writer thread only.
        self._db_down = False
        self._next_attempt = 0.0
        self._next_scan = 0.0  # scan at once: a dead process may have left files
        self._spill_pending = False
        # Disk state: after a failed spill the disk is left alone until _disk_retry_at (monotonic).
        self._disk_failing = False
        self._disk_retry_at = 0.0
        self._hold_until = 0.0  # writer thread: rows held in memory, nowhere to put them before this
        # Counters.
        self._rows_written = 0
        self._rows_spilled = 0
        self._rows_replayed = 0
        self._rows_corrupt = 0
        self._rows_rejected = 0
        self._rows_lost = 0
        self._lost_logged_at = float("-inf")
        self._rows_settled = 0
        self._settle_lock = threading.Lock()
        self._write_failures = 0
        self._spill_bytes = 0

    # ---- the caller's side -------------------------------------------------------------------

    def start(self) -> PredictionLogWriter:
        """Start the writer thread (the engine is created on it, on first use)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="predlog-writer", daemon=True)
            self._thread.start()
        return self

    def log(self, row: PredictionRow) -> None:
        """Queue `row`; never blocks on the database or the disk and never drops a row silently.

        A full queue hands the row to the overflow, whose own thread spills it (bentos/predlog_overflow.py):
        the caller is a request, which must not wait for an fsync. After close() the row is spilled
        here: nothing else would write it.
        """
        # Not shared with ProcessLogWriter.log: this one wakes its thread and settles late rows for close().
        if not self._closed and len(self._rows) < self.max_queue:
            self._rows.append(row)
            if len(self._rows) >= self._wake_at:
                self._wake.set()
            return
        if self._closed:
            self._keep_or_lose([row])
        else:
            self._overflow.put(row)

    def log_many(self, rows: list[PredictionRow]) -> None:
        """`log` for each of `rows`, in one step: the writer process hands on a whole frame so. What does
        not fit in the queue is spilled here, by the caller: the writer process' reader, not a request,
        which then reads the pipe more slowly (the Bento's queue and overflow take the wait)."""
        room = 0 if self._closed else self.max_queue - len(self._rows)
        if len(rows) <= room:
            self._rows.extend(rows)
            if len(self._rows) >= self._wake_at:
                self._wake.set()
            return
        room = max(room, 0)
        self._wake.set()
        self._rows.extend(rows[:room])
        self._keep_or_lose(rows[room:])

    def _keep_or_lose(self, rows: list[PredictionRow]) -> None:
        """Spill `rows`, or count them lost when the disk takes nothing; settled either way."""
        if not self._spill(rows):
            self.count_lost(len(rows), "the queue is full and the spill file is not writable")
        self._settled(len(rows))

    def count_lost(self, n: int, why: str) -> None:
        """`n` rows that could be kept nowhere: counted in `rows_lost` and logged, never dropped silently."""
        if n <= 0:
            return
        now = time.monotonic()
        with self._settle_lock:
            self._rows_lost += n
            total = self._rows_lost
            # Logged at most once every LOST_LOG_INTERVAL_S: a full queue counts a row per request.
            report = now - self._lost_logged_at >= LOST_LOG_INTERVAL_S
            if report:
                self._lost_logged_at = now
        if report:
            log.error("prediction log: rows lost, %d in all (the last %d: %s)", total, n, why)

    def close(self, timeout_s: float = 15.0) -> None:
        """Write or spill everything queued, then stop the thread. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        self._overflow.close(timeout_s)
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
        if self._thread is None or self._thread.is_alive():
            # The thread is stuck (or never ran): spill what it holds and what is queued. A row
            # that also reaches the database is deduplicated by ON CONFLICT when replayed.
            held = [*self._inflight, *take(self._rows, len(self._rows))]
            if not self._spill(held):
                self.count_lost(len(held), "closed with the database and the spill disk unavailable")
            self._settled(len(held))
        with self._spill_lock:
            self._close_spill_file()
        if self._engine is not None and (self._thread is None or not self._thread.is_alive()):
            self._let_go_of_connection()
            self._engine.dispose()
        self._publish_stats()

    def stats(self) -> WriterStats:
        return WriterStats(
            queue_depth=len(self._rows) + len(self._inflight) + len(self._overflow),  # all held in memory
            rows_written=self._rows_written,
            rows_spilled=self._rows_spilled,
            rows_replayed=self._rows_replayed,
            rows_corrupt=self._rows_corrupt,
            rows_rejected=self._rows_rejected,
            rows_lost=self._rows_lost,
            rows_settled=self._rows_settled,
            write_failures=self._write_failures,
            spill_bytes=self._spill_bytes,
            spill_rows=sum(self._own_files.values()),
            db_up=not self._db_down,
            disk_ok=not self._disk_failing,
            writer_alive=self._thread is None or self._thread.is_alive(),
        )

    def refresh_spill_state(self) -> None:
        """Forget this writer's spill files that another writer has replayed, and measure the directory
        again: for a writer that spills but never replays (the Bento's side of ProcessLogWriter), whose
        counts would otherwise report a backlog for ever."""
        self._forget_vanished_files()
        with contextlib.suppress(OSError):
            self._refresh_spill_size()

    # ---- the writer thread -------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            try:
                self._step()
            except Exception:
                # Whatever it was (an EIO the code does not expect, say), the thread must not die: with
                # no writer nothing is written or replayed and every evaluation waits for the backlog.
                log.exception("prediction log: writer step failed; retrying in %g s", self.retry_interval_s)
                if self._inflight:
                    self._hold(self._inflight)
                    self._inflight = []
                self._stopping.wait(self.retry_interval_s)
            if self._stopping.is_set() and not self._rows:
                return

    def _step(self) -> None:
        batch = self._take_batch()
        if batch:
            self._inflight = batch
            self._write(batch)
            self._inflight = []
        if self._replay_due():
            self._replay_all()
        self._publish_stats()

    def _take_batch(self) -> list[PredictionRow]:
        wait = self._hold_until - time.monotonic()
        if wait > 0 and not self._stopping.is_set():
            # Rows are held in memory because neither the database nor the disk took them: nothing to
            # do before one of them is due to be tried again.
            self._stopping.wait(wait)
            return []
        if len(self._rows) < self.batch_size:
            # Let a batch build up. Taking rows as they come would wake this thread (and take the
            # GIL from the request loop) for every request and commit one row at a time: measured
            # +1 ms per request at one connection. close() sets the event and ends the wait.
            # A deque, not a queue.Queue: its lock and condition cost the writer process 1.6 us a
            # row (docs/performance.md).
            self._wake.wait(self.flush_interval_s)
            self._wake.clear()  # before taking: rows that wake it after this wake the next wait
        return take(self._rows, self.batch_size)

    def _write(self, batch: list[PredictionRow]) -> None:
        """Insert the batch or spill it, and settle it; when neither works, hold it in memory."""
        if self._db_down and time.monotonic() < self._next_attempt:
            kept = self._spill(batch)
        else:
            try:
                inserted = self._store(batch)
            except Exception as exc:
                self._mark_down(exc)
                kept = self._spill(batch)
            else:
                self._rows_written += inserted
                self._mark_up()
                kept = True
        if kept:
            self._settled(len(batch))  # inserted, already there, rejected, or spilled
        else:
            self._hold(batch)

    def _hold(self, batch: list[PredictionRow]) -> None:
        """Neither the database nor the disk took `batch`: keep it at the head of the queue, to be tried
        again when one of them is due; past `max_queue` rows (or when closing) it is lost, and counted."""
        if self._stopping.is_set() or len(self._rows) >= self.max_queue:
            self.count_lost(len(batch), "the database is unreachable and the spill file is not writable")
            self._settled(len(batch))
            return
        self._rows.extendleft(reversed(batch))
        self._hold_until = min(self._next_attempt, self._disk_retry_at)

    def _settled(self, n: int) -> None:
        with self._settle_lock:  # the writer thread and callers that spill both count
            self._rows_settled += n

    def _store(self, rows: list[PredictionRow]) -> int:
        """Insert `rows` and return how many went in; raises only when the database is unavailable.

        A row the database refuses as bad data (it cannot succeed on a retry) must not hold the
        others back, nor be spilled and replayed for ever: the batch is retried row by row and the
        refused rows are set aside in a rejected-*.jsonl file, not replayed.
        """
        try:
            self._insert(rows)
            return len(rows)
        except Exception as exc:
            if not _is_bad_data(exc):
                raise
        inserted = 0
        for row in rows:
            try:
                self._insert([row])
                inserted += 1
            except Exception as exc:
                if not _is_bad_data(exc):
                    raise  # down mid-way: the whole batch spills; replay skips the rows already in
                self._reject(row, exc)
        return inserted

    def _reject(self, row: PredictionRow, exc: BaseException) -> None:
        log.error("prediction log: row %r refused by the database, set aside: %s", row[0], exc)
        if self._dead_letter({"row": row_dict(row), "error": str(exc)[:500]}):
            self._rows_rejected += 1
        else:
            self.count_lost(
                1, f"row {row[0]!r} refused by the database and the dead-letter file not writable"
            )

    def _dead_letter(self, entry: dict) -> bool:
        """Append `entry` to this process's dead-letter file (fsync'd); False when the disk refuses it."""
        line = json.dumps(entry, default=str).encode() + b"\n"
        try:
            self.spill_dir.mkdir(parents=True, exist_ok=True)
            with self._open(self.spill_dir / f"rejected-{self._spill_prefix}.jsonl", "ab", buffering=0) as f:
                append_synced(f, line)
        except OSError as exc:
            log.error("prediction log: dead-letter file in %s not writable: %s", self.spill_dir, exc)
            return False
        return True

    def _insert(self, rows: list[PredictionRow]) -> None:
        if self._engine is None:
            self._engine = self._engine_factory()
            self._stmt = insert_statement(self._engine)
        if self._engine.dialect.name == "postgresql" and self._engine.dialect.driver == "psycopg2":
            self._copy(rows)
            return
        with self._engine.begin() as conn:
            fresh = first_of_each(rows, conn.execute(self._stmt, [row_dict(r) for r in rows]).scalars().all())
            add_request_facts(
                conn.connection.cursor(), conn.dialect.name, fresh
            )  # in the batch's transaction

    def _copy(self, rows: list[PredictionRow]) -> None:
        """COPY on the connection this thread holds from batch to batch.

        Checking a connection out of the pool for every batch cost a `SELECT 1` round trip (the
        pool's pre-ping), the pool's bookkeeping and its events: 17 % of the writer process's CPU
        (docs/performance.md). A held connection can die while idle (Postgres restarted, say): a
        batch that fails on one is tried once more on a new connection (which the pool pings)
        before the database is taken for down, so such a death costs no spilled batch.
        """
        while True:
            fresh = self._conn is None
            if fresh:
                self._conn = self._engine.raw_connection()
            try:
                copy_batch(self._conn, rows)
                return
            except Exception as exc:
                if _is_bad_data(exc):
                    raise  # the connection is fine: the data is not
                self._let_go_of_connection(dead=True)
                if fresh:
                    raise

    def _let_go_of_connection(self, dead: bool = False) -> None:
        """Give the held connection back to the pool; a `dead` one the pool closes and never hands out again."""
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                if dead:
                    conn.invalidate()
                else:
                    conn.close()  # back to the pool, which dispose() then closes

    def _mark_down(self, exc: BaseException) -> None:
        self._write_failures += 1
        if not self._db_down:
            log.warning("prediction log: database unreachable, spilling to %s: %s", self.spill_dir, exc)
        self._db_down = True
        self._next_attempt = time.monotonic() + self.retry_interval_s

    def _mark_up(self) -> None:
        if self._db_down:
            log.warning("prediction log: database is back; replaying spill files")
            self._db_down = False
            self._spill_pending = True

    def _replay_due(self) -> bool:
        if self._stopping.is_set():
            return False
        now = time.monotonic()
        if now >= self._next_scan:
            return True
        return self._spill_pending and (not self._db_down or now >= self._next_attempt)

    def _replay_all(self) -> None:
        self._next_scan = time.monotonic() + self.scan_interval_s
        if not self.spill_dir.is_dir():
            return
        if not any(self.spill_dir.glob(SPILL_GLOB)):
            self._spill_pending = False
            self._refresh_spill_size()
            return
        if self._db_down and not self._probe():
            return
        with self._spill_lock:
            self._close_spill_file()  # our own file becomes claimable like anyone else's
        for path in sorted(self.spill_dir.glob(SPILL_GLOB)):
            if not self._replay_file(path):
                break
        else:
            self._spill_pending = False
        self._forget_vanished_files()
        self._refresh_spill_size()

    def _probe(self) -> bool:
        try:
            if self._engine is None:
                self._engine = self._engine_factory()
                self._stmt = insert_statement(self._engine)
            with self._engine.connect() as conn:
                conn.execute(text("SELECT 1"))
        except Exception as exc:
            self._mark_down(exc)
            return False
        self._mark_up()
        return True

    def _replay_file(self, path: Path) -> bool:
        """Insert every row of one spill file, then delete it; False when the database fails."""
        try:
            f = open(path, "rb")  # noqa: SIM115 - held open across the lock and the unlink
        except FileNotFoundError:
            return True
        with f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True  # a live writer still owns it
            try:
                if os.stat(path).st_ino != os.fstat(f.fileno()).st_ino:
                    return True  # replayed and deleted by someone else while we waited
            except FileNotFoundError:
                return True
            replayed = inserted = 0
            try:
                for chunk in _chunks(self._read_rows(f, path), self.batch_size):
                    inserted += self._store(chunk)
                    replayed += len(chunk)
            except OSError as exc:  # the file, not the database: try it again at the next scan
                log.error("prediction log: cannot read %s: %s", path.name, exc)
                return True
            except Exception as exc:
                self._mark_down(exc)
                return False
            path.unlink()
        self._rows_replayed += replayed
        self._rows_written += inserted
        with self._spill_lock:
            self._own_files.pop(path.name, None)
        if replayed:
            log.info("prediction log: replayed %d rows from %s", replayed, path.name)
        return True

    def _read_rows(self, f, path: Path) -> Iterator[PredictionRow]:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield row_from_dict(json.loads(line))
            except (ValueError, KeyError, TypeError):  # cut short, or not a row
                log.warning(
                    "prediction log: unreadable line %d of %s set aside: %r", lineno, path.name, line[:200]
                )
                entry = {
                    "line": line.decode(errors="replace"),
                    "error": f"unreadable line {lineno} of {path.name}",
                }
                if self._dead_letter(entry):
                    self._rows_corrupt += 1
                else:
                    self.count_lost(
                        1, f"unreadable line {lineno} of {path.name}, dead-letter file not writable"
                    )

    def _forget_vanished_files(self) -> None:
        with self._spill_lock:
            for name in list(self._own_files):
                if not (self.spill_dir / name).exists():
                    del self._own_files[name]

    def _refresh_spill_size(self) -> None:
        total = 0
        for p in self.spill_dir.glob(SPILL_GLOB):
            with contextlib.suppress(FileNotFoundError):
                total += p.stat().st_size
        self._spill_bytes = total

    # ---- the spill file ----------------------------------------------------------------------

    def spill_for_replay(self, rows: Iterable[PredictionRow]) -> bool:
        """Append `rows` to a spill file and close it, so that any writer may replay it at once; False
        when the disk took none of them (nothing of them is left in the file)."""
        kept = self._spill(rows)
        with self._spill_lock:
            self._close_spill_file()
        return kept

    def _spill(self, rows: Iterable[PredictionRow]) -> bool:
        """Append `rows` to this process's spill file, fsync'd; False, the file as it was, when the disk
        refuses them (ENOSPC, EIO). After a failure the disk is not tried again for `retry_interval_s`."""
        data = b"".join(_spill_line(r) for r in rows)
        if not data:
            return True
        n = data.count(b"\n")
        with self._spill_lock:
            if self._disk_failing and time.monotonic() < self._disk_retry_at:
                return False
            try:
                append_synced(self._open_spill_file(), data)
            except OSError as exc:
                # Rotate: a file whose fsync failed may hold pages the disk never took (fsync does not
                # report an error twice), and the next spill starts a new file.
                self._close_spill_file()
                self._disk_retry_at = time.monotonic() + self.retry_interval_s
                if not self._disk_failing:
                    log.error("prediction log: spill directory %s not writable: %s", self.spill_dir, exc)
                self._disk_failing = True
                return False
            if self._disk_failing:
                log.warning("prediction log: spill directory %s writable again", self.spill_dir)
                self._disk_failing = False
            self._own_files[self._spill_name] = self._own_files.get(self._spill_name, 0) + n
            self._rows_spilled += n
            self._spill_bytes += len(data)
            self._spill_pending = True
        return True

    def _open_spill_file(self):
        """This process's current spill file, created locked under a name no replayer matches yet."""
        if self._spill_file is None:
            self.spill_dir.mkdir(parents=True, exist_ok=True)
            self._spill_seq += 1
            name = f"{self._spill_prefix}-{self._spill_seq:04d}.jsonl"
            tmp = self.spill_dir / f".{name}.new"
            f = self._open(tmp, "ab", buffering=0)  # stays open (and locked) until rotated
            try:
                fcntl.flock(f, fcntl.LOCK_EX)
                os.rename(tmp, self.spill_dir / name)
                _fsync_dir(self.spill_dir)
            except OSError:
                f.close()
                with contextlib.suppress(OSError):
                    tmp.unlink()
                raise
            self._spill_file = f
            self._spill_name = name
            self._own_files[name] = 0
        return self._spill_file

    def _close_spill_file(self) -> None:
        if self._spill_file is not None:
            self._spill_file.close()  # releases the flock: the file can now be replayed
            self._spill_file = None


class NullLogWriter(_WriterBase):
    """Stands in for the writer when RECSYS_PREDLOG=off: accepts rows and keeps none."""

    def start(self) -> NullLogWriter:
        return self

    def log(self, row: PredictionRow) -> None:
        pass

    def close(self, timeout_s: float = 0.0) -> None:
        pass

    def stats(self) -> WriterStats:
        return WriterStats()


def _is_bad_data(exc: BaseException) -> bool:
    """True when retrying cannot help: the data, not the connection, is the problem."""
    from sqlalchemy import exc as sa_exc

    if isinstance(exc, sa_exc.IntegrityError | sa_exc.DataError):
        return True
    if isinstance(exc, sa_exc.DBAPIError):
        return False  # connection lost, server gone, missing table (not migrated yet): keep the rows
    try:
        import psycopg2
    except ImportError:
        pass
    else:  # raised unwrapped by the COPY path
        if isinstance(exc, psycopg2.IntegrityError | psycopg2.DataError):
            return True
        if isinstance(exc, psycopg2.Error):
            return False
    return isinstance(exc, sa_exc.StatementError | TypeError | ValueError | KeyError)


def take(rows: collections.deque[PredictionRow], n: int) -> list[PredictionRow]:
    """Up to `n` rows off the left of `rows`; safe while other threads append to it."""
    out = []
    popleft = rows.popleft
    try:
        for _ in range(n):
            out.append(popleft())
    except IndexError:
        pass
    return out


def _chunks(rows: Iterable[PredictionRow], size: int) -> Iterator[list[PredictionRow]]:
    chunk: list[PredictionRow] = []
    for row in rows:
        chunk.append(row)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _spill_line(row: PredictionRow) -> bytes:
    return json.dumps(row_dict(row), separators=(",", ":")).encode() + b"\n"


def append_synced(f: BinaryIO, data: bytes) -> None:
    """Write all of `data` at the end of the unbuffered file `f` and fsync it; on an error (ENOSPC,
    EIO) cut the file back to its length before, so that no partial line is left, and raise."""
    start = f.seek(0, os.SEEK_END)
    view = memoryview(data)
    try:
        while view:
            written = f.write(view)
            if not written:
                raise OSError(errno.ENOSPC, "no byte written")
            view = view[written:]
        os.fsync(f.fileno())
    except OSError:
        with contextlib.suppress(OSError):
            f.truncate(start)
        raise


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
