"""The middleware in front of the model endpoints: limits, request ids, routes and headers."""

from __future__ import annotations

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from bentos.http import RequestGate, current_request


class FakeState:
    model_version = 7

    def __init__(self) -> None:
        self.role = "canary"
        self.finished: list[tuple[str, int]] = []

    def current_role(self) -> str:
        return self.role

    def request_finished(self, info, status: int) -> None:
        self.finished.append((info.request_id, status))

    def log_state(self) -> dict:
        return {"model_version": self.model_version, "spill_rows": 3, "spill_bytes": 600, "db_up": False}


@pytest.fixture
def state() -> FakeState:
    return FakeState()


@pytest.fixture
def client(state):
    reads = []

    async def predict(request: Request):
        body = await request.body()
        reads.append(len(body))
        info = current_request.get()
        return JSONResponse(
            {"request_id": info.request_id, "route": info.route, "role": info.role, "n": len(body)}
        )

    async def other(request: Request):
        return JSONResponse({"ok": True})

    app = Starlette(
        routes=[Route("/predict", predict, methods=["POST"]), Route("/other", other, methods=["POST"])]
    )
    app.add_middleware(
        RequestGate, endpoints={"/predict": "predict"}, max_body_bytes=100, state=lambda: state
    )
    with TestClient(app) as c:
        c.reads = reads
        yield c


def test_headers_carry_request_id_version_and_role(client, state):
    r = client.post("/predict", content=b"{}", headers={"content-type": "application/json"})
    assert r.status_code == 200
    rid = r.headers["x-request-id"]
    assert len(rid) == 32 and r.json()["request_id"] == rid
    assert r.headers["x-model-version"] == "7" and r.headers["x-model-role"] == "canary"
    assert state.finished == [(rid, 200)]


def test_a_caller_supplied_request_id_is_kept(client):
    r = client.post("/predict", content=b"{}", headers={"x-request-id": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123" and r.json()["request_id"] == "abc-123"


@pytest.mark.parametrize("bad", [b"x" * 129, b"has space", "caf\u00e9".encode()])
def test_an_unusable_request_id_is_refused(client, bad):
    r = client.post("/predict", content=b"{}", headers={b"x-request-id": bad})
    assert r.status_code == 400 and "X-Request-ID" in r.json()["error"]
    assert client.reads == []


@pytest.mark.parametrize(
    ("header", "route"), [("weighted", "weighted"), ("override", "override"), ("x", "direct")]
)
def test_route_comes_from_traefik_s_header(client, header, route):
    assert client.post("/predict", content=b"{}", headers={"x-recsys-route": header}).json()["route"] == route


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
    assert client.reads == []
    assert r.headers["x-request-id"] and state.finished[-1][1] == 413


def test_a_chunked_body_over_the_limit_is_refused(client):
    def chunks():
        for _ in range(5):
            yield b"x" * 30

    r = client.post("/predict", content=chunks())
    assert r.status_code == 413 and client.reads == []


def test_a_chunked_body_under_the_limit_reaches_the_app(client):
    def chunks():
        yield b"{"
        yield b"}"

    assert client.post("/predict", content=chunks()).json()["n"] == 2


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
    assert state.finished == []


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
