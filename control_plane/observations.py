"""decide()'s inputs, the API's window numbers and the charts' series, built from a MetricsSource.

The worker, the web views, `/metrics` and the simulation build them here, so they all count alike.
Windows are made of whole buckets: a bucket counts when it lies wholly in [since, until), so a window
can start up to a bucket (5 s) later and end up to a bucket earlier than asked.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from control_plane.analysis import fold
from control_plane.analysis.aggregates import LabelFacts, LatencyHistogram, RequestFacts
from control_plane.analysis.paired import PairedFacts
from control_plane.analysis.ranking import ranking_summary
from control_plane.analysis.types import ArmObservation, Observations, PeriodCounts
from control_plane.analysis.user_level import UserEvidence
from control_plane.metrics_source import SHADOW_ROUTE, WEIGHTED, MetricsSource, PairQuery


def window_ends(now: float, settle_s: float, label_window_s: float) -> tuple[float, float]:
    """Where a window's requests end, and where its labelled predictions end.

    Requests end `settle_s` short of now: each Bento's writer writes on its own clock, so the newest
    second or so holds some versions' rows and not yet others', which counted would look like a
    sample-ratio mismatch. Labelled predictions end there too, or earlier: where their attribution
    window has closed.
    """
    until = now - max(settle_s, 0.0)
    return until, min(until, now - label_window_s)


def ramp_periods(
    history: Sequence[tuple[float, int]], since: float, control_weight: int
) -> list[tuple[float, dict[str, int]]]:
    """The ramp's periods of constant weights from its step history ((when, canary weight) of the start
    and of each advance, oldest first): (start, weights the router applied then), none before `since`."""
    periods: list[tuple[float, dict[str, int]]] = []
    for i, (ts, canary) in enumerate(history):
        start = since if i == 0 else max(float(ts), since)
        weights = {"baseline": 100 - canary - control_weight, "canary": canary}
        if control_weight:
            weights["control"] = control_weight
        if periods and start <= periods[-1][0]:
            periods[-1] = (periods[-1][0], weights)  # a step that began before the window: the window's
        else:
            periods.append((start, weights))
    return periods


def _one(groups: dict, empty):
    return groups.get(None, empty)


def _by_start(key) -> int:
    return key.start


def _columns(groups: dict, *fields: str) -> list[list]:
    """Buckets grouped `_by_start`: their starts, oldest first, then each named field of their facts in
    the same order (fold's inputs)."""
    starts = sorted(groups)
    return [starts, *([getattr(groups[s], f) for s in starts] for f in fields)]


def period_counts(
    source: MetricsSource,
    version: int,
    *,
    route: str,
    since: float,
    until: float,
    labels_before: float,
    label_window_s: float,
    periods: fold.Periods,
) -> tuple[PeriodCounts, ...]:
    """One version's requests and labelled predictions per ramp period: its buckets read one by one and
    folded by `fold`, as the simulation folds the buckets it makes."""
    req = source.requests(since, until, by=_by_start, version=version, route=route)
    lab = source.labels(since, labels_before, label_window_s, by=_by_start, version=version, route=route)
    r = fold.fold_requests(*_columns(req, "requests", "errors"), since=since, until=until, periods=periods)
    lb = fold.fold_labels(
        *_columns(lab, "closed", "correct"), since=since, until=labels_before, periods=periods
    )
    # the ranking metrics' sums (exposures, clicks per position) per period, over the same buckets
    rk = fold.fold_ranking(
        *_columns(lab, "ranked", "click_positions"), since=since, until=labels_before, periods=periods
    )
    return tuple(
        PeriodCounts(
            requests=int(r.period_requests[i]),
            labelled=int(lb.period_labelled[i]),
            correct=int(lb.period_correct[i]),
            ranked=rk.period_ranked[i],
            click_positions=rk.period_click_positions[i],
            steady_requests=int(r.period_steady[i]),
        )
        for i in range(len(periods))
    )


def arm_observation(
    source: MetricsSource,
    version: int | None,
    *,
    since: float,
    step_since: float,
    until: float,
    labels_before: float,
    label_window_s: float,
    route: str = WEIGHTED,
    period_starts: Sequence[float] = (),
    period_settled: Sequence[float | None] = (),
) -> ArmObservation:
    """One version's window on one route: requests up to `until`, outcomes of windows closed before
    `labels_before`.

    With `period_starts` (the ramp steps' starts, oldest first) the requests and labelled predictions are
    also summed per period, by the bucket of the prediction's own time: the ramp-aware estimate's input.
    """
    if version is None:
        return ArmObservation(
            version=None, requests=0, errors=0, latency=LatencyHistogram(), labelled=0, correct=0
        )
    req = _one(source.requests(since, until, version=version, route=route), RequestFacts())
    step_requests = _one(
        source.requests(max(step_since, since), until, version=version, route=route), RequestFacts()
    ).requests
    lab = _one(
        source.labels(since, labels_before, label_window_s, version=version, route=route), LabelFacts()
    )
    periods: tuple[PeriodCounts, ...] = ()
    if period_starts:
        periods = period_counts(
            source,
            version,
            route=route,
            since=since,
            until=until,
            labels_before=labels_before,
            label_window_s=label_window_s,
            periods=fold.Periods.of(period_starts, period_settled),
        )
    return ArmObservation(
        version=version,
        requests=req.requests,
        errors=req.errors,
        latency=req.latency,
        labelled=lab.closed,
        correct=lab.correct,
        log_loss=lab.log_loss,
        auc=lab.auc,
        auc_max_error=lab.auc_max_error,
        step_requests=step_requests,
        scores=lab.scores_pos.merge(lab.scores_neg),
        periods=periods,
        ranked=lab.ranked,
        click_positions=lab.click_positions,
    )


def read_observations(
    source: MetricsSource,
    *,
    versions: Mapping[str, int | None],
    since: float,
    step_since: float,
    now: float,
    label_window_s: float,
    step_weights: Mapping[str, int],
    settle_s: float = 0.0,
    routes: Mapping[str, str] | None = None,
    periods: Sequence[tuple[float, Mapping[str, int]]] = (),
    assigned: Mapping[str, int] | None = None,
    period_settled: Sequence[float | None] = (),
    metric_k: int | None = None,
) -> Observations:
    """Every role's window (its ends from `window_ends`), as the decision function takes it.

    Each role counts its weighted requests, or the route `routes` names for it (a shadow candidate's
    "shadow" copies). `periods` are the ramp's steps since `since`: (start, weights in force), oldest
    first; each arm's numbers are then read per step too. `period_settled[i]`, when known, is when step
    i's weights were surely in force (its advance applied and the log settled): the requests before it
    count for the estimates but not for the sample-ratio check. `assigned` is the router's own count of
    requests per role. `metric_k`: a ranking policy's k, for the per-user ranking sums (CTR at
    that k, MRR, NDCG); None: the users' accuracy sums only.
    """
    until, labels_before = window_ends(now, settle_s, label_window_s)
    arms = {
        role: arm_observation(
            source,
            version,
            since=since,
            step_since=step_since,
            until=until,
            labels_before=labels_before,
            label_window_s=label_window_s,
            route=(routes or {}).get(role, WEIGHTED),
            period_starts=[start for start, _ in periods],
            period_settled=period_settled,
        )
        for role, version in versions.items()
    }
    return Observations(
        now=now,
        window_start=since,
        window_end=until,
        arms=arms,
        step_weights=dict(step_weights),
        users=user_evidence(source, versions, since, until, label_window_s, step_since, metric_k),
        periods=tuple((float(start), dict(w)) for start, w in periods),
        assigned=None if assigned is None else dict(assigned),
        pairs=shadow_pairs(source, versions, routes or {}, since, until, label_window_s, labels_before),
    )


def shadow_pairs(
    source: MetricsSource,
    versions: Mapping[str, int | None],
    routes: Mapping[str, str],
    since: float,
    until: float,
    label_window_s: float,
    labels_before: float,
) -> PairedFacts | None:
    """In a shadow phase (the canary read on its shadow copies), the copies paired with the baseline's
    answers to the same requests; None otherwise, or when the source cannot pair rows."""
    pairs = getattr(source, "pairs", None)
    shadow, baseline = versions.get("canary"), versions.get("baseline")
    if pairs is None or routes.get("canary") != SHADOW_ROUTE or shadow is None or baseline is None:
        return None
    return pairs(PairQuery(shadow, baseline, since, until, label_window_s, labels_before))


def user_evidence(
    source: MetricsSource,
    versions: Mapping[str, int | None],
    since: float,
    until: float,
    label_window_s: float,
    step_since: float,
    metric_k: int | None = None,
) -> UserEvidence | None:
    """Per role, the users of the window, when the source keeps per-user aggregates and requests named
    users; None otherwise (then every test counts requests). `metric_k`: read_observations'."""
    users = getattr(source, "users", None)
    if users is None:
        return None
    by_arm = users(since, until, label_window_s, step_start=step_since, ctr_k=metric_k)
    arms = {
        role: by_arm[(version, role)]
        for role, version in versions.items()
        if version is not None and (version, role) in by_arm
    }
    return UserEvidence(arms) if arms else None


def window_counts(
    source: MetricsSource,
    *,
    versions: Mapping[str, int | None],
    since: float,
    now: float,
    label_window_s: float,
    settle_s: float = 0.0,
) -> dict[str, dict]:
    """Per role: requests, errors, labelled and correct over the window (what /metrics shows)."""
    until, labels_before = window_ends(now, settle_s, label_window_s)
    evidence = user_evidence(source, versions, since, until, label_window_s, since)
    users = {} if evidence is None else evidence.arms
    out = {}
    for role, version in versions.items():
        if version is None:
            continue
        req = _one(source.requests(since, until, version=version), RequestFacts())
        requests, errors = req.requests, req.errors
        lab = _one(source.labels(since, labels_before, label_window_s, version=version), LabelFacts())
        out[role] = {
            "version": version,
            "requests": requests,
            "errors": errors,
            "error_rate": errors / requests if requests else 0.0,
            "labelled": lab.closed,
            "accuracy": lab.accuracy,
            "users": users[role].users if role in users else 0,
            # /recommend: closed exposures, their clicks, CTR@10, MRR and NDCG (analysis/ranking.py)
            "ranking": ranking_summary(lab.ranked, lab.click_positions).as_dict(),
        }
    return out


def _round(x: float | None, digits: int = 6) -> float | None:
    return None if x is None else round(x, digits)


def summarize(arm: ArmObservation) -> dict:
    """The numbers a person reads for one arm (the ledger and the API show these)."""

    def pct(q: float) -> float | None:
        return _round(arm.latency.quantile(q), 3)

    return {
        "version": arm.version,
        "requests": arm.requests,
        "errors": arm.errors,
        "error_rate": round(arm.error_rate, 6),
        "p50_ms": pct(0.50),
        "p95_ms": pct(0.95),
        "p99_ms": pct(0.99),
        "labelled": arm.labelled,
        "accuracy": _round(arm.accuracy),
        "log_loss": _round(arm.log_loss),
        "auc": _round(arm.auc),
        "auc_max_error": _round(arm.auc_max_error),
        "ranking": ranking_summary(arm.ranked, arm.click_positions).as_dict(),
    }


@dataclass(frozen=True)
class SeriesPoint:
    """One chart bucket of one logged role."""

    t: int
    role: str
    rps: float
    error_rate: float
    p99_ms: float | None
    accuracy: float | None

    def as_dict(self) -> dict:
        return {
            "t": self.t,
            "role": self.role,
            "rps": self.rps,
            "error_rate": self.error_rate,
            "p99_ms": self.p99_ms,
            "accuracy": self.accuracy,
        }


def timeseries(
    source: MetricsSource, *, since: float, now: float, bucket_s: int, label_window_s: float
) -> list[SeriesPoint]:
    """Per chart bucket and logged role: request rate, error rate, p99 latency and accuracy (for charts).

    Accuracy is shown for a chart bucket once every prediction in it has had its window closed.
    """

    def chart(key) -> tuple[int, str]:
        return key.start // bucket_s * bucket_s, key.role

    requests = source.requests(since, now, by=chart)
    labels = source.labels(since, now - label_window_s, label_window_s, by=chart)
    out = []
    for (t, role), req in sorted(requests.items()):
        closed = t + bucket_s <= now - label_window_s
        lab = labels.get((t, role), LabelFacts()) if closed else LabelFacts()
        out.append(
            SeriesPoint(
                t=t,
                role=role,
                rps=round(req.requests / bucket_s, 3),
                error_rate=round(req.errors / req.requests, 6) if req.requests else 0.0,
                p99_ms=_round(req.latency.quantile(0.99), 3),
                accuracy=_round(lab.accuracy),
            )
        )
    return out
