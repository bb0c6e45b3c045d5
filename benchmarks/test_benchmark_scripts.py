"""The Postgres benchmarks still measure what they say, on a few rows (`make test` collects benchmarks/)."""

from __future__ import annotations

import re
from contextlib import ExitStack
from pathlib import Path

import pytest
from bench_predlog_schema import VARIANTS
from bench_predlog_schema import main as schema_main
from bench_setups import create_database
from bench_writer_process import run_once
from sqlalchemy import create_engine, text

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent


def test_the_writer_benchmark_measures_a_child_that_wrote_every_row(tmp_path):
    with ExitStack() as stack:
        db = create_database(stack, "postgres", tmp_path)
        writer_us, postgres_us = run_once(ROOT, db, tmp_path / "spill", rate=500, seconds=0.4)
        assert 0 < writer_us < 10_000
        assert 0 < postgres_us < 10_000  # the backend that took the COPYs, found by the database's name
        engine = create_engine(db.url)
        try:
            with engine.connect() as conn:  # two frames of 100 rows, and the warm-up frame
                assert conn.execute(text("SELECT count(*) FROM predictions")).scalar_one() == 300
        finally:
            engine.dispose()


def test_the_schema_benchmark_times_every_variant_of_the_table(capsys):
    assert schema_main(["--rounds", "2", "--batch-size", "20"]) == 0
    report = capsys.readouterr().out.splitlines()[1:]  # below the heading
    lines = [re.fullmatch(r"\s*([\d.]+) us of the backend's time a row  (.+)", line) for line in report]
    assert [m.group(2) for m in lines] == list(VARIANTS)
    assert all(float(m.group(1)) > 0 for m in lines)


def test_the_pairs_benchmark_reads_the_same_pairs_from_the_buckets_as_from_the_rows(capsys):
    from bench_pairs import main as pairs_main

    assert pairs_main(["--sizes", "sqlite:300,pg:300", "--repeat", "2", "--window-s", "600"]) == 0
    rows = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines()[2:]]
    assert [r[0].strip() for r in rows] == ["sqlite", "postgresql"]
    for r in rows:
        assert int(r[1].replace(",", "")) == 300  # every mirrored request paired (bench_pairs asserts
        assert 0 < int(r[2].replace(",", "")) < 300  # the bucket read equals the raw join's counts)
        assert float(r[3]) > 0 and float(r[4].replace(",", "")) > 0
