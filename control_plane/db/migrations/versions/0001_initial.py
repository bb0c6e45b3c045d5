"""initial schema: predictions, labels, traffic_config, rollouts, decisions

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "predictions",
        sa.Column("request_id", sa.String(128), primary_key=True),
        sa.Column("ts", sa.Float, nullable=False),
        sa.Column("model_version", sa.Integer, nullable=False),
        sa.Column("role", sa.String(32), nullable=False, server_default="unknown"),
        sa.Column("route", sa.String(16), nullable=False, server_default="direct"),
        sa.Column("endpoint", sa.String(16), nullable=False),
        sa.Column("features", sa.JSON, nullable=True),
        sa.Column("score", sa.Float, nullable=True),
        sa.Column("latency_ms", sa.Float, nullable=False),
        sa.Column("status", sa.SmallInteger, nullable=False),
    )
    op.create_index("ix_predictions_version_ts", "predictions", ["model_version", "ts"])
    op.create_index("ix_predictions_ts", "predictions", ["ts"])
    op.create_table(
        "labels",
        sa.Column("request_id", sa.String(128), primary_key=True),
        sa.Column("label", sa.SmallInteger, nullable=False),
        sa.Column("ts", sa.Float, nullable=False),
    )
    op.create_table(
        "traffic_config",
        sa.Column("role", sa.String(32), primary_key=True),
        sa.Column("version", sa.Integer, nullable=True),
        sa.Column("weight", sa.Integer, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
    )
    op.create_table(
        "rollouts",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("candidate_version", sa.Integer, nullable=False),
        sa.Column("baseline_version", sa.Integer, nullable=True),
        sa.Column("policy", sa.String(32), nullable=False),
        sa.Column("policy_params", sa.JSON, nullable=False),
        sa.Column("phase", sa.String(16), nullable=False),
        sa.Column("step_index", sa.Integer, nullable=False, server_default="0"),
        sa.Column("canary_weight", sa.Integer, nullable=False, server_default="0"),
        sa.Column("started_at", sa.Float, nullable=False),
        sa.Column("step_started_at", sa.Float, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
        sa.Column("ended_at", sa.Float, nullable=True),
        sa.Column("reason", sa.Text, nullable=True),
        sa.Column("pending_action", sa.JSON, nullable=True),
    )
    op.create_index("ix_rollouts_phase", "rollouts", ["phase"])
    op.create_table(
        "decisions",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("rollout_id", sa.Integer, sa.ForeignKey("rollouts.id"), nullable=False),
        sa.Column("ts", sa.Float, nullable=False),
        sa.Column("tick", sa.Integer, nullable=True),
        sa.Column("phase_before", sa.String(16), nullable=False),
        sa.Column("phase_after", sa.String(16), nullable=False),
        sa.Column("action", sa.String(24), nullable=False),
        sa.Column("actor", sa.String(64), nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("canary_weight", sa.Integer, nullable=False),
        sa.Column("sample_sizes", sa.JSON, nullable=False),
        sa.Column("metrics", sa.JSON, nullable=False),
        sa.Column("rules", sa.JSON, nullable=False),
        sa.Column("stats", sa.JSON, nullable=False),
        sa.UniqueConstraint("rollout_id", "tick", name="uq_decisions_rollout_tick"),
    )
    op.create_index("ix_decisions_rollout_ts", "decisions", ["rollout_id", "ts"])


def downgrade() -> None:
    for name in ("decisions", "rollouts", "traffic_config", "labels", "predictions"):
        op.drop_table(name)
