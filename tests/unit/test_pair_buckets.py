"""The paired sums kept per bucket (pair_buckets, pair_label_buckets) by the pair job (queries.sum_pairs):
the bucket read equals the raw rows' recomputation on the same data, the job sums each bucket once as
it settles (and its outcomes once their windows closed), the read needs no raw row, retention prunes
them with the fine buckets, and the evaluation and the scheduled upkeep keep them current."""

from __future__ import annotations

import dataclasses
import math
import uuid

import numpy as np
import pytest

from control_plane import queries, retention, services
from control_plane.analysis.aggregates import BUCKET_S
from control_plane.analysis.paired import CorrectCounts, Moments, PairedFacts
from control_plane.metrics_source import SHADOW_ROUTE, PairQuery
from tests.prediction_rows import PAIR_SETTLE_S, insert_rows, paired_row, settle_pairs
from tests.traffic_rows import FAST_POLICY
from tests.unit.test_services import ctx  # noqa: F401  (the fixture)

WINDOW_S = 60.0


def shadow_traffic(engine, t0: float, seconds: int, per_s: int, seed: int = 1) -> list[dict]:
    """`per_s` live requests a second for `seconds` from t0, each mirrored to the shadow (v3) with the
    same pair key a few ms later, with errors on either side, /recommend lists, unmirrored and
    override requests, copies whose live row is missing, and labels arriving within the attribution
    window or after it. Every live request starts at least 0.1 s inside its bucket, so a pair's two
    rows and its window's close fall in the same bucket (no pair straddles one: see `pairs`)."""
    rng = np.random.default_rng(seed)
    base, shadow, labels = [], [], []
    for i in range(seconds * per_s):
        ts = t0 + i / per_s
        if ts % BUCKET_S < 0.1 or ts % BUCKET_S > BUCKET_S - 0.2:
            continue
        key = f"k{seed}-{i}"
        kind = rng.random()
        ranked = kind < 0.3
        served = [f"i{j}" for j in rng.choice(8, 3, replace=False)] if ranked else None
        b_err, s_err = rng.random() < 0.03, rng.random() < 0.05
        b_score = None if b_err else float(rng.random())
        s_score = None if s_err else float(np.clip((b_score or 0.5) + rng.normal(0.02, 0.1), 0, 1))
        if kind > 0.97:  # a tester's override: not the live split
            base.append(paired_row(ts, 2, "override", b_score, key))
        elif kind > 0.95:  # not mirrored
            base.append(paired_row(ts, 2, "weighted", b_score, None))
            continue
        elif kind > 0.93:  # the live row never logged
            pass
        else:
            live = paired_row(ts, 2, "weighted", b_score, key, status=500 if b_err else 200,
                              latency=float(rng.gamma(4, 1.5)), served=served)  # fmt: skip
            base.append(live)
            if not b_err and rng.random() < 0.6:
                late = rng.random() < 0.2
                labels.append((live["request_id"], int(rng.random() < 0.4), ts + (90 if late else 20)))
        shadow.append(
            paired_row(ts + float(rng.uniform(0.001, 0.05)), 3, SHADOW_ROUTE, s_score, key, role="canary",
                       status=500 if s_err else 200, latency=float(rng.gamma(4, 1.6)),
                       served=None if served is None else list(rng.permutation(served)))
        )  # fmt: skip
    with engine.begin() as conn:
        queries.insert_predictions(conn, base + shadow)
        queries.insert_labels_rows(conn, [{"request_id": r, "label": y, "ts": t} for r, y, t in labels])
    return base + shadow


def assert_same(got: PairedFacts, want: PairedFacts) -> None:
    """Equal counts; sums equal up to the order they were added in."""
    for field in dataclasses.fields(PairedFacts):
        g, w = getattr(got, field.name), getattr(want, field.name)
        if isinstance(w, Moments):
            assert (g.n, g.total, g.squares) == (w.n, pytest.approx(w.total), pytest.approx(w.squares)), field
        elif isinstance(w, float):
            assert g == pytest.approx(w), field.name
        else:
            assert g == w, field.name


T0 = 1_800_000_000.0


def test_the_bucket_read_equals_the_raw_rows_recomputed_on_the_same_data(engine):
    shadow_traffic(engine, T0, 300, 20)
    now = T0 + 600
    assert settle_pairs(engine, now, start_at=T0) > 4000
    with engine.connect() as conn:
        src = queries.SqlMetricsSource(conn)
        checked = []
        for since, until, labels_before in [
            (T0, now, now),  # everything, every window closed
            (T0 + 12.3, T0 + 201.7, T0 + 150),  # part-buckets at the edges; some windows open
            (T0, T0 + 300, T0 + 60),  # no window closed yet
            (T0 + 100, T0 + 105, now),  # one bucket
            (T0 + 100, T0 + 104.9, now),  # no whole bucket
        ]:
            query = PairQuery(3, 2, since, until, WINDOW_S, labels_before)
            want = queries.raw_pairs(conn, query)
            assert_same(src.pairs(query), want)
            checked.append(want)
    everything, partial, unlabelled, one, none = checked
    assert everything.pairs > 4000 and everything.correct_diff.n > 2000
    assert everything.both_errors > 0 and everything.shadow_only_errors > 0 and everything.ranked > 1000
    assert 0 < partial.correct_diff.n < partial.pairs < everything.pairs
    assert unlabelled.correct_diff == Moments() and unlabelled.pairs > 0
    assert 0 < one.pairs < 100 and none == PairedFacts()


def test_the_job_sums_each_bucket_once_as_it_settles_and_its_outcomes_once_their_window_closed(engine):
    shadow_traffic(engine, T0, 300, 5)
    settled = (T0 + 200) - PAIR_SETTLE_S - queries.PAIR_SLACK_S  # what has settled at T0 + 200
    settle_pairs(engine, T0 + 200, start_at=T0)
    with engine.connect() as conn:
        src = queries.SqlMetricsSource(conn)
        mark, label_mark = (
            queries.pair_watermark(conn, 3, 2, p) for p in (queries.PAIRS_PART, int(WINDOW_S))
        )
        assert mark == math.floor(settled / BUCKET_S) * BUCKET_S
        assert label_mark == math.floor((settled - WINDOW_S) / BUCKET_S) * BUCKET_S
        got = src.pairs(PairQuery(3, 2, T0, T0 + 300, WINDOW_S, T0 + 300))
        # the pairs up to the watermark, their outcomes up to the other (their windows closed by then)
        assert_same(got, queries.raw_pairs(conn, PairQuery(3, 2, T0, mark, WINDOW_S, label_mark + WINDOW_S)))
        assert 0 < got.correct_diff.n < got.pairs
    # tick by tick (every 10 s) the same as in one go: each bucket summed once
    counts = [settle_pairs(engine, t, start_at=T0) for t in np.arange(T0 + 210, T0 + 500, 10.0)]
    assert settle_pairs(engine, T0 + 500, start_at=T0) == 0  # nothing new: nothing read, nothing added
    assert max(counts) <= 2 * 5 * 10  # a tick sums the pairs of its new buckets only
    with engine.connect() as conn:
        query = PairQuery(3, 2, T0, T0 + 300, WINDOW_S, T0 + 500)
        assert_same(queries.SqlMetricsSource(conn).pairs(query), queries.raw_pairs(conn, query))


def test_the_bucket_read_needs_no_raw_row(engine):
    shadow_traffic(engine, T0, 60, 10)
    settle_pairs(engine, T0 + 300, start_at=T0)
    query = PairQuery(3, 2, T0, T0 + 60, WINDOW_S, T0 + 300)
    with engine.connect() as conn:
        before = queries.SqlMetricsSource(conn).pairs(query)
    with engine.begin() as conn:
        conn.execute(queries.predictions.delete())
        conn.execute(queries.labels.delete())
    with engine.connect() as conn:
        assert queries.raw_pairs(conn, query) == PairedFacts()
        assert queries.SqlMetricsSource(conn).pairs(query) == before
    assert before.pairs > 400 and before.correct_diff.n > 200


def test_the_watermarks_start_at_the_shadow_phase_and_skip_to_a_later_one(engine):
    shadow_traffic(engine, T0, 120, 5)
    settle_pairs(engine, T0 + 60, start_at=T0 + 30)  # a shadow phase from T0 + 30
    with engine.connect() as conn:
        first = queries.SqlMetricsSource(conn).pairs(PairQuery(3, 2, T0, T0 + 120, WINDOW_S, T0))
        mark = queries.pair_watermark(conn, 3, 2)
    assert T0 + 50 <= mark < T0 + 60
    # another one, from T0 + 90: [mark, T0 + 90) is never read
    settle_pairs(engine, T0 + 200, start_at=T0 + 90)
    with engine.connect() as conn:
        src = queries.SqlMetricsSource(conn)
        pairs = src.pairs(PairQuery(3, 2, T0, T0 + 120, WINDOW_S, T0)).pairs
        assert (
            pairs
            == first.pairs + queries.raw_pairs(conn, PairQuery(3, 2, T0 + 90, T0 + 120, WINDOW_S, T0)).pairs
        )
        assert first.pairs == queries.raw_pairs(conn, PairQuery(3, 2, T0 + 30, mark, WINDOW_S, T0)).pairs
    assert first.pairs > 50


def test_correct_counts_hold_the_moments_of_a_minus_one_zero_one_difference():
    m = Moments.of(np.array([1, 0, -1, 1, 0, 1, -1, 0]))
    counts = CorrectCounts.of(m)
    assert counts == CorrectCounts(8, 3, 2) and counts.moments == m


def test_retention_prunes_the_paired_sums_with_the_fine_buckets(engine):
    hour = 3600.0
    now = T0 + 10 * hour
    shadow_traffic(engine, T0, 60, 2)
    shadow_traffic(engine, T0 + 8 * hour, 60, 2, seed=2)
    settle_pairs(engine, now, start_at=T0)
    policy = retention.RetentionPolicy(raw_s=9 * hour, fine_s=5 * hour, aggregate_s=24 * hour)

    def counts():
        with engine.connect() as conn:
            src = queries.SqlMetricsSource(conn)
            return [src.pairs(PairQuery(3, 2, t, t + 60, WINDOW_S, now)).pairs for t in (T0, T0 + 8 * hour)]

    old, new = counts()
    assert old > 0 and new > 0
    retention.apply(engine, policy, now, open_since=T0 - 60)  # an open rollout since before them: kept
    assert counts() == [old, new]
    retention.apply(engine, policy, now)
    assert counts() == [0, new]


SHADOW = {**FAST_POLICY, "shadow_percent": 100, "shadow_min_duration_s": 600}


def paired_minute(context, seed: int) -> None:
    """A minute of live requests on v2 each copied to the shadow (v3), ending a second before now."""
    context.clock.t += 60
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(300):
        ts = context.clock.t - 61 + i * 0.2
        key, b = uuid.uuid4().hex, float(rng.random())
        rows.append(paired_row(ts, 2, "weighted", b, key))
        rows.append(paired_row(ts + 0.01, 3, SHADOW_ROUTE, min(1.0, b + 0.05), key, role="canary"))
    insert_rows(context.engine, rows)


def test_the_evaluation_and_the_upkeep_sum_the_shadow_phase_s_pairs(ctx):  # noqa: F811
    rollout = services.start_canary(ctx, 3, SHADOW, actor="test")
    paired_minute(ctx, 1)
    assert services.evaluate(ctx, tick=1)["action"] == "hold"
    (first,) = ctx.ledger.decisions(rollout.id, limit=1)
    got = first["stats"]["shadow"]["paired"]
    with ctx.engine.connect() as conn:
        mark = queries.pair_watermark(conn, 3, 2)
        want = queries.raw_pairs(conn, PairQuery(3, 2, rollout.step_started_at, mark, 0, mark))
    # the pairs settled by the tick: all but the newest seconds'
    assert got["pairs"] == want.pairs and 200 <= got["pairs"] < 300, got
    assert got["score"]["mean_diff"] == pytest.approx(0.05, abs=0.005)
    # the stack's attribution window is 0 s here: every summed pair's outcome is known (none positive)
    assert got["accuracy"]["n"] == want.correct_diff.n == got["pairs"]
    ctx.clock.t += 30
    with ctx.engine.connect() as conn:
        logged = queries.raw_pairs(conn, PairQuery(3, 2, rollout.step_started_at, ctx.clock(), 0, 0)).pairs
    assert services.maintain(ctx)["pairs_summed"] == logged - got["pairs"] > 0  # the rest, once
    paired_minute(ctx, 2)
    services.evaluate(ctx, tick=2)
    assert ctx.ledger.decisions(rollout.id, limit=1)[0]["stats"]["shadow"]["paired"]["pairs"] > 500
