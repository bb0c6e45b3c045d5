"""The benchmark's reference peer: one plain FastAPI app with every model in process (the seed's design).

    .venv/bin/python benchmarks/peer_app.py --port 8200 --workers 2 --models '[{"version": 2, "role": "baseline",
        "weight": 85, "path": ".../recsys-model/v2/mlflow_model"}, ...]'

Each request picks a model by a weighted random choice and scores it with CatBoost's own predict_proba
(default arguments, as the seed did), validating with the same Pydantic request models as the Bento
and answering the same JSON; nothing is logged. It is what `make bench` (benchmarks/bench.py) measures the
gateway path against, not something to deploy.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import uuid
from dataclasses import dataclass
from pathlib import Path

# At module level: FastAPI resolves the endpoints' (string) annotations in the module's globals.
from bentos.schemas import PredictRequest, PredictResponse, RecommendRequest, RecommendResponse, ScoredItem

MODELS_ENV = "RECSYS_PEER_MODELS"


@dataclass(frozen=True)
class PeerModel:
    version: int
    role: str
    weight: int
    path: str


def create_app():
    """The ASGI app for the models in $RECSYS_PEER_MODELS (a uvicorn factory: workers import it)."""
    import numpy as np
    from fastapi import FastAPI

    from bentos.model import load_catboost_flavor

    models = [PeerModel(**m) for m in json.loads(os.environ[MODELS_ENV])]
    scorers = [(m, load_catboost_flavor(Path(m.path))) for m in models]
    weights = [m.weight for m in models]
    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)

    def pick():
        return random.choices(scorers, weights)[0]

    @app.post("/predict")
    async def predict(req: PredictRequest) -> PredictResponse:
        model, scorer = pick()
        return PredictResponse(
            request_id=uuid.uuid4().hex,
            score=float(scorer.predict_proba(np.asarray(req.features))[1]),
            model_version=model.version,
            role=model.role,
        )

    @app.post("/recommend")
    async def recommend(req: RecommendRequest) -> RecommendResponse:
        model, scorer = pick()
        scores = scorer.predict_proba(np.asarray([c.features for c in req.candidates]))[:, 1]
        top = np.argsort(-scores, kind="stable")[: req.k]
        return RecommendResponse(
            request_id=uuid.uuid4().hex,
            items=[ScoredItem(item_id=req.candidates[i].item_id, score=float(scores[i])) for i in top],
            model_version=model.version,
            role=model.role,
        )

    @app.get("/readyz")
    async def readyz() -> dict:
        return {"ok": True}

    return app


def serve(port: int, workers: int, host: str = "127.0.0.1") -> None:
    """uvicorn with `workers` processes on one listening socket that has TCP_NODELAY set.

    Accepted sockets inherit TCP_NODELAY from the listening one. uvicorn's own --workers path hands
    the socket to its children in a way that loses it (asyncio then skips setting it), and every
    response waited ~44 ms for a delayed ACK (measured: 23 requests/s at one connection).
    """
    import uvicorn
    from uvicorn.supervisors import Multiprocess

    config = uvicorn.Config(
        "peer_app:create_app",  # importable: this script's directory is on sys.path, its workers' too
        factory=True,
        host=host,
        port=port,
        workers=workers,
        access_log=False,
        log_level="warning",
        server_header=False,
    )
    sock = config.bind_socket()
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if workers > 1:
        Multiprocess(config, sockets=[sock]).run()
    else:
        uvicorn.Server(config).run(sockets=[sock])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--models", help=f"JSON list of models (default: ${MODELS_ENV})")
    args = parser.parse_args(argv)
    if args.models:
        os.environ[MODELS_ENV] = args.models
    serve(args.port, args.workers)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
