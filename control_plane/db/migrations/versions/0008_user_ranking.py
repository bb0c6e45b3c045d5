"""user ranking: per-user sums of the /recommend ranking metrics (user_labels.ranked, mrr_sum,
ndcg_sum) and the users' clicks per position (user_clicks)

The user-level analysis (analysis/user_level.py) covered accuracy only; a policy deciding on CTR@k,
MRR or NDCG fell back to requests as the unit. The label job now also adds, per user key, the closed
/recommend exposures and the sums of their clicks' reciprocal ranks and NDCG gains, and the clicks per
position (CTR@k is read from these for the k the policy names, any k from 1 to 1000). The new columns
have defaults, so no row is rewritten: label windows closed before this revision count no exposure,
and a user's ranking sums start from the first window closed after it.

Revision ID: 0008
Revises: 0007
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

_COLUMNS = ("ranked", "mrr_sum", "ndcg_sum")


def upgrade() -> None:
    with op.batch_alter_table("user_labels") as batch:
        batch.add_column(sa.Column("ranked", sa.BigInteger, nullable=False, server_default="0"))
        batch.add_column(sa.Column("mrr_sum", sa.Float, nullable=False, server_default="0"))
        batch.add_column(sa.Column("ndcg_sum", sa.Float, nullable=False, server_default="0"))
    op.create_table(
        "user_clicks",
        sa.Column("window_s", sa.Integer, primary_key=True),
        sa.Column("bucket_start", sa.BigInteger, primary_key=True),
        sa.Column("user_key", sa.String(64), primary_key=True),
        sa.Column("model_version", sa.Integer, primary_key=True),
        sa.Column("role", sa.String(32), primary_key=True),
        sa.Column("route", sa.String(16), primary_key=True),
        sa.Column("position", sa.Integer, primary_key=True),
        sa.Column("clicks", sa.BigInteger, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("user_clicks")
    with op.batch_alter_table("user_labels") as batch:
        for name in reversed(_COLUMNS):
            batch.drop_column(name)
