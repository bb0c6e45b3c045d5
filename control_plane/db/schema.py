"""The one place the tables are declared; Alembic migrations create and change them."""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    Column,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    SmallInteger,
    String,
    Table,
    Text,
    UniqueConstraint,
)

metadata = MetaData()

# One row per served request, written by the Bento off the request path.
# `ts` is epoch seconds (portable window arithmetic on SQLite and Postgres).
# `route` is how the request reached the Bento: "weighted" (Traefik's split),
# "override" (a tester's X-Model-Version / X-Model-Role header) or "direct".
predictions = Table(
    "predictions",
    metadata,
    Column("request_id", String(128), primary_key=True),
    Column("ts", Float, nullable=False),
    Column("model_version", Integer, nullable=False),
    Column("role", String(32), nullable=False, server_default="unknown"),
    Column("route", String(16), nullable=False, server_default="direct"),
    Column("endpoint", String(16), nullable=False),
    Column("features", JSON, nullable=True),
    Column("score", Float, nullable=True),
    Column("latency_ms", Float, nullable=False),
    Column("status", SmallInteger, nullable=False),
    Index("ix_predictions_version_ts", "model_version", "ts"),
    Index("ix_predictions_ts", "ts"),
)

# Late-arriving ground truth, keyed by the request it labels; a second label replaces the first.
labels = Table(
    "labels",
    metadata,
    Column("request_id", String(128), primary_key=True),
    Column("label", SmallInteger, nullable=False),
    Column("ts", Float, nullable=False),
)

# The weights in force and which version holds each role; survives restarts.
traffic_config = Table(
    "traffic_config",
    metadata,
    Column("role", String(32), primary_key=True),
    Column("version", Integer, nullable=True),
    Column("weight", Integer, nullable=False),
    Column("updated_at", Float, nullable=False),
)

# One row per rollout: its phase, its weights and policy, and an intent being applied.
rollouts = Table(
    "rollouts",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("candidate_version", Integer, nullable=False),
    Column("baseline_version", Integer, nullable=True),
    Column("policy", String(32), nullable=False),
    Column("policy_params", JSON, nullable=False),
    Column("phase", String(16), nullable=False),
    Column("step_index", Integer, nullable=False, server_default="0"),
    Column("canary_weight", Integer, nullable=False, server_default="0"),
    Column("started_at", Float, nullable=False),
    Column("step_started_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    Column("ended_at", Float, nullable=True),
    Column("reason", Text, nullable=True),
    # An action decided but not yet confirmed applied (crash recovery: redo it on the next tick).
    Column("pending_action", JSON, nullable=True),
    Index("ix_rollouts_phase", "phase"),
)

# One row per evaluation or operator action: inputs, numbers, rule outcomes, action, actor.
decisions = Table(
    "decisions",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("rollout_id", Integer, ForeignKey("rollouts.id"), nullable=False),
    Column("ts", Float, nullable=False),
    Column("tick", Integer, nullable=True),
    Column("phase_before", String(16), nullable=False),
    Column("phase_after", String(16), nullable=False),
    Column("action", String(24), nullable=False),
    Column("actor", String(64), nullable=False),
    Column("reason", Text, nullable=False),
    Column("canary_weight", Integer, nullable=False),
    Column("sample_sizes", JSON, nullable=False),
    Column("metrics", JSON, nullable=False),
    Column("rules", JSON, nullable=False),
    Column("stats", JSON, nullable=False),
    UniqueConstraint("rollout_id", "tick", name="uq_decisions_rollout_tick"),
    Index("ix_decisions_rollout_ts", "rollout_id", "ts"),
)
