"""Shared fixtures: a fresh Postgres database per test session, Redis, free ports."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
import urllib.parse
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

PG_ADMIN_URL = os.environ.get("TEST_PG_ADMIN_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/test")
REDIS_TEST_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(check, timeout_s: float, what: str, every_s: float = 0.5):
    """Poll `check` until it returns something true and return that; fail naming `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not (value := check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout_s:.0f} s")
        time.sleep(every_s)
    return value


class _Ready(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args):
        pass


def ready_servers(n: int) -> list[ThreadingHTTPServer]:
    """n stand-in Bentos on free ports that answer every GET (/readyz too) with 200; `.shutdown()` each after."""
    servers = []
    for _ in range(n):
        srv = ThreadingHTTPServer(("127.0.0.1", 0), _Ready)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
    return servers


def post_large(url: str, body: bytes, headers: dict | None = None, timeout: float = 10) -> int:
    """The status for a large POST body sent as careful clients send one: `Expect: 100-continue` first.

    A server that refuses a body by its length answers at once and closes; a client that pushes
    the whole body first may see only a broken pipe instead of that answer.
    """
    parts = urllib.parse.urlsplit(url)
    extra = "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items())
    with socket.create_connection((parts.hostname, parts.port), timeout=timeout) as sock:
        sock.sendall(
            (
                f"POST {parts.path} HTTP/1.1\r\nHost: {parts.netloc}\r\n{extra}"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
                "Expect: 100-continue\r\nConnection: close\r\n\r\n"
            ).encode()
        )
        status = int(sock.recv(65536).split(b" ", 2)[1])
        if status == 100:
            sock.sendall(body)
            status = int(sock.recv(65536).split(b" ", 2)[1])
        return status


@contextlib.contextmanager
def fresh_database(prefix: str = "recsys_test"):
    """A brand-new Postgres database, migrated to head; dropped (its sessions ended) on exit."""
    from sqlalchemy import create_engine, text

    from control_plane.db.engine import migrate

    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    try:
        migrate(url)
        yield url
    finally:
        with admin.connect() as conn:
            conn.execute(
                text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :n"), {"n": name}
            )
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
        admin.dispose()


@pytest.fixture(scope="session")
def pg_url():
    """A brand-new Postgres database for the test session."""
    with fresh_database() as url:
        yield url


@pytest.fixture
def pg_engine(pg_url):
    """An engine on the session database with every table emptied before the test."""
    from sqlalchemy import text

    from control_plane.db.engine import make_engine

    engine = make_engine(pg_url)
    with engine.begin() as conn:
        conn.execute(
            text(
                "TRUNCATE predictions, labels, request_buckets, label_buckets, label_watermarks, traffic_config,"
                " user_requests, user_labels, user_clicks, pair_buckets, pair_label_buckets, pair_watermarks,"
                " decisions, rollouts RESTART IDENTITY CASCADE"
            )
        )
    yield engine
    engine.dispose()


@pytest.fixture
def redis_url():
    """The machine's real Redis, on a database number of this session's own, emptied before the test."""
    import redis

    # A database number of this session's own, so that two test sessions on one machine (and their RQ
    # workers, which all listen on the queue "recsys") never take each other's jobs.
    url = REDIS_TEST_URL.rsplit("/", 1)[0] + f"/{1 + os.getpid() % 15}"
    client = redis.Redis.from_url(url)
    client.flushdb()
    yield url
    client.flushdb()
    client.close()


def pytest_runtest_logreport(report):
    """In CI a skipped test is a failure: every tier runs for real there."""
    if os.environ.get("CI") and report.skipped and report.when in ("setup", "call"):
        report.outcome = "failed"
        report.longrepr = f"skipped in CI, which counts as a failure: {report.longrepr}"
