"""The ledger's Prometheus metrics: the money it moved and the holds it kept, counted once per
operation that took effect (a replayed answer moves nothing and counts nothing), the group
commit's batches, its pool, and gauges of shared state read from Postgres when scraped.

Served at METRICS_ADDR (`/metrics`) by `serve_metrics`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence

import asyncpg
from aiohttp import web
from prometheus_client import Counter, Gauge, Histogram

from ledger_service.domain.types import PurchaseCredited, Refund, Release, Reservation, Settlement
from shared.metrics import LATENCY_BUCKETS, ScrapeGauge, render

log = logging.getLogger(__name__)

TOKENS_CREDITED = Counter(
    "rpcai_ledger_tokens_credited_total",
    "Usable tokens credited to users by purchases (their share; the platform fee apart).",
)
PURCHASE_FEE_TOKENS = Counter(
    "rpcai_ledger_purchase_fee_tokens_total",
    "Tokens of purchases kept as the platform's fee.",
)
TOKENS_CHARGED = Counter(
    "rpcai_ledger_tokens_charged_total",
    "Tokens charged for metered calls (provider usage plus the usage fee).",
)
USAGE_FEE_TOKENS = Counter(
    "rpcai_ledger_usage_fee_tokens_total",
    "Tokens of metered calls charged as the usage fee (part of the tokens charged).",
)
TOKENS_UNBILLED = Counter(
    "rpcai_ledger_tokens_unbilled_total",
    "Tokens a call used beyond what its user could pay (the platform's loss).",
)
TOKENS_REFUNDED = Counter(
    "rpcai_ledger_tokens_refunded_total",
    "Tokens taken back by refunds.",
)
BYOK_TOKENS = Counter(
    "rpcai_ledger_byok_tokens_total",
    "Provider tokens used by calls on the caller's own key (tracked, never charged).",
)
HOLDS = Counter(
    "rpcai_ledger_holds_total",
    "Holds by what happened to them: opened, settled, released, expired.",
    ["event"],
)
BATCH_ITEMS = Histogram(
    "rpcai_ledger_batch_items",
    "Hot-path writes applied per group-commit transaction.",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)
BATCH_WAIT = Histogram(
    "rpcai_ledger_batch_wait_seconds",
    "The longest wait of a write for its group-commit transaction, one per transaction.",
    buckets=LATENCY_BUCKETS,
)
STREAM_BATCHES_EXPIRED = Counter(
    "rpcai_ledger_stream_batches_expired",
    "ApplyBatches messages whose caller stopped waiting before they were applied (their writes"
    " that had not begun were not applied).",
)
POOL_IN_USE = Gauge(
    "rpcai_ledger_db_pool_connections_in_use",
    "Postgres connections of the pool in use now.",
    multiprocess_mode="livesum",
)
POOL_SIZE = Gauge(
    "rpcai_ledger_db_pool_connections",
    "Postgres connections the pool holds open now.",
    multiprocess_mode="livesum",
)
for _event in ("opened", "settled", "released", "expired"):
    HOLDS.labels(_event)

POOL_SAMPLE_SECONDS = 1.0


def credited(r: PurchaseCredited) -> None:
    if not r.replayed and not r.parked:
        TOKENS_CREDITED.inc(r.tokens_credited)
        PURCHASE_FEE_TOKENS.inc(r.platform_fee_tokens)


def reserved(r: Reservation) -> None:
    if not r.replayed:
        HOLDS.labels("opened").inc()


def settled(r: Settlement) -> None:
    if not r.replayed:
        HOLDS.labels("settled").inc()
        TOKENS_CHARGED.inc(r.tokens_charged)
        USAGE_FEE_TOKENS.inc(r.fee_tokens)
        TOKENS_UNBILLED.inc(r.unbilled_tokens)


def released(r: Release) -> None:
    if not r.replayed:
        HOLDS.labels("released").inc()


def refunded(r: Refund) -> None:
    if not r.replayed and not r.parked:
        TOKENS_REFUNDED.inc(r.tokens_refunded)


def byok_recorded(tokens: int, replayed: bool) -> None:
    if not replayed:
        BYOK_TOKENS.inc(tokens)


def expired(count: int) -> None:
    HOLDS.labels("expired").inc(count)


def scrape_gauges(pool: asyncpg.Pool) -> list[ScrapeGauge]:
    """Shared state, the same whichever worker is scraped: read from Postgres."""

    def count(sql: str) -> Callable[[], Awaitable[float]]:
        async def read() -> float:
            async with pool.acquire() as conn:
                return float(await conn.fetchval(sql))

        return read

    return [
        ScrapeGauge(
            "rpcai_ledger_holds_open",
            "Holds open now (reserved, neither settled, released nor expired).",
            count("SELECT count(*) FROM holds WHERE status = 'held'"),
        ),
        ScrapeGauge(
            "rpcai_ledger_dead_letters_open",
            "Payment events parked as dead letters and not yet resolved.",
            count("SELECT count(*) FROM dead_letters WHERE resolved_at IS NULL"),
        ),
    ]


async def sample_pool_forever(pool: asyncpg.Pool) -> None:
    while True:
        size = pool.get_size()
        POOL_SIZE.set(size)
        POOL_IN_USE.set(size - pool.get_idle_size())
        await asyncio.sleep(POOL_SAMPLE_SECONDS)


class MetricsServer:
    """`/metrics` on its own address (METRICS_ADDR). Workers share it (SO_REUSEPORT): whichever
    answers renders every worker's values."""

    def __init__(self, gauges: Sequence[ScrapeGauge]) -> None:
        self.gauges = list(gauges)
        self.port = 0
        self._runner: web.AppRunner | None = None

    async def _metrics(self, request: web.Request) -> web.Response:
        body, content_type = await render(self.gauges)
        response = web.Response(body=body)
        response.headers["Content-Type"] = content_type
        return response

    async def start(self, addr: str) -> int:
        host, _, port = addr.rpartition(":")
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, host.strip("[]") or "0.0.0.0", int(port), reuse_port=True)  # noqa: S104
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self.port = int(runner.addresses[0][1])
        return self.port

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            with contextlib.suppress(Exception):
                await runner.cleanup()
