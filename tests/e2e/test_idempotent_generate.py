"""GenerateText with an idempotency_key: a retried call is not charged twice, whether the retry
comes after the answer, at the same time as the original, or through another gateway replica."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from provider_sim import start_provider_sim
from shared.gen.rpcai.gateway.v1 import gateway_pb2 as gpb
from tests.conftest import LedgerHarness
from tests.e2e.conftest import Stack
from tests.e2e.e2e_support import (
    Sim,
    assert_audit_ok,
    fetchval,
    gateway_on,
    own_sim,
    rpc_error,
    sim_stack,
    usage_rows,
)
from tests.ledger_service.helpers import balance, credit

__all__ = ["own_sim", "sim_stack"]  # fixtures used by this module

HUNDRED_TOKENS = "[[usage:40,60]] say something"  # 100 used -> 125 charged


def keyed(key: str, content: str = HUNDRED_TOKENS) -> gpb.GenerateTextRequest:
    return gpb.GenerateTextRequest(
        content=content, model="claude-haiku-4-5", max_tokens=100, idempotency_key=key
    )


async def charged_once(ledger: LedgerHarness, user: str) -> None:
    b = await balance(ledger.stub, user)
    assert (b.available_tokens, b.reserved_tokens) == (800 - 125, 0)
    assert [r.tokens_charged for r in await usage_rows(ledger, user)] == [125]
    assert await fetchval(ledger, "SELECT count(*) FROM holds WHERE user_id = $1", user) == 1
    await assert_audit_ok(ledger)


async def test_same_key_twice_is_charged_once_and_answers_the_same(
    sim_stack: Stack, own_sim: Sim
) -> None:
    user, auth = sim_stack.user()
    await credit(sim_stack.ledger.stub, user, 1000)
    before = own_sim.stats.requests

    first = await sim_stack.stub.GenerateText(keyed("order-42"), metadata=auth)
    second = await sim_stack.stub.GenerateText(keyed("order-42"), metadata=auth)

    assert first.text
    assert (first.token_usage.tokens_charged, first.token_usage.remaining_balance) == (125, 675)
    assert second == first  # the same answer, the same charge, the same balance
    assert own_sim.stats.requests == before + 1  # the retry did not reach the provider
    await charged_once(sim_stack.ledger, user)

    # A new key is a new call.
    third = await sim_stack.stub.GenerateText(keyed("order-43"), metadata=auth)
    assert third.token_usage.remaining_balance == 550


async def test_ten_concurrent_copies_are_charged_once(sim_stack: Stack, own_sim: Sim) -> None:
    user, auth = sim_stack.user()
    await credit(sim_stack.ledger.stub, user, 1000)
    before = own_sim.stats.requests

    outcomes = await asyncio.gather(
        *(sim_stack.stub.GenerateText(keyed("burst"), metadata=auth) for _ in range(10)),
        return_exceptions=True,
    )

    answers = [o for o in outcomes if isinstance(o, gpb.GenerateTextResponse)]
    refusals = [o for o in outcomes if not isinstance(o, gpb.GenerateTextResponse)]
    assert answers, refusals
    assert all(a == answers[0] for a in answers)
    assert answers[0].token_usage.tokens_charged == 125
    # Copies that arrive while the original is in flight are told so; none is charged.
    for refusal in refusals:
        assert rpc_error(refusal) in {
            (grpc.StatusCode.ALREADY_EXISTS, "REQUEST_IN_PROGRESS"),
            (grpc.StatusCode.ALREADY_EXISTS, "DUPLICATE_REQUEST"),
        }
    assert own_sim.stats.requests == before + 1
    await charged_once(sim_stack.ledger, user)

    # Once the original has answered, a further retry gets that answer.
    again = await sim_stack.stub.GenerateText(keyed("burst"), metadata=auth)
    assert again == answers[0]
    await charged_once(sim_stack.ledger, user)


async def test_retry_through_another_replica_is_not_charged_again(
    sim_stack: Stack, own_sim: Sim
) -> None:
    user, auth = sim_stack.user()
    await credit(sim_stack.ledger.stub, user, 1000)
    first = await sim_stack.stub.GenerateText(keyed("replica"), metadata=auth)
    assert first.token_usage.tokens_charged == 125
    before = own_sim.stats.requests

    async with gateway_on(
        sim_stack.ledger, own_sim.url
    ) as replica:  # nothing shared but the ledger
        retried = await replica.stub.GenerateText(keyed("replica"), metadata=auth)
        streamed = [m async for m in replica.stub.StreamText(keyed("replica"), metadata=auth)]
    # The ledger kept the first answer with its hold: the replica answers it, word for word.
    assert retried == first
    assert "".join(m.delta for m in streamed) == first.text
    assert streamed[-1].done
    assert streamed[-1].token_usage == first.token_usage
    assert own_sim.stats.requests == before  # no second provider call
    await charged_once(sim_stack.ledger, user)


async def test_keys_belong_to_their_user(sim_stack: Stack) -> None:
    """The same key from two users is two calls: one user's key cannot replay another's answer."""
    alice, alice_auth = sim_stack.user()
    bob, bob_auth = sim_stack.user()
    await credit(sim_stack.ledger.stub, alice, 1000)
    await credit(sim_stack.ledger.stub, bob, 1000)
    a = await sim_stack.stub.GenerateText(keyed("shared-key"), metadata=alice_auth)
    b = await sim_stack.stub.GenerateText(keyed("shared-key"), metadata=bob_auth)
    assert a.token_usage.remaining_balance == b.token_usage.remaining_balance == 675
    await charged_once(sim_stack.ledger, alice)
    await charged_once(sim_stack.ledger, bob)


async def test_same_key_with_a_different_request_is_refused(sim_stack: Stack) -> None:
    user, auth = sim_stack.user()
    await credit(sim_stack.ledger.stub, user, 1000)
    await sim_stack.stub.GenerateText(
        keyed("k", "[[usage:40,60]] what is two plus two"), metadata=auth
    )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await sim_stack.stub.GenerateText(
            keyed("k", "[[usage:40,60]] write me a long poem about the sea"), metadata=auth
        )
    assert err.value.code() in (
        grpc.StatusCode.ALREADY_EXISTS,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    await charged_once(sim_stack.ledger, user)


async def test_retry_after_a_provider_outage_is_served_and_charged_once(
    ledger: LedgerHarness,
) -> None:
    # Find a free port for the provider, and leave it closed: the provider is down.
    runner, port = await start_provider_sim("127.0.0.1", 0)
    await runner.cleanup()
    url = f"http://127.0.0.1:{port}"
    async with gateway_on(ledger, url) as stack:
        user, auth = stack.user()
        await credit(ledger.stub, user, 1000)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stack.stub.GenerateText(keyed("retry-me"), metadata=auth)
        assert rpc_error(err.value) == (grpc.StatusCode.UNAVAILABLE, "PROVIDER_UNAVAILABLE")
        assert (await balance(ledger.stub, user)).available_tokens == 800

        runner, _ = await start_provider_sim("127.0.0.1", port)  # the provider is back
        try:
            reply = await stack.stub.GenerateText(keyed("retry-me"), metadata=auth)
        finally:
            await runner.cleanup()
        assert reply.token_usage.tokens_charged == 125
        assert (await balance(ledger.stub, user)).available_tokens == 675
        await assert_audit_ok(ledger)
