"""CORS for browser-based extensions: only configured origins are echoed back.

A preflight (OPTIONS with Origin and Access-Control-Request-Method) is answered here, before any
handler: 204 with the allowed methods and headers for a configured origin, 403 otherwise. Every
other response to a configured origin gets Access-Control-Allow-Origin (set as the response is
prepared, so streamed SSE responses get it too). No cookies are involved: callers authenticate
with the Authorization header, so Access-Control-Allow-Credentials is never sent.
"""

from __future__ import annotations

from collections.abc import Iterable
from fnmatch import fnmatchcase

from aiohttp import hdrs, web
from aiohttp.typedefs import Handler, Middleware

from gateway_service.http.errors import error_response

# Mcp-*: what an MCP client sends after its handshake (POST /mcp).
ALLOWED_HEADERS = "Authorization, Content-Type, Mcp-Protocol-Version, Mcp-Method, Mcp-Name"
EXPOSED_HEADERS = "Retry-After, RateLimit-Limit, RateLimit-Remaining, RateLimit-Reset"
MAX_AGE_SECONDS = 600


class CorsPolicy:
    """The origins (exact, or fnmatch patterns such as `vscode-webview://*`) browsers may call
    from (HTTP_CORS_ORIGINS)."""

    def __init__(self, origins: Iterable[str]) -> None:
        self.exact = frozenset(o for o in origins if o and "*" not in o)
        self.patterns = tuple(o for o in origins if "*" in o)

    def __bool__(self) -> bool:
        return bool(self.exact or self.patterns)

    def allows(self, origin: str | None) -> bool:
        if not origin or origin == "null":
            return False
        return origin in self.exact or any(fnmatchcase(origin, p) for p in self.patterns)

    def middleware(self) -> Middleware:
        policy = self

        @web.middleware
        async def cors_preflight(request: web.Request, handler: Handler) -> web.StreamResponse:
            if not _is_preflight(request):
                return await handler(request)
            methods = _route_methods(request)
            if methods is None:
                return await handler(request)  # no such route: the handler's 404
            origin = request.headers[hdrs.ORIGIN]
            if not policy.allows(origin):
                return error_response(403, "this origin may not call the API", "ORIGIN_NOT_ALLOWED")
            return web.Response(
                status=204,
                headers={
                    hdrs.ACCESS_CONTROL_ALLOW_ORIGIN: origin,
                    hdrs.ACCESS_CONTROL_ALLOW_METHODS: ", ".join(sorted(methods)),
                    hdrs.ACCESS_CONTROL_ALLOW_HEADERS: ALLOWED_HEADERS,
                    hdrs.ACCESS_CONTROL_MAX_AGE: str(MAX_AGE_SECONDS),
                    hdrs.VARY: "Origin",
                },
            )

        return cors_preflight

    async def on_response_prepare(self, request: web.Request, response: web.StreamResponse) -> None:
        if not self or hdrs.ORIGIN not in request.headers:
            return
        vary = response.headers.get(hdrs.VARY)
        if vary is None:
            response.headers[hdrs.VARY] = "Origin"
        elif "origin" not in vary.lower():
            response.headers[hdrs.VARY] = f"{vary}, Origin"
        origin = request.headers[hdrs.ORIGIN]
        if self.allows(origin) and hdrs.ACCESS_CONTROL_ALLOW_ORIGIN not in response.headers:
            response.headers[hdrs.ACCESS_CONTROL_ALLOW_ORIGIN] = origin
            response.headers[hdrs.ACCESS_CONTROL_EXPOSE_HEADERS] = EXPOSED_HEADERS


CORS: web.AppKey[CorsPolicy] = web.AppKey("cors_policy", CorsPolicy)


def _is_preflight(request: web.Request) -> bool:
    return (
        request.method == hdrs.METH_OPTIONS
        and hdrs.ORIGIN in request.headers
        and hdrs.ACCESS_CONTROL_REQUEST_METHOD in request.headers
    )


def _route_methods(request: web.Request) -> set[str] | None:
    """The methods the requested path serves, or None when no route has that path."""
    exc = request.match_info.http_exception
    if isinstance(exc, web.HTTPMethodNotAllowed):
        return set(exc.allowed_methods)
    if exc is not None:
        return None
    route = request.match_info.route
    resource = route.resource
    if resource is None:
        return {route.method}
    return {r.method for r in resource}
