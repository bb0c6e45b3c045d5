"""What the aggregates add to the prediction log's writer, per row: the same batches stored with and without.

The writer's own store step (`PredictionLogWriter._store`, as the writer thread calls it for each batch of
500) on Postgres (COPY) and SQLite, alternating rounds with the aggregates' per-batch merge switched on
and off, so that the machine's noise falls on both alike. Prints the median writer CPU (this process)
and wall time per row, and their ratio. Rows are those of one Bento: one version, 4,700 a second.

    python benchmarks/bench_writer_aggregates.py [--rows 100000] [--rounds 5]
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
from bench_scale import PG_ADMIN, drop_url, fresh_url, synthetic_rows

import bentos.predlog as predlog
from control_plane.db.engine import migrate

BATCH = 500
RATE_PER_S = 4_700


def _store_all(writer, rows) -> tuple[float, float]:
    cpu, wall = time.process_time(), time.perf_counter()
    for i in range(0, len(rows), BATCH):
        writer._store(rows[i : i + BATCH])
    return time.process_time() - cpu, time.perf_counter() - wall


def run(engine_name: str, n: int, rounds: int) -> dict:
    url = fresh_url(engine_name, n)
    try:
        migrate(url)
        writer = predlog.PredictionLogWriter(url, Path(tempfile.mkdtemp()))
        rng = np.random.default_rng(1)
        on_cpu, off_cpu, on_wall, off_wall = [], [], [], []
        real = predlog.add_request_facts
        for r in range(rounds):
            for aggregates in (True, False) if r % 2 == 0 else (False, True):
                # One Bento's rows (its writer logs one version) at the baseline's share of the
                # gateway's rate: 4,700 a second, so that a batch of 500 spans about 0.1 s.
                start = time.time() - 3600 + r * 60
                rows = [
                    (uuid.uuid4().hex, start + i / RATE_PER_S, 1, "baseline", *row[4:])
                    for i, row in enumerate(synthetic_rows(rng, start, n, 0, n))
                ]
                predlog.add_request_facts = real if aggregates else (lambda *a, **k: None)
                cpu, wall = _store_all(writer, rows)
                (on_cpu if aggregates else off_cpu).append(cpu / n * 1e6)
                (on_wall if aggregates else off_wall).append(wall / n * 1e6)
        predlog.add_request_facts = real
        writer._let_go_of_connection()
    finally:
        drop_url(url)
    med = statistics.median
    return {
        "engine": engine_name,
        "cpu_us_with": med(on_cpu),
        "cpu_us_without": med(off_cpu),
        "wall_us_with": med(on_wall),
        "wall_us_without": med(off_wall),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--engines", default="pg,sqlite")
    args = p.parse_args(argv)
    print("| engine | writer CPU/row without | with aggregates | ratio | wall/row without | with | ratio |")
    print("|---|--:|--:|--:|--:|--:|--:|")
    for engine_name in args.engines.split(","):
        r = run(engine_name, args.rows, args.rounds)
        print(
            f"| {engine_name} | {r['cpu_us_without']:.1f} us | {r['cpu_us_with']:.1f} us "
            f"| {r['cpu_us_with'] / r['cpu_us_without']:.3f} | {r['wall_us_without']:.1f} us "
            f"| {r['wall_us_with']:.1f} us | {r['wall_us_with'] / r['wall_us_without']:.3f} |",
            flush=True,
        )
    return 0


assert PG_ADMIN  # the same server as bench_scale
if __name__ == "__main__":
    sys.exit(main())
