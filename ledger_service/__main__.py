"""`python -m ledger_service [serve|migrate|audit]`."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from ledger_service.app import create_app
from ledger_service.audit import run_audit
from ledger_service.store.database import migrate, resolve_database_url
from shared import eventloop
from shared.config import Settings
from shared.grpc_server import run_until_signal
from shared.logging_setup import configure_logging
from shared.open_files import raise_open_file_limit

log = logging.getLogger("ledger_service")


async def serve(settings: Settings, url: str) -> None:
    app = await create_app(settings, url)

    def started(port: int) -> None:
        host = settings.ledger_addr.rsplit(":", 1)[0]
        # A parseable line: scripts and tests wait for it.
        print(f"ledger listening on {host}:{port}", flush=True)

    await run_until_signal(
        app.grpc,
        settings.ledger_addr,
        settings.shutdown_grace_seconds,
        on_started=started,
        on_stopped=app.aclose_resources,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ledger_service", description=__doc__)
    parser.add_argument(
        "command", nargs="?", default="serve", choices=["serve", "migrate", "audit"]
    )
    args = parser.parse_args(argv)
    settings = Settings()
    configure_logging(settings.log_level)
    url = resolve_database_url(settings.database_url, settings.data_dir)
    if args.command == "audit":
        report = asyncio.run(run_audit(url))
        print(report.render())
        return 0 if report.ok else 1
    migrate(url)
    if args.command == "migrate":
        print("migrations applied")
        return 0
    raise_open_file_limit()  # every gRPC connection and pooled database connection is one
    eventloop.run(serve(settings, url))
    return 0


if __name__ == "__main__":
    sys.exit(main())
