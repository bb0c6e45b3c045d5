"""Reading the Bentos' log backlog from their /metrics: who has rows to replay, and who is left out."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import prometheus_client as pc
import pytest

from control_plane.log_backlog import Backlog, HttpLogBacklog, spill_gauges
from tests.conftest import free_port


def exposition(rows: int, size: int, version: int = 3) -> str:
    """/metrics as a Bento writes it: the spill gauges among others, labelled by version."""
    registry = pc.CollectorRegistry()
    labels = ["model_version"]
    pc.Gauge("recsys_predlog_spill_rows", "rows", labels, registry=registry).labels(version).set(rows)
    pc.Gauge("recsys_predlog_spill_bytes", "bytes", labels, registry=registry).labels(version).set(size)
    pc.Gauge("recsys_predlog_queue_depth", "queued", labels, registry=registry).labels(version).set(77)
    pc.Counter("bentoml_service_request", "requests", registry=registry).inc(5)
    return pc.generate_latest(registry).decode()


@pytest.fixture
def serve():
    servers = []

    def start(body: str, status: int = 200) -> str:
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(status if self.path == "/metrics" else 404)
                self.end_headers()
                self.wfile.write(body.encode())

            def log_message(self, *args):
                pass

        srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
        return f"http://127.0.0.1:{srv.server_address[1]}"

    yield start
    for srv in servers:
        srv.shutdown()


def test_the_spill_gauges_are_summed_and_nothing_else_counts():
    assert spill_gauges(exposition(12, 4096)) == (12, 4096)
    assert spill_gauges(exposition(12, 4096) + exposition(3, 100, version=4)) == (15, 4196)
    assert spill_gauges(exposition(0, 0)) == (0, 0)
    with pytest.raises(ValueError):
        spill_gauges("ok")


def test_only_bentos_with_rows_to_replay_are_named_and_those_that_do_not_answer_are_left_out(serve):
    endpoints = {
        1: serve(exposition(0, 0, version=1)),
        2: serve(exposition(1234, 250_000, version=2)),
        3: serve(exposition(0, 512, version=3)),  # another process's spill file, waiting in its directory
        4: serve("ok"),  # not a Bento
        5: serve("", status=500),
        6: f"http://127.0.0.1:{free_port()}",  # down
    }
    assert HttpLogBacklog(timeout_s=1).waiting(endpoints) == [Backlog(2, 1234, 250_000), Backlog(3, 0, 512)]
    assert str(Backlog(2, 1234, 250_000)) == "version 2: 1,234 rows, 250,000 bytes in spill files"
