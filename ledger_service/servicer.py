"""gRPC face of the ledger: proto in, domain call, proto out; domain errors become rich statuses."""

from __future__ import annotations

import base64
import binascii
import json
import logging
import uuid
from collections.abc import Awaitable, Callable
from datetime import datetime
from functools import wraps
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from ledger_service.domain import errors
from ledger_service.domain.ledger import Ledger, RefundRaced
from ledger_service.domain.types import (
    Balance,
    PurchaseRef,
    PurchaseType,
    Usage,
    UsageSummary,
    UserType,
)
from shared.gen.rpcai.ledger.v1 import ledger_pb2 as pb
from shared.gen.rpcai.ledger.v1 import ledger_pb2_grpc
from shared.rich_errors import rich_status

log = logging.getLogger(__name__)

DOMAIN = "ledger.rpcai"
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["LedgerService"].full_name

_CODES: dict[type[errors.LedgerError], grpc.StatusCode] = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.InsufficientBalance: grpc.StatusCode.FAILED_PRECONDITION,
    errors.IdempotencyKeyReused: grpc.StatusCode.ALREADY_EXISTS,
    errors.ReservationNotFound: grpc.StatusCode.NOT_FOUND,
    errors.PurchaseNotFound: grpc.StatusCode.NOT_FOUND,
    errors.ReservationNotHeld: grpc.StatusCode.FAILED_PRECONDITION,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
}

_PURCHASE_TYPES = {
    pb.PURCHASE_TYPE_SUBSCRIPTION: PurchaseType.SUBSCRIPTION,
    pb.PURCHASE_TYPE_ONE_TIME: PurchaseType.ONE_TIME,
}
_PURCHASE_TYPES_PB = {v: k for k, v in _PURCHASE_TYPES.items()}
_USER_TYPES = {
    pb.USER_TYPE_SUBSCRIPTION: UserType.SUBSCRIPTION,
    pb.USER_TYPE_BYOK: UserType.BYOK,
    pb.USER_TYPE_UNKNOWN: UserType.UNKNOWN,
}
_USER_TYPES_PB = {v: k for k, v in _USER_TYPES.items()}

if TYPE_CHECKING:
    Context = grpc.aio.ServicerContext[Any, Any]
else:
    Context = grpc.aio.ServicerContext

Req = TypeVar("Req")
Resp = TypeVar("Resp")
Handler = Callable[[Any, Req, Context], Awaitable[Resp]]


def rpc(method: Handler[Req, Resp]) -> Handler[Req, Resp]:
    """Turns domain errors into statuses with an ErrorInfo; anything else is INTERNAL."""

    @wraps(method)
    async def wrapper(self: Any, request: Req, context: Context) -> Resp:
        try:
            return await method(self, request, context)
        except errors.LedgerError as exc:
            code = _CODES.get(type(exc), grpc.StatusCode.INTERNAL)
            await context.abort_with_status(
                rich_status(code, exc.message, exc.reason, DOMAIN, exc.metadata)
            )
        except RefundRaced as exc:
            await context.abort_with_status(
                rich_status(grpc.StatusCode.ABORTED, str(exc), "CONCURRENT_REFUND", DOMAIN)
            )
        raise AssertionError("unreachable: abort_with_status raises")

    return wrapper


def _balance(b: Balance) -> pb.Balance:
    return pb.Balance(available_tokens=b.available, reserved_tokens=b.reserved)


def _ts(value: datetime) -> Timestamp:
    ts = Timestamp()
    ts.FromDatetime(value)
    return ts


def _usage(request_usage: pb.Usage, present: bool) -> Usage | None:
    if not present:
        return None
    u = request_usage
    return Usage(u.provider, u.model, u.input_tokens, u.output_tokens)


def _summary(s: UsageSummary) -> pb.UsageSummary:
    return pb.UsageSummary(
        total_requests=s.total_requests,
        total_tokens=s.total_tokens,
        tokens_charged=s.tokens_charged,
        estimated_total_cost_micro_usd=s.estimated_total_cost_micro_usd,
        unknown_cost_requests=s.unknown_cost_requests,
    )


def encode_page_token(cursor: tuple[datetime, str] | None) -> str:
    if cursor is None:
        return ""
    raw = json.dumps({"t": cursor[0].isoformat(), "id": cursor[1]}).encode()
    return base64.urlsafe_b64encode(raw).decode()


def decode_page_token(token: str) -> tuple[datetime, str] | None:
    if not token:
        return None
    try:
        data = json.loads(base64.urlsafe_b64decode(token.encode()))
        return datetime.fromisoformat(data["t"]), str(uuid.UUID(data["id"]))
    except (ValueError, KeyError, TypeError, AttributeError, binascii.Error):
        raise errors.InvalidArgument("page_token", "is not a token this server issued") from None


class LedgerServicer(ledger_pb2_grpc.LedgerServiceServicer):
    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger

    @rpc
    async def CreditPurchase(
        self, request: pb.CreditPurchaseRequest, context: Context
    ) -> pb.CreditPurchaseResponse:
        r = await self.ledger.credit_purchase(
            request.idempotency_key,
            request.user_id,
            request.tokens_purchased,
            _PURCHASE_TYPES.get(request.purchase_type),
            request.external_id,
            request.source,
        )
        return pb.CreditPurchaseResponse(
            purchase_id=r.purchase_id,
            tokens_credited=r.tokens_credited,
            platform_fee_tokens=r.platform_fee_tokens,
            balance=_balance(r.balance),
            replayed=r.replayed,
        )

    @rpc
    async def Reserve(self, request: pb.ReserveRequest, context: Context) -> pb.ReserveResponse:
        r = await self.ledger.reserve(
            request.idempotency_key,
            request.user_id,
            request.estimated_tokens,
            request.ttl_seconds,
            request.request_fingerprint,
        )
        return pb.ReserveResponse(
            reservation_id=r.reservation_id,
            reserved_tokens=r.reserved_tokens,
            expires_at=_ts(r.expires_at),
            balance=_balance(r.balance),
            replayed=r.replayed,
            status=r.status if r.replayed else "",
        )

    @rpc
    async def Settle(self, request: pb.SettleRequest, context: Context) -> pb.SettleResponse:
        cost = (
            request.estimated_cost_micro_usd
            if request.HasField("estimated_cost_micro_usd")
            else None
        )
        r = await self.ledger.settle(
            request.reservation_id, _usage(request.usage, request.HasField("usage")), cost
        )
        return pb.SettleResponse(
            tokens_used=r.tokens_used,
            fee_tokens=r.fee_tokens,
            tokens_charged=r.tokens_charged,
            released_tokens=r.released_tokens,
            unbilled_tokens=r.unbilled_tokens,
            balance=_balance(r.balance),
            replayed=r.replayed,
        )

    @rpc
    async def Release(self, request: pb.ReleaseRequest, context: Context) -> pb.ReleaseResponse:
        r = await self.ledger.release(request.reservation_id)
        return pb.ReleaseResponse(
            released_tokens=r.released_tokens, balance=_balance(r.balance), replayed=r.replayed
        )

    @rpc
    async def RefundPurchase(
        self, request: pb.RefundPurchaseRequest, context: Context
    ) -> pb.RefundPurchaseResponse:
        which = request.WhichOneof("purchase")
        if which == "purchase_id":
            ref = PurchaseRef(purchase_id=request.purchase_id)
        elif which == "external":
            ref = PurchaseRef(
                source=request.external.source, external_id=request.external.external_id
            )
        else:
            ref = PurchaseRef()  # neither: the domain refuses it
        r = await self.ledger.refund_purchase(
            request.idempotency_key, ref, request.tokens_to_refund
        )
        return pb.RefundPurchaseResponse(
            tokens_debited=r.tokens_debited,
            shortfall_tokens=r.shortfall_tokens,
            balance=_balance(r.balance),
            platform_fee_reversed=r.platform_fee_reversed,
            tokens_refunded=r.tokens_refunded,
            replayed=r.replayed,
        )

    @rpc
    async def RecordUsage(
        self, request: pb.RecordUsageRequest, context: Context
    ) -> pb.RecordUsageResponse:
        cost = (
            request.estimated_cost_micro_usd
            if request.HasField("estimated_cost_micro_usd")
            else None
        )
        r = await self.ledger.record_usage(
            request.idempotency_key,
            request.user_id,
            _USER_TYPES.get(request.user_type),
            _usage(request.usage, request.HasField("usage")),
            cost,
        )
        return pb.RecordUsageResponse(usage_id=r.usage_id, replayed=r.replayed)

    @rpc
    async def GetBalance(
        self, request: pb.GetBalanceRequest, context: Context
    ) -> pb.GetBalanceResponse:
        return pb.GetBalanceResponse(balance=_balance(await self.ledger.balance(request.user_id)))

    @rpc
    async def QuoteReserve(
        self, request: pb.QuoteReserveRequest, context: Context
    ) -> pb.QuoteReserveResponse:
        required, balance = await self.ledger.quote_reserve(
            request.user_id, request.estimated_tokens
        )
        return pb.QuoteReserveResponse(
            required_tokens=required,
            sufficient=balance.available >= required,
            balance=_balance(balance),
        )

    @rpc
    async def GetUserStatus(
        self, request: pb.GetUserStatusRequest, context: Context
    ) -> pb.GetUserStatusResponse:
        s = await self.ledger.user_status(request.user_id)
        return pb.GetUserStatusResponse(
            user_type=_USER_TYPES_PB[s.user_type],
            has_subscription=s.has_subscription,
            has_purchases=s.has_purchases,
            balance=_balance(s.balance),
        )

    @rpc
    async def GetUsageAnalytics(
        self, request: pb.GetUsageAnalyticsRequest, context: Context
    ) -> pb.GetUsageAnalyticsResponse:
        a = await self.ledger.usage_analytics(
            request.user_id, request.days, request.include_history
        )
        response = pb.GetUsageAnalyticsResponse(summary=_summary(a.summary))
        for b in a.breakdown:
            response.breakdown.add(provider=b.provider, model=b.model, summary=_summary(b.summary))
        for h in a.history:
            record = response.history.add(
                usage_id=h.usage_id,
                user_type=_USER_TYPES_PB[h.user_type],
                usage=pb.Usage(
                    provider=h.usage.provider,
                    model=h.usage.model,
                    input_tokens=h.usage.input_tokens,
                    output_tokens=h.usage.output_tokens,
                ),
                tokens_charged=h.tokens_charged,
                created_at=_ts(h.created_at),
            )
            if h.estimated_cost_micro_usd is not None:
                record.estimated_cost_micro_usd = h.estimated_cost_micro_usd
        return response

    @rpc
    async def GetPurchaseHistory(
        self, request: pb.GetPurchaseHistoryRequest, context: Context
    ) -> pb.GetPurchaseHistoryResponse:
        page = await self.ledger.purchase_history(
            request.user_id, request.page_size, decode_page_token(request.page_token)
        )
        response = pb.GetPurchaseHistoryResponse(
            next_page_token=encode_page_token(page.next_cursor)
        )
        for p in page.purchases:
            response.purchases.add(
                purchase_id=p.purchase_id,
                purchase_type=_PURCHASE_TYPES_PB[p.purchase_type],
                tokens_purchased=p.tokens_purchased,
                tokens_credited=p.tokens_credited,
                platform_fee_tokens=p.platform_fee_tokens,
                tokens_refunded=p.tokens_refunded,
                source=p.source,
                external_id=p.external_id,
                created_at=_ts(p.created_at),
            )
        return response
