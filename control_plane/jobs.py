"""RQ jobs and their schedule: the scheduled tick is services.evaluate, nothing more."""

from __future__ import annotations

import logging
import time
import uuid
from datetime import UTC, datetime

log = logging.getLogger(__name__)

QUEUE = "recsys"
EVALUATE_JOB_ID = "recsys-evaluate"
_ctx = None  # one Context per worker process, built on the first job


def _context():
    global _ctx
    if _ctx is None:
        from control_plane.context import bootstrap

        _ctx = bootstrap()
    return _ctx


def tick_for(when: float, interval_s: int) -> int:
    """The scheduled tick a time belongs to, as the epoch second it starts at; two runs of one tick share it."""
    return int(when // interval_s) * interval_s


def evaluate_job(interval_s: int | None = None) -> dict | None:
    """The scheduled evaluation; a second run within the same interval finds its tick taken and does nothing.

    (rq-scheduler re-enqueues one job hash for a periodic job, so the job's own timestamps are not per run.)
    """
    from control_plane import services

    ctx = _context()
    interval_s = interval_s or ctx.settings.eval_interval_s  # the schedule's interval, passed when scheduled
    result = services.evaluate(ctx, tick=tick_for(time.time(), interval_s), actor="scheduler", interval_s=interval_s)
    log.info("evaluation", extra={"result": result})
    return result


def schedule_evaluations(redis_url: str, interval_s: int) -> None:
    """Register (or re-register) the periodic evaluation with rq-scheduler; safe to call on every start."""
    from redis import Redis
    from rq_scheduler import Scheduler

    conn = Redis.from_url(redis_url)
    scheduler = Scheduler(queue_name=QUEUE, connection=conn)
    for job in scheduler.get_jobs():
        if job.id.startswith(EVALUATE_JOB_ID):
            scheduler.cancel(job)
    scheduler.schedule(
        scheduled_time=datetime.now(UTC),
        func=evaluate_job,
        args=[interval_s],
        interval=interval_s,
        repeat=None,
        # A fresh id per schedule: a run of the old job finishing now cannot overwrite the new one's arguments.
        id=f"{EVALUATE_JOB_ID}-{interval_s}s-{uuid.uuid4().hex[:8]}",
        result_ttl=max(600, interval_s * 10),
        timeout=max(120, interval_s * 2),
        queue_name=QUEUE,
    )
    conn.close()
