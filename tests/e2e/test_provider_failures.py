"""Provider failures through the whole stack, for both providers: each maps to a clear gRPC
status, leaves no hold behind and charges only what was consumed (nothing, unless a stream had
already produced output); an insufficient balance refuses the call before any provider call."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable

import grpc
import pytest

from shared.gen.rpcai.gateway.v1 import gateway_pb2 as gpb
from shared.rich_errors import error_info
from tests.conftest import LedgerHarness
from tests.e2e.conftest import Stack
from tests.e2e.e2e_support import (
    MODELS,
    Sim,
    assert_audit_ok,
    charge_for,
    fetchval,
    gateway_on,
    held_for,
    open_holds,
    own_sim,
    purchase_for,
    rpc_error,
    sim_stack,
    usage_rows,
    wait_no_open_holds,
)
from tests.ledger_service.helpers import balance, credit

__all__ = ["own_sim", "sim_stack"]  # fixtures used by this module

PROVIDERS = list(MODELS)
Code = grpc.StatusCode


async def funded(stack: Stack, tokens: int = 1000) -> tuple[str, tuple[tuple[str, str]]]:
    user, auth = stack.user()
    await credit(stack.ledger.stub, user, tokens)
    return user, auth


async def collect(
    call: AsyncIterable[gpb.StreamTextResponse], into: list[gpb.StreamTextResponse] | None = None
) -> list[gpb.StreamTextResponse]:
    """Every message of a stream; `into` keeps those that arrived if the stream then fails."""
    messages = [] if into is None else into
    async for message in call:
        messages.append(message)
    return messages


async def nothing_charged(ledger: LedgerHarness, user: str, available: int = 800) -> None:
    b = await balance(ledger.stub, user)
    assert (b.available_tokens, b.reserved_tokens) == (available, 0)
    assert await open_holds(ledger) == 0
    assert await usage_rows(ledger, user) == []
    await assert_audit_ok(ledger)


# ---- HTTP errors and malformed bodies -------------------------------------------------------

FAILURES = {
    "http-500": ("[[fail:500]]", Code.UNAVAILABLE, "PROVIDER_UNAVAILABLE"),
    "http-429": ("[[fail:429]]", Code.RESOURCE_EXHAUSTED, "PROVIDER_RATE_LIMITED"),
    "malformed": ("[[malformed]]", Code.UNAVAILABLE, "PROVIDER_MALFORMED_RESPONSE"),
}
# Provider requests each failure costs: a 500 or 429 is retried up to PROVIDER_MAX_ATTEMPTS (3,
# tests/e2e/test_provider_retries.py), a malformed answer never.
ATTEMPTS = {"http-500": 3, "http-429": 3, "malformed": 1}


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("failure", list(FAILURES))
async def test_provider_error_is_mapped_and_releases_the_hold(
    sim_stack: Stack, own_sim: Sim, provider: str, failure: str
) -> None:
    directive, code, reason = FAILURES[failure]
    user, auth = await funded(sim_stack)
    request = gpb.GenerateTextRequest(
        content=f"[[usage:40,60]] {directive} hello", model=MODELS[provider], max_tokens=100
    )
    before = own_sim.stats.requests
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await sim_stack.stub.GenerateText(request, metadata=auth)
    assert rpc_error(err.value) == (code, reason)
    if failure == "http-429":
        info = error_info(err.value)
        assert info is not None
        assert info.metadata["retry_after_seconds"] == "1"  # the provider's retry-after
    assert own_sim.stats.requests == before + ATTEMPTS[failure]
    # The call did reserve, and the hold was released, not left to expire.
    assert await fetchval(sim_stack.ledger, "SELECT count(*) FROM holds") == 1
    assert (
        await fetchval(sim_stack.ledger, "SELECT status FROM holds WHERE user_id = $1", user)
        == "released"
    )
    await nothing_charged(sim_stack.ledger, user)

    if failure == "malformed":
        return  # a 200 stream that breaks is consumption: see test_malformed_stream_*
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await collect(sim_stack.stub.StreamText(request, metadata=auth))
    assert rpc_error(err.value) == (code, reason)
    await nothing_charged(sim_stack.ledger, user)


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_malformed_stream_leaves_no_hold_and_charges_at_most_the_hold(
    sim_stack: Stack, provider: str
) -> None:
    user, auth = await funded(sim_stack)
    content = "[[usage:40,60]] [[malformed]] hello"
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await collect(
            sim_stack.stub.StreamText(
                gpb.GenerateTextRequest(content=content, model=MODELS[provider], max_tokens=100),
                metadata=auth,
            )
        )
    assert rpc_error(err.value) == (Code.UNAVAILABLE, "PROVIDER_MALFORMED_RESPONSE")
    await wait_no_open_holds(sim_stack.ledger)
    rows = await usage_rows(sim_stack.ledger, user)
    # The provider accepted the request (HTTP 200) but no text came: at most the prompt is
    # charged, never an output token.
    assert all(r.output_tokens == 0 for r in rows)
    charged = sum(r.tokens_charged for r in rows)
    assert charged <= held_for(content, 100)
    b = await balance(sim_stack.ledger.stub, user)
    assert (b.available_tokens, b.reserved_tokens) == (800 - charged, 0)
    await assert_audit_ok(sim_stack.ledger)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("directive", ["[[malformed]]", "[[cut:0]]"])
async def test_stream_failing_before_any_text_charges_nothing(
    sim_stack: Stack, provider: str, directive: str
) -> None:
    user, auth = await funded(sim_stack)
    received: list[gpb.StreamTextResponse] = []
    request = gpb.GenerateTextRequest(
        content=f"[[usage:40,60]] {directive} hello", model=MODELS[provider], max_tokens=100
    )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await collect(sim_stack.stub.StreamText(request, metadata=auth), into=received)
    assert err.value.code() == Code.UNAVAILABLE
    assert received == []  # the caller got nothing
    await wait_no_open_holds(sim_stack.ledger)
    await nothing_charged(sim_stack.ledger, user)


# ---- timeouts -------------------------------------------------------------------------------


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_provider_timeout_is_deadline_exceeded_and_releases(
    ledger: LedgerHarness, own_sim: Sim, provider: str
) -> None:
    async with gateway_on(ledger, own_sim.url, provider_timeout_seconds=1) as stack:
        user, auth = await funded(stack)
        request = gpb.GenerateTextRequest(
            content="[[usage:40,60]] [[delay:3]] hello", model=MODELS[provider], max_tokens=100
        )
        disconnects = own_sim.stats.client_disconnects
        unary, streamed = await asyncio.gather(
            stack.stub.GenerateText(request, metadata=auth),
            collect(stack.stub.StreamText(request, metadata=auth)),
            return_exceptions=True,
        )
        for outcome in (unary, streamed):
            assert isinstance(outcome, BaseException), "served despite the provider's delay"
            assert rpc_error(outcome) == (Code.DEADLINE_EXCEEDED, "PROVIDER_TIMEOUT")
        await nothing_charged(ledger, user)
        # The gateway hung up on the provider: the sim saw both calls go away.
        for _ in range(60):
            if own_sim.stats.client_disconnects >= disconnects + 2:
                break
            await asyncio.sleep(0.05)
        assert own_sim.stats.client_disconnects >= disconnects + 2


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_client_deadline_on_a_slow_call_releases_the_hold(
    sim_stack: Stack, provider: str
) -> None:
    """The caller gives up (its own deadline) while the provider is still thinking: nothing is
    charged and the hold does not wait for its TTL."""
    user, auth = await funded(sim_stack)
    request = gpb.GenerateTextRequest(
        content="[[usage:40,60]] [[delay:2]] hello", model=MODELS[provider], max_tokens=100
    )
    unary, streamed = await asyncio.gather(
        sim_stack.stub.GenerateText(request, metadata=auth, timeout=0.5),
        collect(sim_stack.stub.StreamText(request, metadata=auth, timeout=0.5)),
        return_exceptions=True,
    )
    for outcome in (unary, streamed):
        assert isinstance(outcome, grpc.aio.AioRpcError), outcome
        assert outcome.code() == Code.DEADLINE_EXCEEDED
    await wait_no_open_holds(sim_stack.ledger, within=3)
    await nothing_charged(sim_stack.ledger, user)


# ---- streams that end early -----------------------------------------------------------------


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_stream_cut_midway_charges_what_was_consumed(
    sim_stack: Stack, own_sim: Sim, provider: str
) -> None:
    user, auth = await funded(sim_stack)
    content = "[[usage:40,60]] [[cut:5]] tell me a story"
    cut_before = own_sim.stats.streams_cut
    received: list[gpb.StreamTextResponse] = []
    request = gpb.GenerateTextRequest(content=content, model=MODELS[provider], max_tokens=100)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await collect(sim_stack.stub.StreamText(request, metadata=auth), into=received)
    assert err.value.code() == Code.UNAVAILABLE, err.value
    # No final message: a cut stream has no usage to report.
    assert not any(message.done for message in received)
    assert own_sim.stats.streams_cut == cut_before + 1
    assert len(received) == 5

    await wait_no_open_holds(sim_stack.ledger)
    [row] = await usage_rows(sim_stack.ledger, user)
    assert row.user_type == "subscription"
    assert row.output_tokens == 5  # the five deltas the provider sent, no more
    # Anthropic reported the prompt in message_start; OpenAI only reports at the end, so the
    # gateway estimates it from the prompt's characters.
    expected_input = 40 if provider == "anthropic" else -(-len(content) // 4)
    assert row.input_tokens == expected_input
    assert row.tokens_charged == charge_for(row.input_tokens + row.output_tokens)
    assert 0 < row.tokens_charged <= held_for(content, 100)
    b = await balance(sim_stack.ledger.stub, user)
    assert (b.available_tokens, b.reserved_tokens) == (800 - row.tokens_charged, 0)
    await assert_audit_ok(sim_stack.ledger)


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_client_cancel_midstream_stops_provider_and_charges_what_was_consumed(
    sim_stack: Stack, own_sim: Sim, provider: str
) -> None:
    user, auth = await funded(sim_stack)
    words = 400
    content = f"[[usage:40,{words}]] [[pace:0.05]] a long story please"
    completed = own_sim.stats.streams_completed
    disconnects = own_sim.stats.client_disconnects
    call = sim_stack.stub.StreamText(
        gpb.GenerateTextRequest(content=content, model=MODELS[provider], max_tokens=words),
        metadata=auth,
    )
    for _ in range(3):
        message = await call.read()
        assert isinstance(message, gpb.StreamTextResponse)
        assert message.delta
    assert call.cancel()

    await wait_no_open_holds(sim_stack.ledger, within=5)
    [row] = await usage_rows(sim_stack.ledger, user)
    assert 3 <= row.output_tokens < words  # what was consumed, not the whole reply
    assert row.input_tokens > 0
    assert row.tokens_charged == charge_for(row.input_tokens + row.output_tokens)
    assert row.tokens_charged < held_for(content, words)
    b = await balance(sim_stack.ledger.stub, user)
    assert (b.available_tokens, b.reserved_tokens) == (800 - row.tokens_charged, 0)
    # The provider stream was stopped, not left running to its end.
    for _ in range(60):
        if own_sim.stats.client_disconnects > disconnects:
            break
        await asyncio.sleep(0.05)
    assert own_sim.stats.client_disconnects > disconnects
    assert own_sim.stats.streams_completed == completed
    await assert_audit_ok(sim_stack.ledger)


# ---- not enough tokens ----------------------------------------------------------------------


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_insufficient_balance_refused_before_any_provider_call(
    sim_stack: Stack, own_sim: Sim, provider: str
) -> None:
    content = "[[usage:10,20]] " + "x" * 24  # 40 bytes: at most 40 + 32 input tokens
    held = held_for(content, 54)
    assert held == charge_for(40 + 32 + 54) == 158
    poor, poor_auth = await funded(sim_stack, purchase_for(held))  # exactly one hold available
    never_bought, never_auth = sim_stack.user()
    before = own_sim.stats.requests
    for auth in (poor_auth, never_auth):
        request = gpb.GenerateTextRequest(content=content, model=MODELS[provider], max_tokens=55)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await sim_stack.stub.GenerateText(request, metadata=auth)
        assert rpc_error(err.value) == (Code.FAILED_PRECONDITION, "INSUFFICIENT_BALANCE")
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await collect(sim_stack.stub.StreamText(request, metadata=auth))
        assert rpc_error(err.value) == (Code.FAILED_PRECONDITION, "INSUFFICIENT_BALANCE")
    assert own_sim.stats.requests == before, "the provider was called without the tokens"
    assert await fetchval(sim_stack.ledger, "SELECT count(*) FROM holds") == 0
    await nothing_charged(sim_stack.ledger, poor, available=held)
    assert (await balance(sim_stack.ledger.stub, never_bought)).available_tokens == 0

    # The boundary: a hold of exactly the balance is allowed.
    reply = await sim_stack.stub.GenerateText(
        gpb.GenerateTextRequest(content=content, model=MODELS[provider], max_tokens=54),
        metadata=poor_auth,
    )
    assert reply.token_usage.tokens_charged == charge_for(30)
    assert reply.token_usage.remaining_balance == held - charge_for(30)
    assert own_sim.stats.requests == before + 1
    await assert_audit_ok(sim_stack.ledger)
