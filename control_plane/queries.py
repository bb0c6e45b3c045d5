"""Every SQL statement about predictions, labels and their aggregates lives here.

- `SqlMetricsSource`: the MetricsSource (metrics_source.py) the control plane reads: bucket rows only.
- `add_request_facts`: what the prediction log's writer runs in each batch's transaction, one merge per
  bucket key (not per row); `insert_predictions` does the same for rows written without a writer.
- `close_label_windows`: the label job: counts outcomes of predictions whose attribution window has
  closed since its watermark.
- `sum_pairs`: the pair job: sums a shadow phase's settled pairs (its copies joined on their pair key
  with the baseline's answers) per bucket, and their outcomes once their windows have closed;
  `raw_pairs` recomputes the same sums from the rows.
- partitions, retention and roll-up statements for retention.py.
- `version_roles`: the Bento's role lookup (bentos/roles.py) in the control plane's `traffic_config`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from sqlalchemy import Connection, Engine, Table, and_, func, insert, select, text

from control_plane.analysis.aggregates import (
    BUCKET_S,
    CORRECT_AT,
    RANKED_ENDPOINT,
    BucketKey,
    LabelFacts,
    LatencyHistogram,
    RequestFacts,
    SparseCounts,
    label_facts,
    outcomes,
    request_facts,
)
from control_plane.analysis.paired import (
    CorrectCounts,
    Moments,
    Pair,
    PairedFacts,
    PairKey,
    paired_facts,
    paired_facts_by_key,
)
from control_plane.analysis.user_level import (
    ArmUsers,
    RankingUsers,
    RatioSums,
    UserKey,
    UserLabelFacts,
    UserRequests,
    user_bucket,
    user_label_facts,
    user_request_facts,
)
from control_plane.db.schema import (
    label_buckets,
    label_watermarks,
    labels,
    pair_buckets,
    pair_label_buckets,
    pair_watermarks,
    predictions,
    request_buckets,
    traffic_config,
    user_clicks,
    user_labels,
    user_requests,
)
from control_plane.metrics_source import SHADOW_ROUTE, WEIGHTED, PairQuery

log = logging.getLogger(__name__)

PARTITION_S = 3600  # Postgres: one `predictions` partition per hour of prediction time
ISSUE_SLACK_S = 60.0  # a prediction's logged time and its id's issue time differ by its latency, at most
CLOSE_SPAN_S = 60  # the label job closes at most this much prediction time per transaction


# --- bucket tables: one generic merge-upsert on a DBAPI cursor ----------------
@dataclass(frozen=True)
class _BucketTable:
    """How one kind of facts is stored: its table, the key columns and how values encode."""

    name: str
    fixed: tuple[str, ...]  # key columns before the bucket key's (label_buckets: window_s)
    values: tuple[str, ...]
    zero: tuple  # the values of a row with nothing in it yet

    @property
    def keys(self) -> tuple[str, ...]:
        return (*self.fixed, "bucket_start", "model_version", "role", "route", "endpoint")


_REQUESTS = _BucketTable("request_buckets", (), ("requests", "errors", "latency"), (0, 0, None))
_LABELS = _BucketTable(
    "label_buckets",
    ("window_s",),
    (
        "closed",
        "positives",
        "correct",
        "log_loss_sum",
        "scores_pos",
        "scores_neg",
        "ranked",
        "click_positions",
    ),
    (0, 0, 0, 0.0, None, None, 0, None),
)


def _encode(facts: RequestFacts | LabelFacts) -> tuple:
    if isinstance(facts, RequestFacts):
        return facts.requests, facts.errors, facts.latency.counts.to_bytes()
    return (
        facts.closed,
        facts.positives,
        facts.correct,
        facts.log_loss_sum,
        facts.scores_pos.to_bytes(),
        facts.scores_neg.to_bytes(),
        facts.ranked,
        facts.click_positions.to_bytes(),
    )


def _blob(value) -> bytes | None:
    return None if value is None else bytes(value)


def _decode_requests(values: Sequence) -> RequestFacts:
    return RequestFacts(
        int(values[0]), int(values[1]), LatencyHistogram(SparseCounts.from_bytes(_blob(values[2])))
    )


def _decode_labels(values: Sequence) -> LabelFacts:
    return LabelFacts(
        int(values[0]),
        int(values[1]),
        int(values[2]),
        float(values[3]),
        SparseCounts.from_bytes(_blob(values[4])),
        SparseCounts.from_bytes(_blob(values[5])),
        int(values[6] or 0),
        SparseCounts.from_bytes(_blob(values[7])),
    )


def _merge_upsert(
    cursor, dialect: str, table: _BucketTable, fixed: tuple, facts: dict, bucket_s: int
) -> None:
    """Add `facts` to their rows in three statements whatever their number: create the missing rows
    empty, lock and read them all, write the sums back.

    Creating first means two writers that meet on a new key both find the row and queue on its lock,
    so neither sum is lost; rows are locked in key order so that two such writers cannot deadlock.
    """
    if len(facts) > 200:  # SQLite allows 32,766 parameters a statement
        ordered = sorted(facts.items())
        for i in range(0, len(ordered), 200):
            _merge_upsert(cursor, dialect, table, fixed, dict(ordered[i : i + 200]), bucket_s)
        return
    mark = "?" if dialect == "sqlite" else "%s"
    keys, values = table.keys, table.values
    ordered = sorted(facts.items())
    key_rows = [(*fixed, *k) for k, _ in ordered]
    columns = (*keys, "bucket_s", *values)
    row_marks = "(" + ", ".join([mark] * len(columns)) + ")"
    key_marks = "(" + ", ".join([mark] * len(keys)) + ")"
    all_rows = ", ".join([row_marks] * len(key_rows))
    cursor.execute(
        f"INSERT INTO {table.name} ({', '.join(columns)}) VALUES {all_rows} ON CONFLICT DO NOTHING",
        [x for kr in key_rows for x in (*kr, bucket_s, *table.zero)],
    )
    lock = "" if dialect == "sqlite" else " FOR UPDATE"
    cursor.execute(
        f"SELECT {', '.join(keys)}, {', '.join(values)} FROM {table.name} "
        f"WHERE ({', '.join(keys)}) IN (VALUES {', '.join([key_marks] * len(key_rows))}) "
        f"ORDER BY {', '.join(keys)}{lock}",
        [x for kr in key_rows for x in kr],
    )
    decode = _decode_requests if table is _REQUESTS else _decode_labels
    stored = {tuple(r[: len(keys)]): decode(r[len(keys) :]) for r in cursor.fetchall()}
    merged = [
        (*kr, bucket_s, *_encode(stored[kr].merge(delta)))
        for kr, (_, delta) in zip(key_rows, ordered, strict=True)
    ]
    cursor.execute(
        f"INSERT INTO {table.name} ({', '.join(columns)}) VALUES {all_rows} "
        f"ON CONFLICT ({', '.join(keys)}) DO UPDATE SET {', '.join(f'{v} = excluded.{v}' for v in values)}",
        [x for row in merged for x in row],
    )


def _insert_buckets(
    cursor, dialect: str, table: _BucketTable, fixed: tuple, facts: dict, bucket_s: int
) -> None:
    """Rows for keys that cannot exist yet, in one statement."""
    mark = "?" if dialect == "sqlite" else "%s"
    columns = (*table.keys, "bucket_s", *table.values)
    rows = [(*fixed, *k, bucket_s, *_encode(f)) for k, f in sorted(facts.items())]
    for i in range(0, len(rows), 100):  # SQLite allows 32,766 parameters a statement
        chunk = rows[i : i + 100]
        marks = ", ".join(["(" + ", ".join([mark] * len(columns)) + ")"] * len(chunk))
        cursor.execute(
            f"INSERT INTO {table.name} ({', '.join(columns)}) VALUES {marks}", [x for r in chunk for x in r]
        )


def first_of_each(rows: Iterable[tuple], inserted_ids) -> list[tuple]:
    """The rows an INSERT ... ON CONFLICT DO NOTHING RETURNING request_id put in: each returned id once
    (a batch can hold a row twice, a replay's and the original)."""
    todo = set(inserted_ids)
    out = []
    for r in rows:
        if r[0] in todo:
            todo.discard(r[0])
            out.append(r)
    return out


def write_buckets(conn: Connection, requests: dict, labels: dict, window_s: float) -> None:
    """Add bucket facts built without raw rows (a benchmark's synthetic window, a backfill)."""
    cursor = conn.connection.cursor()
    if requests:
        _merge_upsert(cursor, conn.dialect.name, _REQUESTS, (), requests, BUCKET_S)
    if labels:
        _merge_upsert(cursor, conn.dialect.name, _LABELS, (int(window_s),), labels, BUCKET_S)


def add_request_facts(cursor, dialect: str, rows: Iterable[tuple], bucket_s: int = BUCKET_S) -> None:
    """Add the requests of prediction-log rows (tuples in the table's column order) to request_buckets,
    on `cursor`'s transaction: call it with exactly the rows that transaction inserted."""
    rows = rows if isinstance(rows, list) else list(rows)
    facts = request_facts(rows)
    if facts:
        _merge_upsert(cursor, dialect, _REQUESTS, (), facts, bucket_s)
    add_user_facts(cursor, dialect, user_request_facts(rows))


_USER_KEYS = ("bucket_start", "user_key", "model_version", "role", "route")


def _add_rows(
    cursor, dialect: str, table: str, keys: tuple, values: tuple, rows: list[tuple], merge: str
) -> None:
    """INSERT ... ON CONFLICT DO UPDATE (an atomic add on both databases), in key order so that two
    writers meeting on the same users lock them in the same order."""
    mark = "?" if dialect == "sqlite" else "%s"
    columns = (*keys, *values)
    rows = sorted(rows)
    for i in range(0, len(rows), 500):  # SQLite allows 32,766 parameters a statement
        chunk = rows[i : i + 500]
        marks = ", ".join(["(" + ", ".join([mark] * len(columns)) + ")"] * len(chunk))
        cursor.execute(
            f"INSERT INTO {table} ({', '.join(columns)}) VALUES {marks} "
            f"ON CONFLICT ({', '.join(keys)}) DO UPDATE SET {merge}",
            [x for r in chunk for x in r],
        )


def add_user_facts(cursor, dialect: str, facts: dict[UserKey, UserRequests]) -> None:
    """Add per-user requests to user_requests (one row per user, arm and bucket in the batch)."""
    if not facts:
        return
    least = "min" if dialect == "sqlite" else "LEAST"
    _add_rows(
        cursor,
        dialect,
        "user_requests",
        _USER_KEYS,
        ("requests", "errors", "first_ts"),
        [(*k.row(), f.requests, f.errors, f.first_ts) for k, f in facts.items()],
        "requests = user_requests.requests + excluded.requests, "
        "errors = user_requests.errors + excluded.errors, "
        f"first_ts = {least}(user_requests.first_ts, excluded.first_ts)",
    )


def add_user_labels(cursor, dialect: str, window_s: int, facts: UserLabelFacts) -> None:
    """Add per-user closed predictions to user_labels, and their clicks per position to user_clicks
    (the label job, beside label_buckets)."""
    if facts.labels:
        _add_rows(
            cursor,
            dialect,
            "user_labels",
            ("window_s", *_USER_KEYS),
            ("closed", "correct", "ranked", "mrr_sum", "ndcg_sum"),
            [
                (window_s, *k.row(), f.closed, f.correct, f.ranked, f.mrr, f.ndcg)
                for k, f in facts.labels.items()
            ],
            ", ".join(
                f"{c} = user_labels.{c} + excluded.{c}"
                for c in ("closed", "correct", "ranked", "mrr_sum", "ndcg_sum")
            ),
        )
    if facts.clicks:
        _add_rows(
            cursor,
            dialect,
            "user_clicks",
            ("window_s", *_USER_KEYS, "position"),
            ("clicks",),
            [(window_s, *k.row(), n) for k, n in facts.clicks.items()],
            "clicks = user_clicks.clicks + excluded.clicks",
        )


_PREDICTION_COLUMNS = tuple(str(c.name) for c in predictions.columns)


def insert_predictions(conn: Connection, rows: list[dict]) -> int:
    """Insert `predictions` rows (dicts) as the writer does: duplicates skipped, aggregates added with them.

    For tests, benchmarks and tools that write rows without a Bento; returns how many went in.
    """
    if not rows:
        return 0
    dialect = conn.dialect.name
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as dialect_insert
    else:
        from sqlalchemy.dialects.sqlite import insert as dialect_insert
    stmt = dialect_insert(predictions).on_conflict_do_nothing().returning(predictions.c.request_id)
    inserted = conn.execute(stmt, rows).scalars().all()
    fresh = first_of_each((tuple(r.get(c) for c in _PREDICTION_COLUMNS) for r in rows), inserted)
    add_request_facts(conn.connection.cursor(), dialect, fresh)
    return len(fresh)


# --- reading: the MetricsSource over SQL --------------------------------------
class SqlMetricsSource:
    """Bucket rows read with one indexed range query each; never a raw prediction."""

    def __init__(self, conn: Connection):
        self.conn = conn

    @staticmethod
    def _where(table, since: float, until: float, version: int | None, route: str | None) -> list:
        # bucket_start < until lets the primary key's range bound the scan; the sum checks the width.
        conds = [
            table.c.bucket_start >= math.ceil(since),
            table.c.bucket_start < until,
            table.c.bucket_start + table.c.bucket_s <= until,
        ]
        if version is not None:
            conds.append(table.c.model_version == version)
        if route is not None:
            conds.append(table.c.route == route)
        return conds

    def _groups(self, table, spec: _BucketTable, conds: list, by) -> dict[object, list]:
        """Rows of `table` per group: each a list of rows (key columns, then the values)."""
        key = [table.c.bucket_start, table.c.model_version, table.c.role, table.c.route, table.c.endpoint]
        columns = ([] if by is None else key) + [getattr(table.c, v) for v in spec.values]
        rows = self.conn.execute(select(*columns).where(*conds).order_by(table.c.bucket_start)).all()
        if by is None:
            return {None: [tuple(r) for r in rows]} if rows else {}
        groups: dict[object, list] = {}
        for r in rows:
            groups.setdefault(by(BucketKey._make(r[:5])), []).append(tuple(r[5:]))
        return groups

    def requests(self, since, until, *, by=None, version=None, route=WEIGHTED):
        t = request_buckets
        return {
            g: RequestFacts(
                sum(r[0] for r in rows),
                sum(r[1] for r in rows),
                LatencyHistogram(_summed(rows, 2)),
            )
            for g, rows in self._groups(
                t, _REQUESTS, self._where(t, since, until, version, route), by
            ).items()
        }

    def labels(self, since, until, window_s, *, by=None, version=None, route=WEIGHTED):
        t = label_buckets
        conds = [t.c.window_s == int(window_s), *self._where(t, since, until, version, route)]
        return {
            g: LabelFacts(
                closed=sum(r[0] for r in rows),
                positives=sum(r[1] for r in rows),
                correct=sum(r[2] for r in rows),
                log_loss_sum=float(sum(r[3] for r in rows)),
                scores_pos=_summed(rows, 4),
                scores_neg=_summed(rows, 5),
                ranked=sum(int(r[6] or 0) for r in rows),
                click_positions=_summed(rows, 7),
            )
            for g, rows in self._groups(t, _LABELS, conds, by).items()
        }

    def pairs(self, query: PairQuery) -> PairedFacts:
        """The paired sums of the shadow's copies logged in [since, until) (its whole buckets, as the arms'
        own counts read them) joined on their pair key with the baseline's live answers to the same
        requests (analysis/paired.py), with the accuracy difference of the buckets whose attribution
        window (`window_s`) closed before `labels_before`.

        Two grouped sums over the bucket tables the pair job (`sum_pairs`) keeps: their cost follows
        the window's buckets, not the mirrored requests served. `raw_pairs` computes the same from the
        rows."""
        window_s = int(query.window_s)
        pb, lb = pair_buckets, pair_label_buckets
        row = self.conn.execute(
            select(*(func.sum(getattr(pb.c, c)) for c in _PAIR_VALUES)).where(*_pair_conds(pb, query))
        ).one()
        counts = self.conn.execute(
            select(
                func.sum(lb.c.labelled), func.sum(lb.c.shadow_only_right), func.sum(lb.c.baseline_only_right)
            ).where(
                lb.c.window_s == window_s,
                *_pair_conds(lb, query),
                # every baseline answer of the bucket had its window closed (as `raw_pairs` per pair)
                lb.c.bucket_start <= query.labels_before - BUCKET_S - window_s,
            )
        ).one()
        correct = CorrectCounts(*(int(x or 0) for x in counts))
        return _decode_pairs(row, correct.moments)

    def users(
        self,
        since: float,
        until: float,
        window_s: float,
        *,
        step_start: float,
        route: str | None = WEIGHTED,
        ctr_k: int | None = None,
    ) -> dict[tuple[int, str], ArmUsers]:
        """Per (version, role): its users in [since, until) (user buckets from the one holding `since`),
        their requests, how many were first seen (in any arm) at or after `step_start`, the sums of
        their closed and correct predictions for the user-level accuracy, and of their closed /recommend
        exposures for the ranking metrics (MRR, NDCG, and CTR at `ctr_k`; None: no ranking sums, an
        accuracy policy's read, which then costs what it did before them). Grouped queries over the
        per-user tables: the cost follows the users active in the window, not their requests."""
        p = {"lo": user_bucket(since), "hi": until, "route": route, "w": int(window_s)}
        route_cond = "" if route is None else " AND route = :route"
        where = f"bucket_start >= :lo AND bucket_start < :hi{route_cond}"
        out: dict[tuple[int, str], dict] = {}
        for version, role, users, requests in self.conn.execute(
            text(
                "SELECT model_version, role, COUNT(*), SUM(r) FROM (SELECT user_key, model_version, role, "
                f"SUM(requests) AS r FROM user_requests WHERE {where} GROUP BY user_key, model_version, role) t "
                "GROUP BY model_version, role"
            ),
            p,
        ):
            out[(int(version), role)] = {"users": int(users), "requests": int(requests or 0)}
        for version, role, new in self.conn.execute(
            text(
                "SELECT u.model_version, u.role, COUNT(DISTINCT u.user_key) FROM user_requests u JOIN "
                f"(SELECT user_key, MIN(first_ts) AS ft FROM user_requests WHERE {where} GROUP BY user_key "
                "HAVING MIN(first_ts) >= :step) f ON u.user_key = f.user_key AND u.first_ts = f.ft "
                f"WHERE u.bucket_start >= :lo AND u.bucket_start < :hi{'' if route is None else ' AND u.route = :route'} "
                "GROUP BY u.model_version, u.role"
            ),
            {**p, "step": float(step_start)},
        ):
            out.setdefault((int(version), role), {"users": 0, "requests": 0})["new_users"] = int(new)
        for version, role, k, n, y, nn, yy, yn in self.conn.execute(
            text(
                "SELECT model_version, role, COUNT(*), SUM(n), SUM(c), SUM(n * n), SUM(c * c), SUM(c * n) "
                "FROM (SELECT user_key, model_version, role, SUM(closed) AS n, SUM(correct) AS c "
                f"FROM user_labels WHERE window_s = :w AND {where} GROUP BY user_key, model_version, role) t "
                "WHERE n > 0 GROUP BY model_version, role"
            ),
            p,
        ):
            sums = RatioSums(int(k), float(n), float(y), float(nn), float(yy), float(yn))
            out.setdefault((int(version), role), {"users": 0, "requests": 0})["accuracy"] = sums
        for key, ranking in ({} if ctr_k is None else self._user_ranking(where, p, ctr_k)).items():
            out.setdefault(key, {"users": 0, "requests": 0})["ranking"] = ranking
        return {key: ArmUsers(**values) for key, values in out.items()}

    def _user_ranking(self, where: str, p: dict, k: int) -> dict[tuple[int, str], RankingUsers]:
        """Per (version, role): the per-user sums of the ranking metrics over the users with a closed
        exposure (n_i their exposures), and their clicks per position."""
        per_user = (
            "SELECT user_key, model_version, role, SUM(ranked) AS n, SUM(mrr_sum) AS m, SUM(ndcg_sum) AS g "
            f"FROM user_labels WHERE window_s = :w AND {where} GROUP BY user_key, model_version, role"
        )
        found: dict[tuple[int, str], dict] = {}
        for version, role, users, n, nn, m, mm, mn, g, gg, gn in self.conn.execute(
            text(
                "SELECT model_version, role, COUNT(*), SUM(n), SUM(n * n), SUM(m), SUM(m * m), SUM(m * n), "
                f"SUM(g), SUM(g * g), SUM(g * n) FROM ({per_user}) t WHERE n > 0 GROUP BY model_version, role"
            ),
            p,
        ):
            base = (int(users), float(n))
            found[(int(version), role)] = {
                "k": int(k),
                "mrr": RatioSums(*base, float(m), float(nn), float(mm), float(mn)),
                "ndcg": RatioSums(*base, float(g), float(nn), float(gg), float(gn)),
                "ctr": RatioSums(*base, 0.0, float(nn), 0.0, 0.0),
            }
        if not found:
            return {}
        for version, role, y, yy, yn in self.conn.execute(
            text(
                "SELECT t.model_version, t.role, SUM(c.y), SUM(c.y * c.y), SUM(c.y * t.n) "
                f"FROM ({per_user}) t JOIN (SELECT user_key, model_version, role, SUM(clicks) AS y "
                f"FROM user_clicks WHERE window_s = :w AND position <= :k AND {where} "
                "GROUP BY user_key, model_version, role) c "
                "ON c.user_key = t.user_key AND c.model_version = t.model_version AND c.role = t.role "
                "WHERE t.n > 0 GROUP BY t.model_version, t.role"
            ),
            {**p, "k": int(k)},
        ):
            arm = found.get((int(version), role))
            if arm is not None:
                arm["ctr"] = dataclasses.replace(arm["ctr"], y=float(y), yy=float(yy), yn=float(yn))
        positions: dict[tuple[int, str], list[tuple[int, int]]] = {}
        for version, role, position, clicks in self.conn.execute(
            text(
                "SELECT model_version, role, position, SUM(clicks) FROM user_clicks "
                f"WHERE window_s = :w AND {where} GROUP BY model_version, role, position"
            ),
            p,
        ):
            positions.setdefault((int(version), role), []).append((int(position), int(clicks)))
        for key, arm in found.items():
            pc = sorted(positions.get(key, []))
            arm["clicks"] = SparseCounts([q for q, _ in pc], [c for _, c in pc])
        return {key: RankingUsers(**arm) for key, arm in found.items()}


def _summed(rows: list[tuple], column: int) -> SparseCounts:
    """The sum of one blob column over rows: their bytes joined, decoded once."""
    return SparseCounts.summed(b"".join(bytes(r[column]) for r in rows if r[column]))


# --- the label job ------------------------------------------------------------
def _lock_watermark(conn: Connection, window_s: int, start_at: float) -> float:
    """The window's watermark, created at `start_at` if new, locked until the transaction ends."""
    dialect = conn.dialect.name
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as dialect_insert
    else:
        from sqlalchemy.dialects.sqlite import insert as dialect_insert
    # The insert also takes SQLite's write lock first, so two jobs never read the same watermark.
    conn.execute(
        dialect_insert(label_watermarks)
        .values(window_s=window_s, closed_until=float(start_at))
        .on_conflict_do_nothing()
    )
    q = select(label_watermarks.c.closed_until).where(label_watermarks.c.window_s == window_s)
    if dialect == "postgresql":
        q = q.with_for_update()
    return float(conn.execute(q).scalar_one())


def _closed_facts(
    conn: Connection, window_s: int, start: float, end: float
) -> tuple[dict[BucketKey, LabelFacts], UserLabelFacts]:
    """Outcomes of the served predictions of [start, end), each joined to its label (if any): per
    bucket key, and per user key for the rows that named a user."""
    p, lab = predictions, labels
    # Only labels whose id was issued in the span (or, for an id of another form, that arrived while a
    # prediction of the span could still count them) can match: on Postgres this prunes the labels'
    # partitions to the span's hour or two, whatever the retention window holds.
    joined = and_(
        lab.c.request_id == p.c.request_id,
        lab.c.issued_ts >= start - ISSUE_SLACK_S,
        lab.c.issued_ts < end + window_s + ISSUE_SLACK_S,
    )
    rows = conn.execute(
        select(
            p.c.ts,
            p.c.model_version,
            p.c.role,
            p.c.route,
            p.c.endpoint,
            p.c.score,
            lab.c.label,
            lab.c.ts,
            p.c.user_key,
            lab.c.position,
        )
        .select_from(p.outerjoin(lab, joined))
        .where(p.c.ts >= start, p.c.ts < end, p.c.status < 500, p.c.score.is_not(None))
    ).all()
    if not rows:
        return {}, UserLabelFacts()
    cols = list(zip(*rows, strict=True))
    ts = np.asarray(cols[0], dtype=float)
    starts = ((ts // BUCKET_S) * BUCKET_S).astype(np.int64).tolist()
    keys = zip(starts, cols[1], cols[2], cols[3], cols[4], strict=True)
    label = np.asarray([np.nan if x is None else x for x in cols[6]], dtype=float)
    label_ts = np.asarray([np.nan if x is None else x for x in cols[7]], dtype=float)
    scores = np.asarray(cols[5], dtype=float)
    outcome = outcomes(ts, label, label_ts, window_s)
    position = np.asarray([np.nan if x is None else x for x in cols[9]], dtype=float)
    facts = label_facts(keys, scores, outcome, position)
    users = [i for i, u in enumerate(cols[8]) if u is not None]
    # a click counts where it counts in label_facts: a /recommend exposure's, within the window
    clicked = np.where((outcome == 1) & (np.nan_to_num(position) >= 1), np.nan_to_num(position), 0)
    user_facts = user_label_facts(
        (UserKey(user_bucket(ts[i]), cols[8][i], cols[1][i], cols[2][i], cols[3][i]) for i in users),
        ((scores[i] >= CORRECT_AT) == bool(outcome[i]) for i in users),
        (cols[4][i] == RANKED_ENDPOINT for i in users),
        (int(clicked[i]) for i in users),
    )
    return facts, user_facts


def close_label_windows(
    engine: Engine,
    *,
    window_s: float,
    now: float,
    settle_s: float,
    start_at: float,
    span_s: float = CLOSE_SPAN_S,
) -> int:
    """Count the outcomes of every prediction whose attribution window closed since the watermark.

    A prediction made at t closes at t + window_s (and no sooner than the log's settling): positive if
    a positive label arrived by then, negative otherwise. Each step is one transaction that holds the
    watermark's lock, adds at most `span_s` of prediction time to label_buckets and moves the watermark:
    its cost is the predictions newly closed, a second run finds nothing to do, and two runs at once
    take turns. Predictions written after the watermark passed their time (a replay after a long
    outage) are left out of label metrics; labels stored after the count are kept but never change it.
    Returns how many predictions were counted.
    """
    window = int(window_s)
    cutoff = math.floor(min(now - settle_s, now - window) / BUCKET_S) * BUCKET_S
    start = math.floor(start_at / BUCKET_S) * BUCKET_S
    counted = 0
    while True:
        with engine.begin() as conn:
            mark = _lock_watermark(conn, window, start)
            if mark >= cutoff:
                return counted
            end = min(cutoff, mark + span_s)
            facts, user_facts = _closed_facts(conn, window, mark, end)
            if facts:  # spans are whole buckets, each closed once: new rows, nothing to merge
                _insert_buckets(
                    conn.connection.cursor(), conn.dialect.name, _LABELS, (window,), facts, BUCKET_S
                )
            # a user's bucket spans several spans: these are added to
            add_user_labels(conn.connection.cursor(), conn.dialect.name, window, user_facts)
            conn.execute(
                label_watermarks.update()
                .where(label_watermarks.c.window_s == window)
                .values(closed_until=end)
            )
            counted += sum(f.closed for f in facts.values())


# --- the pair job -------------------------------------------------------------
# A bucket's pairs are summed once the log has settled (`settle_s`: how late a logged row lands after
# its time) this much more past the bucket's end: a shadow copy and the live request it copies reach
# their Bentos milliseconds apart (Traefik sends the copy as it forwards the request), so the copy's
# partner is logged by then too. Kept small: the shadow decision's pairs lag its arms' counts by it.
PAIR_SLACK_S = 0.5
PAIRS_PART = -1  # pair_watermarks.window_s of pair_buckets (the sums that need no label)
_PAIR_VALUES = (
    "pairs",
    "scored",
    "score_sum",
    "score_squares",
    "score_abs_sum",
    "latency_sum",
    "latency_squares",
    "shadow_slower",
    "both_errors",
    "shadow_only_errors",
    "baseline_only_errors",
    "ranked",
    "overlap_sum",
)


def _pair_conds(table: Table, query: PairQuery) -> list:
    """The rows of a pair table (`pair_buckets`, `pair_label_buckets`) of the query's versions and whole
    buckets."""
    lo, hi = query.whole_buckets()
    return [
        table.c.shadow_version == query.shadow_version,
        table.c.baseline_version == query.baseline_version,
        table.c.bucket_start >= lo,
        table.c.bucket_start < hi,
    ]


def _encode_pairs(f: PairedFacts) -> dict:
    sd, ld = f.score_diff, f.latency_diff
    return dict(
        zip(
            _PAIR_VALUES,
            (f.pairs, sd.n, sd.total, sd.squares, f.score_abs_diff, ld.total, ld.squares, f.shadow_slower,
             f.both_errors, f.shadow_only_errors, f.baseline_only_errors, f.ranked, f.overlap_sum),
            strict=True,
        )
    )  # fmt: skip


def _decode_pairs(row: Sequence, correct: Moments) -> PairedFacts:
    """PairedFacts from the sums of `_PAIR_VALUES` (None: no row) and the labelled pairs' moments."""
    v = dict(zip(_PAIR_VALUES, (0 if x is None else x for x in row), strict=True))
    pairs = int(v["pairs"])
    return PairedFacts(
        pairs=pairs,
        score_diff=Moments(int(v["scored"]), float(v["score_sum"]), float(v["score_squares"])),
        score_abs_diff=float(v["score_abs_sum"]),
        latency_diff=Moments(pairs, float(v["latency_sum"]), float(v["latency_squares"])),
        shadow_slower=int(v["shadow_slower"]),
        both_errors=int(v["both_errors"]),
        shadow_only_errors=int(v["shadow_only_errors"]),
        baseline_only_errors=int(v["baseline_only_errors"]),
        ranked=int(v["ranked"]),
        overlap_sum=float(v["overlap_sum"]),
        correct_diff=correct,
    )


@dataclass(frozen=True)
class _PairRow:
    """One shadow copy joined with the baseline's answer to the same request (and its label, if read)."""

    shadow_ts: float
    baseline_ts: float
    pair: Pair  # its outcome not set
    label: int | None = None
    label_ts: float | None = None

    def outcome(self, window_s: float) -> int:
        """1 when a positive label arrived within the baseline request's attribution window (`outcomes`)."""
        return int(self.label == 1 and self.label_ts <= self.baseline_ts + window_s)


def _pair_rows(
    conn: Connection, shadow_version: int, baseline_version: int, lo: float, hi: float, *, with_labels: bool
) -> list[_PairRow]:
    """The shadow's copies logged in [lo, hi) joined on their pair key with the baseline's live answers,
    and with the baseline request's label when `with_labels`.

    A read of raw rows, for the pair job's new buckets and for `raw_pairs`: the shadow's rows of the
    span (by `ix_predictions_version_ts`, and on Postgres only the span's partitions), each joined by
    `ix_predictions_pair_key` (partial: rows outside a shadow phase have no key)."""
    s, b = predictions.alias("s"), predictions.alias("b")
    columns = [s.c.ts, b.c.ts, s.c.score, b.c.score, s.c.latency_ms, b.c.latency_ms, s.c.status, b.c.status,
               s.c.served, b.c.served]  # fmt: skip
    joined = s.join(b, b.c.pair_key == s.c.pair_key)
    if with_labels:
        columns += [labels.c.label, labels.c.ts]
        joined = joined.outerjoin(
            labels,
            and_(
                labels.c.request_id == b.c.request_id,
                labels.c.issued_ts >= lo - 2 * ISSUE_SLACK_S,
                labels.c.issued_ts < hi + 2 * ISSUE_SLACK_S,
            ),
        )
    rows = conn.execute(
        select(*columns)
        .select_from(joined)
        .where(
            s.c.model_version == shadow_version,
            s.c.route == SHADOW_ROUTE,
            s.c.ts >= lo,
            s.c.ts < hi,
            s.c.pair_key.is_not(None),
            b.c.pair_key.is_not(None),  # lets the planner use the partial index for the join
            # (SQLite would rather range-scan the baseline's rows by version and time for each copy:
            # quadratic in the span's copies; its version is only filtered on, not looked up)
            (b.c.model_version + 0 if conn.dialect.name == "sqlite" else b.c.model_version)
            == baseline_version,
            b.c.route == WEIGHTED,
            # the copy leaves Traefik with the live request: their times differ by latencies at most
            b.c.ts >= lo - ISSUE_SLACK_S,
            b.c.ts < hi + ISSUE_SLACK_S,
        )
    ).all()
    return [
        _PairRow(
            float(r[0]),
            float(r[1]),
            Pair(
                shadow_score=r[2],
                baseline_score=r[3],
                shadow_latency_ms=float(r[4]),
                baseline_latency_ms=float(r[5]),
                shadow_status=int(r[6]),
                baseline_status=int(r[7]),
                shadow_served=None if r[8] is None else tuple(r[8]),
                baseline_served=None if r[9] is None else tuple(r[9]),
            ),
            *((r[10], r[11]) if with_labels else ()),
        )
        for r in rows
    ]


def raw_pairs(conn: Connection, query: PairQuery) -> PairedFacts:
    """`SqlMetricsSource.pairs` recomputed from the raw rows: every pair of the window's whole buckets,
    each baseline request's outcome counted once its window closed before `labels_before`.

    Its cost grows with the mirrored requests of the window: for checks and recomputation, never on
    the evaluation's path."""
    lo, hi = query.whole_buckets()
    window_s = query.window_s
    rows = _pair_rows(conn, query.shadow_version, query.baseline_version, lo, hi, with_labels=True)
    return paired_facts(
        dataclasses.replace(
            r.pair, outcome=None if r.baseline_ts + window_s > query.labels_before else r.outcome(window_s)
        )
        for r in rows
    )


def _lock_pair_watermark(
    conn: Connection, shadow_version: int, baseline_version: int, part: int, start: float
) -> float:
    """The part's watermark, locked until the transaction ends: created at `start` if new, moved up to
    it if behind (no pair before `start` is read: the shadow phase begins there)."""
    dialect = conn.dialect.name
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as dialect_insert
    else:
        from sqlalchemy.dialects.sqlite import insert as dialect_insert
    w = pair_watermarks
    key = (
        w.c.shadow_version == shadow_version,
        w.c.baseline_version == baseline_version,
        w.c.window_s == part,
    )
    # The insert also takes SQLite's write lock first, so two jobs never read the same watermark.
    conn.execute(
        dialect_insert(w)
        .values(
            shadow_version=shadow_version,
            baseline_version=baseline_version,
            window_s=part,
            summed_until=start,
        )
        .on_conflict_do_nothing()
    )
    q = select(w.c.summed_until).where(*key)
    if dialect == "postgresql":
        q = q.with_for_update()
    mark = float(conn.execute(q).scalar_one())
    if mark < start:
        conn.execute(w.update().where(*key).values(summed_until=start))
        mark = start
    return mark


def _insert_pair_facts(conn: Connection, part: int, facts: dict[PairKey, PairedFacts]) -> None:
    """New rows (each bucket is summed once, under its watermark's lock)."""
    keys = [
        {"bucket_start": k.start, "shadow_version": k.shadow_version, "baseline_version": k.baseline_version}
        for k in facts
    ]
    if part == PAIRS_PART:
        rows = [{**k, **_encode_pairs(f)} for k, f in zip(keys, facts.values(), strict=True)]
        conn.execute(insert(pair_buckets), rows)
        return
    rows = [
        {**k, "window_s": part, **dataclasses.asdict(CorrectCounts.of(f.correct_diff))}
        for k, f in zip(keys, facts.values(), strict=True)
        if f.correct_diff.n
    ]
    if rows:
        conn.execute(insert(pair_label_buckets), rows)


def sum_pairs(
    engine: Engine,
    *,
    shadow_version: int,
    baseline_version: int,
    window_s: float,
    now: float,
    settle_s: float,
    start_at: float,
    span_s: float = CLOSE_SPAN_S,
) -> int:
    """The pair job: add to pair_buckets every bucket of shadow copies whose pairs are all logged
    (`settle_s` and PAIR_SLACK_S past its end), and to pair_label_buckets every bucket whose baseline
    answers' attribution window (`window_s`) has closed too.

    Each part has its watermark, from `start_at` (the shadow phase's start); each step is one transaction
    that holds it, sums at most `span_s` of the shadow's time and moves it: the cost follows the copies
    newly settled, a second run finds nothing to do, and two runs at once take turns. Copies written
    after the watermark passed their time (a replay after a long outage) are left out, as by the label
    job. Returns how many pairs were added to pair_buckets.
    """
    ready = now - settle_s - PAIR_SLACK_S
    start = math.floor(start_at / BUCKET_S) * BUCKET_S
    added = 0
    for part, until in ((PAIRS_PART, ready), (int(window_s), ready - window_s)):
        cutoff = math.floor(until / BUCKET_S) * BUCKET_S
        while True:
            with engine.begin() as conn:
                mark = _lock_pair_watermark(conn, shadow_version, baseline_version, part, start)
                if mark >= cutoff:
                    break
                end = min(cutoff, mark + span_s)
                rows = _pair_rows(
                    conn, shadow_version, baseline_version, mark, end, with_labels=part != PAIRS_PART
                )
                facts = paired_facts_by_key(
                    (
                        PairKey(int(r.shadow_ts // BUCKET_S * BUCKET_S), shadow_version, baseline_version),
                        r.pair
                        if part == PAIRS_PART
                        else dataclasses.replace(r.pair, outcome=r.outcome(part)),
                    )
                    for r in rows
                )
                if facts:
                    _insert_pair_facts(conn, part, facts)
                conn.execute(
                    pair_watermarks.update()
                    .where(
                        pair_watermarks.c.shadow_version == shadow_version,
                        pair_watermarks.c.baseline_version == baseline_version,
                        pair_watermarks.c.window_s == part,
                    )
                    .values(summed_until=end)
                )
                if part == PAIRS_PART:
                    added += len(rows)
    return added


def pair_watermark(
    conn: Connection, shadow_version: int, baseline_version: int, window_s: int = PAIRS_PART
) -> float | None:
    w = pair_watermarks
    q = select(w.c.summed_until).where(
        w.c.shadow_version == shadow_version,
        w.c.baseline_version == baseline_version,
        w.c.window_s == window_s,
    )
    return conn.execute(q).scalar()


def label_watermark(conn: Connection, window_s: float) -> float | None:
    q = select(label_watermarks.c.closed_until).where(label_watermarks.c.window_s == int(window_s))
    return conn.execute(q).scalar()


def oldest_watermark(conn: Connection) -> float | None:
    return conn.execute(select(func.min(label_watermarks.c.closed_until))).scalar()


def prediction_count(conn: Connection, *, since: float = 0.0) -> int:
    return int(
        conn.execute(select(func.count()).select_from(predictions).where(predictions.c.ts >= since)).scalar()
    )


def earliest_prediction(conn: Connection) -> float | None:
    return conn.execute(select(func.min(predictions.c.ts))).scalar()


# --- partitions (Postgres) ----------------------------------------------------
# `predictions` by `ts` and `labels` by `issued_ts` (the time of the prediction a label is for), one
# partition an hour each, so retention drops a prediction and its label together.
PARTITIONED = ("predictions", "labels")


def partition_name(start: int, table: str = "predictions") -> str:
    return f"{table}_p{start}"


def partitioned(conn: Connection, table: str) -> bool:
    if conn.dialect.name != "postgresql" or table not in PARTITIONED:
        return False
    q = text("SELECT c.relkind FROM pg_class c WHERE c.oid = to_regclass(:t)")
    return conn.execute(q, {"t": table}).scalar() == "p"


def predictions_partitioned(conn: Connection) -> bool:
    return partitioned(conn, "predictions")


def partition_starts(conn: Connection, table: str = "predictions") -> list[int]:
    """Starts of the hourly partitions of `table` (the default partition is not listed)."""
    rows = conn.execute(
        text(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
            "WHERE i.inhparent = to_regclass(:t)"
        ),
        {"t": table},
    ).scalars()
    prefix = f"{table}_p"
    return sorted(int(n.removeprefix(prefix)) for n in rows if n.startswith(prefix))


def create_partitions(conn: Connection, since: float, until: float, table: str = "predictions") -> list[int]:
    """Hourly partitions of `table` covering [since, until) that do not exist yet; returns their starts."""
    assert table in PARTITIONED
    have = set(partition_starts(conn, table))
    made = []
    start = int(since // PARTITION_S) * PARTITION_S
    while start < until:
        if start not in have:
            conn.execute(
                text(
                    f"CREATE TABLE IF NOT EXISTS {partition_name(start, table)} PARTITION OF {table} "
                    f"FOR VALUES FROM ({start}) TO ({start + PARTITION_S})"
                )
            )
            made.append(start)
        start += PARTITION_S
    return made


def drop_partitions_before(conn: Connection, cutoff: float, table: str = "predictions") -> list[int]:
    """Drop every hourly partition of `table` that ends at or before `cutoff`; returns their starts."""
    assert table in PARTITIONED
    dropped = [s for s in partition_starts(conn, table) if s + PARTITION_S <= cutoff]
    for start in dropped:
        conn.execute(text(f"DROP TABLE IF EXISTS {partition_name(start, table)}"))
    return dropped


PARTITIONED_PREDICTIONS_DDL = (
    "CREATE TABLE predictions ("
    " request_id VARCHAR(128) NOT NULL, ts DOUBLE PRECISION NOT NULL, model_version INTEGER NOT NULL,"
    " role VARCHAR(32) NOT NULL DEFAULT 'unknown', route VARCHAR(16) NOT NULL DEFAULT 'direct',"
    " endpoint VARCHAR(16) NOT NULL, features JSON, score DOUBLE PRECISION, latency_ms DOUBLE PRECISION NOT NULL,"
    " status SMALLINT NOT NULL, PRIMARY KEY (request_id, ts)"
    ") PARTITION BY RANGE (ts)"
)

PARTITIONED_LABELS_DDL = (
    "CREATE TABLE labels ("
    " request_id VARCHAR(128) NOT NULL, label SMALLINT NOT NULL, ts DOUBLE PRECISION NOT NULL,"
    " issued_ts DOUBLE PRECISION NOT NULL, PRIMARY KEY (request_id, issued_ts)"
    ") PARTITION BY RANGE (issued_ts)"
)


# --- retention ----------------------------------------------------------------
def delete_predictions_before(conn: Connection, cutoff: float, batch: int) -> int:
    """SQLite: delete up to `batch` of the oldest predictions before `cutoff` (one short write lock)."""
    ids = select(predictions.c.request_id).where(predictions.c.ts < cutoff).limit(batch).scalar_subquery()
    return conn.execute(predictions.delete().where(predictions.c.request_id.in_(ids))).rowcount


def delete_labels_before(conn: Connection, cutoff: float, batch: int) -> int:
    """SQLite: delete up to `batch` labels of predictions before `cutoff` (by the time their id was issued,
    so a label goes with its prediction)."""
    ids = select(labels.c.request_id).where(labels.c.issued_ts < cutoff).limit(batch).scalar_subquery()
    return conn.execute(labels.delete().where(labels.c.request_id.in_(ids))).rowcount


def delete_buckets_before(conn: Connection, cutoff: float) -> int:
    n = conn.execute(request_buckets.delete().where(request_buckets.c.bucket_start < cutoff)).rowcount
    return n + conn.execute(label_buckets.delete().where(label_buckets.c.bucket_start < cutoff)).rowcount


def delete_pair_buckets_before(conn: Connection, cutoff: float) -> int:
    """Paired sums serve a shadow phase's decisions only: kept as long as the fine buckets (and never
    an open rollout's: the caller's cutoff), then deleted, not rolled up."""
    n = conn.execute(pair_buckets.delete().where(pair_buckets.c.bucket_start < cutoff)).rowcount
    return (
        n
        + conn.execute(pair_label_buckets.delete().where(pair_label_buckets.c.bucket_start < cutoff)).rowcount
    )


def delete_user_buckets_before(conn: Connection, cutoff: float) -> int:
    n = conn.execute(user_requests.delete().where(user_requests.c.bucket_start < cutoff)).rowcount
    n += conn.execute(user_clicks.delete().where(user_clicks.c.bucket_start < cutoff)).rowcount
    return n + conn.execute(user_labels.delete().where(user_labels.c.bucket_start < cutoff)).rowcount


def roll_up(conn: Connection, before: float, coarse_s: int, limit: int = 5000) -> int:
    """Merge up to `limit` fine bucket rows older than `before` into `coarse_s` buckets; returns how many.

    Fine rows are deleted and their sums added to the coarse rows in the same transaction, so a read
    sees either the fine rows or the coarse ones, never both.
    """
    moved = 0
    cursor = conn.connection.cursor()
    for table, spec in ((request_buckets, _REQUESTS), (label_buckets, _LABELS)):
        rows = conn.execute(
            select(table).where(table.c.bucket_s < coarse_s, table.c.bucket_start < before).limit(limit)
        ).all()
        groups: dict[tuple, dict] = {}
        for r in rows:
            fixed = (r.window_s,) if spec is _LABELS else ()
            key = BucketKey(
                int(r.bucket_start // coarse_s * coarse_s), r.model_version, r.role, r.route, r.endpoint
            )
            values = tuple(getattr(r, v) for v in spec.values)
            facts = _decode_requests(values) if spec is _REQUESTS else _decode_labels(values)
            group = groups.setdefault(fixed, {})
            group[key] = facts if key not in group else group[key].merge(facts)
            where = [getattr(table.c, k) == getattr(r, k) for k in spec.keys]
            conn.execute(table.delete().where(*where))
        for fixed, facts in groups.items():
            _merge_upsert(cursor, conn.dialect.name, spec, fixed, facts, coarse_s)
        moved += len(rows)
    return moved


def bucket_bytes(conn: Connection) -> dict[str, int]:
    """Bytes on disk of each aggregate table and of predictions (Postgres; SQLite: dbstat if compiled)."""
    names = ("predictions", "labels", "request_buckets", "label_buckets")
    if conn.dialect.name == "postgresql":
        q = text(
            "SELECT COALESCE(SUM(pg_total_relation_size(c.oid)), 0) FROM pg_class c WHERE c.oid = to_regclass(:n) "
            "OR c.oid IN (SELECT inhrelid FROM pg_inherits WHERE inhparent = to_regclass(:n))"
        )
        return {n: int(conn.execute(q, {"n": n}).scalar()) for n in names}
    out = {}
    for n in names:
        try:
            out[n] = int(
                conn.execute(
                    text(
                        "SELECT SUM(pgsize) FROM dbstat WHERE name IN (SELECT name FROM sqlite_master WHERE tbl_name = :n)"
                    ),
                    {"n": n},
                ).scalar()
                or 0
            )
        except Exception:  # dbstat is a compile-time option of SQLite
            out[n] = -1
    return out


def count_rows(conn: Connection, table_name: str) -> int:
    table = {"request_buckets": request_buckets, "label_buckets": label_buckets, "labels": labels}[table_name]
    return int(conn.execute(select(func.count()).select_from(table)).scalar())


def insert_labels_rows(conn: Connection, rows: list[dict]) -> None:
    """Labels as stored rows (tests and benchmarks that stamp their own arrival times)."""
    if rows:
        conn.execute(insert(labels), rows)


def version_roles(conn: Connection, version: int) -> list[tuple[str, int]]:
    """(role, weight) of every `traffic_config` row naming `version`: what a Bento reads to know its role."""
    stmt = select(traffic_config.c.role, traffic_config.c.weight).where(traffic_config.c.version == version)
    return [(r.role, r.weight) for r in conn.execute(stmt)]
