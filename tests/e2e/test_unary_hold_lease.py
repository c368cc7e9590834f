"""A unary call slower than its hold's TTL, over real sockets (gRPC and HTTP), with the ledger's
sweeper running:

- The hold is kept alive (ExtendHold) while the provider thinks: the call is charged exactly once
  by the money rule, the balance is exact, no hold is left open, nothing is unbilled, and the
  held tokens cannot be spent by another call meanwhile.
- When the ledger will not extend the hold (away, or answering that the hold is no longer held),
  the call is cut before its hold could expire: the provider call is abandoned, the hold is
  released (a unary call delivers nothing until it ends, so nothing was consumed) while it still
  stands, and the tokens come back exactly once.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import aiohttp
import grpc
import pytest

from shared.gen.rpcai.gateway.v1 import gateway_pb2 as gpb
from tests.conftest import LedgerHarness
from tests.e2e.conftest import Stack, bearer, mint
from tests.e2e.e2e_support import (
    Sim,
    assert_audit_ok,
    charge_for,
    fetchval,
    gateway_on,
    held_for,
    own_sim,
    purchase_for,
    rpc_error,
    usage_rows,
)
from tests.e2e.ledger_proxy import Fault, LedgerProxy
from tests.ledger_service.helpers import balance, credit

__all__ = ["own_sim"]  # fixtures used by this module

# A short hold, so a call can outlive it in a test. The gateway extends it every TTL/3 and cuts
# a call TTL/2 before it could expire; 6 s leaves each extension a full second of slack on a
# loaded machine (3 s would leave half a second).
TTL = 6
# The provider answers after 1.5 TTLs: without extensions the hold would be cut or swept.
DELAY = 9
SLOW = f"[[usage:40,60]] [[delay:{DELAY}]] take your time"
MAX_TOKENS = 100
UNBILLED_ACCOUNT = 6
TRANSPORTS = ["grpc", "http"]


def _settings(**extra: Any) -> dict[str, Any]:
    return {
        "hold_ttl_seconds": TTL,
        "stream_write_timeout_seconds": 1,
        # Each provider read may wait out the whole delay; the call's own bound (this + 5 s)
        # is then never what ends it.
        "provider_timeout_seconds": 30,
        **extra,
    }


@contextlib.asynccontextmanager
async def _sweeper(ledger: LedgerHarness) -> AsyncIterator[None]:
    """The ledger's sweeper, as it runs in production (the test fixture starts it off)."""

    async def sweep() -> None:
        while True:
            await ledger.app.ledger.sweep_expired(100)
            await asyncio.sleep(0.2)

    task = asyncio.create_task(sweep())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@dataclass(frozen=True)
class Outcome:
    """A GenerateText answer, the same from either transport."""

    failure: tuple[str, str | None] | None = None  # (status, reason) when the call failed
    tokens_charged: int = 0
    remaining_balance: int = 0
    settlement_pending: bool = False
    input_tokens: int = 0
    output_tokens: int = 0


# What a cut call answers on each transport.
CUT = {"grpc": ("DEADLINE_EXCEEDED", "CALL_TIME_LIMIT"), "http": ("504", "CALL_TIME_LIMIT")}


async def _generate(stack: Stack, transport: str, user: str, content: str) -> Outcome:
    if transport == "grpc":
        try:
            reply = await stack.stub.GenerateText(
                gpb.GenerateTextRequest(content=content, max_tokens=MAX_TOKENS),
                metadata=bearer(mint(user)),
            )
        except grpc.aio.AioRpcError as exc:
            code, reason = rpc_error(exc)
            return Outcome(failure=(code.name, reason))
        return Outcome(
            tokens_charged=reply.token_usage.tokens_charged,
            remaining_balance=reply.token_usage.remaining_balance,
            settlement_pending=reply.token_usage.settlement_pending,
            input_tokens=reply.usage.input_tokens,
            output_tokens=reply.usage.output_tokens,
        )
    port = stack.gateway.http.port
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session,
        session.post(
            f"http://127.0.0.1:{port}/v1/generate",
            json={"content": content, "maxTokens": MAX_TOKENS},
            headers={"Authorization": f"Bearer {mint(user)}"},
        ) as response,
    ):
        body: dict[str, Any] = await response.json()
    if response.status != 200:
        return Outcome(failure=(str(response.status), body["error"]["reason"]))
    usage = body["tokenUsage"]
    return Outcome(
        tokens_charged=usage["tokensCharged"],
        remaining_balance=usage["remainingBalance"],
        settlement_pending=usage["settlementPending"],
        input_tokens=body["usage"]["inputTokens"],
        output_tokens=body["usage"]["outputTokens"],
    )


@dataclass(frozen=True)
class HoldRow:
    status: str
    amount: int
    expires_at: datetime
    resolved_at: datetime | None


async def _holds(ledger: LedgerHarness, user: str) -> list[HoldRow]:
    conn = await ledger.db()
    try:
        rows = await conn.fetch(
            "SELECT status, amount, expires_at, resolved_at FROM holds WHERE user_id = $1"
            " ORDER BY created_at",
            user,
        )
    finally:
        await conn.close()
    return [HoldRow(r["status"], r["amount"], r["expires_at"], r["resolved_at"]) for r in rows]


async def _unbilled(ledger: LedgerHarness) -> int:
    total: int = await fetchval(
        ledger,
        "SELECT coalesce(sum(amount), 0) FROM journal_entries WHERE account_id = $1",
        UNBILLED_ACCOUNT,
    )
    return total


async def _start_http(stack: Stack, transport: str) -> None:
    if transport == "http":
        await stack.gateway.start_http("127.0.0.1:0")


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_unary_call_longer_than_its_hold_is_kept_alive_and_charged_once(
    ledger: LedgerHarness, own_sim: Sim, transport: str
) -> None:
    held = held_for(SLOW, MAX_TOKENS)
    async with (
        _sweeper(ledger),
        LedgerProxy(ledger.address) as proxy,
        gateway_on(ledger, own_sim.url, ledger_addr=proxy.address, **_settings()) as stack,
    ):
        await _start_http(stack, transport)
        user = f"slow-{transport}-{time.monotonic_ns()}"
        await credit(ledger.stub, user, purchase_for(held))  # exactly one hold's worth
        assert (await balance(ledger.stub, user)).available_tokens == held
        disconnects = own_sim.stats.client_disconnects
        loop = asyncio.get_running_loop()
        started = loop.time()
        call = asyncio.create_task(_generate(stack, transport, user, SLOW))

        await asyncio.sleep(TTL + 1)  # past the hold's first TTL, the provider still silent
        assert not call.done()
        [hold] = await _holds(ledger, user)
        assert (hold.status, hold.amount) == ("held", held)
        assert proxy.calls.get("ExtendHold", 0) >= 2
        # Meanwhile the held tokens cannot be spent by another call.
        probe = await _generate(stack, "grpc", user, "[[usage:1,1]] hi")
        assert probe.failure == ("FAILED_PRECONDITION", "INSUFFICIENT_BALANCE")

        outcome = await call
        elapsed = loop.time() - started

    assert outcome.failure is None, outcome
    assert elapsed >= DELAY > TTL  # the call really outlived its first TTL
    assert (outcome.input_tokens, outcome.output_tokens) == (40, 60)
    # Charged once, by the money rule: 100 used + ceil(25% of 100).
    assert outcome.tokens_charged == charge_for(100) == 125
    assert not outcome.settlement_pending
    assert outcome.remaining_balance == held - 125
    b = await balance(ledger.stub, user)
    assert (b.available_tokens, b.reserved_tokens, b.owed_tokens) == (held - 125, 0, 0)
    [hold] = await _holds(ledger, user)
    assert hold.status == "settled"  # not expired, not settled after expiry
    assert hold.resolved_at is not None
    assert hold.resolved_at < hold.expires_at
    [row] = await usage_rows(ledger, user)
    assert (row.input_tokens, row.output_tokens, row.tokens_charged) == (40, 60, 125)
    assert await _unbilled(ledger) == 0
    assert own_sim.stats.client_disconnects == disconnects  # the provider call was not abandoned
    await assert_audit_ok(ledger)


EXTEND_FAULTS = [
    # The ledger is away: the gateway keeps trying, and cuts the call a margin before the hold
    # could expire.
    grpc.StatusCode.UNAVAILABLE,
    # The ledger says the hold is no longer held: the call is cut at once.
    grpc.StatusCode.FAILED_PRECONDITION,
]


@pytest.mark.parametrize("code", EXTEND_FAULTS, ids=[c.name for c in EXTEND_FAULTS])
@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_unary_call_that_cannot_keep_its_hold_is_cut_before_it_expires(
    ledger: LedgerHarness, own_sim: Sim, transport: str, code: grpc.StatusCode
) -> None:
    purchased = 1000
    async with (
        _sweeper(ledger),
        LedgerProxy(ledger.address) as proxy,
        gateway_on(ledger, own_sim.url, ledger_addr=proxy.address, **_settings()) as stack,
    ):
        await _start_http(stack, transport)
        proxy.faults["ExtendHold"] = Fault(code)  # every extension fails, and only those
        user = f"cut-{transport}-{code.name}-{time.monotonic_ns()}"
        await credit(ledger.stub, user, purchased)  # 800 usable
        disconnects = own_sim.stats.client_disconnects
        loop = asyncio.get_running_loop()
        started = loop.time()
        outcome = await _generate(stack, transport, user, SLOW)
        elapsed = loop.time() - started
        assert outcome.failure == CUT[transport]
        assert proxy.calls.get("ExtendHold", 0) >= 1  # it tried to keep the hold first
        # Cut after the first extension was due and well before the hold's TTL ran out (the
        # gateway counts from before it asked for the hold).
        assert TTL / 3 - 0.5 <= elapsed < TTL, elapsed
        # The provider call was abandoned, not waited out.
        deadline = loop.time() + 5
        while own_sim.stats.client_disconnects == disconnects and loop.time() < deadline:
            await asyncio.sleep(0.05)
        assert own_sim.stats.client_disconnects == disconnects + 1
        [hold] = await _holds(ledger, user)
        # Released by the gateway while it still stood: not expired, not served past it.
        assert hold.status == "released"
        assert hold.resolved_at is not None
        assert hold.resolved_at < hold.expires_at
        assert proxy.calls.get("Release", 0) == 1

        # The tokens came back once: spendable again, exactly as many as were bought.
        b = await balance(ledger.stub, user)
        assert (b.available_tokens, b.reserved_tokens) == (800, 0)
        assert await usage_rows(ledger, user) == []
        proxy.faults.clear()
        quick = await _generate(stack, transport, user, "[[usage:40,60]] now quickly")
        assert quick.failure is None, quick
        assert (quick.tokens_charged, quick.remaining_balance) == (125, 800 - 125)

    b = await balance(ledger.stub, user)
    assert (b.available_tokens, b.reserved_tokens) == (800 - 125, 0)
    assert [h.status for h in await _holds(ledger, user)] == ["released", "settled"]
    [row] = await usage_rows(ledger, user)
    assert row.tokens_charged == 125
    assert await _unbilled(ledger) == 0
    await assert_audit_ok(ledger)
