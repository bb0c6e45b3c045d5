"""The Alembic migrations build the schema the code declares, on Postgres and SQLite."""

import pytest
from sqlalchemy import inspect, text

from control_plane.db.engine import make_engine, migrate
from control_plane.db.schema import metadata

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
