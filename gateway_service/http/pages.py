"""Two pages people look at, served by the HTTP edge: `GET /usage` (a signed-in user's balance,
usage and purchases) and `GET /dashboard` (the operator's figures), with their scripts and
styles under `/static/`.

The pages are static files (gateway_service/http/static/); they fill themselves from the JSON
API with the caller's token, which they take from the URL fragment or a paste box and never send
anywhere but in the Authorization header. So the server only serves bytes, and its part of the
pages' security is in the headers: a Content-Security-Policy that allows this origin's own
files and nothing else (no inline script, no other host, not even a form submission), no
sniffing, no Referer, no framing.

Only the files named here are served, read once when the routes are built: no path from a
request ever reaches the file system.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from aiohttp import hdrs, web

from gateway_service.http.api import HTML_PAGE, describe

STATIC_DIR = Path(__file__).with_name("static")

PAGES: Mapping[str, str] = {"/usage": "usage.html", "/dashboard": "dashboard.html"}
ASSETS = ("app.css", "app.js", "charts.js", "usage.js", "dashboard.js", "icon.svg")
# Every path served here (GET and HEAD): pages for people, not operations of the JSON API.
PATHS = frozenset([*PAGES, *(f"/static/{name}" for name in ASSETS)])

CONTENT_TYPES: Mapping[str, str] = {
    ".html": "text/html; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".svg": "image/svg+xml",
}

CONTENT_SECURITY_POLICY = "; ".join(
    (
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self'",
        "connect-src 'self'",
        "object-src 'none'",
        "base-uri 'none'",
        # The paste box is handled by the page's script; were it ever submitted for real, the
        # token would leave in a request, so the browser may not submit any form.
        "form-action 'none'",
        "frame-ancestors 'none'",
    )
)

# Revalidate every time (the files carry no version in their names; an ETag makes it cheap).
CACHE_CONTROL = "no-cache"

SECURITY_HEADERS: Mapping[str, str] = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
}


@dataclass(frozen=True, slots=True)
class StaticFile:
    body: bytes
    content_type: str
    etag: str

    @classmethod
    def read(cls, name: str) -> StaticFile:
        body = (STATIC_DIR / name).read_bytes()
        digest = hashlib.sha256(body).hexdigest()[:32]
        return cls(body, CONTENT_TYPES[Path(name).suffix], f'"{digest}"')

    def response(self, request: web.Request) -> web.Response:
        headers = {
            **SECURITY_HEADERS,
            hdrs.CACHE_CONTROL: CACHE_CONTROL,
            hdrs.ETAG: self.etag,
        }
        if self.etag in request.headers.get(hdrs.IF_NONE_MATCH, ""):
            return web.Response(status=304, headers=headers)
        headers[hdrs.CONTENT_TYPE] = self.content_type
        return web.Response(body=self.body, headers=headers)


def _route(path: str, file: StaticFile) -> web.RouteDef:
    async def serve(request: web.Request) -> web.Response:
        return file.response(request)

    return web.get(path, serve)  # HEAD too


def page_routes() -> list[web.RouteDef]:
    """The pages and their files, read now (a missing file fails at start-up, not later)."""
    routes = [_route(path, StaticFile.read(name)) for path, name in PAGES.items()]
    routes += [_route(f"/static/{name}", StaticFile.read(name)) for name in ASSETS]
    return routes


# The pages are in /openapi.json (their files under /static/ are not: they are parts of a page).
describe(
    "GET",
    "/usage",
    operation_id="usagePage",
    summary="Your balance, usage and purchases, as a page (open it as /usage#token=<JWT>: the "
    "token stays in the browser and is sent only in the Authorization header)",
    answers=HTML_PAGE,
)
describe(
    "GET",
    "/dashboard",
    operation_id="dashboardPage",
    summary="The operator's dashboard, as a page (open it as /dashboard#token=<admin JWT>)",
    answers=HTML_PAGE,
)
