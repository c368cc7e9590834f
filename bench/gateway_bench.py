"""Gateway benchmark: metered GenerateText calls per second through the gateway (JWT auth,
Reserve, provider call over HTTP through the official SDK, Settle), with rate limits off and on
(every call through the requests, tokens and in-flight limits, shared in Redis; limits high
enough to refuse nothing), beside the same calls made straight to the local provider with the
same SDK, in the same run."""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial

import anthropic
import grpc
import jwt

from bench.load import LoadResult, run_load
from shared.gen.rpcai.gateway.v1 import gateway_pb2 as gpb
from shared.gen.rpcai.gateway.v1 import gateway_pb2_grpc

JWT_SECRET = "bench-jwt-secret-long-enough-for-hs256-signing"
MODEL = "claude-haiku-4-5"
PROMPT = "[[usage:20,12]] Write one short sentence about the sea."
MAX_TOKENS = 64
Op = Callable[[int], Awaitable[None]]
NO_LIMITS = json.dumps(
    {
        "public": {"requests_per_minute": 0, "calls_in_flight": 0},
        "byok": {"requests_per_minute": 0, "calls_in_flight": 0},
        "subscription": {"default": {"requests_per_minute": 0, "calls_in_flight": 0}},
        "failed_key_attempts_per_minute": 0,
    }
)
HIGH_LIMITS = json.dumps(
    {
        "subscription": {
            "default": {
                "requests_per_minute": 10**6,
                "tokens_per_minute": 10**9,
                "calls_in_flight": 1000,
            }
        }
    }
)
Cleanup = Callable[[], Awaitable[None]]


def token_for(user: str) -> str:
    now = int(time.time())
    return jwt.encode({"sub": user, "iat": now, "exp": now + 3600}, JWT_SECRET, "HS256")


async def via_gateway(address: str, users: int, worker: int, callers: int) -> tuple[Op, Cleanup]:
    channel = grpc.aio.insecure_channel(address)
    stub = gateway_pb2_grpc.AiGatewayStub(channel)
    auth = [
        (("authorization", f"Bearer {token_for(f'user-{(worker * callers + c) % users}')}"),)
        for c in range(callers)
    ]
    request = gpb.GenerateTextRequest(content=PROMPT, model=MODEL, max_tokens=MAX_TOKENS)

    async def op(caller: int) -> None:
        reply = await stub.GenerateText(request, metadata=auth[caller])
        assert reply.token_usage.tokens_charged == 40  # 32 used + 8 fee: metered, every call

    return op, channel.close


async def direct(base_url: str, worker: int, callers: int) -> tuple[Op, Cleanup]:
    client = anthropic.AsyncAnthropic(api_key="bench-key", base_url=base_url, max_retries=0)

    async def op(caller: int) -> None:
        await client.messages.create(
            model=MODEL,
            max_tokens=MAX_TOKENS,
            messages=[{"role": "user", "content": PROMPT}],
        )

    return op, client.close


@dataclass
class GatewayFigures:
    gateway: LoadResult
    limited: LoadResult
    direct: LoadResult


def measure(
    unlimited: str, limited: str, provider: str, users: int, concurrency: int, seconds: float
) -> GatewayFigures:
    straight = run_load(partial(direct, provider), concurrency, seconds)
    # Limits off and on, interleaved in halves (off, on, off, on): a slow spell of this shared
    # machine (another process, Postgres's autovacuum) then weighs on both alike instead of
    # showing up as the limiter's cost.
    halves = [
        (
            run_load(partial(via_gateway, unlimited, users), concurrency, seconds / 2),
            run_load(partial(via_gateway, limited, users), concurrency, seconds / 2),
        )
        for _ in range(2)
    ]
    (off_1, on_1), (off_2, on_2) = halves
    return GatewayFigures(off_1 + off_2, on_1 + on_2, straight)


def render(f: GatewayFigures, concurrency: int) -> str:
    from bench.ledger_bench import table

    rows = [
        [
            name,
            f"{r.rate:.0f}",
            f"{r.percentile(50):.1f}",
            f"{r.percentile(99):.1f}",
            str(r.errors),
        ]
        for name, r in (
            ("through the gateway (metered)", f.gateway),
            ("metered, rate limits on (Redis)", f.limited),
            ("straight to provider", f.direct),
        )
    ]
    added = f.gateway.percentile(50) - f.direct.percentile(50)
    cost = 1 - f.limited.rate / f.gateway.rate if f.gateway.rate else 0.0
    title = f"Gateway: GenerateText calls per second, {concurrency} concurrent callers"
    body = table(["path", "calls/s", "p50 ms", "p99 ms", "errors"], rows)
    return (
        f"{title}\n{body}\ngateway's added latency at p50: {added:.1f} ms\n"
        f"rate limiter's cost: {cost:.1%} of the metered rate (target: under 10%)"
    )
