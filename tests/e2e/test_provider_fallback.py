"""Fallback chains through the whole stack (real SDKs, the provider stand-in, a real ledger): a
subscription call its provider cannot serve is served by the next pair of its chain, named in the
answer and charged once for what the fallback reported; a caller's own fault, a stream that
already delivered text, and BYOK calls are never handed on; an open breaker is passed over before
any attempt; a chain that runs out answers with its last failure, nothing charged."""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator

import grpc
import pytest

from gateway_service.app import create_app
from gateway_service.providers import PROVIDER_NAMES
from gateway_service.providers.breaker import BreakerPolicy
from gateway_service.providers.fallback import Fallbacks
from gateway_service.providers.retry import RetryPolicy
from shared.gen.rpcai.gateway.v1 import gateway_pb2 as gpb
from tests.conftest import LedgerHarness
from tests.e2e.conftest import Stack, gateway_settings
from tests.e2e.e2e_support import (
    MODELS,
    Sim,
    assert_audit_ok,
    charge_for,
    fetchval,
    gateway_on,
    held_for,
    own_sim,
    rpc_error,
    usage_rows,
    wait_no_open_holds,
)
from tests.e2e.test_provider_retries import Clock, collect, metric
from tests.ledger_service.helpers import balance, credit

__all__ = ["own_sim"]  # fixtures used by this module

Code = grpc.StatusCode
FAST = RetryPolicy(max_attempts=2, base_seconds=0.01, max_seconds=0.02)
PRIMARY = MODELS["anthropic"]
FALLBACK = "gpt-4o-mini"
HANDED = "rpcai_provider_fallbacks_total"
CHAIN = f"anthropic/{PRIMARY} > openai/{FALLBACK}; openai/* > anthropic/{PRIMARY}"


@pytest.fixture
async def chained(ledger: LedgerHarness, own_sim: Sim) -> AsyncIterator[Stack]:
    """A gateway whose chains come from its settings (PROVIDER_FALLBACKS), as in production."""
    async with gateway_on(ledger, own_sim.url, provider_fallbacks=CHAIN) as stack:
        stack.gateway.providers.use_policies(FAST, BreakerPolicy())
        yield stack


async def funded(stack: Stack) -> tuple[str, tuple[tuple[str, str]]]:
    user, auth = stack.user()
    await credit(stack.ledger.stub, user, 1000)  # 800 usable
    return user, auth


def down(model: str, what: str = "529") -> str:
    return f"[[down:{model}:{what}]] [[usage:40,60]] hello id-{uuid.uuid4().hex[:10]}"


async def served_once(stack: Stack, user: str, provider: str, model: str) -> None:
    """One usage record, for the fallback's usage, the balance down by its charge alone."""
    await wait_no_open_holds(stack.ledger)
    rows = await usage_rows(stack.ledger, user)
    assert [(r.provider, r.input_tokens, r.output_tokens, r.tokens_charged) for r in rows] == [
        (provider, 40, 60, charge_for(100))
    ]
    model_of = await fetchval(
        stack.ledger, "SELECT model FROM usage_records WHERE user_id = $1", user
    )
    assert model_of == model
    b = await balance(stack.ledger.stub, user)
    assert (b.available_tokens, b.reserved_tokens) == (800 - charge_for(100), 0)
    await assert_audit_ok(stack.ledger)


@pytest.mark.parametrize("what", ["529", "500", "429", "reset"])
async def test_unary_call_its_provider_cannot_serve_is_served_by_the_fallback(
    chained: Stack, own_sim: Sim, what: str
) -> None:
    user, auth = await funded(chained)
    before = own_sim.stats.requests
    handed = metric(HANDED, from_provider="anthropic", to_provider="openai")
    reply = await chained.stub.GenerateText(
        gpb.GenerateTextRequest(content=down(PRIMARY, what), model=PRIMARY, max_tokens=100),
        metadata=auth,
    )
    # The primary's own retries ran out first (FAST: two attempts), then one fallback call.
    assert own_sim.stats.requests == before + 3
    assert (reply.provider, reply.model) == ("openai", FALLBACK)  # the answer names who served
    assert (reply.usage.input_tokens, reply.usage.output_tokens) == (40, 60)
    assert reply.token_usage.tokens_charged == charge_for(100)
    assert metric(HANDED, from_provider="anthropic", to_provider="openai") == handed + 1
    await served_once(chained, user, "openai", FALLBACK)


async def test_stream_its_provider_cannot_open_is_served_by_the_fallback(
    chained: Stack, own_sim: Sim
) -> None:
    """`cut`: the primary sent its opening events and dropped before any text reached the
    caller, so the call may still be handed on."""
    user, auth = await funded(chained)
    messages = await collect(
        chained.stub.StreamText(
            gpb.GenerateTextRequest(content=down(PRIMARY, "cut"), model=PRIMARY, max_tokens=100),
            metadata=auth,
        )
    )
    assert len([m for m in messages if not m.done]) == 60
    done = messages[-1]
    assert (done.provider, done.model) == ("openai", FALLBACK)
    assert done.token_usage.tokens_charged == charge_for(100)
    await served_once(chained, user, "openai", FALLBACK)


async def test_a_wildcard_chain_serves_any_model_of_its_provider(
    chained: Stack, own_sim: Sim
) -> None:
    user, auth = await funded(chained)
    reply = await chained.stub.GenerateText(
        gpb.GenerateTextRequest(content=down("gpt-4.1", "503"), model="gpt-4.1", max_tokens=100),
        metadata=auth,
    )
    assert (reply.provider, reply.model) == ("anthropic", PRIMARY)
    await served_once(chained, user, "anthropic", PRIMARY)


async def test_the_callers_own_fault_is_not_handed_on(chained: Stack, own_sim: Sim) -> None:
    user, auth = await funded(chained)
    before = own_sim.stats.requests
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await chained.stub.GenerateText(
            gpb.GenerateTextRequest(content=down(PRIMARY, "400"), model=PRIMARY, max_tokens=100),
            metadata=auth,
        )
    assert rpc_error(err.value) == (Code.INVALID_ARGUMENT, "PROVIDER_REJECTED_REQUEST")
    assert own_sim.stats.requests == before + 1
    await wait_no_open_holds(chained.ledger)
    assert await usage_rows(chained.ledger, user) == []
    assert (await balance(chained.ledger.stub, user)).available_tokens == 800


async def test_a_stream_that_delivered_text_is_not_handed_on(chained: Stack, own_sim: Sim) -> None:
    user, auth = await funded(chained)
    before = own_sim.stats.requests
    received: list[gpb.StreamTextResponse] = []
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await collect(
            chained.stub.StreamText(
                gpb.GenerateTextRequest(
                    content=f"[[usage:40,60]] [[cut:3]] hello {uuid.uuid4().hex}",
                    model=PRIMARY,
                    max_tokens=100,
                ),
                metadata=auth,
            ),
            into=received,
        )
    assert err.value.code() == Code.UNAVAILABLE
    assert own_sim.stats.requests == before + 1
    await wait_no_open_holds(chained.ledger)
    rows = await usage_rows(chained.ledger, user)
    assert [(r.provider, r.output_tokens) for r in rows] == [("anthropic", 3)]


async def test_byok_calls_are_never_handed_to_another_provider(
    chained: Stack, own_sim: Sim
) -> None:
    _, auth = await funded(chained)
    before = own_sim.stats.requests
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await chained.stub.GenerateText(
            gpb.GenerateTextRequest(
                content=down(PRIMARY), model=PRIMARY, max_tokens=100, api_key="sk-ant-own-key"
            ),
            metadata=auth,
        )
    assert err.value.code() == Code.UNAVAILABLE
    assert own_sim.stats.requests == before + 2  # its own retries, on its own provider only


async def test_a_chain_that_runs_out_answers_with_its_last_failure_and_charges_nothing(
    chained: Stack, own_sim: Sim
) -> None:
    user, auth = await funded(chained)
    before = own_sim.stats.requests
    content = f"[[fail:503]] hi {uuid.uuid4().hex}"  # every model of every provider
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await chained.stub.GenerateText(
            gpb.GenerateTextRequest(content=content, model=PRIMARY, max_tokens=100),
            metadata=auth,
        )
    assert rpc_error(err.value) == (Code.UNAVAILABLE, "PROVIDER_UNAVAILABLE")
    assert own_sim.stats.requests == before + 4  # two attempts on each
    await wait_no_open_holds(chained.ledger)
    assert await usage_rows(chained.ledger, user) == []
    b = await balance(chained.ledger.stub, user)
    assert (b.available_tokens, b.reserved_tokens) == (800, 0)


async def test_an_open_breaker_is_passed_over_before_any_attempt(
    ledger: LedgerHarness, own_sim: Sim
) -> None:
    clock = Clock()
    policy = BreakerPolicy(failure_rate=0.5, min_calls=2, window_seconds=30, open_seconds=20)
    async with gateway_on(ledger, own_sim.url) as stack:
        stack.gateway.providers.use_policies(RetryPolicy(max_attempts=1), policy, clock=clock)
        user, auth = await funded(stack)
        for _ in range(policy.min_calls):  # no chain yet: the primary's breaker opens
            with pytest.raises(grpc.aio.AioRpcError):
                await stack.stub.GenerateText(
                    gpb.GenerateTextRequest(
                        content="[[fail:529]] x", model=PRIMARY, max_tokens=100
                    ),
                    metadata=auth,
                )
        assert stack.gateway.providers.breakers()["anthropic"] == "open"
        stack.gateway.providers.fallbacks = Fallbacks.parse(CHAIN, PROVIDER_NAMES)
        before = own_sim.stats.requests
        healthy = gpb.GenerateTextRequest(
            content="[[usage:40,60]] hello", model=PRIMARY, max_tokens=100
        )
        reply = await stack.stub.GenerateText(healthy, metadata=auth)
        assert (reply.provider, reply.model) == ("openai", FALLBACK)
        messages = await collect(stack.stub.StreamText(healthy, metadata=auth))
        assert (messages[-1].provider, messages[-1].model) == ("openai", FALLBACK)
        assert own_sim.stats.requests == before + 2  # the open primary was never asked
        await wait_no_open_holds(ledger)
        rows = await usage_rows(ledger, user)
        assert [r.provider for r in rows] == ["openai", "openai"]


async def test_one_hold_for_the_whole_chain(chained: Stack, own_sim: Sim) -> None:
    """The hold is made once, before anyone is asked, and covers what the fallback used (the
    worst a byte-level tokenizer can report is within it)."""
    user, auth = await funded(chained)
    content = down(PRIMARY) + " [[tokenizer:bytes]]"
    reply = await chained.stub.GenerateText(
        gpb.GenerateTextRequest(content=content, model=PRIMARY, max_tokens=50), metadata=auth
    )
    assert reply.provider == "openai"
    held = await fetchval(chained.ledger, "SELECT amount FROM holds WHERE user_id = $1", user)
    assert held == held_for(content, 50)
    await wait_no_open_holds(chained.ledger)
    [row] = await usage_rows(chained.ledger, user)
    assert row.tokens_charged <= held


def test_bad_chains_are_refused_at_start_up() -> None:
    with pytest.raises(SystemExit, match="PROVIDER_FALLBACKS"):
        create_app(gateway_settings("127.0.0.1:1", "http://127.0.0.1:1", provider_fallbacks="x"))


async def test_a_refused_platform_key_is_handed_on_and_reported(
    chained: Stack, own_sim: Sim, caplog: pytest.LogCaptureFixture
) -> None:
    """Our own key refused (401) is not the caller's fault: the fallback serves, and the
    operator is told at ERROR, as when there is no fallback."""
    user, auth = await funded(chained)
    before = own_sim.stats.requests
    with caplog.at_level(logging.ERROR, logger="gateway_service.core"):
        reply = await chained.stub.GenerateText(
            gpb.GenerateTextRequest(content=down(PRIMARY, "401"), model=PRIMARY, max_tokens=100),
            metadata=auth,
        )
    assert own_sim.stats.requests == before + 2  # a refused key is not retried
    assert (reply.provider, reply.model) == ("openai", FALLBACK)
    assert "provider anthropic refused the platform key" in caplog.text
    await served_once(chained, user, "openai", FALLBACK)
