"""The spill disk fills during a 30 s Postgres outage, under load, on real parts; and SIGKILLs of a Bento.

A real `bentoml serve` of the canary (its writer process included) spills to a real tmpfs of 4 MiB (mounting
it needs root), reaching a fresh Postgres database through a TCP proxy that the test cuts. The Bento and its
writer each hold at most RECSYS_PREDLOG_MAX_QUEUE = 100 rows in memory, so that the seconds with neither
the database nor the disk cost rows, and the count of those can be checked against the rows missing.

The target: serving keeps answering, the loss is counted exactly, and the log and the evaluations resume
without a restart once space returns. The SIGKILL tests check the bounds in docs/what-it-survives.md.
"""

from __future__ import annotations

import os
import re
import signal
import time

import httpx
import numpy as np
import psutil
import pytest
from sqlalchemy import func, select

from control_plane import jobs, services
from control_plane.analysis.types import Phase
from control_plane.db.engine import make_engine
from control_plane.db.schema import predictions
from control_plane.log_backlog import HttpLogBacklog
from tests.conftest import fresh_database, wait_for
from tests.integration._canary_world import baseline_rows, canary_world, steady_load, unrecorded_ticks_cleared
from tests.small_disk import SmallDisk
from tests.steady_traffic import Answer

pytestmark = pytest.mark.integration

OUTAGE_S = 30
RATE_PER_S = 20
MAX_QUEUE = 100
INTERVAL_S = 5  # the schedule's interval for the evaluations this test runs by hand
FLUSH_S = 0.2  # RECSYS_PREDLOG_FLUSH_S, the default
WRITE_S = 1.0  # RECSYS_PREDLOG_WRITE_S, the default
SCHEDULING_SLACK_S = 2.0  # a busy two-core machine may run the sender and the writer late by this much


@pytest.fixture(scope="module")
def database():
    with fresh_database("recsys_full_disk") as url:
        yield url


@pytest.fixture(scope="module")
def world(tmp_path_factory, database):
    work = tmp_path_factory.mktemp("full_disk")
    url = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0").rsplit("/", 1)[0] + "/9"
    with (
        SmallDisk(work / "spill", size_kb=4096) as disk,
        unrecorded_ticks_cleared(url),
        canary_world(work, database, url, RECSYS_PREDLOG_MAX_QUEUE=str(MAX_QUEUE)) as w,
    ):
        yield w, disk


@pytest.fixture(scope="module")
def direct(database):
    engine = make_engine(database)
    yield engine
    engine.dispose()


def logged(engine, prefix: str) -> dict[str, int]:
    """Rows in Postgres per request id, for the ids that start with `prefix`."""
    with engine.connect() as conn:
        return dict(
            conn.execute(
                select(predictions.c.request_id, func.count())
                .where(predictions.c.request_id.like(f"{prefix}-%"))
                .group_by(predictions.c.request_id)
            ).all()
        )


def lost_on_metrics(bento: str) -> float:
    text = httpx.get(f"{bento}/metrics", timeout=10).text
    match = re.search(r'^recsys_predlog_rows_lost_total\{model_version="2"\} (\S+)$', text, re.M)
    assert match, "recsys_predlog_rows_lost_total is exported"
    return float(match.group(1))


def bento_processes(w) -> set[int]:
    """The pids of `bentoml serve`, its worker and the worker's writer process."""
    root = psutil.Process(w.proc.pid)
    return {root.pid, *(p.pid for p in root.children(recursive=True))}


def worker_and_writer(w) -> tuple[psutil.Process, psutil.Process]:
    """The Bento's worker (a child of `bentoml serve`) and its writer process (the worker's child)."""
    (worker,) = psutil.Process(w.proc.pid).children()
    (writer,) = [p for p in worker.children() if "bentos.predlog_process" in " ".join(p.cmdline())]
    return worker, writer


def alive(p: psutil.Process) -> bool:
    try:
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def run_tick(monkeypatch, ctx) -> dict | None:
    monkeypatch.setattr(jobs, "_ctx", ctx)
    return jobs.evaluate_job(INTERVAL_S)


def wait_until(moment: float) -> None:
    time.sleep(max(0.0, moment - time.time()))


def test_a_disk_filled_during_a_30_second_outage_costs_only_counted_rows_and_everything_resumes(
    world, direct, monkeypatch
):
    w, disk = world
    ctx, bento = w.ctx, w.bento
    rng = np.random.default_rng(0)
    policy = {"steps": [50], "step_min_duration_s": 3600, "p99_ratio": 10.0}  # holds: it never acts here
    rollout = services.start_canary(ctx, 2, policy, actor="test")
    with steady_load(bento, RATE_PER_S, "warm") as warmup:
        time.sleep(3)
    wait_for(lambda: len(logged(direct, "warm")) >= len(warmup.answers), 20, "warm-up rows")
    baseline_rows(direct, [a.t for a in warmup.answers], rng)
    assert run_tick(monkeypatch, ctx)["action"] == "hold"
    processes = bento_processes(w)

    with steady_load(bento, RATE_PER_S, "outage") as traffic:
        time.sleep(5)
        w.proxy.stop()
        cut_at = time.time()
        try:
            wait_for(lambda: w.log_state()["rows_spilled"] > 0, 15, "rows spilled while the database is away")
            wait_until(cut_at + 8)
            filled_bytes = disk.fill()
            full_at = time.time()
            state = wait_for(
                lambda: (s := w.log_state())["rows_lost"] > 0 and not s["disk_ok"] and s,
                30,
                "the queue full, rows counted lost",
            )
            during = run_tick(monkeypatch, ctx)
            assert during["action"] == "no_data" and "database was unreachable" in during["reason"], during
            wait_until(cut_at + 20)
            disk.free()
            freed_at = time.time()
            spilled_before = w.log_state()["rows_spilled"]
            state = wait_for(
                lambda: (s := w.log_state())["disk_ok"] and s["rows_spilled"] > spilled_before and s,
                15,
                "spilling again once space is back",
            )
            wait_until(cut_at + OUTAGE_S)
        finally:
            w.proxy.start()
        restored_at = time.time()
        time.sleep(5)

    # Serving kept answering, every request, throughout.
    statuses = [a.status for a in traffic.answers]
    assert set(statuses) == {200}, {s: statuses.count(s) for s in set(statuses)}
    in_full = [a for a in traffic.answers if full_at <= a.t < freed_at]
    assert len(in_full) >= 0.5 * RATE_PER_S * (freed_at - full_at)

    # Every spilled row replayed; nothing waits, no row twice.
    settle(w)
    served = {a.request_id for a in traffic.answers}
    rows = logged(direct, "outage")
    assert set(rows) <= served and set(rows.values()) == {1}

    # The loss is counted exactly: the rows missing are the rows counted lost, on /predlog and /metrics.
    missing = served - set(rows)
    state = w.log_state()
    assert state["rows_lost"] == len(missing) > 0, (state, len(missing))
    assert lost_on_metrics(bento) == len(missing)
    # ... and only rows that came while the disk was full are missing (the writer tries the disk again
    # within its retry interval, 2 s, of space coming back).
    by_id = {a.request_id: a for a in traffic.answers}
    when = sorted(by_id[r].t for r in missing)
    assert full_at <= when[0] and when[-1] <= freed_at + 2.0 + SCHEDULING_SLACK_S, (full_at, when, freed_at)

    # Nothing was restarted: the same server, worker and writer process.
    assert bento_processes(w) == processes

    # The evaluations resume: the tick after the outage records the gap and evaluates the rows present.
    present = [by_id[r].t for r in rows]
    baseline_rows(direct, present, rng)  # the baseline's half of the rows the canary logged
    after = run_tick(monkeypatch, ctx)
    assert after is not None and after["action"] == "hold", after
    assert ctx.ledger.get(rollout.id).phase is Phase.PROGRESSING
    services.rollback_now(ctx, rollout.id, actor="test", reason="test")
    print(
        f"\n{OUTAGE_S} s outage, spill disk ({filled_bytes:,} bytes filled) full for {freed_at - full_at:.1f} s: "
        f"{len(statuses)} requests, all 200; {len(rows)} rows in Postgres, {len(missing)} missing = "
        f"{state['rows_lost']} counted lost (all answered {when[0] - full_at:.1f}-{when[-1] - full_at:.1f} s "
        f"after the disk filled); log caught up {time.time() - restored_at:.1f} s after the database returned"
    )


def settle(w) -> None:
    """Wait until the Bento holds no row: nothing to replay, nothing queued (its last rows written)."""
    wait_for(lambda: HttpLogBacklog().waiting({2: w.bento}) == [], 60, "no backlog left on /predlog")
    time.sleep(FLUSH_S + WRITE_S + SCHEDULING_SLACK_S)  # the newest rows written, and reported
    wait_for(lambda: w.log_state()["queue_depth"] == 0, 30, "no row queued")


def client_part(request_id: str) -> str:
    """The id the client sent, without the signature the server issued after it."""
    return request_id.split(".", 1)[0]


def missing_after(w, direct, prefix: str, answers: list[Answer]) -> set[str]:
    served = {a.request_id for a in answers if a.status == 200}
    # A request the killed worker served may have its row while its answer never came back: the client
    # knows only the id it sent (the issued id adds the server's signature after a dot), so compare those.
    sent = {client_part(a.request_id) for a in answers}
    settle(w)
    rows = logged(direct, prefix)
    assert {client_part(r) for r in rows} <= sent and set(rows.values()) == {1}
    return served - set(rows)


def loss_when_killed(w, direct, prefix: str, kill, gone: psutil.Process) -> tuple[set[str], list[float]]:
    """Steady load; `kill()` after 4 s; wait until `gone` has ended and a new worker serves. The 2xx ids
    with no row, and how long before the kill each of them was answered (negative: after)."""
    with steady_load(w.bento, RATE_PER_S, prefix) as traffic:
        time.sleep(4)
        killed_at = time.time()
        kill()
        wait_for(lambda: not alive(gone), 30, "the writer process ended")
        wait_for(lambda: ready(w.bento), 120, "a new worker ready", every_s=1)
        time.sleep(2)
    missing = missing_after(w, direct, prefix, traffic.answers)
    by_id = {a.request_id: a for a in traffic.answers}
    ages = sorted(killed_at - by_id[r].t for r in missing)
    print(
        f"\n{prefix} at {RATE_PER_S}/s: {len(missing)} of "
        f"{sum(1 for a in traffic.answers if a.status == 200)} answered rows lost"
        + (f", answered {min(ages):.2f}-{max(ages):.2f} s before the kill" if ages else "")
    )
    return missing, ages


def test_a_sigkill_of_the_bento_s_worker_loses_at_most_the_rows_of_its_last_flush_interval(world, direct):
    """The writer process survives the worker: its input closes, and it writes everything it was sent."""
    w, _ = world
    worker, writer = worker_and_writer(w)
    _, ages = loss_when_killed(w, direct, "kill-worker", lambda: worker.send_signal(signal.SIGKILL), writer)
    # only rows answered just before the kill (the new worker's own are all there)
    assert all(-SCHEDULING_SLACK_S <= age <= FLUSH_S + SCHEDULING_SLACK_S for age in ages), ages


def test_a_sigkill_of_the_worker_s_whole_process_group_loses_at_most_its_last_flush_and_write_intervals(
    world, direct
):
    """The worker and its writer process together (BentoML starts each worker in a session of its own)."""
    w, _ = world
    worker, writer = worker_and_writer(w)
    assert os.getpgid(writer.pid) == os.getpgid(worker.pid) == worker.pid
    _, ages = loss_when_killed(w, direct, "kill-group", lambda: os.killpg(worker.pid, signal.SIGKILL), writer)
    assert all(-SCHEDULING_SLACK_S <= age <= FLUSH_S + WRITE_S + SCHEDULING_SLACK_S for age in ages), ages


def test_a_sigkill_of_bentoml_serve_ends_its_worker_gracefully_and_loses_no_row(world, direct):
    """The server's own group (supervisord's killasgroup): the worker gets SIGTERM as its parent dies, and
    its writer process drains everything it holds."""
    w, _ = world
    _, writer = worker_and_writer(w)
    with steady_load(w.bento, RATE_PER_S, "kill-serve") as traffic:
        time.sleep(4)
        os.killpg(w.proc.pid, signal.SIGKILL)
        w.proc.wait()
        wait_for(lambda: not alive(writer), 30, "the writer process drained and gone")
    w.serve()  # a supervisor's restart
    missing = missing_after(w, direct, "kill-serve", traffic.answers)
    assert missing == set()
    print(
        f"\nbentoml serve SIGKILL at {RATE_PER_S}/s: 0 of "
        f"{sum(1 for a in traffic.answers if a.status == 200)} answered rows lost"
    )
