"""What each part of the `predictions` table costs Postgres a logged row (a script, not a test).

    .venv/bin/python benchmarks/bench_predlog_schema.py [--rounds 60] [--batch-size 500]

Creates copies of `predictions` in a fresh Postgres database, each changed in one way (an index
dropped, `features` stored as text or jsonb, `request_id` compared byte-wise), COPYs the same batch of
rows into each in turn, as the log's writer does (`bentos.predlog.copy_text`, then a commit), and
reads how long each copy's backend ran (/proc/PID/task/*/schedstat; Postgres on this machine). Prints
the medians in microseconds a row.
"""

from __future__ import annotations

import argparse
import io
import statistics
from contextlib import ExitStack
from pathlib import Path
from tempfile import TemporaryDirectory

from bench_predlog import sample_rows
from bench_setups import create_database, ran_s

from bentos.predlog import COLUMNS, copy_text, row_dict, row_from_dict

VARIANTS = {
    "as is": "",
    "without ix_predictions_ts": "DROP INDEX {t}_ts_idx",
    "features as text": "ALTER TABLE {t} ALTER COLUMN features TYPE text",
    "features as jsonb": "ALTER TABLE {t} ALTER COLUMN features TYPE jsonb",
    'request_id COLLATE "C"': 'ALTER TABLE {t} ALTER COLUMN request_id TYPE varchar(128) COLLATE "C"',
    "no features (NULL)": "",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=60, help="batches into each table (default 60)")
    parser.add_argument("--batch-size", type=int, default=500)
    args = parser.parse_args(argv)
    import psycopg2

    with ExitStack() as stack:
        workdir = Path(stack.enter_context(TemporaryDirectory(prefix="bench-schema-")))
        db = create_database(stack, "postgres", workdir)
        tables = {}
        for i, (name, change) in enumerate(VARIANTS.items()):
            conn = psycopg2.connect(db.url.replace("postgresql+psycopg2://", "postgresql://"))
            stack.callback(conn.close)
            table = f"predictions_{i}"
            with conn.cursor() as cur:
                cur.execute(f"CREATE TABLE {table} (LIKE predictions INCLUDING ALL)")
                if change:
                    cur.execute(change.format(t=table))
                cur.execute("SELECT pg_backend_pid()")
                pid = cur.fetchone()[0]
            conn.commit()
            tables[name] = (conn, table, pid)
        costs: dict[str, list[float]] = {name: [] for name in VARIANTS}
        for _ in range(args.rounds):
            batch = sample_rows(args.batch_size)
            for name, (conn, table, pid) in tables.items():
                if name.startswith("no features"):
                    rows = [row_from_dict({**row_dict(r), "features": None}) for r in batch]
                else:
                    rows = batch
                text = copy_text(rows)
                start = ran_s(pid)
                with conn.cursor() as cur:
                    cur.copy_expert(f"COPY {table} ({', '.join(COLUMNS)}) FROM STDIN", io.StringIO(text))
                conn.commit()
                costs[name].append((ran_s(pid) - start) / len(rows) * 1e6)
        print(f"{args.rounds} batches of {args.batch_size} rows into each table, alternating; medians")
        for name, values in costs.items():
            print(f"{statistics.median(values):6.2f} us of the backend's time a row  {name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
