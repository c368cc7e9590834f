"""Prometheus metrics both services share: what a scrape renders, and the gRPC server's request
metrics. Each service keeps its own domain metrics in its `metrics` module.

Naming follows Prometheus conventions: an `rpcai_` prefix, `_total` counters, base units
(`_seconds`), and labels of low cardinality only: a method, a status, a provider, a known
model; never a user id, prompt, key or token.

With WORKERS=N the supervisor gives every worker one PROMETHEUS_MULTIPROC_DIR (shared/workers.py):
prometheus-client then keeps each worker's values in files there, and whichever worker answers
a scrape renders all of them. Gauges that describe shared state (open holds, the outbox, dead
letters) are not kept per process: they are read when scraped (`ScrapeGauge`)."""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# Latencies from a sub-millisecond ledger write to a minute-long stream.
LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
)

GRPC_HANDLED = Counter(
    "rpcai_grpc_server_handled_total",
    "gRPC calls completed by the server, by method and status code.",
    ["grpc_service", "grpc_method", "grpc_code"],
)
GRPC_SECONDS = Histogram(
    "rpcai_grpc_server_handling_seconds",
    "Time the server took to answer a gRPC call (a stream: until its last message).",
    ["grpc_service", "grpc_method"],
    buckets=LATENCY_BUCKETS,
)

GC_PAUSE_SECONDS = Histogram(
    "rpcai_gc_pause_seconds",
    "How long each collection of Python's cyclic garbage collector stopped the process, by"
    " generation (0 young, 2 full).",
    ["generation"],
    buckets=LATENCY_BUCKETS,
)


def observe_gc_pause(generation: int, seconds: float) -> None:
    GC_PAUSE_SECONDS.labels(str(generation)).observe(seconds)


def multiprocess_dir() -> str | None:
    return os.environ.get(MULTIPROC_ENV) or None


@dataclass
class ScrapeGauge:
    """A gauge whose value is read when scraped (an async query, e.g. a count in Postgres)."""

    name: str
    documentation: str
    read: Callable[[], Awaitable[float]]


class _Values(Collector):
    def __init__(self) -> None:
        self.families: list[Metric] = []

    def collect(self) -> Iterator[Metric]:
        return iter(self.families)


async def render(gauges: Sequence[ScrapeGauge] = ()) -> tuple[bytes, str]:
    """The exposition text of every metric of this service (all its workers'), plus `gauges`
    read now. A gauge whose read fails is left out of this scrape rather than failing it."""
    registry: CollectorRegistry | Collector
    values = _Values()
    for gauge in gauges:
        try:
            value = await gauge.read()
        except Exception as exc:  # a scrape reports what it can
            log.warning("metrics: %s not read (%s)", gauge.name, type(exc).__name__)
            continue
        values.families.append(GaugeMetricFamily(gauge.name, gauge.documentation, value=value))
    directory = multiprocess_dir()
    if directory:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=directory)  # type: ignore[no-untyped-call]
    else:
        registry = REGISTRY
    text = generate_latest(registry)
    if values.families:
        extra = CollectorRegistry()
        extra.register(values)
        text += generate_latest(extra)
    return text, CONTENT_TYPE_LATEST


def prepare_multiprocess_dir(directory: str) -> None:
    """Empties a metrics directory before a supervisor's first worker starts: values left by an
    earlier run would otherwise be added to this one's."""
    os.makedirs(directory, exist_ok=True)
    for name in os.listdir(directory):
        if name.endswith(".db"):
            os.remove(os.path.join(directory, name))


def label_or_other(value: str, known: Iterable[str]) -> str:
    """A label value from an open set kept to a known list, so a caller cannot mint series."""
    return value if value in known else "other"
