"""labels.issued_ts: the time a label's request id was issued; on Postgres labels partitioned by it by hour

A request id the system issued begins its fresh part with the issue time (control_plane/request_ids.py),
so every label knows the time of the prediction it is for without a look-up. On Postgres `labels`
becomes a table partitioned by range of `issued_ts`, one partition an hour like `predictions`, with
primary key (request_id, issued_ts): as unique as request_id alone, since the id determines the time.
Retention then drops a label's partition with its prediction's, and the label job's join reads the
labels of the hours it closes only. Existing labels are copied (a label whose id has another form is
placed at its arrival time), so the migration takes about as long as copying the table.

Revision ID: 0003
Revises: 0002
"""

import time

import sqlalchemy as sa
from alembic import op

from control_plane import queries
from control_plane.request_ids import issued_at

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

AHEAD_S = 24 * 3600
CHUNK = 10_000


def upgrade() -> None:
    conn = op.get_bind()
    if conn.dialect.name == "postgresql":
        _partition_labels(conn)
    else:
        op.add_column("labels", sa.Column("issued_ts", sa.Float, nullable=False, server_default="0"))
        _fill_issued_ts(conn)
    op.create_index("ix_labels_issued_ts", "labels", ["issued_ts"])


def _issued_rows(rows) -> list[dict]:
    return [
        {"request_id": r, "label": label, "ts": ts, "issued_ts": issued_at(r) or ts} for r, label, ts in rows
    ]


def _partition_labels(conn) -> None:
    conn.execute(sa.text("ALTER TABLE labels RENAME TO labels_unpartitioned"))
    for old in ("labels_pkey", "ix_labels_ts"):
        conn.execute(sa.text(f"ALTER INDEX IF EXISTS {old} RENAME TO {old}_unpartitioned"))
    conn.execute(sa.text(queries.PARTITIONED_LABELS_DDL))
    conn.execute(sa.text("CREATE INDEX ix_labels_ts ON labels (ts)"))
    conn.execute(sa.text("CREATE TABLE labels_default PARTITION OF labels DEFAULT"))
    now = time.time()
    # the hours of predictions kept (their labels' hours), and the next day's
    low = conn.execute(sa.text("SELECT MIN(ts) FROM predictions")).scalar()
    queries.create_partitions(conn, min(low or now, now), now + AHEAD_S, "labels")
    insert = sa.text(
        "INSERT INTO labels (request_id, label, ts, issued_ts) VALUES (:request_id, :label, :ts, :issued_ts)"
    )
    after = ""
    while True:  # in chunks by key, each read computing the issue time the SQL cannot
        rows = conn.execute(
            sa.text(
                "SELECT request_id, label, ts FROM labels_unpartitioned WHERE request_id > :after "
                "ORDER BY request_id LIMIT :n"
            ),
            {"after": after, "n": CHUNK},
        ).all()
        if not rows:
            break
        conn.execute(insert, _issued_rows(rows))
        after = rows[-1][0]
    conn.execute(sa.text("DROP TABLE labels_unpartitioned"))


def _fill_issued_ts(conn) -> None:
    after = ""
    while True:
        rows = conn.execute(
            sa.text(
                "SELECT request_id, label, ts FROM labels WHERE request_id > :after ORDER BY request_id LIMIT :n"
            ),
            {"after": after, "n": CHUNK},
        ).all()
        if not rows:
            return
        conn.execute(
            sa.text("UPDATE labels SET issued_ts = :issued_ts WHERE request_id = :request_id"),
            _issued_rows(rows),
        )
        after = rows[-1][0]


def downgrade() -> None:
    op.drop_index("ix_labels_issued_ts", "labels")
    conn = op.get_bind()
    if conn.dialect.name == "postgresql":
        conn.execute(sa.text("ALTER TABLE labels RENAME TO labels_partitioned"))
        conn.execute(sa.text("ALTER INDEX IF EXISTS ix_labels_ts RENAME TO ix_labels_ts_partitioned"))
        op.create_table(
            "labels",
            sa.Column("request_id", sa.String(128), primary_key=True),
            sa.Column("label", sa.SmallInteger, nullable=False),
            sa.Column("ts", sa.Float, nullable=False),
        )
        op.create_index("ix_labels_ts", "labels", ["ts"])
        conn.execute(sa.text("INSERT INTO labels SELECT request_id, label, ts FROM labels_partitioned"))
        conn.execute(sa.text("DROP TABLE labels_partitioned"))
    else:
        with op.batch_alter_table("labels") as batch:
            batch.drop_column("issued_ts")
