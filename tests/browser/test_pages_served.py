"""How the HTTP edge serves the pages (no browser needed): the right Content-Type, a strict
Content-Security-Policy the pages can live with (no inline script or style, nothing from another
host), caching by ETag, and nothing served but the files named in gateway_service.http.pages."""

from __future__ import annotations

import re
from html.parser import HTMLParser

import pytest

from gateway_service.http.pages import ASSETS, PAGES, PATHS, STATIC_DIR
from tests.browser.conftest import Site

TYPES = {
    "/usage": "text/html",
    "/dashboard": "text/html",
    "/static/app.css": "text/css",
    "/static/app.js": "text/javascript",
    "/static/charts.js": "text/javascript",
    "/static/usage.js": "text/javascript",
    "/static/dashboard.js": "text/javascript",
    "/static/icon.svg": "image/svg+xml",
}


def test_every_file_is_named() -> None:
    """A file added to static/ but not to pages.py would be a 404 in production."""
    on_disk = {p.name for p in STATIC_DIR.iterdir()}
    assert on_disk == set(ASSETS) | set(PAGES.values())
    assert set(TYPES) == PATHS


async def test_headers(site: Site) -> None:
    for path, content_type in TYPES.items():
        async with site.session.get(site.url + path) as reply:
            assert reply.status == 200, path
            assert reply.content_type == content_type, path
            headers = reply.headers
            body = await reply.read()
        csp = dict(d.strip().split(" ", 1) for d in headers["Content-Security-Policy"].split(";"))
        assert csp["default-src"] == "'self'"
        assert csp["script-src"] == "'self'"  # no 'unsafe-inline', no other host
        assert csp["style-src"] == "'self'"
        assert csp["form-action"] == "'none'"
        assert csp["frame-ancestors"] == "'none'"
        assert headers["X-Content-Type-Options"] == "nosniff"
        assert headers["Referrer-Policy"] == "no-referrer"
        assert headers["Cache-Control"] == "no-cache"
        etag = headers["ETag"]
        async with site.session.get(site.url + path, headers={"If-None-Match": etag}) as again:
            assert again.status == 304, path
            assert await again.read() == b""
        async with site.session.head(site.url + path) as head:
            assert head.status == 200
        assert len(body) > 100


@pytest.mark.parametrize(
    "path",
    [
        "/static/",
        "/static/pages.py",
        "/static/../pages.py",
        "/static/%2e%2e/pages.py",
        "/static/usage.html",  # pages are served at their own paths only
        "/usage/",
        "/dashboard.html",
    ],
)
async def test_nothing_else_is_served(site: Site, path: str) -> None:
    async with site.session.get(site.url + path) as reply:
        assert reply.status == 404, path
        assert (await reply.json())["error"]["reason"] == "NOT_FOUND"


class _Markup(HTMLParser):
    """Collects what the CSP must allow: every script and stylesheet a page loads, and any
    inline script, style or event handler (which it would refuse)."""

    def __init__(self) -> None:
        super().__init__()
        self.loads: list[str] = []
        self.inline: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        named = dict(attrs)
        for attr in ("src", "href"):
            if named.get(attr):
                self.loads.append(str(named[attr]))
        if tag == "script" and not named.get("src"):
            self._in_script = True
        if tag == "style" or "style" in named or any(a.startswith("on") for a in named):
            self.inline.append(f"<{tag} {named}>")

    def handle_data(self, data: str) -> None:
        if self._in_script and data.strip():
            self.inline.append(data.strip()[:40])

    def handle_endtag(self, tag: str) -> None:
        self._in_script = False


@pytest.mark.parametrize("name", sorted(PAGES.values()))
def test_pages_load_only_their_own_files(name: str) -> None:
    markup = _Markup()
    markup.feed((STATIC_DIR / name).read_text())
    assert markup.inline == []
    assert markup.loads, name
    assert all(src in TYPES for src in markup.loads), markup.loads


@pytest.mark.parametrize("name", [n for n in ASSETS if n.endswith(".js")])
def test_scripts_import_only_their_siblings_and_ask_no_other_host(name: str) -> None:
    source = (STATIC_DIR / name).read_text()
    for module in re.findall(r'from "([^"]+)"', source):
        assert module.removeprefix("./") in ASSETS, module
        assert module.startswith("./"), module
    without_svg_namespace = source.replace('"http://www.w3.org/2000/svg"', "")
    assert not re.search(r"https?://", without_svg_namespace), "a script names another host"
    assert "innerHTML" not in source  # text only: nothing from the API is parsed as HTML
    assert "localStorage" not in source  # the token is kept for the tab, not on the disk
