"""What a refused caller is told, and what a refusal leaves behind, on real sockets (a real
ledger on Postgres, the provider stand-in over HTTP, a real Redis where the limits are shared):

- over gRPC, a TOKENS_PER_MINUTE_EXCEEDED and a MONTHLY_QUOTA_EXCEEDED refusal carry a
  google.rpc QuotaFailure and a RetryInfo (a monthly quota's: until the month resets), as a
  RATE_LIMITED one does;
- over HTTP, a monthly-quota refusal is 429 with Retry-After (until the month resets) and the
  caller's RateLimit-* headers;
- with QUOTA_TIMEZONE set to a zone other than UTC, the quota's month starts at that zone's
  midnight (the gateway's quota clock sets the moment the ledger counts at);
- a refused call reaches no provider and leaves no hold: the stand-in's request counter and the
  ledger's holds table (not only its usage rows) say so.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, date, datetime, timedelta
from typing import Any

import aiohttp
import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from ledger_service.app import create_app as create_ledger_app
from shared.gen.rpcai.gateway.v1 import gateway_pb2 as gpb
from shared.gen.rpcai.ledger.v1 import ledger_pb2_grpc
from shared.rich_errors import error_info
from tests.conftest import LedgerHarness, ledger_settings
from tests.e2e.conftest import Stack, bearer, mint
from tests.e2e.e2e_support import (
    Sim,
    assert_audit_ok,
    fetchval,
    gateway_on,
    own_sim,
    rpc_error,
    usage_rows,
)
from tests.ledger_service.helpers import credit
from tests.redis_server import RedisServer, redis_server

__all__ = ["own_sim"]  # fixtures used by this module

NONE = {"requests_per_minute": 0, "calls_in_flight": 0}
# A 20-token call: it holds 88 tokens (70 and the fee) and is charged 25.
CALL = gpb.GenerateTextRequest(content="[[usage:10,10]] hi", max_tokens=20)
HELD, CHARGED = 88, 25
HTTP_CALL = {"content": "[[usage:10,10]] hi", "maxTokens": 20}
# Room for one such call's hold, and not for a second one after it is charged.
QUOTA = 100


def limits(subscription: dict[str, int]) -> str:
    """Nothing limited but the subscription callers' `subscription`."""
    return json.dumps(
        {
            "public": NONE,
            "byok": NONE,
            "subscription": {"default": {**NONE, **subscription}},
            "failed_key_attempts_per_minute": 0,
        }
    )


@pytest.fixture(scope="module")
def shared_redis() -> Iterator[RedisServer]:
    with redis_server() as server:
        yield server


@pytest.fixture
async def tokyo_ledger(database_url: str) -> AsyncIterator[LedgerHarness]:
    """A ledger counting monthly quotas in Asia/Tokyo (UTC+9, no daylight saving)."""
    app = await create_ledger_app(
        ledger_settings(quota_timezone="Asia/Tokyo"), database_url, run_sweeper=False
    )
    port = await app.start("127.0.0.1:0")
    address = f"127.0.0.1:{port}"
    channel = grpc.aio.insecure_channel(address)
    try:
        yield LedgerHarness(
            app, address, ledger_pb2_grpc.LedgerServiceStub(channel), channel, database_url
        )
    finally:
        await channel.close()
        await app.close()


# ---- what a refusal says -----------------------------------------------------------------------


def _status_details(exc: BaseException) -> list[Any]:
    assert isinstance(exc, grpc.aio.AioRpcError), repr(exc)
    status = rpc_status.from_call(exc)
    assert status is not None, "no google.rpc.Status in the trailers"
    return list(status.details)


def quota_failure(exc: BaseException) -> error_details_pb2.QuotaFailure:
    for detail in _status_details(exc):
        if detail.Is(error_details_pb2.QuotaFailure.DESCRIPTOR):
            failure = error_details_pb2.QuotaFailure()
            detail.Unpack(failure)
            return failure
    raise AssertionError("no QuotaFailure")


def retry_delay(exc: BaseException) -> float:
    for detail in _status_details(exc):
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            return float(info.retry_delay.ToTimedelta().total_seconds())
    raise AssertionError("no RetryInfo")


def info_metadata(exc: BaseException) -> dict[str, str]:
    assert isinstance(exc, grpc.aio.AioRpcError)
    info = error_info(exc)
    assert info is not None
    return dict(info.metadata)


def assert_quota_failure(exc: BaseException, reason: str) -> None:
    assert rpc_error(exc) == (grpc.StatusCode.RESOURCE_EXHAUSTED, reason)
    violations = quota_failure(exc).violations
    assert len(violations) == 1
    assert violations[0].subject == "caller"
    assert violations[0].description.startswith(f"{reason}: ")


def next_month_start(now: datetime) -> datetime:
    first = date(now.year + now.month // 12, now.month % 12 + 1, 1)
    return datetime(first.year, first.month, first.day, tzinfo=UTC)


# ---- what a refusal leaves behind ----------------------------------------------------------------


async def holds_of(ledger: LedgerHarness, user: str) -> int:
    """Every hold the user ever had, whatever became of it."""
    count: int = await fetchval(ledger, "SELECT count(*) FROM holds WHERE user_id = $1", user)
    return count


async def wait_for_provider_requests(sim: Sim, count: int, within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while sim.stats.requests < count:
        assert time.monotonic() < deadline, f"the provider saw {sim.stats.requests} of {count}"
        await asyncio.sleep(0.02)


async def subscriber(stack: Stack, quota: int | None = None) -> tuple[str, tuple[tuple[str, str]]]:
    user = f"detail-{uuid.uuid4().hex[:8]}"
    await credit(stack.ledger.stub, user, 10**6)
    token = mint(user) if quota is None else mint(user, quota=quota)
    return user, bearer(token)


# ---- gRPC: tokens per minute ---------------------------------------------------------------------


async def test_tokens_per_minute_refusals_carry_quota_failure_and_retry_info(
    ledger: LedgerHarness, own_sim: Sim, shared_redis: RedisServer
) -> None:
    async with gateway_on(
        ledger,
        own_sim.url,
        redis_url=shared_redis.url,
        rate_limits=limits({"tokens_per_minute": 1000}),
    ) as stack:
        user, auth = await subscriber(stack)
        before = own_sim.stats.requests

        # A call whose hold alone is more than a minute's tokens: it can never fit, ask again in
        # a minute.
        too_big = gpb.GenerateTextRequest(content="hi", max_tokens=1500)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stack.stub.GenerateText(too_big, metadata=auth)
        assert_quota_failure(refused.value, "TOKENS_PER_MINUTE_EXCEEDED")
        assert retry_delay(refused.value) == 60
        assert info_metadata(refused.value)["retry_after_seconds"] == "60"

        # A call that fits alone but not beside one in flight: retry once enough of the
        # minute's tokens are back (each 60 ms at 1000 per minute), well under a minute.
        slow = gpb.GenerateTextRequest(content="[[delay:2]] [[usage:10,10]] hi", max_tokens=500)
        first = asyncio.ensure_future(stack.stub.GenerateText(slow, metadata=auth, timeout=30))
        await wait_for_provider_requests(own_sim, before + 1)
        with pytest.raises(grpc.aio.AioRpcError) as beside:
            await stack.stub.GenerateText(slow, metadata=auth)
        assert_quota_failure(beside.value, "TOKENS_PER_MINUTE_EXCEEDED")
        delay = retry_delay(beside.value)
        assert 0 < delay < 60
        assert info_metadata(beside.value)["retry_after_seconds"] == str(math.ceil(delay))
        assert (await first).token_usage.tokens_charged == CHARGED

        # Of three calls, the one served reached the provider and held; the refused ones
        # neither.
        assert own_sim.stats.requests == before + 1
        assert await holds_of(ledger, user) == 1
        assert len(await usage_rows(ledger, user)) == 1
    await assert_audit_ok(ledger)


# ---- gRPC and HTTP: the monthly quota ------------------------------------------------------------


async def test_monthly_quota_refusals_over_grpc_carry_quota_failure_and_retry_info(
    ledger: LedgerHarness, own_sim: Sim
) -> None:
    # The real clock: the retry delay is counted to the real month's end.
    async with gateway_on(
        ledger, own_sim.url, rate_limits=limits({"requests_per_minute": 50})
    ) as stack:
        user, auth = await subscriber(stack, quota=QUOTA)
        before = own_sim.stats.requests
        call = stack.stub.GenerateText(CALL, metadata=auth)
        served = await call
        assert served.token_usage.tokens_charged == CHARGED
        # A served unary call carries the caller's rate state too, in its trailers.
        answered = dict(await call.trailing_metadata() or ())
        assert (answered["ratelimit-limit"], answered["ratelimit-remaining"]) == ("50", "49")
        assert 0 < int(answered["ratelimit-reset"]) <= 60

        started = datetime.now(UTC)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stack.stub.GenerateText(CALL, metadata=auth)
        ended = datetime.now(UTC)
        assert_quota_failure(refused.value, "MONTHLY_QUOTA_EXCEEDED")
        metadata = info_metadata(refused.value)
        assert (metadata["quota"], metadata["used"], metadata["required"]) == (
            str(QUOTA),
            str(CHARGED),
            str(HELD),
        )
        resets_at = datetime.fromisoformat(metadata["resets_at"])
        assert resets_at in {next_month_start(started), next_month_start(ended)}
        # Retry when the month resets, not in a second or a minute.
        delay = retry_delay(refused.value)
        assert (resets_at - ended).total_seconds() - 1 <= delay
        assert delay <= (resets_at - started).total_seconds() + 1
        assert metadata["retry_after_seconds"] == str(math.ceil(delay))
        # The caller's requests-per-minute state, as trailing metadata: two of 50 taken.
        trailing = dict(refused.value.trailing_metadata() or ())
        assert (trailing["ratelimit-limit"], trailing["ratelimit-remaining"]) == ("50", "48")

        assert own_sim.stats.requests == before + 1
        assert await holds_of(ledger, user) == 1
        assert len(await usage_rows(ledger, user)) == 1
        month = await fetchval(
            ledger,
            "SELECT charged + held FROM monthly_usage WHERE user_id = $1",
            user,
        )
        assert month == CHARGED
    await assert_audit_ok(ledger)


async def test_a_monthly_quota_refusal_over_http_is_429_with_retry_after_and_rate_headers(
    ledger: LedgerHarness, own_sim: Sim
) -> None:
    async with gateway_on(
        ledger, own_sim.url, rate_limits=limits({"requests_per_minute": 50})
    ) as stack:
        port = await stack.gateway.start_http("127.0.0.1:0")
        user, _ = await subscriber(stack)
        headers = {"Authorization": f"Bearer {mint(user, quota=QUOTA)}"}
        before = own_sim.stats.requests
        async with aiohttp.ClientSession() as session:
            url = f"http://127.0.0.1:{port}/v1/generate"
            async with session.post(url, json=HTTP_CALL, headers=headers) as ok:
                assert ok.status == 200, await ok.text()
                assert (ok.headers["RateLimit-Limit"], ok.headers["RateLimit-Remaining"]) == (
                    "50",
                    "49",
                )
            started = datetime.now(UTC)
            async with session.post(url, json=HTTP_CALL, headers=headers) as over:
                body = await over.json()
                ended = datetime.now(UTC)
                assert over.status == 429
                assert body["error"]["reason"] == "MONTHLY_QUOTA_EXCEEDED"
                # Until the month resets.
                wait = int(over.headers["Retry-After"])
                assert (next_month_start(ended) - ended).total_seconds() - 1 <= wait
                assert wait <= (next_month_start(started) - started).total_seconds() + 2
                # The caller's requests-per-minute state: two of 50 taken.
                assert over.headers["RateLimit-Limit"] == "50"
                assert over.headers["RateLimit-Remaining"] == "48"
                assert 1 <= int(over.headers["RateLimit-Reset"]) <= 60
        assert own_sim.stats.requests == before + 1
        assert await holds_of(ledger, user) == 1
    await assert_audit_ok(ledger)


# ---- a quota month in another time zone ----------------------------------------------------------


async def test_a_monthly_quota_resets_at_the_quota_time_zones_month_start(
    tokyo_ledger: LedgerHarness, own_sim: Sim
) -> None:
    ledger = tokyo_ledger
    async with gateway_on(ledger, own_sim.url) as stack:
        user, auth = await subscriber(stack, quota=QUOTA)
        before = own_sim.stats.requests
        # 23:59 on 30 November in Tokyo (14:59 UTC): November there.
        tokyo_november = datetime(2026, 11, 30, 14, 59, tzinfo=UTC)
        stack.gateway.gateway.quota_clock = lambda: tokyo_november
        assert (await stack.stub.GenerateText(CALL, metadata=auth)).token_usage.tokens_charged
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stack.stub.GenerateText(CALL, metadata=auth)
        assert_quota_failure(refused.value, "MONTHLY_QUOTA_EXCEEDED")
        # Tokyo's December begins at 15:00 UTC, nine hours before UTC's.
        resets_at = datetime.fromisoformat(info_metadata(refused.value)["resets_at"])
        assert resets_at == datetime(2026, 11, 30, 15, 0, tzinfo=UTC)

        # 00:00:01 on 1 December in Tokyo, still 30 November in UTC: a new month, served.
        stack.gateway.gateway.quota_clock = lambda: resets_at + timedelta(seconds=1)
        december = await stack.stub.GenerateText(CALL, metadata=auth)
        assert december.token_usage.tokens_charged == CHARGED
        rows = await _months(ledger, user)
        assert rows == {date(2026, 11, 1): (CHARGED, 0), date(2026, 12, 1): (CHARGED, 0)}

        # A second before Tokyo's midnight it is still November: refused again.
        stack.gateway.gateway.quota_clock = lambda: resets_at - timedelta(seconds=1)
        with pytest.raises(grpc.aio.AioRpcError) as late:
            await stack.stub.GenerateText(CALL, metadata=auth)
        assert_quota_failure(late.value, "MONTHLY_QUOTA_EXCEEDED")

        assert own_sim.stats.requests == before + 2
        assert await holds_of(ledger, user) == 2
        assert len(await usage_rows(ledger, user)) == 2
    await assert_audit_ok(ledger)


async def _months(ledger: LedgerHarness, user: str) -> dict[date, tuple[int, int]]:
    conn = await ledger.db()
    try:
        rows = await conn.fetch(
            "SELECT month, charged, held FROM monthly_usage WHERE user_id = $1", user
        )
    finally:
        await conn.close()
    return {row["month"]: (row["charged"], row["held"]) for row in rows}
