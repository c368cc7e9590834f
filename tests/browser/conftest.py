"""Fixtures for the pages' browser tests: headless Chromium (Debian's `chromium` and
`chromium-driver`, which `make test` installs) driven by selenium, and the real stack serving
the pages: a ledger on a fresh database behind a LedgerProxy (so a test can make it fail), the
provider stand-in, and the gateway's own HTTP edge, with admins configured (JWT claim
role=admin).

The stack runs on this test's event loop, so a test drives the browser from a worker thread
(`await asyncio.to_thread(...)`): a blocking selenium call on the loop would stall the very
server it waits for."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service

from tests.browser.browser_support import DESKTOP
from tests.conftest import LedgerHarness
from tests.e2e.conftest import mint, sim_url
from tests.e2e.e2e_support import gateway_on
from tests.e2e.ledger_proxy import LedgerProxy

__all__ = ["sim_url"]  # fixture reused from the e2e suite

ADMIN_CLAIM = {"role": "admin"}
OUTPUT_DIR = Path(__file__).resolve().parents[2] / "test-output" / "browser"
NO_CHROMIUM = (
    "no headless Chromium: `chromium` and `chromedriver` are not on PATH "
    "(`make test` installs Debian's chromium and chromium-driver packages)"
)


@dataclass(frozen=True)
class Chromium:
    browser: str
    driver: str


def find_chromium() -> Chromium | None:
    browser = next(
        (p for name in ("chromium", "chromium-browser") if (p := shutil.which(name))), None
    )
    driver = shutil.which("chromedriver")
    return Chromium(browser, driver) if browser and driver else None


@pytest.fixture(scope="session")
def chromium() -> Chromium:
    found = find_chromium()
    if found is None:
        pytest.skip(NO_CHROMIUM)
    return found


@pytest.fixture
def browser(chromium: Chromium, monkeypatch: pytest.MonkeyPatch) -> Iterator[webdriver.Chrome]:
    monkeypatch.setenv("SE_OFFLINE", "true")  # selenium-manager: never download a driver
    options = Options()
    options.binary_location = chromium.browser
    for arg in (
        "--headless=new",
        "--no-sandbox",  # tests may run as root (CI containers)
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--hide-scrollbars",
        "--no-first-run",
        "--disable-extensions",
        "--disable-background-networking",  # no requests of Chromium's own in the logs
        f"--window-size={DESKTOP},1000",
    ):
        options.add_argument(arg)
    # The console (errors a page logs) and the network events (every URL it requested).
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(executable_path=chromium.driver))
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


@dataclass
class Site:
    """The real stack on real sockets; `url` is its HTTP edge (pages and JSON API)."""

    url: str
    ledger: LedgerHarness
    proxy: LedgerProxy
    session: aiohttp.ClientSession

    def token(self, sub: str, **claims: Any) -> str:
        return mint(sub, **claims)

    def admin_token(self, sub: str = "operator") -> str:
        return mint(sub, **ADMIN_CLAIM)

    async def get_json(self, path: str, token: str | None, **params: str) -> Any:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        async with self.session.get(self.url + path, headers=headers, params=params) as reply:
            assert reply.status == 200, (path, reply.status, await reply.text())
            return await reply.json()

    async def post_json(self, path: str, body: Any, token: str | None = None) -> Any:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        async with self.session.post(self.url + path, json=body, headers=headers) as reply:
            assert reply.status == 200, (path, reply.status, await reply.text())
            return await reply.json()


@pytest.fixture
async def site(ledger: LedgerHarness, sim_url: str) -> AsyncIterator[Site]:
    proxy = LedgerProxy(ledger.address)
    await proxy.start()
    try:
        async with gateway_on(
            ledger,
            sim_url,
            ledger_addr=proxy.address,
            jwt_admin_claim="role",
            jwt_admin_value="admin",
        ) as stack:
            port = await stack.gateway.start_http("127.0.0.1:0")
            async with aiohttp.ClientSession() as session:
                yield Site(f"http://127.0.0.1:{port}", ledger, proxy, session)
    finally:
        await proxy.stop()


@pytest.fixture
def output_dir(request: pytest.FixtureRequest) -> Path:
    """test-output/browser/<test name>/ (gitignored): screenshots to look at after a run."""
    name: str = request.node.name
    path = OUTPUT_DIR / name
    path.mkdir(parents=True, exist_ok=True)
    return path
