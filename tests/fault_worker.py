"""An rq worker whose jobs die once at a named fault point: the crash tests' way into a real worker.

`rq worker --worker-class tests.fault_worker.FaultWorker` with RECSYS_TEST_FAULT_FLAG naming a file:
the first work horse that reaches AFTER_TRAFFIC_WRITE (between the Traefik write and the MLflow alias
move) while the file exists removes it and exits at once, as a killed process would. The file is
removed first, so the run that completes the action afterwards goes through.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from control_plane import jobs
from control_plane.context import bootstrap
from control_plane.worker_metrics import MetricsWorker

log = logging.getLogger(__name__)
FLAG_ENV = "RECSYS_TEST_FAULT_FLAG"
POINT = "AFTER_TRAFFIC_WRITE"


def die_once_at(point: str, flag: Path):
    def fault_point(name: str) -> None:
        if name != point:
            return
        try:
            flag.unlink()
        except FileNotFoundError:
            return
        log.error("fault injected: exiting at %s", name)
        logging.shutdown()
        os._exit(1)

    return fault_point


class FaultWorker(MetricsWorker):
    """The stack's worker, its jobs run with a Context whose fault point dies once (in the work horse)."""

    def perform_job(self, job: Any, queue: Any, execution: Any) -> bool:
        ctx = bootstrap()
        ctx.fault_point = die_once_at(POINT, Path(os.environ[FLAG_ENV]))
        jobs.install_context(ctx)
        return super().perform_job(job, queue, execution)
