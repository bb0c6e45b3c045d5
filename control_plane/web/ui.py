"""The operator's web page: server-rendered over control_plane.services; every action is a POSTed form."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from flask import Blueprint, flash, redirect, render_template, request, url_for

from control_plane import services
from control_plane.analysis.policy_names import NAMES
from control_plane.errors import InvalidRequest
from control_plane.operator_actions import ROUTE, OperatorAction
from control_plane.settings import ROLES
from control_plane.web.auth import WRITE_METHODS, log_in, log_out, operator_logged_in, token_matches
from control_plane.web.errors import Unauthorized
from control_plane.web.wiring import api_token, current_ctx

log = logging.getLogger(__name__)
bp = Blueprint("ui", __name__)

ACTOR = "ui:operator"
POLICIES = NAMES
OPEN_WRITES = {"ui.login", "ui.logout"}  # CSRF still applies to these


@bp.before_request
def require_operator() -> None:
    if request.method in WRITE_METHODS and request.endpoint not in OPEN_WRITES and not _operator():
        raise Unauthorized("log in as the operator to change anything")


def _operator() -> bool:
    return operator_logged_in(api_token())


# --- pages -------------------------------------------------------------------
@bp.get("/")
def index():
    ctx = current_ctx()
    errors: list[str] = []

    def read(what: str, fn: Callable[[], Any], default: Any) -> Any:
        """One section of the page; a failing source (say, the registry) must not blank the rest."""
        try:
            return fn()
        except Exception as exc:
            log.warning("dashboard section failed", extra={"section": what, "error": repr(exc)[:200]})
            errors.append(f"{what} could not be read: {exc}")
            return default

    rollouts = ctx.ledger.list(10)
    active = ctx.ledger.active()
    current = active or (rollouts[0] if rollouts else None)
    ledger = ctx.ledger.decisions(current.id if current else None, 30)
    return render_template(
        "index.html",
        operator=_operator(),
        versions=read("versions", lambda: services.versions(ctx), []),
        traffic=read("traffic", lambda: services.traffic(ctx), {"weights": {}, "versions": {}}),
        window=read("window metrics", lambda: services.window_metrics(ctx), {"roles": {}}),
        rollouts=rollouts,
        active=active,
        current=current,
        decisions=ledger,
        last_evaluation=next((d for d in ledger if d["rules"] or d["stats"]), None),
        last_shadow=next((d for d in ledger if (d["stats"] or {}).get("shadow")), None),
        policies=POLICIES,
        roles=ROLES,
        settings=ctx.settings,
        errors=errors,
    )


@bp.route("/login", methods=["GET", "POST"])
def login():
    if request.method == "GET":
        return render_template("login.html")
    if token_matches(request.form.get("password", ""), api_token()):
        log_in(api_token())
        log.info("operator logged in", extra={"remote": request.remote_addr})
        return redirect(url_for("ui.index"), code=303)
    log.warning("failed operator login", extra={"remote": request.remote_addr})
    time.sleep(0.2)  # slows guessing a little; the token itself is what makes guessing hopeless
    return render_template("login.html", error="That is not the operator token."), 401


@bp.post("/logout")
def logout():
    log_out()
    return redirect(url_for("ui.index"), code=303)


# --- actions -----------------------------------------------------------------
@bp.post("/ui/canary")
def start_canary():
    version = _form_int("version")
    policy = request.form.get("policy", "")
    if policy not in POLICIES:
        raise InvalidRequest(f"field 'policy' must be one of {', '.join(POLICIES)}, got {policy[:40]!r}")
    shadow = _form_int("shadow_percent") if request.form.get("shadow_percent", "").strip() else 0
    rollout = services.start_canary(current_ctx(), version, {"name": policy, "shadow_percent": shadow}, ACTOR)
    if rollout.phase == "shadow":
        return _done(
            f"Rollout {rollout.id} started: version {version} is in the shadow phase, {shadow}% of requests "
            "mirrored to it and no user answered by it."
        )
    return _done(
        f"Rollout {rollout.id} started: version {version} is the canary at {rollout.canary_weight}%."
    )


@bp.post("/ui/traffic")
def set_traffic():
    weights = {role: _form_int(role) for role in ROLES}
    services.set_weights(current_ctx(), weights, ACTOR)
    return _done("Weights set: " + ", ".join(f"{r} {w}%" for r, w in weights.items()) + ".")


@bp.post(f"/ui/rollouts/<int:rollout_id>/{ROUTE}")
def operate(rollout_id: int, action: str):
    move = OperatorAction(action)
    reason = request.form.get("reason", "").strip() if move.overrides else None
    if move.overrides and not reason:
        raise InvalidRequest(f"{action} now overrides the analysis: give a reason")
    rollout = services.operate(current_ctx(), rollout_id, move, ACTOR, reason)
    how = " by override" if move.overrides else ""
    return _done(f"Rollout {rollout_id} {move.done}{how}; it is now {rollout.phase}.")


@bp.post("/ui/rollback")
def restore_previous_baseline():
    result = services.restore_previous_baseline(current_ctx(), ACTOR)
    return _done(f"Version {result['baseline']} is the baseline again.")


def _done(message: str):
    flash(message, "ok")
    return redirect(url_for("ui.index"), code=303)


def _form_int(name: str) -> int:
    raw = request.form.get(name, "").strip()
    try:
        return int(raw)
    except ValueError:
        raise InvalidRequest(f"field {name!r} must be an integer, got {raw[:40]!r}") from None
