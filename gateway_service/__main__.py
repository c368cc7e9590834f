"""`python -m gateway_service`: serve the AiGateway gRPC API on GATEWAY_ADDR and the HTTP edge on
HTTP_ADDR until SIGTERM or SIGINT, then drain both within SHUTDOWN_GRACE_SECONDS. It first raises
its open-file soft limit to the hard limit (shared.open_files) and warns if that is too low for the
connection and stream caps.

With WORKERS=N (N>1; unset: one per available core when REDIS_URL is set, else 1) it supervises N
worker processes that share both addresses (shared/workers.py). They share the outbox file too
(SQLite in WAL mode is safe across processes, and a lock file serializes its set-up; a worker
loads every pending job when it starts, so a replaced worker delivers what a dead one left, and
the ledger's keys make a job delivered twice change nothing).

`python -m gateway_service replay-dead-letters`: apply the parked LemonSqueezy events again (after
the configuration was fixed); prints what became of each, resolves the ones that applied."""

from __future__ import annotations

import argparse
import asyncio
import logging
import resource
import signal
import sys

from gateway_service.app import create_app
from gateway_service.webhooks.lemonsqueezy import SOURCE, Status
from shared import eventloop, heap, tracing
from shared.config import Settings
from shared.gen.rpcai.ledger.v1 import ledger_pb2 as lpb
from shared.logging_setup import configure_logging
from shared.metrics import observe_gc_pause
from shared.open_files import raise_open_file_limit
from shared.workers import available_cores, become_worker, is_worker, reserve_address, supervise

log = logging.getLogger(__name__)


def _host(addr: str) -> str:
    return addr.rsplit(":", 1)[0]


# Descriptors used beside the capped HTTP connections and streams (a stream's provider
# connection counts with the streams): gRPC clients, the ledger channel, the outbox, logs.
FD_HEADROOM = 256


def _open_files(settings: Settings) -> None:
    soft, _ = raise_open_file_limit()
    needed = settings.http_max_connections + settings.max_concurrent_streams + FD_HEADROOM
    if soft != resource.RLIM_INFINITY and soft < needed:
        log.warning(
            "open files: the limit %d is below HTTP_MAX_CONNECTIONS + MAX_CONCURRENT_STREAMS + %d"
            " = %d: near it, connections fail instead of being refused; raise the hard limit or"
            " lower the caps",
            soft,
            FD_HEADROOM,
            needed,
        )


async def serve(settings: Settings) -> None:
    # Before the app: its servers, ledger channel and provider sessions are built traced or not.
    tracing.setup_tracing(settings, tracing.GATEWAY_SERVICE_NAME)
    app = create_app(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # SIGHUP asks for a prompt reload (the prompt library takes it while it runs). Without
    # prompts, or while draining, its default action would end the process mid-call: ignored.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    # Before the servers listen: no connection waits through the sweep (a worker restarting
    # under SO_REUSEPORT would hold the ones the kernel hands it).
    heap.watch_pauses(observe_gc_pause)  # the start-up sweep is the first pause it reports
    heap.settle()
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
        await asyncio.to_thread(tracing.shutdown)  # the spans still buffered are sent
    log.info("stopped")


async def replay_dead_letters(settings: Settings) -> int:
    """Replays every open letter, oldest first, page by page (a cursor, so letters that stay
    dead are never fetched twice in a pass). Passes repeat while one resolves something: a
    letter may wait for another that comes later in the list (an invoice for its
    subscription's fixed variant)."""
    app = create_app(settings)
    replayed = 0
    try:
        while True:
            resolved, still_dead, token = 0, 0, ""
            while True:
                page = await app.ledger.call(
                    app.ledger.stub.ListDeadLetters,
                    lpb.ListDeadLettersRequest(source=SOURCE, page_size=100, page_token=token),
                )
                for letter in page.dead_letters:
                    outcome = await app.webhooks.replay(letter)
                    replayed += 1
                    if outcome.status is Status.DEAD_LETTER:
                        still_dead += 1
                    else:
                        resolved += 1
                    print(
                        f"{letter.dead_letter_id} {letter.event_name}: {outcome.status}"
                        f" ({outcome.detail})"
                    )
                token = page.next_page_token
                if not token:
                    break
            if not resolved or not still_dead:
                break
        print(f"{replayed} replayed, {still_dead} still unapplicable")
        return 1 if still_dead else 0
    finally:
        await app.close()


def worker_count(settings: Settings) -> int:
    if settings.workers is not None:
        if settings.workers > 1 and settings.redis_url is None:
            log.warning(
                "WORKERS=%d without REDIS_URL: each worker enforces the per-caller rate limits"
                " on its own (a caller gets up to %d times its limit)",
                settings.workers,
                settings.workers,
            )
        return settings.workers
    return available_cores() if settings.redis_url is not None else 1


def supervise_workers(settings: Settings, workers: int) -> int:
    grpc_addr, grpc_holder = reserve_address(settings.gateway_addr)
    http_addr, http_holder = reserve_address(settings.http_addr)
    try:
        env = {"GATEWAY_ADDR": grpc_addr, "HTTP_ADDR": http_addr}
        return supervise(
            "gateway_service",
            ["serve"],
            workers,
            env,
            expect_lines=2,
            grace=settings.shutdown_grace_seconds,
            forward=(signal.SIGHUP,),  # each worker reloads its prompts
        )
    finally:
        for holder in (grpc_holder, http_holder):
            if holder is not None:
                holder.close()


def main() -> int:
    parser = argparse.ArgumentParser(prog="gateway_service")
    parser.add_argument(
        "command", nargs="?", default="serve", choices=["serve", "replay-dead-letters"]
    )
    args = parser.parse_args()
    become_worker()
    settings = Settings()
    configure_logging(
        settings.log_level,
        settings.log_format,
        "gateway",
        access_log=settings.access_log,
        secrets=settings.secret_values(),
    )
    if args.command == "replay-dead-letters":
        return eventloop.run(replay_dead_letters(settings))
    if not is_worker() and (workers := worker_count(settings)) > 1:
        return supervise_workers(settings, workers)
    _open_files(settings)
    eventloop.run(serve(settings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
