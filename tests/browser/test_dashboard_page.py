"""GET /dashboard in headless Chromium: on the real stack (an admin's token, the figures of
GET /v1/admin/analytics and of the calls this test made), and on a written answer of many
periods in the shape ledger.proto's GetPlatformAnalyticsResponse gives it (fixtures/), which the
real stack cannot make in one test (everything it records happens today)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
from aiohttp import web
from selenium import webdriver

from gateway_service.http.pages import page_routes
from tests.browser import browser_support as page
from tests.browser.conftest import Site
from tests.browser.seed import seed
from tests.http.conftest import check_response

FIXTURE = Path(__file__).with_name("fixtures") / "platform_analytics.json"
CHARTS = (
    "money-chart",
    "tokens-chart",
    "refunds-chart",
    "users-chart",
    "models-chart",
    "models-time-chart",
    "top-users-chart",
    "sources-chart",
)
USD_CARDS = {
    "revenue-usd": "revenueUsd",
    "provider-cost-usd": "providerCostUsd",
    "gross-margin-usd": "grossMarginUsd",
}
TOKEN_CARDS = {
    "purchases": "purchases",
    "requests": "requests",
    "tokens-charged": "tokensCharged",
    "tokens-credited": "tokensCredited",
    "active-users": "activeUsers",
    "tokens-refunded": "tokensRefunded",
    "unbilled-tokens": "unbilledTokens",
}


def _browse(driver: webdriver.Chrome, url: str, out: Path, docs: bool) -> dict[str, Any]:
    page.open_page(driver, url)
    seen: dict[str, Any] = {
        "url": driver.current_url,
        "error": page.error_box(driver),
        "usd": {card: page.dollars(driver, card) for card in USD_CARDS},
        "counts": {card: page.integer(driver, card) for card in TOKEN_CARDS},
        "receivable": page.integer(driver, "open-receivable-tokens"),
        "marks": {chart: page.drawn_marks(driver, chart) for chart in CHARTS},
        "models": page.table_rows(driver, "models-table"),
        "users": page.table_rows(driver, "top-users-table"),
        "sources": page.table_rows(driver, "sources-table"),
        "periods": page.table_rows(driver, "periods-table"),
        "console": page.console_errors(driver),
        "requests_sent": page.requests_sent(driver),
    }
    seen["shots"] = page.screenshots(driver, out, "dashboard", docs=docs)
    seen["console"] += page.console_errors(driver)
    return seen


def _check_figures(seen: dict[str, Any], analytics: dict[str, Any]) -> None:
    """The page shows what the API answered, and draws every chart."""
    totals = analytics["totals"]
    assert seen["console"] == []
    assert not seen["error"].shown, seen["error"]
    assert seen["usd"] == {card: Decimal(totals[key]) for card, key in USD_CARDS.items()}
    assert seen["counts"] == {card: int(totals[key]) for card, key in TOKEN_CARDS.items()}
    assert seen["receivable"] == int(analytics["openReceivableTokens"])
    assert len(seen["models"]) == len(analytics["models"])
    assert [row[0] for row in seen["users"]] == [u["userId"] for u in analytics["topUsers"]]
    assert [row[0] for row in seen["sources"]] == [s["source"] for s in analytics["sources"]]
    assert len(seen["periods"]) == len(analytics["periods"])
    assert all(count > 0 for count in seen["marks"].values()), seen["marks"]


def test_the_fixture_is_an_answer_the_api_could_give() -> None:
    """The written answer validates against the document's GET /v1/admin/analytics answer, so
    the page is not built against a shape of its own; and it exercises every part of it."""
    answer = json.loads(FIXTURE.read_text())
    check_response("/v1/admin/analytics", "get", 200, answer)
    assert all(answer[key] for key in ("periods", "models", "topUsers", "sources"))
    assert all(p["models"] for p in answer["periods"])
    assert any(p["figures"]["revenue"] for p in answer["periods"])


def _day_range(days: int) -> dict[str, str]:
    end = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0) + timedelta(days=1)
    start = end - timedelta(days=days)
    return {
        "start": start.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "end": end.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "granularity": "day",
    }


async def test_dashboard_shows_the_api_figures(
    site: Site, browser: webdriver.Chrome, output_dir: Path
) -> None:
    data = await seed(site)
    admin = site.admin_token()
    span = _day_range(7)
    # What the page asks: the periods its range touches, from its start.
    asked = {"start": span["start"], "periods": "7", "granularity": "day", "top_users": "10"}
    async with site.session.get(
        f"{site.url}/v1/admin/analytics",
        params=asked,
        headers={"Authorization": f"Bearer {admin}"},
    ) as reply:
        assert reply.status == 200, await reply.text()
        analytics = await reply.json()

    fragment = urlencode({"token": admin, **span})
    seen = await asyncio.to_thread(
        _browse, browser, f"{site.url}/dashboard#{fragment}", output_dir, True
    )

    _check_figures(seen, analytics)
    # The range stays in the address bar (a view can be shared); the token does not.
    assert seen["url"] == f"{site.url}/dashboard#{urlencode(span)}"
    assert seen["requests_sent"]  # the page did call the API
    assert all(admin not in r.url for r in seen["requests_sent"])
    # (data: URLs are the browser's own widgets, e.g. the date picker's icon: no request leaves.)
    elsewhere = [r.url for r in seen["requests_sent"] if not r.url.startswith((site.url, "data:"))]
    assert elsewhere == []
    # And the figures are those of what this test did.
    totals = analytics["totals"]
    assert seen["counts"]["requests"] == data.requests
    assert seen["counts"]["tokens-charged"] == data.tokens_charged
    assert seen["counts"]["purchases"] == data.purchases
    assert int(totals["tokensSold"]) == data.tokens_sold
    assert seen["usd"]["revenue-usd"] == data.revenue_usd
    assert int(totals["publicByokRequests"]) == 1
    assert [u["userId"] for u in analytics["topUsers"]] == [data.alice, data.bob]


@pytest.fixture
async def fixture_api() -> AsyncIterator[tuple[str, list[web.Request]]]:
    """The pages with a stand-in GET /v1/admin/analytics that answers the fixture (and keeps
    the requests it was sent)."""
    answer = json.loads(FIXTURE.read_text())
    asked: list[web.Request] = []

    async def analytics(request: web.Request) -> web.Response:
        asked.append(request)
        return web.json_response(answer)

    app = web.Application()
    app.router.add_routes([*page_routes(), web.get("/v1/admin/analytics", analytics)])
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}", asked
    finally:
        await runner.cleanup()


async def test_dashboard_draws_many_periods(
    fixture_api: tuple[str, list[web.Request]], browser: webdriver.Chrome, output_dir: Path
) -> None:
    url, asked = fixture_api
    analytics = json.loads(FIXTURE.read_text())
    span = {"start": "2026-11-18T00:00:00Z", "end": "2026-12-02T00:00:00Z", "granularity": "day"}
    fragment = urlencode({"token": "any.jwt.here", **span})

    seen = await asyncio.to_thread(
        _browse, browser, f"{url}/dashboard#{fragment}", output_dir, False
    )

    _check_figures(seen, analytics)
    ((request,),) = [asked]
    assert request.headers["Authorization"] == "Bearer any.jwt.here"
    assert dict(request.query) == {
        "start": span["start"],
        "periods": "14",
        "granularity": "day",
        "top_users": "10",
    }
