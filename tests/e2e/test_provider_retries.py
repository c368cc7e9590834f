"""Provider calls that survive a bad minute, through the whole stack on real sockets with the
real SDKs: transient failures are retried before anything reached the caller and the call is
charged once; what must not be retried is not; `retry-after` is honoured within the call's
deadline; a provider that keeps failing trips its breaker (fast 503 with Retry-After, no
provider call, no hold), which half-opens after its cool-down and closes on a success."""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import AsyncIterable, AsyncIterator

import aiohttp
import grpc
import pytest
from prometheus_client import REGISTRY

from gateway_service.providers.breaker import BreakerPolicy
from gateway_service.providers.retry import RetryPolicy
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
    open_holds,
    own_sim,
    rpc_error,
    usage_rows,
    wait_no_open_holds,
)
from tests.ledger_service.helpers import balance, credit

__all__ = ["own_sim"]  # fixtures used by this module

PROVIDERS = list(MODELS)
Code = grpc.StatusCode
# Short waits so the tests do not sleep through real backoff; the rules are the same.
FAST = RetryPolicy(max_attempts=3, base_seconds=0.01, max_seconds=0.05)


class Clock:
    """The breakers' time, moved by the test."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def fast_stack(ledger: LedgerHarness, own_sim: Sim) -> AsyncIterator[Stack]:
    async with gateway_on(ledger, own_sim.url) as stack:
        stack.gateway.providers.use_policies(FAST, BreakerPolicy())
        yield stack


async def funded(stack: Stack, tokens: int = 1000) -> tuple[str, tuple[tuple[str, str]]]:
    user, auth = stack.user()
    await credit(stack.ledger.stub, user, tokens)  # 800 usable
    return user, auth


def tagged(text: str) -> str:
    """A prompt of its own: `fail_times` counts attempts per user text."""
    return f"{text} id-{uuid.uuid4().hex[:10]}"


async def collect(
    call: AsyncIterable[gpb.StreamTextResponse], into: list[gpb.StreamTextResponse] | None = None
) -> list[gpb.StreamTextResponse]:
    """Every message of a stream; `into` keeps those that arrived if the stream then fails."""
    messages = [] if into is None else into
    async for message in call:
        messages.append(message)
    return messages


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def charged_once(ledger: LedgerHarness, user: str, used: int) -> None:
    """One usage record for `used` tokens, the balance down by its charge alone, no hold."""
    await wait_no_open_holds(ledger)
    rows = await usage_rows(ledger, user)
    assert [(r.input_tokens + r.output_tokens, r.tokens_charged) for r in rows] == [
        (used, charge_for(used))
    ]
    b = await balance(ledger.stub, user)
    assert (b.available_tokens, b.reserved_tokens) == (800 - charge_for(used), 0)
    await assert_audit_ok(ledger)


# ---- transient failures are retried, charged once -------------------------------------------


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("failure", ["529", "500", "503", "reset"])
async def test_transient_failures_then_success_are_served_and_charged_once(
    fast_stack: Stack, own_sim: Sim, provider: str, failure: str
) -> None:
    user, auth = await funded(fast_stack)
    before = own_sim.stats.requests
    reply = await fast_stack.stub.GenerateText(
        gpb.GenerateTextRequest(
            content=tagged(f"[[usage:40,60]] [[fail_times:{failure}:2]] hello"),
            model=MODELS[provider],
            max_tokens=100,
        ),
        metadata=auth,
    )
    assert own_sim.stats.requests == before + 3  # two failures, then the answer
    assert (reply.usage.input_tokens, reply.usage.output_tokens) == (40, 60)
    assert reply.token_usage.tokens_charged == charge_for(100)
    # One hold for the whole call, made before the first attempt.
    assert (
        await fetchval(fast_stack.ledger, "SELECT count(*) FROM holds WHERE user_id = $1", user)
        == 1
    )
    await charged_once(fast_stack.ledger, user, 100)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("failure", ["529", "reset", "cut"])
async def test_stream_failing_before_its_first_delta_is_retried_and_charged_once(
    fast_stack: Stack, own_sim: Sim, provider: str, failure: str
) -> None:
    """`cut`: the provider answered 200 and sent its opening events, then dropped the
    connection before any text. The attempt is retried; what it had consumed is the
    platform's loss, counted, never charged."""
    user, auth = await funded(fast_stack)
    lost_before = metric("rpcai_provider_retry_lost_tokens_total", provider=provider)
    before = own_sim.stats.requests
    messages = await collect(
        fast_stack.stub.StreamText(
            gpb.GenerateTextRequest(
                content=tagged(f"[[usage:40,60]] [[fail_times:{failure}:2]] hello"),
                model=MODELS[provider],
                max_tokens=100,
            ),
            metadata=auth,
        )
    )
    assert own_sim.stats.requests == before + 3
    deltas = [m.delta for m in messages if not m.done]
    assert len(deltas) == 60
    await charged_once(fast_stack.ledger, user, 100)
    lost = metric("rpcai_provider_retry_lost_tokens_total", provider=provider) - lost_before
    if failure == "cut":
        assert lost > 0  # the failed attempts had been sent the prompt
    else:
        assert lost == 0


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_stream_cut_after_its_first_delta_is_not_retried(
    fast_stack: Stack, own_sim: Sim, provider: str
) -> None:
    user, auth = await funded(fast_stack)
    before = own_sim.stats.requests
    received: list[gpb.StreamTextResponse] = []
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await collect(
            fast_stack.stub.StreamText(
                gpb.GenerateTextRequest(
                    content=tagged("[[usage:40,60]] [[cut:3]] hello"),
                    model=MODELS[provider],
                    max_tokens=100,
                ),
                metadata=auth,
            ),
            into=received,
        )
    assert err.value.code() == Code.UNAVAILABLE
    assert own_sim.stats.requests == before + 1  # text had reached the caller: no retry
    assert len([m for m in received if not m.done]) == 3
    await wait_no_open_holds(fast_stack.ledger)
    rows = await usage_rows(fast_stack.ledger, user)
    assert len(rows) == 1
    assert rows[0].output_tokens == 3
    b = await balance(fast_stack.ledger.stub, user)
    assert (b.available_tokens, b.reserved_tokens) == (800 - rows[0].tokens_charged, 0)
    await assert_audit_ok(fast_stack.ledger)


# ---- what is never retried ------------------------------------------------------------------


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_caller_errors_and_refused_keys_are_not_retried(
    fast_stack: Stack, own_sim: Sim, provider: str
) -> None:
    user, auth = await funded(fast_stack)
    cases = {
        400: (Code.INVALID_ARGUMENT, "PROVIDER_REJECTED_REQUEST"),
        401: (Code.UNAVAILABLE, "PROVIDER_UNAVAILABLE"),  # the platform's key: our fault
        403: (Code.UNAVAILABLE, "PROVIDER_UNAVAILABLE"),
        404: (Code.INVALID_ARGUMENT, "PROVIDER_REJECTED_REQUEST"),
    }
    for status, expected in cases.items():
        before = own_sim.stats.requests
        request = gpb.GenerateTextRequest(
            content=tagged(f"[[fail:{status}]] hello"), model=MODELS[provider], max_tokens=100
        )
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await fast_stack.stub.GenerateText(request, metadata=auth)
        assert rpc_error(err.value) == expected, status
        with pytest.raises(grpc.aio.AioRpcError):
            await collect(fast_stack.stub.StreamText(request, metadata=auth))
        assert own_sim.stats.requests == before + 2, status  # one attempt each
    # BYOK: the caller's own key refused is not retried either.
    before = own_sim.stats.requests
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await fast_stack.stub.GenerateText(
            gpb.GenerateTextRequest(
                content=tagged("[[fail:401]] hello"), model=MODELS[provider], api_key="sk-byok"
            )
        )
    assert rpc_error(err.value) == (Code.PERMISSION_DENIED, "PROVIDER_KEY_REFUSED")
    assert own_sim.stats.requests == before + 1
    await wait_no_open_holds(fast_stack.ledger)
    assert await usage_rows(fast_stack.ledger, user) == []


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_byok_calls_retry_on_their_own_key(
    fast_stack: Stack, own_sim: Sim, provider: str
) -> None:
    before = own_sim.stats.requests
    reply = await fast_stack.stub.GenerateText(
        gpb.GenerateTextRequest(
            content=tagged("[[usage:40,60]] [[fail_times:529:1]] hello"),
            model=MODELS[provider],
            api_key="sk-byok",
        )
    )
    assert own_sim.stats.requests == before + 2
    assert reply.usage_info.tokens_used == 100


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_retries_stop_after_the_last_attempt(
    fast_stack: Stack, own_sim: Sim, provider: str
) -> None:
    user, auth = await funded(fast_stack)
    before = own_sim.stats.requests
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await fast_stack.stub.GenerateText(
            gpb.GenerateTextRequest(
                content=tagged("[[fail:529]] hello"), model=MODELS[provider], max_tokens=100
            ),
            metadata=auth,
        )
    assert rpc_error(err.value) == (Code.UNAVAILABLE, "PROVIDER_UNAVAILABLE")
    assert own_sim.stats.requests == before + FAST.max_attempts
    await wait_no_open_holds(fast_stack.ledger)
    assert await usage_rows(fast_stack.ledger, user) == []
    b = await balance(fast_stack.ledger.stub, user)
    assert (b.available_tokens, b.reserved_tokens) == (800, 0)


# ---- retry-after and the call's deadline ----------------------------------------------------


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_retry_after_is_honoured_within_the_deadline(
    fast_stack: Stack, own_sim: Sim, provider: str
) -> None:
    user, auth = await funded(fast_stack)
    before = own_sim.stats.requests
    started = time.monotonic()
    reply = await fast_stack.stub.GenerateText(
        gpb.GenerateTextRequest(
            content=tagged("[[usage:40,60]] [[fail_times:503:1]] [[retry_after:0.6]] hello"),
            model=MODELS[provider],
            max_tokens=100,
        ),
        metadata=auth,
    )
    waited = time.monotonic() - started
    assert own_sim.stats.requests == before + 2
    assert waited >= 0.6  # the provider's wait, not the (much shorter) backoff
    assert reply.token_usage.tokens_charged == charge_for(100)

    # A wait past the call's deadline (PROVIDER_TIMEOUT_SECONDS 5, +5 s) is not taken: the
    # failure is the answer at once, with the provider's wait for the caller.
    before = own_sim.stats.requests
    started = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await fast_stack.stub.GenerateText(
            gpb.GenerateTextRequest(
                content=tagged("[[fail:503]] [[retry_after:30]] hello"),
                model=MODELS[provider],
                max_tokens=100,
            ),
            metadata=auth,
        )
    assert time.monotonic() - started < 3
    assert rpc_error(err.value) == (Code.UNAVAILABLE, "PROVIDER_UNAVAILABLE")
    info = error_info(err.value)
    assert info is not None
    assert info.metadata["retry_after_seconds"] == "30"
    assert own_sim.stats.requests == before + 1
    await charged_once(fast_stack.ledger, user, 100)


# ---- the circuit breaker --------------------------------------------------------------------


async def scrape(session: aiohttp.ClientSession, url: str, name: str, provider: str) -> float:
    async with session.get(f"{url}/metrics") as response:
        text = await response.text()
    for line in text.splitlines():
        if line.startswith(f'{name}{{provider="{provider}"}}'):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} for {provider} not on /metrics")


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_breaker_opens_fails_fast_then_half_opens_and_closes(
    ledger: LedgerHarness, own_sim: Sim, provider: str
) -> None:
    clock = Clock()
    policy = BreakerPolicy(failure_rate=0.5, min_calls=4, window_seconds=30, open_seconds=20)
    other = next(p for p in PROVIDERS if p != provider)
    async with gateway_on(ledger, own_sim.url) as stack:
        stack.gateway.providers.use_policies(RetryPolicy(max_attempts=1), policy, clock=clock)
        url = f"http://127.0.0.1:{await stack.gateway.start_http('127.0.0.1:0')}"
        user, auth = await funded(stack)
        failing = gpb.GenerateTextRequest(
            content="[[fail:529]] hello", model=MODELS[provider], max_tokens=100
        )
        for _ in range(policy.min_calls):
            with pytest.raises(grpc.aio.AioRpcError):
                await stack.stub.GenerateText(failing, metadata=auth)
        await wait_no_open_holds(ledger)
        holds = await fetchval(ledger, "SELECT count(*) FROM holds WHERE user_id = $1", user)

        # Open: a fast refusal, no provider call, no hold.
        clock.now += 5
        before = own_sim.stats.requests
        healthy = gpb.GenerateTextRequest(
            content="[[usage:40,60]] hello", model=MODELS[provider], max_tokens=100
        )
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stack.stub.GenerateText(healthy, metadata=auth)
        assert rpc_error(err.value) == (Code.UNAVAILABLE, "PROVIDER_UNAVAILABLE")
        info = error_info(err.value)
        assert info is not None
        assert info.metadata["retry_after_seconds"] == "15"
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await collect(stack.stub.StreamText(healthy, metadata=auth))
        assert rpc_error(err.value) == (Code.UNAVAILABLE, "PROVIDER_UNAVAILABLE")
        assert own_sim.stats.requests == before
        assert (
            await fetchval(ledger, "SELECT count(*) FROM holds WHERE user_id = $1", user) == holds
        )
        async with aiohttp.ClientSession() as session:
            async with session.post(
                f"{url}/v1/generate",
                json={"content": "hello", "model": MODELS[provider]},
                headers={"Authorization": auth[0][1]},
            ) as refused:
                assert refused.status == 503
                assert refused.headers["Retry-After"] == "15"
                assert (await refused.json())["error"]["reason"] == "PROVIDER_UNAVAILABLE"
            # Still ready (a provider outage must not empty the load balancer), and it says why.
            async with session.get(f"{url}/readyz") as ready:
                assert ready.status == 200
                assert await ready.json() == {"status": "ready", "providers": {provider: "open"}}
            state = "rpcai_provider_breaker_state"
            assert await scrape(session, url, state, provider) == 2
            assert await scrape(session, url, state, other) == 0
        # The other provider is not affected.
        await stack.stub.GenerateText(
            gpb.GenerateTextRequest(content="hello", model=MODELS[other], max_tokens=100),
            metadata=auth,
        )

        # After the cool-down: half-open; a probe's success closes it.
        clock.now += 15
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{url}/readyz") as ready:
                assert await ready.json() == {
                    "status": "ready",
                    "providers": {provider: "half_open"},
                }
            assert await scrape(session, url, "rpcai_provider_breaker_state", provider) == 1
        reply = await stack.stub.GenerateText(healthy, metadata=auth)
        assert reply.usage.output_tokens == 60
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{url}/readyz") as ready:
                assert await ready.json() == {"status": "ready"}
            assert await scrape(session, url, "rpcai_provider_breaker_state", provider) == 0
        await stack.stub.GenerateText(healthy, metadata=auth)
        await wait_no_open_holds(ledger)
        assert await open_holds(ledger) == 0
        await assert_audit_ok(ledger)


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_failed_probe_opens_the_breaker_again(
    ledger: LedgerHarness, own_sim: Sim, provider: str
) -> None:
    clock = Clock()
    policy = BreakerPolicy(failure_rate=0.5, min_calls=2, window_seconds=30, open_seconds=10)
    async with gateway_on(ledger, own_sim.url) as stack:
        stack.gateway.providers.use_policies(RetryPolicy(max_attempts=1), policy, clock=clock)
        _, auth = await funded(stack)
        failing = gpb.GenerateTextRequest(
            content="[[fail:500]] hello", model=MODELS[provider], max_tokens=100
        )
        for _ in range(2):
            with pytest.raises(grpc.aio.AioRpcError):
                await stack.stub.GenerateText(failing, metadata=auth)
        clock.now += 10
        before = own_sim.stats.requests
        with pytest.raises(grpc.aio.AioRpcError):
            await stack.stub.GenerateText(failing, metadata=auth)  # the probe, failing
        assert own_sim.stats.requests == before + 1
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stack.stub.GenerateText(failing, metadata=auth)
        info = error_info(err.value)
        assert info is not None
        assert math.isclose(float(info.metadata["retry_after_seconds"]), 10)
        assert own_sim.stats.requests == before + 1  # open again: not called


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_byok_failures_never_open_the_platforms_breaker(
    ledger: LedgerHarness, own_sim: Sim, provider: str
) -> None:
    """A caller's own key being rate-limited or broken says nothing of the provider: however
    many of its calls fail, subscription calls still reach the provider."""
    policy = BreakerPolicy(failure_rate=0.5, min_calls=2, window_seconds=30, open_seconds=20)
    async with gateway_on(ledger, own_sim.url) as stack:
        stack.gateway.providers.use_policies(RetryPolicy(max_attempts=1), policy, clock=Clock())
        _, auth = await funded(stack)
        byok = gpb.GenerateTextRequest(
            content="[[fail:429]] hello",
            model=MODELS[provider],
            max_tokens=100,
            api_key="sk-caller-own-key",
        )
        for _ in range(3 * policy.min_calls):
            with pytest.raises(grpc.aio.AioRpcError):
                await stack.stub.GenerateText(byok)  # a public caller, no token
        assert stack.gateway.providers.breakers()[provider] == "closed"
        healthy = gpb.GenerateTextRequest(
            content="[[usage:40,60]] hello", model=MODELS[provider], max_tokens=100
        )
        reply = await stack.stub.GenerateText(healthy, metadata=auth)
        assert reply.token_usage.tokens_charged == 125
