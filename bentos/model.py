"""The CatBoost model inside a BentoML model, scored directly (the MLflow pyfunc gives class labels, slowly).

A single row is scored from the model's trees with numpy (`ObliviousTrees`) rather than through
CatBoost's predict_proba, whose per-call work (a Pool, argument checks, logger set-up) is most of
its cost for one row: measured 20 us against 85-300 us, for the same probability to within 1e-15.
Small batches (a /recommend's candidates) are scored from the trees too, as long as rows x trees x
depth stays under `NUMPY_BATCH_WORK`; bigger ones go to CatBoost, whose per-row cost is lower.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

log = logging.getLogger("recsys.model")

MLFLOW_MODEL_DIR = "mlflow_model"  # where bentoml.mlflow.import_model puts the MLflow model

# Up to this many rows x trees x depth, a batch is scored with numpy, above it with CatBoost. Measured
# (CPU per call, one thread): 100 rows of 150 trees of depth 4 (60,000) 90 us against 230 for
# predict_proba; 10 rows of 500 trees of depth 6 (30,000) 92 against 251; at 120,000 numpy is
# 0.6-0.9x CatBoost's time and from 150,000-200,000 it is slower (CatBoost's fixed ~200 us per call
# is paid back by its lower cost per row).
NUMPY_BATCH_WORK = 120_000


class ModelLoadError(RuntimeError):
    """The Bento's model could not be loaded or is not a binary classifier."""


class CatBoostScorer:
    """Click probabilities from a CatBoost classifier; one thread, which is all a request should take."""

    def __init__(self, model, *, trees: bool = True) -> None:
        if not hasattr(model, "predict_proba"):
            raise ModelLoadError(f"expected a CatBoost classifier, got {type(model).__name__}")
        self._model = model
        self._trees = ObliviousTrees.checked(model) if trees else None

    @classmethod
    def from_mlflow_dir(cls, path: Path | str) -> CatBoostScorer:
        """Load the catboost flavour of the MLflow model stored at `path`."""
        try:
            return cls(load_catboost_flavor(Path(path)))
        except ModelLoadError:
            raise
        except Exception as exc:
            raise ModelLoadError(f"cannot load a CatBoost model from {path}: {exc}") from exc

    @classmethod
    def from_bento_model(cls, bento_model) -> CatBoostScorer:
        return cls.from_mlflow_dir(bento_model.path_of(MLFLOW_MODEL_DIR))

    def score_one(self, features: Sequence[float]) -> float:
        if self._trees is not None:
            score = self._trees.score_one(features)
            if score is not None:
                return score
        # A 1-D float64 array is CatBoost's cheapest single-row path (measured: ~85 us vs ~95 for a list).
        return float(self._model.predict_proba(np.asarray(features, dtype=np.float64), thread_count=1)[1])

    def score_many(self, rows: Sequence[Sequence[float]]) -> np.ndarray:
        """Click probabilities of all rows: from the trees for a small batch, else one CatBoost predict."""
        x = np.asarray(rows, dtype=np.float64)
        trees = self._trees
        if trees is not None and x.ndim == 2 and len(x) * trees.n_trees * trees.depth <= NUMPY_BATCH_WORK:
            scores = trees.score_batch(x)
            if scores is not None:
                return scores
        return self._model.predict_proba(x, thread_count=1)[:, 1]


def load_catboost_flavor(path: Path):
    """The CatBoost model of an MLflow model directory, read with CatBoost alone when it can be.

    The MLmodel file names the catboost flavour's file, class and format; loading that directly
    spares the worker importing mlflow (measured: about 20-30 MB of memory per worker and 60,000
    more objects). Anything unexpected goes through mlflow.catboost.load_model as before.
    """
    import yaml

    flavor = (yaml.safe_load((path / "MLmodel").read_text()).get("flavors") or {}).get("catboost") or {}
    model_type, data = flavor.get("model_type"), flavor.get("data")
    if (
        model_type in ("CatBoostClassifier", "CatBoost")
        and data
        and flavor.get("save_format", "cbm") == "cbm"
    ):
        import catboost

        model = getattr(catboost, model_type)()
        model.load_model(str(path / data), format="cbm")
        return model
    import mlflow.catboost

    return mlflow.catboost.load_model(str(path))


class ObliviousTrees:
    """A binary CatBoost model's symmetric trees on float features, evaluated with numpy.

    CatBoost compares each feature, as float32, with float32 borders; each tree's leaf is the bit
    pattern of its splits; the probability is the sigmoid of the scaled, biased sum of the leaves.
    """

    def __init__(self, n_features: int, features, borders, leaves, scale: float, bias: float) -> None:
        self.n_features = n_features
        self.n_trees, self.depth = features.shape
        self._features = features.ravel()
        self._borders = borders.astype(np.float32).ravel()
        self._leaves = leaves.ravel()
        self._bits = (1 << np.arange(self.depth)).astype(np.intp)
        self._offsets = np.arange(self.n_trees, dtype=np.intp) * (1 << self.depth)
        self._column_borders = self._borders[:, None]  # for a batch laid out one column per row
        self._column_offsets = self._offsets[:, None]
        self._scale, self._bias = scale, bias

    @classmethod
    def from_catboost_json(cls, model_json: dict) -> ObliviousTrees | None:
        """None when the model is not this simple shape (categorical or text features, several outputs, ...)."""
        info = model_json.get("features_info", {})
        trees = model_json.get("oblivious_trees") or []
        scale, bias = model_json.get("scale_and_bias", [1.0, [0.0]])
        if set(info) != {"float_features"} or not trees or len(bias) != 1:
            return None
        if any(f["feature_index"] != f["flat_feature_index"] for f in info["float_features"]):
            return None
        if any(len(t["leaf_values"]) != 1 << len(t["splits"]) for t in trees):
            return None
        if any(s.get("split_type") != "FloatFeature" for t in trees for s in t["splits"]):
            return None
        # Shallower trees are padded to the deepest with splits that never fire (x > +inf), so
        # their leaf index never leaves their own 2**depth leaves.
        depth = max(len(t["splits"]) for t in trees)
        features = np.zeros((len(trees), depth), dtype=np.intp)
        borders = np.full((len(trees), depth), np.inf)
        leaves = np.zeros((len(trees), 1 << depth))
        for i, t in enumerate(trees):
            n = len(t["splits"])
            features[i, :n] = [s["float_feature_index"] for s in t["splits"]]
            borders[i, :n] = [s["border"] for s in t["splits"]]
            leaves[i, : 1 << n] = t["leaf_values"]
        n_features = len(info["float_features"])
        return cls(n_features, features, borders, leaves, float(scale), float(bias[0]))

    @classmethod
    def checked(cls, model, n_rows: int = 512, tolerance: float = 1e-9) -> ObliviousTrees | None:
        """The model's trees if they reproduce its predict_proba on `n_rows` probing rows, else None."""
        try:
            loss = model.get_all_params().get("loss_function", "")
            if loss not in ("Logloss", "CrossEntropy"):
                return None
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "model.json"
                model.save_model(str(path), format="json")
                trees = cls.from_catboost_json(json.loads(path.read_text()))
            if trees is None:
                return None
            rows = trees.probe_rows(n_rows)
            expected = model.predict_proba(rows, thread_count=1)[:, 1]
            got = np.array([trees.score_one(r) for r in rows])
            batch = trees.score_batch(rows)
        except Exception as exc:  # any surprise: CatBoost's own path is always right
            log.warning("scoring with CatBoost itself: the tree evaluator could not be set up: %s", exc)
            return None
        if batch is None:
            log.warning("scoring with CatBoost itself: the tree evaluator could not score the probing rows")
            return None
        worst = float(max(np.max(np.abs(got - expected)), np.max(np.abs(batch - expected))))
        if not worst <= tolerance:
            log.warning("scoring with CatBoost itself: the tree evaluator is off by %.3g", worst)
            return None
        return trees

    def probe_rows(self, n_rows: int) -> np.ndarray:
        """Random rows, half of whose values sit on a border of their feature or one float32 step off it."""
        rng = np.random.default_rng(0)
        rows = rng.normal(0.0, 3.0, size=(n_rows, self.n_features))
        real = np.isfinite(self._borders)  # not the padding
        for j in range(self.n_features):
            borders = np.unique(self._borders[real & (self._features == j)])
            if len(borders) == 0:
                continue
            picked = rng.choice(borders, size=n_rows)
            edges = np.stack([np.nextafter(picked, -np.inf), picked, np.nextafter(picked, np.inf)])
            near = edges[rng.integers(0, 3, size=n_rows), np.arange(n_rows)].astype(np.float64)
            mask = rng.random(n_rows) < 0.5
            rows[mask, j] = near[mask]
        return rows

    def score_one(self, features: Sequence[float]) -> float | None:
        """The click probability of one row; None for a non-finite value (CatBoost decides those)."""
        x = np.asarray(features, dtype=np.float32)
        taken = x[self._features]
        if not np.isfinite(taken).all():
            return None
        leaf = (taken > self._borders).reshape(self.n_trees, self.depth) @ self._bits
        raw = float(self._leaves[leaf + self._offsets].sum()) * self._scale + self._bias
        if raw >= 0:
            return 1.0 / (1.0 + math.exp(-raw))
        e = math.exp(raw)  # the same sigmoid, without overflowing for large negative sums
        return e / (1.0 + e)

    def score_batch(self, rows: np.ndarray) -> np.ndarray | None:
        """The click probabilities of a 2-D float array of rows; None if any value is not finite.

        The rows are laid out as columns so that every step is a row gather or an elementwise
        operation over (splits x rows): measured 3-4x cheaper than indexing row by row.
        """
        x = rows.T.astype(np.float32)
        if x.shape[0] != self.n_features or not np.isfinite(x).all():
            return None
        fired = (np.take(x, self._features, axis=0) > self._column_borders).view(np.uint8)
        fired = fired.reshape(self.n_trees, self.depth, x.shape[1])
        leaf = fired[:, 0, :].astype(np.intp)
        for d in range(1, self.depth):
            leaf |= fired[:, d, :] << d
        leaf += self._column_offsets
        raw = self._leaves.take(leaf).sum(axis=0) * self._scale + self._bias
        return _sigmoid(raw)


def _sigmoid(raw: np.ndarray) -> np.ndarray:
    """1 / (1 + e^-raw), without overflowing for large negative sums."""
    e = np.exp(-np.abs(raw))
    return np.where(raw >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
