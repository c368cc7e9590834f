"""100 concurrent GenerateText calls from one user whose balance covers exactly 30 of them:
exactly 30 are answered, 70 refused with INSUFFICIENT_BALANCE before reaching a provider, the
balance never goes below zero at any moment, and the ledger audit is clean. (The provider
reports the most the call could use, so each settle takes its whole hold and no released
excess lets a later call of the burst in.)"""

from __future__ import annotations

import asyncio

import asyncpg
import grpc

from shared.gen.rpcai.gateway.v1 import gateway_pb2 as gpb
from tests.e2e.conftest import Stack
from tests.e2e.e2e_support import (
    MODELS,
    Sim,
    assert_audit_ok,
    charge_for,
    fetchval,
    held_for,
    own_sim,
    padded,
    purchase_for,
    rpc_error,
    sim_stack,
    usage_rows,
)
from tests.ledger_service.helpers import balance, credit

__all__ = ["own_sim", "sim_stack"]  # fixtures used by this module

CALLS = 100
AFFORDABLE = 30
MAX_TOKENS = 60
# 80 bytes: the gateway bounds the input at 80 + 32 framing = 112 tokens, plus 60 output = 172,
# and holds 172 + ceil(172 / 4) = 215. The provider reports exactly 112 + 60 used, so each
# settle charges 215: the whole hold, no more, no less.
CONTENT = padded("[[usage:112,60]] count to sixty", 80)
HELD = held_for(CONTENT, MAX_TOKENS)
PURCHASE = purchase_for(AFFORDABLE * HELD)  # the user is credited 80% of a purchase


def test_the_arithmetic_is_exact() -> None:
    assert len(CONTENT.encode()) == 80
    assert HELD == 215
    assert charge_for(112 + MAX_TOKENS) == HELD
    assert PURCHASE * 80 // 100 == AFFORDABLE * HELD == 6450


async def watch_balance(url: str, user: str, done: asyncio.Event) -> list[tuple[int, int]]:
    """Samples the user's cached balance row until `done`, as fast as the database answers."""
    samples: list[tuple[int, int]] = []
    conn = await asyncpg.connect(url)
    try:
        while not done.is_set():
            row = await conn.fetchrow(
                "SELECT available, reserved FROM accounts WHERE user_id = $1", user
            )
            samples.append((row["available"], row["reserved"]))
            await asyncio.sleep(0.002)
    finally:
        await conn.close()
    return samples


async def test_hundred_concurrent_calls_thirty_affordable(sim_stack: Stack, own_sim: Sim) -> None:
    user, auth = sim_stack.user()
    await credit(sim_stack.ledger.stub, user, PURCHASE)
    assert (await balance(sim_stack.ledger.stub, user)).available_tokens == AFFORDABLE * HELD
    before = own_sim.stats.requests

    done = asyncio.Event()
    watcher = asyncio.create_task(watch_balance(sim_stack.ledger.database_url, user, done))
    await asyncio.sleep(0.05)  # the watcher is sampling before the burst starts
    requests = [
        gpb.GenerateTextRequest(
            content=CONTENT, model=list(MODELS.values())[i % 2], max_tokens=MAX_TOKENS
        )
        for i in range(CALLS)
    ]
    outcomes = await asyncio.gather(
        *(sim_stack.stub.GenerateText(r, metadata=auth) for r in requests),
        return_exceptions=True,
    )
    done.set()
    samples = await watcher

    answered = [o for o in outcomes if isinstance(o, gpb.GenerateTextResponse)]
    refused = [o for o in outcomes if not isinstance(o, gpb.GenerateTextResponse)]
    assert len(answered) == AFFORDABLE
    assert len(refused) == CALLS - AFFORDABLE
    for error in refused:
        assert rpc_error(error) == (grpc.StatusCode.FAILED_PRECONDITION, "INSUFFICIENT_BALANCE")
    for reply in answered:
        assert (reply.usage.input_tokens, reply.usage.output_tokens) == (112, MAX_TOKENS)
        assert reply.token_usage.tokens_charged == HELD
        assert reply.token_usage.remaining_balance >= 0
    assert own_sim.stats.requests == before + AFFORDABLE  # refused calls reached no provider

    # Never below zero, at any sampled moment, and the money always adds up to the purchase.
    assert len(samples) > 5
    assert all(available >= 0 and reserved >= 0 for available, reserved in samples), samples
    assert all(available + reserved <= AFFORDABLE * HELD for available, reserved in samples)
    assert min(available for available, _ in samples) == 0

    b = await balance(sim_stack.ledger.stub, user)
    assert (b.available_tokens, b.reserved_tokens) == (0, 0)
    rows = await usage_rows(sim_stack.ledger, user)
    assert [r.tokens_charged for r in rows] == [HELD] * AFFORDABLE
    assert await fetchval(sim_stack.ledger, "SELECT count(*) FROM holds WHERE status = 'held'") == 0
    assert (
        await fetchval(sim_stack.ledger, "SELECT count(*) FROM holds WHERE status = 'settled'")
        == AFFORDABLE
    )
    await assert_audit_ok(sim_stack.ledger)

    status = await sim_stack.stub.CheckRequestEligibility(
        gpb.CheckRequestEligibilityRequest(estimated_tokens=1), metadata=auth
    )
    assert not status.can_make_request
