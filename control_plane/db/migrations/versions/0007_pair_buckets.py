"""pair buckets: pair_buckets, pair_label_buckets and pair_watermarks

The paired shadow analysis (control_plane/analysis/paired.py) read the raw rows of the whole shadow
window on every evaluation: the shadow's copies joined on their pair key with the baseline's answers
and their labels, a read whose cost grew with the mirrored requests served. It now reads these
additive per-bucket sums, written once per bucket by the pair job (queries.sum_pairs) as its
watermarks pass them, as label_buckets are by the label job. New tables only: no existing row is read
or rewritten. Pairs logged before this revision are not summed; a shadow phase in progress is
summed from its start the first time the pair job runs (its watermarks start there).

Revision ID: 0007
Revises: 0006
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def _versions() -> list:
    return [
        sa.Column("shadow_version", sa.Integer, primary_key=True),
        sa.Column("baseline_version", sa.Integer, primary_key=True),
    ]


def _key_columns() -> list:
    return [sa.Column("bucket_start", sa.BigInteger, primary_key=True), *_versions()]


def _sums(kind, *names: str) -> list:
    return [sa.Column(name, kind, nullable=False) for name in names]


def upgrade() -> None:
    op.create_table(
        "pair_buckets",
        *_key_columns(),
        *_sums(sa.BigInteger, "pairs", "scored"),
        *_sums(sa.Float, "score_sum", "score_squares", "score_abs_sum", "latency_sum", "latency_squares"),
        *_sums(sa.BigInteger, "shadow_slower", "both_errors", "shadow_only_errors", "baseline_only_errors"),
        *_sums(sa.BigInteger, "ranked"),
        *_sums(sa.Float, "overlap_sum"),
    )
    op.create_table(
        "pair_label_buckets",
        sa.Column("window_s", sa.Integer, primary_key=True),
        *_key_columns(),
        *_sums(sa.BigInteger, "labelled", "shadow_only_right", "baseline_only_right"),
    )
    op.create_table(
        "pair_watermarks",
        *_versions(),
        sa.Column("window_s", sa.Integer, primary_key=True),
        sa.Column("summed_until", sa.Float, nullable=False),
    )


def downgrade() -> None:
    for name in ("pair_watermarks", "pair_label_buckets", "pair_buckets"):
        op.drop_table(name)
