"""The synthetic ground truth: a probability, with interactions, reproducible, at a useful click rate."""

import subprocess
import sys

import numpy as np
import pytest

from training.data import (
    FEATURE_NAMES,
    N_FEATURES,
    click_probability,
    draw_clicks,
    make_dataset,
    sample_features,
)


def _row(**values: float) -> np.ndarray:
    """A typical impression, with some features overridden by name."""
    base = dict(
        user_activity=0.5, user_tenure=2.0, user_ctr_history=0.29, user_session_depth=1.6,
        item_popularity=0.27, item_price=30.0, item_age=180.0, item_rating=3.85, item_discount=0.1,
        user_item_affinity=0.0, category_match=0.0, ctx_hour_sin=0.0, ctx_hour_cos=1.0,
        ctx_weekend=0.0, position=3.0, device_mobile=1.0,
    )  # fmt: skip
    base.update(values)
    return np.array([base[name] for name in FEATURE_NAMES])


def test_there_are_sixteen_distinct_named_features():
    assert N_FEATURES == 16 == len(FEATURE_NAMES) == len(set(FEATURE_NAMES))
    X = sample_features(np.random.default_rng(0), 7)
    assert X.shape == (7, 16) and X.dtype == np.float64


def test_probabilities_are_strictly_between_zero_and_one_even_at_extremes():
    X = sample_features(np.random.default_rng(1), 50_000)
    p = click_probability(X)
    assert p.shape == (50_000,)
    assert np.all((p > 0) & (p < 1))
    extreme = np.vstack([_row(user_item_affinity=1, user_activity=1, position=1), _row(position=20)])
    assert np.all((click_probability(extreme) > 0) & (click_probability(extreme) < 1))


def test_a_single_row_gives_a_scalar_equal_to_its_batch_value():
    X = sample_features(np.random.default_rng(2), 5)
    single = click_probability(X[3])
    assert single.shape == ()
    assert single == pytest.approx(click_probability(X)[3])
    assert draw_clicks(np.random.default_rng(0), X[3]).shape == ()


@pytest.mark.parametrize("shape", [(15,), (4, 17), (2, 3, 16)])
def test_wrong_shapes_are_rejected(shape):
    with pytest.raises(ValueError, match="16"):
        click_probability(np.zeros(shape))


def test_affinity_matters_more_for_active_users():
    def lift(activity: float) -> float:
        hi = click_probability(_row(user_item_affinity=0.6, user_activity=activity))
        lo = click_probability(_row(user_item_affinity=-0.6, user_activity=activity))
        return float(hi - lo)

    assert lift(0.9) > lift(0.1) + 0.2


def test_mid_priced_items_click_best():
    p = {price: float(click_probability(_row(item_price=price))) for price in (3.0, 30.0, 300.0)}
    assert p[30.0] > p[3.0] + 0.1 and p[30.0] > p[300.0] + 0.1


def test_clicks_decay_with_position():
    p = click_probability(np.vstack([_row(position=k) for k in range(1, 21)]))
    assert np.all(np.diff(p) < 0)


def test_the_hour_effect_depends_on_the_device():
    midday, midnight = dict(ctx_hour_cos=-1.0), dict(ctx_hour_cos=1.0)
    mobile_gap = click_probability(_row(device_mobile=1, **midday)) - click_probability(
        _row(device_mobile=1, **midnight)
    )
    desktop_gap = click_probability(_row(device_mobile=0, **midday)) - click_probability(
        _row(device_mobile=0, **midnight)
    )
    assert mobile_gap > 0.2 and desktop_gap == pytest.approx(0.0)


def test_the_same_seed_gives_the_same_data_and_another_seed_does_not():
    X1, y1 = make_dataset(2_000, seed=5)
    X2, y2 = make_dataset(2_000, seed=5)
    X3, _ = make_dataset(2_000, seed=6)
    assert np.array_equal(X1, X2) and np.array_equal(y1, y2)
    assert not np.array_equal(X1, X3)
    assert np.array_equal(make_dataset(100)[0], make_dataset(100)[0])  # the default seed is fixed


def test_base_rate_and_bayes_accuracy_leave_room_between_models():
    X, y = make_dataset(100_000, seed=11)
    p = click_probability(X)
    assert set(np.unique(y)) == {0, 1}
    assert 0.30 < y.mean() < 0.50
    assert abs(y.mean() - p.mean()) < 0.01  # clicks are drawn from the truth
    bayes = np.mean((p > 0.5) == (y == 1))
    majority = max(y.mean(), 1 - y.mean())
    assert 0.75 < bayes < 0.85 and bayes > majority + 0.1


def test_importing_the_data_module_loads_no_ml_framework():
    code = "import sys, training.data, training.profiles, training.train; " \
        "assert not {'catboost', 'mlflow'} & set(sys.modules), sorted(sys.modules)"  # fmt: skip
    subprocess.run([sys.executable, "-c", code], check=True)
