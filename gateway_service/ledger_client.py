"""The gateway's one long-lived channel to the ledger: service token on every call, a deadline
on every call, transparent retries of UNAVAILABLE (every ledger write is idempotent), and ledger
failures turned into GatewayErrors.

One classification of ledger failures, used by the core and the outbox alike: an answer the
ledger gave about the request (invalid, not found, conflicting, insufficient) is definitive;
anything else (unavailable, deadline, cancelled, unknown, internal...) may not have been the
ledger's last word, so a write that must land is retried with the same request until it gets a
definitive answer."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

import grpc

from gateway_service.errors import Failure, GatewayError
from shared.gen.rpcai.ledger.v1 import ledger_pb2 as lpb
from shared.gen.rpcai.ledger.v1 import ledger_pb2_grpc
from shared.rich_errors import error_info

T = TypeVar("T")

# Retries ride on gRPC's own retry support: safe because every mutating ledger call is keyed.
_SERVICE_CONFIG = json.dumps(
    {
        "methodConfig": [
            {
                "name": [{"service": "rpcai.ledger.v1.LedgerService"}],
                "retryPolicy": {
                    "maxAttempts": 3,
                    "initialBackoff": "0.05s",
                    "maxBackoff": "0.5s",
                    "backoffMultiplier": 3,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ]
    }
)

# The ledger's answers about the request itself: retrying the same request cannot change them.
DEFINITIVE_CODES = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.ALREADY_EXISTS,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.OUT_OF_RANGE,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    }
)

_BY_CODE = {
    grpc.StatusCode.INVALID_ARGUMENT: Failure.INVALID_ARGUMENT,
    grpc.StatusCode.ALREADY_EXISTS: Failure.CONFLICT,
    # e.g. RESERVATION_NOT_HELD: the hold was resolved another way; a retry cannot change it.
    grpc.StatusCode.FAILED_PRECONDITION: Failure.CONFLICT,
    grpc.StatusCode.NOT_FOUND: Failure.NOT_FOUND,
    grpc.StatusCode.UNAVAILABLE: Failure.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED: Failure.UNAVAILABLE,
    grpc.StatusCode.ABORTED: Failure.UNAVAILABLE,
}


class LedgerError(GatewayError):
    """A failed ledger call. `definitive`: the ledger's answer about the request itself."""

    def __init__(self, *args: Any, definitive: bool, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.definitive = definitive


def is_definitive(exc: GatewayError) -> bool:
    """False for a ledger failure that a retry of the same request may still turn around."""
    return not isinstance(exc, LedgerError) or exc.definitive


def ledger_failure(exc: grpc.aio.AioRpcError) -> LedgerError:
    definitive = exc.code() in DEFINITIVE_CODES
    info = error_info(exc)
    reason = info.reason if info else exc.code().name
    metadata = dict(info.metadata) if info else {}
    if reason == "MONTHLY_QUOTA_EXCEEDED":
        resets_at = datetime.fromisoformat(metadata["resets_at"])
        return LedgerError(
            Failure.RATE_LIMITED,
            reason,
            "this month's token quota is used up",
            metadata,
            retry_after=max(1.0, (resets_at - datetime.now(UTC)).total_seconds()),
            definitive=definitive,
        )
    if reason == "INSUFFICIENT_BALANCE":
        return LedgerError(
            Failure.INSUFFICIENT_BALANCE,
            reason,
            "not enough tokens for this request",
            metadata,
            definitive=definitive,
        )
    failure = _BY_CODE.get(exc.code(), Failure.INTERNAL)
    if failure is Failure.UNAVAILABLE:
        return LedgerError(
            failure, "LEDGER_UNAVAILABLE", "the token ledger is unavailable", definitive=False
        )
    if failure is Failure.INTERNAL:
        return LedgerError(failure, "LEDGER_ERROR", "the token ledger failed", definitive=False)
    return LedgerError(failure, reason, exc.details() or reason, metadata, definitive=definitive)


class LedgerClient:
    def __init__(self, address: str, token: str, timeout: float) -> None:
        self.channel = grpc.aio.insecure_channel(
            address,
            options=[
                ("grpc.service_config", _SERVICE_CONFIG),
                ("grpc.enable_retries", 1),
                ("grpc.keepalive_time_ms", 30_000),
                # Find a restarted ledger within seconds, not the default minutes of backoff.
                ("grpc.initial_reconnect_backoff_ms", 200),
                ("grpc.max_reconnect_backoff_ms", 2_000),
            ],
        )
        self.stub = ledger_pb2_grpc.LedgerServiceStub(self.channel)
        self._metadata = (("authorization", f"Bearer {token}"),)
        self.timeout = timeout

    async def call(
        self, method: Callable[..., Awaitable[T]], request: Any, deadline: float | None = None
    ) -> T:
        try:
            return await method(request, metadata=self._metadata, timeout=deadline or self.timeout)
        except grpc.aio.AioRpcError as exc:
            raise ledger_failure(exc) from None

    async def reserve(self, request: lpb.ReserveRequest) -> lpb.ReserveResponse:
        return await self.call(self.stub.Reserve, request)

    async def extend_hold(
        self, reservation_id: str, user_id: str, ttl_seconds: int
    ) -> lpb.ExtendHoldResponse:
        request = lpb.ExtendHoldRequest(
            reservation_id=reservation_id, user_id=user_id, ttl_seconds=ttl_seconds
        )
        return await self.call(self.stub.ExtendHold, request)

    async def settle(self, request: lpb.SettleRequest) -> lpb.SettleResponse:
        return await self.call(self.stub.Settle, request)

    async def release(self, request: lpb.ReleaseRequest) -> lpb.ReleaseResponse:
        return await self.call(self.stub.Release, request)

    async def record_usage(self, request: lpb.RecordUsageRequest) -> lpb.RecordUsageResponse:
        return await self.call(self.stub.RecordUsage, request)

    async def user_status(self, user_id: str) -> lpb.GetUserStatusResponse:
        return await self.call(self.stub.GetUserStatus, lpb.GetUserStatusRequest(user_id=user_id))

    async def quote(
        self, user_id: str, estimated: int, monthly_quota: int = 0
    ) -> lpb.QuoteReserveResponse:
        return await self.call(
            self.stub.QuoteReserve,
            lpb.QuoteReserveRequest(
                user_id=user_id, estimated_tokens=estimated, monthly_quota=monthly_quota
            ),
        )

    async def usage_analytics(
        self, user_id: str, days: int, include_history: bool
    ) -> lpb.GetUsageAnalyticsResponse:
        return await self.call(
            self.stub.GetUsageAnalytics,
            lpb.GetUsageAnalyticsRequest(
                user_id=user_id, days=days, include_history=include_history
            ),
        )

    async def purchase_history(
        self, user_id: str, page_size: int, page_token: str
    ) -> lpb.GetPurchaseHistoryResponse:
        return await self.call(
            self.stub.GetPurchaseHistory,
            lpb.GetPurchaseHistoryRequest(
                user_id=user_id, page_size=page_size, page_token=page_token
            ),
        )

    async def ready(self) -> bool:
        """The ledger answers (its health check says SERVING)."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        try:
            reply = await health_pb2_grpc.HealthStub(self.channel).Check(
                health_pb2.HealthCheckRequest(), timeout=self.timeout
            )
        except grpc.aio.AioRpcError:
            return False
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

    async def close(self) -> None:
        await self.channel.close()
