"""users: predictions.user_key, and the per-user aggregates user_requests and user_labels

`user_key` is nullable, so adding it rewrites no row (on Postgres it is added to the partitioned table
and so to every partition). The per-user tables start empty: users are counted from the first
prediction logged with one.

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def _key_columns() -> list:
    return [
        sa.Column("bucket_start", sa.BigInteger, primary_key=True),
        sa.Column("user_key", sa.String(64), primary_key=True),
        sa.Column("model_version", sa.Integer, primary_key=True),
        sa.Column("role", sa.String(32), primary_key=True),
        sa.Column("route", sa.String(16), primary_key=True),
    ]


def upgrade() -> None:
    op.add_column("predictions", sa.Column("user_key", sa.String(64), nullable=True))
    op.create_table(
        "user_requests",
        *_key_columns(),
        sa.Column("requests", sa.BigInteger, nullable=False),
        sa.Column("errors", sa.BigInteger, nullable=False),
        sa.Column("first_ts", sa.Float, nullable=False),
    )
    op.create_table(
        "user_labels",
        sa.Column("window_s", sa.Integer, primary_key=True),
        *_key_columns(),
        sa.Column("closed", sa.BigInteger, nullable=False),
        sa.Column("correct", sa.BigInteger, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("user_labels")
    op.drop_table("user_requests")
    with op.batch_alter_table("predictions") as batch:
        batch.drop_column("user_key")
