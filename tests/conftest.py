"""Fixtures shared by every test: a real Postgres, fresh migrated databases, a real ledger
server on a real socket (port 0), and a stub that calls it with the service token."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import asyncpg
import grpc
import pytest

from ledger_service.app import LedgerApp, create_app
from shared.config import Settings
from shared.gen.rpcai.ledger.v1 import ledger_pb2_grpc
from shared.logging_setup import configure_logging
from tests import pg

SERVICE_TOKEN = "test-service-token"
AUTH = (("authorization", f"Bearer {SERVICE_TOKEN}"),)

configure_logging("WARNING")


@pytest.fixture(scope="session")
def pg_admin_url() -> Iterator[str]:
    with pg.postgres_server() as url:
        pg.create_template(url)
        yield url


@pytest.fixture
def database_url(pg_admin_url: str) -> Iterator[str]:
    url = pg.create_database(pg_admin_url)
    yield url
    pg.drop_database(pg_admin_url, url)


def ledger_settings(**overrides: object) -> Settings:
    values: dict[str, object] = {
        "ledger_service_token": SERVICE_TOKEN,
        "ledger_addr": "127.0.0.1:0",
        "db_pool_min": 2,
        "db_pool_max": 10,
    }
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


@dataclass
class LedgerHarness:
    app: LedgerApp
    address: str
    stub: ledger_pb2_grpc.LedgerServiceAsyncStub
    channel: grpc.aio.Channel
    database_url: str

    async def db(self) -> asyncpg.Connection:
        return await asyncpg.connect(self.database_url)


@contextlib.asynccontextmanager
async def running_ledger(database_url: str, settings: Settings) -> AsyncIterator[LedgerHarness]:
    app = await create_app(settings, database_url, run_sweeper=False)
    port = await app.start("127.0.0.1:0")
    address = f"127.0.0.1:{port}"
    channel = grpc.aio.insecure_channel(address)
    stub = ledger_pb2_grpc.LedgerServiceStub(channel)
    try:
        yield LedgerHarness(app, address, stub, channel, database_url)
    finally:
        await channel.close()
        await app.close()


@pytest.fixture
async def ledger(database_url: str) -> AsyncIterator[LedgerHarness]:
    async with running_ledger(database_url, ledger_settings()) as harness:
        yield harness


@pytest.fixture
async def one_batch_ledger(database_url: str) -> AsyncIterator[LedgerHarness]:
    """A ledger with one group-commit batch in flight at a time: a batch held up on a row lock
    holds every later write in its queue."""
    async with running_ledger(database_url, ledger_settings(batches_in_flight=1)) as harness:
        yield harness
