"""The one Bento template: a CatBoost click model, pinned to one registered version when the Bento is built.

`bentos.build.build_bento(3)` builds `recsys:v3` with the build argument `model_version=3`; BentoML
stores the arguments in the Bento and hands them back to `bentoml.use_arguments()` whenever that
Bento is served, so the model reference below is `recsys-model:v3` for ever (never `latest`).
Serving it needs nothing else: `bentoml serve recsys:v3 --port 3103`.

Environment (read once per process, through control_plane.settings.Settings):
  DATABASE_URL            where `predictions` rows go and `traffic_config` is read
                          (default sqlite:///$RECSYS_STATE_DIR/recsys.db)
  RECSYS_STATE_DIR        default .recsys
  RECSYS_SPILL_DIR        spill files for rows the database did not take (default $RECSYS_STATE_DIR/spill)
  RECSYS_PREDLOG          on: the log's writer in a process of its own (default); thread: in this
                          process; off: no prediction log (benchmarks)
  RECSYS_PREDLOG_FLUSH_S  how long rows gather before they go to the writer (default 0.2; with
                          RECSYS_PREDLOG=thread, to the database): what a SIGKILL can lose
  RECSYS_PREDLOG_WRITE_S  how long the writer process gathers rows before it writes them (default 1:
                          rows reach the database up to 1.2 s late, within the control plane's
                          RECSYS_LOG_SETTLE_S; 0.2 costs the log more)
  RECSYS_PREDLOG_MAX_QUEUE  rows the Bento and its writer each hold in memory (default 10000); past it the
                          Bento's rows wait in an overflow of as many again, spilled by a thread of its
                          own; with the database unreachable and the spill disk full, rows past it are
                          counted lost
  RECSYS_GIL_SWITCH_MS    the interpreter's thread switch interval in ms (default 1; Python's is 5)
  RECSYS_ACCESS_LOG=on    one JSON log line per model request (default off)
  RECSYS_MAX_BODY_BYTES   larger request bodies get 413 (default 1000000)

A request may name its user in `X-User-Id` (control_plane/users.py: 1 to 128 letters, digits or
`. _ : @ -`; anything else is a 400 naming the problem); the row keeps a keyed hash of it, `user_key`.

Only requests that reach the model are logged to `predictions`: 2xx, and 5xx raised by the model
code. Refused input (4xx) is counted in recsys_requests_total{status} but never logged: it has no
score, and it would dilute the error rate the canary analysis compares.
"""

from __future__ import annotations

import atexit
import dataclasses
import functools
import gc
import json
import logging
import sys
import time

import bentoml
import numpy as np
from pydantic import BaseModel, ValidationError

from bentos.bentoml_fixes import cancel_timeout_timers, die_with_parent, gate_first, separate_prometheus_dir
from bentos.header_deadline import install as install_header_deadline
from bentos.http import RequestGate, RequestInfo
from bentos.logs import use_json_logs
from bentos.model import CatBoostScorer
from bentos.schemas import (
    Candidate,
    PredictRequest,
    PredictResponse,
    RecommendRequest,
    RecommendResponse,
    ScoredItem,
)
from bentos.service_names import model_tag
from control_plane.credentials import ensure_request_id_key
from control_plane.request_ids import RequestIdSigner
from control_plane.settings import Settings
from control_plane.users import UserKeyer

log = logging.getLogger("recsys.bento")

ENDPOINTS = {"/predict": "predict", "/recommend": "recommend"}
ANSWERED_BY_THE_GATE = "the RequestGate answers this endpoint with Recsys.answer (bentos/http.py)"


class BentoArgs(BaseModel):
    """Build arguments, fixed in the Bento (`bentoml build --arg model_version=3`)."""

    model_version: int
    model_name: str = "recsys"


TRAFFIC_TIMEOUT_S = 10
# A body not in after this long is answered 408 (bentos/http.py: BodyDeadline, kept to within a second).
# Through the gateway a body comes whole (Traefik buffers it, and closes on a client slower than its own
# read timeout, 5 s); this bound is for a client that connects to the Bento directly.
BODY_TIMEOUT_S = 5
# A request whose headers are not in after this long (from its first byte; from the connection's opening
# for the first request) gets 408 and a close: uvicorn has no such deadline (bentos/header_deadline.py).
HEADER_TIMEOUT_S = 5


@functools.cache
def settings() -> Settings:
    """The environment, read once per process (`bentoml serve` gives a service nothing else)."""
    return Settings.from_env()


# Read at import because that is how BentoML delivers build arguments; it touches no I/O.
ARGS = bentoml.use_arguments(BentoArgs)
# Must precede `bentoml serve`'s own setup, which runs right after this import (see the module).
separate_prometheus_dir(
    f"{ARGS.model_name}-v{ARGS.model_version}",
    str(settings().bento_prometheus_dir) if settings().bento_prometheus_dir else None,
)


@bentoml.service(
    name="recsys",
    workers=1,
    # A scoring request that has not answered in 10 s is broken (BentoML's default is 60 s).
    traffic={"timeout": TRAFFIC_TIMEOUT_S},
    # The per-request access log costs 6-9% of throughput; our metrics and log rows cover it.
    logging={"access": {"enabled": False}},
    # No OpenTelemetry span per model request: nothing exports them by default and each one is CPU
    # and garbage (thousands alive at a time under load); X-Request-ID is our trace key.
    tracing={"excluded_urls": list(ENDPOINTS)},
)
class Recsys:
    """Scores impressions and ranks candidates with model version ARGS.model_version."""

    bento_model = bentoml.models.BentoModel(model_tag(ARGS.model_version, ARGS.model_name))

    def __init__(self) -> None:
        die_with_parent()
        # lazy: 0.5 s of import (SQLAlchemy, SciPy) for workers only, not `bentoml serve`'s parent or build
        from bentos.metrics import ServiceMetrics
        from bentos.predlog import default_engine_factory
        from bentos.roles import RoleWatcher

        config = settings()
        self.model_version = ARGS.model_version
        use_json_logs(self.model_version)
        cancel_timeout_timers()
        self.metrics = ServiceMetrics.for_version(self.model_version)

        started = time.perf_counter()
        self.scorer = CatBoostScorer.from_bento_model(self.bento_model)
        load_s = time.perf_counter() - started
        self.metrics.model_load_seconds.labels(str(self.model_version)).set(load_s)

        engine_factory = default_engine_factory(config.database_url)
        self.roles = RoleWatcher(engine_factory, self.model_version).start()
        self.user_keys = _user_keyer(
            config
        )  # X-User-Id is logged as this keyed hash (control_plane/users.py)
        self.predlog = _prediction_log(config, engine_factory, self.metrics.observe_writer).start()
        # A writer thread in this process (RECSYS_PREDLOG=thread) holds the GIL while it formats a
        # batch; at Python's default 5 ms a request waiting for the event loop could wait that long.
        # At 1 ms the gateway served 6-15% more requests/s with a lower p99 at 8 connections. With the
        # writer in a process of its own (the default) it measured neutral (docs/performance.md).
        sys.setswitchinterval(config.gil_switch_ms / 1000)
        atexit.register(self.predlog.close)  # in case the shutdown hook never runs
        # One JSON line per request (BentoML's own access log is off: it costs 6-9% of throughput).
        self.access_log = config.bento_access_log
        log.info(
            "model %s loaded in %.2fs; prediction log %s",
            model_tag(self.model_version, ARGS.model_name),
            load_s,
            type(self.predlog).__name__,
        )
        # Everything alive now lives as long as the process: keep it out of every future GC scan
        # (measured: halves the full-collection pauses behind the p99).
        gc.collect()
        gc.freeze()
        self.metrics.watch_gc()

    def __is_ready__(self) -> bool:
        return getattr(self, "scorer", None) is not None

    @bentoml.on_shutdown
    def _drain_prediction_log(self) -> None:
        self.roles.stop()
        self.predlog.close()

    # ---- used by the RequestGate middleware ----

    def current_role(self) -> str:
        return self.roles.role

    def log_state(self) -> dict:
        return {"model_version": self.model_version, **dataclasses.asdict(self.metrics.writer_stats)}

    def request_finished(self, info: RequestInfo, status: int) -> None:
        latency_ms = info.elapsed_ms()
        self.metrics.observe_request(info.role, info.endpoint, status, latency_ms / 1000.0)
        if self.access_log:
            log.info(
                "%s %d", info.endpoint, status, extra={"status": status, "latency_ms": round(latency_ms, 3)}
            )
        if status >= 500 and info.in_handler and not info.logged:  # the model's failure, not yet logged
            self._log(info, None, None, status)

    # ---- the endpoints ----

    def answer(self, info: RequestInfo, body: bytes) -> tuple[int, bytes]:
        """A model endpoint's response to a JSON body, without BentoML's per-request machinery.

        The RequestGate answers every POST to /predict and /recommend with this, the endpoints' one
        path (bentos/http.py says why). It validates with the very input models BentoML builds for the
        APIs below and answers validation errors as BentoML does (400, the error count and pydantic's
        details), so the HTTP contract is the one BentoML publishes.
        """
        spec = _INPUT_SPECS[info.endpoint]
        try:
            request = spec.model_validate_json(body or b"{}")
        except ValidationError as exc:
            return 400, _validation_error(exc)
        info.in_handler = True
        if info.endpoint == "predict":
            response = self._predict(info, request.features)
        else:
            response = self._recommend(info, request.candidates, request.k)
        return 200, response.__pydantic_serializer__.to_json(response)

    # The endpoints' contract as BentoML publishes it (the OpenAPI document, the input models `answer`
    # validates with). Requests to these routes never reach these bodies: the RequestGate answers them.
    @bentoml.api(route="/predict", input_spec=PredictRequest)
    async def predict(self, features: list[float]) -> PredictResponse:
        """Click probability for one impression (16 features)."""
        raise NotImplementedError(ANSWERED_BY_THE_GATE)

    @bentoml.api(route="/recommend", input_spec=RecommendRequest)
    async def recommend(self, candidates: list[Candidate], k: int = 10) -> RecommendResponse:
        """The top k of up to 1000 candidates by click probability, best first (one batch predict)."""
        raise NotImplementedError(ANSWERED_BY_THE_GATE)

    def _predict(self, info: RequestInfo, features: list[float]) -> PredictResponse:
        try:
            score = self.scorer.score_one(features)
        except Exception:
            self._log(info, features, None, 500)
            raise
        self._log(info, features, score, 200)
        return PredictResponse(
            request_id=info.request_id, score=score, model_version=self.model_version, role=info.role
        )

    def _recommend(self, info: RequestInfo, candidates: list[Candidate], k: int) -> RecommendResponse:
        try:
            scores = self.scorer.score_many([c.features for c in candidates])
        except Exception:
            self._log(info, None, None, 500)
            raise
        top = np.argsort(-scores, kind="stable")[:k]
        items = [ScoredItem(item_id=candidates[i].item_id, score=float(scores[i])) for i in top]
        # the served list, in served order: a click sent to /feedback must name one of them at its position
        self._log(info, candidates[top[0]].features, items[0].score, 200, [it.item_id for it in items])
        return RecommendResponse(
            request_id=info.request_id, items=items, model_version=self.model_version, role=info.role
        )

    def _log(
        self,
        info: RequestInfo,
        features: list[float] | None,
        score: float | None,
        status: int,
        served: list[str] | None = None,
    ) -> None:
        info.logged = True
        self.predlog.log(
            (  # a PredictionRow: the columns of `predictions`, in order
                info.request_id,
                info.ts,
                self.model_version,
                info.role,
                info.route,
                info.endpoint,
                list(features) if features is not None else None,
                score,
                info.elapsed_ms(),
                status,
                None if info.user is None else self.user_keys.user_key(info.user),
                served,
                info.pair_key,
            )
        )


# The models BentoML validates each API's JSON with (named after the API's input spec in errors).
_INPUT_SPECS = {name: api.input_spec for name, api in Recsys.apis.items()}


def _validation_error(exc: ValidationError) -> bytes:
    """The body BentoML answers a pydantic ValidationError with (status 400)."""
    return json.dumps(
        {
            "error": f"{exc.error_count()} validation error for {exc.title}",
            "detail": exc.errors(include_context=False, include_input=False),
        }
    ).encode()


Recsys.add_asgi_middleware(
    RequestGate,
    endpoints=ENDPOINTS,
    max_body_bytes=lambda: settings().max_body_bytes,
    state=lambda: _current_service_or_none(),
    body_timeout_s=BODY_TIMEOUT_S,
    request_ids=lambda: _request_id_signer(),
)
# Before BentoML's own middlewares, which each model request paid for (bentos/bentoml_fixes.py);
# patched here, at import, because `bentoml serve` builds the app right after importing this module.
gate_first(RequestGate)
# Before uvicorn makes its first connection, which happens after this import too.
install_header_deadline(HEADER_TIMEOUT_S)


def _prediction_log(settings: Settings, engine_factory, on_stats):
    """The writer RECSYS_PREDLOG asks for: on (a process of its own, the default), thread, or off."""
    # lazy: 0.5 s of import (SQLAlchemy, SciPy) for workers only, not `bentoml serve`'s parent or build
    from bentos.predlog import NullLogWriter, PredictionLogWriter
    from bentos.predlog_process import ProcessLogWriter

    if settings.predlog == "off":
        return NullLogWriter()
    spill_dir = settings.spill_dir
    flush_interval_s = settings.predlog_flush_s
    max_queue = settings.predlog_max_queue
    if settings.predlog == "thread":
        return PredictionLogWriter(
            engine_factory,
            spill_dir,
            flush_interval_s=flush_interval_s,
            max_queue=max_queue,
            on_stats=on_stats,
        )
    return ProcessLogWriter(
        settings.database_url,
        spill_dir,
        flush_interval_s=flush_interval_s,
        max_queue=max_queue,
        write_interval_s=settings.predlog_write_s,
        on_stats=on_stats,
    )


def _request_id_signer():
    """Signs the ids this Bento issues with the key the control plane checks labels against."""
    try:
        return RequestIdSigner.from_secret(ensure_request_id_key(settings()))
    except OSError:
        logging.getLogger("recsys.http").exception(
            "no request-id key readable: this Bento's ids are signed with a key of its own, and no label "
            "can be accepted for them (set RECSYS_REQUEST_ID_KEY or make the state directory readable)"
        )
        return RequestIdSigner.ephemeral()


def _user_keyer(settings):
    """The keyed hash user ids are logged under: one key for every Bento, from the request-id key."""
    try:
        return UserKeyer.from_secret(ensure_request_id_key(settings))
    except OSError:
        logging.getLogger("recsys.bento").exception(
            "no request-id key readable: this Bento logs users under a key of its own, so the same user "
            "is not matched across versions (set RECSYS_REQUEST_ID_KEY or make the state directory readable)"
        )
        return UserKeyer.ephemeral()


def _current_service_or_none():
    try:
        return bentoml.get_current_service()
    except bentoml.exceptions.BentoMLException:
        return None
