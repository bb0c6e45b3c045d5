"""What one evaluation's paired read costs as the shadow phase's window fills up: the bucket read
(`SqlMetricsSource.pairs`) against the raw rows' join (`queries.raw_pairs`, the read before the pair
buckets), and one tick of the pair job (`queries.sum_pairs`) that keeps the buckets.

For each size it fills a window (an hour by default) with that many mirrored requests: the baseline's
live answer and the shadow's copy of each (same pair key, the copy a few ms later; 2 % errors on
either side, a third of them /recommend lists), and a label for 60 % of the live answers (a delay
drawn from an exponential of mean 60 s, some after the 300 s attribution window). The pair job sums
the window once (its catch-up, timed), then it measures, median of `--repeat`: the bucket read of the
whole window, the raw join of the whole window, and one tick of the job: the newest minute's buckets
taken out and summed again, as a tick finds them.

    python benchmarks/bench_pairs.py                              # 1e4 and 1e5 pairs, SQLite and Postgres
    python benchmarks/bench_pairs.py --sizes sqlite:1e4 --repeat 3   # a quick run

A benchmark, not a test: the machine is shared, so figures are medians and vary from run to run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
from sqlalchemy import create_engine, text

from control_plane import queries
from control_plane.db.engine import make_engine, migrate
from control_plane.metrics_source import SHADOW_ROUTE, PairQuery
from control_plane.request_ids import RequestIdSigner

PG_ADMIN = "postgresql+psycopg2://postgres@127.0.0.1:5432/test"
SHADOW, BASELINE = 3, 2
WINDOW_LABEL_S = 300.0
SETTLE_S = 2.0
TICK_S = 60  # the newest minute: what one tick of the job finds new at the evaluation's interval
CHUNK = 20_000


def rows_of(rng: np.random.Generator, signer: RequestIdSigner, start: float, n: int, window_s: float):
    """`n` mirrored requests spread over [start, start + window_s): (live and copy rows, labels)."""
    ts = np.sort(start + rng.random(n) * window_s)
    score = rng.random(n)
    drift = np.clip(score + rng.normal(0.02, 0.1, n), 0.0, 1.0)
    b_err, s_err = rng.random(n) < 0.02, rng.random(n) < 0.02
    ranked = rng.random(n) < 0.33
    preds, labels = [], []
    for i in range(n):
        key = f"{rng.integers(1 << 62):016x}{i:08x}"
        rid = signer.issue(f"{int(ts[i] * 1e9):016x}{rng.integers(1 << 62):016x}")
        served = [f"i{j}" for j in rng.choice(20, 5, replace=False)] if ranked[i] else None
        common = {"features": None, "user_key": None, "pair_key": key}
        preds.append(
            {**common, "request_id": rid, "ts": float(ts[i]), "model_version": BASELINE, "role": "baseline",
             "route": "weighted", "endpoint": "recommend" if served else "predict",
             "score": None if b_err[i] else float(score[i]), "latency_ms": float(rng.gamma(4, 1.5)),
             "status": 500 if b_err[i] else 200, "served": served}
        )  # fmt: skip
        preds.append(
            {**common, "request_id": uuid.uuid4().hex, "ts": float(ts[i]) + float(rng.uniform(0.001, 0.02)),
             "model_version": SHADOW, "role": "canary", "route": SHADOW_ROUTE,
             "endpoint": "recommend" if served else "predict",
             "score": None if s_err[i] else float(drift[i]), "latency_ms": float(rng.gamma(4, 1.6)),
             "status": 500 if s_err[i] else 200, "served": None if served is None else served[::-1]}
        )  # fmt: skip
        if not b_err[i] and rng.random() < 0.6:
            truth = int(rng.random() < (0.78 if score[i] >= 0.5 else 0.22))
            labels.append({"request_id": rid, "label": truth, "ts": float(ts[i] + rng.exponential(60.0))})
    return preds, labels


def fill(engine, n: int, start: float, window_s: float) -> float:
    """The window's rows and labels (through `insert_predictions`, as the tests write them); seconds."""
    rng = np.random.default_rng(n)
    signer = RequestIdSigner.ephemeral()
    t0 = time.perf_counter()
    preds, labels = rows_of(rng, signer, start, n, window_s)
    if engine.dialect.name == "postgresql":
        with engine.begin() as conn:
            for table in ("predictions", "labels"):
                queries.create_partitions(conn, start - 3600, start + window_s + 3600, table)
    for i in range(0, len(preds), CHUNK):
        with engine.begin() as conn:
            queries.insert_predictions(conn, preds[i : i + CHUNK])
    for i in range(0, len(labels), CHUNK):
        with engine.begin() as conn:
            queries.insert_labels_rows(conn, labels[i : i + CHUNK])
    if engine.dialect.name == "postgresql":
        with engine.connect() as conn:
            conn.execute(text("COMMIT"))
            conn.execute(text("VACUUM ANALYZE predictions"))
            conn.execute(text("VACUUM ANALYZE labels"))
    return time.perf_counter() - t0


def _median_ms(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def job(engine, now: float, start: float) -> int:
    return queries.sum_pairs(
        engine,
        shadow_version=SHADOW,
        baseline_version=BASELINE,
        window_s=WINDOW_LABEL_S,
        now=now,
        settle_s=SETTLE_S,
        start_at=start,
    )


def rewind(engine, back: float) -> None:
    """Take every bucket from `back` on out of the bucket tables and put the watermarks back there."""
    with engine.begin() as conn:
        for table in ("pair_buckets", "pair_label_buckets"):
            conn.execute(text(f"DELETE FROM {table} WHERE bucket_start >= :b"), {"b": back})
        conn.execute(text("UPDATE pair_watermarks SET summed_until = :b"), {"b": back})


def measure(engine_name: str, url: str, n: int, window_s: float, repeat: int) -> dict:
    engine = make_engine(url)
    start = 1_800_000_000.0
    now = start + window_s + WINDOW_LABEL_S + 60  # every pair settled, every window closed
    try:
        fill_s = fill(engine, n, start, window_s)
        t0 = time.perf_counter()
        summed = job(engine, now, start)
        catch_up_s = time.perf_counter() - t0
        with engine.connect() as conn:
            src = queries.SqlMetricsSource(conn)
            query = PairQuery(SHADOW, BASELINE, start, start + window_s, WINDOW_LABEL_S, now)
            facts = src.pairs(query)
            assert facts.pairs == summed and facts == src.pairs(query)
            raw = queries.raw_pairs(conn, query)
            assert raw.pairs == facts.pairs and raw.correct_diff.n == facts.correct_diff.n
            bucket_ms = _median_ms(lambda: src.pairs(query), repeat)
            raw_ms = _median_ms(lambda: queries.raw_pairs(conn, query), repeat)

        ticks = []
        for _ in range(repeat):  # the window's last minute new to both parts, as a tick finds it
            rewind(engine, start + window_s - TICK_S)
            t0 = time.perf_counter()
            tick_pairs = job(engine, now, start)
            ticks.append(time.perf_counter() - t0)
        tick_ms = 1000 * statistics.median(ticks)
        with engine.connect() as conn:
            again = queries.SqlMetricsSource(conn).pairs(query)
            assert (again.pairs, again.correct_diff.n) == (facts.pairs, facts.correct_diff.n)
        return {
            "engine": engine_name,
            "pairs": facts.pairs,
            "labelled": facts.correct_diff.n,
            "fill_s": fill_s,
            "catch_up_s": catch_up_s,
            "bucket_ms": bucket_ms,
            "raw_ms": raw_ms,
            "tick_ms": tick_ms,
            "tick_pairs": tick_pairs,
        }
    finally:
        engine.dispose()


def fresh_url(engine_name: str, tmp: Path, n: int) -> str:
    if engine_name == "sqlite":
        url = f"sqlite:///{tmp / f'pairs_{n}.db'}"
    else:
        name = f"bench_pairs_{n}_{uuid.uuid4().hex[:6]}"
        admin = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        admin.dispose()
        url = PG_ADMIN.rsplit("/", 1)[0] + f"/{name}"
    migrate(url)
    return url


def drop_url(url: str) -> None:
    if not url.startswith("postgresql"):
        return
    name = url.rsplit("/", 1)[1]
    admin = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(
            text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :n"), {"n": name}
        )
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
    admin.dispose()


def table(results: list[dict], window_s: float) -> str:
    lines = [
        f"| engine | mirrored pairs in the {window_s / 3600:g} h window | labelled | bucket read (ms) | raw join (ms) "
        f"| one tick of the job: its last {TICK_S} s (ms) | catch-up of the window (s) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r['engine']} | {r['pairs']:,} | {r['labelled']:,} | {r['bucket_ms']:.2f} | {r['raw_ms']:,.0f} "
            f"| {r['tick_ms']:.0f} ({r['tick_pairs']:,} pairs) | {r['catch_up_s']:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="sqlite:1e4,sqlite:1e5,pg:1e4,pg:1e5", help="engine:pairs,...")
    p.add_argument("--window-s", type=float, default=3600.0, help="the shadow window the pairs fill")
    p.add_argument("--repeat", type=int, default=7, help="runs of each read; the median is reported")
    args = p.parse_args(argv)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for spec in args.sizes.split(","):
            name, size = spec.split(":")
            engine_name = {"pg": "postgresql", "sqlite": "sqlite"}[name]
            n = int(float(size))
            url = fresh_url(engine_name, Path(tmp), n)
            try:
                r = measure(engine_name, url, n, args.window_s, args.repeat)
            finally:
                drop_url(url)
            print(
                f"{engine_name} {n}: bucket {r['bucket_ms']:.2f} ms, raw {r['raw_ms']:.0f} ms, "
                f"tick {r['tick_ms']:.0f} ms (fill {r['fill_s']:.0f} s)",
                file=sys.stderr,
            )
            results.append(r)
    print(table(results, args.window_s))
    return 0


if __name__ == "__main__":
    sys.exit(main())
