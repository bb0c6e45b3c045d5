"""The service layer: what views, RQ jobs and the CLI all call. Each write is read → decide → plan → record →
apply: the plan (control_plane/rollout/) is recorded with its ledger row in one transaction, then applied.

Each write runs holding the action lock (control_plane/action_lock.py), so it reads what the previous
write left, whichever process made it.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
from collections.abc import Callable
from typing import Any, TypeVar

from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from control_plane import observations, queries, retention
from control_plane.analysis.decide import decide, decide_harm
from control_plane.analysis.policy import Policy
from control_plane.analysis.types import Action, Decision, Observations, Phase
from control_plane.bounds import check_row_int
from control_plane.context import Context
from control_plane.db.engine import read_snapshot
from control_plane.errors import InvalidRequest, NoPreviousBaseline, RolloutConflict
from control_plane.ledger import Rollout
from control_plane.operator_actions import OperatorAction
from control_plane.retention import RetentionPolicy
from control_plane.rollout.assignment import Slot
from control_plane.rollout.entry import Entry
from control_plane.rollout.phases import ForbiddenTransition, Operator, allowed_from, transition
from control_plane.rollout.plan import MoveKind, RolloutChange, TrafficMove, plan
from control_plane.rollout_reading import (
    SETTLE_S,
    Reading,
    attribution_window_s,
    close_window,
    compared_versions,
    observe,
    read_evaluation,
    replaying,
    sum_shadow_pairs,
)
from control_plane.settings import ROLES
from control_plane.traffic.base import InvalidWeights, Mirror, TrafficStateUnreadable, validate_weights
from control_plane.traffic_ops import apply_assignment

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])


def one_at_a_time(fn: F) -> F:
    """A service write, run as the only action in progress (ActionBusy, a 409, after the lock's wait)."""
    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def serialized(ctx: Context, *args, **kwargs):
        actor = signature.bind_partial(ctx, *args, **kwargs).arguments.get("actor", "?")
        with ctx.action_lock.held(f"{fn.__name__} by {actor}"):
            return fn(ctx, *args, **kwargs)

    return serialized  # type: ignore[return-value]


# --- reading -----------------------------------------------------------------
def versions(ctx: Context) -> list[dict[str, Any]]:
    """Every registered version with its aliases, stage, role, weight and endpoint."""
    assignment = ctx.traffic_store.load()
    role_of = {v: r for r, v in assignment.versions.items() if v is not None}
    endpoints = ctx.deployer.endpoints()
    out = []
    for info in ctx.registry.versions():
        role = role_of.get(info.version)
        out.append(
            {
                "version": info.version,
                "aliases": list(info.aliases),
                "stage": info.stage,
                "profile": info.profile,
                "metrics": info.metrics,
                "role": role,
                "weight": assignment.slot(role).weight if role else 0,
                "endpoint": endpoints.get(info.version),
            }
        )
    return out


def traffic(ctx: Context) -> dict[str, Any]:
    return {
        **ctx.traffic_store.load().to_json(),
        "router_weights": ctx.router.get_weights(),
        "shadow": _mirror_info(ctx),
    }


def _mirror_info(ctx: Context) -> dict[str, int] | None:
    """The version Traefik mirrors a share of requests to (a shadow phase), and that share."""
    try:
        mirror = ctx.router.get_mirror()
    except TrafficStateUnreadable:
        return None
    return None if mirror is None else {"version": mirror.version, "percent": mirror.percent}


def window_metrics(ctx: Context, window_s: int | None = None) -> dict[str, Any]:
    """Per role over the rolling window: requests, errors, latency percentiles, label metrics."""
    now = ctx.clock()
    since = now - (window_s or ctx.settings.window_s)
    assignment = ctx.traffic_store.load()
    if assignment.empty:  # nothing saved yet: no role to read
        return {"since": since, "now": now, "roles": {}}
    with ctx.engine.connect() as conn:
        obs = observations.read_observations(
            queries.SqlMetricsSource(conn),
            versions=assignment.versions,
            since=since,
            step_since=since,
            now=now,
            label_window_s=ctx.settings.label_window_s,
            settle_s=ctx.settings.log_settle_s,
            step_weights=assignment.weights,
        )
    users = {} if obs.users is None else obs.users.arms
    return {
        "since": since,
        "now": now,
        "roles": {
            r: {**observations.summarize(a), "users": users[r].users if r in users else None}
            for r, a in obs.arms.items()
        },
    }


def window_counts(ctx: Context, window_s: int | None = None) -> dict[str, dict[str, Any]]:
    """Per role over the rolling window: requests, error rate, labelled and accuracy, counted in SQL.

    What /metrics shows on every scrape: aggregates only, so a scrape does not read the window's rows.
    """
    now = ctx.clock()
    with ctx.engine.connect() as conn:
        return observations.window_counts(
            queries.SqlMetricsSource(conn),
            versions=ctx.traffic_store.load().versions,
            since=now - (window_s or ctx.settings.window_s),
            now=now,
            label_window_s=ctx.settings.label_window_s,
            settle_s=ctx.settings.log_settle_s,
        )


def close_labels(ctx: Context) -> int:
    """The scheduled label job: the stack's attribution window and the active rollout's, each from its
    watermark; waits while a Bento's log is replaying rows (their windows would be passed over)."""
    now = ctx.clock()
    endpoints = ctx.deployer.endpoints()
    if ctx.log_backlog.waiting(endpoints):
        return 0
    windows = {float(ctx.settings.label_window_s): now - ctx.settings.window_s}
    rollout = ctx.ledger.active()
    if rollout is not None:
        policy = Policy.from_dict(rollout.policy_params)
        if policy.label_window_s is not None:
            windows.setdefault(float(policy.label_window_s), rollout.started_at)
    return sum(close_window(ctx, w, now, start_at) for w, start_at in windows.items())


def sum_active_pairs(ctx: Context) -> int:
    """The scheduled pair job: the active rollout's settled pairs while it is in its shadow phase, from
    its watermarks; waits while a Bento's log is replaying rows (as close_labels)."""
    rollout = ctx.ledger.active()
    if rollout is None or rollout.phase is not Phase.SHADOW:
        return 0
    if ctx.log_backlog.waiting(ctx.deployer.endpoints()):
        return 0
    window_s = attribution_window_s(ctx, Policy.from_dict(rollout.policy_params))
    return sum_shadow_pairs(ctx, rollout, window_s, ctx.clock())


def maintain(ctx: Context) -> dict[str, Any]:
    """The scheduled upkeep: close attribution windows and sum settled shadow pairs, then apply retention
    (services.retention)."""
    closed = close_labels(ctx)
    paired = sum_active_pairs(ctx)
    rollout = ctx.ledger.active()
    s = ctx.settings
    policy = RetentionPolicy(s.retention_s, s.aggregate_fine_retention_s, s.aggregate_retention_s)
    report = retention.apply(ctx.engine, policy, ctx.clock(), None if rollout is None else rollout.started_at)
    return {"labels_closed": closed, "pairs_summed": paired, **dataclasses.asdict(report)}


# --- checks before the lock --------------------------------------------------
# A request that is refused anyway is refused before the action lock: it must not wait (up to
# RECSYS_ACTION_WAIT_S) behind an action in progress to learn that its input was wrong. Measured on a
# fresh stack: 400s for bad weights and 404s for unknown versions and rollouts took 2.5 to 15 s behind a
# rollout's start whose first MLflow call was slow. The locked services check again, as they must.
def check_weights(weights: dict[str, Any]) -> None:
    """InvalidRequest (400) when `weights` can never be set."""
    try:
        validate_weights(weights)
    except InvalidWeights as exc:
        raise InvalidRequest(str(exc)) from None


def check_canary(ctx: Context, version: int, policy: dict | None) -> None:
    """InvalidRequest (400) for a bad policy, VersionNotFound (404) for a version not registered."""
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise InvalidRequest(f"version must be a positive integer, got {version!r}")
    check_row_int(version, "version")
    try:
        Policy.from_dict(policy or {})
    except (ValueError, TypeError) as exc:
        raise InvalidRequest(f"invalid policy: {exc}") from None
    ctx.registry.get(version)


# --- traffic -----------------------------------------------------------------
@one_at_a_time
def set_weights(ctx: Context, weights: dict[str, Any], actor: str) -> dict[str, Any]:
    """Set the role weights by hand; refused while a rollout is moving the canary."""
    try:
        clean = validate_weights(weights)
    except InvalidWeights as exc:
        raise InvalidRequest(str(exc)) from None
    active = ctx.ledger.active()
    if active is not None and active.phase in (Phase.PROGRESSING, Phase.SHADOW):
        raise RolloutConflict(
            f"rollout {active.id} is {active.phase}; pause or end it before changing weights by hand"
        )
    assignment = ctx.traffic_store.load()
    for role, weight in clean.items():
        if weight and assignment.slot(role).version is None:
            raise InvalidRequest(f"role {role!r} has no deployed version, so it cannot take weight {weight}")
    try:
        apply_assignment(ctx, assignment.with_weights(clean))
    except ValueError as exc:
        raise InvalidRequest(str(exc)) from None
    log.info("weights set", extra={"weights": clean, "actor": actor})
    return traffic(ctx)


@one_at_a_time
def deploy_role(ctx: Context, version: int, role: str, actor: str) -> dict[str, Any]:
    """Start `version`, route it at weight 0, move the alias, then give it the role's weight; retire the old one."""
    if role not in ROLES:
        raise InvalidRequest(f"unknown role {role!r}; roles are {', '.join(ROLES)}")
    ctx.registry.get(version)
    active = ctx.ledger.active()
    if active is not None and role in ("baseline", "canary"):
        raise RolloutConflict(f"rollout {active.id} is running; end it before redeploying the {role}")
    ctx.deployer.deploy(version)
    assignment = ctx.traffic_store.load()
    replaced, weight = assignment.slot(role).version, assignment.slot(role).weight
    deployed = assignment.with_slot(role, Slot(version, weight))
    others_weigh = any(w for r, w in assignment.weights.items() if r != role)
    apply_assignment(ctx, assignment.with_slot(role, Slot(version, 0)) if others_weigh else deployed)
    ctx.registry.set_alias(role, version)
    apply_assignment(ctx, deployed)
    if replaced not in (None, version):
        _retire(ctx, replaced, archive=role != "baseline")
    log.info("deployed", extra={"version": version, "role": role, "actor": actor})
    return traffic(ctx)


# --- rollouts ----------------------------------------------------------------
@one_at_a_time
def start_canary(ctx: Context, version: int, policy: dict | None, actor: str) -> Rollout:
    """Deploy `version` as the canary at the first step's weight, under a new rollout."""
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise InvalidRequest(f"version must be a positive integer, got {version!r}")
    check_row_int(version, "version")  # never past what the registry's and our columns hold
    try:
        pol = Policy.from_dict(policy or {})
    except (ValueError, TypeError) as exc:
        raise InvalidRequest(f"invalid policy: {exc}") from None
    if pol.shadow_percent and ctx.settings.deployer == "kubernetes":
        # Traefik's CRD mirror sends the copies to the Bento's Service on the live paths, where they
        # cannot be told from live requests; only the file provider's /shadow path marks them.
        raise InvalidRequest(
            "policy field shadow_percent: the shadow phase needs Traefik's file provider; "
            "with RECSYS_DEPLOYER=kubernetes set it to 0"
        )
    ctx.registry.get(version)  # raises VersionNotFound
    assignment = ctx.traffic_store.load()
    baseline_version = assignment.baseline.version
    if version == baseline_version:
        raise InvalidRequest(f"version {version} is already the baseline")
    if version == assignment.control.version:
        raise InvalidRequest(f"version {version} is the control; one version holds one role at a time")
    if ctx.ledger.active() is not None:
        raise RolloutConflict("a rollout is already running; end it before starting another")
    now = ctx.clock()
    with ctx.engine.begin() as conn:
        rollout_id = ctx.ledger.create_rollout(
            conn,
            candidate_version=version,
            baseline_version=baseline_version,
            policy=pol.name,
            policy_params=pol.to_dict(),
            now=now,
        )
    try:
        ctx.deployer.deploy(version)  # raises DeployFailed: the canary never gets weight
    except Exception as exc:
        _finish(ctx, ctx.ledger.get(rollout_id), f"canary {version} failed to start: {exc}", actor)
        raise
    shadow = pol.shadow_percent > 0
    # With a shadow phase the candidate holds the canary role at weight 0: only Traefik's mirror reaches it.
    target = assignment.with_canary(0 if shadow else pol.steps[0], version)
    apply_assignment(ctx, target)
    if shadow:
        ctx.router.set_mirror(Mirror(version=version, percent=pol.shadow_percent))
    ctx.registry.set_alias("canary", version)
    phase = transition(Phase.PENDING, Operator.START_SHADOW if shadow else Operator.START)
    started = (
        f"candidate {version} deployed at 0% in the shadow phase: {pol.shadow_percent}% of requests "
        f"mirrored to it, under policy {pol.name}"
        if shadow
        else f"canary {version} deployed at {target.canary.weight}% under policy {pol.name}"
    )
    _write(
        ctx,
        Entry(rollout_id, Phase.PENDING, phase, "start", actor, started, target.canary.weight),
        RolloutChange(
            phase=phase, canary_weight=target.canary.weight, step_started_at=ctx.clock() + SETTLE_S
        ),
    )
    previous_canary, control_version = assignment.canary.version, assignment.control.version
    if previous_canary not in (None, version, baseline_version, control_version):
        _retire(ctx, previous_canary)
    return ctx.ledger.get(rollout_id)


@one_at_a_time
def evaluate(
    ctx: Context, tick: int | None = None, actor: str = "scheduler", interval_s: int | None = None
) -> dict[str, Any] | None:
    """One evaluation of the active rollout: read → decide → plan → record → apply. Safe to run twice.

    `tick` is the epoch second the scheduled interval starts at; a tick already recorded is not run again,
    and ticks skipped since the last one are counted (with `interval_s`) and shown in the ledger.
    """
    for stuck in ctx.ledger.with_pending_action():
        _complete_pending(ctx, stuck)
    rollout = ctx.ledger.active()
    if rollout is None or rollout.phase is Phase.PENDING:
        return None
    policy = Policy.from_dict(rollout.policy_params)
    reading = read_evaluation(ctx, rollout, policy, tick)
    if reading is None:
        return None  # this tick (or a later one) already ran
    decision = _decision(rollout, policy, reading)
    missed = _missed_ticks(tick, reading.last_tick, interval_s or ctx.settings.eval_interval_s)
    return _act(ctx, rollout, decision, actor, tick=tick, obs=reading.obs, missed_ticks=missed)


def _decision(rollout: Rollout, policy: Policy, reading: Reading) -> Decision:
    """decide() on what was read, unless the rollout is paused or the reading cannot be judged."""
    if rollout.phase is Phase.PAUSED:
        decision = Decision(Action.HOLD, "rollout is paused by an operator", rollout.canary_weight)
    elif reading.obs is None:
        decision = Decision(Action.NO_DATA, str(reading.failure), rollout.canary_weight)
    elif reading.backlog:
        decision = Decision(Action.NO_DATA, replaying(reading.backlog), rollout.canary_weight)
    else:
        decision = decide(rollout.state(reading.evaluations, reading.running_p), reading.obs, policy)
    if decision.action is Action.NO_DATA and "running_p_values" not in decision.stats:
        decision = _carry_running_p(decision, reading.running_p)
    return decision


@one_at_a_time
def check_harm(ctx: Context, actor: str = "harm-check") -> dict[str, Any] | None:
    """The harm tests alone, on their own faster cadence (settings.harm_interval_s): roll back a canary
    whose errors or p99 are confidently beyond the margin between two scheduled evaluations.

    Records nothing unless it rolls back; the scheduled evaluation still records every tick.
    """
    rollout = ctx.ledger.active()
    if rollout is None or rollout.phase is not Phase.PROGRESSING or rollout.pending_action:
        return None
    policy = Policy.from_dict(rollout.policy_params)
    if not policy.is_sequential:
        return None
    now = ctx.clock()
    assignment = ctx.traffic_store.load()
    versions_by_role = compared_versions(rollout, assignment)
    label_window_s = attribution_window_s(ctx, policy)
    with read_snapshot(ctx.engine) as conn:
        obs = observe(ctx, conn, rollout, policy, assignment, versions_by_role, now, label_window_s)
        evaluations, _ = ctx.ledger.evaluations(conn, rollout.id)
    decision = decide_harm(rollout.state(evaluations), obs, policy)
    if decision is None:
        return None
    return _act(ctx, rollout, decision, actor, obs=obs)


@one_at_a_time
def record_unreachable_tick(
    ctx: Context, tick: int, reason: str, actor: str = "scheduler", interval_s: int | None = None
) -> dict[str, Any] | None:
    """Record, once the database answers again, a scheduled evaluation that could not reach it: `no_data`.

    The job that ran at `tick` could neither read metrics nor write the ledger (jobs.evaluate_job kept
    the tick in Redis); nothing was decided then, and nothing is decided now on its behalf.
    """
    step = interval_s or ctx.settings.eval_interval_s
    rollout = ctx.ledger.active()
    if rollout is None or rollout.phase is Phase.PENDING or rollout.started_at >= tick + step:
        return None
    with ctx.engine.connect() as conn:
        _, last_tick = ctx.ledger.evaluations(conn, rollout.id)
        running_p = ctx.ledger.last_stat(conn, rollout.id, "running_p_values") or {}
    if last_tick is not None and tick <= last_tick:
        return None  # recorded already
    decision = _carry_running_p(
        Decision(Action.NO_DATA, f"{reason}; recorded when it answered again", rollout.canary_weight),
        running_p,
    )
    return _act(ctx, rollout, decision, actor, tick=tick, missed_ticks=_missed_ticks(tick, last_tick, step))


def _missed_ticks(tick: int | None, last_tick: int | None, step: int) -> int:
    return 0 if tick is None or last_tick is None else max(0, round((tick - last_tick) / step) - 1)


def _carry_running_p(decision: Decision, running_p: dict) -> Decision:
    """A `no_data` evaluation keeps the running p-values, so the next one carries on from them."""
    from dataclasses import replace

    return replace(decision, stats={**decision.stats, "running_p_values": running_p})


@one_at_a_time
def pause(ctx: Context, rollout_id: int, actor: str) -> Rollout:
    """Freeze a progressing rollout: ticks are recorded but nothing moves."""
    return _switch(ctx, rollout_id, Operator.PAUSE, actor)


@one_at_a_time
def resume(ctx: Context, rollout_id: int, actor: str) -> Rollout:
    return _switch(ctx, rollout_id, Operator.RESUME, actor)


def _switch(ctx: Context, rollout_id: int, move: Operator, actor: str) -> Rollout:
    """An operator's phase change with its ledger row, refused unless the transition table allows it."""
    rollout = ctx.ledger.get(rollout_id)
    try:
        after = transition(rollout.phase, move)
    except ForbiddenTransition:
        only = " or ".join(map(str, allowed_from(move)))
        raise RolloutConflict(
            f"rollout {rollout_id} is {rollout.phase}; only a {only} rollout can {move}"
        ) from None
    reason = f"{move}d by an operator"
    _write(
        ctx,
        Entry(rollout_id, rollout.phase, after, str(move), actor, reason, rollout.canary_weight),
        RolloutChange(phase=after),
    )
    return ctx.ledger.get(rollout_id)


OVERRIDE_ACTIONS = {Action.PROMOTE: "override_promote", Action.ROLLBACK: "override_rollback"}


@one_at_a_time
def promote_now(ctx: Context, rollout_id: int, actor: str, reason: str) -> Rollout:
    """An operator promotes the canary without waiting for the analysis: an override, with its reason and
    the evidence at that moment recorded in the ledger."""
    return _override(ctx, rollout_id, Action.PROMOTE, actor, reason)


@one_at_a_time
def rollback_now(ctx: Context, rollout_id: int, actor: str, reason: str) -> Rollout:
    """An operator rolls the canary back at once: an override, recorded as `promote_now` is."""
    return _override(ctx, rollout_id, Action.ROLLBACK, actor, reason)


def operate(
    ctx: Context, rollout_id: int, action: OperatorAction, actor: str, reason: str | None = None
) -> Rollout:
    """An operator's action on a rollout, whichever door it came through (CLI, API, web page); the
    overrides (promote, rollback) need a reason."""
    if action.overrides:
        fn = promote_now if action is OperatorAction.PROMOTE else rollback_now
        return fn(ctx, rollout_id, actor, reason or "")
    return (pause if action is OperatorAction.PAUSE else resume)(ctx, rollout_id, actor)


def _override(ctx: Context, rollout_id: int, action: Action, actor: str, reason: str) -> Rollout:
    if not isinstance(reason, str) or not reason.strip():
        raise InvalidRequest(
            f"an operator's {action} overrides the analysis and needs a reason (a non-empty string)"
        )
    reason = reason.strip()[:1000]
    rollout = _require_active(ctx, rollout_id)
    policy = Policy.from_dict(rollout.policy_params)
    evidence, obs = _evidence_now(ctx, rollout, policy)
    said = (
        f"the analysis said {evidence.action}: {evidence.reason}"
        if evidence is not None
        else "the analysis could not be read"
    )
    weight = 100 if action is Action.PROMOTE else 0
    stats = dict(evidence.stats) if evidence is not None else {}
    stats["override"] = {
        "action": str(action),
        "actor": actor,
        "reason": reason,
        "analysis_action": None if evidence is None else str(evidence.action),
        "analysis_reason": None if evidence is None else evidence.reason,
    }
    decision = Decision(
        action,
        f"OVERRIDE by {actor}: {reason} ({said})",
        weight,
        () if evidence is None else evidence.rules,
        stats,
    )
    _act(ctx, rollout, decision, actor, obs=obs, recorded_as=OVERRIDE_ACTIONS[action])
    log.warning("override", extra={"rollout_id": rollout_id, "action": str(action), "actor": actor})
    return ctx.ledger.get(rollout_id)


def _evidence_now(ctx: Context, rollout: Rollout, policy: Policy):
    """What the analysis would decide now (recorded beside an override), or (None, None) if unreadable."""
    if rollout.phase is not Phase.PROGRESSING and rollout.phase is not Phase.PAUSED:
        return None, None
    now = ctx.clock()
    assignment = ctx.traffic_store.load()
    versions_by_role = compared_versions(rollout, assignment)
    label_window_s = attribution_window_s(ctx, policy)
    try:
        with read_snapshot(ctx.engine) as conn:
            obs = observe(ctx, conn, rollout, policy, assignment, versions_by_role, now, label_window_s)
            evaluations, _ = ctx.ledger.evaluations(conn, rollout.id)
            running_p = ctx.ledger.last_stat(conn, rollout.id, "running_p_values") or {}
    except SQLAlchemyError:
        return None, None
    state = dataclasses.replace(rollout.state(evaluations, running_p), phase=Phase.PROGRESSING)
    return decide(state, obs, policy), obs


@one_at_a_time
def restore_previous_baseline(ctx: Context, actor: str) -> dict[str, Any]:
    """`recsys rollback`: the previous baseline serves as baseline again, in one step, no analysis."""
    previous = ctx.registry.version_for("previous_baseline")
    if previous is None:
        raise NoPreviousBaseline()
    active = ctx.ledger.active()
    if active is not None:
        rollback_now(ctx, active.id, actor, "the previous baseline was restored (`recsys rollback`)")
    assignment = ctx.traffic_store.load()
    current = assignment.baseline.version
    ctx.deployer.deploy(previous)
    rest = 100 - assignment.control.weight - assignment.canary.weight
    apply_assignment(ctx, assignment.with_slot("baseline", Slot(previous, rest)))
    ctx.registry.promote(previous)
    if current is not None and current != previous:
        ctx.registry.set_alias("previous_baseline", current)
        _retire(ctx, current, archive=False)
    log.info("previous baseline restored", extra={"version": previous, "actor": actor})
    return {"baseline": previous, "previous_baseline": current}


# --- acting ------------------------------------------------------------------
def _require_active(ctx: Context, rollout_id: int) -> Rollout:
    rollout = ctx.ledger.get(rollout_id)
    if rollout.phase.terminal:
        raise RolloutConflict(f"rollout {rollout_id} has already ended ({rollout.phase})")
    return rollout


def _act(
    ctx: Context,
    rollout: Rollout,
    decision: Decision,
    actor: str,
    *,
    tick: int | None = None,
    obs: Observations | None = None,
    missed_ticks: int = 0,
    recorded_as: str | None = None,
) -> dict[str, Any] | None:
    """Plan the decision, record the plan and its ledger row in one transaction, apply it, then clear it.

    `recorded_as` names the ledger's action when it is not the decision's own (an operator's override)."""
    step = plan(rollout, decision, ctx.traffic_store.load())
    change = step.columns(ctx.clock(), decision.reason)
    reason = decision.reason + (
        f" ({missed_ticks} scheduled evaluations were missed before this one)" if missed_ticks else ""
    )
    action = recorded_as or str(decision.action)
    entry = Entry(
        rollout.id,
        step.before,
        step.after,
        action,
        actor,
        reason,
        step.canary_weight,
        tick=tick,
        decision=decision,
        obs=obs,
        missed_ticks=missed_ticks,
    )
    try:
        _write(ctx, entry, change)
    except IntegrityError:
        return None  # this tick was already recorded by another run
    if step.move is not None:
        _apply(ctx, rollout, step.move)
        ctx.ledger.clear_pending(
            rollout.id, step_started_at=ctx.clock() + SETTLE_S if step.new_step else None
        )
    return {
        "rollout_id": rollout.id,
        "action": str(decision.action),
        "phase": str(step.after),
        "reason": reason,
    }


def _apply(ctx: Context, rollout: Rollout, move: TrafficMove) -> None:
    """Carry out a recorded move; every step is idempotent so a crash half-way is finished by a redo."""
    control = ctx.traffic_store.load().control.version
    _stop_mirror(ctx)  # every move ends a shadow phase: the candidate gets weight, or is retired
    apply_assignment(ctx, move.target(rollout.baseline_version, rollout.candidate_version, control))
    if move.kind is MoveKind.PROMOTE:
        ctx.fault_point("AFTER_TRAFFIC_WRITE")
        ctx.registry.promote(rollout.candidate_version)
        if rollout.baseline_version not in (None, rollout.candidate_version, control):
            _retire(ctx, rollout.baseline_version, archive=False)
    elif move.kind is MoveKind.RETIRE_CANARY:
        ctx.fault_point("AFTER_TRAFFIC_WRITE")
        if ctx.registry.version_for("canary") == rollout.candidate_version:
            ctx.registry.remove_alias("canary")
        ctx.registry.archive(rollout.candidate_version)
        _retire(ctx, rollout.candidate_version, archive=False)


def _stop_mirror(ctx: Context) -> None:
    """No more copies to a shadow version (idempotent: a redo of a half-applied action calls it again)."""
    try:
        if ctx.router.get_mirror() is not None:
            ctx.router.set_mirror(None)
    except TrafficStateUnreadable:
        pass  # no mirroring service at all (the Kubernetes manifests not applied): nothing mirrors


def _complete_pending(ctx: Context, rollout: Rollout) -> None:
    """A previous run recorded a move and died before finishing it: finish it now."""
    move = rollout.pending
    if move is None:
        return
    log.warning("completing a half-applied action", extra={"rollout_id": rollout.id})
    _apply(ctx, rollout, move)
    ctx.ledger.clear_pending(rollout.id)
    reason = f"completed the half-applied {move.kind} action"
    _write(
        ctx,
        Entry(rollout.id, rollout.phase, rollout.phase, "recover", "recovery", reason, rollout.canary_weight),
    )


def _retire(ctx: Context, version: int, archive: bool = True) -> None:
    """Drain a version that lost its role (Traefik reloads within ~2 s), then stop its Bento.

    Another process's action waits for the action lock until this one is done. Asked again after the
    drain all the same: a write nested in this one may have given the version a role again, and
    stopping or archiving it then would take a serving Bento and its alias away.
    """
    if _in_use(ctx, version):
        return
    ctx.sleep(ctx.drain_s)
    if _in_use(ctx, version):
        log.info("kept: given a role again while it drained", extra={"version": version})
        return
    ctx.deployer.undeploy(version)
    if archive:
        ctx.registry.archive(version)


def _in_use(ctx: Context, version: int) -> bool:
    return ctx.traffic_store.load().holds(version)


def _finish(ctx: Context, rollout: Rollout, reason: str, actor: str) -> None:
    """A rollout whose candidate never started: rolled back, weight 0."""
    phase = transition(rollout.phase, Operator.START_FAILED)
    entry = Entry(rollout.id, rollout.phase, phase, "rollback", actor, reason, 0)
    _write(ctx, entry, RolloutChange(phase=phase, ended_at=ctx.clock(), reason=reason, canary_weight=0))


def _write(ctx: Context, entry: Entry, change: RolloutChange | None = None) -> None:
    """The unit of work: the rollout's changed columns and its ledger row, in one transaction (an
    IntegrityError, a tick already recorded, leaves neither)."""
    with ctx.engine.begin() as conn:
        ctx.ledger.record(conn, **entry.row(ctx.clock()))
        if change is not None:
            ctx.ledger.update(conn, entry.rollout_id, change)
