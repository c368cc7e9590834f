"""The group commit's bounds come from the settings (BATCH_MAX_ITEMS, BATCH_MAX_WAIT_MS,
BATCHES_IN_FLIGHT): a ledger told to send batches of one sends batches of one, and its answers
are those of any other ledger."""

from __future__ import annotations

import asyncio

import grpc

from ledger_service.app import create_app
from shared.gen.rpcai.ledger.v1 import ledger_pb2_grpc
from tests import pg
from tests.conftest import ledger_settings
from tests.ledger_service.helpers import balance, credit, reserve


async def test_the_settings_bound_the_batches(pg_admin_url: str) -> None:
    url = pg.create_database(pg_admin_url)
    settings = ledger_settings(batch_max_items=1, batch_max_wait_ms=0, batches_in_flight=3)
    app = await create_app(settings, url, run_sweeper=False)
    port = await app.start("127.0.0.1:0")
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        batches = app.store.batches
        assert (batches.max_items, batches.max_wait, batches.max_in_flight) == (1, 0.0, 3)
        stub = ledger_pb2_grpc.LedgerServiceStub(channel)
        await credit(stub, "batch-user", 10_000)  # 8,000 usable
        before = batches.stats.batches
        holds = await asyncio.gather(*(reserve(stub, "batch-user", 100) for _ in range(20)))
        assert {h.reserved_tokens for h in holds} == {125}
        assert batches.stats.batches - before == 20  # one call per batch, however many wait
        assert batches.stats.in_flight_max <= 3
        b = await balance(stub, "batch-user")
        assert (b.available_tokens, b.reserved_tokens) == (8000 - 20 * 125, 20 * 125)
    finally:
        await channel.close()
        await app.close()
