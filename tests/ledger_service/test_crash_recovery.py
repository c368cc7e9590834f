"""SIGKILL the ledger while requests are in flight, restart it, retry with the same keys:
every operation applies exactly once and the audit passes."""

from __future__ import annotations

import asyncio
import contextlib

import grpc

from ledger_service.audit import run_audit
from shared import processes
from shared.gen.rpcai.ledger.v1 import ledger_pb2 as pb
from shared.gen.rpcai.ledger.v1 import ledger_pb2_grpc
from tests.conftest import AUTH, SERVICE_TOKEN

USERS = 20
CALLS_PER_USER = 30


async def _workload(address: str) -> None:
    """Idempotent script: a purchase, then reserve+settle calls, each with a fixed key."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = ledger_pb2_grpc.LedgerServiceStub(channel)

        async def user(i: int) -> None:
            await stub.CreditPurchase(
                pb.CreditPurchaseRequest(
                    idempotency_key=f"buy-{i}",
                    user_id=f"user-{i}",
                    tokens_purchased=1000,
                    purchase_type=pb.PURCHASE_TYPE_ONE_TIME,
                    external_id=f"order-{i}",
                    source="test",
                ),
                metadata=AUTH,
                timeout=10,
            )
            for j in range(CALLS_PER_USER):
                hold = await stub.Reserve(
                    pb.ReserveRequest(
                        idempotency_key=f"hold-{i}-{j}", user_id=f"user-{i}", estimated_tokens=16
                    ),
                    metadata=AUTH,
                    timeout=10,
                )
                await stub.Settle(
                    pb.SettleRequest(
                        reservation_id=hold.reservation_id,
                        usage=pb.Usage(provider="p", model="m", input_tokens=4, output_tokens=4),
                    ),
                    metadata=AUTH,
                    timeout=10,
                )

        await asyncio.gather(*(user(i) for i in range(USERS)))


async def test_sigkill_mid_flight_then_retry_applies_everything_once(database_url: str) -> None:
    env = {
        "DATABASE_URL": database_url,
        "LEDGER_ADDR": "127.0.0.1:0",
        "LEDGER_SERVICE_TOKEN": SERVICE_TOKEN,
        "LOG_LEVEL": "WARNING",
    }
    first = processes.start("ledger_service", env)
    try:
        work = asyncio.create_task(_workload(first.address))
        # Kill once a part of the work has landed, with the rest in flight.
        while await _count_usage(database_url) < 50 and not work.done():
            await asyncio.sleep(0.01)
        assert not work.done(), "the workload finished before the kill; make it longer"
        first.kill()
        with contextlib.suppress(grpc.aio.AioRpcError):
            await work
    finally:
        first.kill()

    conn_count_before = await _count_usage(database_url)
    assert 0 < conn_count_before < USERS * CALLS_PER_USER, "the kill should land mid-flight"

    second = processes.start("ledger_service", env)
    try:
        await _workload(second.address)  # the client retries everything, same keys
        await _workload(second.address)  # and once more, for good measure
    finally:
        assert second.stop() == 0  # SIGTERM: a graceful exit

    report = await run_audit(database_url)
    assert report.ok, report.render()
    # 16 estimated -> 20 held; 8 used -> 10 charged; once per call, exactly.
    assert report.platform_balances["usage"] == USERS * CALLS_PER_USER * 8
    assert report.platform_balances["usage_fee"] == USERS * CALLS_PER_USER * 2
    assert report.platform_balances["purchase_fee"] == USERS * 200
    assert await _count_usage(database_url) == USERS * CALLS_PER_USER


async def _count_usage(database_url: str) -> int:
    import asyncpg

    conn = await asyncpg.connect(database_url)
    try:
        count: int = await conn.fetchval("SELECT count(*) FROM usage_records")
        return count
    finally:
        await conn.close()
