"""clicks: predictions.served, labels.item_id and labels.position, label_buckets.ranked and click_positions

`/recommend` logs its served list (item ids in served order) with its prediction row; a click sent to
`/feedback` is stored as the request's label with the item and its position as served; the label job
adds, per bucket, the /recommend exposures closed and the positions of their clicks, from which every
ranking metric is computed (control_plane/analysis/ranking.py). Every new column is nullable or has a
default, so adding it rewrites no row (on Postgres, added to a partitioned table it reaches every
partition). Buckets counted before this revision have no exposures: ranking metrics start from it.

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("predictions", sa.Column("served", sa.JSON, nullable=True))
    op.add_column("labels", sa.Column("item_id", sa.String(128), nullable=True))
    op.add_column("labels", sa.Column("position", sa.SmallInteger, nullable=True))
    op.add_column("label_buckets", sa.Column("ranked", sa.BigInteger, nullable=False, server_default="0"))
    op.add_column("label_buckets", sa.Column("click_positions", sa.LargeBinary, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("label_buckets") as batch:
        batch.drop_column("click_positions")
        batch.drop_column("ranked")
    with op.batch_alter_table("labels") as batch:
        batch.drop_column("position")
        batch.drop_column("item_id")
    with op.batch_alter_table("predictions") as batch:
        batch.drop_column("served")
