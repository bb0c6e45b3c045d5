"""BentoML's timeout middleware, fixed to cancel its per-request timer, still times requests out."""

from __future__ import annotations

import asyncio

import pytest

from bentos.bentoml_fixes import cancel_timeout_timers


def run(app, timeout_s: float):
    from bentoml._internal.server.http.traffic import TimeoutMiddleware

    assert cancel_timeout_timers()
    middleware = TimeoutMiddleware(app, timeout=timeout_s)
    sent = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    async def main():
        await middleware({"type": "http", "method": "POST", "path": "/predict", "headers": []}, receive, send)
        return sum(not h.cancelled() for h in asyncio.get_running_loop()._scheduled)

    pending_timers = asyncio.run(main())
    return sent, pending_timers


async def ok_app(scope, receive, send):
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


async def slow_app(scope, receive, send):
    await asyncio.sleep(5)


def test_no_timer_outlives_the_request():
    sent, pending_timers = run(ok_app, timeout_s=60)
    assert sent[0]["status"] == 200
    assert pending_timers == 0


def test_a_slow_request_still_gets_a_504():
    sent, _ = run(slow_app, timeout_s=0.05)
    assert sent[0]["status"] == 504


def test_each_bento_gets_its_own_prometheus_directory(monkeypatch, tmp_path):
    from bentoml._internal.configuration.containers import BentoMLContainer

    from bentos.bentoml_fixes import separate_prometheus_dir

    monkeypatch.setenv("BENTOML_HOME", str(tmp_path))
    try:
        path = separate_prometheus_dir("recsys-v3")
        assert path.endswith("prometheus_multiproc_dir.recsys-v3")
        assert BentoMLContainer.prometheus_multiproc_dir.get() == path
        # RECSYS_PROMETHEUS_DIR (Settings.bento_prometheus_dir) chooses it
        assert separate_prometheus_dir("recsys-v3", str(tmp_path / "mine")) == str(tmp_path / "mine")
    finally:
        BentoMLContainer.prometheus_multiproc_dir.reset()


def test_gate_first_puts_the_gate_before_bentoml_s_middlewares(monkeypatch):
    from _bentoml_impl.server.app import ServiceAppFactory
    from starlette.middleware import Middleware

    from bentos.bentoml_fixes import gate_first

    class Metrics: ...

    class Timeout: ...

    class Gate: ...

    class Context: ...

    listed = [Middleware(Metrics), Middleware(Timeout), Middleware(Gate), Middleware(Context)]
    # the property BentoML builds the app's middleware list with (restored after the test)
    monkeypatch.setattr(ServiceAppFactory, "middlewares", property(lambda self: list(listed)))
    assert gate_first(Gate)
    assert gate_first(Gate)  # a second call does not wrap it twice
    assert [m.cls for m in ServiceAppFactory.middlewares.fget(object())] == [Gate, Metrics, Timeout, Context]


def test_uvicorn_s_access_log_is_detached(monkeypatch):
    import logging

    from bentos.logs import detach_uvicorn_access_log

    access = logging.getLogger("uvicorn.access")
    monkeypatch.setattr(access, "handlers", [logging.NullHandler()])
    monkeypatch.setattr(access, "propagate", True)
    monkeypatch.setattr(logging.getLogger(), "handlers", [logging.NullHandler()])
    assert access.hasHandlers()
    detach_uvicorn_access_log()
    assert not access.hasHandlers()  # what uvicorn asks, per connection, before building a line


def test_bentoml_keeps_its_bentos_in_the_home_it_is_given_and_refuses_another(tmp_path):
    from bentoml._internal.configuration.containers import BentoMLContainer
    from simple_di import sentinel

    from bentos.bentoml_fixes import use_bentoml_home

    provider = BentoMLContainer.bentoml_home
    saved = provider._cache, provider._override
    provider._cache = provider._override = sentinel  # as in a process whose BentoML has not resolved it yet
    try:
        use_bentoml_home(str(tmp_path / "home"))
        assert provider.get() == str(tmp_path / "home") and (tmp_path / "home" / "bentos").is_dir()
        use_bentoml_home(str(tmp_path / "home"))  # the same home again: nothing to do
        with pytest.raises(RuntimeError, match="already uses"):
            use_bentoml_home(str(tmp_path / "elsewhere"))
    finally:
        provider._cache, provider._override = saved
