"""The control plane's HTTP server: waitress, with a deadline for reading a request.

    python -m control_plane.web.server --request-timeout=5 [waitress-serve's options] module:app

Waitress reads requests on its event loop and gives a thread only to a request it has read whole,
so a slow client costs it a buffer, not a thread (control_plane/stack/programs.py). But its only
timeout is `--channel-timeout`: a connection is closed after that long *without a byte*. A client
that stalls half-way through its headers held its connection for that long (120 s), and one that
trickles a byte every few seconds held it for ever. The timeout cannot simply be shorter: it also
closes the idle keep-alive connections of Traefik, which then sent /feedback on a connection just
closed and answered 502 (docs/hostile-input.md).

`DeadlineChannel` bounds the other thing instead: the time from a request's first byte until it is
read whole, headers and body. A request not read within `--request-timeout` seconds gets 408 and
the connection is closed. An idle connection (no request begun) is left to the channel timeout, so
Traefik's keep-alive connections are closed by Traefik as before, and Traefik's own requests arrive
whole (it buffers the body) in well under a second. The check runs on waitress' event loop each time
it asks a channel whether it is readable, which is at least once a second (`asyncore_loop_timeout`).

Written against waitress `PATCHED_WAITRESS`: another version is served without the deadline, with a
warning, and tests/unit/test_control_plane_server.py fails.
"""

from __future__ import annotations

import functools
import logging
import sys
import threading
import time
from importlib.metadata import version

from control_plane.web.wiring import EXTENSION

log = logging.getLogger("recsys.web")

PATCHED_WAITRESS = "3.0.2"
TIMEOUT_OPTION = "--request-timeout="


def deadline_channel(timeout_s: float) -> type:
    """waitress' HTTPChannel with a deadline of `timeout_s` for reading each request."""
    from waitress.channel import HTTPChannel
    from waitress.utilities import BadRequest

    class RequestTimeout(BadRequest):
        code = 408
        reason = "Request Timeout"

    class DeadlineChannel(HTTPChannel):
        request_timeout_s = timeout_s
        _partial = None  # the parser of the request being read, once it has a byte
        _began = 0.0  # monotonic time of that request's first byte

        def received(self, data):
            out = super().received(data)
            request = self.request  # a request partly read, or None
            if request is not self._partial:
                self._partial = request
                self._began = time.monotonic()
            return out

        def readable(self):
            partial = self._partial
            if (
                partial is not None
                and partial is self.request
                and time.monotonic() - self._began > self.request_timeout_s
            ):
                self._time_out(partial)
            return super().readable()

        def _time_out(self, partial) -> None:
            """Answer 408 in place of the request being read, and close once it is sent."""
            with self.requests_lock:
                self._partial = None
                if self.requests or self.will_close or self.close_when_flushed:
                    return  # a response is still due on this connection; it closes after it
                error = self.parser_class(self.adj)
                error.error = RequestTimeout(
                    f"the request was not received whole within {self.request_timeout_s:g} s"
                )
                error.version = "1.1"  # the request line may not have come; the answer closes anyway
                error.completed = True
                partial.close()
                self.request = None
                self.requests.append(error)
            self.server.add_task(self)

    return DeadlineChannel


def create_server(timeout_s: float | None, application, **kw):
    """waitress.create_server, its channels given the deadline (none when `timeout_s` is None or the
    installed waitress is not PATCHED_WAITRESS)."""
    from waitress.server import BaseWSGIServer
    from waitress.server import create_server as waitress_server

    server = waitress_server(application, **kw)
    installed = version("waitress")
    if timeout_s is None:
        return server
    if installed != PATCHED_WAITRESS:
        log.warning("waitress %s is not %s: no deadline for reading a request", installed, PATCHED_WAITRESS)
        return server
    channel = deadline_channel(timeout_s)
    listeners = [server] if isinstance(server, BaseWSGIServer) else list(server.map.values())
    for listener in listeners:
        if isinstance(listener, BaseWSGIServer):
            listener.channel_class = channel
    return server


def split_timeout(argv: list[str]) -> tuple[float | None, list[str]]:
    """(`--request-timeout` in seconds or None, the other arguments, for waitress-serve)."""
    timeout_s, rest = None, []
    for arg in argv:
        if arg.startswith(TIMEOUT_OPTION):
            timeout_s = float(arg[len(TIMEOUT_OPTION) :])
            if timeout_s <= 0:
                raise SystemExit(f"{TIMEOUT_OPTION}{arg[len(TIMEOUT_OPTION) :]}: must be a positive number")
        else:
            rest.append(arg)
    return timeout_s, rest


def warm_up_in_the_background(app) -> threading.Thread:
    """Build the app's Context and open the MLflow registry on a thread of its own, as the server starts.

    Both are built on first use, and the first request that needed the registry paid for importing
    MLflow and opening its store (its schema checks): 15 s on a loaded machine (10 s to import, 5 s to
    open), 24 s right after a restart. Inside the action lock, when that request started a rollout,
    every operator action then queued behind it. A failure here is only logged: the request that needs
    the registry reports it.
    """

    def _warm() -> None:
        try:
            app.extensions[EXTENSION].context().registry.versions()
        except Exception:
            log.exception("warming up the control plane's registry failed")

    thread = threading.Thread(target=_warm, name="warm-up", daemon=True)
    thread.start()
    return thread


def main(argv: list[str] | None = None) -> int:
    from waitress import runner, serve

    timeout_s, rest = split_timeout(list(sys.argv[1:] if argv is None else argv))
    server = functools.partial(create_server, timeout_s)

    def _serve(app, **kw) -> None:
        warm_up_in_the_background(app)
        serve(app, _server=server, **kw)

    return runner.run(["waitress-serve", *rest], _serve=_serve)


if __name__ == "__main__":
    raise SystemExit(main())
