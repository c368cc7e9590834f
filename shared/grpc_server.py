"""Bootstrap shared by both services: a grpc.aio server with health, reflection and a graceful
shutdown on SIGTERM/SIGINT (stop accepting, let in-flight calls finish within the grace period),
and the transport limits both servers take from the settings (`server_options`)."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable, Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from shared import tracing
from shared.config import Settings

log = logging.getLogger(__name__)

# Public, read-only services that need no credentials (load balancers, grpcurl, ghz).
OPEN_SERVICES = frozenset(
    {
        "/grpc.health.v1.Health/",
        "/grpc.reflection.v1alpha.ServerReflection/",
        "/grpc.reflection.v1.ServerReflection/",
    }
)


def is_open_method(method: str) -> bool:
    return any(method.startswith(prefix) for prefix in OPEN_SERVICES)


def server_options(settings: Settings, *, per_connection_streams: bool) -> list[tuple[str, int]]:
    """gRPC core's own defaults let a connection take two minutes to finish its handshake, stay
    open forever without a call, and ping as often as it likes; these bound each. Keepalive
    enforcement: pings closer than GRPC_MIN_PING_INTERVAL_SECONDS with no data in between (or
    with no call under way, unless GRPC_KEEPALIVE_PERMIT_WITHOUT_CALLS) are strikes, and past
    GRPC_MAX_PING_STRIKES the client is sent GOAWAY. `per_connection_streams` caps the calls at
    once on one connection (HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS) at
    GRPC_MAX_CONCURRENT_STREAMS: for a public API, not for a server whose one client multiplexes
    everything on one channel."""

    def ms(seconds: float) -> int:
        return max(1, round(seconds * 1000))

    options = [
        # The argument gRPC core names GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS.
        (
            "grpc.http2.min_ping_interval_without_data_ms",
            ms(settings.grpc_min_ping_interval_seconds),
        ),
        ("grpc.http2.max_ping_strikes", settings.grpc_max_ping_strikes),
        ("grpc.keepalive_permit_without_calls", int(settings.grpc_keepalive_permit_without_calls)),
        ("grpc.server_handshake_timeout_ms", ms(settings.grpc_handshake_timeout_seconds)),
    ]
    if settings.grpc_max_connection_idle_seconds > 0:
        options.append(
            ("grpc.max_connection_idle_ms", ms(settings.grpc_max_connection_idle_seconds))
        )
    if per_connection_streams:
        options.append(("grpc.max_concurrent_streams", settings.grpc_max_concurrent_streams))
    return options


class GrpcApp:
    """A grpc.aio server plus the health servicer that reports on it."""

    def __init__(
        self,
        service_names: Sequence[str],
        interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
        options: Sequence[tuple[str, int]] = (),
    ) -> None:
        # Tracing first (when on), so the calls the other interceptors refuse are traced too.
        self.server = grpc.aio.server(
            interceptors=[*tracing.server_interceptors(), *interceptors], options=list(options)
        )
        self.health = health.aio.HealthServicer()
        self.service_names = list(service_names)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            [*self.service_names, health.SERVICE_NAME, reflection.SERVICE_NAME], self.server
        )
        self.port = 0
        # Set when the server starts to shut down: long-lived streams end themselves (they
        # would otherwise hold the drain for the whole grace period and be cut at its end).
        self.draining = asyncio.Event()

    async def start(self, addr: str) -> int:
        self.port = self.server.add_insecure_port(addr)
        if self.port == 0:
            raise RuntimeError(f"could not bind {addr}")
        await self.server.start()
        for name in ["", *self.service_names]:
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        return self.port

    async def stop(self, grace: float) -> None:
        # Tell load balancers first, then drain: in-flight calls get `grace` seconds to finish.
        await self.health.enter_graceful_shutdown()
        self.draining.set()
        await self.server.stop(grace)


async def run_until_signal(
    app: GrpcApp,
    addr: str,
    grace: float,
    on_started: Callable[[int], None] | None = None,
    on_stopped: Callable[[], Awaitable[None]] | None = None,
) -> None:
    port = await app.start(addr)
    if on_started:
        on_started(port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down: draining in-flight calls (grace %.1fs)", grace)
    await app.stop(grace)
    if on_stopped:
        await on_stopped()
    log.info("stopped")
