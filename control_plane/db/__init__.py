"""The database: one schema module, Alembic migrations, an engine factory."""
