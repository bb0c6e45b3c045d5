"""RQ jobs and their schedule: the scheduled tick is services.evaluate, nothing more.

Faults it survives (tests/integration/test_crash_mid_action.py, tests/integration/test_db_outage.py):
- the database unreachable at a tick: the tick is remembered in Redis and recorded as `no_data` in the
  ledger by the first tick that reaches the database again (never decided on partial data, never lost),
  and no tick decides while a Bento still replays the rows it spilled meanwhile (services.evaluate);
- an operator's action still in progress after the action lock's wait: the tick is skipped, and the next
  one counts it in `missed_ticks`;
- Redis restarted empty (the embedded one keeps nothing on disk): `run_scheduler`, the scheduler process,
  registers the periodic evaluation again; the ticks that did not run show as `missed_ticks` in the ledger.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import uuid
from datetime import UTC, datetime

from rq import Queue
from rq.job import Job
from rq.serializers import JSONSerializer

from control_plane.errors import ActionBusy
from control_plane.settings import Settings

log = logging.getLogger(__name__)

QUEUE = "recsys"
EVALUATE_JOB_ID = "recsys-evaluate"
EVALUATE_FUNC = "control_plane.jobs.evaluate_job"  # by name: the scheduler may run this module as __main__
MAINTENANCE_JOB_ID = "recsys-maintenance"
MAINTENANCE_FUNC = "control_plane.jobs.maintenance_job"
MAINTENANCE_MIN_INTERVAL_S = 60
HARM_JOB_ID = "recsys-harm"
HARM_FUNC = "control_plane.jobs.harm_job"
UNRECORDED_TICKS_KEY = "recsys:evaluations:unrecorded"  # hash: tick -> why the database did not take it
_ctx = None  # one Context per worker process, built on the first job
# Jobs go through Redis as JSON, never pickle: whoever can write to Redis cannot make the worker run code
# (a job names a function by its dotted path and passes plain arguments). The worker runs with
# `--serializer json`; rq-scheduler 0.14 takes no serializer, so it gets these job and queue classes.
WORKER_SERIALIZER = "json"


class JSONJob(Job):
    """An RQ job serialized as JSON unless told otherwise."""

    def __init__(self, id: str | None = None, connection=None, serializer=None):
        super().__init__(id, connection=connection, serializer=serializer or JSONSerializer)


class JSONQueue(Queue):
    """An RQ queue whose jobs are JSONJobs serialized as JSON."""

    job_class = JSONJob

    def __init__(self, *args, serializer=None, **kwargs):
        kwargs.setdefault("job_class", JSONJob)
        super().__init__(*args, serializer=serializer or JSONSerializer, **kwargs)


def _scheduler(conn, scheduler_class=None, **kwargs):
    """rq-scheduler over `conn`, making and moving JSON jobs."""
    from rq_scheduler import Scheduler

    cls = scheduler_class or Scheduler
    return cls(queue_name=QUEUE, connection=conn, job_class=JSONJob, queue_class=JSONQueue, **kwargs)


def install_context(ctx) -> None:
    """Run this process's jobs with `ctx` instead of one bootstrapped from the environment (tests)."""
    global _ctx
    _ctx = ctx


def _context():
    global _ctx
    if _ctx is None:
        # lazy: the Context: 0.7 s of import (SciPy, SQLAlchemy), which the scheduler process never uses
        from control_plane.context import bootstrap

        _ctx = bootstrap()
    return _ctx


def tick_for(when: float, interval_s: int) -> int:
    """The scheduled tick a time belongs to, as the epoch second it starts at; two runs of one tick share it."""
    return int(when // interval_s) * interval_s


def _database_unreachable() -> tuple[type[Exception], ...]:
    """Errors that mean "the database did not answer", not "the query is wrong"."""
    from sqlalchemy.exc import InterfaceError, OperationalError
    from sqlalchemy.exc import TimeoutError as PoolTimeout

    return OperationalError, InterfaceError, PoolTimeout


def _redis(ctx):
    """The job's own Redis connection, or one from the settings when called outside a worker."""
    from rq import get_current_job

    job = get_current_job()
    if job is not None:
        return job.connection
    from redis import Redis

    return Redis.from_url(ctx.settings.effective_redis_url)


def evaluate_job(interval_s: int | None = None) -> dict | None:
    """The scheduled evaluation; a second run within the same interval finds its tick taken and does nothing.

    (rq-scheduler re-enqueues one job hash for a periodic job, so the job's own timestamps are not per run.)
    When the database does not answer, the tick is kept in Redis and recorded as `no_data` by the first
    later run that reaches the database, before that run evaluates its own tick.
    """
    # lazy: the service layer: 1.7 s of import (SciPy, SQLAlchemy), which the scheduler process skips
    from control_plane import services

    ctx = _context()
    interval_s = interval_s or ctx.settings.eval_interval_s  # the schedule's interval, passed when scheduled
    tick = tick_for(time.time(), interval_s)
    redis = _redis(ctx)
    try:
        for earlier, why in sorted(
            (int(k), v.decode()) for k, v in redis.hgetall(UNRECORDED_TICKS_KEY).items()
        ):
            services.record_unreachable_tick(ctx, earlier, why, actor="scheduler", interval_s=interval_s)
            redis.hdel(UNRECORDED_TICKS_KEY, earlier)
        result = services.evaluate(ctx, tick=tick, actor="scheduler", interval_s=interval_s)
    except _database_unreachable() as exc:
        why = f"the database was unreachable at this tick ({exc.__class__.__name__})"
        redis.hset(UNRECORDED_TICKS_KEY, tick, why)
        log.warning(
            "evaluation not recorded: %s; it will be recorded as no_data once the database answers", why
        )
        return {"tick": tick, "action": "no_data", "reason": why, "recorded": False}
    except ActionBusy as exc:
        # An operator's action (a deploy can take a while) outlasted the wait: this tick is not run, and
        # the next one that runs says in the ledger how many were missed.
        log.warning("evaluation skipped: %s", exc)
        return {"tick": tick, "action": "skipped", "reason": str(exc), "recorded": False}
    log.info("evaluation", extra={"result": result})
    return result


def harm_job() -> dict | None:
    """The harm checks between evaluations (services.check_harm); records only a rollback."""
    # lazy: the service layer: 1.7 s of import (SciPy, SQLAlchemy), which the scheduler process skips
    from control_plane import services

    try:
        result = services.check_harm(_context())
    except (ActionBusy, *_database_unreachable()) as exc:
        # the next check (seconds away) or the scheduled evaluation will look again
        log.info("harm check skipped: %s", exc.__class__.__name__)
        return {"action": "skipped", "reason": exc.__class__.__name__}
    if result is not None:
        log.warning("harm check", extra={"result": result})
    return result


def _schedule_harm(scheduler, harm_interval_s: int) -> str | None:
    if harm_interval_s <= 0:
        return None
    return _schedule_job(scheduler, HARM_JOB_ID, HARM_FUNC, [], harm_interval_s, max(60, harm_interval_s * 4))


def maintenance_job() -> dict:
    """The scheduled upkeep (services.maintain): label windows closed, retention applied, partitions made."""
    # lazy: the service layer: 1.7 s of import (SciPy, SQLAlchemy), which the scheduler process skips
    from control_plane import services

    result = services.maintain(_context())
    log.info("maintenance", extra={"result": result})
    return result


def _schedule_maintenance(scheduler, interval_s: int) -> str:
    # At most once a minute: evaluations close their own label windows, so the upkeep only keeps the
    # dashboards' outcomes current and storage bounded, and must not queue ahead of fast evaluations.
    every_s = max(MAINTENANCE_MIN_INTERVAL_S, interval_s)
    return _schedule_job(scheduler, MAINTENANCE_JOB_ID, MAINTENANCE_FUNC, [], every_s, max(600, every_s * 2))


def _schedule(scheduler, interval_s: int) -> str:
    return _schedule_job(
        scheduler, f"{EVALUATE_JOB_ID}-{interval_s}s", EVALUATE_FUNC, [interval_s], interval_s
    )


def _schedule_job(scheduler, prefix: str, func: str, args: list, interval_s: int, timeout_s: int = 0) -> str:
    job_id = f"{prefix}-{uuid.uuid4().hex[:8]}"
    scheduler.schedule(
        scheduled_time=datetime.now(UTC),
        func=func,
        args=args,
        interval=interval_s,
        repeat=None,
        # A fresh id per schedule: a run of the old job finishing now cannot overwrite the new one's arguments.
        id=job_id,
        result_ttl=max(600, interval_s * 10),
        timeout=timeout_s or max(120, interval_s * 2),
        queue_name=QUEUE,
    )
    return job_id


def _scheduled_ids(conn, scheduler) -> list[str]:
    return [
        i.decode() if isinstance(i, bytes) else i for i in conn.zrange(scheduler.scheduled_jobs_key, 0, -1)
    ]


def schedule_evaluations(redis_url: str, interval_s: int, harm_interval_s: int = 0) -> None:
    """Register (or re-register) the periodic evaluation with rq-scheduler; safe to call on every start."""
    from redis import Redis

    conn = Redis.from_url(redis_url)
    scheduler = _scheduler(conn)
    new = _schedule(scheduler, interval_s)  # the new one first: there is never a moment with none
    upkeep = _schedule_maintenance(scheduler, interval_s)
    harm = _schedule_harm(scheduler, harm_interval_s)
    for job_id in _scheduled_ids(conn, scheduler):
        if job_id.startswith(EVALUATE_JOB_ID) and job_id != new:
            scheduler.cancel(job_id)
        if job_id.startswith(MAINTENANCE_JOB_ID) and job_id != upkeep:
            scheduler.cancel(job_id)
        if job_id.startswith(HARM_JOB_ID) and job_id != harm:
            scheduler.cancel(job_id)
    conn.close()


def ensure_scheduled(conn, interval_s: int, harm_interval_s: int = 0) -> bool:
    """Schedule the periodic evaluation unless one is scheduled already; True when it had to."""
    scheduler = _scheduler(conn)
    ids = _scheduled_ids(conn, scheduler)
    if not any(i.startswith(MAINTENANCE_JOB_ID) for i in ids):
        _schedule_maintenance(scheduler, interval_s)
    if harm_interval_s > 0 and not any(i.startswith(HARM_JOB_ID) for i in ids):
        _schedule_harm(scheduler, harm_interval_s)
    if any(i.startswith(EVALUATE_JOB_ID) for i in ids):
        return False
    _schedule(scheduler, interval_s)
    return True


def run_scheduler(redis_url: str, interval_s: int, poll_s: float = 1.0, harm_interval_s: int = 0) -> None:
    """rq-scheduler's loop, keeping the periodic evaluation registered and waiting out Redis outages."""
    from redis import Redis
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeout
    from rq_scheduler import Scheduler

    class EvaluationScheduler(Scheduler):
        def enqueue_jobs(self):
            if ensure_scheduled(self.connection, interval_s, harm_interval_s):
                log.warning("no periodic evaluation in Redis (restarted empty?): scheduled it again")
            return super().enqueue_jobs()

    down_since = None
    while True:
        conn = Redis.from_url(redis_url, socket_connect_timeout=2, socket_timeout=10)
        try:
            conn.ping()
            if down_since is not None:
                log.warning("Redis is back after %.0f s", time.monotonic() - down_since)
                down_since = None
            _scheduler(conn, EvaluationScheduler, interval=poll_s).run()
            return
        except (RedisConnectionError, RedisTimeout) as exc:
            if down_since is None:
                down_since = time.monotonic()
                log.warning("Redis unreachable (%s); retrying every second", exc)
            time.sleep(1)
        finally:
            conn.close()


def main(argv: list[str] | None = None) -> int:
    """`python -m control_plane.jobs`: the scheduler process (Redis URL and interval from the settings)."""
    settings = Settings.from_env()
    p = argparse.ArgumentParser(prog="python -m control_plane.jobs", description=run_scheduler.__doc__)
    p.add_argument("--url", default=settings.effective_redis_url, help="Redis URL (default: REDIS_URL)")
    p.add_argument(
        "--interval-s",
        type=int,
        default=settings.eval_interval_s,
        help="seconds between scheduled evaluations (default: RECSYS_EVAL_INTERVAL_S)",
    )
    p.add_argument(
        "--harm-interval-s",
        type=int,
        default=settings.harm_interval_s,
        help="seconds between harm checks (default: RECSYS_HARM_INTERVAL_S; 0: none)",
    )
    p.add_argument("--poll-s", type=float, default=1.0, help="how often due jobs are moved to the queue")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    run_scheduler(args.url, args.interval_s, args.poll_s, args.harm_interval_s)
    return 0


if __name__ == "__main__":
    sys.exit(main())
