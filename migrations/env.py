"""Alembic environment: online migrations only, serialised by an advisory lock so that several
ledger replicas starting at once do not race each other."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine, pool, text

from ledger_service.store.models import Base

MIGRATION_LOCK = 7_270_001  # pg_advisory_lock key, arbitrary but fixed

config = context.config
target_metadata = Base.metadata


def run_migrations_online() -> None:
    url = config.get_main_option("sqlalchemy.url")
    assert url, "sqlalchemy.url is set by ledger_service.store.database"
    engine = create_engine(url, poolclass=pool.NullPool)
    with engine.connect() as connection:
        connection.execute(text("SELECT pg_advisory_lock(:k)"), {"k": MIGRATION_LOCK})
        connection.commit()
        try:
            context.configure(connection=connection, target_metadata=target_metadata)
            with context.begin_transaction():
                context.run_migrations()
        finally:
            connection.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": MIGRATION_LOCK})
            connection.commit()
    engine.dispose()


run_migrations_online()
