"""Helpers for the end-to-end failure, auth, idempotency and concurrency tests: a provider_sim
of their own (so they can read its request counters), a gateway built on demand with any
settings, and the ledger facts the tests check (open holds, usage rows, audit)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import asyncpg
import grpc
import pytest

from gateway_service.app import create_app
from ledger_service.audit import run_audit
from provider_sim import start_provider_sim
from provider_sim.common import STATS, SimStats
from shared.gen.rpcai.gateway.v1 import gateway_pb2_grpc
from shared.rich_errors import error_info
from tests.conftest import LedgerHarness
from tests.e2e.conftest import Stack, gateway_settings

MODELS = {"anthropic": "claude-haiku-4-5", "openai": "gpt-4o"}


@dataclass
class Sim:
    url: str
    stats: SimStats


@pytest.fixture(scope="module")
async def own_sim() -> AsyncIterator[Sim]:
    """A provider_sim for this module alone: its counters see only this module's calls."""
    runner, port = await start_provider_sim("127.0.0.1", 0)
    try:
        yield Sim(f"http://127.0.0.1:{port}", runner.app[STATS])
    finally:
        await runner.cleanup()


@asynccontextmanager
async def gateway_on(ledger: LedgerHarness, sim_url: str, **overrides: Any) -> AsyncIterator[Stack]:
    """A gateway on a real socket in front of `ledger` (or `ledger_addr`, a proxy of it) and
    the sim at `sim_url`."""
    address = overrides.pop("ledger_addr", ledger.address)
    app = create_app(gateway_settings(address, sim_url, **overrides))
    port = await app.start("127.0.0.1:0")
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield Stack(ledger, app, gateway_pb2_grpc.AiGatewayStub(channel), channel, sim_url)
    finally:
        await channel.close()
        await app.close()


@pytest.fixture
async def sim_stack(ledger: LedgerHarness, own_sim: Sim) -> AsyncIterator[Stack]:
    async with gateway_on(ledger, own_sim.url) as stack:
        yield stack


def rpc_error(exc: BaseException) -> tuple[grpc.StatusCode, str | None]:
    assert isinstance(exc, grpc.aio.AioRpcError), repr(exc)
    info = error_info(exc)
    return exc.code(), info.reason if info else None


async def fetchval(ledger: LedgerHarness, sql: str, *args: Any) -> Any:
    conn: asyncpg.Connection = await ledger.db()
    try:
        return await conn.fetchval(sql, *args)
    finally:
        await conn.close()


async def open_holds(ledger: LedgerHarness) -> int:
    count: int = await fetchval(ledger, "SELECT count(*) FROM holds WHERE status = 'held'")
    return count


async def wait_no_open_holds(ledger: LedgerHarness, within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while (left := await open_holds(ledger)) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert left == 0, f"{left} hold(s) still open after {within}s"


@dataclass(frozen=True)
class UsageRow:
    input_tokens: int
    output_tokens: int
    tokens_charged: int
    user_type: str
    provider: str


async def usage_rows(ledger: LedgerHarness, user: str | None = None) -> list[UsageRow]:
    conn: asyncpg.Connection = await ledger.db()
    try:
        sql = (
            "SELECT input_tokens, output_tokens, tokens_charged, user_type, provider"
            " FROM usage_records"
        )
        rows = await (
            conn.fetch(sql + " WHERE user_id = $1 ORDER BY created_at", user)
            if user is not None
            else conn.fetch(sql + " ORDER BY created_at")
        )
    finally:
        await conn.close()
    return [UsageRow(*row) for row in rows]


async def assert_audit_ok(ledger: LedgerHarness) -> None:
    report = await run_audit(ledger.database_url)
    assert report.ok, report.render()


def charge_for(used: int) -> int:
    """The money rule: U provider tokens cost U + ceil(U * 25 / 100)."""
    return used + -(-used * 25 // 100)


def held_for(content: str, max_tokens: int, system_prompt: str = "") -> int:
    """What the gateway reserves: every token the call could use (a token per UTF-8 byte of
    what is sent, 16 framing tokens plus 16 per message, and max_tokens), plus the fee."""
    messages = 2 if system_prompt else 1
    sent = len(content.encode()) + len(system_prompt.encode())
    return charge_for(sent + 16 + 16 * messages + max_tokens)


def purchase_for(available: int) -> int:
    """The purchase that leaves exactly `available` tokens usable (80% of it, floor)."""
    tokens = -(-available * 100 // 80)
    assert tokens * 80 // 100 == available, f"no purchase credits exactly {available}"
    return tokens


def padded(prefix: str, chars: int) -> str:
    """`prefix` padded with spaces and letters to exactly `chars` characters."""
    assert len(prefix) <= chars
    return (prefix + " " + "x" * chars)[:chars]
