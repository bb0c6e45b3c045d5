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

Pure functions and values; no I/O. decide.py takes `UserEvidence` for the canary and the baseline.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

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
    closed: int
    correct: int


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


def user_label_facts(keys: Iterable[UserKey], correct: Iterable[bool]) -> dict[UserKey, UserLabels]:
    """Sum closed predictions (one key and whether it was right, each) per user key."""
    out: dict[UserKey, UserLabels] = {}
    for key, ok in zip(keys, correct, strict=True):
        seen = out.get(key, UserLabels(0, 0))
        out[key] = UserLabels(seen.closed + 1, seen.correct + int(ok))
    return out


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


def with_singletons(s: RatioSums, labelled: int, correct: int) -> RatioSums:
    """`s` plus the arm's predictions that named no user, each a cluster of its own (n = 1): `labelled`
    and `correct` are the arm's totals, users' and anonymous alike."""
    n, y = max(labelled - s.n, 0.0), min(max(correct - s.y, 0.0), max(labelled - s.n, 0.0))
    return RatioSums(s.users + int(n), s.n + n, s.y + y, s.nn + n, s.yy + y, s.yn + y)


@dataclass(frozen=True)
class ArmEstimate:
    """An arm's ratio and the variance of that estimate, with the users and units behind it."""

    mean: float
    variance: float
    users: int
    units: float


def ratio_estimate(s: RatioSums) -> ArmEstimate:
    """R = y / n and its delta-method variance, users as clusters (module docstring)."""
    if s.users == 0 or s.n <= 0:
        return ArmEstimate(float("nan"), float("inf"), s.users, s.n)
    r = s.y / s.n
    if s.users < 2:
        return ArmEstimate(r, float("inf"), s.users, s.n)
    resid = max(s.yy - 2 * r * s.yn + r * r * s.nn, 0.0)
    # Never below the binomial variance of the same units: a user-level test must not be bolder than
    # the request-level one when users happen to agree within themselves more than chance would.
    floor = r * (1 - r) / s.n
    return ArmEstimate(r, max(s.users / (s.users - 1) * resid / (s.n * s.n), floor), s.users, s.n)


def diff_estimate(canary: ArmEstimate, baseline: ArmEstimate) -> tuple[float, float]:
    """Canary minus baseline, and the variance of that difference (independent arms)."""
    return canary.mean - baseline.mean, canary.variance + baseline.variance


@dataclass(frozen=True)
class ArmUsers:
    """One arm's users in a window: counts for the ledger and the SRM check, sums for the tests."""

    users: int = 0  # distinct users with a request in the window
    requests: int = 0  # their requests
    new_users: int = 0  # users whose first request (in any arm) came since the current step began
    accuracy: RatioSums = field(default_factory=RatioSums)  # y = correct, n = closed per user

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
        c, b = self.arms.get("canary"), self.arms.get("baseline")
        if c is None or b is None or c.accuracy.users == 0 or b.accuracy.users == 0:
            return None
        est = {}
        for role, arm in (("canary", c), ("baseline", b)):
            sums = arm.accuracy if totals is None else with_singletons(arm.accuracy, *totals[role])
            est[role] = ratio_estimate(sums)
        return diff_estimate(est["canary"], est["baseline"])

    def new_users(self) -> dict[str, int]:
        return {role: arm.new_users for role, arm in self.arms.items()}
