"""Late-arriving labels: validated, then upserted (a second label for a request replaces the first)."""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import Engine, case

from control_plane.db.schema import labels
from control_plane.errors import InvalidRequest

MAX_BATCH = 1000
MAX_ID_LEN = 128


def parse_labels(body: Any) -> list[tuple[str, int]]:
    """Accept one `{"request_id", "label"}`, a list of them, or `{"labels": [...]}`; name what is wrong."""
    if isinstance(body, dict) and "labels" in body:
        body = body["labels"]
    items = body if isinstance(body, list) else [body]
    if not items:
        raise InvalidRequest("no labels given: send {'request_id': ..., 'label': 0 or 1} or a list of them")
    if len(items) > MAX_BATCH:
        raise InvalidRequest(f"too many labels in one request: {len(items)} > {MAX_BATCH}")
    out: dict[str, int] = {}
    for i, item in enumerate(items):
        where = f"labels[{i}]" if isinstance(body, list) else "body"
        if not isinstance(item, dict):
            raise InvalidRequest(f"{where} must be an object with request_id and label")
        extra = set(item) - {"request_id", "label"}
        if extra:
            raise InvalidRequest(f"{where} has unknown field(s): {', '.join(sorted(extra))}")
        rid, label = item.get("request_id"), item.get("label")
        if not isinstance(rid, str) or not rid.strip():
            raise InvalidRequest(f"{where}.request_id must be a non-empty string")
        if len(rid) > MAX_ID_LEN:
            raise InvalidRequest(f"{where}.request_id is longer than {MAX_ID_LEN} characters")
        if isinstance(label, bool) or label not in (0, 1):
            raise InvalidRequest(f"{where}.label must be 0 or 1, got {label!r}")
        out[rid] = int(label)  # within one batch the last label for a request wins
    return list(out.items())


def record_labels(engine: Engine, items: list[tuple[str, int]], now: float | None = None) -> int:
    """Upsert labels by request id; returns how many were written."""
    ts = time.time() if now is None else now
    rows = [{"request_id": rid, "label": label, "ts": ts} for rid, label in items]
    if engine.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    stmt = insert(labels)
    # A label sent again unchanged keeps its first arrival: a retry after the attribution window must
    # not make a click that came in time look late (docs/scale.md, labels by attribution window).
    arrival = case((labels.c.label == stmt.excluded.label, labels.c.ts), else_=stmt.excluded.ts)
    stmt = stmt.on_conflict_do_update(
        index_elements=[labels.c.request_id], set_={"label": stmt.excluded.label, "ts": arrival}
    )
    with engine.begin() as conn:
        conn.execute(stmt, rows)
    return len(rows)


class LabelSink:
    """Stores labels; while the database is unreachable they go to an fsync'd file, replayed later."""

    def __init__(self, engine: Engine, spill_dir):
        import os
        import threading
        from pathlib import Path

        self.engine = engine
        self.spill_path = Path(spill_dir) / f"labels-{os.getpid()}.jsonl"
        self._lock = threading.Lock()

    def record(self, items: list[tuple[str, int]]) -> str:
        """'stored' when written to the database, 'spilled' when kept on disk for replay."""
        from sqlalchemy.exc import OperationalError

        now = time.time()
        try:
            self.replay()
            record_labels(self.engine, items, now)
            return "stored"
        except OperationalError:
            self._spill(items, now)
            return "spilled"

    def _spill(self, items: list[tuple[str, int]], now: float) -> None:
        import json
        import os

        self.spill_path.parent.mkdir(parents=True, exist_ok=True)
        with self._lock, self.spill_path.open("a") as f:
            for rid, label in items:
                f.write(json.dumps({"request_id": rid, "label": label, "ts": now}) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def replay(self) -> int:
        """Write every spilled label from any process of this spill dir; files are removed once stored."""
        import json

        done = 0
        with self._lock:
            for path in sorted(self.spill_path.parent.glob("labels-*.jsonl")):
                rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
                for ts in sorted({r["ts"] for r in rows}):
                    record_labels(
                        self.engine, [(r["request_id"], r["label"]) for r in rows if r["ts"] == ts], ts
                    )
                path.unlink()
                done += len(rows)
        return done
