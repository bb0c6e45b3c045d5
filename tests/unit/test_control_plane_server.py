"""The control plane's waitress with its request deadline (control_plane/web/server.py), on a real server."""

from __future__ import annotations

import ast
import hashlib
import inspect
import select
import socket
import threading
import time
from importlib.metadata import version

import pytest

from control_plane.web import server as cp_server

# sha256 (first 16 hex digits) of the waitress code DeadlineChannel relies on, as PATCHED_WAITRESS has it:
# a waitress that changes one of these fails here (read the change, check the channel, update).
KNOWN_SOURCES = {
    ("channel", "HTTPChannel", "received"): "943e4f9b347c5311",
    ("channel", "HTTPChannel", "readable"): "c470e543abb37309",
    ("channel", "HTTPChannel", "service"): "c729e2a9d46db2d3",
    ("server", "BaseWSGIServer", "handle_accept"): "53ec632dfad44694",
    ("task", "ErrorTask", "execute"): "ed93cdf154b7e22c",
}


def _source_hashes() -> dict[tuple[str, str, str], str]:
    import importlib

    out = {}
    for module, cls_name, method in KNOWN_SOURCES:
        src = inspect.getsource(importlib.import_module(f"waitress.{module}"))
        (cls,) = [n for n in ast.parse(src).body if isinstance(n, ast.ClassDef) and n.name == cls_name]
        (fn,) = [n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == method]
        out[(module, cls_name, method)] = hashlib.sha256(
            ast.get_source_segment(src, fn).encode()
        ).hexdigest()[:16]
    return out


def test_the_waitress_internals_are_the_ones_the_channel_was_written_for():
    assert version("waitress") == cp_server.PATCHED_WAITRESS
    assert _source_hashes() == KNOWN_SOURCES


def _app(environ, start_response):
    body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
    start_response("200 OK", [("Content-Length", str(len(body) + 2))])
    return [b"ok" + body]


@pytest.fixture
def server():
    """The control plane's server with a 1 s request deadline and the stack's options, on a free port."""
    srv = cp_server.create_server(
        1.0,
        _app,
        listen="127.0.0.1:0",
        threads=2,
        channel_timeout=120,
        cleanup_interval=10,
        asyncore_use_poll=True,
    )
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    try:
        yield (srv.effective_host, srv.effective_port)
    finally:
        srv.close()
        srv.task_dispatcher.shutdown()


def _answer(addr, parts: list[bytes], pause_s: float = 0.0, wait_s: float = 10.0) -> bytes:
    """What the server sends until it closes; TimeoutError if it neither answers nor closes in `wait_s`."""
    with socket.create_connection(addr, timeout=wait_s) as s:
        for part in parts:
            if select.select([s], [], [], pause_s)[0]:
                break  # answered or closed: more bytes would only get a reset
            s.sendall(part)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
        return data


def test_headers_that_stall_get_408_and_a_close(server):
    data = _answer(server, [b"POST /feedback HTTP/1.1\r\nHost: r\r\nContent-Ty"])
    assert data.startswith(b"HTTP/1.1 408 Request Timeout"), data
    assert b"the request was not received whole within 1 s" in data


def test_headers_trickled_a_byte_at_a_time_get_408_although_bytes_keep_coming(server):
    request = b"GET /healthz HTTP/1.1\r\nHost: r\r\nX-Slow: " + b"a" * 200
    data = _answer(server, [request[i : i + 1] for i in range(60)], pause_s=0.05)  # 3 s of bytes
    assert data.startswith(b"HTTP/1.1 408 "), data


def test_a_body_that_stalls_gets_408(server):
    data = _answer(server, [b"POST /feedback HTTP/1.1\r\nHost: r\r\nContent-Length: 10\r\n\r\n12345"])
    assert data.startswith(b"HTTP/1.1 408 "), data


def test_an_idle_keep_alive_connection_is_kept_past_the_deadline_and_served(server):
    """Traefik's pooled connections sit idle between requests: the deadline must not close them (a 502)."""
    with socket.create_connection(server, timeout=10) as s:
        for _ in range(2):
            s.sendall(b"POST / HTTP/1.1\r\nHost: r\r\nContent-Length: 3\r\n\r\nabc")
            assert _response(s).startswith(b"HTTP/1.1 200 OK")
            time.sleep(1.5)  # idle past the deadline: still open
        s.sendall(b"GET / HTTP/1.1\r\nHost: r\r\n\r\n")
        assert _response(s).startswith(b"HTTP/1.1 200 OK")


def _response(s: socket.socket) -> bytes:
    """One whole response (its headers, then Content-Length bytes of body), however TCP splits it."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        assert chunk, data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        (
            int(line.split(b":", 1)[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        ),
        0,
    )
    while len(body) < length:
        chunk = s.recv(65536)
        assert chunk, data
        body += chunk
    assert len(body) == length, (head, body)  # nothing of a next response read ahead
    return head + b"\r\n\r\n" + body


def test_whole_requests_are_served(server):
    for _ in range(20):
        data = _answer(
            server, [b"POST / HTTP/1.1\r\nHost: r\r\nConnection: close\r\nContent-Length: 2\r\n\r\nhi"]
        )
        assert data.startswith(b"HTTP/1.1 200 OK") and data.endswith(b"okhi")


def test_the_timeout_option_is_taken_out_of_waitress_arguments():
    assert cp_server.split_timeout(["--request-timeout=5", "--threads=8", "m:app"]) == (
        5.0,
        ["--threads=8", "m:app"],
    )
    assert cp_server.split_timeout(["m:app"]) == (None, ["m:app"])
    with pytest.raises(SystemExit):
        cp_server.split_timeout(["--request-timeout=0"])


def test_the_context_and_the_registry_are_warmed_up_on_a_thread_of_their_own():
    from types import SimpleNamespace

    from control_plane.web.wiring import EXTENSION

    calls = []
    registry = SimpleNamespace(versions=lambda: calls.append(threading.current_thread().name) or [])
    ctx = SimpleNamespace(registry=registry)
    app = SimpleNamespace(extensions={EXTENSION: SimpleNamespace(context=lambda: ctx)})
    cp_server.warm_up_in_the_background(app).join(10)
    assert calls == ["warm-up"]
