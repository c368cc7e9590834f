"""The gateway's Prometheus metrics and the HTTP edge's `/metrics`: requests by route and status,
provider calls by provider, model and outcome (latency and time to the first token), hot-path
ledger writes by kind and outcome (and their latency), webhook events, rate-limit refusals, and
the outbox read from its file when scraped.

Models are labelled only when priced (gateway_service/pricing.py), every other name is "other":
a caller cannot mint series by naming models. The money itself (tokens credited, charged,
refunded) is counted by the ledger, which alone knows what took effect."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client import Counter, Gauge, Histogram

from gateway_service.pricing import PRICES
from shared import observe
from shared.metrics import LATENCY_BUCKETS, ScrapeGauge, render

if TYPE_CHECKING:
    from gateway_service.outbox import Outbox

HTTP_REQUESTS = Counter(
    "rpcai_http_requests_total",
    "HTTP requests answered by the edge, by route, method and status.",
    ["route", "method", "status"],
)
HTTP_SECONDS = Histogram(
    "rpcai_http_request_duration_seconds",
    "Time the edge took to answer (a stream: until its last event).",
    ["route", "method"],
    buckets=LATENCY_BUCKETS,
)
PROVIDER_CALLS = Counter(
    "rpcai_provider_calls_total",
    "Calls to a provider by provider, model and outcome (ok or the failure's kind).",
    ["provider", "model", "outcome"],
)
PROVIDER_SECONDS = Histogram(
    "rpcai_provider_call_duration_seconds",
    "Provider call time: to the whole answer, or to a stream's end.",
    ["provider", "model"],
    buckets=LATENCY_BUCKETS,
)
PROVIDER_FIRST_TOKEN = Histogram(
    "rpcai_provider_time_to_first_token_seconds",
    "From a stream's request to its first text delta.",
    ["provider", "model"],
    buckets=LATENCY_BUCKETS,
)
WEBHOOK_EVENTS = Counter(
    "rpcai_webhook_events_total",
    "Payment webhook deliveries by event kind and outcome.",
    ["source", "kind", "outcome"],
)
RATE_LIMIT_REFUSALS = Counter(
    "rpcai_rate_limit_refusals_total",
    "Calls refused by a rate limit or quota, by reason.",
    ["reason"],
)
PROVIDER_RETRIES = Counter(
    "rpcai_provider_retries_total",
    "Provider attempts made again after a retryable failure, by provider and the failure's kind.",
    ["provider", "outcome"],
)
PROVIDER_LOST_TOKENS = Counter(
    "rpcai_provider_retry_lost_tokens_total",
    "Provider tokens used by attempts that failed before anything reached the caller and were "
    "retried: never charged to a user (the platform's loss).",
    ["provider"],
)
PROVIDER_FALLBACKS = Counter(
    "rpcai_provider_fallbacks_total",
    "Subscription calls handed down their fallback chain: from the provider that could not "
    "serve, to the next candidate.",
    ["from_provider", "to_provider"],
)
BREAKER_STATE = Gauge(
    "rpcai_provider_breaker_state",
    "Each provider's circuit breaker in this process: 0 closed, 1 half-open, 2 open.",
    ["provider"],
    multiprocess_mode="livemax",  # with several workers: the worst live one
)

_KNOWN_MODELS = frozenset(model for _, model in PRICES)
METRICS_PATH = "/metrics"


def model_label(model: str) -> str:
    return model if model in _KNOWN_MODELS else "other"


LEDGER_WRITES = Counter(
    "rpcai_ledger_client_writes_total",
    "Hot-path ledger writes (reserve, settle, release, extend_hold, record_usage) by outcome: ok,"
    " the kind of a refusal, or unknown (no answer: unavailable, past its deadline).",
    ["write", "outcome"],
)
LOST_RESERVE_HOLDS = Counter(
    "rpcai_gateway_lost_reserve_holds_total",
    "Calls whose Reserve got no answer, by what the gateway then did about the hold it may have"
    " made: released, none (no hold, or already resolved), another_attempt (under the caller's"
    " idempotency key, a later attempt made the hold and may be serving on it), gave_up (the"
    " ledger did not answer; the TTL releases it), skipped (too many at once).",
    ["outcome"],
)
LEDGER_WRITE_SECONDS = Histogram(
    "rpcai_ledger_client_write_duration_seconds",
    "A hot-path ledger write from its start to the ledger's answer: the wait for its batch, the"
    " round trip and any retries. (The writes travel on one stream, which the gRPC metrics count"
    " as a single call.)",
    ["write"],
    buckets=LATENCY_BUCKETS,
)


def ledger_write_done(write: str, outcome: str, started: float) -> None:
    LEDGER_WRITES.labels(write, outcome).inc()
    LEDGER_WRITE_SECONDS.labels(write).observe(time.perf_counter() - started)


class ProviderCall:
    """Times one provider call; `done(outcome)` once, `first_token()` for streams."""

    __slots__ = ("_first", "model", "provider", "started")

    def __init__(self, provider: str, model: str) -> None:
        self.provider = provider
        self.model = model_label(model)
        self.started = time.perf_counter()
        self._first = False

    def first_token(self) -> None:
        if not self._first:
            self._first = True
            PROVIDER_FIRST_TOKEN.labels(self.provider, self.model).observe(
                time.perf_counter() - self.started
            )

    def done(self, outcome: str) -> None:
        PROVIDER_CALLS.labels(self.provider, self.model, outcome).inc()
        PROVIDER_SECONDS.labels(self.provider, self.model).observe(
            time.perf_counter() - self.started
        )


# ---- the HTTP edge ---------------------------------------------------------------------------

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_RECORD_KEY = web.RequestKey("rpcai.request_record", observe.RequestRecord)


def _route(request: web.Request) -> str:
    route = request.match_info.route
    resource = route.resource if route is not None else None
    return resource.canonical if resource is not None else "other"


@web.middleware
async def observe_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Counts, times and logs every request (one access line), and opens its request record."""
    record = observe.begin(
        f"{request.method} {request.path}"[:200],
        observe.request_id_from(request.headers.get(observe.REQUEST_ID_HEADER)),
        request.headers.get("traceparent"),
    )
    request[_RECORD_KEY] = record
    started = time.perf_counter()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as exc:
        status = exc.status
        raise
    except asyncio.CancelledError:
        status = 499  # the client went away (nginx's code for it)
        raise
    finally:
        elapsed = time.perf_counter() - started
        route = _route(request)
        method = request.method if request.method in _METHODS else "other"
        HTTP_REQUESTS.labels(route, method, str(status)).inc()
        HTTP_SECONDS.labels(route, method).observe(elapsed)
        if route != METRICS_PATH:
            observe.log_request(record, str(status), elapsed)


_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"})


async def request_id_header(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: every answer (streams too) names its request."""
    record = request.get(_RECORD_KEY)
    if record is not None:
        response.headers["X-Request-Id"] = record.request_id


def outbox_gauges(outbox: Outbox) -> list[ScrapeGauge]:
    """The outbox file is shared by the workers: read it, not a worker's memory (an outbox kept
    in memory only is this process's)."""
    path = outbox.path

    def read() -> tuple[int, float | None]:
        if path is None:
            return outbox.pending, None
        if not path.exists():
            return 0, None
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=1.0)
        try:
            count, oldest = db.execute("SELECT count(*), min(created_at) FROM jobs").fetchone()
        except sqlite3.OperationalError:  # no table yet
            return 0, None
        finally:
            db.close()
        return int(count), oldest

    async def depth() -> float:
        count, _ = await asyncio.to_thread(read)
        return float(count)

    async def age() -> float:
        _, oldest = await asyncio.to_thread(read)
        return 0.0 if oldest is None else max(0.0, time.time() - oldest)

    return [
        ScrapeGauge(
            "rpcai_gateway_outbox_depth",
            "Ledger writes (settles, releases, usage) waiting in the outbox for delivery.",
            depth,
        ),
        ScrapeGauge(
            "rpcai_gateway_outbox_oldest_age_seconds",
            "Age of the oldest write waiting in the outbox (0 when empty).",
            age,
        ),
    ]


def metrics_route(gauges: list[ScrapeGauge]) -> web.RouteDef:
    async def metrics(request: web.Request) -> web.Response:
        body, content_type = await render(gauges)
        response = web.Response(body=body)
        response.headers["Content-Type"] = content_type
        return response

    return web.get(METRICS_PATH, metrics)
