"""The CatBoost model inside a BentoML model, scored directly (the MLflow pyfunc gives class labels, slowly)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

MLFLOW_MODEL_DIR = "mlflow_model"  # where bentoml.mlflow.import_model puts the MLflow model


class ModelLoadError(RuntimeError):
    """The Bento's model could not be loaded or is not a binary classifier."""


class CatBoostScorer:
    """Click probabilities from a CatBoost classifier; one thread, which is all a request should take."""

    def __init__(self, model) -> None:
        if not hasattr(model, "predict_proba"):
            raise ModelLoadError(f"expected a CatBoost classifier, got {type(model).__name__}")
        self._model = model

    @classmethod
    def from_mlflow_dir(cls, path: Path | str) -> CatBoostScorer:
        """Load the catboost flavour of the MLflow model stored at `path`."""
        import mlflow.catboost

        try:
            return cls(mlflow.catboost.load_model(str(path)))
        except ModelLoadError:
            raise
        except Exception as exc:
            raise ModelLoadError(f"cannot load a CatBoost model from {path}: {exc}") from exc

    @classmethod
    def from_bento_model(cls, bento_model) -> CatBoostScorer:
        return cls.from_mlflow_dir(bento_model.path_of(MLFLOW_MODEL_DIR))

    def score_one(self, features: Sequence[float]) -> float:
        # A 1-D float64 array is CatBoost's cheapest single-row path (measured: ~85 us vs ~95 for a list).
        return float(self._model.predict_proba(np.asarray(features, dtype=np.float64), thread_count=1)[1])

    def score_many(self, rows: Sequence[Sequence[float]]) -> np.ndarray:
        """One batch predict for all rows (about 0.5 us a row at 1000 rows)."""
        return self._model.predict_proba(np.asarray(rows, dtype=np.float64), thread_count=1)[:, 1]
