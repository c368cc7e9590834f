"""Small helpers for calling the ledger in tests."""

from __future__ import annotations

import asyncio
import uuid
from typing import TYPE_CHECKING

import asyncpg
import grpc

from shared.gen.rpcai.ledger.v1 import ledger_pb2 as pb
from shared.gen.rpcai.ledger.v1 import ledger_pb2_grpc
from shared.rich_errors import error_reason
from tests.conftest import AUTH, LedgerHarness

if TYPE_CHECKING:
    Stub = ledger_pb2_grpc.LedgerServiceAsyncStub


def new_key(prefix: str = "k") -> str:
    return f"{prefix}-{uuid.uuid4()}"


async def credit(
    stub: Stub, user: str, tokens: int, key: str | None = None, external_id: str | None = None
) -> pb.CreditPurchaseResponse:
    response: pb.CreditPurchaseResponse = await stub.CreditPurchase(
        pb.CreditPurchaseRequest(
            idempotency_key=key or new_key("buy"),
            user_id=user,
            tokens_purchased=tokens,
            purchase_type=pb.PURCHASE_TYPE_ONE_TIME,
            external_id=external_id or new_key("order"),
            source="test",
        ),
        metadata=AUTH,
    )
    return response


async def reserve(
    stub: Stub, user: str, estimated: int, key: str | None = None, ttl: int = 0
) -> pb.ReserveResponse:
    response: pb.ReserveResponse = await stub.Reserve(
        pb.ReserveRequest(
            idempotency_key=key or new_key("hold"),
            user_id=user,
            estimated_tokens=estimated,
            ttl_seconds=ttl,
        ),
        metadata=AUTH,
    )
    return response


def usage(input_tokens: int, output_tokens: int) -> pb.Usage:
    return pb.Usage(
        provider="anthropic",
        model="claude-test",
        input_tokens=input_tokens,
        output_tokens=output_tokens,
    )


async def settle(
    stub: Stub, reservation_id: str, input_tokens: int, output_tokens: int
) -> pb.SettleResponse:
    response: pb.SettleResponse = await stub.Settle(
        pb.SettleRequest(reservation_id=reservation_id, usage=usage(input_tokens, output_tokens)),
        metadata=AUTH,
    )
    return response


async def release(stub: Stub, reservation_id: str) -> pb.ReleaseResponse:
    response: pb.ReleaseResponse = await stub.Release(
        pb.ReleaseRequest(reservation_id=reservation_id), metadata=AUTH
    )
    return response


async def balance(stub: Stub, user: str) -> pb.Balance:
    response: pb.GetBalanceResponse = await stub.GetBalance(
        pb.GetBalanceRequest(user_id=user), metadata=AUTH
    )
    return response.balance


def failure(exc: object) -> tuple[grpc.StatusCode, str | None]:
    assert isinstance(exc, grpc.aio.AioRpcError), exc
    return exc.code(), error_reason(exc)


async def table_counts(conn: asyncpg.Connection) -> dict[str, int]:
    counts = {}
    for table in (
        "accounts",
        "journal_transactions",
        "journal_entries",
        "holds",
        "purchases",
        "usage_records",
        "idempotency_keys",
    ):
        counts[table] = await conn.fetchval(f"SELECT count(*) FROM {table}")
    return counts


async def lock_account(ledger: LedgerHarness, user: str) -> asyncpg.Connection:
    """A connection whose open transaction holds `user`'s account row: the ledger's writes for
    that user wait until it is closed."""
    connection = await ledger.db()
    await connection.execute("BEGIN")
    await connection.execute("SELECT 1 FROM accounts WHERE user_id = $1 FOR UPDATE", user)
    return connection


async def until_a_write_waits_for_a_lock(ledger: LedgerHarness) -> None:
    connection = await ledger.db()
    try:
        for _ in range(200):
            if await connection.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
            ):
                return
            await asyncio.sleep(0.05)
    finally:
        await connection.close()
    raise AssertionError("no write reached the locked row")


async def holds_of_key(ledger: LedgerHarness, key: str) -> int:
    connection = await ledger.db()
    try:
        count: int = await connection.fetchval(
            "SELECT count(*) FROM idempotency_keys WHERE key = $1", key
        )
    finally:
        await connection.close()
    return count
