"""Rate limits through the whole stack, on real sockets, a real Redis and real gateway processes:

- two gateway processes sharing one Redis enforce one limit, not two: of 200 concurrent calls
  from one user with 50 per minute, exactly 50 are served; the rest are RESOURCE_EXHAUSTED with
  a RetryInfo that, honoured, gets a call served;
- the same in one process without Redis, over HTTP: 429, Retry-After, RateLimit-* headers;
- public callers are limited by address and by key; X-Forwarded-For counts only from a trusted
  proxy; refused provider keys are limited per address;
- a monthly quota holds under 100 concurrent calls and comes back with the next month;
- Redis going away mid-run: calls go on as configured (local limits, or refused), none hangs, and
  the shared limits come back with Redis.
"""

from __future__ import annotations

import asyncio
import json
import tempfile
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime

import aiohttp
import grpc
import pytest
import redis.asyncio as redis
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from provider_sim import start_provider_sim
from shared import processes
from shared.gen.rpcai.gateway.v1 import gateway_pb2 as gpb
from shared.gen.rpcai.gateway.v1 import gateway_pb2_grpc
from tests.conftest import SERVICE_TOKEN, LedgerHarness
from tests.e2e.conftest import AUDIENCE, ISSUER, JWT_SECRET, PLATFORM_KEY, Stack, bearer, mint
from tests.e2e.e2e_support import (
    Sim,
    assert_audit_ok,
    fetchval,
    gateway_on,
    own_sim,
    rpc_error,
    usage_rows,
)
from tests.ledger_service.helpers import balance, credit
from tests.redis_server import RedisServer, redis_server

__all__ = ["own_sim"]  # fixtures used by this module

CALL = gpb.GenerateTextRequest(content="[[usage:10,10]] hi", max_tokens=20)
HTTP_CALL = {"content": "[[usage:10,10]] hi", "maxTokens": 20}


def limits(
    public: dict[str, int] | None = None,
    subscription: dict[str, int] | None = None,
    failed_key_attempts_per_minute: int = 0,
) -> str:
    """Limits for a test: nothing limited but what it names."""
    none = {"requests_per_minute": 0, "calls_in_flight": 0}
    return json.dumps(
        {
            "public": {**none, **(public or {})},
            "byok": none,
            "subscription": {"default": {**none, **(subscription or {})}},
            "failed_key_attempts_per_minute": failed_key_attempts_per_minute,
        }
    )


@pytest.fixture(scope="module")
def shared_redis() -> Iterator[RedisServer]:
    with redis_server() as server:
        yield server


async def _edge(stack: Stack) -> str:
    port = await stack.gateway.start_http("127.0.0.1:0")
    return f"http://127.0.0.1:{port}"


def _retry_delay(exc: BaseException) -> float:
    assert isinstance(exc, grpc.aio.AioRpcError)
    status = rpc_status.from_call(exc)
    assert status is not None
    for detail in status.details:
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            return float(info.retry_delay.ToTimedelta().total_seconds())
    raise AssertionError("no RetryInfo")


def _has_quota_failure(exc: BaseException) -> bool:
    assert isinstance(exc, grpc.aio.AioRpcError)
    status = rpc_status.from_call(exc)
    return status is not None and any(
        d.Is(error_details_pb2.QuotaFailure.DESCRIPTOR) for d in status.details
    )


# ---- one limit across replicas ------------------------------------------------------------------


async def test_two_gateway_processes_sharing_redis_enforce_one_limit(
    ledger: LedgerHarness, own_sim: Sim, shared_redis: RedisServer
) -> None:
    env = {
        "LEDGER_ADDR": ledger.address,
        "LEDGER_SERVICE_TOKEN": SERVICE_TOKEN,
        "JWT_SECRET": JWT_SECRET,
        "JWT_ISSUER": ISSUER,
        "JWT_AUDIENCE": AUDIENCE,
        "ANTHROPIC_BASE_URL": own_sim.url,
        "ANTHROPIC_API_KEY": PLATFORM_KEY,
        "OPENAI_BASE_URL": f"{own_sim.url}/v1",
        "OPENAI_API_KEY": PLATFORM_KEY,
        "GATEWAY_ADDR": "127.0.0.1:0",
        "HTTP_ADDR": "127.0.0.1:0",
        "REDIS_URL": shared_redis.url,
        "RATE_LIMITS": limits(subscription={"requests_per_minute": 50}),
        "LOG_LEVEL": "WARNING",
    }
    gateways = []
    try:
        for _ in range(2):
            data_dir = tempfile.mkdtemp(prefix="rpcai-rl-")
            gateways.append(
                await asyncio.to_thread(
                    processes.start, "gateway_service", {**env, "DATA_DIR": data_dir}
                )
            )
        user = f"shared-{uuid.uuid4().hex[:8]}"
        await credit(ledger.stub, user, 10**7)
        auth = bearer(mint(user))
        channels = [grpc.aio.insecure_channel(g.address) for g in gateways]
        stubs = [gateway_pb2_grpc.AiGatewayStub(c) for c in channels]
        outcomes = await asyncio.gather(
            *(stubs[i % 2].GenerateText(CALL, metadata=auth, timeout=30) for i in range(200)),
            return_exceptions=True,
        )
        served = [o for o in outcomes if isinstance(o, gpb.GenerateTextResponse)]
        refused = [o for o in outcomes if not isinstance(o, gpb.GenerateTextResponse)]
        assert len(served) == 50  # one limit, not one per process
        assert {rpc_error(r) for r in refused} == {
            (grpc.StatusCode.RESOURCE_EXHAUSTED, "RATE_LIMITED")
        }
        assert all(_has_quota_failure(r) for r in refused)
        first = refused[0]
        assert isinstance(first, grpc.aio.AioRpcError)
        trailing = dict(first.trailing_metadata() or ())
        assert (trailing["ratelimit-limit"], trailing["ratelimit-remaining"]) == ("50", "0")
        delay = max(_retry_delay(r) for r in refused)
        assert 0 < delay <= 2
        assert len(await usage_rows(ledger, user)) == 50  # refused calls made no hold, no call
        await asyncio.sleep(delay + 0.1)
        again = await stubs[1].GenerateText(CALL, metadata=auth, timeout=10)
        assert again.token_usage.tokens_charged > 0
        for channel in channels:
            await channel.close()
    finally:
        for gateway in gateways:
            gateway.stop()
    await assert_audit_ok(ledger)


async def test_one_process_without_redis_and_its_http_headers(
    ledger: LedgerHarness, own_sim: Sim
) -> None:
    async with gateway_on(
        ledger,
        own_sim.url,
        rate_limits=limits(subscription={"requests_per_minute": 50}),
    ) as stack:
        url = await _edge(stack)
        user, _ = stack.user()
        await credit(ledger.stub, user, 10**7)
        headers = {"Authorization": f"Bearer {mint(user)}"}
        async with aiohttp.ClientSession() as session:

            async def call() -> tuple[int, dict[str, str]]:
                async with session.post(
                    f"{url}/v1/generate", json=HTTP_CALL, headers=headers
                ) as response:
                    await response.read()
                    return response.status, dict(response.headers)

            answers = await asyncio.gather(*(call() for _ in range(200)))
            ok = [h for s, h in answers if s == 200]
            limited = [h for s, h in answers if s == 429]
            assert (len(ok), len(limited)) == (50, 150)
            assert all(h["RateLimit-Limit"] == "50" for h in ok)
            assert sorted(int(h["RateLimit-Remaining"]) for h in ok)[0] == 0
            assert all(int(h["Retry-After"]) >= 1 for h in limited)
            # The refusals tell the same state: none left, full again in under a minute.
            assert all(
                (h["RateLimit-Limit"], h["RateLimit-Remaining"]) == ("50", "0") for h in limited
            )
            assert all(1 <= int(h["RateLimit-Reset"]) <= 60 for h in limited)
            wait = min(int(h["Retry-After"]) for h in limited)
            await asyncio.sleep(wait + 0.05)
            status, _ = await call()
            assert status == 200


# ---- public callers ---------------------------------------------------------------------------


async def _public_call(
    session: aiohttp.ClientSession, url: str, key: str, forwarded_for: str | None = None
) -> int:
    headers = {"X-Forwarded-For": forwarded_for} if forwarded_for else {}
    async with session.post(
        f"{url}/v1/generate", json={**HTTP_CALL, "apiKey": key, "model": "gpt-4o"}, headers=headers
    ) as response:
        await response.read()
        return response.status


async def test_public_callers_are_limited_by_address_and_by_key(
    ledger: LedgerHarness, own_sim: Sim
) -> None:
    three = limits(public={"requests_per_minute": 3})
    async with gateway_on(
        ledger, own_sim.url, rate_limits=three, trusted_proxies="127.0.0.1"
    ) as stack:
        url = await _edge(stack)
        async with aiohttp.ClientSession() as s:
            # Behind the trusted proxy (us), X-Forwarded-For names the client.
            assert [await _public_call(s, url, "sk-one", "10.0.0.1") for _ in range(4)] == [
                200, 200, 200, 429,
            ]  # fmt: skip
            # The same key from another address: the key's own limit is used up.
            assert await _public_call(s, url, "sk-one", "10.0.0.2") == 429
            # Another key from another address: free.
            assert await _public_call(s, url, "sk-two", "10.0.0.3") == 200
            # A client cannot pose as the proxy's hops: only the last untrusted one counts.
            assert await _public_call(s, url, "sk-three", "10.0.0.1, 10.0.0.9") == 200
    async with gateway_on(ledger, own_sim.url, rate_limits=three) as untrusted:
        url = await _edge(untrusted)
        async with aiohttp.ClientSession() as s:
            statuses = [await _public_call(s, url, f"sk-{n}", f"10.1.0.{n}") for n in range(4)]
            # No trusted proxy: the header is not believed, all four come from 127.0.0.1.
            assert statuses == [200, 200, 200, 429]


async def test_refused_keys_are_limited_per_address(ledger: LedgerHarness) -> None:
    runner, port = await start_provider_sim("127.0.0.1", 0, api_keys=["sk-good"])
    sim = f"http://127.0.0.1:{port}"
    try:
        async with gateway_on(
            ledger, sim, rate_limits=limits(failed_key_attempts_per_minute=2)
        ) as stack:
            url = await _edge(stack)
            async with aiohttp.ClientSession() as s:
                assert await _public_call(s, url, "sk-stolen-1") == 403
                assert await _public_call(s, url, "sk-stolen-2") == 403
                # The address has tested keys enough: even a good key waits now.
                assert await _public_call(s, url, "sk-good") == 429
    finally:
        await runner.cleanup()


# ---- monthly quotas ---------------------------------------------------------------------------


async def test_a_monthly_quota_holds_under_concurrency_and_comes_back_next_month(
    ledger: LedgerHarness, own_sim: Sim
) -> None:
    async with gateway_on(ledger, own_sim.url) as stack:
        november = datetime(2026, 11, 15, tzinfo=UTC)
        stack.gateway.gateway.quota_clock = lambda: november
        user = f"quota-{uuid.uuid4().hex[:8]}"
        await credit(ledger.stub, user, 10**7)
        quota = 3000
        auth = bearer(mint(user, quota=quota))
        outcomes = await asyncio.gather(
            *(stack.stub.GenerateText(CALL, metadata=auth) for _ in range(100)),
            return_exceptions=True,
        )
        served = [o for o in outcomes if isinstance(o, gpb.GenerateTextResponse)]
        refused = [o for o in outcomes if not isinstance(o, gpb.GenerateTextResponse)]
        assert served
        assert refused
        assert {rpc_error(r) for r in refused} == {
            (grpc.StatusCode.RESOURCE_EXHAUSTED, "MONTHLY_QUOTA_EXCEEDED")
        }
        charged = await fetchval(
            ledger,
            "SELECT charged FROM monthly_usage WHERE user_id = $1 AND month = '2026-11-01'",
            user,
        )
        assert charged <= quota
        assert charged == sum(r.token_usage.tokens_charged for r in served)
        b = await balance(ledger.stub, user)
        assert 8 * 10**6 - b.available_tokens == charged  # the balance arithmetic stays exact
        stack.gateway.gateway.quota_clock = lambda: datetime(2026, 12, 1, 0, 0, 1, tzinfo=UTC)
        december = await stack.stub.GenerateText(CALL, metadata=auth)
        assert december.token_usage.tokens_charged > 0
    await assert_audit_ok(ledger)


# ---- Redis going away ---------------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["local", "refuse"])
async def test_calls_go_on_as_configured_while_redis_is_away(
    ledger: LedgerHarness, own_sim: Sim, policy: str
) -> None:
    with redis_server() as own_redis:
        if own_redis.process is None:
            pytest.skip("stops and restarts a Redis of its own")
        async with gateway_on(
            ledger,
            own_sim.url,
            redis_url=own_redis.url,
            rate_limit_redis_failure=policy,
            rate_limits=limits(subscription={"requests_per_minute": 600}),
        ) as stack:
            user, auth = stack.user()
            await credit(ledger.stub, user, 10**7)
            assert (await stack.stub.GenerateText(CALL, metadata=auth)).text
            own_redis.stop()
            started = time.monotonic()
            outcomes = await asyncio.gather(
                *(stack.stub.GenerateText(CALL, metadata=auth, timeout=5) for _ in range(10)),
                return_exceptions=True,
            )
            assert time.monotonic() - started < 3  # nothing hangs on the missing Redis
            if policy == "local":
                assert all(isinstance(o, gpb.GenerateTextResponse) for o in outcomes)
            else:
                assert {rpc_error(o) for o in outcomes if isinstance(o, BaseException)} == {
                    (grpc.StatusCode.UNAVAILABLE, "RATE_LIMITER_UNAVAILABLE")
                }
                assert not [o for o in outcomes if isinstance(o, gpb.GenerateTextResponse)]
            own_redis.start()
            await asyncio.sleep(2.5)  # the limiter tries Redis again
            assert (await stack.stub.GenerateText(CALL, metadata=auth)).text
            keys = await _redis_keys(own_redis.url)
            assert any(k.endswith(":rpm") for k in keys)  # counted in Redis again


async def _redis_keys(url: str) -> list[str]:
    client = redis.Redis.from_url(url, decode_responses=True)
    try:
        return [str(k) async for k in client.scan_iter("rl:*")]
    finally:
        await client.aclose()


async def test_status_and_eligibility_show_the_limits_and_the_month(
    ledger: LedgerHarness, own_sim: Sim
) -> None:
    pro = limits(subscription={"requests_per_minute": 5, "calls_in_flight": 2})
    async with gateway_on(ledger, own_sim.url, rate_limits=pro) as stack:
        user = f"status-{uuid.uuid4().hex[:8]}"
        await credit(ledger.stub, user, 10**6)
        auth = bearer(mint(user, quota=1000))
        await stack.stub.GenerateText(CALL, metadata=auth)  # 25 charged
        status = await stack.stub.GetUserStatus(gpb.GetUserStatusRequest(), metadata=auth)
        assert (status.limits.requests_per_minute, status.limits.calls_in_flight) == (5, 2)
        assert status.limits.requests_remaining == 4
        assert (status.month.quota_tokens, status.month.used_tokens) == (1000, 25)
        assert status.month.resets_at.ToDatetime(UTC) > datetime.now(UTC)

        over_quota = await stack.stub.CheckRequestEligibility(
            gpb.CheckRequestEligibilityRequest(estimated_tokens=2000), metadata=auth
        )
        assert (over_quota.can_make_request, over_quota.reason) == (
            False,
            "monthly quota exceeded",
        )
        for _ in range(4):
            await stack.stub.GenerateText(CALL, metadata=auth)
        limited = await stack.stub.CheckRequestEligibility(
            gpb.CheckRequestEligibilityRequest(estimated_tokens=10), metadata=auth
        )
        assert (limited.can_make_request, limited.reason) == (False, "rate limited")


# ---- a tier's own limits ------------------------------------------------------------------------


async def test_a_tier_has_its_own_tokens_calls_in_flight_and_quota(
    ledger: LedgerHarness, own_sim: Sim
) -> None:
    none = {"requests_per_minute": 0, "calls_in_flight": 0}
    pro = {"tokens_per_minute": 1000, "calls_in_flight": 2, "monthly_quota": 400}
    config = json.dumps(
        {"public": none, "byok": none, "subscription": {"default": none, "pro": pro}}
    )
    slow = gpb.GenerateTextRequest(content="[[delay:0.5]] [[usage:10,10]] hi", max_tokens=20)
    async with gateway_on(ledger, own_sim.url, rate_limits=config) as stack:
        user = f"pro-{uuid.uuid4().hex[:8]}"
        await credit(ledger.stub, user, 10**6)
        auth = bearer(mint(user, tier="pro"))

        # Two calls in flight at most: of four at once, two are served, two refused at once.
        calls = [asyncio.ensure_future(stack.stub.GenerateText(slow, metadata=auth)) for _ in "ab"]
        await asyncio.sleep(0.2)
        status = await stack.stub.GetUserStatus(gpb.GetUserStatusRequest(), metadata=auth)
        assert status.limits.calls_in_flight_now == 2
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stack.stub.GenerateText(slow, metadata=auth)
        assert rpc_error(refused.value) == (
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "TOO_MANY_CALLS_IN_FLIGHT",
        )
        assert _has_quota_failure(refused.value)
        assert _retry_delay(refused.value) > 0
        assert all(r.text for r in await asyncio.gather(*calls))
        assert len(await usage_rows(ledger, user)) == 2  # the refused call held nothing

        # Tokens per minute are taken at the hold size and settled at what the provider
        # reported: after a 20-token call, about 980 of 1000 are left, not 1000 - hold.
        await asyncio.sleep(0.1)  # the slots and unused tokens go back in the background
        status = await stack.stub.GetUserStatus(gpb.GetUserStatusRequest(), metadata=auth)
        assert status.limits.tokens_per_minute == 1000
        assert 1000 - 2 * 20 <= status.limits.tokens_remaining < 1000
        assert status.limits.calls_in_flight_now == 0
        big = gpb.GenerateTextRequest(content="hi", max_tokens=1500)  # holds more than 1000
        with pytest.raises(grpc.aio.AioRpcError) as too_big:
            await stack.stub.GenerateText(big, metadata=auth)
        assert rpc_error(too_big.value) == (
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "TOKENS_PER_MINUTE_EXCEEDED",
        )
        assert len(await usage_rows(ledger, user)) == 2

        # The tier's monthly quota applies when the JWT names none; its quota claim wins.
        assert status.month.quota_tokens == 400
        medium = gpb.GenerateTextRequest(content="hi", max_tokens=400)  # holds over 400 more
        with pytest.raises(grpc.aio.AioRpcError) as over:
            await stack.stub.GenerateText(medium, metadata=auth)
        assert rpc_error(over.value) == (
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "MONTHLY_QUOTA_EXCEEDED",
        )
        claimed = bearer(mint(user, tier="pro", quota=10**6))
        assert (await stack.stub.GenerateText(medium, metadata=claimed)).text

        # A tier with no configuration of its own gets the default: unlimited here.
        other = bearer(mint(user, tier="enterprise-trial"))
        served = await asyncio.gather(
            *(stack.stub.GenerateText(slow, metadata=other) for _ in range(4))
        )
        assert all(r.text for r in served)
    await assert_audit_ok(ledger)
