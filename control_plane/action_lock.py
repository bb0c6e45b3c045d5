"""One action at a time: the web, the scheduler's worker and the CLI take turns at moving traffic and aliases.

Every service write reads the rollout and the assignment, decides, applies, and records
(control_plane/services.py). Two of them at once from different processes (an operator's rollback while
a scheduled tick advances the same canary) would each read the state before the other wrote it, and the
later one would undo the earlier: a rolled-back, stopped canary given weight again. Holding this lock, each
write reads what the previous one left.

- Postgres: a transaction-level advisory lock, held by a connection of its own while the action runs; the
  holder names its action in `application_name`, so a refused caller can be told who has it. A process that
  dies releases the lock with its connection.
- A SQLite file (the embedded stack, one machine): `flock` on a file beside the database, which names the
  holder too; the kernel releases it when the holder dies.
- Anything else (an in-memory SQLite): a lock of this process, one per engine, which is all that can reach
  that database.

Re-entrant within a thread: a write that calls another (restore_previous_baseline → rollback_now) takes it
once. A caller that cannot have it within `wait_s` gets ActionBusy (HTTP 409), naming the action in progress.
Reads take no lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path

from sqlalchemy import Engine, text

from control_plane.errors import ActionBusy

log = logging.getLogger(__name__)

# The advisory lock's key: "recsys" and 1, as one signed 64-bit integer.
ADVISORY_KEY = 0x7265_6373_7973_0001
DEFAULT_WAIT_S = 20.0
POLL_S = 0.05


class ActionLock:
    """`with lock.held("rollback_now by ui"):` runs the block as the only action in progress."""

    def __init__(self, engine: Engine, wait_s: float = DEFAULT_WAIT_S, poll_s: float = POLL_S):
        self.wait_s = wait_s
        self._poll_s = poll_s
        self._backend = backend_for(engine)
        self._local = threading.local()

    @contextlib.contextmanager
    def held(self, what: str) -> Iterator[None]:
        depth = getattr(self._local, "depth", 0)
        if depth:  # this thread holds it already: a write inside a write
            self._local.depth = depth + 1
            try:
                yield
            finally:
                self._local.depth = depth
            return
        with self._backend.acquire(what, self.wait_s, self._poll_s):
            self._local.depth = 1
            try:
                yield
            finally:
                self._local.depth = 0


def backend_for(engine: Engine):
    if engine.dialect.name == "postgresql":
        return PostgresAdvisoryLock(engine)
    database = engine.url.database if engine.dialect.name == "sqlite" else None
    if database and database != ":memory:" and not database.startswith("file::memory:"):
        return FileLock(Path(database).with_name(Path(database).name + ".action-lock"))
    return _process_locks.setdefault(engine, ProcessLock())


def _poll(try_once: Callable[[], bool], wait_s: float, poll_s: float) -> bool:
    deadline = time.monotonic() + wait_s
    while not try_once():
        if time.monotonic() >= deadline:
            return False
        time.sleep(poll_s)
    return True


class PostgresAdvisoryLock:
    def __init__(self, engine: Engine, key: int = ADVISORY_KEY):
        self._engine = engine
        self._key = key

    @contextlib.contextmanager
    def acquire(self, what: str, wait_s: float, poll_s: float) -> Iterator[None]:
        conn = self._engine.connect()
        try:
            conn.begin()
            try_lock = text("SELECT pg_try_advisory_xact_lock(:k)")
            if not _poll(lambda: bool(conn.execute(try_lock, {"k": self._key}).scalar()), wait_s, poll_s):
                raise ActionBusy(self._holder(conn), wait_s)
            name = f"recsys action: {what}"[:63]  # Postgres truncates application_name at 63 bytes
            conn.execute(text("SELECT set_config('application_name', :n, true)"), {"n": name})
            yield
        finally:
            # Ending the transaction releases the lock; if the connection is gone, so is the lock.
            try:
                conn.rollback()
            except Exception as exc:  # the database went away during the action
                log.warning("action lock: its connection failed at release (%s)", exc.__class__.__name__)
                conn.invalidate()
            conn.close()

    def _holder(self, conn) -> str:
        row = conn.execute(
            text(
                "SELECT a.application_name, a.pid, EXTRACT(EPOCH FROM now() - a.xact_start)"
                " FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid"
                " WHERE l.locktype = 'advisory' AND l.granted"
                " AND l.classid::bigint = :hi AND l.objid::bigint = :lo AND l.objsubid = 1"
            ),
            {"hi": self._key >> 32, "lo": self._key & 0xFFFF_FFFF},
        ).first()
        if row is None or not row[0]:
            return "held by another process"
        name, pid, age = row
        return f"{name.removeprefix('recsys action: ')}, backend pid {pid}, for {float(age or 0):.0f} s"


class FileLock:
    def __init__(self, path: Path):
        self.path = path

    @contextlib.contextmanager
    def acquire(self, what: str, wait_s: float, poll_s: float) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if not _poll(lambda: _try_flock(fd), wait_s, poll_s):
                raise ActionBusy(self._holder(fd), wait_s)
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps({"what": what, "pid": os.getpid(), "since": time.time()}).encode(), 0)
            try:
                yield
            finally:
                os.ftruncate(fd, 0)
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    @staticmethod
    def _holder(fd: int) -> str:
        try:
            held = json.loads(os.pread(fd, 4096, 0) or b"{}")
            return f"{held['what']}, pid {held['pid']}, for {time.time() - held['since']:.0f} s"
        except (ValueError, KeyError, TypeError):
            return "held by another process"


def _try_flock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


class ProcessLock:
    def __init__(self):
        self._lock = threading.Lock()
        self._holder = ""

    @contextlib.contextmanager
    def acquire(self, what: str, wait_s: float, poll_s: float) -> Iterator[None]:
        if not self._lock.acquire(timeout=wait_s):
            raise ActionBusy(self._holder or "held by another thread", wait_s)
        self._holder = f"{what}, this process"
        try:
            yield
        finally:
            self._holder = ""
            self._lock.release()


_process_locks: weakref.WeakKeyDictionary[Engine, ProcessLock] = weakref.WeakKeyDictionary()
