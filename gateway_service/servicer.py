"""gRPC face of the gateway: proto in, core call, proto out; GatewayErrors become rich statuses."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Awaitable, Callable
from functools import wraps
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
from google.protobuf.duration_pb2 import Duration
from google.protobuf.message import Message
from google.rpc import error_details_pb2

from gateway_service import stream_slots
from gateway_service.auth import Identity
from gateway_service.client_address import ClientAddresses
from gateway_service.core import (
    Admitted,
    Delta,
    Gateway,
    GenerateRequest,
    GenerateResult,
    TokenUsage,
    UsageInfo,
)
from gateway_service.errors import Failure, GatewayError
from gateway_service.interceptor import DOMAIN, current_identity
from gateway_service.limits.rate import rate_metadata
from gateway_service.prompts import Prompt
from shared.gen.rpcai.gateway.v1 import gateway_pb2 as pb
from shared.gen.rpcai.gateway.v1 import gateway_pb2_grpc
from shared.rich_errors import rich_status

if TYPE_CHECKING:
    Context = grpc.aio.ServicerContext[Any, Any]
else:
    Context = grpc.aio.ServicerContext

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["AiGateway"].full_name

GRPC_CODES = {
    Failure.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    Failure.UNAUTHENTICATED: grpc.StatusCode.UNAUTHENTICATED,
    Failure.PERMISSION_DENIED: grpc.StatusCode.PERMISSION_DENIED,
    Failure.INSUFFICIENT_BALANCE: grpc.StatusCode.FAILED_PRECONDITION,
    Failure.CONFLICT: grpc.StatusCode.ALREADY_EXISTS,
    Failure.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    Failure.RATE_LIMITED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Failure.TIMEOUT: grpc.StatusCode.DEADLINE_EXCEEDED,
    Failure.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    Failure.INTERNAL: grpc.StatusCode.INTERNAL,
}

log = logging.getLogger(__name__)

# gRPC's own (AbortError, UsageError, ...; not AioRpcError): the handler aborted, or the call or
# the server is over (its client went away, shutdown). Nothing to answer.
FINISHED = grpc.aio.BaseError

Req = TypeVar("Req")
Resp = TypeVar("Resp")


async def abort(context: Context, exc: GatewayError) -> None:
    metadata = dict(exc.metadata)
    extra: list[Message] = []
    if exc.retry_after is not None:
        metadata["retry_after_seconds"] = f"{math.ceil(exc.retry_after)}"
        delay = Duration()
        delay.FromMilliseconds(math.ceil(exc.retry_after * 1000))
        extra.append(error_details_pb2.RetryInfo(retry_delay=delay))
    if exc.failure is Failure.RATE_LIMITED:
        extra.append(
            error_details_pb2.QuotaFailure(
                violations=[
                    error_details_pb2.QuotaFailure.Violation(
                        subject="caller", description=f"{exc.reason}: {exc.message}"
                    )
                ]
            )
        )
    await context.abort_with_status(
        rich_status(
            GRPC_CODES[exc.failure],
            exc.message,
            exc.reason,
            DOMAIN,
            metadata,
            extra,
            trailing=rate_metadata(exc.rate),
        )
    )


def unary(
    method: Callable[[Any, Req, Context], Awaitable[Resp]],
) -> Callable[[Any, Req, Context], Awaitable[Resp]]:
    @wraps(method)
    async def wrapper(self: Any, request: Req, context: Context) -> Resp:
        try:
            return await method(self, request, context)
        except GatewayError as exc:
            await abort(context, exc)
        except FINISHED:
            raise  # the method's own abort stands; a call already over has no one to tell
        except Exception:
            await abort_unexpected(context, method.__name__)
        raise AssertionError("unreachable: abort raises")

    return wrapper


async def abort_unexpected(context: Context, method: str) -> None:
    """A failure with no answer of its own: INTERNAL "internal error", as the HTTP edge's 500.
    Not gRPC's UNKNOWN "Unexpected <class>: <message>", whose message may quote a caller's
    input or a provider's reply; the log keeps it."""
    log.exception("%s failed", method)
    await abort(context, GatewayError(Failure.INTERNAL, "INTERNAL", "internal error"))


def one_stream_slot(
    method: Callable[[Any, Req, Context], Awaitable[None]],
) -> Callable[[Any, Req, Context], Awaitable[None]]:
    """A stream holds one of the process's stream slots (`self.streams`, shared with the HTTP
    edge) while it runs, or is refused at once, before it reserves or calls anything:
    RESOURCE_EXHAUSTED, reason TOO_MANY_STREAMS (gateway_service.stream_slots)."""

    @wraps(method)
    async def wrapper(self: Any, request: Req, context: Context) -> None:
        slots: stream_slots.StreamSlots = self.streams
        if not slots.take():
            await context.abort_with_status(
                rich_status(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    stream_slots.MESSAGE,
                    stream_slots.REASON,
                    DOMAIN,
                    {"retry_after_seconds": str(stream_slots.RETRY_AFTER_SECONDS)},
                )
            )
        try:
            await method(self, request, context)
        finally:
            slots.release()

    return wrapper


def signed_in() -> Identity:
    identity = current_identity()
    if identity is None:
        raise GatewayError(
            Failure.UNAUTHENTICATED,
            "AUTHENTICATION_REQUIRED",
            "sign in: authorization: Bearer <JWT>",
        )
    return identity


def generate_request(request: pb.GenerateTextRequest, address: str = "") -> GenerateRequest:
    return GenerateRequest(
        client_address=address,
        content=request.content,
        system_prompt=request.system_prompt,
        provider=request.provider,
        model=request.model,
        max_tokens=request.max_tokens,
        api_key=request.api_key,
        idempotency_key=request.idempotency_key,
        prompt_id=request.prompt_id,
        variables=dict(request.variables),
    )


def _token_usage(t: TokenUsage | None) -> pb.TokenUsage | None:
    if t is None:
        return None
    return pb.TokenUsage(
        tokens_charged=t.tokens_charged,
        remaining_balance=t.remaining_balance,
        tokens_used=t.tokens_used,
        fee_tokens=t.fee_tokens,
        settlement_pending=t.settlement_pending,
    )


def _usage_info(u: UsageInfo | None) -> pb.UsageInfo | None:
    if u is None:
        return None
    info = pb.UsageInfo(tokens_used=u.tokens_used)
    if u.estimated_cost_micro_usd is not None:
        info.estimated_cost_micro_usd = u.estimated_cost_micro_usd
    return info


def _usage(r: GenerateResult) -> pb.Usage:
    return pb.Usage(input_tokens=r.input_tokens, output_tokens=r.output_tokens)


def client_stalled() -> GatewayError:
    return GatewayError(
        Failure.TIMEOUT,
        "CLIENT_STALLED",
        "the stream was cut: nothing was read for too long; it was charged for what it used",
    )


def _stream_message(event: Delta | GenerateResult) -> pb.StreamTextResponse:
    if isinstance(event, GenerateResult):
        return pb.StreamTextResponse(
            done=True,
            provider=event.provider,
            model=event.model,
            usage=_usage(event),
            token_usage=_token_usage(event.token_usage),
            usage_info=_usage_info(event.usage_info),
            stop_reason=event.stop_reason,
        )
    return pb.StreamTextResponse(delta=event.text)


class GatewayServicer(gateway_pb2_grpc.AiGatewayServicer):
    def __init__(
        self,
        gateway: Gateway,
        addresses: ClientAddresses | None = None,
        streams: stream_slots.StreamSlots | None = None,
    ) -> None:
        self.gateway = gateway
        # The process-wide cap on streams, shared with the HTTP edge (none when not given).
        self.streams = streams or stream_slots.StreamSlots(None)
        self.addresses = addresses or ClientAddresses()

    def _address(self, context: Context) -> str:
        forwarded = next(
            (str(v) for k, v in context.invocation_metadata() or () if k == "x-forwarded-for"),
            None,
        )
        return self.addresses.of_grpc_peer(context.peer() or "", forwarded)

    @unary
    async def GenerateText(
        self, request: pb.GenerateTextRequest, context: Context
    ) -> pb.GenerateTextResponse:
        r = await self.gateway.generate(
            current_identity(), generate_request(request, self._address(context))
        )
        if r.rate is not None:
            # Trailers, not initial metadata: sending initial metadata on its own is a separate
            # operation and write per call (it was ~8% of a rate-limited gateway's CPU).
            context.set_trailing_metadata(rate_metadata(r.rate))
        return pb.GenerateTextResponse(
            text=r.text,
            provider=r.provider,
            model=r.model,
            usage=_usage(r),
            token_usage=_token_usage(r.token_usage),
            usage_info=_usage_info(r.usage_info),
            stop_reason=r.stop_reason,
        )

    @one_stream_slot
    async def StreamText(  # type: ignore[override]  # writes instead of yielding: see below
        self, request: pb.GenerateTextRequest, context: Context
    ) -> None:
        """Written with context.write (not yielded) so that each write can time out: a client
        that stops reading is cut after STREAM_WRITE_TIMEOUT_SECONDS, and closing the core's
        stream settles what was consumed before the caller is told."""
        events = self.gateway.stream(
            current_identity(), generate_request(request, self._address(context))
        )
        stalled = False
        try:
            async with contextlib.aclosing(events):
                async for event in events:
                    if isinstance(event, Admitted):
                        await context.send_initial_metadata(rate_metadata(event.rate))
                        continue
                    try:
                        async with asyncio.timeout(self.gateway.limits.write_timeout_seconds):
                            await context.write(_stream_message(event))
                    except TimeoutError:
                        stalled = True
                        break
        except GatewayError as exc:
            await abort(context, exc)
        except FINISHED:
            raise
        except Exception:
            await abort_unexpected(context, "StreamText")
        if stalled:
            await abort(context, client_stalled())

    @unary
    async def GetUserStatus(
        self, request: pb.GetUserStatusRequest, context: Context
    ) -> pb.GetUserStatusResponse:
        s = await self.gateway.user_status(signed_in())
        response = pb.GetUserStatusResponse(
            user_type=pb.UserType.ValueType(s.user_type),  # the two enums share their numbers
            has_subscription=s.has_subscription,
            has_purchases=s.has_purchases,
            available_tokens=s.available_tokens,
            reserved_tokens=s.reserved_tokens,
            subscription_tier=s.subscription_tier or "",
        )
        if s.quota is not None:
            response.quota = s.quota
        if s.limits is not None:
            response.limits.CopyFrom(
                pb.RateLimits(
                    requests_per_minute=s.limits.requests_per_minute,
                    tokens_per_minute=s.limits.tokens_per_minute,
                    calls_in_flight=s.limits.calls_in_flight,
                    requests_remaining=s.limits.requests_remaining,
                    tokens_remaining=s.limits.tokens_remaining,
                    calls_in_flight_now=s.limits.calls_in_flight_now,
                )
            )
        if s.month is not None:
            response.month.quota_tokens = s.month.quota_tokens
            response.month.used_tokens = s.month.used_tokens
            response.month.resets_at.FromDatetime(s.month.resets_at)
        return response

    @unary
    async def CheckRequestEligibility(
        self, request: pb.CheckRequestEligibilityRequest, context: Context
    ) -> pb.CheckRequestEligibilityResponse:
        call = None
        if request.content or request.prompt_id:
            call = GenerateRequest(
                content=request.content,
                system_prompt=request.system_prompt,
                max_tokens=request.max_tokens,
                prompt_id=request.prompt_id,
                variables=dict(request.variables),
            )
        e = await self.gateway.eligibility(
            current_identity(), request.estimated_tokens, request.has_api_key, call
        )
        return pb.CheckRequestEligibilityResponse(
            can_make_request=e.can_make_request,
            reason=e.reason,
            user_type=pb.UserType.ValueType(e.user_type),
            required_tokens=e.required_tokens,
            available_tokens=e.available_tokens,
        )

    @unary
    async def GetUsageAnalytics(
        self, request: pb.GetUsageAnalyticsRequest, context: Context
    ) -> pb.GetUsageAnalyticsResponse:
        a = await self.gateway.usage_analytics(signed_in(), request.days, request.include_history)
        response = pb.GetUsageAnalyticsResponse()
        response.summary.CopyFrom(_summary(a.summary))
        for b in a.breakdown:
            response.breakdown.add(provider=b.provider, model=b.model, summary=_summary(b.summary))
        for h in a.history:
            record = response.history.add(
                usage_id=h.usage_id,
                user_type=pb.UserType.ValueType(h.user_type),
                provider=h.usage.provider,
                model=h.usage.model,
                input_tokens=h.usage.input_tokens,
                output_tokens=h.usage.output_tokens,
                tokens_charged=h.tokens_charged,
                created_at=h.created_at,
                prompt_id=h.usage.prompt.id,
                prompt_version=h.usage.prompt.version,
            )
            if h.HasField("estimated_cost_micro_usd"):
                record.estimated_cost_micro_usd = h.estimated_cost_micro_usd
        for p in a.by_prompt:
            response.by_prompt.add(
                prompt_id=p.prompt.id,
                prompt_version=p.prompt.version,
                summary=_summary(p.summary),
            )
        return response

    @unary
    async def GetPurchaseHistory(
        self, request: pb.GetPurchaseHistoryRequest, context: Context
    ) -> pb.GetPurchaseHistoryResponse:
        page = await self.gateway.purchase_history(
            signed_in(), request.page_size, request.page_token
        )
        response = pb.GetPurchaseHistoryResponse(next_page_token=page.next_page_token)
        for p in page.purchases:
            response.purchases.add(
                purchase_id=p.purchase_id,
                purchase_type=_PURCHASE_TYPES.get(p.purchase_type, "unknown"),
                tokens_purchased=p.tokens_purchased,
                tokens_credited=p.tokens_credited,
                platform_fee_tokens=p.platform_fee_tokens,
                tokens_refunded=p.tokens_refunded,
                created_at=p.created_at,
            )
        return response

    @unary
    async def ListPrompts(
        self, request: pb.ListPromptsRequest, context: Context
    ) -> pb.ListPromptsResponse:
        """Any caller (a public BYOK call may name a prompt too); never a prompt's text."""
        return pb.ListPromptsResponse(
            prompts=[_prompt_info(prompt) for prompt in self.gateway.prompts.list()]
        )


def _prompt_info(prompt: Prompt) -> pb.PromptInfo:
    info = pb.PromptInfo(
        id=prompt.id,
        version=prompt.version,
        description=prompt.description,
        provider=prompt.provider,
        model=prompt.model,
        max_tokens=prompt.max_tokens,
    )
    for variable in prompt.variables:
        added = info.variables.add(
            name=variable.name,
            type=variable.type.value,
            required=variable.required,
            description=variable.description,
        )
        if (default := variable.default_text) is not None:
            added.default_value = default
    return info


_PURCHASE_TYPES = {1: "subscription", 2: "one_time"}


def _summary(s: Any) -> pb.UsageSummary:
    return pb.UsageSummary(
        total_requests=s.total_requests,
        total_tokens=s.total_tokens,
        tokens_charged=s.tokens_charged,
        estimated_total_cost_micro_usd=s.estimated_total_cost_micro_usd,
        unknown_cost_requests=s.unknown_cost_requests,
    )
