"""`python -m ledger_service [serve|migrate|audit]`.

`serve` runs WORKERS processes (default: one per available core) on LEDGER_ADDR: the supervisor
(shared/workers.py) starts the embedded Postgres and applies the migrations once, then every
worker serves the same port; the hold sweeper and retention run in each, safely (SKIP LOCKED)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from ledger_service.app import create_app
from ledger_service.audit import run_audit
from ledger_service.store.database import migrate, resolve_database_url
from shared import eventloop, heap, tracing
from shared.config import Settings
from shared.grpc_server import run_until_signal
from shared.logging_setup import configure_logging
from shared.metrics import observe_gc_pause
from shared.open_files import raise_open_file_limit
from shared.workers import available_cores, become_worker, is_worker, reserve_address, supervise

log = logging.getLogger("ledger_service")


async def serve(settings: Settings, url: str) -> None:
    # Before the app: its gRPC server is built traced or not.
    tracing.setup_tracing(settings, tracing.LEDGER_SERVICE_NAME)
    app = await create_app(settings, url)
    # Before the server listens: no connection waits through the sweep (a worker restarting
    # under SO_REUSEPORT would hold the ones the kernel hands it).
    heap.watch_pauses(observe_gc_pause)  # the start-up sweep is the first pause it reports
    heap.settle()

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
    await asyncio.to_thread(tracing.shutdown)  # the spans still buffered are sent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ledger_service", description=__doc__)
    parser.add_argument(
        "command", nargs="?", default="serve", choices=["serve", "migrate", "audit"]
    )
    args = parser.parse_args(argv)
    become_worker()
    settings = Settings()
    configure_logging(
        settings.log_level,
        settings.log_format,
        "ledger",
        access_log=settings.access_log,
        secrets=settings.secret_values(),
    )
    url = resolve_database_url(settings.database_url, settings.data_dir)
    if args.command == "audit":
        report = asyncio.run(run_audit(url))
        print(report.render())
        return 0 if report.ok else 1
    if not is_worker():  # a worker's supervisor migrated already
        migrate(url)
    if args.command == "migrate":
        print("migrations applied")
        return 0
    workers = settings.workers or available_cores()
    if workers > 1 and not is_worker():
        addr, holder = reserve_address(settings.ledger_addr)
        holders = [holder]
        try:
            # The workers join this process's database (embedded or not) by its URL.
            env = {"DATABASE_URL": url, "LEDGER_ADDR": addr}
            if settings.metrics_addr:
                # One concrete port every worker's `/metrics` shares.
                env["METRICS_ADDR"], metrics_holder = reserve_address(settings.metrics_addr)
                holders.append(metrics_holder)
            return supervise(
                "ledger_service",
                ["serve"],
                workers,
                env,
                expect_lines=1,
                grace=settings.shutdown_grace_seconds,
            )
        finally:
            for held in holders:
                if held is not None:
                    held.close()
    raise_open_file_limit()  # every gRPC connection and pooled database connection is one
    eventloop.run(serve(settings, url))
    return 0


if __name__ == "__main__":
    sys.exit(main())
