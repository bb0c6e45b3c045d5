"""Paired shadow analysis: the pair-key middleware in the gateway's config, the per-pair sums, the paired
always-valid accuracy test against the unpaired one, the SQL join on pair_key (SQLite) and the shadow
decision's evidence."""

from __future__ import annotations

import functools

import numpy as np
import pytest

from control_plane import queries
from control_plane.analysis.decide import decide
from control_plane.analysis.paired import (
    Moments,
    Pair,
    PairedFacts,
    paired_facts,
    paired_test,
    summary,
    top_k_overlap,
    unpaired_test,
)
from control_plane.analysis.policy import Policy
from control_plane.analysis.types import Phase, RolloutState
from control_plane.labels import record_labels
from control_plane.metrics_source import SHADOW_ROUTE, PairQuery
from control_plane.traffic.base import Backend, Mirror
from control_plane.traffic.traefik_file import (
    GATEWAY_ROUTER,
    PAIR_KEY_MIDDLEWARE,
    USERS_ROUTER,
    GatewayOptions,
    render_dynamic_config,
)
from control_plane.traffic.user_assignment import PAIR_HEADER, PLUGIN_ALIAS
from tests.prediction_rows import insert_rows, paired_row, read_step, settle_pairs
from tests.traffic_rows import FAST_POLICY

BACKENDS = {"baseline": Backend(2, "http://127.0.0.1:3102"), "canary": Backend(3, "http://127.0.0.1:3103")}
WEIGHTS = {"baseline": 100, "canary": 0}


# --- the gateway ----------------------------------------------------------------
def test_the_pair_key_middleware_runs_on_the_gateway_routers_only_while_a_mirror_runs():
    users = GatewayOptions(user_assignment=True)
    config = render_dynamic_config(BACKENDS, WEIGHTS, users, mirror=Mirror(3, 20))["http"]
    assert config["middlewares"][PAIR_KEY_MIDDLEWARE] == {
        "plugin": {PLUGIN_ALIAS: {"pairHeader": PAIR_HEADER}}
    }
    for name in (GATEWAY_ROUTER, USERS_ROUTER):
        chain = config["routers"][name]["middlewares"]
        # before the retry (and so before the mirror copies the request), after the user's assignment
        assert PAIR_KEY_MIDDLEWARE in chain and chain.index(PAIR_KEY_MIDDLEWARE) == len(chain) - 2, chain
    others = [r for n, r in config["routers"].items() if n not in (GATEWAY_ROUTER, USERS_ROUTER)]
    assert all(PAIR_KEY_MIDDLEWARE not in r.get("middlewares", []) for r in others)

    no_mirror = render_dynamic_config(BACKENDS, WEIGHTS, users)["http"]
    no_plugin = render_dynamic_config(BACKENDS, WEIGHTS, GatewayOptions(), mirror=Mirror(3, 20))["http"]
    for c in (no_mirror, no_plugin):
        assert PAIR_KEY_MIDDLEWARE not in c["middlewares"]
        assert all(PAIR_KEY_MIDDLEWARE not in r.get("middlewares", []) for r in c["routers"].values())


def test_the_plugin_source_has_the_pair_key_mode():
    from control_plane.traffic.user_assignment import PLUGIN_SOURCE

    go = (PLUGIN_SOURCE / "userassign.go").read_text()
    assert 'json:"pairHeader,omitempty"' in go and "rand.Read" in go


# --- sums -------------------------------------------------------------------------
def pair(s: float | None, b: float | None, **kw) -> Pair:
    values = dict(
        shadow_latency_ms=10.0, baseline_latency_ms=8.0, shadow_status=200, baseline_status=200, outcome=None
    )
    values.update(kw)
    return Pair(shadow_score=s, baseline_score=b, **values)


def test_paired_facts_sum_each_difference_over_the_pairs_that_have_it():
    facts = paired_facts(
        [
            pair(0.9, 0.7, outcome=1),  # both right: 0
            pair(0.4, 0.6, outcome=1),  # shadow wrong, baseline right: -1
            pair(0.2, 0.6, outcome=0, shadow_latency_ms=5.0),  # shadow right, baseline wrong: +1
            pair(0.5, 0.5, shadow_served=("a", "b", "c"), baseline_served=("c", "a", "d")),  # open
            pair(None, 0.5, shadow_status=500),  # the shadow failed: no score
            pair(None, None, shadow_status=503, baseline_status=500),
        ]
    )
    assert facts.pairs == 6
    assert facts.score_diff.n == 4
    assert facts.score_diff.total == pytest.approx(0.2 - 0.2 - 0.4 + 0.0)
    assert facts.score_diff.squares == pytest.approx(0.04 + 0.04 + 0.16)
    assert facts.score_abs_diff == pytest.approx(0.8)
    assert (facts.both_errors, facts.shadow_only_errors, facts.baseline_only_errors) == (1, 1, 0)
    assert facts.latency_diff == Moments(6, 2.0 * 5 - 3.0, 4.0 * 5 + 9.0)
    assert facts.shadow_slower == 5
    assert (facts.ranked, facts.overlap_sum) == (1, pytest.approx(2 / 3))
    assert facts.correct_diff == Moments(3, 0.0, 2.0)
    assert facts.merge(facts).correct_diff == Moments(6, 0.0, 4.0)
    assert paired_facts([]) == PairedFacts()


def test_top_k_overlap_counts_shared_items_over_the_longer_list():
    assert top_k_overlap(["a", "b"], ["b", "a"]) == 1.0
    assert top_k_overlap(["a", "b", "c", "d"], ["a", "x"]) == 0.25
    assert top_k_overlap([], []) == 1.0


# --- the paired test ---------------------------------------------------------------
def correlated_outcomes(rng: np.random.Generator, n: int, lift: float) -> tuple[np.ndarray, np.ndarray]:
    """Right (1) or wrong (0) for both versions on the same n requests: mostly the same requests are
    hard for both; the shadow gets right a `lift` share of all requests that the baseline gets wrong,
    and wrong 1 % of those the baseline gets right (so the difference has variance on both sides)."""
    base = (rng.random(n) < 0.75).astype(float)
    fixed = (base == 0) & (rng.random(n) < lift / 0.25)
    broken = (base == 1) & (rng.random(n) < 0.01)
    shadow = np.where(fixed, 1.0, np.where(broken, 0.0, base))
    return shadow, base


def first_decided(test, shadow: np.ndarray, base: np.ndarray, step: int = 50) -> int | None:
    for n in range(step, len(base) + 1, step):
        if test(shadow[:n], base[:n]).decided:
            return n
    return None


def test_the_paired_test_detects_a_difference_on_far_fewer_requests_than_the_unpaired_one():
    alpha, expected_n = 0.05, 2000
    paired_at, unpaired_at = [], []
    for seed in range(5):
        shadow, base = correlated_outcomes(np.random.default_rng(seed), 20_000, lift=0.04)
        p = first_decided(lambda s, b: paired_test(Moments.of(s - b), alpha, expected_n), shadow, base)
        u = first_decided(
            lambda s, b: unpaired_test(Moments.of(s), Moments.of(b), alpha, expected_n), shadow, base
        )
        assert p is not None, seed
        paired_at.append(p)
        unpaired_at.append(u if u is not None else 10**9)
    # the same traffic: the paired test decides with less than a third of the requests, every time
    assert all(3 * p < u for p, u in zip(paired_at, unpaired_at, strict=True)), (paired_at, unpaired_at)
    test = paired_test(Moments.of(shadow - base), alpha, expected_n)
    true_diff = 0.04 - 0.75 * 0.01  # fixed minus broken
    assert test.decided and 0 < test.lower < true_diff < test.upper and test.p < alpha


def test_the_paired_test_holds_its_error_rate_when_there_is_no_difference():
    alpha, decided = 0.05, 0
    for seed in range(100):
        rng = np.random.default_rng(1000 + seed)
        base = (rng.random(3000) < 0.75).astype(float)
        # the shadow breaks 5 % of the baseline's right answers and fixes 15 % of its wrong ones (a
        # quarter of them): as many either way, the same accuracy on other requests
        flips = rng.random(3000) < np.where(base == 1, 0.05, 0.15)
        shadow = np.where(flips, 1.0 - base, base)
        decided += (
            first_decided(lambda s, b: paired_test(Moments.of(s - b), alpha, 1000), shadow, base) is not None
        )
    assert decided <= 10  # 5 % expected at most; 10 % leaves room for the sampling of 100 runs


def test_no_pairs_or_no_variance_is_nothing_to_test():
    assert paired_test(Moments(), 0.05, 100).lower is None
    assert paired_test(Moments.of(np.zeros(50)), 0.05, 100).p is None  # every pair agrees
    assert summary(PairedFacts(), 0.05, 100)["accuracy"]["decided"] is False


# --- the SQL join ---------------------------------------------------------------------
def seed_pairs(engine) -> tuple[float, float]:
    """Baseline and shadow rows, some paired, two labels; returns (now, the window's start)."""
    now = 1_800_000_000.0
    t = now - 600
    base = [
        paired_row(t + 1, 2, "weighted", 0.8, "k1"),
        paired_row(t + 2, 2, "weighted", 0.3, "k2"),
        paired_row(t + 3, 2, "weighted", 0.6, "k3", served=["a", "b"]),
        paired_row(t + 4, 2, "weighted", 0.6, None),  # not mirrored: no key
        paired_row(t + 5, 2, "weighted", 0.6, "k5"),  # mirrored, the copy not logged (yet)
        paired_row(t + 6, 2, "override", 0.6, "k6"),  # a tester's override: not the live split
    ]
    shadow = [
        paired_row(t + 1.01, 3, SHADOW_ROUTE, 0.4, "k1", latency=9.0, role="canary"),
        paired_row(t + 2.01, 3, SHADOW_ROUTE, 0.2, "k2", latency=9.0, role="canary"),
        paired_row(t + 3.01, 3, SHADOW_ROUTE, 0.7, "k3", latency=9.0, served=["b", "c"], role="canary"),
        paired_row(t + 6.01, 3, SHADOW_ROUTE, 0.9, "k6", role="canary"),
        paired_row(t + 7.01, 3, SHADOW_ROUTE, 0.9, "k7", role="canary"),  # its baseline row is missing
        paired_row(t - 100, 3, SHADOW_ROUTE, 0.9, "k1", role="canary"),  # before the window
    ]
    insert_rows(engine, base + shadow)
    record_labels(engine, [(base[0]["request_id"], 1), (base[1]["request_id"], 1)], t + 10)
    return now, t


def test_the_shadow_copies_join_the_baseline_answers_on_their_pair_key(engine):
    now, t = seed_pairs(engine)
    assert settle_pairs(engine, now, start_at=t - 200) == 3
    with engine.connect() as conn:
        src = queries.SqlMetricsSource(conn)
        query = PairQuery(3, 2, t, now, 60.0, now)
        assert queries.raw_pairs(conn, query) == src.pairs(query)
        facts = src.pairs(query)
        open_labels = src.pairs(PairQuery(3, 2, t, now, 60.0, t + 30))  # no attribution window closed yet
        # whole buckets only, as the arms' counts: [t, t + 5) holds k1-k3, [t, t + 4.9) no whole bucket
        first_bucket = src.pairs(PairQuery(3, 2, t, t + 5, 60.0, now)).pairs
        partial = src.pairs(PairQuery(3, 2, t, t + 4.9, 60.0, now)).pairs
    assert facts.pairs == 3
    assert facts.score_diff.total == pytest.approx(-0.4 - 0.1 + 0.1)
    assert facts.latency_diff == Moments(3, 12.0, 48.0)
    assert (facts.ranked, facts.overlap_sum) == (1, pytest.approx(0.5))
    # k1: label 1, shadow 0.4 wrong, baseline 0.8 right (-1); k2: both wrong (0); k3: no label, outcome 0:
    # shadow 0.7 wrong, baseline 0.6 wrong (0)
    assert facts.correct_diff == Moments(3, -1.0, 1.0)
    assert open_labels.correct_diff == Moments() and open_labels.pairs == 3
    assert (first_bucket, partial) == (3, 0)


def test_the_shadow_decision_reports_the_pairs_and_gates_as_before(engine):
    now = 1_800_000_000.0
    t = now - 300
    rng = np.random.default_rng(7)
    rows = []
    for i in range(400):
        ts = t + i * 0.5
        b = float(rng.random())
        rows.append(paired_row(ts, 2, "weighted", b, f"p{i}"))
        rows.append(paired_row(ts + 0.01, 3, SHADOW_ROUTE, min(1.0, b + 0.05), f"p{i}", role="canary"))
    insert_rows(engine, rows)
    settle_pairs(engine, now, start_at=t)
    policy = Policy.from_dict({**FAST_POLICY, "shadow_percent": 100, "shadow_min_duration_s": 60})
    with engine.connect() as conn:
        read = functools.partial(
            read_step,
            conn,
            versions={"baseline": 2, "canary": 3},
            since=t,
            now=now,
            label_window_s=60.0,
            step_weights={"baseline": 100, "canary": 0},
        )
        obs, plain = read(routes={"canary": SHADOW_ROUTE}), read()
    assert plain.pairs is None  # not a shadow phase: nothing is paired
    state = RolloutState(Phase.SHADOW, 0, 0, t, t)
    d = decide(state, obs, policy)
    p = d.stats["shadow"]["paired"]
    assert p["pairs"] == 400 and p["score"]["n"] == 400
    assert 0.03 < p["score"]["mean_diff"] <= 0.05 and p["errors"]["shadow_only"] == 0
    assert "paired on 400 identical requests" in d.reason
    without = decide(state, type(obs)(**{**obs.__dict__, "pairs": None}), policy)
    assert (without.action, without.next_weight) == (d.action, d.next_weight)
