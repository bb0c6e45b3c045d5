"""Three fixes to BentoML 1.4.40 for running several Bentos side by side under load, and two settings.

Each fix is skipped, with a warning, under another BentoML version (the Bentos still serve, slower);
tests/unit/test_bentoml_pinned.py fails instead whenever BentoML's version or the source of anything
patched here changes, so that an upgrade is a decision, not a surprise. The two settings, for a
process that builds Bentos: `use_bentoml_home` (the stack's store, without setting BENTOML_HOME) and
`no_usage_tracking` (BENTOML_DO_NOT_TRACK's effect, without setting it).

1. Metrics. Every `bentoml serve` keeps Prometheus' multiprocess files in
{BENTOML_HOME}/prometheus_multiproc_dir, empties that directory when it starts, and serves every
file in it at /metrics. With v1, v2 and v3 served from one BENTOML_HOME, each /metrics showed the
sum of all three (measured: identical GC-pause counters from two servers), and starting one wiped
the others' counters. Each Bento gets its own directory instead.

2. Latency. BentoML's TimeoutMiddleware schedules `loop.call_later(timeout, ...)` for every
request and never cancels it, so each request's timer, future and context copy stay alive for the
whole traffic timeout. At 700 requests/s with a 10 s timeout that is over 100,000 live objects, and
the full garbage collections that scan them paused the worker 50-250 ms (measured with
recsys_gc_pause_seconds): the p99. The replacement below cancels the timer once the request is
done (applied in the worker, when the service starts). It also runs the app in the request's own
task under `asyncio.timeout` rather than in a new task per request with a future to wait on:
about 20 us less CPU per request (docs/performance.md).

3. The model endpoints' path. BentoML puts its own middlewares (request metrics, OpenTelemetry, the
traffic timeout) outside every middleware a service adds, so each /predict paid for them before
reaching the RequestGate that answers it: four metric label look-ups, a multiprocess gauge and
histogram written through mmap, a URL match against the tracing exclusions and a timer. Measured side
by side through Traefik at 8 connections, the Bentos spent about a fifth less CPU per request with the
gate first (docs/performance.md). `gate_first` puts it first; the gate counts and times the model
endpoints in recsys_requests_total and recsys_request_duration_seconds, and bounds the wait for their
body itself. Every other path (/metrics, /readyz, /healthz, ...) still goes through BentoML's middlewares.
"""

from __future__ import annotations

import asyncio
import logging
import os

log = logging.getLogger("recsys.bento")

PATCHED_VERSION = "1.4.40"


def separate_prometheus_dir(bento_name: str, path: str | None = None) -> str:
    """Point BentoML at a Prometheus directory of this Bento's own (`path`, else one under BENTOML_HOME).

    `bentoml serve` imports the service module before it prepares the directory, so calling this
    at import is early enough; the workers inherit the path through PROMETHEUS_MULTIPROC_DIR.
    """
    from bentoml._internal.configuration.containers import BentoMLContainer

    path = path or os.path.join(BentoMLContainer.bentoml_home.get(), f"prometheus_multiproc_dir.{bento_name}")
    BentoMLContainer.prometheus_multiproc_dir.set(path)
    return path


def use_bentoml_home(home: str) -> None:
    """Make this process's BentoML keep its Bentos and models under `home`, as `bentoml serve` reads them.

    BentoML resolves BENTOML_HOME once, the first time a store is needed, into singletons; its own test
    plugin points them elsewhere by setting the container's providers, and so does this, instead of
    changing the process's environment. A process whose BentoML already resolved another home is refused.
    """
    from bentoml._internal.configuration.containers import BentoMLContainer
    from simple_di import _SentinelClass

    provider = BentoMLContainer.bentoml_home
    resolved = not (
        isinstance(provider._cache, _SentinelClass) and isinstance(provider._override, _SentinelClass)
    )
    if resolved:
        current = provider.get()
        if os.path.abspath(current) != os.path.abspath(home):
            raise RuntimeError(f"BentoML in this process already uses {current}, not {home}")
        return
    for sub in ("", "bentos", "models", "envs", "tmp"):
        os.makedirs(os.path.join(home, sub), exist_ok=True)
    provider.set(home)


def no_usage_tracking() -> None:
    """No usage events to BentoML's servers from this process (BENTOML_DO_NOT_TRACK=true, without the variable).

    The Bentos the stack serves get BENTOML_DO_NOT_TRACK from their environment (Settings.to_env); a
    process that builds them (`recsys up`, `recsys build`, a deploy) gets this instead.
    """
    from bentoml._internal.utils.analytics import usage_stats

    usage_stats.do_not_track = lambda: True


def cancel_timeout_timers() -> bool:
    """Make BentoML's TimeoutMiddleware cancel its timer after each request; False if not applied."""
    import bentoml
    from bentoml._internal.server.http import traffic
    from starlette.responses import JSONResponse

    if bentoml.__version__ != PATCHED_VERSION:
        log.warning(
            "bentoml %s is not %s: TimeoutMiddleware left as it is", bentoml.__version__, PATCHED_VERSION
        )
        return False
    cls = traffic.TimeoutMiddleware
    if getattr(cls.__call__, "_recsys_cancels_timer", False):
        return True

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        # The app runs in this task under asyncio.timeout, instead of in a task of its own per request
        # with a future to wait on; as in BentoML's, the deadline covers the time to the response's start.
        deadline = asyncio.timeout(self.timeout)
        started = False

        async def _send(message) -> None:
            nonlocal started
            if not started:
                started = True
                deadline.reschedule(None)
            await send(message)

        try:
            async with deadline:
                await self.app(scope, receive, _send)
        except TimeoutError:
            if started or not deadline.expired():
                raise  # not our deadline
            resp = JSONResponse(
                {"error": f"Not able to process the request in {self.timeout} seconds"}, status_code=504
            )
            await resp(scope, receive, send)

    __call__._recsys_cancels_timer = True
    cls.__call__ = __call__
    return True


def die_with_parent() -> None:
    """End this worker when its `bentoml serve` parent dies (Linux PR_SET_PDEATHSIG).

    BentoML starts workers in their own process group, so a killed server left its worker behind,
    holding the port, and supervisord's restart looped on "address already in use".
    """
    import ctypes
    import signal

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except (AttributeError, OSError):  # not Linux: nothing to do
        return
    if os.getppid() == 1:  # the parent died before the call above
        os.kill(os.getpid(), signal.SIGTERM)


def gate_first(gate_cls: type) -> bool:
    """Put the `gate_cls` middleware before BentoML's own ones in every Bento app; False if not applied.

    BentoML 1.4 builds the app's middleware list in the `ServiceAppFactory.middlewares` property,
    when `bentoml serve` creates the app right after importing the service module: patching the
    property at that import is in time.
    """
    import bentoml

    if bentoml.__version__ != PATCHED_VERSION:
        log.warning(
            "bentoml %s is not %s: %s left behind BentoML's middlewares",
            bentoml.__version__,
            PATCHED_VERSION,
            gate_cls.__name__,
        )
        return False
    from _bentoml_impl.server.app import ServiceAppFactory

    listed = ServiceAppFactory.middlewares.fget
    if getattr(listed, "_recsys_first", None) is gate_cls:
        return True

    def middlewares(self) -> list:
        found = listed(self)
        return [m for m in found if m.cls is gate_cls] + [m for m in found if m.cls is not gate_cls]

    middlewares._recsys_first = gate_cls
    ServiceAppFactory.middlewares = property(middlewares)
    return True
