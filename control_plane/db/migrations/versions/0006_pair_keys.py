"""pair keys: predictions.pair_key and its index

During a shadow phase the gateway gives each request a pair key (header X-Recsys-Pair, set by the
`pairkey` plugin before Traefik's mirror copies the request; control_plane/traffic/pair_keys.py), and
both the baseline's row and the shadow's copy log it, so the two answers to one request can be joined
(control_plane/analysis/paired.py). The column is nullable, so adding it rewrites no row (on Postgres,
added to the partitioned table it reaches every partition, and so does the index); rows logged
outside a shadow phase leave it NULL, and the index is partial on Postgres so they cost it nothing.

Revision ID: 0006
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("predictions", sa.Column("pair_key", sa.String(128), nullable=True))
    op.create_index(
        "ix_predictions_pair_key",
        "predictions",
        ["pair_key"],
        postgresql_where=sa.text("pair_key IS NOT NULL"),
        sqlite_where=sa.text("pair_key IS NOT NULL"),
    )


def downgrade() -> None:
    op.drop_index("ix_predictions_pair_key", table_name="predictions")
    with op.batch_alter_table("predictions") as batch:
        batch.drop_column("pair_key")
