"""Users as the unit: the header's validation, the keyed hash, per-user aggregates in SQL, the estimator."""

from __future__ import annotations

import functools
import json

import numpy as np
import pytest
from starlette.applications import Starlette
from starlette.testclient import TestClient

from bentos.http import RequestGate, current_request
from control_plane import queries
from control_plane.analysis.user_level import (
    USER_BUCKET_S,
    ArmUsers,
    RatioSums,
    UserEvidence,
    ratio_estimate,
)
from control_plane.users import MAX_USER_ID_CHARS, UserKeyer, user_id_problem
from tests.prediction_rows import insert_rows, prediction

T0 = 1_000_000 * USER_BUCKET_S


class _State:
    model_version = 3

    def current_role(self) -> str:
        return "canary"

    def request_finished(self, info, status: int) -> None:
        pass

    def log_state(self) -> dict:
        return {}

    def answer(self, info, body: bytes) -> tuple[int, bytes]:
        """The gate answers model requests itself: what the handler would see of the user."""
        assert current_request.get() is info
        return 200, json.dumps({"user": info.user}).encode()


@pytest.fixture
def client():
    app = Starlette()
    app.add_middleware(RequestGate, endpoints={"/predict": "predict"}, max_body_bytes=100, state=_State)
    with TestClient(app) as c:
        yield c


def test_a_valid_user_id_reaches_the_handler(client):
    for user in ("u-1", "alice@example.com", "tenant:42.x_y", "x" * MAX_USER_ID_CHARS):
        r = client.post("/predict", content=b"{}", headers={"X-User-Id": user})
        assert r.status_code == 200 and r.json() == {"user": user}
    assert client.post("/predict", content=b"{}").json() == {"user": None}


@pytest.mark.parametrize(
    ("bad", "names"),
    [
        (b"", "empty"),
        (b"x" * (MAX_USER_ID_CHARS + 1), "129 characters"),
        (b"a b", "' '"),
        (b"a/b", "'/'"),
        ("caf\u00e9".encode(), "only letters"),
    ],
)
def test_an_unusable_user_id_is_a_400_naming_the_problem(client, bad, names):
    r = client.post("/predict", content=b"{}", headers={b"x-user-id": bad})
    assert r.status_code == 400
    assert "X-User-Id" in r.json()["error"] and names in r.json()["error"]


def test_user_id_problem_accepts_exactly_the_documented_alphabet():
    assert user_id_problem("Az09._:@-") is None
    assert user_id_problem("a\tb") is not None and user_id_problem("a;b") is not None


def test_the_keyed_hash_is_stable_per_key_and_differs_between_keys():
    one, other = UserKeyer.from_secret("k1"), UserKeyer.from_secret("k2")
    assert one.user_key("u1") == UserKeyer.from_secret("k1").user_key("u1")
    assert len(one.user_key("u1")) == 32 and int(one.user_key("u1"), 16) >= 0
    assert one.user_key("u1") != one.user_key("u2") and one.user_key("u1") != other.user_key("u1")


# --- the estimator ----------------------------------------------------------------------------------


def test_one_request_per_user_gives_the_binomial_variance():
    rng = np.random.default_rng(1)
    y = rng.random(5000) < 0.7
    est = ratio_estimate(RatioSums.of(y.astype(float), np.ones(5000)))
    binomial = est.mean * (1 - est.mean) / 5000
    assert est.mean == pytest.approx(y.mean())
    assert est.variance == pytest.approx(binomial, rel=1e-3)


def test_the_delta_method_variance_matches_the_spread_over_replications_with_heavy_users():
    rng = np.random.default_rng(2)
    means, variances = [], []
    for _ in range(400):
        n = np.where(rng.random(300) < 0.05, 200, 2)  # a few heavy users make most requests
        p = np.clip(rng.normal(0.7, 0.15, 300), 0, 1)  # each user's own rate
        y = rng.binomial(n, p)
        est = ratio_estimate(RatioSums.of(y, n))
        means.append(est.mean)
        variances.append(est.variance)
    empirical = np.var(means)
    assert np.mean(variances) == pytest.approx(empirical, rel=0.2)
    naive = np.mean([m * (1 - m) for m in means]) / np.mean([2 * 0.95 * 300 + 200 * 0.05 * 300])
    assert empirical > 3 * naive  # what a request-level test would have assumed


def test_evidence_needs_both_arms():
    arm = ArmUsers(users=10, requests=20, accuracy=RatioSums.of([1, 2], [2, 2]))
    assert UserEvidence({"canary": arm}).accuracy_diff() is None
    diff, var = UserEvidence({"canary": arm, "baseline": arm}).accuracy_diff()
    assert diff == 0 and var > 0


# --- per-user aggregates in SQL ---------------------------------------------------------------------


def _row(i: int, ts: float, user: str | None, role: str = "baseline", score: float = 0.8) -> dict:
    version = {"baseline": 1, "canary": 2}[role]
    status = 200 if i % 10 else 503
    return prediction(
        f"r{i}", ts, version=version, role=role, score=score, latency_ms=2.0, status=status, user_key=user
    )


def test_user_aggregates_follow_the_rows_and_read_back_per_arm(engine):
    check_user_aggregates(engine, functools.partial(insert_rows, engine))


def check_user_aggregates(engine, insert) -> None:
    """Rows written in two batches by `insert`, labelled, closed; the per-arm user sums read back."""
    step_start = T0 + 1000
    rows = []
    # u0: 30 requests on the baseline before the step; u1: 5 on the canary after it; u2 moved
    # baseline -> canary at the step (first seen before it); anonymous requests count in no user.
    for i in range(30):
        rows.append(_row(i, T0 + i, "u0"))
    for i in range(30, 35):
        rows.append(_row(i, step_start + i, "u1", "canary", score=0.2))
    rows.append(_row(40, T0 + 5, "u2"))
    rows.append(_row(41, step_start + 5, "u2", "canary"))
    rows += [_row(100 + i, T0 + i, None) for i in range(50)]
    for chunk in (rows[:20], rows[20:]):  # two batches: the sums add up
        insert(chunk)
    with engine.begin() as conn:
        queries.insert_labels_rows(
            conn, [{"request_id": r["request_id"], "label": 1, "ts": r["ts"]} for r in rows]
        )
    queries.close_label_windows(engine, window_s=60, now=T0 + 3 * USER_BUCKET_S, settle_s=0, start_at=T0)
    with engine.connect() as conn:
        arms = queries.SqlMetricsSource(conn).users(T0, T0 + 2 * USER_BUCKET_S, 60, step_start=step_start)
    base, canary = arms[(1, "baseline")], arms[(2, "canary")]
    assert (base.users, base.requests) == (2, 31)
    assert (canary.users, canary.requests) == (2, 6)
    assert base.new_users == 0 and canary.new_users == 1  # u2 counts where it was first assigned
    # closed predictions that were served (status < 500), per user: correct when score >= 0.5 and label 1
    served = [r for r in rows if r["user_key"] and r["status"] < 500]
    for role, arm in (("baseline", base), ("canary", canary)):
        per_user: dict[str, list[int]] = {}
        for r in served:
            if r["role"] == role:
                per_user.setdefault(r["user_key"], []).append(int(r["score"] >= 0.5))
        expected = RatioSums.of([sum(v) for v in per_user.values()], [len(v) for v in per_user.values()])
        assert arm.accuracy == expected


# --- decide() with users ----------------------------------------------------------------------------


def _obs(users):
    from control_plane.analysis.aggregates import LatencyHistogram
    from control_plane.analysis.types import ArmObservation, Observations

    lat = LatencyHistogram.of([10.0] * 5000)

    def arm(v, correct):
        return ArmObservation(v, 20000, 0, lat, 20000, correct, step_requests=10000)

    return Observations(
        now=10_000.0,
        window_start=0.0,
        window_end=10_000.0,
        arms={"baseline": arm(1, 15600), "canary": arm(2, 16400)},
        step_weights={"baseline": 50, "canary": 50},
        users=users,
    )


def test_decide_takes_users_as_the_unit_when_requests_name_them():
    from control_plane.analysis.decide import decide
    from control_plane.analysis.policy import Policy
    from control_plane.analysis.types import Phase, RolloutState

    state = RolloutState(Phase.PROGRESSING, 2, 50, 0.0, 0.0)
    by_requests = decide(state, _obs(None), Policy())
    # the same totals from 20 users an arm, one of whom made half the requests
    n = [10000] + [526] * 19
    heavy = {
        "baseline": ArmUsers(20, 20000, 20, RatioSums.of([9000] + [347] * 19, n)),
        "canary": ArmUsers(20, 20000, 20, RatioSums.of([9800] + [347] * 19, n)),
    }
    by_users = decide(state, _obs(UserEvidence(heavy)), Policy())
    assert by_requests.action.value == "promote" and by_requests.stats["unit"] == "request"
    assert by_users.stats["unit"] == "user" and by_users.action.value != "promote"
    assert by_users.stats["users"]["canary"] == {"users": 20, "requests": 20000, "new_users": 20}
    assert by_users.stats["accuracy"]["upper"] - by_users.stats["accuracy"]["lower"] > 3 * (
        by_requests.stats["accuracy"]["upper"] - by_requests.stats["accuracy"]["lower"]
    )
    # the sample-ratio check counts users first assigned in the step
    skewed = {**heavy, "canary": ArmUsers(5000, 20000, 5000, heavy["canary"].accuracy)}
    skewed["baseline"] = ArmUsers(9000, 20000, 9000, heavy["baseline"].accuracy)
    halted = decide(state, _obs(UserEvidence(skewed)), Policy())
    assert halted.action.value == "halt" and "users first assigned" in halted.reason
