"""`make bench-scale`: what a decision, a scrape and an hour of storage cost as the window fills up.

For each size it fills one hour of prediction time with that many predictions through the writer the
Bentos use (bentos.predlog.PredictionLogWriter: COPY on Postgres, the aggregates added per batch),
split 85/10/5 between three versions, 16 features each, 0.5 % errors; 90 % of the served ones get a
label (a delay drawn from an exponential of mean 60 s, so some arrive after the attribution window).
Then the label job closes the hour's windows, and it measures: one evaluation as the worker runs it
(services.evaluate) and the read + decide() alone (median of 5, peak traced memory), GET /api/metrics,
/api/timeseries and the control plane's /metrics (median of 5, through the Flask app), rows and bytes
per hour of traffic, bytes per aggregate row (fine and rolled up), and what retention removes.

    python benchmarks/bench_scale.py                       # 1, 5, 20 M on Postgres; 1, 5 M on SQLite
    python benchmarks/bench_scale.py --sizes pg:1e5,sqlite:1e5   # a quick run
    python benchmarks/bench_scale.py --sizes pg-agg:2e7   # the read side alone: buckets built in numpy

A benchmark, not a test: the machine is shared, so figures are medians and vary from run to run.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import tempfile
import time
import tracemalloc
import uuid
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from sqlalchemy import text

from bentos.predlog import PredictionLogWriter
from control_plane import observations, queries, retention, services
from control_plane.analysis.aggregates import (
    BUCKET_S,
    COARSE_BUCKET_S,
    BucketKey,
    LatencyHistogram,
    RequestFacts,
    SparseCounts,
    label_facts,
    latency_bins,
)
from control_plane.analysis.decide import decide
from control_plane.analysis.policy import Policy
from control_plane.context import Context
from control_plane.db.engine import make_engine, migrate, read_snapshot
from control_plane.deployer.memory import InMemoryDeployer
from control_plane.log_backlog import InMemoryLogBacklog
from control_plane.registry.memory import InMemoryRegistry
from control_plane.request_ids import issued_at
from control_plane.rollout.assignment import Assignment, Slot
from control_plane.settings import Settings
from control_plane.traffic.memory import InMemoryRouter
from control_plane.traffic_ops import apply_assignment

PG_ADMIN = "postgresql+psycopg2://postgres@127.0.0.1:5432/test"
HOUR_S = 3600
ASSIGNMENT = Assignment(Slot(1, 85), Slot(2, 10), Slot(3, 5))
LABEL_WINDOW_S = 300
CHUNK = 50_000
YEAR_S = 365 * 86400


@dataclass
class Clock:
    t: float

    def __call__(self) -> float:
        return self.t


def synthetic_rows(rng: np.random.Generator, start: float, n: int, offset: int, total: int):
    """`n` prediction-log rows (tuples, as a Bento logs them) spread evenly over the hour."""
    i = np.arange(offset, offset + n)
    ts = start + i * (HOUR_S / total)
    pick = rng.choice(3, size=n, p=[w / 100 for w in ASSIGNMENT.weights.values()])
    roles = list(ASSIGNMENT.slots)
    scores = rng.random(n)
    lat = rng.lognormal(np.log(4.0), 0.4, n) * (1 + 0.05 * (pick == 1))
    err = rng.random(n) < 0.005
    feats = rng.random((n, 16)).round(6).tolist()
    rows = []
    for k in range(n):
        role = roles[pick[k]]
        bad = bool(err[k])
        rows.append(
            (
                uuid.uuid4().hex,
                float(ts[k]),
                ASSIGNMENT.slot(role).version,
                role,
                "weighted",
                "predict",
                feats[k],
                None if bad else float(scores[k]),
                float(lat[k]),
                503 if bad else 200,
                None,  # user_key: the scale benchmark's requests name no user
                None,  # served: /predict rows serve no list
                None,  # pair_key: no shadow phase
            )
        )
    return rows


def _labels(rng: np.random.Generator, rows) -> list[dict]:
    out = []
    for r in rows:
        if r[7] is None or rng.random() >= 0.9:
            continue
        truth = int(rng.random() < (0.78 if (r[7] >= 0.5) else 0.22))
        out.append({"request_id": r[0], "label": truth, "ts": r[1] + float(rng.exponential(60.0))})
    return out


def _issued(label: dict) -> float:
    """The label's partition time, as the schema's default computes it for an insert through SQLAlchemy."""
    return issued_at(label["request_id"]) or label["ts"]


def _load_labels(engine, labs: list[dict]) -> None:
    """The labels as stored rows, by the fastest bulk path of the engine (the fill, not what is measured)."""
    raw = engine.raw_connection()
    try:
        cur = raw.cursor()
        if engine.dialect.name == "postgresql":
            text_rows = "".join(
                f"{x['request_id']}\t{x['label']}\t{x['ts']!r}\t{_issued(x)!r}\n" for x in labs
            )
            cur.copy_expert(
                "COPY labels (request_id, label, ts, issued_ts) FROM STDIN", io.StringIO(text_rows)
            )
        else:
            cur.executemany(
                "INSERT INTO labels (request_id, label, ts, issued_ts) VALUES (?, ?, ?, ?)",
                [(x["request_id"], x["label"], x["ts"], _issued(x)) for x in labs],
            )
        raw.commit()
    finally:
        raw.close()


def fill(url: str, engine, n: int, start: float, spill: Path) -> dict:
    """The hour's predictions through the Bentos' writer, then their labels; seconds taken for each."""
    rng = np.random.default_rng(n)
    # One writer per version, as each Bento has its own.
    writers = {
        v: PredictionLogWriter(url, spill, max_queue=4 * CHUNK).start() for v in ASSIGNMENT.versions.values()
    }
    t0 = time.perf_counter()
    written_labels = 0
    label_s = 0.0
    for offset in range(0, n, CHUNK):
        rows = synthetic_rows(rng, start, min(CHUNK, n - offset), offset, n)
        while max(w.stats().queue_depth for w in writers.values()) > 2 * CHUNK:
            time.sleep(0.05)
        for version, writer in writers.items():
            writer.log_many([r for r in rows if r[2] == version])
        labs = _labels(rng, rows)
        t1 = time.perf_counter()
        _load_labels(engine, labs)
        label_s += time.perf_counter() - t1
        written_labels += len(labs)
    for writer in writers.values():
        writer.close(timeout_s=3600)
    ingest_s = time.perf_counter() - t0
    stats = [w.stats() for w in writers.values()]
    spilled = sum(s.rows_spilled for s in stats)
    assert spilled == 0, f"the writers spilled {spilled} rows: the fill is not a fair one"
    written = sum(s.rows_written for s in stats)
    return {
        "ingest_s": ingest_s,
        "label_insert_s": label_s,
        "labels": written_labels,
        "rows_written": written,
    }


def synthesize(engine, n: int, start: float) -> dict:
    """The read side alone: the hour's bucket rows as `n` predictions would leave them, built in numpy
    (the same bins and sums the writer and the label job compute), with no raw row written."""
    rng = np.random.default_rng(n)
    t0 = time.perf_counter()
    buckets = int(HOUR_S // BUCKET_S)
    for role, slot in ASSIGNMENT.slots.items():
        per_bucket = rng.poisson(n * slot.weight / 100 / buckets, size=buckets)
        requests, labels = {}, {}
        for b, m in enumerate(per_bucket.tolist()):
            key = BucketKey(int(start) + b * BUCKET_S, slot.version, role, "weighted", "predict")
            lat = rng.lognormal(np.log(4.0), 0.4, m)
            errors = int((rng.random(m) < 0.005).sum())
            requests[key] = RequestFacts(m, errors, LatencyHistogram(SparseCounts.of_bins(latency_bins(lat))))
            scores = rng.random(m - errors)
            clicked = (rng.random(m - errors) < np.where(scores >= 0.5, 0.78, 0.22)) & (
                rng.random(m - errors) < 0.9
            )
            labels.update(label_facts([key] * len(scores), scores, clicked.astype(int)))
        with engine.begin() as conn:
            queries.write_buckets(conn, requests, labels, LABEL_WINDOW_S)
    return {"ingest_s": time.perf_counter() - t0, "label_insert_s": 0.0, "labels": 0, "rows_written": 0}


def context(engine, url: str, state: Path, clock: Clock) -> Context:
    settings = Settings(
        state_dir=state, database_url=url, label_window_s=LABEL_WINDOW_S, api_token="bench-" * 6
    )
    registry = InMemoryRegistry()
    for profile in ("baseline", "better", "control"):
        registry.add_version(profile=profile)
    ctx = Context(
        settings,
        engine,
        registry,
        InMemoryRouter(),
        InMemoryDeployer(),
        clock=clock,
        sleep=lambda _s: None,
        drain_s=0,
        log_backlog=InMemoryLogBacklog(),
    )
    for v in (1, 3):
        ctx.deployer.deploy(v)
    registry.set_alias("baseline", 1)
    registry.set_alias("control", 3)
    apply_assignment(ctx, Assignment(baseline=Slot(1, 95), control=Slot(3, 5)))
    return ctx


def _median_s(fn, repeat: int = 5) -> float:
    return _medians(fn, repeat)[0]


def _medians(fn, repeat: int = 5) -> tuple[float, float]:
    """Median wall and median CPU seconds of this process (CPU is less at the mercy of a shared machine;
    the database's own CPU is not in it)."""
    wall, cpu = [], []
    for _ in range(repeat):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return statistics.median(wall), statistics.median(cpu)


def _peak_mb(fn) -> float:
    tracemalloc.start()
    fn()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak / 1e6


def measure(engine_name: str, url: str, n: int, synthetic: bool = False) -> dict:
    state = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    migrate(url)
    engine = make_engine(url)
    end = time.time() // BUCKET_S * BUCKET_S
    start = end - HOUR_S
    with engine.begin() as conn:  # as if the stack had been running: the hour's partitions exist
        for table in queries.PARTITIONED:
            if queries.partitioned(conn, table):
                queries.create_partitions(conn, start, end + retention.AHEAD_S, table)
    if synthetic:
        out = {"engine": f"{engine_name} (aggregates synthesized)", "rows": n, **synthesize(engine, n, start)}
    else:
        out = {"engine": engine_name, "rows": n, **fill(url, engine, n, start, state / "spill")}
    clock = Clock(start)
    ctx = context(engine, url, state, clock)
    # The rollout began with the hour; the label job then closes its windows (the first evaluation
    # would, in a shorter step): its time is the label work of an hour of traffic.
    services.start_canary(ctx, 2, {"step_min_duration_s": 0, "max_duration_s": 4 * HOUR_S}, actor="bench")
    apply_assignment(ctx, ASSIGNMENT)
    clock.t = end + LABEL_WINDOW_S  # every prediction of the hour has had its window closed
    t0 = time.perf_counter()
    closed = services.close_labels(ctx)
    out["label_job_s"] = time.perf_counter() - t0
    out["closed"] = closed
    rollout = ctx.ledger.active()
    policy = Policy.from_dict(rollout.policy_params)

    def read_and_decide():
        with read_snapshot(engine) as conn:
            obs = observations.read_observations(
                queries.SqlMetricsSource(conn),
                versions=ASSIGNMENT.versions,
                since=rollout.started_at,
                step_since=rollout.step_started_at,
                now=clock.t,
                label_window_s=LABEL_WINDOW_S,
                settle_s=ctx.settings.log_settle_s,
                step_weights=ASSIGNMENT.weights,
            )
        return decide(rollout.state(0, {}), obs, policy)

    out["decide_s"], out["decide_cpu_s"] = _medians(read_and_decide)
    out["decide_mb"] = _peak_mb(read_and_decide)
    t0 = time.perf_counter()
    result = services.evaluate(
        ctx, tick=1, actor="bench"
    )  # as the worker runs it: label job, read, decide, record
    out["evaluate_s"] = time.perf_counter() - t0
    out["action"] = result["action"] if result else None
    ctx.settings = replace(ctx.settings, window_s=HOUR_S + LABEL_WINDOW_S)
    from control_plane.web.app import create_app

    client = create_app(ctx=ctx).test_client()
    for path in ("/api/metrics", "/api/timeseries?bucket_s=60", "/metrics"):
        assert client.get(path).status_code == 200, path
    out["api_metrics_s"], out["api_metrics_cpu_s"] = _medians(lambda: client.get("/api/metrics"))
    out["api_timeseries_s"], out["api_timeseries_cpu_s"] = _medians(
        lambda: client.get("/api/timeseries?bucket_s=60")
    )
    out["scrape_s"], out["scrape_cpu_s"] = _medians(lambda: client.get("/metrics"))
    out["load_average"] = os.getloadavg()[0]
    out.update(storage(engine))
    out.update(retention_check(engine, ctx, clock))
    engine.dispose()
    return out


def _compact(engine) -> None:
    """Postgres: rewrite the aggregate tables, so their size is their rows' and not dead ones'."""
    if engine.dialect.name == "postgresql":
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text("VACUUM FULL request_buckets"))
            conn.execute(text("VACUUM FULL label_buckets"))


def storage(engine) -> dict:
    _compact(engine)
    with engine.connect() as conn:
        sizes = queries.bucket_bytes(conn)
        fine_rows = queries.count_rows(conn, "request_buckets")
        label_rows = queries.count_rows(conn, "label_buckets")
    return {
        "pred_bytes": sizes["predictions"],
        "label_bytes": sizes["labels"],
        "req_bucket_bytes_per_row": sizes["request_buckets"] / max(fine_rows, 1),
        "label_bucket_bytes_per_row": sizes["label_buckets"] / max(label_rows, 1),
        "fine_rows": fine_rows,
    }


def retention_check(engine, ctx: Context, clock: Clock) -> dict:
    """Retention at half the hour: what it removes and how long it takes; then a roll-up of every bucket."""
    policy = retention.RetentionPolicy(
        raw_s=HOUR_S / 2 + ctx.settings.label_window_s, fine_s=0, aggregate_s=YEAR_S
    )
    with engine.begin() as conn:  # the rollout is over for this check: only the retention window binds
        conn.execute(text("UPDATE rollouts SET phase = 'promoted'"))
    t0 = time.perf_counter()
    report = retention.apply(engine, replace(policy, fine_s=10 * YEAR_S), clock.t, None)
    took = time.perf_counter() - t0
    with engine.connect() as conn:
        oldest = queries.earliest_prediction(conn)
        left = queries.prediction_count(conn)
    with engine.begin() as conn:
        rolled = 0
        while (moved := queries.roll_up(conn, clock.t + COARSE_BUCKET_S, COARSE_BUCKET_S)) > 0:
            rolled += moved
    _compact(engine)
    with engine.connect() as conn:
        sizes = queries.bucket_bytes(conn)
        coarse = queries.count_rows(conn, "request_buckets") + queries.count_rows(conn, "label_buckets")
    return {
        "retention_s": took,
        "retention_dropped_partitions": report.partitions_dropped,
        "retention_deleted": report.predictions_deleted,
        "rows_left": left,
        "retention_window_h": policy.raw_s / 3600,
        "oldest_row_age_h": None if oldest is None else (clock.t - oldest) / 3600,
        "coarse_bytes_per_row": (sizes["request_buckets"] + sizes["label_buckets"]) / max(coarse, 1),
    }


def year_of_aggregates(
    r: dict, fine_days: float = Settings.aggregate_fine_retention_s / 86400
) -> tuple[float, float]:
    """GB a year of aggregates takes at the default bucket and three arms: without and with the roll-up."""
    arms = len(ASSIGNMENT.slots)
    per_fine = r["req_bucket_bytes_per_row"] + r["label_bucket_bytes_per_row"]
    flat = per_fine * arms * YEAR_S / BUCKET_S / 1e9
    rolled = (
        per_fine * arms * fine_days * 86400 / BUCKET_S
        + r["coarse_bytes_per_row"] * 2 * arms * YEAR_S / COARSE_BUCKET_S
    ) / 1e9
    return flat, rolled


def fresh_url(engine_name: str, n: int) -> str:
    if engine_name == "sqlite":
        return f"sqlite:///{tempfile.mkdtemp(prefix='bench-scale-db-')}/scale.db"
    name = f"bench_scale_{n}_{uuid.uuid4().hex[:6]}"
    admin = make_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f"CREATE DATABASE {name}"))
    admin.dispose()
    return PG_ADMIN.rsplit("/", 1)[0] + "/" + name


def drop_url(url: str) -> None:
    if url.startswith("sqlite"):
        Path(url.removeprefix("sqlite:///")).unlink(missing_ok=True)
        return
    admin = make_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f"DROP DATABASE IF EXISTS {url.rsplit('/', 1)[1]} WITH (FORCE)"))
    admin.dispose()


def _ms(r: dict, name: str) -> str:
    """Wall (CPU) milliseconds."""
    cpu = r.get(f"{name}_cpu_s")
    return f"{1000 * r[f'{name}_s']:.0f}" + ("" if cpu is None else f" ({1000 * cpu:.0f})") + " ms"


def _hours(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f} h"


def table(results: list[dict]) -> str:
    head = (
        "| engine | rows in the hour | ingest (rows/s) | label job | evaluation (worker) | read + decide, wall (CPU) | its peak memory "
        "| /api/metrics | /api/timeseries | /metrics | bytes/hour (predictions + labels) | aggregate B/row (5 s, hourly) "
        "| a year of aggregates (flat, rolled up) | retention: window, oldest row left |"
    )
    lines = [head, "|" + "---|" * 14]
    for r in results:
        flat, rolled = year_of_aggregates(r)
        lines.append(
            f"| {r['engine']} | {r['rows']:,} | {r['rows'] / r['ingest_s']:,.0f} | {r['label_job_s']:.1f} s "
            f"| {1000 * r['evaluate_s']:.0f} ms | {_ms(r, 'decide')} | {r['decide_mb']:.1f} MB "
            f"| {_ms(r, 'api_metrics')} | {_ms(r, 'api_timeseries')} | {_ms(r, 'scrape')} "
            f"| {(r['pred_bytes'] + r['label_bytes']) / 1e9:.2f} GB "
            f"| {r['req_bucket_bytes_per_row'] + r['label_bucket_bytes_per_row']:.0f}, {r['coarse_bytes_per_row']:.0f} "
            f"| {flat:.1f} GB, {rolled:.2f} GB | {r['retention_window_h']:.2f} h, {_hours(r['oldest_row_age_h'])} |"
        )
    return "\n".join(lines)


def parse_sizes(spec: str) -> list[tuple[str, int]]:
    out = []
    for part in spec.split(","):
        engine_name, _, n = part.partition(":")
        if engine_name not in ("pg", "sqlite", "pg-agg", "sqlite-agg"):
            raise SystemExit(f"--sizes: engine must be pg, sqlite, pg-agg or sqlite-agg, got {engine_name!r}")
        out.append((engine_name, int(float(n))))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="pg:1e6,pg:5e6,pg:2e7,sqlite:1e6,sqlite:5e6", help="engine:rows,...")
    p.add_argument("--keep", action="store_true", help="keep the databases (default: drop each after)")
    args = p.parse_args(argv)
    results = []
    for engine_name, n in parse_sizes(args.sizes):
        base = engine_name.removesuffix("-agg")
        url = fresh_url(base, n)
        try:
            r = measure(base, url, n, synthetic=engine_name.endswith("-agg"))
        finally:
            if not args.keep:
                drop_url(url)
        results.append(r)
        print(r, flush=True)
        print(table(results), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
