"""The weights in force and which version holds each role, persisted in `traffic_config`."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

from sqlalchemy import Engine, select
from sqlalchemy.dialects import postgresql, sqlite

from control_plane.db.schema import traffic_config
from control_plane.rollout.assignment import Assignment, Slot
from control_plane.traffic.base import ROLES, InvalidWeights, validate_weights


class TrafficStore:
    """Reads and writes `traffic_config` with SQLAlchemy Core; works on SQLite and Postgres."""

    def __init__(self, engine: Engine, *, clock: Callable[[], float] = time.time) -> None:
        self._engine = engine
        self._clock = clock

    def load(self) -> Assignment:
        """The assignment in force; `Assignment()` (nothing holds a role) when nothing was ever saved."""
        with self._engine.connect() as conn:
            rows = conn.execute(
                select(traffic_config.c.role, traffic_config.c.version, traffic_config.c.weight)
            )
            return Assignment(
                **{role: Slot(version, weight) for role, version, weight in rows if role in ROLES}
            )

    def save(self, assignment: Assignment) -> None:
        """Replace the whole assignment in one transaction."""
        rows = self._validated(assignment)
        with self._engine.begin() as conn:
            self._upsert(conn, rows, overwrite=True)

    def seed_if_empty(self, weights: Mapping[str, int], versions: Mapping[str, int | None]) -> bool:
        """Seed from `TRAFFIC_WEIGHTS` when the table is empty; roles without a version get weight 0.

        Returns whether it seeded. Nothing is seeded while no role with a positive weight has a version,
        so the configured split is still applied once the first version is deployed.
        """
        clean = validate_weights(weights)
        effective = {role: clean[role] if versions.get(role) is not None else 0 for role in ROLES}
        if not any(effective.values()):
            return False
        rows = self._validated(
            Assignment(**{role: Slot(versions.get(role), effective[role]) for role in ROLES})
        )
        with self._engine.begin() as conn:
            if conn.execute(select(traffic_config.c.role).limit(1)).first() is not None:
                return False
            # Another process may seed at the same moment: its rows win, ours are dropped.
            return self._upsert(conn, rows, overwrite=False) > 0

    def _validated(self, assignment: Assignment) -> list[dict]:
        weights = validate_weights(assignment.weights)
        now = self._clock()
        rows = []
        for role, version in assignment.versions.items():
            if version is not None and (
                isinstance(version, bool) or not isinstance(version, int) or version < 0
            ):
                raise InvalidWeights(
                    f"version for {role!r} must be a non-negative integer or None, got {version!r}"
                )
            if version is None and weights[role] > 0:
                raise InvalidWeights(
                    f"role {role!r} has weight {weights[role]} but no version; set its weight to 0"
                )
            rows.append({"role": role, "version": version, "weight": weights[role], "updated_at": now})
        return rows

    def _upsert(self, conn, rows: list[dict], *, overwrite: bool) -> int:
        """Insert or (with `overwrite`) update the rows; returns how many rows were written."""
        dialect = conn.dialect.name
        if dialect in ("postgresql", "sqlite"):
            insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
            stmt = insert(traffic_config).values(rows)  # one multi-row statement: rowcount is exact
            if overwrite:
                stmt = stmt.on_conflict_do_update(
                    index_elements=[traffic_config.c.role],
                    set_={
                        "version": stmt.excluded.version,
                        "weight": stmt.excluded.weight,
                        "updated_at": stmt.excluded.updated_at,
                    },
                )
            else:
                stmt = stmt.on_conflict_do_nothing(index_elements=[traffic_config.c.role])
            return conn.execute(stmt).rowcount
        # Other databases: update what exists, insert the rest (same transaction).
        existing = set(conn.scalars(select(traffic_config.c.role)))
        written = 0
        for row in rows:
            if row["role"] not in existing:
                conn.execute(traffic_config.insert().values(**row))
            elif overwrite:
                conn.execute(
                    traffic_config.update()
                    .where(traffic_config.c.role == row["role"])
                    .values(version=row["version"], weight=row["weight"], updated_at=row["updated_at"])
                )
            else:
                continue
            written += 1
        return written
