"""Which role (baseline, canary, control) this Bento's version holds, read from `traffic_config`.

A Bento is built before anyone knows its role and keeps running through promotions, so the role
is looked up in the background every few seconds. When the database is unreachable the last known
role stays; before the first successful read, and when no row names this version, it is "unknown".
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from sqlalchemy import Engine

from control_plane.queries import version_roles
from control_plane.settings import ROLES

log = logging.getLogger("recsys.roles")

UNKNOWN = "unknown"


def pick_role(rows: list[tuple[str, int]]) -> str:
    """The role for one version given its (role, weight) rows: the heaviest, then baseline > canary > control."""
    if not rows:
        return UNKNOWN
    order = {r: i for i, r in enumerate(ROLES)}
    return min(rows, key=lambda rw: (-(rw[1] or 0), order.get(rw[0], len(order)), rw[0]))[0]


class RoleWatcher:
    """Polls `traffic_config` on its own daemon thread; `role` is always an instant read."""

    def __init__(
        self, engine_factory: Callable[[], Engine], version: int, *, interval_s: float = 2.0
    ) -> None:
        self._engine_factory = engine_factory
        self._engine: Engine | None = None
        self.version = version
        self.interval_s = interval_s
        self.role = UNKNOWN
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failing = False

    def start(self) -> RoleWatcher:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="role-watcher", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        if self._engine is not None:
            self._engine.dispose()

    def refresh(self) -> str:
        """Read the role now; on a database error keep the last one."""
        try:
            if self._engine is None:
                self._engine = self._engine_factory()
            with self._engine.connect() as conn:
                rows = version_roles(conn, self.version)
        except Exception as exc:
            if not self._failing:
                log.warning("role lookup failed, keeping role %r: %s", self.role, exc)
            self._failing = True
            return self.role
        self._failing = False
        role = pick_role(rows)
        if role != self.role:
            log.info("version %d now holds role %r (was %r)", self.version, role, self.role)
            self.role = role
        return role

    def _run(self) -> None:
        while True:
            self.refresh()
            if self._stop.wait(self.interval_s):
                return
