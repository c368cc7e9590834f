"""gRPC face of the ledger: proto in, domain call, proto out; domain errors become rich statuses."""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from functools import wraps
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from google.rpc import error_details_pb2

from ledger_service import metrics
from ledger_service.domain import errors
from ledger_service.domain.ledger import Ledger
from ledger_service.domain.types import (
    Balance,
    DeadLetter,
    Granularity,
    ModelFigures,
    MonthlyUsage,
    Payment,
    PlatformFigures,
    PurchaseRef,
    PurchaseType,
    RefundShare,
    Settlement,
    Subscription,
    Usage,
    UsageSummary,
    UserType,
)
from shared import tracing
from shared.gen.rpcai.ledger.v1 import ledger_pb2 as pb
from shared.gen.rpcai.ledger.v1 import ledger_pb2_grpc
from shared.rich_errors import rich_status, status_proto

log = logging.getLogger(__name__)

DOMAIN = "ledger.rpcai"
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["LedgerService"].full_name
# A bound on one ApplyBatch (the gateway sends at most 64).
MAX_BATCH_WRITES = 256
# Batches of one ApplyBatches stream being applied at once: past it the stream reads no further
# until one is answered (a caller cannot queue unbounded work here; the gateway sends 2).
MAX_STREAM_BATCHES = 16
# A batch's writes are begun only until this long before its caller's deadline as the ledger
# sees it (at most a tenth of the time given). That deadline is counted from when the ledger read
# the batch, later than when its caller began counting: without a margin a write could begin
# after its caller stopped waiting, and a Reserve would then hold tokens that nobody releases
# before its TTL (a CI run saw it: the batch read a few ms late, its row unlocked just after).
DEADLINE_MARGIN_SECONDS = 0.05

_CODES: dict[type[errors.LedgerError], grpc.StatusCode] = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.InsufficientBalance: grpc.StatusCode.FAILED_PRECONDITION,
    errors.IdempotencyKeyReused: grpc.StatusCode.ALREADY_EXISTS,
    errors.ReservationNotFound: grpc.StatusCode.NOT_FOUND,
    errors.PurchaseNotFound: grpc.StatusCode.NOT_FOUND,
    errors.ReservationNotHeld: grpc.StatusCode.FAILED_PRECONDITION,
    errors.SubscriptionNotFound: grpc.StatusCode.NOT_FOUND,
    errors.DeadLetterNotFound: grpc.StatusCode.NOT_FOUND,
    errors.SubscriptionTokensUnknown: grpc.StatusCode.FAILED_PRECONDITION,
    errors.TransactionConflict: grpc.StatusCode.ABORTED,
    errors.MonthlyQuotaExceeded: grpc.StatusCode.RESOURCE_EXHAUSTED,
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
    pb.USER_TYPE_PUBLIC_BYOK: UserType.PUBLIC_BYOK,
}
_USER_TYPES_PB = {v: k for k, v in _USER_TYPES.items()}
_GRANULARITIES = {
    pb.GRANULARITY_UNSPECIFIED: Granularity.DAY,  # the proto's default
    pb.GRANULARITY_HOUR: Granularity.HOUR,
    pb.GRANULARITY_DAY: Granularity.DAY,
    pb.GRANULARITY_MONTH: Granularity.MONTH,
}

if TYPE_CHECKING:
    Context = grpc.aio.ServicerContext[Any, Any]
else:
    Context = grpc.aio.ServicerContext

Req = TypeVar("Req")
Resp = TypeVar("Resp")
Handler = Callable[[Any, Req, Context], Awaitable[Resp]]


def _details(exc: errors.LedgerError) -> list[error_details_pb2.BadRequest]:
    """Beyond the ErrorInfo: a bad argument is also a google.rpc.BadRequest field violation,
    the detail generic gRPC clients know."""
    if not isinstance(exc, errors.InvalidArgument):
        return []
    problem = exc.message.split(": ", 1)[-1]
    violation = error_details_pb2.BadRequest.FieldViolation(field=exc.field, description=problem)
    return [error_details_pb2.BadRequest(field_violations=[violation])]


def rpc(method: Handler[Req, Resp]) -> Handler[Req, Resp]:
    """Turns domain errors into statuses with an ErrorInfo; anything else is INTERNAL."""

    @wraps(method)
    async def wrapper(self: Any, request: Req, context: Context) -> Resp:
        try:
            return await method(self, request, context)
        except errors.LedgerError as exc:
            code = _CODES.get(type(exc), grpc.StatusCode.INTERNAL)
            await context.abort_with_status(
                rich_status(code, exc.message, exc.reason, DOMAIN, exc.metadata, _details(exc))
            )
        except grpc.aio.BaseError:
            raise  # gRPC's own: the method's abort stands, or the call is over
        except Exception:
            # Not gRPC's UNKNOWN "Unexpected <class>: <message>": the message of a database
            # error may quote the data it was about. The log keeps it; a batched write of the
            # same kind answers the same (_apply_write).
            log.exception("%s failed", method.__name__)
            await context.abort_with_status(
                rich_status(grpc.StatusCode.INTERNAL, "internal error", "INTERNAL", DOMAIN)
            )
        raise AssertionError("unreachable: abort_with_status raises")

    return wrapper


def _check_batch(request: pb.ApplyBatchRequest) -> None:
    if len(request.writes) > MAX_BATCH_WRITES:
        raise errors.InvalidArgument("writes", f"holds more than {MAX_BATCH_WRITES} writes")


async def _applied(
    request: pb.ApplyBatchRequest,
    apply: Callable[[pb.LedgerWrite], Awaitable[pb.LedgerWriteResult]],
) -> pb.ApplyBatchResponse:
    if len(request.writes) == 1:  # the common case at low load: no task to spawn
        return pb.ApplyBatchResponse(results=[await apply(request.writes[0])])
    # Concurrently, so the writes of one batch share the ledger's group commits.
    results = await asyncio.gather(*(apply(write) for write in request.writes))
    return pb.ApplyBatchResponse(results=results)


def _begin_within(seconds: float) -> float:
    """How long a batch's writes may still be begun, of the `seconds` its caller waits."""
    return seconds - min(DEADLINE_MARGIN_SECONDS, seconds / 10)


async def _applied_within(
    request: pb.ApplyBatchRequest,
    apply: Callable[[pb.LedgerWrite], Awaitable[pb.LedgerWriteResult]],
    seconds: float | None,
    *,
    streamed: bool,
) -> pb.ApplyBatchResponse:
    """A batch applied while its caller still waits (`seconds`, counted from when this ledger
    read it: a stream's `timeout_ms`, a call's deadline), less a margin. Past that the batch is
    cancelled as a call past its deadline is: a write already in a group commit is applied, one
    still waiting for its turn never is, and every write answers DEADLINE_EXCEEDED (an unknown
    outcome, which its caller takes it for)."""
    if seconds is None:
        return await _applied(request, apply)
    try:
        async with asyncio.timeout(_begin_within(seconds)):
            return await _applied(request, apply)
    except TimeoutError:
        if streamed:
            metrics.STREAM_BATCHES_EXPIRED.inc()
        late = pb.LedgerWriteResult(
            error=status_proto(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                "its caller stopped waiting before the ledger applied it",
                "DEADLINE_EXCEEDED",
                DOMAIN,
            )
        )
        return pb.ApplyBatchResponse(results=[late] * len(request.writes))


def _error_result(exc: errors.LedgerError) -> pb.LedgerWriteResult:
    """The status a write's own call would have failed with."""
    code = _CODES.get(type(exc), grpc.StatusCode.INTERNAL)
    return pb.LedgerWriteResult(
        error=status_proto(code, exc.message, exc.reason, DOMAIN, exc.metadata, _details(exc))
    )


def _balance(b: Balance) -> pb.Balance:
    return pb.Balance(available_tokens=b.available, reserved_tokens=b.reserved, owed_tokens=b.owed)


def _month_pb(m: MonthlyUsage) -> pb.MonthlyUsage:
    return pb.MonthlyUsage(
        starts_at=_ts(m.starts_at),
        resets_at=_ts(m.resets_at),
        charged_tokens=m.charged,
        held_tokens=m.held,
    )


def _settlement_pb(r: Settlement) -> pb.SettleResponse:
    return pb.SettleResponse(
        tokens_used=r.tokens_used,
        fee_tokens=r.fee_tokens,
        tokens_charged=r.tokens_charged,
        released_tokens=r.released_tokens,
        unbilled_tokens=r.unbilled_tokens,
        balance=_balance(r.balance),
        replayed=r.replayed,
        overrun_tokens=r.overrun_tokens,
        owed_collected=r.owed_collected,
        answer_stored=r.answer_stored,
    )


def _ts(value: datetime) -> Timestamp:
    ts = Timestamp()
    ts.FromDatetime(value)
    return ts


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# What both a Timestamp and a Python datetime can hold: 0001-01-01 .. 9999-12-31T23:59:59Z.
_MIN_SECONDS = -62_135_596_800
_MAX_SECONDS = 253_402_300_799


def _moment(ts: Timestamp, field: str) -> datetime:
    """A request's Timestamp as an aware datetime (to the microsecond, as Postgres keeps it)."""
    if not (_MIN_SECONDS <= ts.seconds <= _MAX_SECONDS and 0 <= ts.nanos < 1_000_000_000):
        raise errors.InvalidArgument(field, "is not a valid timestamp")
    return _EPOCH + timedelta(seconds=ts.seconds, microseconds=ts.nanos // 1000)


def _payment(request: pb.Payment) -> Payment:
    usd = request.amount_usd_cents if request.HasField("amount_usd_cents") else None
    return Payment(request.currency, request.amount_minor, usd)


def _payment_pb(p: Payment) -> pb.Payment:
    message = pb.Payment(currency=p.currency, amount_minor=p.amount_minor)
    if p.amount_usd_cents is not None:
        message.amount_usd_cents = p.amount_usd_cents
    return message


def _model_pb(m: ModelFigures) -> pb.ModelFigures:
    return pb.ModelFigures(
        provider=m.provider,
        model=m.model,
        requests=m.usage.requests,
        provider_tokens_used=m.usage.provider_tokens_used,
        tokens_charged=m.usage.tokens_charged,
        usage_fee_tokens=m.usage.usage_fee_tokens,
        provider_cost_micro_usd=m.usage.provider_cost_micro_usd,
        unknown_cost_requests=m.usage.unknown_cost_requests,
        byok_cost_micro_usd=m.usage.byok_cost_micro_usd,
        gross_margin_micro_usd=m.gross_margin_micro_usd,
    )


def _figures_pb(f: PlatformFigures) -> pb.PlatformFigures:
    u, j, users = f.usage, f.journal, f.users
    return pb.PlatformFigures(
        purchases=f.purchases,
        tokens_sold=f.tokens_sold,
        tokens_credited=f.tokens_credited,
        purchase_fee_tokens=f.purchase_fee_tokens,
        revenue=[
            pb.CurrencyAmount(currency=r.currency, amount_minor=r.amount_minor) for r in f.revenue
        ],
        revenue_micro_usd=f.revenue_micro_usd,
        purchases_without_amount=f.purchases_without_amount,
        requests=u.requests,
        provider_tokens_used=u.provider_tokens_used,
        tokens_charged=u.tokens_charged,
        usage_fee_tokens=u.usage_fee_tokens,
        provider_cost_micro_usd=u.provider_cost_micro_usd,
        unknown_cost_requests=u.unknown_cost_requests,
        byok_cost_micro_usd=u.byok_cost_micro_usd,
        gross_margin_micro_usd=f.gross_margin_micro_usd,
        tokens_refunded=j.tokens_refunded,
        shortfall_tokens=j.shortfall_tokens,
        unbilled_tokens=j.unbilled_tokens,
        active_users=users.active,
        subscription_users=users.subscription,
        byok_users=users.byok,
        public_byok_requests=u.public_byok_requests,
    )


def _subscription_pb(s: Subscription) -> pb.Subscription:
    message = pb.Subscription(
        source=s.source,
        external_id=s.external_id,
        user_id=s.user_id,
        variant_id=s.variant_id,
        status=s.status,
        provider_updated_at=_ts(s.provider_updated_at),
        tokens_per_period=s.tokens_per_period or 0,
    )
    if s.renews_at is not None:
        message.renews_at.CopyFrom(_ts(s.renews_at))
    if s.ends_at is not None:
        message.ends_at.CopyFrom(_ts(s.ends_at))
    return message


def _dead_letter_pb(d: DeadLetter) -> pb.DeadLetter:
    message = pb.DeadLetter(
        dead_letter_id=d.dead_letter_id,
        source=d.source,
        event_name=d.event_name,
        subject=d.subject,
        reason=d.reason,
        raw_body=d.raw_body,
        created_at=_ts(d.created_at),
        resolution=d.resolution or "",
    )
    if d.resolved_at is not None:
        message.resolved_at.CopyFrom(_ts(d.resolved_at))
    return message


def _usage(request_usage: pb.Usage, present: bool) -> Usage | None:
    if not present:
        return None
    u = request_usage
    if not u.HasField("prompt"):
        return Usage(u.provider, u.model, u.input_tokens, u.output_tokens)
    return Usage(
        u.provider, u.model, u.input_tokens, u.output_tokens, u.prompt.id, u.prompt.version
    )


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
    def __init__(self, ledger: Ledger, draining: asyncio.Event | None = None) -> None:
        self.ledger = ledger
        # Set when the server begins to shut down (GrpcApp.draining): streams end themselves.
        self._draining = draining or asyncio.Event()

    @rpc
    async def CreditPurchase(
        self, request: pb.CreditPurchaseRequest, context: Context
    ) -> pb.CreditPurchaseResponse:
        subscription = None
        if request.HasField("subscription"):
            if request.subscription.source not in ("", request.source):
                raise errors.InvalidArgument(
                    "subscription.source", "must be the payment's own source"
                )
            subscription = request.subscription.external_id
        r = await self.ledger.credit_purchase(
            request.idempotency_key,
            request.user_id,
            request.tokens_purchased,
            _PURCHASE_TYPES.get(request.purchase_type),
            request.external_id,
            request.source,
            subscription,
            _payment(request.payment) if request.HasField("payment") else None,
        )
        metrics.credited(r)
        return pb.CreditPurchaseResponse(
            purchase_id=r.purchase_id,
            tokens_credited=r.tokens_credited,
            platform_fee_tokens=r.platform_fee_tokens,
            balance=_balance(r.balance),
            replayed=r.replayed,
            parked=r.parked,
            owed_collected=r.owed_collected,
        )

    async def _reserve(self, request: pb.ReserveRequest) -> pb.ReserveResponse:
        r = await self.ledger.reserve(
            request.idempotency_key,
            request.user_id,
            request.estimated_tokens,
            request.ttl_seconds,
            request.request_fingerprint,
            request.transient_key,
            request.monthly_quota,
            _moment(request.quota_at, "quota_at") if request.HasField("quota_at") else None,
            request.attempt_id,
        )
        metrics.reserved(r)
        return pb.ReserveResponse(
            reservation_id=r.reservation_id,
            reserved_tokens=r.reserved_tokens,
            expires_at=_ts(r.expires_at),
            balance=_balance(r.balance),
            replayed=r.replayed,
            status=r.status if r.replayed else "",
            answer=r.answer or b"",
            settlement=None if r.settlement is None else _settlement_pb(r.settlement),
            attempt_id=r.attempt_id,
        )

    async def _extend_hold(self, request: pb.ExtendHoldRequest) -> pb.ExtendHoldResponse:
        r = await self.ledger.extend_hold(
            request.reservation_id, request.ttl_seconds, user_id=request.user_id
        )
        return pb.ExtendHoldResponse(expires_at=_ts(r.expires_at))

    async def _settle(self, request: pb.SettleRequest) -> pb.SettleResponse:
        cost = (
            request.estimated_cost_micro_usd
            if request.HasField("estimated_cost_micro_usd")
            else None
        )
        r = await self.ledger.settle(
            request.reservation_id,
            _usage(request.usage, request.HasField("usage")),
            cost,
            request.answer,
            user_id=request.user_id,
        )
        metrics.settled(r)
        return _settlement_pb(r)

    async def _release(self, request: pb.ReleaseRequest) -> pb.ReleaseResponse:
        r = await self.ledger.release(request.reservation_id, user_id=request.user_id)
        metrics.released(r)
        return pb.ReleaseResponse(
            released_tokens=r.released_tokens,
            balance=_balance(r.balance),
            replayed=r.replayed,
            owed_collected=r.owed_collected,
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
        share = None
        if request.HasField("share"):
            share = RefundShare(request.share.refunded_amount, request.share.total_amount)
        r = await self.ledger.refund_purchase(
            request.idempotency_key,
            ref,
            request.tokens_to_refund,
            request.cumulative,
            share,
            request.wait_for_purchase,
        )
        metrics.refunded(r)
        return pb.RefundPurchaseResponse(
            tokens_debited=r.tokens_debited,
            shortfall_tokens=r.shortfall_tokens,
            balance=_balance(r.balance),
            platform_fee_reversed=r.platform_fee_reversed,
            tokens_refunded=r.tokens_refunded,
            replayed=r.replayed,
            parked=r.parked,
        )

    async def _record_usage(self, request: pb.RecordUsageRequest) -> pb.RecordUsageResponse:
        cost = (
            request.estimated_cost_micro_usd
            if request.HasField("estimated_cost_micro_usd")
            else None
        )
        usage = _usage(request.usage, request.HasField("usage"))
        r = await self.ledger.record_usage(
            request.idempotency_key,
            request.user_id,
            _USER_TYPES.get(request.user_type),
            usage,
            cost,
        )
        metrics.byok_recorded(usage.total_tokens if usage else 0, r.replayed)
        return pb.RecordUsageResponse(usage_id=r.usage_id, replayed=r.replayed)

    @rpc
    async def Reserve(self, request: pb.ReserveRequest, context: Context) -> pb.ReserveResponse:
        return await self._reserve(request)

    @rpc
    async def ExtendHold(
        self, request: pb.ExtendHoldRequest, context: Context
    ) -> pb.ExtendHoldResponse:
        return await self._extend_hold(request)

    @rpc
    async def Settle(self, request: pb.SettleRequest, context: Context) -> pb.SettleResponse:
        return await self._settle(request)

    @rpc
    async def Release(self, request: pb.ReleaseRequest, context: Context) -> pb.ReleaseResponse:
        return await self._release(request)

    @rpc
    async def RecordUsage(
        self, request: pb.RecordUsageRequest, context: Context
    ) -> pb.RecordUsageResponse:
        return await self._record_usage(request)

    @rpc
    async def ApplyBatch(
        self, request: pb.ApplyBatchRequest, context: Context
    ) -> pb.ApplyBatchResponse:
        _check_batch(request)
        # A span per write when tracing is on (in its caller's trace; see shared.tracing).
        apply = tracing.write_applier(self._apply, context) if tracing.enabled() else self._apply
        return await _applied_within(request, apply, context.time_remaining(), streamed=False)

    # Answers are written with context.write as each batch is applied, in any order (grpc.aio
    # allows it; the generated stub only knows the generator style).
    async def ApplyBatches(  # type: ignore[override]
        self, requests: AsyncIterator[pb.ApplyBatchRequest], context: Context
    ) -> None:
        """Reads batches while the stream lasts and answers each when it is applied. At a
        shutdown it stops reading, answers what it has read, and ends with OK."""
        answering: set[asyncio.Task[None]] = set()
        room = asyncio.Semaphore(MAX_STREAM_BATCHES)
        writing = asyncio.Lock()  # one message written at a time

        async def answer(request: pb.ApplyBatchRequest) -> None:
            try:
                try:
                    _check_batch(request)
                except errors.LedgerError as exc:  # refused whole: each write says why
                    response = pb.ApplyBatchResponse(
                        results=[_error_result(exc)] * len(request.writes)
                    )
                else:
                    seconds = request.timeout_ms / 1000 if request.timeout_ms else None
                    response = await _applied_within(request, self._apply, seconds, streamed=True)
                response.batch_id = request.batch_id
                async with writing:
                    await context.write(response)
            finally:
                room.release()

        async def read() -> None:
            while True:
                await room.acquire()
                try:
                    request = await anext(requests)
                except StopAsyncIteration:
                    return
                task = asyncio.create_task(answer(request))
                answering.add(task)
                task.add_done_callback(answering.discard)

        reading = asyncio.create_task(read())
        draining = asyncio.create_task(self._draining.wait())
        try:
            await asyncio.wait((reading, draining), return_when=asyncio.FIRST_COMPLETED)
            if not reading.done():
                reading.cancel()  # a batch not read yet is never applied: the caller resends it
            try:
                await reading
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    raise  # this handler itself is cancelled (the caller left, grace is over)
            while answering:
                await asyncio.gather(*answering)
        finally:
            # The caller is gone (or the stream failed): as a cancelled ApplyBatch call.
            for task in (reading, draining, *answering):
                task.cancel()

    async def _apply(self, write: pb.LedgerWrite) -> pb.LedgerWriteResult:
        kind = write.WhichOneof("write")
        try:
            if kind == "reserve":
                return pb.LedgerWriteResult(reserve=await self._reserve(write.reserve))
            if kind == "settle":
                return pb.LedgerWriteResult(settle=await self._settle(write.settle))
            if kind == "release":
                return pb.LedgerWriteResult(release=await self._release(write.release))
            if kind == "extend_hold":
                return pb.LedgerWriteResult(extend_hold=await self._extend_hold(write.extend_hold))
            if kind == "record_usage":
                return pb.LedgerWriteResult(
                    record_usage=await self._record_usage(write.record_usage)
                )
            raise errors.InvalidArgument("write", "names no write")
        except errors.LedgerError as exc:
            return _error_result(exc)
        except Exception:
            # What a lone call would answer as INTERNAL; the other writes keep their answers.
            log.exception("a batched %s failed", kind)
            return pb.LedgerWriteResult(
                error=status_proto(grpc.StatusCode.INTERNAL, "internal error", "INTERNAL", DOMAIN)
            )

    @rpc
    async def GetBalance(
        self, request: pb.GetBalanceRequest, context: Context
    ) -> pb.GetBalanceResponse:
        return pb.GetBalanceResponse(balance=_balance(await self.ledger.balance(request.user_id)))

    @rpc
    async def QuoteReserve(
        self, request: pb.QuoteReserveRequest, context: Context
    ) -> pb.QuoteReserveResponse:
        quote = await self.ledger.quote_reserve(
            request.user_id, request.estimated_tokens, request.monthly_quota
        )
        return pb.QuoteReserveResponse(
            required_tokens=quote.required,
            sufficient=quote.sufficient,
            balance=_balance(quote.balance),
            within_quota=quote.within_quota,
            month=_month_pb(quote.month),
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
            month=_month_pb(s.month),
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
            if h.usage.prompt_id is not None:
                record.usage.prompt.id = h.usage.prompt_id
                record.usage.prompt.version = h.usage.prompt_version or ""
            if h.estimated_cost_micro_usd is not None:
                record.estimated_cost_micro_usd = h.estimated_cost_micro_usd
        for p in a.by_prompt:
            response.by_prompt.add(
                prompt=pb.PromptRef(id=p.prompt_id, version=p.prompt_version),
                summary=_summary(p.summary),
            )
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
                payment=None if p.payment is None else _payment_pb(p.payment),
            )
        return response

    @rpc
    async def GetPlatformAnalytics(
        self, request: pb.GetPlatformAnalyticsRequest, context: Context
    ) -> pb.GetPlatformAnalyticsResponse:
        a = await self.ledger.platform_analytics(
            _moment(request.start, "start") if request.HasField("start") else None,
            _moment(request.end, "end") if request.HasField("end") else None,
            _GRANULARITIES.get(request.granularity),
            request.top_users,
        )
        return pb.GetPlatformAnalyticsResponse(
            periods=[
                pb.PlatformPeriod(
                    start=_ts(p.start),
                    figures=_figures_pb(p.figures),
                    models=[_model_pb(m) for m in p.models],
                )
                for p in a.periods
            ],
            totals=_figures_pb(a.totals),
            models=[_model_pb(m) for m in a.models],
            top_users=[
                pb.TopUser(
                    user_id=t.user_id,
                    requests=t.requests,
                    tokens_charged=t.tokens_charged,
                    provider_tokens_used=t.provider_tokens_used,
                )
                for t in a.top_users
            ],
            sources=[
                pb.PurchaseSource(
                    source=s.source,
                    purchases=s.purchases,
                    tokens_sold=s.tokens_sold,
                    revenue_micro_usd=s.revenue_micro_usd,
                )
                for s in a.sources
            ],
            open_receivable_tokens=a.open_receivable_tokens,
            open_holds=a.open_holds,
            held_tokens=a.held_tokens,
            revenue_per_token_micro_usd=a.revenue_per_token_micro_usd,
        )

    @rpc
    async def GetUserAccount(
        self, request: pb.GetUserAccountRequest, context: Context
    ) -> pb.GetUserAccountResponse:
        account = await self.ledger.user_account(request.user_id)
        return pb.GetUserAccountResponse(
            balance=_balance(account.balance),
            holds=[
                pb.OpenHold(
                    hold_id=h.hold_id,
                    amount=h.amount,
                    created_at=_ts(h.created_at),
                    expires_at=_ts(h.expires_at),
                )
                for h in account.holds
            ],
            known=account.known,
        )

    @rpc
    async def UpsertSubscription(
        self, request: pb.UpsertSubscriptionRequest, context: Context
    ) -> pb.UpsertSubscriptionResponse:
        if not request.HasField("subscription"):
            raise errors.InvalidArgument("subscription", "is required")
        s = request.subscription
        r = await self.ledger.upsert_subscription(
            s.source,
            s.external_id,
            s.user_id,
            s.variant_id,
            s.status,
            _moment(s.renews_at, "subscription.renews_at") if s.HasField("renews_at") else None,
            _moment(s.ends_at, "subscription.ends_at") if s.HasField("ends_at") else None,
            (
                _moment(s.provider_updated_at, "subscription.provider_updated_at")
                if s.HasField("provider_updated_at")
                else None
            ),
            s.tokens_per_period,
        )
        return pb.UpsertSubscriptionResponse(
            applied=r.applied,
            subscription=_subscription_pb(r.subscription),
            parked_credits_applied=r.parked_credits_applied,
        )

    @rpc
    async def GetSubscription(
        self, request: pb.GetSubscriptionRequest, context: Context
    ) -> pb.GetSubscriptionResponse:
        s = await self.ledger.subscription(request.source, request.external_id)
        return pb.GetSubscriptionResponse(subscription=_subscription_pb(s))

    @rpc
    async def RecordDeadLetter(
        self, request: pb.RecordDeadLetterRequest, context: Context
    ) -> pb.RecordDeadLetterResponse:
        r = await self.ledger.record_dead_letter(
            request.source,
            request.event_name,
            request.subject,
            request.reason,
            request.raw_body,
            request.dedupe_key,
        )
        return pb.RecordDeadLetterResponse(dead_letter_id=r.dead_letter_id, replayed=r.replayed)

    @rpc
    async def ListDeadLetters(
        self, request: pb.ListDeadLettersRequest, context: Context
    ) -> pb.ListDeadLettersResponse:
        page = await self.ledger.dead_letters(
            request.source,
            request.subject,
            request.include_resolved,
            request.page_size,
            decode_page_token(request.page_token),
        )
        return pb.ListDeadLettersResponse(
            dead_letters=[_dead_letter_pb(d) for d in page.letters],
            next_page_token=encode_page_token(page.next_cursor),
        )

    @rpc
    async def ResolveDeadLetter(
        self, request: pb.ResolveDeadLetterRequest, context: Context
    ) -> pb.ResolveDeadLetterResponse:
        d = await self.ledger.resolve_dead_letter(request.dead_letter_id, request.resolution)
        return pb.ResolveDeadLetterResponse(dead_letter=_dead_letter_pb(d))
