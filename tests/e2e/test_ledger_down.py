"""Ledger unreachable: subscription calls fail closed; BYOK calls are served and their usage
records arrive once the ledger is back, none lost and none doubled, across a gateway restart."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from gateway_service.app import create_app
from ledger_service.app import create_app as create_ledger
from shared.gen.rpcai.gateway.v1 import gateway_pb2 as gpb
from shared.gen.rpcai.gateway.v1 import gateway_pb2_grpc
from shared.rich_errors import error_reason
from tests.conftest import ledger_settings
from tests.e2e.conftest import Stack, gateway_settings
from tests.e2e.e2e_support import Sim, own_sim, sim_stack
from tests.ledger_service.helpers import credit

__all__ = ["own_sim", "sim_stack"]  # fixtures used by this module


async def _usage_rows(stack: Stack, user: str) -> int:
    conn = await stack.ledger.db()
    try:
        count: int = await conn.fetchval(
            "SELECT count(*) FROM usage_records WHERE user_id = $1", user
        )
        return count
    finally:
        await conn.close()


async def test_ledger_down_fails_closed_and_byok_usage_arrives_later(
    sim_stack: Stack, own_sim: Sim
) -> None:
    stack = sim_stack
    user, auth = stack.user()
    await credit(stack.ledger.stub, user, 1000)
    await stack.ledger.app.grpc.server.stop(0)  # the ledger goes away

    before = own_sim.stats.requests
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stack.stub.GenerateText(gpb.GenerateTextRequest(content="hello"), metadata=auth)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert error_reason(err.value) == "LEDGER_UNAVAILABLE"
    assert own_sim.stats.requests == before  # fail closed: no provider call went unmetered

    byok = gpb.GenerateTextRequest(content="[[usage:10,5]] hi", model="gpt-4o", api_key="sk-own")
    for _ in range(3):
        reply = await stack.stub.GenerateText(byok, metadata=auth)
        assert reply.usage_info.tokens_used == 15
    assert stack.gateway.outbox.pending == 3

    # The gateway restarts while the ledger is still down: its outbox journal survives.
    journal = stack.gateway.gateway.outbox.path
    assert journal is not None
    await stack.gateway.close(grace=0.5)
    assert journal.exists()
    settings = gateway_settings(stack.ledger.address, stack.sim_url, data_dir=journal.parent)
    second = create_app(settings)
    port = await second.start("127.0.0.1:0")
    try:
        assert second.outbox.pending == 3
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = gateway_pb2_grpc.AiGatewayStub(channel)
            await stub.GenerateText(byok, metadata=auth)
        assert second.outbox.pending == 4

        # The ledger comes back on the same address.
        revived = await create_ledger(
            ledger_settings(), stack.ledger.database_url, run_sweeper=False
        )
        await revived.start(stack.ledger.address)
        try:
            assert await second.outbox.drain(15)
            assert await _usage_rows(stack, user) == 4
            await asyncio.sleep(0.5)  # nothing else trickles in: none doubled
            assert await _usage_rows(stack, user) == 4
        finally:
            await revived.close()
    finally:
        await second.close()
    assert second.outbox.pending == 0  # everything delivered, none left for the next start
