"""Blocking helpers that drive one page in headless Chromium: open it, wait for it to load its
figures, read them, check its charts, its console and its requests, take screenshots. Call them
from a worker thread (`asyncio.to_thread`) while the stack serves on the event loop."""

from __future__ import annotations

import base64
import json
import os
import shutil
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

DESKTOP = 1280
PHONE = 360
WAIT_SECONDS = 20
DOCS = Path(__file__).resolve().parents[2] / "docs"

# Chromium logs every non-2xx answer a page fetched as a console error; the error tests expect
# those (and check the page shows them), so they may pass this to `console_errors`.
FAILED_FETCH = "Failed to load resource: the server responded with a status of"

# Marks a chart drew with a visible size: bars (a rect with area), lines (a path with extent)
# and points.
DRAWN_MARKS_JS = """
const figure = document.querySelector(`[data-testid="${arguments[0]}"]`);
let marks = 0;
for (const mark of figure.querySelectorAll("svg rect, svg path, svg circle")) {
  const box = mark.getBBox();
  const area = box.width > 0 && box.height > 0;
  if (mark.tagName === "rect" ? area : box.width + box.height > 0) marks += 1;
}
return marks;
"""

# True once every chart has been drawn at its container's current width (after a resize).
CHARTS_FIT_JS = """
return [...document.querySelectorAll(".plot")].every((plot) => {
  const svg = plot.querySelector("svg");
  return svg && Number(svg.getAttribute("width")) === Math.max(200, plot.clientWidth || 600);
});
"""


def open_page(driver: webdriver.Chrome, url: str) -> str:
    """Loads `url` and waits until the page has finished filling itself (or showing an error);
    returns the page's load stamp, to wait for a later reload with `wait_loaded`."""
    driver.get(url)
    return wait_loaded(driver, None)


def wait_loaded(driver: webdriver.Chrome, previous: str | None) -> str:
    def stamp(d: Any) -> str | None:
        value: str | None = d.execute_script("return document.body.dataset.loaded || null")
        return value if value and value != previous else None

    loaded = WebDriverWait(driver, WAIT_SECONDS).until(stamp)
    assert loaded is not None
    return loaded


def wait_signed_out(driver: webdriver.Chrome) -> None:
    WebDriverWait(driver, WAIT_SECONDS).until(
        lambda d: d.find_element(By.ID, "sign-in").is_displayed()
    )


def text(driver: webdriver.Chrome, testid: str) -> str:
    value: str = driver.find_element(By.CSS_SELECTOR, f'[data-testid="{testid}"]').text
    return value


def integer(driver: webdriver.Chrome, testid: str) -> int:
    """A figure shown as "1,234"."""
    return int(text(driver, testid).replace(",", ""))


def dollars(driver: webdriver.Chrome, testid: str) -> Decimal:
    """A figure shown as "$1,234.50" or "-$0.007500", exactly."""
    shown = text(driver, testid)
    negative = shown.startswith("-")
    amount = Decimal(shown.lstrip("-").removeprefix("$").replace(",", ""))
    return -amount if negative else amount


def visible(driver: webdriver.Chrome, element_id: str) -> bool:
    shown: bool = driver.find_element(By.ID, element_id).is_displayed()
    return shown


def table_rows(driver: webdriver.Chrome, testid: str) -> list[list[str]]:
    """The body rows of a table, as the cells' text (also for rows scrolled out of view)."""
    rows: list[list[str]] = driver.execute_script(
        """return [...document.querySelector(`[data-testid="${arguments[0]}"]`).tBodies[0].rows]
             .map((row) => [...row.cells].map((cell) => cell.textContent));""",
        testid,
    )
    return rows


def drawn_marks(driver: webdriver.Chrome, testid: str) -> int:
    count: int = driver.execute_script(DRAWN_MARKS_JS, testid)
    return count


@dataclass(frozen=True)
class ErrorBox:
    shown: bool
    status: str
    text: str


def error_box(driver: webdriver.Chrome) -> ErrorBox:
    box = driver.find_element(By.CSS_SELECTOR, '[data-testid="error"]')
    return ErrorBox(box.is_displayed(), box.get_attribute("data-status") or "", box.text)


def _log(driver: webdriver.Chrome, kind: str) -> list[dict[str, Any]]:
    entries: list[dict[str, Any]] = driver.get_log(kind)  # type: ignore[no-untyped-call]
    return entries


def console_errors(driver: webdriver.Chrome, expected: str | None = None) -> list[str]:
    """Console errors and warnings logged since the last call (the log is drained), but those
    containing `expected`."""
    return [
        f"{e['level']}: {e['message']}"
        for e in _log(driver, "browser")
        if e["level"] in ("SEVERE", "WARNING")
        if expected is None or expected not in e["message"]
    ]


@dataclass(frozen=True)
class Request:
    url: str
    headers: dict[str, str]


def requests_sent(driver: webdriver.Chrome) -> list[Request]:
    """Every request the page made since the last call (from the performance log, drained)."""
    sent: list[Request] = []
    for entry in _log(driver, "performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            request = message["params"]["request"]
            sent.append(Request(request["url"], request.get("headers", {})))
    return sent


def storage_token(driver: webdriver.Chrome) -> str | None:
    token: str | None = driver.execute_script("return sessionStorage.getItem('rpcai.token')")
    return token


def page_source_text(driver: webdriver.Chrome) -> str:
    """The whole document as it is now (the DOM serialized, input values included)."""
    html: str = driver.execute_script(
        """return document.documentElement.outerHTML
             + [...document.querySelectorAll("input")].map((i) => i.value).join(" ");"""
    )
    return html


def paste_token(driver: webdriver.Chrome, token: str) -> None:
    field = driver.find_element(By.ID, "token")
    field.clear()
    field.send_keys(token)
    driver.find_element(By.CSS_SELECTOR, "#sign-in button[type=submit]").click()


def click(driver: webdriver.Chrome, css: str) -> None:
    driver.find_element(By.CSS_SELECTOR, css).click()


def set_width(driver: webdriver.Chrome, width: int) -> None:
    """Emulates a viewport `width` CSS pixels wide (a phone's, with touch, below 600) and waits
    for the charts to be drawn again at their new width."""
    driver.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride",
        {"width": width, "height": 900, "deviceScaleFactor": 1, "mobile": width < 600},
    )
    WebDriverWait(driver, WAIT_SECONDS).until(lambda d: d.execute_script(CHARTS_FIT_JS))


def overflow_px(driver: webdriver.Chrome) -> int:
    """How far the page is wider than the viewport (tables scroll inside their own boxes)."""
    extra: int = driver.execute_script(
        "return document.documentElement.scrollWidth - document.documentElement.clientWidth"
    )
    return extra


def screenshot(driver: webdriver.Chrome, path: Path, width: int) -> Path:
    """A PNG of the whole page (not only the viewport) at `width` CSS pixels."""
    set_width(driver, width)
    height: int = driver.execute_script("return document.documentElement.scrollHeight")
    shot = driver.execute_cdp_cmd(
        "Page.captureScreenshot",
        {
            "format": "png",
            "captureBeyondViewport": True,
            "clip": {"x": 0, "y": 0, "width": width, "height": height, "scale": 1},
        },
    )
    path.write_bytes(base64.b64decode(shot["data"]))
    assert path.stat().st_size > 10_000, f"{path}: suspiciously small screenshot"
    return path


def screenshots(driver: webdriver.Chrome, folder: Path, name: str, docs: bool) -> list[Path]:
    """The page at a desktop width and at 360 px under `folder`; the desktop one also as
    docs/<name>.png (the README's picture) when `docs` and UPDATE_SCREENSHOTS=1 (so that a test
    run leaves the checkout as it was). Asserts the narrow page does not scroll sideways."""
    desktop = screenshot(driver, folder / f"{name}-desktop.png", DESKTOP)
    phone = screenshot(driver, folder / f"{name}-{PHONE}px.png", PHONE)
    assert overflow_px(driver) <= 0, f"{name} scrolls sideways at {PHONE} px"
    set_width(driver, DESKTOP)
    if docs and os.environ.get("UPDATE_SCREENSHOTS") == "1":
        shutil.copyfile(desktop, DOCS / f"{name}.png")
    return [desktop, phone]
