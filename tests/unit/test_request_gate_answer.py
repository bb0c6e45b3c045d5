"""The serving state's `answer()` serves the model endpoints; the app behind sees none of them."""

from __future__ import annotations

import pytest
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from bentos.http import RequestGate


class AnsweringState:
    model_version = 3

    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        self.finished: list[tuple[str, int]] = []
        self.fail = False

    def current_role(self) -> str:
        return "baseline"

    def request_finished(self, info, status: int) -> None:
        self.finished.append((info.request_id, status))

    def answer(self, info, body: bytes) -> tuple[int, bytes]:
        if self.fail:
            raise RuntimeError("model broke")
        self.bodies.append(body)
        return 200, b'{"request_id": "%s", "n": %d}' % (info.request_id.encode(), len(body))


@pytest.fixture
def state() -> AnsweringState:
    return AnsweringState()


@pytest.fixture
def client(state):
    app_calls = []

    async def predict(request):
        app_calls.append(request.method)
        return JSONResponse({"from": "app"}, status_code=405 if request.method == "GET" else 200)

    app = Starlette(routes=[Route("/predict", predict, methods=["GET", "POST"])])
    app.add_middleware(
        RequestGate, endpoints={"/predict": "predict"}, max_body_bytes=100, state=lambda: state
    )
    with TestClient(app) as c:
        c.app_calls = app_calls
        yield c


def test_a_post_is_answered_by_the_state_with_the_gate_s_headers(client, state):
    r = client.post("/predict", content=b'{"x": 1}', headers={"content-type": "application/json"})
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    assert r.json() == {"request_id": r.headers["x-request-id"], "n": 8}
    assert r.headers["x-model-version"] == "3" and r.headers["x-model-role"] == "baseline"
    assert state.bodies == [b'{"x": 1}'] and client.app_calls == []
    assert state.finished == [(r.headers["x-request-id"], 200)]


def test_a_chunked_body_is_read_whole(client, state):
    r = client.post("/predict", content=iter([b"{", b'"a"', b": 2}"]))
    assert r.status_code == 200 and state.bodies == [b'{"a": 2}']


def test_a_chunked_body_over_the_limit_is_refused_413(client, state):
    r = client.post("/predict", content=iter([b"x" * 60, b"x" * 60]))
    assert r.status_code == 413 and state.bodies == []


def test_refusals_still_come_first(client, state):
    assert client.post("/predict", content=b"{}", headers={"content-type": "text/plain"}).status_code == 415
    assert client.post("/predict", content=b"x" * 101).status_code == 413
    assert state.bodies == []


def test_a_failure_is_a_500_with_a_json_error(client, state):
    state.fail = True
    r = client.post("/predict", content=b"{}")
    assert r.status_code == 500 and "unexpected error" in r.json()["error"]
    assert state.finished[-1][1] == 500


def test_other_methods_are_refused_by_the_gate_too(client, state):
    assert client.get("/predict").status_code == 405 and client.app_calls == [] and state.bodies == []
