"""`python -m gateway_service`: serve the AiGateway gRPC API on GATEWAY_ADDR."""

from __future__ import annotations

import sys

from gateway_service.app import create_app
from shared import eventloop
from shared.config import Settings
from shared.grpc_server import run_until_signal
from shared.logging_setup import configure_logging


async def serve(settings: Settings) -> None:
    app = create_app(settings)
    await app.outbox.start()

    def started(port: int) -> None:
        host = settings.gateway_addr.rsplit(":", 1)[0]
        print(f"gateway listening on {host}:{port}", flush=True)

    await run_until_signal(
        app.grpc,
        settings.gateway_addr,
        settings.shutdown_grace_seconds,
        on_started=started,
        on_stopped=lambda: app.aclose_resources(settings.shutdown_grace_seconds),
    )


def main() -> int:
    settings = Settings()
    configure_logging(settings.log_level)
    eventloop.run(serve(settings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
