"""Bootstrap shared by both services: a grpc.aio server with health, reflection and a graceful
shutdown on SIGTERM/SIGINT (stop accepting, let in-flight calls finish within the grace period)."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable, Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

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


class GrpcApp:
    """A grpc.aio server plus the health servicer that reports on it."""

    def __init__(
        self,
        service_names: Sequence[str],
        interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
        options: Sequence[tuple[str, int]] = (),
    ) -> None:
        self.server = grpc.aio.server(interceptors=list(interceptors), options=list(options))
        self.health = health.aio.HealthServicer()
        self.service_names = list(service_names)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            [*self.service_names, health.SERVICE_NAME, reflection.SERVICE_NAME], self.server
        )
        self.port = 0

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
