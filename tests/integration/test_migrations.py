"""The Alembic migrations build the schema the code declares, on Postgres and SQLite."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pytest
from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, inspect, text

from control_plane.db.engine import alembic_config, make_engine, migrate
from control_plane.db.schema import metadata
from tests.conftest import fresh_database

pytestmark = pytest.mark.integration


def _tables_and_columns(engine):
    insp = inspect(engine)
    return {
        t: {c["name"] for c in insp.get_columns(t)} for t in insp.get_table_names() if t != "alembic_version"
    }


def test_postgres_schema_matches_declared_tables(pg_url):
    engine = make_engine(pg_url)
    with engine.connect() as conn:  # a partitioned table's partitions are its storage, not more tables
        partitions = set(conn.execute(text("SELECT relname FROM pg_class WHERE relispartition")).scalars())
    assert partitions, "predictions is partitioned by time on Postgres"
    got = {name: columns for name, columns in _tables_and_columns(engine).items() if name not in partitions}
    want = {t.name: {c.name for c in t.columns} for t in metadata.sorted_tables}
    assert got == want
    engine.dispose()


def test_sqlite_migration_is_idempotent(tmp_path):
    url = f"sqlite:///{tmp_path / 'x.db'}"
    migrate(url)
    migrate(url)
    engine = make_engine(url)
    assert set(_tables_and_columns(engine)) == {t.name for t in metadata.sorted_tables}
    engine.dispose()


@dataclass(frozen=True)
class Database:
    dialect: str  # sqlite or postgresql
    url: str


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request, tmp_path) -> Iterator[Database]:
    """An empty SQLite file or a fresh Postgres database (migrated), for a revision's way up and back."""
    if request.param == "sqlite":
        yield Database("sqlite", f"sqlite:///{tmp_path / 'x.db'}")
    else:
        with fresh_database() as url:
            yield Database("postgresql", url)


@contextmanager
def _engine(url: str) -> Iterator[Engine]:
    engine = make_engine(url)
    try:
        yield engine
    finally:
        engine.dispose()


@contextmanager
def _below(url: str, revision: str) -> Iterator[Config]:
    """The schema at head, downgraded to `revision` for the body, back at head after it."""
    cfg = alembic_config(url)
    command.upgrade(cfg, "head")
    command.downgrade(cfg, revision)
    yield cfg
    command.upgrade(cfg, "head")


def _keyed_as_declared(engine: Engine, table: str) -> None:
    """`table`'s columns and primary key in the database are the ones the schema declares."""
    insp = inspect(engine)
    declared = metadata.tables[table]
    assert {c["name"] for c in insp.get_columns(table)} == {c.name for c in declared.columns}
    assert set(insp.get_pk_constraint(table)["constrained_columns"]) == {c.name for c in declared.primary_key}


def _pair_key_index(engine) -> list[dict]:
    return [i for i in inspect(engine).get_indexes("predictions") if i["name"] == "ix_predictions_pair_key"]


def test_0006_adds_the_pair_key_and_its_partial_index_and_goes_back(database):
    """Revision 0006 on both databases: the nullable column, the index on it (partial: rows without a key
    are not in it), a row written before it reads back with no key, and the downgrade removes both."""
    with _below(database.url, "0005") as cfg:
        with _engine(database.url) as engine:
            with engine.begin() as conn:
                conn.execute(
                    text(
                        "INSERT INTO predictions (request_id, ts, model_version, role, route, endpoint, "
                        "latency_ms, status) VALUES ('old', 1700000000.5, 1, 'baseline', 'weighted', 'predict', "
                        "1.0, 200)"
                    )
                )
            command.upgrade(cfg, "0006")
            (index,) = _pair_key_index(engine)
            assert index["column_names"] == ["pair_key"]
            where = index.get("dialect_options", {}).get(f"{database.dialect}_where")
            assert where is not None and "pair_key IS NOT NULL" in str(where)
            with engine.connect() as conn:
                key = conn.execute(text("SELECT pair_key FROM predictions WHERE request_id = 'old'")).scalar()
            assert key is None
            command.downgrade(cfg, "0005")
        with _engine(database.url) as engine:
            assert not _pair_key_index(engine)
            assert "pair_key" not in {c["name"] for c in inspect(engine).get_columns("predictions")}


PAIR_TABLES = {"pair_buckets", "pair_label_buckets", "pair_watermarks"}


def test_0007_adds_the_pair_buckets_and_goes_back(database):
    """Revision 0007 on both databases: the three tables of the paired sums, keyed as declared, and the
    downgrade removes them and nothing else."""
    with _below(database.url, "0006") as cfg:
        with _engine(database.url) as engine:
            before = set(inspect(engine).get_table_names())
        assert not PAIR_TABLES & before
        command.upgrade(cfg, "0007")
        with _engine(database.url) as engine:
            assert set(inspect(engine).get_table_names()) >= PAIR_TABLES
            for table in PAIR_TABLES:
                _keyed_as_declared(engine, table)
            command.downgrade(cfg, "0006")
        with _engine(database.url) as engine:
            assert set(inspect(engine).get_table_names()) == before


def test_0008_adds_the_user_ranking_sums_and_goes_back(database):
    """Revision 0008 on both databases: user_labels' three ranking columns (a row written before reads
    back with no exposure) and the user_clicks table keyed as declared; the downgrade removes them."""
    added = {"ranked", "mrr_sum", "ndcg_sum"}

    def without_them(engine: Engine) -> None:
        insp = inspect(engine)
        assert "user_clicks" not in insp.get_table_names()
        assert not added & {c["name"] for c in insp.get_columns("user_labels")}

    with _below(database.url, "0007") as cfg:
        with _engine(database.url) as engine:
            without_them(engine)
            with engine.begin() as conn:
                conn.execute(
                    text(
                        "INSERT INTO user_labels (window_s, bucket_start, user_key, model_version, role, route, "
                        "closed, correct) VALUES (60, 900, 'u', 1, 'baseline', 'weighted', 5, 4)"
                    )
                )
        command.upgrade(cfg, "0008")
        with _engine(database.url) as engine:
            _keyed_as_declared(engine, "user_clicks")
            with engine.connect() as conn:
                old = conn.execute(
                    text("SELECT closed, correct, ranked, mrr_sum, ndcg_sum FROM user_labels")
                ).one()
            assert tuple(old) == (5, 4, 0, 0.0, 0.0)
            command.downgrade(cfg, "0007")
        with _engine(database.url) as engine:
            without_them(engine)
            with engine.connect() as conn:
                assert conn.execute(text("SELECT closed FROM user_labels")).scalar() == 5
