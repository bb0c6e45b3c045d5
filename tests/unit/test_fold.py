"""The fold of aggregate buckets into a window: edges, periods, the steady rule, per-row periods."""

from __future__ import annotations

import numpy as np

from control_plane.analysis import fold
from control_plane.analysis.aggregates import SparseCounts

STARTS = np.arange(0, 60, 5, dtype=float)  # twelve 5 s buckets: [0, 5) ... [55, 60)


def test_a_bucket_counts_only_when_wholly_inside_the_window():
    ones = np.ones(len(STARTS))
    # [7, 58): from the bucket at 10 to the one ending at 55
    assert fold.totals(STARTS, ones, since=7.0, until=58.0) == 9


def test_requests_go_to_the_period_in_force_at_their_start_and_count_as_steady_once_it_settled():
    periods = fold.Periods.of([0.0, 30.0], settled=[None, 42.0])
    sums = fold.fold_requests(STARTS, np.ones(12), np.zeros(12), since=0.0, until=60.0, periods=periods)
    assert sums.period_requests.tolist() == [6.0, 6.0]
    # period 1's buckets at 30 and 35 start before its weights settled at 42; so does 40
    assert sums.period_steady.tolist() == [6.0, 3.0]


def test_a_period_ending_inside_a_bucket_leaves_that_bucket_out_of_its_steady_requests():
    periods = fold.Periods.of([0.0, 32.0])
    sums = fold.fold_requests(STARTS, np.ones(12), np.zeros(12), since=0.0, until=60.0, periods=periods)
    assert sums.period_requests.tolist() == [7.0, 5.0]  # the bucket at 30 began in period 0
    assert sums.period_steady.tolist() == [6.0, 5.0]  # but ended after period 1 began


def test_each_row_may_have_its_own_periods_and_folds_as_on_its_own():
    rng = np.random.default_rng(0)
    values = rng.poisson(5.0, (3, 12)).astype(float)
    starts = np.array([[0.0, 20.0, np.inf], [0.0, 40.0, 50.0], [0.0, np.inf, np.inf]])
    together = fold.fold_labels(
        STARTS, values, values // 2, since=0.0, until=60.0, periods=fold.Periods(starts, starts)
    )
    for row in range(3):
        alone = fold.fold_labels(
            STARTS,
            values[row],
            values[row] // 2,
            since=0.0,
            until=60.0,
            periods=fold.Periods(starts[row], starts[row]),
        )
        assert together.period_labelled[row].tolist() == alone.period_labelled.tolist()
        assert together.period_correct[row].tolist() == alone.period_correct.tolist()
        assert together.labelled[row] == alone.labelled == values[row].sum()


def test_ranking_sums_go_to_the_period_in_force_and_count_only_whole_buckets():
    periods = fold.Periods.of([0.0, 30.0])
    ranked = [2] * 12
    clicks = [SparseCounts.of_bins([1, 3]) for _ in range(12)]
    # [0, 58): the bucket at 55 ends after the window
    sums = fold.fold_ranking(STARTS, ranked, clicks, since=0.0, until=58.0, periods=periods)
    assert sums.period_ranked == (12, 10)
    assert sums.period_click_positions == (SparseCounts([1, 3], [6, 6]), SparseCounts([1, 3], [5, 5]))
    empty = fold.fold_ranking(np.array([]), [], [], since=0.0, until=60.0, periods=periods)
    assert empty == fold.RankingSums((0, 0), (SparseCounts(), SparseCounts()))
