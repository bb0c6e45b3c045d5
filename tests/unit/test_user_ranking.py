"""Users as the unit for the /recommend ranking metrics: the label job's per-user sums (SQLite; the same
check runs on Postgres in tests/integration/test_users_postgres.py), the estimator with anonymous
exposures, and decide() on a heavy-user data set."""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import pytest

from control_plane import queries
from control_plane.analysis.aggregates import SparseCounts
from control_plane.analysis.decide import decide
from control_plane.analysis.policy import Policy
from control_plane.analysis.ranking import Metric, gain, metric_sums
from control_plane.analysis.types import Action
from control_plane.analysis.user_level import (
    USER_BUCKET_S,
    ArmUsers,
    MetricTotals,
    RankingUsers,
    RatioSums,
    UserEvidence,
    UserKey,
    ratio_estimate,
    user_label_facts,
    with_singletons,
)
from tests.prediction_rows import insert_rows, prediction
from tests.unit.test_decide import BIG_B, BIG_C, arm, observations, state

T0 = 1_000_000 * USER_BUCKET_S
WINDOW_S = 60


def _row(i: int, ts: float, user: str | None, role: str, endpoint: str = "recommend", status: int = 200):
    version = {"baseline": 1, "canary": 2}[role]
    return prediction(
        f"q{i}",
        ts,
        version=version,
        role=role,
        endpoint=endpoint,
        latency_ms=2.0,
        status=status,
        user_key=user,
    )


def check_user_ranking(engine, insert) -> None:
    """/recommend rows of a heavy user, light users and anonymous requests, clicked at various positions
    (some after the window), closed by the label job; the per-user ranking sums read back per arm."""
    rows, clicks = [], []  # clicks: (row, position, seconds after the prediction)
    users = {"baseline": ["b0", "b1", "b2"], "canary": ["heavy", "c1", None]}
    i = 0
    for role, names in users.items():
        for u, name in enumerate(names):
            for j in range(40 if name == "heavy" else 6):
                r = _row(i, T0 + 3 + i * 0.5, name, role)
                rows.append(r)
                i += 1
                if j % 3 == 0:
                    clicks.append((r, 1 + (i * 7 + u) % 12, 5))  # within the window, positions 1..12
                elif j % 5 == 1:
                    clicks.append((r, 1, WINDOW_S + 5))  # after it: not counted
    # a user's /predict rows and a failed /recommend are not closed exposures
    rows.append(_row(900, T0 + 10, "b0", "baseline", endpoint="predict"))
    rows.append(_row(901, T0 + 11, "b1", "baseline", status=503))
    insert(rows[:30])
    insert(rows[30:])
    with engine.begin() as conn:
        queries.insert_labels_rows(
            conn,
            [
                {"request_id": r["request_id"], "label": 1, "ts": r["ts"] + dt, "item_id": "i", "position": p}
                for r, p, dt in clicks
            ],
        )
    queries.close_label_windows(
        engine, window_s=WINDOW_S, now=T0 + 3 * USER_BUCKET_S, settle_s=0, start_at=T0
    )
    counted = {r["request_id"]: p for r, p, dt in clicks if dt <= WINDOW_S}
    for k in (3, 10):
        with engine.connect() as conn:
            arms = queries.SqlMetricsSource(conn).users(
                T0, T0 + USER_BUCKET_S, WINDOW_S, step_start=T0, ctr_k=k
            )
        for role, version in (("baseline", 1), ("canary", 2)):
            ranking = arms[(version, role)].ranking
            assert ranking.k == k
            mine = [r for r in rows if r["role"] == role and r["user_key"] and r["endpoint"] == "recommend"]
            mine = [r for r in mine if r["status"] < 500]
            per_user: dict[str, list[int]] = {}
            for r in mine:
                per_user.setdefault(r["user_key"], []).append(counted.get(r["request_id"], 0))
            for metric, got in (
                (Metric.CTR_AT_K, ranking.ctr),
                (Metric.MRR, ranking.mrr),
                (Metric.NDCG, ranking.ndcg),
            ):
                y = [sum(gain(metric, np.array([p for p in ps if p]), k)) for ps in per_user.values()]
                want = RatioSums.of(y, [len(ps) for ps in per_user.values()])
                assert got.users == want.users and got.n == want.n
                assert dataclasses.astuple(got) == pytest.approx(dataclasses.astuple(want)), (role, metric, k)
            positions = [p for ps in per_user.values() for p in ps if p]
            assert dict(zip(ranking.clicks.bins.tolist(), ranking.clicks.counts.tolist(), strict=True)) == {
                p: positions.count(p) for p in set(positions)
            }
    assert arms[(2, "canary")].ranking.ctr.users == 2  # the heavy user and c1; anonymous rows are no user


def test_the_label_job_keeps_per_user_ranking_sums_for_any_k(engine):
    check_user_ranking(engine, functools.partial(insert_rows, engine))
    with engine.connect() as conn:  # without a k (an accuracy policy's read): no ranking sums read
        plain = queries.SqlMetricsSource(conn).users(T0, T0 + USER_BUCKET_S, WINDOW_S, step_start=T0)
    assert plain[(2, "canary")].accuracy.users == 2 and plain[(2, "canary")].ranking == RankingUsers()
    with engine.begin() as conn:  # retention deletes the users' clicks with their buckets
        assert queries.delete_user_buckets_before(conn, T0 + USER_BUCKET_S) > 0
        assert conn.exec_driver_sql("SELECT count(*) FROM user_clicks").scalar() == 0


def test_user_label_facts_sum_each_metric_per_user_and_count_clicks_per_position():
    key = UserKey(T0, "u", 1, "canary", "weighted")
    facts = user_label_facts([key] * 4, [True, False, True, True], [True, True, True, False], [2, 0, 1, 1])
    got = facts.labels[key]
    assert (got.closed, got.correct, got.ranked) == (4, 3, 3)  # the 4th is a /predict row: no exposure
    assert got.mrr == pytest.approx(1 / 2 + 1) and got.ndcg == pytest.approx(1 / np.log2(3) + 1)
    assert {c.position: n for c, n in facts.clicks.items()} == {2: 1, 1: 1}


# --- the estimator ------------------------------------------------------------------------------------


def test_anonymous_exposures_are_clusters_of_one_with_their_own_squares():
    users = RatioSums.of([1.5, 0.25], [4, 2])
    # the arm: 6 users' exposures and 3 anonymous ones valued 1, 0.5, 0
    s = with_singletons(users, 9, 1.75 + 1.5, squares=1.25)
    want = RatioSums.of([1.5, 0.25, 1.0, 0.5, 0.0], [4, 2, 1, 1, 1])
    assert dataclasses.astuple(s) == pytest.approx(dataclasses.astuple(want))


def test_the_floor_is_the_request_level_unit_variance_given():
    s = RatioSums.of([0.2] * 50, [1] * 50)  # every user the same value: no spread at all
    assert ratio_estimate(s).variance == pytest.approx(0.2 * 0.8 / 50)  # a 0/1 outcome's floor
    assert ratio_estimate(s, unit_var=0.01).variance == pytest.approx(0.01 / 50)


# --- decide() -------------------------------------------------------------------------------------------


def _ranked(n: int, clicks: dict[int, int]):
    bins = np.repeat(list(clicks), list(clicks.values()))
    return dataclasses.replace(arm(n, 0.78), ranked=n, click_positions=SparseCounts.of_bins(bins))


CANARY_CLICKS = {1: BIG_C // 10, 2: BIG_C // 5}  # MRR 0.20
BASELINE_CLICKS = {1: BIG_B // 20, 2: BIG_B // 5}  # MRR 0.15
MRR_POLICY = Policy(metric="mrr", planning_accuracy=0.15, target_lift=0.02)


def _heavy_users() -> UserEvidence:
    """The same totals, every exposure naming a user: on the canary one heavy user made half the
    exposures with an MRR of 0.25; its 20 other users, like the baseline's 20, have about 0.15."""
    n_c = [BIG_C // 2] + [BIG_C // 40] * 20
    y_c = [BIG_C * 0.2 - 20 * 225.0] + [200.0, 250.0] * 10
    n_b = [BIG_B // 20] * 20
    y_b = [380.0, 430.0] * 10
    assert sum(n_c) == BIG_C and sum(n_b) == BIG_B and sum(y_b) == pytest.approx(BIG_B * 0.15)

    def arm_users(n, y, clicks):
        sums = RatioSums.of(y, n)
        ranking = RankingUsers(
            k=10, mrr=sums, clicks=SparseCounts.of_bins(np.repeat(list(clicks), list(clicks.values())))
        )
        return ArmUsers(len(n), sum(n), len(n), RatioSums.of([0.78 * x for x in n], n), ranking)

    return UserEvidence(
        {"canary": arm_users(n_c, y_c, CANARY_CLICKS), "baseline": arm_users(n_b, y_b, BASELINE_CLICKS)}
    )


def test_a_heavy_user_s_ranking_does_not_promote_with_users_as_the_unit():
    obs = observations(_ranked(BIG_C, CANARY_CLICKS), _ranked(BIG_B, BASELINE_CLICKS), 50)
    by_requests = decide(state(), obs, MRR_POLICY)
    assert by_requests.action is Action.PROMOTE and by_requests.stats["unit"] == "request"
    by_users = decide(state(), dataclasses.replace(obs, users=_heavy_users()), MRR_POLICY)
    assert by_users.stats["unit"] == "user" and by_users.action is not Action.PROMOTE, by_users.reason
    assert by_users.stats["users"]["canary"] == {"users": 21, "requests": BIG_C, "new_users": 21}
    width = by_users.stats["accuracy"]["upper"] - by_users.stats["accuracy"]["lower"]
    assert width > 5 * (by_requests.stats["accuracy"]["upper"] - by_requests.stats["accuracy"]["lower"])


def test_users_who_agree_within_themselves_do_not_make_the_ranking_test_bolder():
    # every user's MRR the arm's own: the user-level variance is floored at the request-level one
    n_c, n_b = [BIG_C // 20] * 20, [BIG_B // 20] * 20
    ev = UserEvidence(
        {
            "canary": ArmUsers(
                20, BIG_C, 20, ranking=RankingUsers(mrr=RatioSums.of([0.2 * x for x in n_c], n_c))
            ),
            "baseline": ArmUsers(
                20, BIG_B, 20, ranking=RankingUsers(mrr=RatioSums.of([0.15 * x for x in n_b], n_b))
            ),
        }
    )
    obs = observations(_ranked(BIG_C, CANARY_CLICKS), _ranked(BIG_B, BASELINE_CLICKS), 50)
    by_requests = decide(state(), obs, MRR_POLICY)
    by_users = decide(state(), dataclasses.replace(obs, users=ev), MRR_POLICY)
    assert by_users.stats["unit"] == "user" and by_users.action is Action.PROMOTE
    assert by_users.stats["accuracy"]["lower"] == pytest.approx(by_requests.stats["accuracy"]["lower"])


def test_ctr_at_another_k_than_the_users_sums_falls_back_to_requests():
    ctr = RatioSums.of([10, 20], [100, 100])
    ev = UserEvidence(
        {r: ArmUsers(2, 200, 2, ranking=RankingUsers(k=5, ctr=ctr)) for r in ("canary", "baseline")}
    )
    assert ev.metric_diff("ctr_at_k", 5) is not None
    assert ev.metric_diff("ctr_at_k", 3) is None
    totals = MetricTotals(200, 30, None, 0.15 * 0.85)
    diff, var = ev.metric_diff("ctr_at_k", 5, {"canary": totals, "baseline": totals})
    assert diff == 0 and var > 0
    obs = observations(_ranked(BIG_C, CANARY_CLICKS), _ranked(BIG_B, BASELINE_CLICKS), 50)
    d = decide(state(), dataclasses.replace(obs, users=ev), Policy(metric="ctr_at_k", metric_k=3))
    assert d.stats["unit"] == "request"


def test_the_users_squares_come_from_their_clicks_per_position():
    clicks = SparseCounts.of_bins(np.array([1, 2, 2, 4]))
    assert metric_sums(Metric.MRR, 0, clicks, 10).sum_sq == pytest.approx(1 + 2 * 0.25 + 1 / 16)


def test_only_a_ranking_policy_s_read_asks_for_the_users_ranking_sums():
    from control_plane.observations import read_observations

    asked = []

    class Source:
        def requests(self, *a, **kw):
            return {}

        def labels(self, *a, **kw):
            return {}

        def users(self, since, until, window_s, *, step_start, ctr_k=None):
            asked.append(ctr_k)
            return {}

    for k in (None, 7):
        read_observations(
            Source(),
            versions={"baseline": 1, "canary": 2},
            since=0.0,
            step_since=0.0,
            now=1000.0,
            label_window_s=60,
            step_weights={"baseline": 90, "canary": 10},
            metric_k=k,
        )
    assert asked == [None, 7]
