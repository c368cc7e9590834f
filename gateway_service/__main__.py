"""`python -m gateway_service`: serve the AiGateway gRPC API on GATEWAY_ADDR and the HTTP edge on
HTTP_ADDR until SIGTERM or SIGINT, then drain both within SHUTDOWN_GRACE_SECONDS."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys

from gateway_service.app import create_app
from shared import eventloop
from shared.config import Settings
from shared.logging_setup import configure_logging

log = logging.getLogger(__name__)


def _host(addr: str) -> str:
    return addr.rsplit(":", 1)[0]


async def serve(settings: Settings) -> None:
    app = create_app(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        port = await app.start(settings.gateway_addr)
        # Scripts read this first line for the gRPC address: keep it first and unchanged.
        print(f"gateway listening on {_host(settings.gateway_addr)}:{port}", flush=True)
        http_port = await app.start_http(settings.http_addr)
        print(f"gateway http listening on {_host(settings.http_addr)}:{http_port}", flush=True)
        await stop.wait()
        log.info(
            "shutting down: draining in-flight calls (grace %.1fs)",
            settings.shutdown_grace_seconds,
        )
    finally:
        await app.close(settings.shutdown_grace_seconds)
    log.info("stopped")


def main() -> int:
    settings = Settings()
    configure_logging(settings.log_level)
    eventloop.run(serve(settings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
