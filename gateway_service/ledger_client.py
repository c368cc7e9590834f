"""The gateway's one long-lived channel to the ledger: service token on every call, a deadline
on every call, transparent retries of UNAVAILABLE (every ledger write is idempotent), and ledger
failures turned into GatewayErrors.

One classification of ledger failures, used by the core and the outbox alike: an answer the
ledger gave about the request (invalid, not found, conflicting, insufficient) is definitive;
anything else (unavailable, deadline, cancelled, unknown, internal...) may not have been the
ledger's last word, so a write that must land is retried with the same request until it gets a
definitive answer."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Coroutine
from datetime import UTC, datetime
from typing import Any, TypeVar

import grpc
from google.rpc import error_details_pb2, status_pb2

from gateway_service.errors import Failure, GatewayError
from gateway_service.ledger_batch import MAX_BYTES, BatchUnsupported, WriteBatcher
from gateway_service.ledger_stream import BatchStream, Call
from gateway_service.metrics import RATE_LIMIT_REFUSALS, ledger_write_done
from shared import tracing
from shared.gen.rpcai.ledger.v1 import ledger_pb2 as lpb
from shared.gen.rpcai.ledger.v1 import ledger_pb2_grpc
from shared.rich_errors import error_info, status_info

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


_CODE_OF_VALUE = {code.value[0]: code for code in grpc.StatusCode}


class LedgerError(GatewayError):
    """A failed ledger call. `definitive`: the ledger's answer about the request itself."""

    def __init__(self, *args: Any, definitive: bool, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.definitive = definitive


def is_definitive(exc: GatewayError) -> bool:
    """False for a ledger failure that a retry of the same request may still turn around."""
    return not isinstance(exc, LedgerError) or exc.definitive


def ledger_failure(exc: grpc.aio.AioRpcError) -> LedgerError:
    return failure_of(exc.code(), exc.details() or "", error_info(exc))


def status_failure(status: status_pb2.Status) -> LedgerError:
    """The failure a batched write's status stands for: as if its own call had failed so."""
    code = _CODE_OF_VALUE.get(status.code, grpc.StatusCode.UNKNOWN)
    return failure_of(code, status.message, status_info(status))


def failure_of(
    code: grpc.StatusCode, details: str, info: error_details_pb2.ErrorInfo | None
) -> LedgerError:
    definitive = code in DEFINITIVE_CODES
    reason = info.reason if info else code.name
    metadata = dict(info.metadata) if info else {}
    if reason == "MONTHLY_QUOTA_EXCEEDED":
        RATE_LIMIT_REFUSALS.labels(reason).inc()
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
    failure = _BY_CODE.get(code, Failure.INTERNAL)
    if failure is Failure.UNAVAILABLE:
        return LedgerError(
            failure, "LEDGER_UNAVAILABLE", "the token ledger is unavailable", definitive=False
        )
    if failure is Failure.INTERNAL:
        return LedgerError(failure, "LEDGER_ERROR", "the token ledger failed", definitive=False)
    return LedgerError(failure, reason, details or reason, metadata, definitive=definitive)


def _batch_failure(exc: grpc.aio.AioRpcError | None) -> LedgerError:
    """A batch that failed as a whole (None: no answer for this write, e.g. its deadline passed
    while it waited to leave): not the ledger's last word on any of its writes."""
    if exc is not None:
        return ledger_failure(exc)
    return LedgerError(
        Failure.UNAVAILABLE,
        "LEDGER_UNAVAILABLE",
        "the token ledger is unavailable",
        definitive=False,
    )


# The same attempts and backoff as _SERVICE_CONFIG's retry policy gives a lone call.
_WRITE_ATTEMPTS = 3
_WRITE_BACKOFF = (0.05, 0.15)
# The RPC each kind of LedgerWrite stands for when sent alone.
RPC_OF_WRITE = {
    "reserve": "Reserve",
    "extend_hold": "ExtendHold",
    "settle": "Settle",
    "release": "Release",
    "record_usage": "RecordUsage",
}


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
            interceptors=tracing.client_interceptors(),  # none when tracing is off
        )
        self.stub = ledger_pb2_grpc.LedgerServiceStub(self.channel)
        self._metadata = (("authorization", f"Bearer {token}"),)
        self.timeout = timeout
        self.batcher = WriteBatcher(self._send_batch, _batch_failure, timeout)
        self.stream = BatchStream(self._open_stream, self._apply_batch)

    def _open_stream(self) -> Call:
        return self.stub.ApplyBatches(metadata=self._metadata)

    async def _apply_batch(
        self, request: lpb.ApplyBatchRequest, deadline: float
    ) -> lpb.ApplyBatchResponse:
        return await self.stub.ApplyBatch(request, metadata=self._metadata, timeout=deadline)

    async def _send_batch(
        self, request: lpb.ApplyBatchRequest, deadline: float
    ) -> lpb.ApplyBatchResponse:
        if tracing.enabled() or request.ByteSize() > MAX_BYTES:
            # A call per batch: its own server span, its writes' parents in its metadata; and
            # a lone write past the batcher's bound fails (if too large) its own call, not the
            # stream under the others.
            return await self._apply_batch(request, deadline)
        return await self.stream.send(request, deadline)

    def write(self, write: lpb.LedgerWrite) -> Coroutine[Any, Any, lpb.LedgerWriteResult]:
        """One hot-path write, batched with whatever other writes wait at the same moment; its
        response in the result's oneof, or a LedgerError exactly as its own call would raise.
        Traced (when tracing is on) as a client span of its own, named for the RPC it stands
        for, in the caller's context: every call's trace shows its own writes."""
        if tracing.enabled():
            return self._traced_write(write)
        return self._write(write)

    async def _traced_write(self, write: lpb.LedgerWrite) -> lpb.LedgerWriteResult:
        with tracing.write_span(RPC_OF_WRITE.get(write.WhichOneof("write") or "", "ApplyBatch")):
            return await self._write(write)

    async def _write(self, write: lpb.LedgerWrite) -> lpb.LedgerWriteResult:
        kind = write.WhichOneof("write")
        assert kind is not None
        started = time.perf_counter()
        outcome = "cancelled"
        try:
            result = await self._attempts(write, kind)
        except LedgerError as exc:
            outcome = exc.failure.value if exc.definitive else "unknown"
            raise
        except Exception:
            outcome = "error"
            raise
        else:
            outcome = "ok"
            return result
        finally:
            ledger_write_done(kind, outcome, started)

    async def _attempts(self, write: lpb.LedgerWrite, kind: str) -> lpb.LedgerWriteResult:
        for attempt in range(_WRITE_ATTEMPTS):
            if not self.batcher.supported:
                return await self._write_alone(write, kind)
            try:
                result = await self.batcher.write(write)
            except BatchUnsupported:
                return await self._write_alone(write, kind)
            answered = result.WhichOneof("result")
            if answered == kind:
                return result
            if answered != "error":
                raise _batch_failure(None)
            # What gRPC's retry policy does for a lone call: UNAVAILABLE is tried again.
            if result.error.code != grpc.StatusCode.UNAVAILABLE.value[0]:
                raise status_failure(result.error)
            if attempt + 1 == _WRITE_ATTEMPTS:
                raise status_failure(result.error)
            await asyncio.sleep(_WRITE_BACKOFF[attempt])
        raise AssertionError("unreachable")

    async def _write_alone(self, write: lpb.LedgerWrite, kind: str) -> lpb.LedgerWriteResult:
        """The write as its own call: for a ledger without ApplyBatch."""
        method = getattr(self.stub, RPC_OF_WRITE[kind])
        reply = await self.call(method, getattr(write, kind))
        return lpb.LedgerWriteResult(**{kind: reply})

    async def call(
        self, method: Callable[..., Awaitable[T]], request: Any, deadline: float | None = None
    ) -> T:
        try:
            return await method(request, metadata=self._metadata, timeout=deadline or self.timeout)
        except grpc.aio.AioRpcError as exc:
            raise ledger_failure(exc) from None

    async def reserve(self, request: lpb.ReserveRequest) -> lpb.ReserveResponse:
        return (await self.write(lpb.LedgerWrite(reserve=request))).reserve

    async def extend_hold(
        self, reservation_id: str, user_id: str, ttl_seconds: int
    ) -> lpb.ExtendHoldResponse:
        request = lpb.ExtendHoldRequest(
            reservation_id=reservation_id, user_id=user_id, ttl_seconds=ttl_seconds
        )
        return (await self.write(lpb.LedgerWrite(extend_hold=request))).extend_hold

    async def settle(self, request: lpb.SettleRequest) -> lpb.SettleResponse:
        return (await self.write(lpb.LedgerWrite(settle=request))).settle

    async def release(self, request: lpb.ReleaseRequest) -> lpb.ReleaseResponse:
        return (await self.write(lpb.LedgerWrite(release=request))).release

    async def record_usage(self, request: lpb.RecordUsageRequest) -> lpb.RecordUsageResponse:
        return (await self.write(lpb.LedgerWrite(record_usage=request))).record_usage

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
        await self.stream.close()
        await self.channel.close()
