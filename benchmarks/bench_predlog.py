"""The prediction log's two ways into Postgres, side by side: SQLAlchemy's multi-row INSERT and COPY.

    .venv/bin/python benchmarks/bench_predlog.py [--batches 40] [--batch-size 500]

The writer thread holds the GIL while it turns a batch into a statement, and a request waiting for the
event loop waits for that too; this measures that Python time (the thread's CPU time per row) and
the wall time per row, alternating the two paths batch by batch on a fresh database, and prints medians.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from contextlib import ExitStack
from pathlib import Path
from tempfile import TemporaryDirectory

from bench_setups import create_database

from bentos.http import new_request_id
from bentos.predlog import PredictionRow, copy_batch, insert_statement, row_dict
from control_plane.db.engine import make_engine


def sample_rows(n: int) -> list[PredictionRow]:
    """`n` rows as a Bento logs them: ids in time order, versions split 85/10/5, 16 random features."""
    return [
        (
            new_request_id(),
            time.time(),
            random.choices((2, 3, 1), weights=(85, 10, 5))[0],
            "baseline",
            "weighted",
            "predict",
            [random.random() for _ in range(16)],
            random.random(),
            0.4 + random.random(),
            200,
            f"{random.randrange(10_000):032x}",  # a user's keyed hash (control_plane/users.py)
            None,  # served: /predict rows serve no list
            None,  # pair_key: no shadow phase
        )
        for _ in range(n)
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=40, help="batches per path")
    parser.add_argument("--batch-size", type=int, default=500)
    args = parser.parse_args(argv)
    with ExitStack() as stack:
        workdir = Path(stack.enter_context(TemporaryDirectory(prefix="bench-predlog-")))
        db = create_database(stack, "postgres", workdir)
        engine = make_engine(db.url)
        stack.callback(engine.dispose)
        stmt = insert_statement(engine)

        def insert(rows: list[PredictionRow]) -> None:
            with engine.begin() as conn:
                conn.execute(stmt, [row_dict(r) for r in rows])

        held = engine.raw_connection()  # the log's writer holds one connection from batch to batch
        stack.callback(held.close)
        paths = {"insert (SQLAlchemy)": insert, "copy": lambda rows: copy_batch(held, rows)}
        cpu: dict[str, list[float]] = {name: [] for name in paths}
        wall: dict[str, list[float]] = {name: [] for name in paths}
        for write in paths.values():  # warm up: connections, the temporary table, caches
            write(sample_rows(args.batch_size))
        for _ in range(args.batches):
            for name, write in paths.items():
                rows = sample_rows(args.batch_size)
                c0, w0 = time.thread_time(), time.perf_counter()
                write(rows)
                cpu[name].append((time.thread_time() - c0) / len(rows) * 1e6)
                wall[name].append((time.perf_counter() - w0) / len(rows) * 1e6)
        print(f"{args.batches} batches of {args.batch_size} rows per path, alternating; medians")
        print(f"{'path':<22}{'Python CPU us/row':>20}{'wall us/row':>14}")
        for name in paths:
            print(f"{name:<22}{statistics.median(cpu[name]):>20.1f}{statistics.median(wall[name]):>14.1f}")
        base, copy = (statistics.median(cpu[n]) for n in paths)
        print(f"copy / insert, Python CPU per row: {copy / base:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
