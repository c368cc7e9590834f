"""The whole stack in one test process, on real sockets: a ledger on a fresh database, the
provider stand-in over HTTP, and the gateway; plus JWT minting for callers."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
import jwt
import pytest
from aiohttp import web

from gateway_service.app import GatewayApp, create_app
from provider_sim import start_provider_sim
from shared.config import Settings
from shared.gen.rpcai.gateway.v1 import gateway_pb2_grpc
from tests.conftest import SERVICE_TOKEN, LedgerHarness

JWT_SECRET = "e2e-jwt-secret-that-is-long-enough-for-hs256"
ISSUER = "https://auth.rpcai.test"
AUDIENCE = "rpcai-gateway"
PLATFORM_KEY = "sk-platform-e2e"
ADMIN_CLAIM, ADMIN_VALUE = "role", "admin"
NO_LIMITS = json.dumps(
    {
        "public": {"requests_per_minute": 0, "calls_in_flight": 0},
        "byok": {"requests_per_minute": 0, "calls_in_flight": 0},
        "subscription": {"default": {"requests_per_minute": 0, "calls_in_flight": 0}},
        "failed_key_attempts_per_minute": 0,
    }
)


def mint(sub: str, secret: str = JWT_SECRET, **claims: Any) -> str:
    now = int(time.time())
    payload = {"sub": sub, "iss": ISSUER, "aud": AUDIENCE, "iat": now, "exp": now + 600}
    payload.update(claims)
    return jwt.encode(payload, secret, algorithm="HS256")


def bearer(token: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {token}"),)


@dataclass
class Stack:
    ledger: LedgerHarness
    gateway: GatewayApp
    stub: gateway_pb2_grpc.AiGatewayAsyncStub
    channel: grpc.aio.Channel
    sim_url: str

    def user(self, name: str | None = None) -> tuple[str, tuple[tuple[str, str]]]:
        sub = name or f"user-{uuid.uuid4().hex[:8]}"
        return sub, bearer(mint(sub))


def gateway_process_env(
    ledger_addr: str, sim_url: str, data_dir: str, **extra: str
) -> dict[str, str]:
    """The environment of a gateway run as its own process (`python -m gateway_service`) against
    this ledger and provider stand-in; `extra` adds or overrides variables."""
    return {
        "LEDGER_ADDR": ledger_addr,
        "LEDGER_SERVICE_TOKEN": SERVICE_TOKEN,
        "GATEWAY_ADDR": "127.0.0.1:0",
        "HTTP_ADDR": "127.0.0.1:0",
        "JWT_SECRET": JWT_SECRET,
        "JWT_ISSUER": ISSUER,
        "JWT_AUDIENCE": AUDIENCE,
        "ANTHROPIC_BASE_URL": sim_url,
        "ANTHROPIC_API_KEY": PLATFORM_KEY,
        "OPENAI_BASE_URL": f"{sim_url}/v1",
        "OPENAI_API_KEY": PLATFORM_KEY,
        "DATA_DIR": data_dir,
        **extra,
    }


def gateway_settings(ledger_addr: str, sim_url: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "ledger_addr": ledger_addr,
        "ledger_service_token": SERVICE_TOKEN,
        "jwt_secret": JWT_SECRET,
        "jwt_issuer": ISSUER,
        "jwt_audience": AUDIENCE,
        "anthropic_base_url": sim_url,
        "anthropic_api_key": PLATFORM_KEY,
        "openai_base_url": f"{sim_url}/v1",
        "openai_api_key": PLATFORM_KEY,
        "provider_timeout_seconds": 5,
        "ledger_timeout_seconds": 2,
        "data_dir": f"/tmp/rpcai-e2e-{uuid.uuid4().hex[:8]}",
        # Tests not about limits run without them; the limit tests set their own.
        "rate_limits": NO_LIMITS,
        # The operator role: a JWT with "role": "admin" (tests/e2e/test_admin.py).
        "jwt_admin_claim": ADMIN_CLAIM,
        "jwt_admin_value": ADMIN_VALUE,
    }
    values.update(overrides)
    return Settings(**values)


@pytest.fixture(scope="session")
async def sim_url() -> AsyncIterator[str]:
    runner, port = await start_provider_sim("127.0.0.1", 0)
    yield f"http://127.0.0.1:{port}"
    await runner.cleanup()


@pytest.fixture
async def stack(ledger: LedgerHarness, sim_url: str) -> AsyncIterator[Stack]:
    app = create_app(gateway_settings(ledger.address, sim_url))
    port = await app.start("127.0.0.1:0")
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    stub = gateway_pb2_grpc.AiGatewayStub(channel)
    try:
        yield Stack(ledger, app, stub, channel, sim_url)
    finally:
        await channel.close()
        await app.close()


__all__ = ["web"]
