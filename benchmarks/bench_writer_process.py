"""The prediction log's writer process on its own: its CPU a row, fed as a Bento feeds it.

    .venv/bin/python benchmarks/bench_writer_process.py [--rate 4000] [--seconds 6] [--repeats 5] [ROOT ...]

Starts `python -m bentos.predlog_process` against a fresh Postgres database, writes it a frame of
rows every flush interval (200 ms, as `ProcessLogWriter` does) at `--rate` rows a second, and reads
the time the child's threads and the database's Postgres backends ran (/proc/PID/task/*/schedstat)
before the first frame and after the last has settled; checks that every row reached the database.
Each ROOT is a checkout of this repository whose `bentos` package the child runs (default: this
one), so that two versions can be measured side by side, alternating run by run
(`git worktree add /tmp/before HEAD~1`, then `... /tmp/before .`); prints medians.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from tempfile import TemporaryDirectory

from bench_predlog import sample_rows
from bench_setups import Database, create_database, db_backend_pids, ran_s

from bentos.predlog_process import CONFIG_ENV, frame

FLUSH_INTERVAL_S = 0.2
WARM_UP_S = 1.5  # the child imports SQLAlchemy and connects on its first batch


def _backends_ran_s(db: Database) -> dict[int, float]:
    """Seconds each Postgres backend of `db` has run, to the nanosecond (psutil counts 10 ms ticks)."""
    return {pid: ran_s(pid) for pid in db_backend_pids(db)}


def _count(database_url: str) -> int:
    from sqlalchemy import create_engine, text

    engine = create_engine(database_url)
    try:
        with engine.connect() as conn:
            return conn.execute(text("SELECT count(*) FROM predictions")).scalar_one()
    finally:
        engine.dispose()


def run_once(
    root: Path, db: Database, spill_dir: Path, rate: float, seconds: float, batch_size: int = 500
) -> tuple[float, float]:
    """The child's CPU and Postgres' in microseconds a row over `seconds` of frames at `rate` rows a
    second; RuntimeError unless every row sent is in the database afterwards."""
    database_url = db.url
    before = _count(database_url)
    per_frame = max(1, int(rate * FLUSH_INTERVAL_S))
    frames = [frame(sample_rows(per_frame)) for _ in range(max(1, int(seconds / FLUSH_INTERVAL_S)))]
    config = {
        "database_url": database_url,
        "spill_dir": str(spill_dir),
        "writer": {"batch_size": batch_size, "flush_interval_s": FLUSH_INTERVAL_S, "max_queue": 10_000},
    }
    env = {**os.environ, CONFIG_ENV: json.dumps(config), "PYTHONPATH": str(root)}
    child = subprocess.Popen(
        [sys.executable, "-m", "bentos.predlog_process"],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        env=env,
        cwd=root,
    )
    try:
        child.stdin.write(frame(sample_rows(per_frame)))  # warm up: imports, the engine, the connection
        child.stdin.flush()
        time.sleep(WARM_UP_S)
        start, db_start = ran_s(child.pid), _backends_ran_s(db)
        due = time.monotonic()
        for data in frames:
            child.stdin.write(data)
            child.stdin.flush()
            due += FLUSH_INTERVAL_S
            time.sleep(max(0.0, due - time.monotonic()))
        time.sleep(2 * FLUSH_INTERVAL_S + 0.3)  # the last frame's batch written
        used = ran_s(child.pid) - start
        db_used = sum(t - db_start.get(pid, 0.0) for pid, t in _backends_ran_s(db).items())
    finally:
        child.stdin.close()
        child.wait(30)
    sent = per_frame * (len(frames) + 1)
    if (arrived := _count(database_url) - before) != sent:
        raise RuntimeError(f"{root}: {arrived} of {sent} rows reached the database")
    rows = per_frame * len(frames)
    return used / rows * 1e6, db_used / rows * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("roots", nargs="*", type=Path, help="checkouts to compare (default: this one)")
    parser.add_argument("--rate", type=float, default=4000, help="rows a second (default 4000)")
    parser.add_argument("--seconds", type=float, default=6, help="seconds of frames a run (default 6)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=500, help="the child's batch size (default 500)")
    args = parser.parse_args(argv)
    roots = [r.resolve() for r in args.roots] or [Path(__file__).resolve().parent.parent]
    for root in roots:
        if not (root / "bentos" / "predlog_process.py").is_file():
            parser.error(f"{root} is not a checkout of this repository (no bentos/predlog_process.py)")
    with ExitStack() as stack:
        workdir = Path(stack.enter_context(TemporaryDirectory(prefix="bench-writer-")))
        db = create_database(stack, "postgres", workdir)
        results: dict[Path, list[tuple[float, float]]] = {root: [] for root in roots}
        for _ in range(args.repeats):
            for root in roots:
                results[root].append(
                    run_once(root, db, workdir / "spill", args.rate, args.seconds, args.batch_size)
                )
        print(f"{args.repeats} runs of {args.seconds:g} s at {args.rate:g} rows/s each, alternating; medians")
        for root, values in results.items():
            writer, postgres = ([v[i] for v in values] for i in (0, 1))
            runs = ", ".join(f"{w:.1f}+{p:.1f}" for w, p in values)
            print(
                f"{statistics.median(writer):6.1f} us of the writer's CPU a row,"
                f" {statistics.median(postgres):5.1f} of Postgres'  {root}  ({runs})"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
