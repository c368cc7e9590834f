"""The aiohttp application and its lifecycle."""

from __future__ import annotations

from collections.abc import Iterable

from aiohttp import web

from provider_sim.anthropic_wire import messages
from provider_sim.common import API_KEYS, ATTEMPTS, STATS, SimStats
from provider_sim.openai_wire import chat_completions


async def _health(_request: web.Request) -> web.Response:
    return web.Response(text="ok")


def create_app(api_keys: Iterable[str] | None = None) -> web.Application:
    """`api_keys`: when given, requests must carry one of them (else the provider's real 401)."""
    app = web.Application()
    app[STATS] = SimStats()
    app[API_KEYS] = frozenset(api_keys) if api_keys is not None else None
    app[ATTEMPTS] = {}
    app.router.add_post("/v1/messages", messages)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/health", _health)
    return app


async def start_provider_sim(
    host: str = "127.0.0.1", port: int = 0, api_keys: Iterable[str] | None = None
) -> tuple[web.AppRunner, int]:
    """Serve on host:port (0 picks a free port); returns the runner (`await runner.cleanup()`
    stops it) and the bound port. Stats are at `runner.app[STATS]`."""
    # No access log: the sim sits in benchmarks. Handler cancellation stops the work (delays,
    # paced streams) of a client that went away, as a real server would.
    runner = web.AppRunner(create_app(api_keys), access_log=None, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound_port = port
    for address in runner.addresses:
        bound_port = int(address[1])
        break
    return runner, bound_port
