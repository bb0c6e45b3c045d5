"""What a rollout's evaluation reads: its observations per ramp step from the aggregates, and its ledger so far.

The service layer's read step (services.evaluate: read → decide → plan → record → apply); writes nothing but
the label job's and the pair job's watermarks (close_window, sum_shadow_pairs).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from sqlalchemy import Connection
from sqlalchemy.exc import SQLAlchemyError

from control_plane import observations, queries
from control_plane.analysis.policy import Policy
from control_plane.analysis.types import Observations, Phase
from control_plane.context import Context
from control_plane.db.engine import read_snapshot
from control_plane.ledger import Rollout
from control_plane.log_backlog import Backlog
from control_plane.metrics_source import SHADOW_ROUTE
from control_plane.rollout.assignment import Assignment

log = logging.getLogger(__name__)

# Seconds after a weight change before requests count toward the new step's sample-ratio check:
# Traefik reloads within ~0.5-2 s, and requests served meanwhile follow the old weights.
SETTLE_S = 3.0


def close_window(ctx: Context, window_s: float, now: float, start_at: float) -> int:
    """Count the outcomes whose attribution window has closed (the label job); 0 if the database fails."""
    try:
        return queries.close_label_windows(
            ctx.engine, window_s=window_s, now=now, settle_s=ctx.settings.log_settle_s, start_at=start_at
        )
    except SQLAlchemyError as exc:
        log.warning("label windows not closed: %s", exc.__class__.__name__)
        return 0


def sum_shadow_pairs(ctx: Context, rollout: Rollout, window_s: float, now: float) -> int:
    """Sum the settled pairs of a rollout in its shadow phase (the pair job, from the phase's start);
    0 in any other phase, or if the database fails."""
    if rollout.phase is not Phase.SHADOW or rollout.baseline_version is None:
        return 0
    try:
        return queries.sum_pairs(
            ctx.engine,
            shadow_version=rollout.candidate_version,
            baseline_version=rollout.baseline_version,
            window_s=window_s,
            now=now,
            settle_s=ctx.settings.log_settle_s,
            start_at=rollout.step_started_at,
        )
    except SQLAlchemyError as exc:
        log.warning("pairs not summed: %s", exc.__class__.__name__)
        return 0


@dataclass(frozen=True)
class Reading:
    """What one evaluation read: the rollout's ledger so far, and its observations or why there are none."""

    evaluations: int
    last_tick: int | None
    running_p: dict[str, float]
    obs: Observations | None
    failure: str | None  # why the metrics could not be read (obs is None)
    backlog: tuple[Backlog, ...]  # Bentos still replaying spilled rows: nothing is decided until they have


def read_evaluation(ctx: Context, rollout: Rollout, policy: Policy, tick: int | None) -> Reading | None:
    """decide()'s inputs, read in one snapshot; None when `tick` (or a later one) was already recorded."""
    now = ctx.clock()
    assignment = ctx.traffic_store.load()
    versions_by_role = compared_versions(rollout, assignment)
    endpoints = ctx.deployer.endpoints()
    backlog = ctx.log_backlog.waiting({v: endpoints[v] for v in versions_by_role.values() if v in endpoints})
    label_window_s = attribution_window_s(ctx, policy)
    if not backlog:  # rows still being replayed would be passed over by the jobs' watermarks
        close_window(ctx, label_window_s, now, start_at=rollout.started_at)
        sum_shadow_pairs(ctx, rollout, label_window_s, now)
    obs, failure = None, None
    with read_snapshot(ctx.engine) as conn:
        evaluations, last_tick = ctx.ledger.evaluations(conn, rollout.id)
        running_p = ctx.ledger.last_stat(conn, rollout.id, "running_p_values") or {}
        if tick is not None and last_tick is not None and tick <= last_tick:
            return None
        try:
            obs = observe(ctx, conn, rollout, policy, assignment, versions_by_role, now, label_window_s)
        except SQLAlchemyError as exc:
            failure = f"metrics could not be read: {exc.__class__.__name__}"
    return Reading(evaluations, last_tick, running_p, obs, failure, tuple(backlog))


def compared_versions(rollout: Rollout, assignment: Assignment) -> dict[str, int | None]:
    """The versions a rollout compares: its baseline and candidate, and the control in force."""
    return {
        "baseline": rollout.baseline_version,
        "canary": rollout.candidate_version,
        "control": assignment.control.version,
    }


def attribution_window_s(ctx: Context, policy: Policy) -> float:
    """The attribution window: the policy's own, else the setting."""
    return ctx.settings.label_window_s if policy.label_window_s is None else policy.label_window_s


def _history(ctx: Context, conn: Connection, rollout: Rollout) -> list[tuple[float, int]]:
    """(when, canary weight) of the rollout's start and each advance, from the ledger: its ramp steps."""
    return ctx.ledger.step_history(conn, rollout.id) or [(rollout.started_at, rollout.canary_weight)]


def _settled(
    ctx: Context, conn: Connection, rollout: Rollout, history: list[tuple[float, int]]
) -> list[float | None]:
    """When each step's weights were surely in force. An advance is recorded before it is applied (the
    traffic write, then the registry's aliases: tens of seconds under load), and the step's clock starts
    once it is applied and the log has settled (`step_started_at`); the next decision is recorded only
    after that, under the action lock. So: the current step's own start, and for an earlier step the
    first decision after its advance, plus the settling."""
    times = ctx.ledger.decision_times(conn, rollout.id)
    out: list[float | None] = [None]  # the first step's weights were in force from the window's start
    for i, (ts, _) in enumerate(history[1:], start=1):  # (`history` may begin after a shadow phase)
        if i == len(history) - 1:
            out.append(rollout.step_started_at)
        else:
            after = [t for t in times if t > ts]
            out.append(after[0] + SETTLE_S if after else None)
    return out


def observe(
    ctx: Context,
    conn: Connection,
    rollout: Rollout,
    policy: Policy,
    assignment: Assignment,
    versions_by_role: dict[str, int | None],
    now: float,
    label_window_s: float,
) -> Observations:
    """decide()'s inputs for the rollout: its window read through the aggregates, per ramp step."""
    since = policy.window_start(rollout.started_at, now)
    shadow = rollout.phase is Phase.SHADOW
    if shadow:
        # from when the mirror was in force (the deploy before it takes a while): both arms, same requests
        since = max(since, rollout.step_started_at)
    control_weight = assignment.control.weight if versions_by_role.get("control") else 0
    ramp = policy.is_sequential and not shadow
    history = _history(ctx, conn, rollout)
    lead = next((i for i, (_, w) in enumerate(history) if w > 0), len(history) - 1)
    if not shadow and lead:
        # After a shadow phase (the steps at weight 0 before the first weighted one) the split's window
        # begins once the first step's weights were surely in force, and the steps count from there.
        since = max(since, _settled(ctx, conn, rollout, history)[lead] or history[lead][0])
        history = history[lead:]
    periods = observations.ramp_periods(history, since, control_weight) if ramp else ()
    return observations.read_observations(
        queries.SqlMetricsSource(conn),
        versions=versions_by_role,
        since=since,
        step_since=rollout.step_started_at,
        now=now,
        label_window_s=label_window_s,
        settle_s=ctx.settings.log_settle_s,
        step_weights=assignment.weights,
        periods=periods,
        period_settled=_settled(ctx, conn, rollout, history) if ramp else (),
        # in the shadow phase the candidate's numbers are its answers to the mirrored copies
        routes={"canary": SHADOW_ROUTE} if shadow else None,
        # a ranking policy reads its users' ranking sums too (CTR at its k)
        metric_k=policy.metric_k if policy.decision_metric.ranking else None,
    )


def replaying(backlog: tuple[Backlog, ...]) -> str:
    """Why nothing is decided while a Bento's log replays rows it spilled."""
    return (
        "the prediction log is still replaying rows spilled while the database was unreachable ("
        + "; ".join(map(str, backlog))
        + "): the arms would be counted unevenly, so nothing is decided until it has"
    )
