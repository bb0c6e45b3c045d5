"""aggregates: request_buckets, label_buckets, label_watermarks; predictions partitioned by hour on Postgres

Existing predictions are summed into request_buckets here (read in chunks of an hour of prediction
time). On Postgres `predictions` becomes a table partitioned by range of `ts` (one partition an hour,
a default partition for anything outside them), its primary key (request_id, ts); the existing rows
are copied into it, so the migration takes about as long as copying the table (docs/scale.md).

Revision ID: 0002
Revises: 0001
"""

import time

import sqlalchemy as sa
from alembic import op

from control_plane import queries
from control_plane.analysis.aggregates import COARSE_BUCKET_S

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

AHEAD_S = 24 * 3600


def _key_columns() -> list:
    return [
        sa.Column("bucket_start", sa.BigInteger, primary_key=True),
        sa.Column("model_version", sa.Integer, primary_key=True),
        sa.Column("role", sa.String(32), primary_key=True),
        sa.Column("route", sa.String(16), primary_key=True),
        sa.Column("endpoint", sa.String(16), primary_key=True),
        sa.Column("bucket_s", sa.Integer, nullable=False),
    ]


def upgrade() -> None:
    op.create_table(
        "request_buckets",
        *_key_columns(),
        sa.Column("requests", sa.BigInteger, nullable=False),
        sa.Column("errors", sa.BigInteger, nullable=False),
        sa.Column("latency", sa.LargeBinary, nullable=True),
    )
    op.create_table(
        "label_buckets",
        sa.Column("window_s", sa.Integer, primary_key=True),
        *_key_columns(),
        sa.Column("closed", sa.BigInteger, nullable=False),
        sa.Column("positives", sa.BigInteger, nullable=False),
        sa.Column("correct", sa.BigInteger, nullable=False),
        sa.Column("log_loss_sum", sa.Float, nullable=False),
        sa.Column("scores_pos", sa.LargeBinary, nullable=True),
        sa.Column("scores_neg", sa.LargeBinary, nullable=True),
    )
    op.create_table(
        "label_watermarks",
        sa.Column("window_s", sa.Integer, primary_key=True),
        sa.Column("closed_until", sa.Float, nullable=False),
    )
    op.create_index("ix_labels_ts", "labels", ["ts"])
    conn = op.get_bind()
    if conn.dialect.name == "postgresql":
        _partition_predictions(conn)
    _backfill(conn)


def _partition_predictions(conn) -> None:
    conn.execute(sa.text("ALTER TABLE predictions RENAME TO predictions_unpartitioned"))
    for old in ("predictions_pkey", "ix_predictions_version_ts", "ix_predictions_ts"):
        conn.execute(sa.text(f"ALTER INDEX IF EXISTS {old} RENAME TO {old}_unpartitioned"))
    conn.execute(sa.text(queries.PARTITIONED_PREDICTIONS_DDL))
    conn.execute(sa.text("CREATE INDEX ix_predictions_version_ts ON predictions (model_version, ts)"))
    conn.execute(sa.text("CREATE INDEX ix_predictions_ts ON predictions (ts)"))
    conn.execute(sa.text("CREATE TABLE predictions_default PARTITION OF predictions DEFAULT"))
    low, high = conn.execute(sa.text("SELECT MIN(ts), MAX(ts) FROM predictions_unpartitioned")).one()
    now = time.time()
    queries.create_partitions(conn, min(low or now, now), max(high or now, now) + AHEAD_S)
    conn.execute(sa.text("INSERT INTO predictions SELECT * FROM predictions_unpartitioned"))
    conn.execute(sa.text("DROP TABLE predictions_unpartitioned"))


def _backfill(conn) -> None:
    """Sum the predictions already logged into request_buckets, an hour of prediction time at a time."""
    low, high = conn.execute(sa.text("SELECT MIN(ts), MAX(ts) FROM predictions")).one()
    if low is None:
        return
    cursor = conn.connection.cursor()
    start = low // COARSE_BUCKET_S * COARSE_BUCKET_S
    while start <= high:
        rows = conn.execute(
            sa.text(
                "SELECT request_id, ts, model_version, role, route, endpoint, NULL, score, latency_ms, status "
                "FROM predictions WHERE ts >= :a AND ts < :b"
            ),
            {"a": start, "b": start + COARSE_BUCKET_S},
        ).all()
        queries.add_request_facts(cursor, conn.dialect.name, [tuple(r) for r in rows])
        start += COARSE_BUCKET_S


def downgrade() -> None:
    op.drop_index("ix_labels_ts", "labels")
    for name in ("label_watermarks", "label_buckets", "request_buckets"):
        op.drop_table(name)
