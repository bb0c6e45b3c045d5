"""The user as the unit: per-user totals as data arrives, and per-arm means with delta-method variance.

Requests from one user are not independent (a heavy user's 500 requests share that user's taste), so
a test that counts requests as units understates the variance of a per-request rate and promotes noise
when a few users make many of the requests. Here each (user, arm) is one cluster: the arm's accuracy
is still the ratio of sums R = sum(c_i) / sum(n_i) over its users i (n_i closed predictions, c_i of them
correct), and its variance is the delta method's (the cluster-robust sandwich for a ratio):

    Var(R) = N / (N - 1) * sum((c_i - R n_i)^2) / (sum n_i)^2
           = N / (N - 1) * (S_cc - 2 R S_cn + R^2 S_nn) / S_n^2

so an arm needs only six sums over its users (`RatioSums`), which SQL computes from the per-user
aggregate tables (queries.SqlMetricsSource.users) and the simulation from its draws. With one request
per user it is the binomial variance p(1 - p)/n up to N/(N - 1).

A /recommend ranking metric (analysis/ranking.py) is the same ratio over closed exposures: n_i the user's
exposures, y_i the sum of the metric's per-exposure values (CTR@k: clicks at position <= k; MRR:
1/position; NDCG: 1/log2(1 + position)); `RankingUsers` holds its six sums per metric, and the floor is
the request-level test's per-exposure variance instead of R(1 - R).

Pure functions and values; no I/O. decide.py takes `UserEvidence` for the canary and the baseline.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np

from control_plane.analysis.aggregates import SparseCounts

# Width of a per-user aggregate bucket: a user-level window is read in whole buckets of this width
# (its start rounded down to it); one row per active user and bucket.
USER_BUCKET_S = 900


@dataclass(frozen=True)
class UserKey:
    """What a per-user aggregate row is kept per."""

    bucket_start: int
    user_key: str
    model_version: int
    role: str
    route: str

    def row(self) -> tuple:
        return (self.bucket_start, self.user_key, self.model_version, self.role, self.route)


@dataclass(frozen=True)
class UserRequests:
    requests: int
    errors: int
    first_ts: float


@dataclass(frozen=True)
class UserLabels:
    """A user key's closed predictions: how many and how many right; of them the closed /recommend
    exposures (`ranked`) and the sums of their reciprocal ranks and NDCG gains (0 without a click)."""

    closed: int
    correct: int
    ranked: int = 0
    mrr: float = 0.0
    ndcg: float = 0.0


@dataclass(frozen=True)
class UserClickKey:
    """What a per-user click count is kept per: a user key and the click's position (1 = first)."""

    user: UserKey
    position: int

    def row(self) -> tuple:
        return (*self.user.row(), self.position)


@dataclass(frozen=True)
class UserLabelFacts:
    """What the label job adds per user: closed predictions per user key, and the clicks of the user's
    closed /recommend exposures counted per position (CTR@k for any k is read from these)."""

    labels: dict[UserKey, UserLabels] = field(default_factory=dict)
    clicks: dict[UserClickKey, int] = field(default_factory=dict)


def user_bucket(ts: float) -> int:
    return int(ts // USER_BUCKET_S) * USER_BUCKET_S


def user_request_facts(rows: Iterable[tuple]) -> dict[UserKey, UserRequests]:
    """Sum prediction-log rows (the table's column order, user_key the 11th) per user key; rows without a
    user are left out."""
    out: dict[UserKey, UserRequests] = {}
    for row in rows:
        user = row[10] if len(row) > 10 else None
        if user is None:
            continue
        ts, status = float(row[1]), int(row[9])
        key = UserKey(user_bucket(ts), user, int(row[2]), row[3], row[4])
        seen = out.get(key)
        err = int(status >= 500)
        out[key] = (
            UserRequests(1, err, ts)
            if seen is None
            else UserRequests(seen.requests + 1, seen.errors + err, min(seen.first_ts, ts))
        )
    return out


def user_label_facts(
    keys: Iterable[UserKey],
    correct: Iterable[bool],
    ranked: Iterable[bool] | None = None,
    click_position: Iterable[int] | None = None,
) -> UserLabelFacts:
    """Sum closed predictions per user key: one key and whether it was right each, and, when given,
    whether it was a /recommend exposure and the position of its click within the window (0: none)."""
    keys, correct = list(keys), list(correct)
    ranked = [False] * len(keys) if ranked is None else list(ranked)
    pos = [0] * len(keys) if click_position is None else [int(p) for p in click_position]
    labels: dict[UserKey, UserLabels] = {}
    clicks: dict[UserClickKey, int] = {}
    for key, ok, exposure, p in zip(keys, correct, ranked, pos, strict=True):
        seen = labels.get(key, UserLabels(0, 0))
        clicked = bool(exposure) and p >= 1
        labels[key] = UserLabels(
            seen.closed + 1,
            seen.correct + int(ok),
            seen.ranked + int(bool(exposure)),
            seen.mrr + (1.0 / p if clicked else 0.0),
            seen.ndcg + (1.0 / math.log2(1.0 + p) if clicked else 0.0),
        )
        if clicked:
            ck = UserClickKey(key, p)
            clicks[ck] = clicks.get(ck, 0) + 1
    return UserLabelFacts(labels, clicks)


@dataclass(frozen=True)
class RatioSums:
    """Sums over an arm's users of a per-user ratio's numerator y_i and denominator n_i."""

    users: int = 0
    n: float = 0.0
    y: float = 0.0
    nn: float = 0.0
    yy: float = 0.0
    yn: float = 0.0

    @classmethod
    def of(cls, y: Iterable[float], n: Iterable[float]) -> RatioSums:
        """From per-user totals (users with n_i = 0 are not units of this ratio)."""
        ya, na = np.asarray(list(y), dtype=float), np.asarray(list(n), dtype=float)
        keep = na > 0
        ya, na = ya[keep], na[keep]
        return cls(int(keep.sum()), na.sum(), ya.sum(), (na * na).sum(), (ya * ya).sum(), (ya * na).sum())


def with_singletons(s: RatioSums, labelled: float, correct: float, squares: float | None = None) -> RatioSums:
    """`s` plus the arm's units that named no user, each a cluster of its own (n = 1): `labelled` and
    `correct` are the arm's totals (units and their values' sum), users' and anonymous alike. `squares`
    is the anonymous units' sum of squared values; None: values are 0 or 1 (accuracy, CTR@k), so it is
    their sum."""
    n = max(labelled - s.n, 0.0)
    y = min(max(correct - s.y, 0.0), n)
    yy = y if squares is None else min(max(squares, 0.0), y)  # values in [0, 1]: y^2 <= y
    return RatioSums(s.users + int(n), s.n + n, s.y + y, s.nn + n, s.yy + yy, s.yn + y)


@dataclass(frozen=True)
class ArmEstimate:
    """An arm's ratio and the variance of that estimate, with the users and units behind it."""

    mean: float
    variance: float
    users: int
    units: float


def ratio_estimate(s: RatioSums, unit_var: float | None = None) -> ArmEstimate:
    """R = y / n and its delta-method variance, users as clusters (module docstring). `unit_var` is the
    per-unit variance of the request-level test (None: a 0/1 outcome's R(1 - R))."""
    if s.users == 0 or s.n <= 0:
        return ArmEstimate(float("nan"), float("inf"), s.users, s.n)
    r = s.y / s.n
    if s.users < 2:
        return ArmEstimate(r, float("inf"), s.users, s.n)
    resid = max(s.yy - 2 * r * s.yn + r * r * s.nn, 0.0)
    # Never below the binomial variance of the same units: a user-level test must not be bolder than
    # the request-level one when users happen to agree within themselves more than chance would.
    floor = (r * (1 - r) if unit_var is None else unit_var) / s.n
    return ArmEstimate(r, max(s.users / (s.users - 1) * resid / (s.n * s.n), floor), s.users, s.n)


def diff_estimate(canary: ArmEstimate, baseline: ArmEstimate) -> tuple[float, float]:
    """Canary minus baseline, and the variance of that difference (independent arms)."""
    return canary.mean - baseline.mean, canary.variance + baseline.variance


@dataclass(frozen=True)
class RankingUsers:
    """An arm's users' sums for the /recommend ranking metrics (analysis/ranking.py): per user, n_i its
    closed exposures and y_i the sum of the metric's per-exposure values (CTR@k: clicks at position <= k;
    MRR: 1/position; NDCG: 1/log2(1 + position)); and the users' clicks per position over the arm, from
    which the users' sum of squared values follows (for the exposures that named no user)."""

    k: int = 10  # the k of `ctr`
    ctr: RatioSums = field(default_factory=RatioSums)
    mrr: RatioSums = field(default_factory=RatioSums)
    ndcg: RatioSums = field(default_factory=RatioSums)
    clicks: SparseCounts = field(default_factory=SparseCounts)

    def sums(self, metric: str, k: int) -> RatioSums | None:
        """The per-user sums of `metric` (a ranking.Metric value); None for CTR at another k."""
        if metric == "ctr_at_k":
            return self.ctr if k == self.k else None
        return {"mrr": self.mrr, "ndcg": self.ndcg}.get(metric)


@dataclass(frozen=True)
class MetricTotals:
    """An arm's totals over all its units, users' and anonymous: how many, the sum of their values, and
    the anonymous units' sum of squared values (None: values are 0 or 1)."""

    units: float
    total: float
    anonymous_squares: float | None = None
    unit_var: float | None = None  # the request-level per-unit variance (None: R(1 - R))


@dataclass(frozen=True)
class ArmUsers:
    """One arm's users in a window: counts for the ledger and the SRM check, sums for the tests."""

    users: int = 0  # distinct users with a request in the window
    requests: int = 0  # their requests
    new_users: int = 0  # users whose first request (in any arm) came since the current step began
    accuracy: RatioSums = field(default_factory=RatioSums)  # y = correct, n = closed per user
    ranking: RankingUsers = field(default_factory=RankingUsers)  # n = closed exposures per user

    def accuracy_estimate(self) -> ArmEstimate:
        return ratio_estimate(self.accuracy)


@dataclass(frozen=True)
class UserEvidence:
    """What the user-level analysis adds to an evaluation: per-arm users, keyed by role."""

    arms: dict[str, ArmUsers]

    def accuracy_diff(self, totals: dict[str, tuple[int, int]] | None = None) -> tuple[float, float] | None:
        """(diff, variance) of canary minus baseline accuracy with users as the unit; None without users
        in both. `totals` (role -> (labelled, correct) over all predictions) adds the predictions that
        named no user, each its own cluster."""
        tot = None if totals is None else {r: MetricTotals(*t) for r, t in totals.items()}
        return self.ratio_diff(lambda arm: arm.accuracy, tot)

    def metric_diff(
        self, metric: str, k: int, totals: dict[str, MetricTotals] | None = None
    ) -> tuple[float, float] | None:
        """The same for a /recommend ranking metric (a ranking.Metric value; `k` for CTR@k) over closed
        exposures: y_i the user's sum of the metric's values, n_i the user's exposures."""
        return self.ratio_diff(lambda arm: arm.ranking.sums(metric, k), totals)

    def ratio_diff(
        self, pick: Callable[[ArmUsers], RatioSums | None], totals: dict[str, MetricTotals] | None
    ) -> tuple[float, float] | None:
        c, b = self.arms.get("canary"), self.arms.get("baseline")
        if c is None or b is None:
            return None
        sums = {"canary": pick(c), "baseline": pick(b)}
        if any(s is None or s.users == 0 for s in sums.values()):
            return None
        est = {}
        for role, s in sums.items():
            t = None if totals is None else totals[role]
            if t is not None:
                s = with_singletons(s, t.units, t.total, t.anonymous_squares)
            est[role] = ratio_estimate(s, None if t is None else t.unit_var)
        return diff_estimate(est["canary"], est["baseline"])

    def new_users(self) -> dict[str, int]:
        return {role: arm.new_users for role, arm in self.arms.items()}
