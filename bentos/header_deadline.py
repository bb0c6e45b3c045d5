"""A deadline for a request's headers at a Bento: 408 and a close once they are `timeout_s` late.

uvicorn 0.55 (under every `bentoml serve`) has a keep-alive timer for an idle connection between
requests, but none for a request in progress: a client that sends part of its headers and stops, or
trickles them a byte at a time, held its connection for ever (tests/hostile.py counted it as a
hang). Nothing in BentoML can see such a request (the app is only called once the headers are in),
so the deadline has to be in uvicorn's protocol: `install` wraps four methods of its httptools
protocol, the one uvicorn uses when httptools is installed (pinned in pyproject.toml).

- a connection is watched from when it is made, and a request from its first byte
  (httptools' `on_message_begin`), until its headers are complete (`on_headers_complete`);
- once a second, one sweep (a task on the loop, as for the body in bentos/http.py: `BodyDeadline`,
  not a timer per request) answers every watched request past its deadline with 408 and closes the
  connection; a connection that has sent nothing at all is closed without an answer.

So a request's headers have `timeout_s` from their first byte (from the connection's opening for the
first request), kept to within a second. Through the gateway the same request is cut off by Traefik's
read timeout; this bound is for a client that connects to a Bento directly. The patch is applied only
to the uvicorn version it was written against (`PATCHED_UVICORN`); tests/unit/test_header_deadline.py
fails when the wrapped methods change.
"""

from __future__ import annotations

import asyncio
import json
import logging
from contextvars import Context

log = logging.getLogger("recsys.bento")

PATCHED_UVICORN = "0.55.0"
# The methods `install` wraps, as they read in PATCHED_UVICORN (the test checks their source).
WRAPPED = ("connection_made", "on_message_begin", "on_headers_complete", "connection_lost")


class HeaderDeadline:
    """The requests whose headers are not complete yet, and one sweep a second that ends the late ones."""

    def __init__(self, timeout_s: float, sweep_s: float = 1.0) -> None:
        self.timeout_s = timeout_s
        self.sweep_s = min(sweep_s, timeout_s)
        # protocol -> (deadline in loop time, whether a request has begun on it)
        self._watched: dict[object, tuple[float, bool]] = {}
        self._sweeper: asyncio.Task | None = None
        self.expired = 0  # connections ended for late headers (tests read it)

    def watch(self, protocol, began: bool) -> None:
        """Start the clock for `protocol`'s request, unless it runs already (the first request's runs
        from the connection's opening)."""
        known = self._watched.get(protocol)
        if known is not None:
            if began and not known[1]:
                self._watched[protocol] = (known[0], True)
            return
        loop = protocol.loop
        self._watched[protocol] = (loop.time() + self.timeout_s, began)
        sweeper = self._sweeper
        if sweeper is None or sweeper.done() or sweeper.get_loop() is not loop:
            # in a context of its own, not the connection's
            self._sweeper = loop.create_task(self._sweep(), name="recsys-header-deadline", context=Context())

    def forget(self, protocol) -> None:
        self._watched.pop(protocol, None)

    async def _sweep(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.sweep_s)
            now = loop.time()
            late = [
                (p, began)
                for p, (deadline, began) in self._watched.items()
                if deadline <= now and p.loop is loop
            ]
            for protocol, began in late:
                self._end(protocol, began)

    def _end(self, protocol, began: bool) -> None:
        cycle = protocol.cycle
        if cycle is not None and not cycle.response_complete:
            return  # a response is still going out on this connection (a pipelined request): next sweep
        self._watched.pop(protocol, None)
        transport = protocol.transport
        if transport is None or transport.is_closing():
            return
        self.expired += 1
        if began:
            transport.write(timeout_response(self.timeout_s))
        transport.close()


def timeout_response(timeout_s: float) -> bytes:
    body = json.dumps({"error": f"the request headers did not arrive within {timeout_s:g} s"}).encode()
    return (
        b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\nconnection: close\r\n\r\n" % len(body)
    ) + body


def install(timeout_s: float) -> HeaderDeadline | None:
    """Give uvicorn's httptools protocol a header deadline of `timeout_s`; None if not applied.

    Call it before uvicorn makes its first connection (the service's module does, when `bentoml serve`
    imports it). Applied once per process; a second call returns the deadline already in place.
    """
    import uvicorn

    if uvicorn.__version__ != PATCHED_UVICORN:
        log.warning(
            "uvicorn %s is not %s: no deadline for request headers", uvicorn.__version__, PATCHED_UVICORN
        )
        return None
    from uvicorn.protocols.http.auto import AutoHTTPProtocol
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    if AutoHTTPProtocol is not HttpToolsProtocol:
        log.warning(
            "uvicorn serves with %s, not httptools: no deadline for request headers", AutoHTTPProtocol
        )
        return None
    cls = HttpToolsProtocol
    installed = getattr(cls, "_recsys_header_deadline", None)
    if installed is not None:
        return installed
    deadline = HeaderDeadline(timeout_s)
    made, begin, complete, lost = (getattr(cls, name) for name in WRAPPED)

    def connection_made(self, transport) -> None:
        made(self, transport)
        deadline.watch(self, began=False)

    def on_message_begin(self) -> None:
        begin(self)
        deadline.watch(self, began=True)

    def on_headers_complete(self) -> None:
        deadline.forget(self)
        complete(self)

    def connection_lost(self, exc) -> None:
        deadline.forget(self)
        lost(self, exc)

    # httptools looks the callbacks up when a protocol makes its parser: patching the class is in time
    # for every connection made after this.
    for name, fn in zip(
        WRAPPED, (connection_made, on_message_begin, on_headers_complete, connection_lost), strict=True
    ):
        setattr(cls, name, fn)
    cls._recsys_header_deadline = deadline
    return deadline
