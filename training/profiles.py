"""Named training profiles that give model versions of known relative quality, reproducibly.

Measured on 100k held-out rows from the truth (Bayes accuracy 0.797), accuracy at 0.5 / AUC:
better 0.793 / 0.866 > baseline 0.754 / 0.818 > control 0.734 / 0.790 > worse 0.697 / 0.816.
`worse` ranks as well as `baseline` (same features) but its lost clicks make it under-predict,
so it loses accuracy at 0.5 and log loss: a calibration regression, the kind a canary catches.
Every model takes all 16 features; a profile that uses fewer gives CatBoost the rest as
``ignored_features``, so any version can serve any request.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from training.data import FEATURE_NAMES, make_dataset

if TYPE_CHECKING:
    from catboost import CatBoostClassifier

HOLDOUT_SEED = 777_000  # never used for training
THREAD_COUNT = 2

_CORE = ("user_item_affinity", "position", "item_popularity", "item_rating")
_LEGACY = (*_CORE, "category_match", "user_activity", "item_age")


@dataclass(frozen=True)
class Profile:
    """How one model version is trained."""

    name: str
    description: str
    features: tuple[str, ...]  # the columns the model may split on; the others are ignored
    iterations: int
    depth: int
    learning_rate: float
    label_noise: float  # fraction of clicks recorded as non-clicks (a lossy label join)
    n_rows: int
    seed: int

    @property
    def ignored_features(self) -> list[int]:
        return [i for i, name in enumerate(FEATURE_NAMES) if name not in self.features]

    def params(self) -> dict[str, object]:
        """Flat parameters for MLflow."""
        return {
            "profile": self.name,
            "features": ",".join(self.features),
            "n_features_used": len(self.features),
            "iterations": self.iterations,
            "depth": self.depth,
            "learning_rate": self.learning_rate,
            "label_noise": self.label_noise,
            "n_rows": self.n_rows,
            "seed": self.seed,
        }


PROFILES: dict[str, Profile] = {
    p.name: p
    for p in (
        Profile(
            name="control",
            description="an old, weak model: four core signals, a few shallow trees",
            features=_CORE,
            iterations=40,
            depth=3,
            learning_rate=0.1,
            label_noise=0.0,
            n_rows=20_000,
            seed=101,
        ),
        Profile(
            name="baseline",
            description="the current model: user and item signals, no price, context or device",
            features=_LEGACY,
            iterations=150,
            depth=4,
            learning_rate=0.1,
            label_noise=0.0,
            n_rows=30_000,
            seed=202,
        ),
        Profile(
            name="better",
            description="all 16 signals (price, discount, context, device), deeper trees",
            features=FEATURE_NAMES,
            iterations=250,
            depth=6,
            learning_rate=0.08,
            label_noise=0.0,
            n_rows=40_000,
            seed=303,
        ),
        Profile(
            name="worse",
            description="the baseline's features trained on labels that lost a third of the clicks",
            features=_LEGACY,
            iterations=150,
            depth=4,
            learning_rate=0.1,
            label_noise=0.35,
            n_rows=30_000,
            seed=404,
        ),
    )
}


def get_profile(name: str, *, n_rows: int | None = None, iterations: int | None = None) -> Profile:
    """The named profile, optionally scaled down (or up) for tests and demos."""
    try:
        profile = PROFILES[name]
    except KeyError:
        raise ValueError(f"unknown training profile {name!r}; choose from {', '.join(PROFILES)}") from None
    changes: dict[str, int] = {}
    if n_rows is not None:
        changes["n_rows"] = n_rows
    if iterations is not None:
        changes["iterations"] = iterations
    return dataclasses.replace(profile, **changes) if changes else profile


def training_data(profile: Profile) -> tuple[np.ndarray, np.ndarray]:
    """The profile's training rows, with its label noise applied."""
    X, y = make_dataset(profile.n_rows, seed=profile.seed)
    if profile.label_noise > 0:
        rng = np.random.default_rng(profile.seed + 1)
        lost = (y == 1) & (rng.random(y.shape[0]) < profile.label_noise)
        y = np.where(lost, 0, y)
    return X, y


def holdout_data(n: int = 20_000) -> tuple[np.ndarray, np.ndarray]:
    """Held-out rows drawn from the truth, never seen in training."""
    return make_dataset(n, seed=HOLDOUT_SEED)


def fit(profile: Profile, on_iteration: Callable[[int], None] | None = None) -> CatBoostClassifier:
    """Train the profile's CatBoost classifier; `on_iteration(n)` gets the trees built so far."""
    from catboost import CatBoostClassifier

    X, y = training_data(profile)
    model = CatBoostClassifier(
        iterations=profile.iterations,
        depth=profile.depth,
        learning_rate=profile.learning_rate,
        random_seed=profile.seed,
        ignored_features=profile.ignored_features or None,
        thread_count=THREAD_COUNT,
        verbose=False,
        allow_writing_files=False,  # no catboost_info/ in the working directory
    )
    callbacks = [_IterationCallback(on_iteration)] if on_iteration else None
    model.fit(X, y, callbacks=callbacks)
    return model


def evaluate(model, X: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """AUC, log loss and accuracy at 0.5 of `model` on (X, y)."""
    p = np.clip(model.predict_proba(X)[:, 1], 1e-15, 1 - 1e-15)
    return {
        "auc": _auc(y, p),
        "log_loss": float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p))),
        "accuracy": float(np.mean((p > 0.5) == (y == 1))),
    }


def _auc(y: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve by the rank-sum formula (ties get average ranks)."""
    from scipy.stats import rankdata

    ranks = rankdata(score)
    n_pos = int(np.sum(y == 1))
    n_neg = y.shape[0] - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    return float((ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


class _IterationCallback:
    """CatBoost's per-iteration hook; returning True keeps training going."""

    def __init__(self, on_iteration: Callable[[int], None]):
        self._on_iteration = on_iteration

    def after_iteration(self, info) -> bool:
        self._on_iteration(info.iteration)  # CatBoost counts from 1: trees built so far
        return True
