"""Fixtures for the gateway's building blocks: a provider_sim on a real socket, providers whose
official SDK clients point at it, and the e2e ledger proxy in front of the test's real ledger."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import pytest
from aiohttp import web

from gateway_service.providers import Providers, build_providers
from provider_sim import STATS, SimStats, start_provider_sim
from tests.conftest import LedgerHarness
from tests.e2e.ledger_proxy import LedgerProxy

PLATFORM_KEY = "sk-platform-test-key-0001"
BYOK_KEY = "sk-byok-caller-secret-9876"


@dataclass
class Sim:
    runner: web.AppRunner
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def stats(self) -> SimStats:
        return self.runner.app[STATS]


@pytest.fixture(scope="session")
async def sim() -> AsyncIterator[Sim]:
    runner, port = await start_provider_sim("127.0.0.1", 0, api_keys=[PLATFORM_KEY, BYOK_KEY])
    yield Sim(runner, port)
    await runner.cleanup()


def make_providers(
    sim: Sim, *, timeout_seconds: float = 10.0, platform_key: str | None = PLATFORM_KEY
) -> Providers:
    return build_providers(
        anthropic_api_key=platform_key,
        openai_api_key=platform_key,
        anthropic_base_url=sim.url,
        openai_base_url=f"{sim.url}/v1",
        timeout_seconds=timeout_seconds,
    )


@pytest.fixture
async def providers(sim: Sim) -> AsyncIterator[Providers]:
    built = make_providers(sim)
    yield built
    await built.aclose()


async def eventually(condition: Callable[[], bool], within: float = 3.0) -> None:
    """Wait until `condition()` holds (the server sees a disconnect a moment after the client)."""
    deadline = asyncio.get_running_loop().time() + within
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


@pytest.fixture
async def proxy(ledger: LedgerHarness) -> AsyncIterator[LedgerProxy]:
    async with LedgerProxy(ledger.address) as front:
        yield front
