"""The ASGI middleware in front of the model endpoints: body limit, request id, route, headers, metrics.

It runs before BentoML reads the body, so an oversized request is refused by its Content-Length
(413) without being read. It fixes the request's id, route and role once, in a context variable
that the handler and the log lines read, and puts them on every response of the model endpoints,
errors included.

The gate answers every request to a model endpoint itself, with the serving state's `answer(info, body)`
for a POST (a 405 for any other method, a 503 before the service has loaded), and never hands one to
BentoML's router, request context, IO descriptors and streaming response: measured, that machinery cost
as much CPU per request as the model (docs/performance.md). So a model endpoint has one path.
The service also puts the gate before BentoML's own middlewares (bentos/bentoml_fixes.py: gate_first),
so it bounds the wait for a body itself: a body that has not arrived in `body_timeout_s` is a 408
(`BodyDeadline`: one sweep a second, not a timer per request).

`GET /predlog` answers the prediction log's state as JSON (`ServingState.log_state`): rows queued,
rows spilled and not yet replayed, whether the database answers. The control plane asks it before each
evaluation (control_plane/log_backlog.py); it costs microseconds, where building /metrics costs a Bento
milliseconds of its event loop. The gateway does not route it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import Callable
from contextvars import Context, ContextVar
from dataclasses import dataclass
from typing import Any, Protocol

from control_plane.request_ids import MAX_CLIENT_ID_CHARS, RequestIdSigner
from control_plane.users import user_id_problem

log = logging.getLogger("recsys.http")

LOG_STATE_PATH = "/predlog"
ROUTES = ("weighted", "override")  # values of X-Recsys-Route set by Traefik; anything else is "direct"
# Traefik's mirror reaches a shadow version's endpoints under this prefix (control_plane/traffic/
# traefik_file.py: SHADOW_PATH_PREFIX); such a request is a copy whose answer nobody sees: route = shadow.
SHADOW_PREFIX = "/shadow"
SHADOW_ROUTE = "shadow"
# The client's X-Request-ID is kept in front of the id the Bento issues (control_plane/request_ids.py).
MAX_REQUEST_ID_CHARS = MAX_CLIENT_ID_CHARS
# During a shadow phase the gateway's `pairkey` plugin gives every request this header before Traefik's
# mirror copies it, so the baseline's row and the shadow's copy log the same key (predictions.pair_key).
PAIR_HEADER = "x-recsys-pair"
MAX_PAIR_KEY_CHARS = 128  # predictions.pair_key is String(128)


@dataclass(slots=True)
class RequestInfo:
    """What is fixed when a request arrives."""

    request_id: str
    route: str
    role: str
    endpoint: str
    ts: float  # epoch seconds at arrival
    started: float  # perf_counter at arrival
    in_handler: bool = False  # the model endpoint's code started (past body parsing and validation)
    logged: bool = False  # the handler wrote its predictions row
    user: str | None = None  # the X-User-Id it named (valid, or the request was refused)
    pair_key: str | None = None  # the key its shadow copy shares with it (`pair_key`), if any

    def elapsed_ms(self) -> float:
        return (time.perf_counter() - self.started) * 1000.0


current_request: ContextVar[RequestInfo | None] = ContextVar("recsys_request", default=None)


class ServingState(Protocol):
    """What the middleware needs from the running service."""

    model_version: int

    def current_role(self) -> str: ...

    def answer(self, info: RequestInfo, body: bytes) -> tuple[int, bytes]:
        """The status and JSON body of a model endpoint's POST (see the module docstring)."""
        ...

    def request_finished(self, info: RequestInfo, status: int) -> None: ...

    def log_state(self) -> dict[str, Any]: ...


UNEXPECTED_ERROR = b'{"error":"An unexpected error has occurred, please check the server log."}'


def valid_request_id(value: str) -> bool:
    return (
        0 < len(value) <= MAX_REQUEST_ID_CHARS
        and value.isascii()
        and value.isprintable()
        and " " not in value
    )


class RequestGate:
    """Pure ASGI middleware (no BaseHTTPMiddleware: it would cost a task and a copy per request)."""

    def __init__(
        self,
        app,
        *,
        endpoints: dict[str, str],
        max_body_bytes: int | Callable[[], int],
        state: Callable[[], ServingState | None],
        body_timeout_s: float = 10.0,
        request_ids: Callable[[], RequestIdSigner] | None = None,
    ) -> None:
        self.app = app
        # Signs the id of every answer; by default a key of this process alone (no label can name its ids).
        self._request_ids_getter = request_ids or RequestIdSigner.ephemeral
        self._request_ids: RequestIdSigner | None = None
        self.body_deadline = BodyDeadline(body_timeout_s)
        self.endpoints = endpoints  # path -> endpoint name
        self._max_body_bytes = max_body_bytes
        self._state_getter = state
        self._state: ServingState | None = None

    @property
    def max_body_bytes(self) -> int:
        if callable(self._max_body_bytes):
            self._max_body_bytes = self._max_body_bytes()
        return self._max_body_bytes

    @property
    def request_ids(self) -> RequestIdSigner:
        if self._request_ids is None:
            self._request_ids = self._request_ids_getter()
        return self._request_ids

    def _serving_state(self) -> ServingState | None:
        if self._state is None:
            self._state = self._state_getter()
        return self._state

    async def __call__(self, scope, receive, send) -> None:
        path = scope["path"] if scope["type"] == "http" else ""
        shadow = path.startswith(SHADOW_PREFIX + "/")
        endpoint = self.endpoints.get(path[len(SHADOW_PREFIX) :] if shadow else path) if path else None
        if endpoint is None:
            if scope["type"] == "http" and scope["path"] == LOG_STATE_PATH and scope["method"] == "GET":
                await self._log_state(scope, receive, send)
            else:
                await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        if shadow:  # the app (if the gate does not answer itself) knows the endpoint by its own path
            scope = {
                **scope,
                "path": path[len(SHADOW_PREFIX) :],
                "raw_path": path[len(SHADOW_PREFIX) :].encode(),
            }
        state = self._serving_state()
        headers = _headers(scope)
        role = state.current_role() if state is not None else "unknown"
        version = str(state.model_version) if state is not None else ""
        supplied_id = headers.get("x-request-id")
        # Always a fresh id, the client's in front of it: a client cannot make two answers share a row.
        client_id = supplied_id if supplied_id and valid_request_id(supplied_id) else None
        request_id = self.request_ids.issue(new_request_id(), client_id)
        route = headers.get("x-recsys-route", "direct")
        info = RequestInfo(
            request_id=request_id,
            route=SHADOW_ROUTE if shadow else route if route in ROUTES else "direct",
            role=role,
            endpoint=endpoint,
            ts=time.time(),
            started=started,
            user=headers.get("x-user-id"),
            pair_key=headers.get(PAIR_HEADER) or None,  # checked by _refusal below
        )
        extra_headers = [
            (b"x-request-id", request_id.encode()),
            (b"x-model-version", version.encode()),
            (b"x-model-role", role.encode()),
        ]
        status = 500

        async def send_with_headers(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), *extra_headers]
            await send(message)

        token = current_request.set(info)
        try:
            problem = _refusal(scope, headers, supplied_id, self.max_body_bytes)
            if problem is None and state is None:
                problem = 503, "the model is not loaded yet"
            if problem is not None:
                await _send_json(send_with_headers, *problem)
            else:
                await self._answer(state.answer, info, receive, send_with_headers)
        except asyncio.CancelledError:
            status = 504  # cancelled (the server stopping) before the response was done
            raise
        finally:
            if state is not None:
                try:
                    state.request_finished(info, status)
                except Exception:  # bookkeeping must not turn a served response into an error
                    log.exception("request bookkeeping failed")
            current_request.reset(token)

    async def _log_state(self, scope, receive, send) -> None:
        state = self._serving_state()
        if state is None:
            await _send_json(send, 503, "the service is not loaded yet")
            return
        await _send_body(send, 200, json.dumps(state.log_state()).encode())

    async def _answer(self, answer, info: RequestInfo, receive, send) -> None:
        """Read the body and send what the service's `answer` makes of it (500 if it raises)."""
        body, problem = await self.body_deadline.read(receive, self.max_body_bytes)
        if problem is not None:
            await _send_json(send, *problem)
            return
        if body is None:
            return  # the client went away
        try:
            status, payload = answer(info, body)
        except Exception:
            log.exception("%s failed", info.endpoint)
            status, payload = 500, UNEXPECTED_ERROR
        await _send_body(send, status, payload)


def _headers(scope) -> dict[str, str]:
    return {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}


def _refusal(scope, headers: dict[str, str], supplied_id: str | None, limit: int) -> tuple[int, str] | None:
    """(status, message) when the request is refused before its body is read."""
    if supplied_id is not None and not valid_request_id(supplied_id):
        return 400, (
            f"X-Request-ID must be 1 to {MAX_REQUEST_ID_CHARS} printable ASCII characters without spaces"
        )
    pair = headers.get(PAIR_HEADER)
    if pair is not None and not (
        0 < len(pair) <= MAX_PAIR_KEY_CHARS and pair.isascii() and pair.isprintable() and " " not in pair
    ):
        return (
            400,
            f"X-Recsys-Pair must be 1 to {MAX_PAIR_KEY_CHARS} printable ASCII characters without spaces",
        )
    user = headers.get("x-user-id")
    if user is not None and (problem := user_id_problem(user)) is not None:
        return 400, problem
    if scope["method"] != "POST":
        return 405, f"{scope['path']} takes POST, not {scope['method']}"
    length = headers.get("content-length")
    if length is not None:
        if not length.isdigit():
            return 400, f"Content-Length {length!r} is not a number"
        if int(length) > limit:
            return 413, f"request body is {int(length)} bytes; the limit is {limit} (RECSYS_MAX_BODY_BYTES)"
    media_type = headers.get("content-type", "application/json").split(";")[0].strip().lower()
    if media_type not in ("application/json", ""):
        return 415, f"Content-Type must be application/json, not {media_type!r}"
    return None


async def _read_body(receive, limit: int) -> tuple[bytes | None, tuple[int, str] | None]:
    """The whole body (None if the client went away), or a 413 once it passes `limit`."""
    message = await receive()
    if message["type"] != "http.request":
        return None, None
    chunks = [message.get("body", b"")]
    size = len(chunks[0])
    while size <= limit and message.get("more_body", False):
        message = await receive()
        if message["type"] != "http.request":
            return None, None
        chunks.append(message.get("body", b""))
        size += len(chunks[-1])
    if size > limit:
        return None, (413, f"request body is over the limit of {limit} bytes (RECSYS_MAX_BODY_BYTES)")
    return chunks[0] if len(chunks) == 1 else b"".join(chunks), None


class BodyDeadline:
    """Bounds the wait for request bodies: a body not in after `timeout_s` is a 408.

    A timer per request (`asyncio.timeout`) cost 9 us under uvloop, about 5 % of a Bento's CPU for a
    /predict; here a request registers in a dict while it reads, and one sweep a second cancels the
    readers past their deadline (so a deadline is kept to within a second). The sweep runs while every
    reader waits at its `receive()`, so its cancellation lands there and nowhere else.
    """

    def __init__(self, timeout_s: float, sweep_s: float = 1.0) -> None:
        self.timeout_s = timeout_s
        self.sweep_s = min(sweep_s, timeout_s)
        # reader -> its deadline (loop time); None once the sweep has cancelled it
        self._reading: dict[asyncio.Task, float | None] = {}
        self._sweeper: asyncio.Task | None = None

    async def read(self, receive, limit: int) -> tuple[bytes | None, tuple[int, str] | None]:
        task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        if self._sweeper is None or self._sweeper.done():
            # in a context of its own, not the first reader's (which would hold its request info)
            self._sweeper = loop.create_task(self._sweep(), name="recsys-body-deadline", context=Context())
        self._reading[task] = loop.time() + self.timeout_s
        try:
            return await _read_body(receive, limit)
        except asyncio.CancelledError:
            if self._reading[task] is not None:  # not the sweep's cancellation
                raise
            task.uncancel()
            return None, (408, f"the request body did not arrive within {self.timeout_s:g} s")
        finally:
            del self._reading[task]

    async def _sweep(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.sweep_s)
            now = loop.time()
            for task, deadline in self._reading.items():
                if deadline is not None and deadline <= now:
                    self._reading[task] = None
                    task.cancel()


def new_request_id() -> str:
    """32 hex digits: the time in ns, then 64 random bits from `random` (reseeded in a forked child).

    Time first, as in UUIDv7: ids made one after another sort one after another, so the primary key
    of `predictions` takes them at its right edge instead of on a random page each: Postgres' CPU a
    logged row 10.3 -> 6.5 us with 300,000 rows in the table (docs/performance.md). `random`, not
    uuid4, which reads the kernel's random source each time (4 us under load against under 1 us): an
    id needs to be unique, not secret.
    """
    return f"{time.time_ns():016x}{random.getrandbits(64):016x}"


async def _send_json(send, status: int, message: str, **extra: Any) -> None:
    await _send_body(send, status, json.dumps({"error": message, **extra}).encode())


async def _send_body(send, status: int, body: bytes) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})
