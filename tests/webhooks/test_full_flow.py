"""The whole purchase flow through the gateway process's own HTTP server: a signed LemonSqueezy
order credits 1000 -> 800, then a metered call over HTTP, then the same call as SSE."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import aiohttp
import pytest

from gateway_service.app import GatewayApp, create_app
from tests.conftest import LedgerHarness
from tests.e2e.conftest import gateway_settings, mint, sim_url

__all__ = ["sim_url"]  # the provider stand-in fixture, shared with the e2e suite
from tests.webhooks.payloads import CATALOG, SECRET, encode, order, sign

HUNDRED_TOKENS = "[[usage:40,60]] say something"


@pytest.fixture
async def gateway(ledger: LedgerHarness, sim_url: str) -> AsyncIterator[tuple[GatewayApp, str]]:
    settings = gateway_settings(
        ledger.address,
        sim_url,
        lemonsqueezy_webhook_secret=SECRET,
        lemonsqueezy_variant_tokens=CATALOG,
    )
    app = create_app(settings)
    await app.start("127.0.0.1:0")
    port = await app.start_http("127.0.0.1:0")
    yield app, f"http://127.0.0.1:{port}"
    await app.close()


async def test_webhook_purchase_then_metered_http_call_then_stream(
    gateway: tuple[GatewayApp, str],
) -> None:
    _, base = gateway
    body = encode(order("order_created", 4242, "zoe"))
    auth = {"Authorization": f"Bearer {mint('zoe')}"}
    async with aiohttp.ClientSession() as http:
        async with http.post(
            f"{base}/webhooks/lemonsqueezy",
            data=body,
            headers={"X-Signature": sign(body), "Content-Type": "application/json"},
        ) as r:
            assert r.status == 200
            assert (await r.json())["status"] == "applied"
        async with http.get(f"{base}/v1/me/status", headers=auth) as r:
            status = await r.json()
            assert status["availableTokens"] == 800
            assert status["hasPurchases"] is True

        request = {"content": HUNDRED_TOKENS, "model": "claude-haiku-4-5", "maxTokens": 100}
        async with http.post(f"{base}/v1/generate", json=request, headers=auth) as r:
            assert r.status == 200
            reply = await r.json()
        assert reply["tokenUsage"]["tokensCharged"] == 125
        assert reply["tokenUsage"]["remainingBalance"] == 675

        events: list[tuple[str, str]] = []
        async with http.post(f"{base}/v1/generate/stream", json=request, headers=auth) as r:
            assert r.status == 200
            assert r.headers["Content-Type"].startswith("text/event-stream")
            event = ""
            async for raw in r.content:
                line = raw.decode().rstrip("\n")
                if line.startswith("event:"):
                    event = line.split(":", 1)[1].strip()
                elif line.startswith("data:"):
                    events.append((event, line.split(":", 1)[1].strip()))
        names = [name for name, _ in events]
        assert names.count("delta") == 60
        assert names[-2:] == ["usage", "done"]
        usage = json.loads(events[-2][1])
        assert usage["tokenUsage"]["tokensCharged"] == 125
        assert usage["tokenUsage"]["remainingBalance"] == 550

        # The same delivery again (LemonSqueezy retries): acknowledged, nothing credited.
        async with http.post(
            f"{base}/webhooks/lemonsqueezy", data=body, headers={"X-Signature": sign(body)}
        ) as r:
            assert (r.status, (await r.json())["status"]) == (200, "duplicate")
        async with http.get(f"{base}/v1/me/status", headers=auth) as r:
            assert (await r.json())["availableTokens"] == 550
