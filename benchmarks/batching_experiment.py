"""BentoML's adaptive batching on the same model, for docs/performance.md's comparison (not deployed).

    BENTOML_HOME=<a home with recsys-model:v2> RECSYS_BATCH_MAX_SIZE=32 RECSYS_BATCH_MAX_LATENCY_MS=10 \\
        .venv/bin/bentoml serve batching_experiment:RecsysBatched --working-dir benchmarks --port 3200

/predict_batch takes {"rows": [[16 floats], ...]} (a client sends a batch of one row) and /score_batch
{"rows": [[16 floats] x 100]}; BentoML's dispatcher joins concurrent requests into one CatBoost call
of at most RECSYS_BATCH_MAX_SIZE rows, waiting at most RECSYS_BATCH_MAX_LATENCY_MS. The model
version is RECSYS_BATCH_MODEL_VERSION (default 2). Used by `benchmarks/bench_batching.py`.
"""

from __future__ import annotations

import os

import bentoml
import numpy as np

from bentos.service_names import model_tag

# Read at import: BentoML's decorators take these values when the module is loaded.
MAX_SIZE = int(os.environ.get("RECSYS_BATCH_MAX_SIZE", "32"))
MAX_LATENCY_MS = int(os.environ.get("RECSYS_BATCH_MAX_LATENCY_MS", "10"))
VERSION = int(os.environ.get("RECSYS_BATCH_MODEL_VERSION", "2"))


@bentoml.service(name="recsys-batched", workers=1, logging={"access": {"enabled": False}})
class RecsysBatched:
    bento_model = bentoml.models.BentoModel(model_tag(VERSION))

    def __init__(self) -> None:
        from pathlib import Path

        from bentos.model import MLFLOW_MODEL_DIR, load_catboost_flavor

        self.model = load_catboost_flavor(Path(self.bento_model.path_of(MLFLOW_MODEL_DIR)))

    @bentoml.api(batchable=True, max_batch_size=MAX_SIZE, max_latency_ms=MAX_LATENCY_MS)
    def predict_batch(self, rows: np.ndarray) -> np.ndarray:
        return self.model.predict_proba(np.asarray(rows, dtype=np.float64), thread_count=1)[:, 1]

    @bentoml.api(batchable=True, max_batch_size=MAX_SIZE * 100, max_latency_ms=MAX_LATENCY_MS)
    def score_batch(self, rows: np.ndarray) -> np.ndarray:
        return self.model.predict_proba(np.asarray(rows, dtype=np.float64), thread_count=1)[:, 1]
