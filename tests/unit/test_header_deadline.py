"""The header deadline patched into uvicorn (bentos/header_deadline.py), on a real uvicorn server."""

from __future__ import annotations

import ast
import hashlib
import inspect
import select
import socket
import threading
import time

import pytest
import uvicorn

from bentos import header_deadline

# sha256 (first 16 hex digits) of each method the patch wraps or relies on, as uvicorn PATCHED_UVICORN
# has it. A new uvicorn that changes one of them fails here: read the change, check the patch, update.
KNOWN_SOURCES = {
    "__init__": "d5fa7df7a7fc6bdf",
    "connection_made": "90cf013eb407eb3f",
    "on_message_begin": "8b027723aca37972",
    "on_headers_complete": "c713423e2fb6aa9d",
    "connection_lost": "c5567cca5922d934",
}


def _method_hashes() -> dict[str, str]:
    from uvicorn.protocols.http import httptools_impl

    src = inspect.getsource(httptools_impl)
    (cls,) = [n for n in ast.parse(src).body if isinstance(n, ast.ClassDef) and n.name == "HttpToolsProtocol"]
    return {
        fn.name: hashlib.sha256(ast.get_source_segment(src, fn).encode()).hexdigest()[:16]
        for fn in cls.body
        if isinstance(fn, ast.FunctionDef) and fn.name in KNOWN_SOURCES
    }


def test_the_patched_uvicorn_internals_are_the_ones_the_patch_was_written_for():
    assert uvicorn.__version__ == header_deadline.PATCHED_UVICORN
    assert set(header_deadline.WRAPPED) <= set(KNOWN_SOURCES)
    assert _method_hashes() == KNOWN_SOURCES


async def _app(scope, receive, send):
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


@pytest.fixture
def server():
    """uvicorn (httptools, as under `bentoml serve`) on a free port, the deadline at 1 s."""
    deadline = header_deadline.install(5)
    assert deadline is not None, "the patch was not applied"
    saved = deadline.timeout_s, deadline.sweep_s
    deadline.timeout_s, deadline.sweep_s = 1.0, 0.2
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(_app, http="auto", log_config=None, lifespan="off", timeout_keep_alive=30)
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not srv.started:
        time.sleep(0.02)
    try:
        yield sock.getsockname(), deadline
    finally:
        srv.should_exit = True
        thread.join(10)
        deadline.timeout_s, deadline.sweep_s = saved


def _answer(addr, parts: list[bytes], pause_s: float = 0.0, wait_s: float = 10.0) -> bytes:
    """What the server sends until it closes (b"" if it closes without a word); TimeoutError if it
    neither answers nor closes within `wait_s` of the last part."""
    with socket.create_connection(addr, timeout=wait_s) as s:
        for part in parts:
            if select.select([s], [], [], pause_s)[0]:
                break  # the server has answered (or closed): sending more would only get a reset
            s.sendall(part)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
        return data


def test_headers_that_stall_get_408_and_a_close(server):
    addr, deadline = server
    before = deadline.expired
    data = _answer(addr, [b"POST /predict HTTP/1.1\r\nHost: r\r\nContent-Ty"])
    assert data.startswith(b"HTTP/1.1 408 "), data
    assert b"the request headers did not arrive within 1 s" in data
    assert deadline.expired == before + 1


def test_headers_trickled_a_byte_at_a_time_get_408_although_bytes_keep_coming(server):
    addr, _ = server
    request = b"GET / HTTP/1.1\r\nHost: r\r\nX-Slow: " + b"a" * 200
    data = _answer(addr, [request[i : i + 1] for i in range(40)], pause_s=0.05)  # 2 s of bytes
    assert data.startswith(b"HTTP/1.1 408 "), data


def test_a_connection_that_sends_nothing_is_closed_without_an_answer(server):
    addr, _ = server
    assert _answer(addr, []) == b""


def test_a_keep_alive_connection_is_served_and_its_second_request_gets_its_own_deadline(server):
    addr, _ = server
    with socket.create_connection(addr, timeout=10) as s:
        for _ in range(2):
            s.sendall(b"GET / HTTP/1.1\r\nHost: r\r\n\r\n")
            assert s.recv(65536).startswith(b"HTTP/1.1 200 ")
            time.sleep(1.5)  # idle past the header deadline between requests: uvicorn's keep-alive rules
        s.sendall(b"GET / HTTP/1.1\r\nHo")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    assert data.startswith(b"HTTP/1.1 408 "), data


def test_whole_requests_are_not_affected(server):
    addr, deadline = server
    before = deadline.expired
    for _ in range(20):
        assert _answer(addr, [b"GET / HTTP/1.1\r\nHost: r\r\nConnection: close\r\n\r\n"]).startswith(
            b"HTTP/1.1 200 "
        )
    assert deadline.expired == before
    assert deadline._watched == {} or all(p.transport.is_closing() for p in deadline._watched)
