"""The middleware in front of the model endpoints: limits, request ids, routes and headers."""

from __future__ import annotations

import asyncio
import json
import os
import time

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from bentos.http import BodyDeadline, RequestGate, current_request, new_request_id
from control_plane.request_ids import MAX_CLIENT_ID_CHARS, MAX_ID_CHARS, RequestIdSigner


class FakeState:
    model_version = 7

    def __init__(self) -> None:
        self.role = "canary"
        self.finished: list[tuple[str, int]] = []
        self.reads: list[int] = []  # the length of every body `answer` was given

    def current_role(self) -> str:
        return self.role

    def answer(self, info, body: bytes) -> tuple[int, bytes]:
        self.reads.append(len(body))
        assert current_request.get() is info  # log lines and the handler read the same record
        fields = {
            "request_id": info.request_id,
            "route": info.route,
            "role": info.role,
            "n": len(body),
            "pair_key": info.pair_key,
        }
        return 200, json.dumps(fields).encode()

    def request_finished(self, info, status: int) -> None:
        self.finished.append((info.request_id, status))

    def log_state(self) -> dict:
        return {"model_version": self.model_version, "spill_rows": 3, "spill_bytes": 600, "db_up": False}


@pytest.fixture
def state() -> FakeState:
    return FakeState()


@pytest.fixture
def client(state):
    app_calls = []

    async def anything(request: Request):
        app_calls.append(request.url.path)
        return JSONResponse({"ok": True})

    # /predict is routed too, as BentoML routes its APIs: only the gate may answer it
    app = Starlette(routes=[Route(p, anything, methods=["GET", "POST"]) for p in ("/predict", "/other")])
    app.add_middleware(
        RequestGate, endpoints={"/predict": "predict"}, max_body_bytes=100, state=lambda: state
    )
    with TestClient(app) as c:
        c.app_calls = app_calls
        yield c


def test_headers_carry_request_id_version_and_role(client, state):
    r = client.post("/predict", content=b"{}", headers={"content-type": "application/json"})
    assert r.status_code == 200
    rid = r.headers["x-request-id"]
    fresh, signature = rid.split(".")
    assert len(fresh) == 32 and len(signature) == 24 and r.json()["request_id"] == rid
    assert r.headers["x-model-version"] == "7" and r.headers["x-model-role"] == "canary"
    assert state.finished == [(rid, 200)]


def test_a_caller_supplied_request_id_is_kept_in_front_of_a_fresh_one(client):
    r = client.post("/predict", content=b"{}", headers={"x-request-id": "abc-123"})
    assert (
        r.headers["x-request-id"].startswith("abc-123.")
        and r.json()["request_id"] == r.headers["x-request-id"]
    )


def test_the_same_caller_id_twice_gets_two_ids_each_signed(state):
    signer = RequestIdSigner.from_secret("k" * 64)
    app = Starlette(routes=[])
    app.add_middleware(
        RequestGate,
        endpoints={"/predict": "predict"},
        max_body_bytes=100,
        state=lambda: state,
        request_ids=lambda: signer,
    )
    with TestClient(app) as c:
        ids = [
            c.post("/predict", content=b"{}", headers={"x-request-id": "same"}).headers["x-request-id"]
            for _ in "ab"
        ]
    assert ids[0] != ids[1] and all(signer.issued(i) and i.startswith("same.") for i in ids)
    assert not RequestIdSigner.from_secret("other" * 13).issued(ids[0])


def test_the_longest_caller_id_still_fits_the_log_s_column(client):
    r = client.post("/predict", content=b"{}", headers={"x-request-id": "x" * MAX_CLIENT_ID_CHARS})
    assert r.status_code == 200 and len(r.headers["x-request-id"]) == MAX_ID_CHARS


@pytest.mark.parametrize("bad", [b"x" * (MAX_CLIENT_ID_CHARS + 1), b"has space", "caf\u00e9".encode()])
def test_an_unusable_request_id_is_refused(client, state, bad):
    r = client.post("/predict", content=b"{}", headers={b"x-request-id": bad})
    assert r.status_code == 400 and "X-Request-ID" in r.json()["error"]
    assert state.reads == []


@pytest.mark.parametrize(
    ("header", "route"), [("weighted", "weighted"), ("override", "override"), ("x", "direct")]
)
def test_route_comes_from_traefik_s_header(client, header, route):
    assert client.post("/predict", content=b"{}", headers={"x-recsys-route": header}).json()["route"] == route


@pytest.mark.parametrize("header", ["weighted", "override", None])
def test_a_copy_from_traefik_s_mirror_under_the_shadow_path_is_route_shadow(client, header):
    headers = {"x-recsys-route": header} if header else {}
    answer = client.post("/shadow/predict", content=b"{}", headers=headers)
    assert answer.status_code == 200 and answer.json()["route"] == "shadow"


def test_the_gateway_s_pair_key_reaches_the_row_of_the_live_answer_and_of_its_shadow_copy(client):
    key = "9f" * 16
    live = client.post(
        "/predict", content=b"{}", headers={"x-recsys-pair": key, "x-recsys-route": "weighted"}
    )
    copy = client.post("/shadow/predict", content=b"{}", headers={"x-recsys-pair": key})
    assert live.json()["pair_key"] == copy.json()["pair_key"] == key
    assert live.json()["request_id"] != copy.json()["request_id"]
    assert client.post("/predict", content=b"{}").json()["pair_key"] is None  # no shadow phase: no key


@pytest.mark.parametrize("bad", [b"x" * 129, b"has space", "caf\u00e9".encode()])
def test_an_unusable_pair_key_is_refused_naming_it(client, state, bad):
    r = client.post("/predict", content=b"{}", headers={b"x-recsys-pair": bad})
    assert r.status_code == 400 and "X-Recsys-Pair" in r.json()["error"]
    assert state.reads == []


def test_the_shadow_prefix_alone_is_no_endpoint(client):
    assert client.post("/shadow/other", content=b"{}").status_code == 404
    assert client.post("/shadow", content=b"{}").status_code == 404


def test_no_route_header_means_direct(client):
    assert client.post("/predict", content=b"{}").json()["route"] == "direct"


def test_the_role_is_the_one_held_when_the_request_arrived(client, state):
    state.role = "baseline"
    r = client.post("/predict", content=b"{}")
    assert r.json()["role"] == "baseline" and r.headers["x-model-role"] == "baseline"


def test_an_oversized_body_is_refused_by_content_length_without_being_read(client, state):
    r = client.post("/predict", content=b"x" * 101, headers={"content-type": "application/json"})
    assert r.status_code == 413
    assert "101 bytes" in r.json()["error"] and "RECSYS_MAX_BODY_BYTES" in r.json()["error"]
    assert state.reads == []
    assert r.headers["x-request-id"] and state.finished[-1][1] == 413


def test_a_chunked_body_over_the_limit_is_refused(client, state):
    def chunks():
        for _ in range(5):
            yield b"x" * 30

    r = client.post("/predict", content=chunks())
    assert r.status_code == 413 and state.reads == []


def test_a_chunked_body_under_the_limit_is_answered_whole(client, state):
    def chunks():
        yield b"{"
        yield b"}"

    assert client.post("/predict", content=chunks()).json()["n"] == 2 and state.reads == [2]


def test_a_model_endpoint_never_reaches_the_app_behind(client, state):
    r = client.get("/predict")
    assert r.status_code == 405 and "takes POST" in r.json()["error"] and r.headers["x-request-id"]
    client.post("/predict", content=b"{}")
    assert client.app_calls == [] and [s for _, s in state.finished] == [405, 200]


def test_a_model_endpoint_before_the_service_has_loaded_is_a_503():
    app = Starlette(routes=[])
    app.add_middleware(RequestGate, endpoints={"/predict": "predict"}, max_body_bytes=100, state=lambda: None)
    with TestClient(app) as c:
        r = c.post("/predict", content=b"{}")
    assert r.status_code == 503 and "not loaded" in r.json()["error"]


def test_a_body_at_the_limit_is_accepted(client):
    assert client.post("/predict", content=b"x" * 100).status_code == 200


@pytest.mark.parametrize(
    "ctype", ["text/plain", "multipart/form-data; boundary=x", "application/x-www-form-urlencoded"]
)
def test_only_json_is_accepted(client, ctype):
    r = client.post("/predict", content=b"{}", headers={"content-type": ctype})
    assert r.status_code == 415 and "application/json" in r.json()["error"]


def test_other_paths_are_passed_through_untouched(client, state):
    r = client.post("/other", content=b"x" * 500, headers={"content-type": "text/plain"})
    assert r.status_code == 200 and "x-request-id" not in r.headers
    assert state.finished == [] and client.app_calls == ["/other"]


def test_the_log_s_state_is_answered_by_the_gate_and_counts_as_no_request(client, state):
    r = client.get("/predlog")
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    assert r.json() == {"model_version": 7, "spill_rows": 3, "spill_bytes": 600, "db_up": False}
    assert state.finished == []
    assert client.post("/predlog", json={}).status_code in (404, 405)  # GET only; the rest is the app's


def test_the_log_s_state_before_the_service_has_loaded_is_a_503():
    app = Starlette(routes=[])
    app.add_middleware(RequestGate, endpoints={}, max_body_bytes=100, state=lambda: None)
    with TestClient(app) as c:
        r = c.get("/predlog")
    assert r.status_code == 503 and "not loaded" in r.json()["error"]


def _gate(state, body_timeout_s: float) -> RequestGate:
    """The gate over a minimal app, for driving with raw ASGI messages."""
    return RequestGate(
        _inner_app,
        endpoints={"/predict": "predict"},
        max_body_bytes=100,
        state=lambda: state,
        body_timeout_s=body_timeout_s,
    )


async def _call_gate(gate: RequestGate, headers: list[tuple[bytes, bytes]], receive) -> list[dict]:
    sent: list[dict] = []

    async def send(message) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/predict", "headers": headers}
    await gate(scope, receive, send)
    return sent


async def _never_sends_its_body() -> dict:
    await asyncio.Event().wait()  # a client that sent its headers and then nothing
    raise AssertionError("unreachable")


async def _inner_app(scope, receive, send) -> None:
    await receive()
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"{}"})


@pytest.mark.parametrize(
    "headers",
    [
        [(b"content-length", b"20"), (b"content-type", b"application/json")],
        [(b"content-type", b"application/json")],  # chunked: under the same bound
    ],
    ids=["sized", "chunked"],
)
def test_a_body_that_does_not_arrive_in_time_is_a_408_naming_the_wait(headers):
    state = FakeState()
    gate = _gate(state, body_timeout_s=0.05)
    sent = asyncio.run(_call_gate(gate, headers, _never_sends_its_body))
    assert sent[0]["status"] == 408
    assert json.loads(sent[1]["body"]) == {"error": "the request body did not arrive within 0.05 s"}
    assert (b"x-model-version", b"7") in sent[0]["headers"] and state.finished[-1][1] == 408


def test_a_body_that_arrives_is_answered_by_the_state():
    state = FakeState()
    gate = _gate(state, body_timeout_s=0.05)

    async def body() -> dict:
        return {"type": "http.request", "body": b'{"features": []}', "more_body": False}

    sent = asyncio.run(_call_gate(gate, [(b"content-length", b"16")], body))
    assert sent[0]["status"] == 200 and json.loads(sent[1]["body"])["n"] == 16


def test_a_body_read_in_time_leaves_no_cancellation_behind():
    deadline = BodyDeadline(0.05)

    async def body() -> dict:
        return {"type": "http.request", "body": b"{}", "more_body": False}

    async def main():
        read = await deadline.read(body, 100)
        await asyncio.sleep(0.2)  # several sweeps later: the request goes on undisturbed
        return read

    assert asyncio.run(main()) == (b"{}", None)


def test_a_cancellation_that_is_not_the_deadline_s_goes_through():
    deadline = BodyDeadline(10)

    async def main():
        reader = asyncio.create_task(deadline.read(_never_sends_its_body, 100))
        await asyncio.sleep(0.01)
        reader.cancel()  # the server stopping, say
        with pytest.raises(asyncio.CancelledError):
            await reader

    asyncio.run(main())


def test_request_ids_are_32_hex_digits_unique_time_ordered_and_differ_in_a_forked_child():
    made = [new_request_id() for _ in range(10_000)]
    assert len(set(made)) == 10_000 and all(len(i) == 32 and int(i, 16) >= 0 for i in made)
    assert made == sorted(made), "ids made one after another sort one after another"
    assert abs(int(made[-1][:16], 16) - time.time_ns()) < 60e9, "the first 16 digits are the time in ns"
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next id, to the parent
        os.write(write_end, new_request_id().encode())
        os._exit(0)
    os.close(write_end)
    os.waitpid(pid, 0)
    child = os.read(read_end, 64).decode()
    # the random half: without a reseed the child's would be the parent's next
    assert len(child) == 32 and child[16:] != new_request_id()[16:]
