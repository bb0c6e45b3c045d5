"""Holding the action lock elsewhere (another thread, another process) while a test acts."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from control_plane.action_lock import ActionLock

ROOT = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def held_by_another_thread(lock: ActionLock, what: str) -> Iterator[None]:
    """Another thread holds `lock` as `what` for as long as the block runs."""
    holding, release = threading.Event(), threading.Event()

    def hold() -> None:
        with lock.held(what):
            holding.set()
            release.wait(30)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert holding.wait(10), "the other thread did not get the lock"
        yield
    finally:
        release.set()
        holder.join(10)


def held_by_another_process(url: str, what: str) -> subprocess.Popen:
    """A Python process holding the action lock of the database at `url` as `what`, for a minute."""
    code = f"""
        import time
        from control_plane.action_lock import ActionLock
        from control_plane.db.engine import make_engine
        with ActionLock(make_engine({url!r})).held({what!r}):
            print("held", flush=True)
            time.sleep(60)
    """
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout.readline().strip() == "held"
    return holder


def take_turns(lock: ActionLock) -> list[str]:
    """A second thread asks for the lock while the first holds it; what happened, in order."""
    events: list[str] = []
    holding = threading.Event()

    def first() -> None:
        with lock.held("evaluate by scheduler"):
            holding.set()
            time.sleep(0.3)
            events.append("first done")

    t = threading.Thread(target=first)
    t.start()
    assert holding.wait(10)
    with lock.held("rollback_now by ui"):
        events.append("second in")
    t.join()
    return events
