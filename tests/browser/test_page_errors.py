"""What the pages do when the API refuses: no token or an expired one (401: the paste box, and a
good token pasted there then works), a token that is not an operator's (403), the ledger down
(503: said on the page, and `Try again` recovers once it is back). Always on the real stack."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import grpc
from selenium import webdriver

from tests.browser import browser_support as page
from tests.browser.conftest import Site
from tests.browser.seed import credit
from tests.e2e.ledger_proxy import Fault


def _sign_in_flow(driver: webdriver.Chrome, url: str, expired: str, good: str) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    page.open_page(driver, f"{url}/usage")
    seen["asked"] = page.visible(driver, "sign-in") and not page.visible(driver, "content")
    seen["requests_before_token"] = [r.url for r in page.requests_sent(driver) if "/v1/" in r.url]

    stamp = driver.execute_script("return document.body.dataset.loaded")
    page.paste_token(driver, expired)
    stamp = page.wait_loaded(driver, stamp)
    seen["expired"] = page.error_box(driver)
    seen["asked_again"] = page.visible(driver, "sign-in") and not page.visible(driver, "content")
    seen["stored_after_401"] = page.storage_token(driver)

    page.paste_token(driver, good)
    page.wait_loaded(driver, stamp)
    seen["after_good"] = page.error_box(driver)
    seen["content"] = page.visible(driver, "content") and not page.visible(driver, "sign-in")
    seen["available"] = page.integer(driver, "available-tokens")
    seen["dom"] = page.page_source_text(driver)
    seen["urls"] = [r.url for r in page.requests_sent(driver)]
    seen["console"] = page.console_errors(driver, expected=page.FAILED_FETCH)
    return seen


async def test_usage_asks_for_a_token_and_explains_a_401(
    site: Site, browser: webdriver.Chrome
) -> None:
    user = "carol"
    await credit(site, user, 1000)
    expired = site.token(user, exp=int(time.time()) - 3600, iat=int(time.time()) - 7200)
    good = site.token(user)

    seen = await asyncio.to_thread(_sign_in_flow, browser, site.url, expired, good)

    assert seen["asked"]
    assert seen["requests_before_token"] == []  # nothing asked of the API without a token
    assert seen["expired"].shown
    assert seen["expired"].status == "401"
    assert "TOKEN_EXPIRED" in seen["expired"].text or "expired" in seen["expired"].text
    assert seen["asked_again"]
    assert seen["stored_after_401"] is None  # a refused token is forgotten
    assert not seen["after_good"].shown
    assert seen["content"]
    assert seen["available"] == 800
    assert expired not in seen["dom"]
    assert good not in seen["dom"]
    assert not any(expired in url or good in url for url in seen["urls"])
    assert seen["console"] == []


def _refused(driver: webdriver.Chrome, url: str) -> dict[str, Any]:
    page.open_page(driver, url)
    return {
        "error": page.error_box(driver),
        "content": page.visible(driver, "content"),
        "url": driver.current_url,
        "console": page.console_errors(driver, expected=page.FAILED_FETCH),
    }


async def test_dashboard_refuses_a_user_who_is_not_an_operator(
    site: Site, browser: webdriver.Chrome
) -> None:
    token = site.token("dave")  # signed in, but no role=admin claim
    async with site.session.get(
        f"{site.url}/v1/admin/analytics", headers={"Authorization": f"Bearer {token}"}
    ) as reply:
        assert (reply.status, (await reply.json())["error"]["reason"]) == (403, "ADMIN_REQUIRED")

    seen = await asyncio.to_thread(_refused, browser, f"{site.url}/dashboard#token={token}")

    assert seen["error"].shown
    assert seen["error"].status == "403"
    assert "may not see this page" in seen["error"].text
    assert not seen["content"]
    assert "token=" not in seen["url"]
    assert seen["console"] == []


def _outage(driver: webdriver.Chrome, url: str, site: Site) -> dict[str, Any]:
    seen = _refused(driver, url)
    stamp = driver.execute_script("return document.body.dataset.loaded")
    site.proxy.faults.clear()  # the ledger is back
    page.click(driver, "#error button.retry")
    page.wait_loaded(driver, stamp)
    seen["after_retry"] = page.error_box(driver)
    seen["content_after_retry"] = page.visible(driver, "content")
    seen["available"] = page.integer(driver, "available-tokens")
    seen["console"] += page.console_errors(driver, expected=page.FAILED_FETCH)
    return seen


async def test_usage_says_the_ledger_is_down_and_recovers(
    site: Site, browser: webdriver.Chrome
) -> None:
    user = "erin"
    await credit(site, user, 1000)
    token = site.token(user)
    for method in ("GetUserStatus", "GetUsageAnalytics", "GetPurchaseHistory"):
        site.proxy.faults[method] = Fault(grpc.StatusCode.UNAVAILABLE)

    seen = await asyncio.to_thread(_outage, browser, f"{site.url}/usage#token={token}", site)

    assert seen["error"].shown
    assert seen["error"].status == "503"
    assert "unavailable" in seen["error"].text
    assert not seen["content"]
    assert not seen["after_retry"].shown
    assert seen["content_after_retry"]
    assert seen["available"] == 800
    assert seen["console"] == []
