"""The numpy tree evaluator gives CatBoost's own probabilities, and steps aside when it cannot."""

from __future__ import annotations

import math

import numpy as np
import pytest

from bentos.model import CatBoostScorer, ObliviousTrees

catboost = pytest.importorskip("catboost")


@pytest.fixture(scope="module")
def model():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(600, 16))
    y = (X[:, 0] + 0.5 * X[:, 3] - X[:, 7] + rng.normal(scale=0.5, size=600) > 0).astype(int)
    m = catboost.CatBoostClassifier(
        iterations=60, depth=5, verbose=False, thread_count=1, random_seed=0, allow_writing_files=False
    )
    return m.fit(X, y)


def test_single_rows_score_as_catboost_does(model):
    trees = ObliviousTrees.checked(model)
    assert trees is not None and (trees.n_trees, trees.depth) == (60, 5)  # some trees are shallower
    rows = np.random.default_rng(1).normal(scale=3.0, size=(2000, 16))
    expected = model.predict_proba(rows)[:, 1]
    got = np.array([trees.score_one(list(r)) for r in rows])
    assert np.max(np.abs(got - expected)) < 1e-12


def test_values_on_a_border_fall_on_catboost_s_side(model):
    trees = ObliviousTrees.checked(model)
    rows = trees.probe_rows(500)
    expected = model.predict_proba(rows)[:, 1]
    assert max(abs(trees.score_one(r) - e) for r, e in zip(rows, expected, strict=True)) < 1e-12


def test_a_row_with_nan_is_left_to_catboost(model):
    scorer = CatBoostScorer(model)
    row = [math.nan, *[0.5] * 15]
    assert scorer._trees.score_one(row) is None
    assert scorer.score_one(row) == pytest.approx(float(model.predict_proba(np.asarray(row))[1]), abs=1e-15)


def test_a_model_with_categorical_features_is_scored_by_catboost():
    X = [["a", 1.0], ["b", 2.0], ["a", 3.0], ["b", 0.5]] * 20
    y = [0, 1, 0, 1] * 20
    m = catboost.CatBoostClassifier(
        iterations=5, verbose=False, cat_features=[0], allow_writing_files=False
    ).fit(X, y)
    assert ObliviousTrees.checked(m) is None
    assert CatBoostScorer(m)._trees is None


def test_a_model_whose_trees_do_not_match_is_refused(model, monkeypatch):
    original = ObliviousTrees.score_one
    monkeypatch.setattr(ObliviousTrees, "score_one", lambda self, f: original(self, f) + 1e-6)
    assert ObliviousTrees.checked(model) is None


def test_batches_score_as_catboost_does(model):
    trees = ObliviousTrees.checked(model)
    rows = np.vstack([trees.probe_rows(300), np.random.default_rng(2).normal(scale=3.0, size=(300, 16))])
    expected = model.predict_proba(rows)[:, 1]
    assert np.max(np.abs(trees.score_batch(rows) - expected)) < 1e-12
    assert np.max(np.abs(trees.score_batch(rows[:1]) - expected[:1])) < 1e-12


def test_the_scorer_takes_the_trees_for_small_batches_and_catboost_for_big_ones(model, monkeypatch):
    from bentos import model as model_module

    scorer = CatBoostScorer(model)
    calls = []
    original = ObliviousTrees.score_batch
    monkeypatch.setattr(
        ObliviousTrees, "score_batch", lambda self, x: calls.append(len(x)) or original(self, x)
    )
    rows = np.random.default_rng(3).normal(size=(400, 16))
    per_row = scorer._trees.n_trees * scorer._trees.depth
    monkeypatch.setattr(model_module, "NUMPY_BATCH_WORK", 100 * per_row)
    small, big = scorer.score_many(rows[:100].tolist()), scorer.score_many(rows.tolist())
    assert calls == [100]  # 400 rows are over the budget: CatBoost scored them
    expected = model.predict_proba(rows)[:, 1]
    assert np.max(np.abs(small - expected[:100])) < 1e-12 and np.max(np.abs(big - expected)) < 1e-15


def test_a_batch_with_a_nan_is_left_to_catboost(model):
    scorer = CatBoostScorer(model)
    rows = np.random.default_rng(4).normal(size=(20, 16))
    rows[7, 3] = math.nan
    assert scorer._trees.score_batch(rows) is None
    assert np.max(np.abs(scorer.score_many(rows.tolist()) - model.predict_proba(rows)[:, 1])) < 1e-15


def test_a_model_whose_batches_do_not_match_is_refused(model, monkeypatch):
    original = ObliviousTrees.score_batch
    monkeypatch.setattr(ObliviousTrees, "score_batch", lambda self, x: original(self, x) + 1e-6)
    assert ObliviousTrees.checked(model) is None
