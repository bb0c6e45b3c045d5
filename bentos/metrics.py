"""The Bento's own `recsys_*` Prometheus metrics, next to BentoML's `bentoml_service_*` ones.

prometheus_client is imported only when the metrics are created, in the worker: BentoML sets
PROMETHEUS_MULTIPROC_DIR after importing the service module, and prometheus_client picks its
multiprocess mode when it is first imported. BentoML's /metrics then collects them with the rest.
"""

from __future__ import annotations

import threading

from bentos.predlog import WriterStats

LATENCY_BUCKETS_S = (
    0.0005,
    0.001,
    0.002,
    0.003,
    0.005,
    0.0075,
    0.01,
    0.015,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
)
_REQUEST_LABELS = ("model_version", "role", "endpoint")

_instance: ServiceMetrics | None = None


class ServiceMetrics:
    """Request, model and prediction-log metrics for one model version."""

    def __init__(self, model_version: int) -> None:
        import prometheus_client as pc

        self.model_version = str(model_version)
        self.requests = pc.Counter(
            "recsys_requests", "Model endpoint responses", [*_REQUEST_LABELS, "status"]
        )
        self.errors = pc.Counter(
            "recsys_request_errors", "Model endpoint responses with status >= 500", _REQUEST_LABELS
        )
        self.latency = pc.Histogram(
            "recsys_request_duration_seconds",
            "Time from arrival to the end of the response, model endpoints",
            _REQUEST_LABELS,
            buckets=LATENCY_BUCKETS_S,
        )
        self.model_load_seconds = pc.Gauge(
            "recsys_model_load_seconds",
            "Time to load the model",
            ["model_version"],
            multiprocess_mode="livemax",
        )
        v = ["model_version"]
        self.queue_depth = pc.Gauge(
            "recsys_predlog_queue_depth",
            "Prediction rows waiting to be written",
            v,
            multiprocess_mode="livesum",
        )
        self.spill_bytes = pc.Gauge(
            "recsys_predlog_spill_bytes",
            "Bytes in spill files waiting for replay",
            v,
            multiprocess_mode="livemax",
        )
        self.spill_rows = pc.Gauge(
            "recsys_predlog_spill_rows",
            "Rows this Bento spilled, not yet replayed",
            v,
            multiprocess_mode="livesum",
        )
        self.db_up = pc.Gauge(
            "recsys_predlog_db_up", "1 when the last database write succeeded", v, multiprocess_mode="livemin"
        )
        self.disk_ok = pc.Gauge(
            "recsys_predlog_disk_ok",
            "1 unless the last spill failed (ENOSPC, EIO)",
            v,
            multiprocess_mode="livemin",
        )
        counters = {
            "rows_written": pc.Counter(
                "recsys_predlog_rows_written", "Prediction rows inserted (replays included)", v
            ),
            "rows_spilled": pc.Counter(
                "recsys_predlog_rows_spilled", "Prediction rows written to a spill file", v
            ),
            "rows_replayed": pc.Counter(
                "recsys_predlog_rows_replayed", "Prediction rows replayed from spill files", v
            ),
            "rows_corrupt": pc.Counter(
                "recsys_predlog_rows_corrupt", "Unreadable spill lines moved to the dead-letter file", v
            ),
            "rows_rejected": pc.Counter(
                "recsys_predlog_rows_rejected", "Rows the database refused as bad data (dead-letter file)", v
            ),
            "rows_lost": pc.Counter(
                "recsys_predlog_rows_lost",
                "Prediction rows kept nowhere: the database unreachable and the spill disk full or failing",
                v,
            ),
            "write_failures": pc.Counter("recsys_predlog_write_failures", "Failed database writes", v),
        }
        # This version's series of each, made now so that it is exported from the start, at 0: a series
        # that appears only with its first increment breaks rate() and absent() alerts, and a scrape
        # before the writer's first report would miss it.
        self._counters = {name: c.labels(self.model_version) for name, c in counters.items()}
        self.gc_pause = pc.Histogram(
            "recsys_gc_pause_seconds",
            "Garbage collector pauses of generations 1 and 2 (the ones long enough to show in the p99)",
            ["generation"],
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5),
        )
        self._gc_started = 0.0
        self._children: dict[tuple[str, str, int], tuple] = {}
        self.writer_stats = WriterStats()  # the log writer's latest report (GET /predlog shows it)
        self._lock = threading.Lock()

    @classmethod
    def for_version(cls, model_version: int) -> ServiceMetrics:
        """The process's metrics (a collector can be registered only once per process)."""
        global _instance
        if _instance is None:
            _instance = cls(model_version)
        return _instance

    def watch_gc(self) -> None:
        """Time the older-generation collections (gen 0 runs too often to be worth a callback's cost)."""
        import gc
        import time

        def callback(phase: str, info: dict) -> None:
            if info["generation"] == 0:
                return
            if phase == "start":
                self._gc_started = time.perf_counter()
            else:
                self.gc_pause.labels(str(info["generation"])).observe(time.perf_counter() - self._gc_started)

        gc.callbacks.append(callback)

    def observe_request(self, role: str, endpoint: str, status: int, seconds: float) -> None:
        # The labelled children are looked up once per (role, endpoint, status): labels() takes a
        # lock and builds tuples on every call, a measurable part of a request's CPU.
        key = (role, endpoint, status)
        children = self._children.get(key)
        if children is None:
            labels = (self.model_version, role, endpoint)
            children = (
                self.requests.labels(*labels, str(status)),
                self.latency.labels(*labels),
                self.errors.labels(*labels) if status >= 500 else None,
            )
            self._children[key] = children
        requests, latency, errors = children
        requests.inc()
        latency.observe(seconds)
        if errors is not None:
            errors.inc()

    def observe_writer(self, stats: WriterStats) -> None:
        """Called by the log writer's thread after every batch."""
        with self._lock:
            self._observe_writer(stats)

    def _observe_writer(self, stats: WriterStats) -> None:
        v = self.model_version
        self.queue_depth.labels(v).set(stats.queue_depth)
        self.spill_bytes.labels(v).set(stats.spill_bytes)
        self.spill_rows.labels(v).set(stats.spill_rows)
        self.db_up.labels(v).set(1 if stats.db_up else 0)
        self.disk_ok.labels(v).set(1 if stats.disk_ok else 0)
        for name, counter in self._counters.items():
            delta = getattr(stats, name) - getattr(self.writer_stats, name)
            if delta > 0:
                counter.inc(delta)
        self.writer_stats = stats
