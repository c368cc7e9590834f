"""GET /usage in headless Chromium on the real stack: the page shows the figures the JSON API
answers (and the ones the money rule predicts), draws its charts, logs no console error, sends
its token only in the Authorization header, and fits a 360 px phone."""

from __future__ import annotations

import asyncio
from decimal import Decimal
from pathlib import Path
from typing import Any

from selenium import webdriver

from tests.browser import browser_support as page
from tests.browser.conftest import Site
from tests.browser.seed import ALICE_CALLS, seed


def _browse(driver: webdriver.Chrome, url: str, token: str, out: Path) -> dict[str, Any]:
    page.open_page(driver, f"{url}/usage#token={token}")
    assert driver.current_url == f"{url}/usage", "the token stays in the address bar"
    seen: dict[str, Any] = {
        "available": page.integer(driver, "available-tokens"),
        "reserved": page.integer(driver, "reserved-tokens"),
        "requests": page.integer(driver, "total-requests"),
        "tokens": page.integer(driver, "total-tokens"),
        "charged": page.integer(driver, "tokens-charged"),
        "cost": page.dollars(driver, "estimated-cost"),
        "purchases": page.integer(driver, "purchase-count"),
        "credited": page.integer(driver, "tokens-credited"),
        "refunded": page.integer(driver, "tokens-refunded"),
        "models": page.table_rows(driver, "per-model-table"),
        "days": page.table_rows(driver, "per-day-table"),
        "purchase_rows": page.table_rows(driver, "purchases-table"),
        "marks": {
            chart: page.drawn_marks(driver, chart) for chart in ("per-day-chart", "per-model-chart")
        },
        "error": page.error_box(driver),
        "stored": page.storage_token(driver),
        "dom": page.page_source_text(driver),
        "console": page.console_errors(driver),
        "requests_sent": page.requests_sent(driver),
    }
    seen["shots"] = page.screenshots(driver, out, "usage", docs=True)
    seen["console"] += page.console_errors(driver)  # drawn again at 360 px: still no error
    return seen


async def test_usage_page_shows_the_api_figures(
    site: Site, browser: webdriver.Chrome, output_dir: Path
) -> None:
    data = await seed(site)
    token = data.alice_token
    status = await site.get_json("/v1/me/status", token)
    usage = await site.get_json("/v1/me/usage", token, days="30", include_history="true")
    purchases = (await site.get_json("/v1/me/purchases", token, page_size="100"))["purchases"]

    seen = await asyncio.to_thread(_browse, browser, site.url, token, output_dir)

    assert seen["console"] == []
    assert not seen["error"].shown, seen["error"]
    # The page's figures are the API's ...
    summary = usage["summary"]
    assert seen["available"] == status["availableTokens"]
    assert seen["reserved"] == status["reservedTokens"] == 0
    assert seen["requests"] == summary["totalRequests"]
    assert seen["tokens"] == summary["totalTokens"]
    assert seen["charged"] == summary["tokensCharged"]
    assert seen["cost"] == Decimal(summary["estimatedTotalCostUsd"])
    assert seen["purchases"] == len(purchases) == 2
    assert seen["credited"] == sum(p["tokensCredited"] for p in purchases)
    assert seen["refunded"] == sum(p["tokensRefunded"] for p in purchases) == 500
    assert len(seen["models"]) == len(usage["breakdown"]) == 2
    assert len(seen["purchase_rows"]) == 2
    # ... and the ones the money rule predicts for the calls made.
    assert seen["available"] == data.alice_available
    assert seen["requests"] == len(ALICE_CALLS)
    assert seen["tokens"] == sum(c.used for c in ALICE_CALLS)
    assert seen["charged"] == sum(c.charged for c in ALICE_CALLS)
    # Every call was today: one day row, holding them all.
    ((_, calls, tokens, charged, _),) = seen["days"]
    assert (int(calls), int(tokens.replace(",", "")), int(charged.replace(",", ""))) == (
        seen["requests"],
        seen["tokens"],
        seen["charged"],
    )

    assert all(count > 0 for count in seen["marks"].values()), seen["marks"]

    # The token lives in sessionStorage and the Authorization header, nowhere else.
    assert seen["stored"] == token
    assert token not in seen["dom"]
    sent = seen["requests_sent"]
    assert {r.url.split("?")[0] for r in sent if "/v1/" in r.url} == {
        f"{site.url}/v1/me/status",
        f"{site.url}/v1/me/usage",
        f"{site.url}/v1/me/purchases",
    }
    assert all(token not in r.url for r in sent)
    assert all(r.url.startswith(site.url) for r in sent), "a request left the site"
    assert all(r.headers.get("Authorization") == f"Bearer {token}" for r in sent if "/v1/" in r.url)
