"""The named profiles train models of the promised relative quality on held-out data."""

import numpy as np
import pytest

from training.data import N_FEATURES
from training.profiles import PROFILES, evaluate, fit, get_profile, holdout_data


@pytest.fixture(scope="module")
def accuracy() -> dict[str, float]:
    X, y = holdout_data(50_000)
    return {name: evaluate(fit(get_profile(name)), X, y)["accuracy"] for name in PROFILES}


def test_better_beats_baseline_by_more_than_two_points(accuracy):
    assert accuracy["better"] > accuracy["baseline"] + 0.02


def test_worse_trails_baseline_by_more_than_three_points(accuracy):
    assert accuracy["worse"] < accuracy["baseline"] - 0.03


def test_control_trails_baseline(accuracy):
    assert accuracy["control"] < accuracy["baseline"]


def test_a_profile_with_fewer_features_still_takes_all_sixteen():
    model = fit(get_profile("control", n_rows=2_000, iterations=10))
    p = model.predict_proba(np.zeros((3, N_FEATURES)))[:, 1]
    assert p.shape == (3,) and np.all((p >= 0) & (p <= 1))


def test_training_is_reproducible_and_scalable():
    spec = get_profile("baseline", n_rows=3_000, iterations=20)
    assert (spec.n_rows, spec.iterations) == (3_000, 20) and spec.depth == PROFILES["baseline"].depth
    X, _ = holdout_data(500)
    assert np.array_equal(fit(spec).predict_proba(X), fit(spec).predict_proba(X))


def test_progress_callback_counts_every_tree():
    seen: list[int] = []
    fit(get_profile("control", n_rows=1_000, iterations=7), on_iteration=seen.append)
    assert seen == list(range(1, 8))


def test_an_unknown_profile_is_named_in_the_error():
    with pytest.raises(ValueError, match="'best'"):
        get_profile("best")


def test_metrics_are_those_of_a_perfect_and_a_useless_scorer():
    class Fixed:
        def __init__(self, p):
            self.p = p

        def predict_proba(self, X):
            return np.column_stack([1 - self.p, self.p])

    y = np.array([0, 0, 1, 1])
    perfect = evaluate(Fixed(np.array([0.1, 0.2, 0.8, 0.9])), None, y)
    assert perfect["auc"] == 1.0 and perfect["accuracy"] == 1.0
    useless = evaluate(Fixed(np.full(4, 0.5)), None, y)
    assert useless["auc"] == 0.5 and useless["log_loss"] == pytest.approx(np.log(2))
