"""RQ job durations and outcomes, served by the worker: `rq worker --worker-class control_plane.worker_metrics.MetricsWorker`.

rq forks a work horse per job. The horse records its job's duration and outcome in prometheus_client's
multiprocess files (PROMETHEUS_MULTIPROC_DIR); the worker, the long-lived parent, serves them over HTTP
on RECSYS_WORKER_METRICS_HOST:RECSYS_WORKER_METRICS_PORT (default 127.0.0.1:9101).

prometheus_client names its files by pid, so a new horse per job would leave a new file per job and make
every scrape read them all. One worker's horses never run at the same time, so they share one identity
(and one set of files) instead; the parent writes under its own. Other processes keep their pid.

The job label is `func` (e.g. control_plane.jobs.evaluate_job), not `job`: Prometheus puts its own `job`
label on every scraped series, and a clash would rename ours to `exported_job`.
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rq.job import Job, JobStatus
from rq.utils import now
from rq.worker import Worker

from control_plane.settings import Settings

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 9101
# Jobs read the database and decide: from tens of milliseconds to a few minutes when something is slow.
DURATION_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)

_horse_pid: int | None = None  # set in the work horse while it runs its job


@dataclass(frozen=True)
class MetricsConfig:
    """Where the worker serves its metrics and where the processes write them."""

    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    multiproc_dir: Path | None = None  # None: a private temporary directory, removed at exit

    @classmethod
    def from_settings(cls, settings: Settings) -> MetricsConfig:
        return cls(
            settings.worker_metrics_host, settings.worker_metrics_port, settings.prometheus_multiproc_dir
        )


class JobMetrics:
    """The job metrics; every value lands in the multiprocess directory, whichever process observes it."""

    def __init__(self) -> None:
        import prometheus_client as pc

        # registry=None: in multiprocess mode the files are the registry (MultiProcessCollector reads them).
        self.duration = pc.Histogram(
            "recsys_job_duration_seconds",
            "Time an RQ job ran, from start to end, whatever its outcome",
            ["func"],
            buckets=DURATION_BUCKETS_S,
            registry=None,
        )
        self.failures = pc.Counter(
            "recsys_job_failures",
            "RQ job executions that failed or whose horse died",
            ["func"],
            registry=None,
        )
        self.jobs = pc.Counter(
            "recsys_jobs", "RQ job executions by outcome (finished, failed, retried, killed)", ["func", "status"],
            registry=None,
        )  # fmt: skip

    def observe(self, func: str, status: str, seconds: float) -> None:
        self.duration.labels(func).observe(max(seconds, 0.0))
        self.jobs.labels(func, status).inc()
        if status in ("failed", "killed"):
            self.failures.labels(func).inc()


def _process_identifier(worker_pid: int):
    """prometheus_client's file identity: one for the worker, one shared by its (sequential) horses."""

    def identify() -> str:
        pid = os.getpid()
        if pid == worker_pid:
            return f"rqworker{worker_pid}"
        if pid == _horse_pid:
            return f"rqhorse{worker_pid}"
        return str(pid)

    return identify


def _use_multiprocess_files(config: MetricsConfig) -> Path:
    """Point prometheus_client at the multiprocess directory with this worker's file identities."""
    from prometheus_client import values

    directory = config.multiproc_dir
    if directory is None:
        directory = Path(tempfile.mkdtemp(prefix="recsys-worker-metrics-"))
        atexit.register(shutil.rmtree, directory, ignore_errors=True)
    directory.mkdir(parents=True, exist_ok=True)
    # prometheus_client takes its multiprocess directory only from the environment, in every value it
    # creates (in the horses too): the one environment write outside tests.
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(directory)
    values.ValueClass = values.MultiProcessValue(_process_identifier(os.getpid()))
    return directory


def serve_metrics(config: MetricsConfig, directory: Path) -> Any:
    """Serve the sum of every process's files on config.host:config.port; returns the server."""
    from prometheus_client import CollectorRegistry, multiprocess, start_http_server

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=str(directory))
    server, _thread = start_http_server(config.port, addr=config.host, registry=registry)
    return server


def _func_name(job: Job) -> str:
    try:
        return job.func_name or "unknown"
    except Exception:  # an undecodable job still gets counted
        return "unknown"


def _seconds(job: Job, fallback: float) -> float:
    """rq's own start and end of the job when it kept both, else what the caller measured."""
    if job.started_at and job.ended_at and job.ended_at >= job.started_at:
        return (job.ended_at - job.started_at).total_seconds()
    return fallback


# What every job imports (the service layer: SQLAlchemy, the MLflow client, the analysis). Imported once
# in the worker, the parent, so that each forked horse inherits them instead of importing them again: a
# job's imports took 20-40 s on a busy two-core machine (a compose stack among other work).
PRELOADED_MODULES = ("control_plane.services", "control_plane.context")


def preload_job_modules() -> None:
    import importlib

    for name in PRELOADED_MODULES:
        try:
            importlib.import_module(name)
        except Exception as exc:  # the job will import (and fail) itself; the worker keeps serving
            log.error("could not preload %s: %s", name, exc)


class MetricsWorker(Worker):
    """rq's forking Worker, plus job metrics: the horse records, the worker serves."""

    _job_metrics: JobMetrics | None = None
    _metrics_server: Any = None

    def bootstrap(self, *args: Any, **kwargs: Any) -> None:
        super().bootstrap(*args, **kwargs)
        if self._job_metrics is None:
            self._start_metrics(MetricsConfig.from_settings(Settings.from_env()))
        preload_job_modules()

    def _start_metrics(self, config: MetricsConfig) -> None:
        directory = _use_multiprocess_files(config)
        self._job_metrics = JobMetrics()
        try:
            self._metrics_server = serve_metrics(config, directory)
        except OSError as exc:  # jobs matter more than their metrics: keep working, say so loudly
            log.error("worker metrics not served on %s:%s: %s", config.host, config.port, exc)
        else:
            log.info(
                "worker metrics on http://%s:%s/metrics (files in %s)", config.host, config.port, directory
            )

    def perform_job(self, job: Job, queue: Any, execution: Any) -> bool:
        """Runs in the horse: the job, then its duration and outcome into the shared files."""
        global _horse_pid
        _horse_pid = os.getpid()
        started = time.perf_counter()
        ok = super().perform_job(job, queue, execution)
        if self._job_metrics is not None:
            if not ok:
                status = "failed"
            elif job.get_status(refresh=False) == JobStatus.FINISHED:
                status = "finished"
            else:
                status = "retried"  # the job returned rq's Retry
            self._observe(job, status, time.perf_counter() - started)
        return ok

    def handle_work_horse_killed(self, job: Job, retpid: Any, ret_val: Any, rusage: Any) -> None:
        """Runs in the worker when a horse died without recording (a signal, the OOM killer, a hard timeout)."""
        super().handle_work_horse_killed(job, retpid, ret_val, rusage)
        if self._job_metrics is not None:
            elapsed = (now() - job.started_at).total_seconds() if job.started_at else 0.0
            self._job_metrics.observe(_func_name(job), "killed", elapsed)

    def _observe(self, job: Job, status: str, measured_s: float) -> None:
        try:
            self._job_metrics.observe(_func_name(job), status, _seconds(job, measured_s))
        except Exception:  # a metrics write must never fail the job
            log.exception("could not record metrics for job %s", job.id)
