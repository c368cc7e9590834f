"""The HTTP edge as an aiohttp Application, and the server that runs it beside the gRPC one.

    app = create_http_app(gateway, verifier, settings, extra_routes=[web.post(path, handler)])
    server = HttpServer(app); port = await server.start("127.0.0.1:0"); await server.stop(grace)

Other routes (the LemonSqueezy webhook) join through `extra_routes`, or through
`app.router.add_routes(...)` on the returned Application before the server starts. They get the
same body limit, CORS and JSON errors for anything they raise, but no JWT check: the API's
handlers authenticate themselves.

Every connection is watched by `http.connections` (header, body and idle timeouts, a cap on
connections); streams count against the process-wide `StreamSlots` the app passes in.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from aiohttp import web

from gateway_service.admin import AdminDesk
from gateway_service.auth import JwtVerifier
from gateway_service.client_address import ClientAddresses, parse_networks
from gateway_service.core import Gateway
from gateway_service.http.admin import ADMIN
from gateway_service.http.admin import routes as admin_routes
from gateway_service.http.connections import (
    CONNECTIONS,
    ConnectionGuard,
    ConnectionLimits,
    GuardedSite,
)
from gateway_service.http.cors import CORS, CorsPolicy
from gateway_service.http.errors import error_middleware
from gateway_service.http.handlers import routes
from gateway_service.http.mcp import mcp_lifecycle, mcp_routes
from gateway_service.http.pages import page_routes
from gateway_service.http.protocol import EdgeRunner, server_header
from gateway_service.http.state import ADDRESSES, GATEWAY, STATE, STREAMS, VERIFIER, EdgeState
from gateway_service.metrics import observe_middleware, request_id_header
from gateway_service.stream_slots import StreamSlots
from shared import tracing
from shared.config import Settings

log = logging.getLogger(__name__)

# After the grace period, cancelled handlers get this long to answer before connections close.
CANCEL_SECONDS = 1.0


def create_http_app(
    gateway: Gateway,
    verifier: JwtVerifier,
    settings: Settings,
    extra_routes: Iterable[web.AbstractRouteDef] = (),
    stream_slots: StreamSlots | None = None,
) -> web.Application:
    """`stream_slots`: the process-wide cap on streams, shared with the gRPC server (a cap of
    this app's own, from the settings, when not given)."""
    cors = CorsPolicy(settings.http_cors_origins)
    state = EdgeState()
    guard = ConnectionGuard(ConnectionLimits.from_settings(settings))
    app = web.Application(
        client_max_size=settings.http_max_body_bytes,
        # Outermost first: count, time and log the request (metrics, access line), pause the
        # connection's timers, count the request in flight, answer CORS preflights, turn errors
        # into JSON, read the body within its timeout.
        middlewares=[
            *tracing.edge_middlewares(),  # the request's server span (none when tracing is off)
            observe_middleware,
            guard.middleware(),
            state.middleware(),
            cors.middleware(),
            error_middleware,
            guard.body_middleware(),
        ],
    )
    app[CONNECTIONS] = guard
    app[CORS] = cors
    app[STREAMS] = stream_slots or StreamSlots(settings.max_concurrent_streams)
    app[GATEWAY] = gateway
    app[ADMIN] = AdminDesk(gateway.ledger)
    app[ADDRESSES] = ClientAddresses(parse_networks(settings.trusted_proxies))
    app[VERIFIER] = verifier
    app[STATE] = state
    app.router.add_routes(routes)
    app.router.add_routes(admin_routes)  # /v1/admin: operators only
    app.router.add_routes(page_routes())  # /usage, /dashboard and their files
    app.router.add_routes(mcp_routes())  # /mcp: the same calls as MCP tools
    app.cleanup_ctx.append(mcp_lifecycle)  # the MCP SDK's task group, for the app's life
    app.router.add_routes(list(extra_routes))
    app.on_response_prepare.append(cors.on_response_prepare)
    app.on_response_prepare.append(server_header)
    app.on_response_prepare.append(request_id_header)
    return app


def split_addr(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    if not port.isdigit():
        raise ValueError(f"expected HOST:PORT, got {addr!r}")
    return host.strip("[]") or "0.0.0.0", int(port)  # noqa: S104 - ":8080" means every interface


class HttpServer:
    def __init__(self, app: web.Application) -> None:
        self.app = app
        self.port = 0
        self._runner: web.AppRunner | None = None

    async def start(self, addr: str) -> int:
        """Listens on `addr` (HOST:PORT, port 0 picks one); returns the port."""
        host, port = split_addr(addr)
        # access_log=None: the access line is ours (shared.observe, ACCESS_LOG), one per request.
        runner = EdgeRunner(self.app, shutdown_timeout=CANCEL_SECONDS, access_log=None)
        await runner.setup()
        try:
            await GuardedSite(runner, host, port, self.app[CONNECTIONS]).start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self.port = int(runner.addresses[0][1])
        return self.port

    async def stop(self, grace: float) -> None:
        """Stops listening and reports not ready, lets requests in flight (streams included)
        finish within `grace` seconds, then cancels the rest: a cancelled call releases or
        settles its hold like a client that left."""
        runner, self._runner = self._runner, None
        if runner is None:
            return
        state = self.app[STATE]
        state.draining = True
        for site in list(runner.sites):
            await site.stop()
        if not await state.wait_idle(grace):
            log.warning("http: cancelling %d request(s) still running", state.in_flight)
            await state.cancel_calls()
            await state.wait_idle(CANCEL_SECONDS)
        await runner.cleanup()
