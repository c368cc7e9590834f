"""Wires the gateway process together: JWT verifier, ledger channel, providers, outbox, and the
two servers over the one core: gRPC and the HTTP edge."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from gateway_service.admin import AdminDesk
from gateway_service.admin_servicer import ADMIN_SERVICE_NAME, AdminServicer
from gateway_service.auth import JwtVerifier
from gateway_service.client_address import ClientAddresses, parse_networks
from gateway_service.core import CallLimits, Gateway
from gateway_service.http import HttpServer, create_http_app
from gateway_service.interceptor import JwtInterceptor
from gateway_service.ledger_client import LedgerClient
from gateway_service.limits.config import load_limits
from gateway_service.limits.gate import RateGate
from gateway_service.limits.limiter import (
    Limiter,
    LocalLimiter,
    RedisLimiter,
    ResilientLimiter,
    shared_client,
)
from gateway_service.metrics import metrics_route, outbox_gauges
from gateway_service.outbox import Outbox
from gateway_service.prompts import PromptLibrary
from gateway_service.providers import PROVIDER_NAMES, Providers, build_providers
from gateway_service.providers.fallback import Fallbacks
from gateway_service.providers.registry import policies_from
from gateway_service.servicer import SERVICE_NAME, GatewayServicer
from gateway_service.stream_slots import StreamSlots
from gateway_service.webhooks.http import lemonsqueezy_route
from gateway_service.webhooks.lemonsqueezy import Catalog, LemonSqueezyProcessor
from shared.config import Settings
from shared.gen.rpcai.gateway.v1 import admin_pb2_grpc, gateway_pb2_grpc
from shared.gen.rpcai.ledger.v1 import ledger_pb2 as lpb
from shared.grpc_server import GrpcApp, server_options
from shared.observe import ObservingInterceptor

log = logging.getLogger(__name__)


@dataclass
class GatewayApp:
    grpc: GrpcApp
    gateway: Gateway
    verifier: JwtVerifier
    ledger: LedgerClient
    providers: Providers
    outbox: Outbox
    http: HttpServer
    webhooks: LemonSqueezyProcessor

    async def start(self, addr: str) -> int:
        """Starts the outbox and the gRPC server; returns the gRPC port."""
        await self.outbox.start()
        await self.gateway.gate.warm()
        self.gateway.prompts.start()  # SIGHUP and polling reload the prompts
        return await self.grpc.start(addr)

    async def start_http(self, addr: str) -> int:
        """Starts the HTTP edge (after `start`); returns its port."""
        return await self.http.start(addr)

    async def close(self, grace: float = 0) -> None:
        # Both servers drain at once: in-flight calls get `grace` seconds on either transport.
        await asyncio.gather(self.grpc.stop(grace), self.http.stop(grace))
        await self.aclose_resources(grace)

    async def aclose_resources(self, grace: float = 5) -> None:
        await self.gateway.prompts.stop()
        await self.gateway.stop_background()
        await self.gateway.gate.close()
        if not await self.outbox.drain(grace):
            log.warning("outbox: %d ledger writes kept for the next start", self.outbox.pending)
        await self.outbox.close()
        await self.providers.aclose()
        await self.verifier.aclose()
        await self.ledger.close()


def _secret(value: object) -> str | None:
    getter = getattr(value, "get_secret_value", None)
    return getter() if getter else None


def build_rate_gate(settings: Settings) -> RateGate:
    """The configured limits, on Redis when REDIS_URL is set (shared by every replica), else in
    this process."""
    config = load_limits(settings.rate_limits, settings.rate_limits_file)
    local = LocalLimiter()
    limiter: Limiter = local
    url = _secret(settings.redis_url)
    if url:
        timeout = settings.rate_limit_redis_timeout_seconds
        limiter = ResilientLimiter(
            RedisLimiter(shared_client(url, timeout)),
            local,
            settings.rate_limit_redis_failure,
            timeout=timeout,
        )
    # A call's slot is let go by itself after the longest a call may run (a crashed replica's).
    return RateGate(limiter, config, lease_seconds=settings.stream_max_seconds + 60)


# The providers' SDKs log each request's options, body included (prompts, server-held ones
# rendered), at DEBUG: never below INFO, whatever LOG_LEVEL says.
_SDK_LOGGERS = ("anthropic", "openai")


def create_app(settings: Settings) -> GatewayApp:
    for name in _SDK_LOGGERS:
        logging.getLogger(name).setLevel(max(logging.INFO, logging.getLogger(name).level))
    token = _secret(settings.ledger_service_token)
    if not token:
        raise SystemExit("LEDGER_SERVICE_TOKEN is required to reach the ledger")
    if not settings.jwt_secret and not settings.jwt_jwks_url:
        raise SystemExit("JWT_SECRET or JWT_JWKS_URL is required")
    verifier = JwtVerifier.from_settings(settings)
    ledger = LedgerClient(settings.ledger_addr, token, settings.ledger_timeout_seconds)
    retry, breaker = policies_from(settings)
    try:
        fallbacks = Fallbacks.parse(settings.provider_fallbacks, PROVIDER_NAMES)
    except ValueError as exc:
        raise SystemExit(f"PROVIDER_FALLBACKS: {exc}") from None
    providers = build_providers(
        anthropic_api_key=_secret(settings.anthropic_api_key),
        openai_api_key=_secret(settings.openai_api_key),
        anthropic_base_url=settings.anthropic_base_url,
        openai_base_url=settings.openai_base_url,
        timeout_seconds=settings.provider_timeout_seconds,
        retry=retry,
        breaker=breaker,
        fallbacks=fallbacks,
    )

    async def send(method: str, payload: bytes) -> None:
        if method == "RecordUsage":
            await ledger.record_usage(lpb.RecordUsageRequest.FromString(payload))
        elif method == "Settle":
            await ledger.settle(lpb.SettleRequest.FromString(payload))
        elif method == "Release":
            await ledger.release(lpb.ReleaseRequest.FromString(payload))
        else:
            raise ValueError(f"unknown outbox method {method}")

    outbox = Outbox(send, settings.data_dir / "gateway-outbox.sqlite3")
    gate = build_rate_gate(settings)
    gateway = Gateway(
        ledger,
        providers,
        outbox,
        default_max_tokens=settings.default_max_tokens,
        max_prompt_chars=settings.max_prompt_chars,
        limits=CallLimits(
            hold_ttl_seconds=settings.hold_ttl_seconds,
            # The provider's timeout bounds each read; this bounds the whole call, after it.
            call_seconds=settings.provider_timeout_seconds + 5,
            stream_seconds=settings.stream_max_seconds,
            write_timeout_seconds=settings.stream_write_timeout_seconds,
        ),
        gate=gate,
        prompts=PromptLibrary(settings.prompts_dir, settings.prompts_reload_seconds),
    )
    grpc_app = GrpcApp(
        [SERVICE_NAME, ADMIN_SERVICE_NAME],
        interceptors=[ObservingInterceptor(), JwtInterceptor(verifier)],
        options=server_options(settings, per_connection_streams=True),
    )
    # One cap on streams for the whole process: gRPC and HTTP count against the same slots.
    streams = StreamSlots(settings.max_concurrent_streams)
    addresses = ClientAddresses(parse_networks(settings.trusted_proxies))
    gateway_pb2_grpc.add_AiGatewayServicer_to_server(
        GatewayServicer(gateway, addresses, streams=streams), grpc_app.server
    )
    admin = AdminDesk(ledger)
    admin_pb2_grpc.add_GatewayAdminServicer_to_server(AdminServicer(admin), grpc_app.server)
    webhooks = LemonSqueezyProcessor(
        ledger, Catalog.parse(settings.lemonsqueezy_variant_tokens), settings.lemonsqueezy_test_mode
    )
    webhook_route = lemonsqueezy_route(webhooks, _secret(settings.lemonsqueezy_webhook_secret))
    http = HttpServer(
        create_http_app(
            gateway,
            verifier,
            settings,
            extra_routes=[webhook_route, metrics_route(outbox_gauges(outbox))],
            stream_slots=streams,
        )
    )
    return GatewayApp(grpc_app, gateway, verifier, ledger, providers, outbox, http, webhooks)
