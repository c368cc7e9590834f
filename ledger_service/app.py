"""Wires the ledger process together: database, store, domain, gRPC server, background tasks
(hold sweeper, retention, analytics rollup)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field

import asyncpg

from ledger_service.auth import ServiceTokenInterceptor
from ledger_service.domain.ledger import HoldPolicy, Ledger
from ledger_service.domain.money import Rates
from ledger_service.domain.types import RetentionPolicy
from ledger_service.metrics import MetricsServer, sample_pool_forever, scrape_gauges
from ledger_service.servicer import SERVICE_NAME, LedgerServicer
from ledger_service.store.group_commit import GroupCommit
from ledger_service.store.postgres import PostgresStore, create_pool
from ledger_service.sweeper import retain_forever, rollup_forever, sweep_forever
from shared.config import Settings
from shared.gen.rpcai.ledger.v1 import ledger_pb2_grpc
from shared.grpc_server import GrpcApp, server_options
from shared.observe import ObservingInterceptor
from shared.workers import is_worker

log = logging.getLogger(__name__)


def build_ledger(store: PostgresStore, settings: Settings) -> Ledger:
    return Ledger(
        store,
        Rates(settings.purchase_user_share_percent, settings.usage_fee_percent),
        HoldPolicy(
            settings.reserve_default_ttl_seconds,
            settings.reserve_max_ttl_seconds,
            settings.answer_max_bytes,
            settings.quota_timezone,
        ),
    )


def retention_policy(settings: Settings) -> RetentionPolicy:
    return RetentionPolicy(
        transient_key_seconds=settings.transient_key_retention_seconds,
        key_seconds=settings.idempotency_key_retention_seconds,
        answer_seconds=settings.answer_retention_seconds,
        resolved_seconds=settings.resolved_retention_seconds,
    )


@dataclass
class LedgerApp:
    grpc: GrpcApp
    pool: asyncpg.Pool
    ledger: Ledger
    store: PostgresStore
    background: list[asyncio.Task[None]] = field(default_factory=list)
    # `/metrics` at METRICS_ADDR, when set.
    metrics: MetricsServer | None = None

    async def start(self, addr: str) -> int:
        return await self.grpc.start(addr)

    async def close(self, grace: float = 0) -> None:
        await self.grpc.stop(grace)
        await self.aclose_resources()

    async def aclose_resources(self) -> None:
        for task in self.background:
            task.cancel()
        for task in self.background:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.metrics is not None:
            await self.metrics.stop()
        # The gRPC server has drained: apply what it handed over, then close the pool.
        await self.store.aclose()
        await self.pool.close()


async def create_app(settings: Settings, database_url: str, run_sweeper: bool = True) -> LedgerApp:
    token = (
        settings.ledger_service_token.get_secret_value() if settings.ledger_service_token else ""
    )
    if not token:
        raise SystemExit(
            "LEDGER_SERVICE_TOKEN is required: the ledger never serves unauthenticated"
        )
    pool = await create_pool(database_url, settings.db_pool_min, settings.db_pool_max)
    batches = GroupCommit(
        pool,
        max_in_flight=min(settings.batches_in_flight, settings.db_pool_max),
        max_items=settings.batch_max_items,
        max_wait=settings.batch_max_wait_ms / 1000,
    )
    store = PostgresStore(pool, batches)
    ledger = build_ledger(store, settings)
    grpc_app = GrpcApp(
        [SERVICE_NAME],
        interceptors=[ObservingInterceptor(), ServiceTokenInterceptor(token)],
        # The gateway carries every call on one connection: no per-connection call cap.
        # One process: the port is its alone (a second ledger fails to bind). WORKERS: shared.
        options=[
            ("grpc.so_reuseport", int(is_worker())),
            *server_options(settings, per_connection_streams=False),
        ],
    )
    ledger_pb2_grpc.add_LedgerServiceServicer_to_server(
        LedgerServicer(ledger, grpc_app.draining), grpc_app.server
    )
    app = LedgerApp(grpc=grpc_app, pool=pool, ledger=ledger, store=store)
    app.background = [asyncio.create_task(sample_pool_forever(pool))]
    if settings.metrics_addr:
        app.metrics = MetricsServer(scrape_gauges(pool))
        await app.metrics.start(settings.metrics_addr)
        log.info(
            "metrics: http://%s:%d/metrics",
            settings.metrics_addr.rsplit(":", 1)[0],
            app.metrics.port,
        )
    if run_sweeper:
        app.background += [
            asyncio.create_task(
                sweep_forever(ledger, settings.sweep_interval_seconds, settings.sweep_batch_size)
            ),
            asyncio.create_task(
                retain_forever(
                    ledger, retention_policy(settings), settings.retention_interval_seconds
                )
            ),
            asyncio.create_task(rollup_forever(ledger, settings.analytics_rollup_interval_seconds)),
        ]
    return app
