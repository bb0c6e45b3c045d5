"""Asking the Bentos for their log backlog: who has rows to replay, and who is left out."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from control_plane.log_backlog import Backlog, HttpLogBacklog
from tests.conftest import free_port


def log_state(version: int, rows: int, size: int) -> str:
    """GET /predlog as a Bento answers it (bentos/service.py: log_state)."""
    return json.dumps(
        {"model_version": version, "queue_depth": 4, "spill_rows": rows, "spill_bytes": size, "db_up": True}
    )


@pytest.fixture
def serve():
    servers = []

    def start(body: str, status: int = 200) -> str:
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(status if self.path == "/predlog" else 404)
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


def test_only_bentos_with_rows_to_replay_are_named_and_those_that_do_not_answer_are_left_out(serve):
    endpoints = {
        1: serve(log_state(1, 0, 0)),
        2: serve(log_state(2, 1234, 250_000)),
        3: serve(log_state(3, 0, 512)),  # another process's spill file, waiting in its directory
        4: serve("ok"),  # not a Bento
        5: serve(json.dumps({"error": "the service is not loaded yet"}), status=503),
        6: serve(json.dumps({"model_version": 6})),  # answers, but without the figures
        7: f"http://127.0.0.1:{free_port()}",  # down
    }
    assert HttpLogBacklog(timeout_s=1).waiting(endpoints) == [Backlog(2, 1234, 250_000), Backlog(3, 0, 512)]
    assert str(Backlog(2, 1234, 250_000)) == "version 2: 1,234 rows, 250,000 bytes in spill files"


def test_a_bento_with_no_writer_alive_is_not_waited_for(serve):
    """Nothing would replay its files: waiting would record no_data at every evaluation."""
    stuck = json.loads(log_state(2, 500, 100_000)) | {"writer_alive": False}
    endpoints = {1: serve(log_state(1, 10, 2_000)), 2: serve(json.dumps(stuck))}
    assert HttpLogBacklog(timeout_s=1).waiting(endpoints) == [Backlog(1, 10, 2_000)]
