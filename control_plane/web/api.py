"""The JSON API: thin views over control_plane.services; reads are open, writes need the Bearer token."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, jsonify, request, url_for

from control_plane import observations, queries, services
from control_plane.bounds import check_row_int, load_json_body
from control_plane.errors import InvalidRequest, RolloutConflict
from control_plane.operator_actions import ROUTE, OperatorAction
from control_plane.web.auth import WRITE_METHODS, bearer_ok
from control_plane.web.errors import Unauthorized
from control_plane.web.wiring import api_token, current_ctx

bp = Blueprint("api", __name__, url_prefix="/api")

ACTOR = "api"
MAX_WINDOW_S = 7 * 24 * 3600
MAX_BUCKETS = 2000


@bp.before_request
def require_operator() -> None:
    if request.method in WRITE_METHODS and not bearer_ok(request, api_token()):
        raise Unauthorized("writes need the operator token: send 'Authorization: Bearer <token>'")


# --- reading -----------------------------------------------------------------
@bp.get("/versions")
def versions():
    return jsonify(versions=services.versions(current_ctx()))


@bp.get("/traffic")
def traffic():
    return jsonify(services.traffic(current_ctx()))


@bp.get("/rollouts")
def rollouts():
    ctx = current_ctx()
    limit = _query_int("limit", 50, 1, 1000)
    active = ctx.ledger.active()
    return jsonify(
        rollouts=[r.to_dict() for r in ctx.ledger.list(limit)],
        active=None if active is None else active.id,
    )


@bp.get("/rollouts/<int:rollout_id>")
def rollout(rollout_id: int):
    return jsonify(current_ctx().ledger.get(rollout_id).to_dict())


@bp.get("/decisions")
def decisions():
    rollout_id = _query_int("rollout_id", None, 1, 2**31 - 1)
    limit = _query_int("limit", 100, 1, 1000)
    return jsonify(decisions=current_ctx().ledger.decisions(rollout_id, limit))


@bp.get("/metrics")
def window_metrics():
    ctx = current_ctx()
    window_s = _query_int("window_s", ctx.settings.window_s, 1, MAX_WINDOW_S)
    return jsonify(services.window_metrics(ctx, window_s))


@bp.get("/timeseries")
def timeseries():
    ctx = current_ctx()
    window_s = _query_int("window_s", ctx.settings.window_s, 1, MAX_WINDOW_S)
    bucket_s = _query_int("bucket_s", max(1, window_s // 60), 1, MAX_WINDOW_S)
    if window_s / bucket_s > MAX_BUCKETS:
        raise InvalidRequest(
            f"bucket_s={bucket_s} gives more than {MAX_BUCKETS} buckets over window_s={window_s}"
        )
    now = ctx.clock()
    since = now - window_s
    with ctx.engine.connect() as conn:
        points = observations.timeseries(
            queries.SqlMetricsSource(conn),
            since=since,
            now=now,
            bucket_s=bucket_s,
            label_window_s=ctx.settings.label_window_s,
        )
    return jsonify(since=since, now=now, bucket_s=bucket_s, points=[p.as_dict() for p in points])


# --- writing -----------------------------------------------------------------
@bp.route("/traffic", methods=["PUT", "POST"])
def set_traffic():
    weights = _body().get("weights")
    if not isinstance(weights, dict):
        raise InvalidRequest(f"field 'weights' must be an object of role to integer, got {_type(weights)}")
    services.check_weights(weights)  # a 400 without waiting for the action lock
    return jsonify(services.set_weights(current_ctx(), weights, ACTOR))


@bp.post("/rollouts")
def start_rollout():
    body = _body()
    version = body.get("version")
    if isinstance(version, bool) or not isinstance(version, int):
        raise InvalidRequest(f"field 'version' must be an integer, got {_type(version)}")
    check_row_int(version, "field 'version'")  # before the registry: MLflow's column is 32 bits too
    policy = body.get("policy")
    if policy is not None and not isinstance(policy, dict):
        raise InvalidRequest(f"field 'policy' must be an object, got {_type(policy)}")
    ctx = current_ctx()
    services.check_canary(ctx, version, policy)  # a 400 or 404 without waiting for the action lock
    started = services.start_canary(ctx, version, policy, ACTOR)
    resp = jsonify(started.to_dict())
    resp.status_code = 201
    resp.headers["Location"] = url_for("api.rollout", rollout_id=started.id)
    return resp


@bp.post(f"/rollouts/<int:rollout_id>/{ROUTE}")
def operate(rollout_id: int, action: str):
    """Pause/resume; or promote/roll back now, an override of the analysis: the body must give
    {"reason": "..."}, and the ledger records it with the evidence at that moment."""
    ctx = current_ctx()
    # 404 for an unknown id before the action lock, not after waiting behind an action in progress
    # (measured: 12 s for ids of 2^31 and more behind a rollout's start on a fresh stack).
    ctx.ledger.get(rollout_id)
    move, reason = OperatorAction(action), None
    if move.overrides:
        reason = _body().get("reason")
        if not isinstance(reason, str) or not reason.strip():
            raise InvalidRequest(
                f"{action} now overrides the analysis: send a JSON body with a non-empty 'reason' string"
            )
    return jsonify(services.operate(ctx, rollout_id, move, ACTOR, reason).to_dict())


@bp.post("/rollouts/<int:rollout_id>/evaluate")
def evaluate(rollout_id: int):
    """Evaluate now, outside the schedule; only the active rollout is evaluated."""
    ctx = current_ctx()
    ctx.ledger.get(rollout_id)  # 404 for an unknown id
    active = ctx.ledger.active()
    if active is None or active.id != rollout_id:
        raise RolloutConflict(f"rollout {rollout_id} is not the active rollout; only that one is evaluated")
    result = services.evaluate(ctx, actor=ACTOR)
    return jsonify(result=result, rollout=ctx.ledger.get(rollout_id).to_dict())


@bp.post("/rollback")
def restore_previous_baseline():
    return jsonify(services.restore_previous_baseline(current_ctx(), ACTOR))


# --- request parsing ---------------------------------------------------------
def _body() -> dict[str, Any]:
    """The JSON object in the body ({} when empty); 413 past MAX_CONTENT_LENGTH, 400 when malformed."""
    raw = request.get_data(cache=True)
    if not raw.strip():
        return {}
    data = load_json_body(raw)
    if not isinstance(data, dict):
        raise InvalidRequest(f"request body must be a JSON object, got {_type(data)}")
    return data


def _query_int(name: str, default: int | None, lo: int, hi: int) -> int | None:
    raw = request.args.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise InvalidRequest(f"query parameter {name!r} must be an integer, got {raw!r}") from None
    if not lo <= value <= hi:
        raise InvalidRequest(f"query parameter {name!r} must be between {lo} and {hi}, got {value}")
    return value


def _type(value: object) -> str:
    return "nothing" if value is None else f"{type(value).__name__} {value!r}"[:80]
