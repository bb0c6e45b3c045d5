"""The one place the tables are declared; Alembic migrations create and change them."""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    SmallInteger,
    String,
    Table,
    Text,
    UniqueConstraint,
    text,
)

from control_plane.request_ids import issued_at

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
    # Keyed hash of the request's X-User-Id (control_plane/users.py), NULL when it named no user.
    Column("user_key", String(64), nullable=True),
    # /recommend: the item ids served, in served order (the top k); NULL for /predict. A click sent to
    # /feedback must name one of them at its position (control_plane/clicks.py).
    Column("served", JSON, nullable=True),
    # The pair key the gateway gave the request during a shadow phase (header X-Recsys-Pair), logged by
    # the baseline and by the shadow's copy alike so that the two answers can be joined; else NULL.
    Column("pair_key", String(128), nullable=True),
    Index("ix_predictions_version_ts", "model_version", "ts"),
    Index(
        "ix_predictions_pair_key",
        "pair_key",
        postgresql_where=text("pair_key IS NOT NULL"),
        sqlite_where=text("pair_key IS NOT NULL"),
    ),
    Index("ix_predictions_ts", "ts"),
)


def _issued_ts(context) -> float:
    """A label's partition time: when its request id was issued (the prediction's time, within the
    request's own duration), read from the id; the label's arrival for an id of another form."""
    row = context.get_current_parameters()
    return issued_at(row["request_id"]) or row["ts"]


# Late-arriving ground truth, keyed by the request it labels; a request's first label is kept
# (control_plane/labels.py). `ts` is when the label arrived, `issued_ts` when its request id was
# issued: on Postgres the table is partitioned by `issued_ts` by hour, like `predictions` by `ts`, so
# retention drops a label's partition with its prediction's, and its primary key is
# (request_id, issued_ts), which is as unique as request_id since the id determines the time.
labels = Table(
    "labels",
    metadata,
    Column("request_id", String(128), primary_key=True),
    Column("label", SmallInteger, nullable=False),
    Column("ts", Float, nullable=False),
    Column("issued_ts", Float, nullable=False, default=_issued_ts),
    # A click on a /recommend answer: the item clicked and its 1-based position as served, checked
    # against the served list when the click came (control_plane/clicks.py); NULL for other labels.
    Column("item_id", String(128), nullable=True),
    Column("position", SmallInteger, nullable=True),
    Index("ix_labels_ts", "ts"),
    Index("ix_labels_issued_ts", "issued_ts"),
)


def _bucket_key() -> list[Column]:
    """What an aggregate row is kept per (analysis/aggregates.py: BucketKey), and its width."""
    return [
        Column("bucket_start", BigInteger, primary_key=True),
        Column("model_version", Integer, primary_key=True),
        Column("role", String(32), primary_key=True),
        Column("route", String(16), primary_key=True),
        Column("endpoint", String(16), primary_key=True),
        Column("bucket_s", Integer, nullable=False),
    ]


# Additive summaries of `predictions`, per bucket of the prediction's own time (control_plane/analysis/
# aggregates.py): the prediction log's writer adds each batch it inserts, in the same transaction.
# `bucket_s` is 5 for fine buckets and 3600 once rolled up (retention.py). Every read that decides or
# shows something reads these, never the raw rows.
request_buckets = Table(
    "request_buckets",
    metadata,
    *_bucket_key(),
    Column("requests", BigInteger, nullable=False),
    Column("errors", BigInteger, nullable=False),
    Column("latency", LargeBinary, nullable=True),  # SparseCounts of the log-spaced latency bins
)

# Outcomes of predictions whose attribution window (`window_s`) has closed, per the same buckets:
# added by the label job (queries.close_label_windows) as its watermark passes them.
label_buckets = Table(
    "label_buckets",
    metadata,
    Column("window_s", Integer, primary_key=True),
    *_bucket_key(),
    Column("closed", BigInteger, nullable=False),
    Column("positives", BigInteger, nullable=False),
    Column("correct", BigInteger, nullable=False),
    Column("log_loss_sum", Float, nullable=False),
    Column("scores_pos", LargeBinary, nullable=True),
    Column("scores_neg", LargeBinary, nullable=True),
    # /recommend exposures among `closed`, and their clicks' positions (SparseCounts per position)
    Column("ranked", BigInteger, nullable=False, server_default="0"),
    Column("click_positions", LargeBinary, nullable=True),
)


def _user_key() -> list[Column]:
    """What a per-user aggregate row is kept per (analysis/user_level.py): a user in one arm, per bucket."""
    return [
        Column("bucket_start", BigInteger, primary_key=True),
        Column("user_key", String(64), primary_key=True),
        Column("model_version", Integer, primary_key=True),
        Column("role", String(32), primary_key=True),
        Column("route", String(16), primary_key=True),
    ]


# Per user, arm and USER_BUCKET_S of prediction time: the requests of rows that named a user, added
# by the prediction log's writer in each batch's transaction (one upsert per user in the batch), and
# when the user was first seen there. A user-level evaluation reads one row per user and bucket, so
# its cost follows users, not requests.
user_requests = Table(
    "user_requests",
    metadata,
    *_user_key(),
    Column("requests", BigInteger, nullable=False),
    Column("errors", BigInteger, nullable=False),
    Column("first_ts", Float, nullable=False),
)

# The same users' closed label windows, added by the label job beside label_buckets.
user_labels = Table(
    "user_labels",
    metadata,
    Column("window_s", Integer, primary_key=True),
    *_user_key(),
    Column("closed", BigInteger, nullable=False),
    Column("correct", BigInteger, nullable=False),
    # of `closed`, the /recommend exposures, and the sums of their clicks' 1/position and
    # 1/log2(1 + position) (the user's MRR and NDCG totals; analysis/ranking.py)
    Column("ranked", BigInteger, nullable=False, server_default="0"),
    Column("mrr_sum", Float, nullable=False, server_default="0"),
    Column("ndcg_sum", Float, nullable=False, server_default="0"),
)

# The same users' clicks within the window on their closed /recommend exposures, per position as served:
# a user's CTR@k, for the k a policy names, is the sum over positions <= k. One row per user key and
# position clicked, added by the label job with user_labels.
user_clicks = Table(
    "user_clicks",
    metadata,
    Column("window_s", Integer, primary_key=True),
    *_user_key(),
    Column("position", Integer, primary_key=True),
    Column("clicks", BigInteger, nullable=False),
)

# Per attribution window: predictions before `closed_until` have been counted in label_buckets.
label_watermarks = Table(
    "label_watermarks",
    metadata,
    Column("window_s", Integer, primary_key=True),
    Column("closed_until", Float, nullable=False),
)


def _version_pair() -> list[Column]:
    """The two versions answering the same requests in a shadow phase: the shadow and the baseline."""
    return [
        Column("shadow_version", Integer, primary_key=True),
        Column("baseline_version", Integer, primary_key=True),
    ]


def _pair_key() -> list[Column]:
    """What a paired row is kept per (analysis/paired.py: PairKey): the bucket of the shadow copy's time
    and the two versions answering the same requests."""
    return [Column("bucket_start", BigInteger, primary_key=True), *_version_pair()]


def _sums(kind: type, *names: str) -> list[Column]:
    """Additive sums of one type, not null."""
    return [Column(name, kind, nullable=False) for name in names]


# The paired sums of a shadow phase (analysis/paired.py: PairedFacts), per BUCKET_S of the shadow copy's
# time: the shadow's copies joined on their pair key with the baseline's live answers, summed once by
# the pair job (queries.sum_pairs) as its watermark passes the bucket. The shadow decision reads these,
# never the raw rows; pruned with the fine buckets (retention.py).
pair_buckets = Table(
    "pair_buckets",
    metadata,
    *_pair_key(),
    *_sums(BigInteger, "pairs", "scored"),  # scored: the pairs where both scored
    # shadow minus baseline: the score over `scored`, the latency (ms) over `pairs`
    *_sums(Float, "score_sum", "score_squares", "score_abs_sum", "latency_sum", "latency_squares"),
    *_sums(BigInteger, "shadow_slower", "both_errors", "shadow_only_errors", "baseline_only_errors"),
    *_sums(BigInteger, "ranked"),
    *_sums(Float, "overlap_sum"),
)

# The same pairs' outcomes once the baseline request's attribution window (`window_s`) has closed:
# how many were labelled, and how many of them only the shadow, or only the baseline, got right.
pair_label_buckets = Table(
    "pair_label_buckets",
    metadata,
    Column("window_s", Integer, primary_key=True),
    *_pair_key(),
    *_sums(BigInteger, "labelled", "shadow_only_right", "baseline_only_right"),
)

# Per version pair and part (window_s -1: pair_buckets; else pair_label_buckets of that window): shadow
# copies logged before `summed_until` have been summed.
pair_watermarks = Table(
    "pair_watermarks",
    metadata,
    *_version_pair(),
    Column("window_s", Integer, primary_key=True),
    Column("summed_until", Float, nullable=False),
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
