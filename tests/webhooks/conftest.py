"""A webhook endpoint on a real socket, in front of a real ledger (through the gateway's own
ledger client), for LemonSqueezy deliveries signed with the test secret."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from gateway_service.ledger_client import LedgerClient
from gateway_service.webhooks.http import PATH, lemonsqueezy_route
from gateway_service.webhooks.lemonsqueezy import Catalog, LemonSqueezyProcessor
from tests.conftest import SERVICE_TOKEN, LedgerHarness
from tests.webhooks.payloads import CATALOG, SECRET, encode, sign


@dataclass
class Hooks:
    ledger: LedgerHarness
    processor: LemonSqueezyProcessor
    url: str
    session: aiohttp.ClientSession

    async def deliver(
        self, payload: dict[str, Any] | bytes, signature: str | None = None
    ) -> tuple[int, dict[str, Any]]:
        body = payload if isinstance(payload, bytes) else encode(payload)
        headers = {"Content-Type": "application/json", "X-Event-Name": "test"}
        sig = sign(body) if signature is None else signature
        if sig:
            headers["X-Signature"] = sig
        async with self.session.post(self.url, data=body, headers=headers) as response:
            return response.status, await response.json()


async def start_hooks(
    ledger: LedgerHarness, catalog: str = CATALOG, test_mode: str = "ignore"
) -> tuple[web.AppRunner, LemonSqueezyProcessor, LedgerClient, str]:
    client = LedgerClient(ledger.address, SERVICE_TOKEN, timeout=2)
    processor = LemonSqueezyProcessor(client, Catalog.parse(catalog), test_mode)
    app = web.Application()
    app.router.add_routes([lemonsqueezy_route(processor, SECRET)])
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return runner, processor, client, f"http://127.0.0.1:{port}{PATH}"


@pytest.fixture
async def hooks(ledger: LedgerHarness) -> AsyncIterator[Hooks]:
    runner, processor, client, url = await start_hooks(ledger)
    async with aiohttp.ClientSession() as session:
        yield Hooks(ledger, processor, url, session)
    await runner.cleanup()
    await client.close()
