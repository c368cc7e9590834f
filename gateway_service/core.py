"""The gateway's use cases, shared by the gRPC servicer and the HTTP edge: who is calling, what
they may do, and metering every AI call through the ledger. Knows no transport.

Subscription call: Reserve (an upper bound on what the call can use, see `metering`) -> provider
call with the platform key -> Settle with the provider's usage. The hold is kept alive while the
call runs and the call is bounded by it (`HoldLease`): no call outlives its hold. Every exit path
settles or releases exactly once: a provider failure or a cancelled call releases the hold (a
stream that already produced output is settled for what was consumed), and the metering step is
started, shielded, before anything else runs on the way out. BYOK call: the caller's key, no
balance touched, usage recorded for analytics.

A keyed call's answer is kept by the ledger with its hold, so a retry on any gateway replica
returns the first answer without a second provider call.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import json
import logging
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, TypeVar

from google.protobuf.timestamp_pb2 import Timestamp

from gateway_service.auth import Identity
from gateway_service.errors import Failure, GatewayError, invalid
from gateway_service.ledger_client import LedgerClient, is_definitive
from gateway_service.limits.config import UNLIMITED
from gateway_service.limits.gate import Admission, Caller, RateGate
from gateway_service.limits.limiter import LocalLimiter
from gateway_service.limits.rate import RateInfo
from gateway_service.metering import (
    CallCut,
    HoldLease,
    call_cut,
    hold_estimate,
    storable_count,
    storable_model,
)
from gateway_service.metrics import LOST_RESERVE_HOLDS, PROVIDER_FALLBACKS
from gateway_service.outbox import Outbox
from gateway_service.pricing import estimate_cost_micro_usd
from gateway_service.prompts import PromptLibrary, PromptRef, Value
from gateway_service.providers import Providers
from gateway_service.providers.base import (
    Completion,
    CompletionRequest,
    StreamEnd,
    TextDelta,
    Usage,
)
from gateway_service.providers.errors import ProviderError, ProviderErrorKind
from gateway_service.providers.fallback import falls_back
from gateway_service.validation import check_call
from shared import observe, tracing
from shared.gen.rpcai.ledger.v1 import ledger_pb2 as lpb

log = logging.getLogger(__name__)
T = TypeVar("T")

MAX_OUTPUT_TOKENS = 128_000
MAX_KEY_CHARS = 200
# A keyed call whose earlier attempts failed (hold released or expired) may be retried; each
# retry reserves under a key derived from the failed hold, so concurrent retries converge.
MAX_KEYED_ATTEMPTS = 5
# A Reserve whose outcome is unknown is asked again after each of these pauses (seconds) to find
# (and release) the hold it may have made; past the last, the hold's TTL is the backstop.
UNCONFIRMED_HOLD_RETRIES = (0.2, 0.5, 1.0, 2.0, 4.0, 8.0)
# At most this many at once: in an outage every failed call would start one, and the ledger's
# return would meet a flood of them; past it the TTL alone releases.
MAX_UNCONFIRMED_HOLDS = 256
# At shutdown an ask already sent is waited for this long (its answer, and the release it leads
# to): cut off, it may still make a hold that nothing would release before its TTL.
UNCONFIRMED_STOP_SECONDS = 5.0


@dataclass(frozen=True, slots=True)
class GenerateRequest:
    content: str
    system_prompt: str = ""
    provider: str = ""
    model: str = ""
    max_tokens: int = 0
    api_key: str = ""
    idempotency_key: str = ""
    # Where the call comes from (set by the transport, trusted proxies resolved): public callers
    # are rate-limited by it.
    client_address: str = ""
    # A server-held prompt instead of `system_prompt` (gateway_service.prompts), and its values.
    prompt_id: str = ""
    variables: Mapping[str, Value] = field(default_factory=dict)

    def __repr__(self) -> str:  # never show the caller's key or prompt in a log line
        return f"GenerateRequest(provider={self.provider!r}, model={self.model!r})"


@dataclass(frozen=True, slots=True)
class TokenUsage:
    tokens_charged: int
    remaining_balance: int
    tokens_used: int
    fee_tokens: int
    settlement_pending: bool = False


@dataclass(frozen=True, slots=True)
class UsageInfo:
    tokens_used: int
    estimated_cost_micro_usd: int | None


@dataclass(frozen=True, slots=True)
class GenerateResult:
    text: str
    provider: str
    model: str
    input_tokens: int
    output_tokens: int
    stop_reason: str
    token_usage: TokenUsage | None = None
    usage_info: UsageInfo | None = None
    # The caller's requests-per-minute state after this call (RateLimit-* headers).
    rate: RateInfo | None = None


@dataclass(frozen=True, slots=True)
class Delta:
    text: str


@dataclass(frozen=True, slots=True)
class Admitted:
    """A stream's first event: the call passed its limits (and their state, for headers)."""

    rate: RateInfo | None


StreamEvent = Admitted | Delta | GenerateResult


@dataclass(frozen=True, slots=True)
class Eligibility:
    can_make_request: bool
    reason: str
    user_type: int
    required_tokens: int
    available_tokens: int


@dataclass(frozen=True, slots=True)
class LimitsStatus:
    requests_per_minute: int
    tokens_per_minute: int
    calls_in_flight: int
    requests_remaining: int
    tokens_remaining: int
    calls_in_flight_now: int


@dataclass(frozen=True, slots=True)
class QuotaStatus:
    quota_tokens: int
    used_tokens: int
    resets_at: datetime


@dataclass(frozen=True, slots=True)
class UserStatus:
    user_type: int
    has_subscription: bool
    has_purchases: bool
    available_tokens: int
    reserved_tokens: int
    subscription_tier: str | None
    quota: int | None
    limits: LimitsStatus | None = None
    month: QuotaStatus | None = None


@dataclass(frozen=True, slots=True)
class _Plan:
    provider_name: str
    request: CompletionRequest
    byok: bool
    user_id: str | None
    tier: str | None = None
    quota_claim: int | None = None
    prompt: PromptRef | None = None  # the server-held prompt the call used, for its usage record
    # Who else may serve it, in order, when its provider cannot (providers.fallback).
    fallbacks: tuple[tuple[str, CompletionRequest], ...] = ()

    @property
    def candidates(self) -> tuple[_Plan, ...]:
        """This plan, then the plans of its fallbacks (charged as the candidate that served)."""
        later = (replace(self, provider_name=p, request=r, fallbacks=()) for p, r in self.fallbacks)
        return (self, *later)

    @property
    def hold_tokens(self) -> int:
        """What its hold covers: every token the candidate that can use the most can use."""
        return max(hold_estimate(plan.request) for plan in self.candidates)

    @property
    def user_type(self) -> str:
        """For logs: who pays for the call."""
        if self.byok:
            return "byok" if self.user_id else "public_byok"
        return "subscription"

    @property
    def fingerprint(self) -> str:
        """What the call is, for telling a retry from a different request under the same key."""
        r = self.request
        parts = [self.provider_name, r.model, str(r.max_tokens), r.system_prompt, r.content]
        return hashlib.sha256("\x00".join(parts).encode()).hexdigest()[:32]


_PROVIDER_FAILURES = {
    ProviderErrorKind.RATE_LIMITED: (Failure.RATE_LIMITED, "PROVIDER_RATE_LIMITED"),
    ProviderErrorKind.UNAVAILABLE: (Failure.UNAVAILABLE, "PROVIDER_UNAVAILABLE"),
    ProviderErrorKind.TIMEOUT: (Failure.TIMEOUT, "PROVIDER_TIMEOUT"),
    ProviderErrorKind.INVALID_REQUEST: (Failure.INVALID_ARGUMENT, "PROVIDER_REJECTED_REQUEST"),
    ProviderErrorKind.MALFORMED: (Failure.UNAVAILABLE, "PROVIDER_MALFORMED_RESPONSE"),
}


@dataclass(frozen=True, slots=True)
class CallLimits:
    """How long calls and their holds live (see `metering.HoldLease`)."""

    hold_ttl_seconds: int = 120
    # A unary call's whole length (the provider's own timeout bounds each read).
    call_seconds: float = 60.0
    stream_seconds: float = 3600.0
    # A stream whose client reads nothing for this long is cut (by the transport).
    write_timeout_seconds: float = 20.0

    @property
    def margin_seconds(self) -> float:
        """How long before its hold could expire a call must be over: longer than a stalled
        write can take, so a cut stream is settled while its hold still stands."""
        return min(self.hold_ttl_seconds / 2, self.write_timeout_seconds + 5)


@dataclass
class _Spent:
    """Provider tokens a stream consumed, known once it ends (for its tokens-per-minute)."""

    tokens: int = 0


@dataclass(frozen=True, slots=True)
class _Hold:
    reply: lpb.ReserveResponse
    sent_at: float  # event-loop time taken before the Reserve was sent
    # Named on every later call on the hold, so a ledger sharded by user can route it.
    user_id: str


def provider_failure(exc: ProviderError, byok: bool) -> GatewayError:
    if exc.kind is ProviderErrorKind.AUTH:
        if byok:
            return GatewayError(
                Failure.PERMISSION_DENIED, "PROVIDER_KEY_REFUSED", "the provider refused your key"
            )
        # The platform's own key was refused: our misconfiguration, not the caller's fault.
        log.error("provider %s refused the platform key", exc.provider)
        return GatewayError(Failure.UNAVAILABLE, "PROVIDER_UNAVAILABLE", "provider unavailable")
    failure, reason = _PROVIDER_FAILURES[exc.kind]
    return GatewayError(failure, reason, str(exc), retry_after=exc.retry_after)


def _with_rate(exc: GatewayError, rate: RateInfo | None) -> None:
    """A limit's refusal after the call was admitted (the monthly quota, a provider's 429) tells
    the caller's requests-per-minute state, as the gate's own refusals do (RateLimit-*)."""
    if exc.rate is None and exc.failure is Failure.RATE_LIMITED:
        exc.rate = rate


def _span_of_call(self: Gateway, caller: Identity | None, req: GenerateRequest) -> dict[str, Any]:
    """What a call's span says of it (tracing): never its text, key or user id."""
    user_type = "public" if caller is None else "byok" if req.api_key else "subscription"
    attributes: dict[str, Any] = {"rpcai.user_type": user_type}
    if req.provider:
        attributes["gen_ai.provider.name"] = req.provider
    if req.model:
        attributes["gen_ai.request.model"] = req.model
    return attributes


def _span_of_result(event: object) -> dict[str, Any] | None:
    if not isinstance(event, GenerateResult):
        return None
    attributes: dict[str, Any] = {
        "gen_ai.provider.name": event.provider,
        "gen_ai.response.model": event.model,
        "gen_ai.usage.input_tokens": event.input_tokens,
        "gen_ai.usage.output_tokens": event.output_tokens,
    }
    if event.token_usage is not None:
        attributes["rpcai.tokens_charged"] = event.token_usage.tokens_charged
    return attributes


class Gateway:
    def __init__(
        self,
        ledger: LedgerClient,
        providers: Providers,
        outbox: Outbox,
        default_max_tokens: int,
        max_prompt_chars: int,
        limits: CallLimits | None = None,
        gate: RateGate | None = None,
        quota_clock: Callable[[], datetime] | None = None,
        prompts: PromptLibrary | None = None,
    ) -> None:
        self.ledger = ledger
        self.prompts = prompts or PromptLibrary(None)
        self.providers = providers
        self.outbox = outbox
        # Unlimited unless given (the app always gives one, from the configured limits).
        self.gate = gate or RateGate(LocalLimiter(), UNLIMITED, 3600)
        # When set, monthly quotas count the month of this clock instead of the ledger's (tests).
        self.quota_clock = quota_clock
        self.default_max_tokens = default_max_tokens
        self.max_prompt_chars = max_prompt_chars
        self.limits = limits or CallLimits()
        self._background: set[asyncio.Task[Any]] = set()
        self._unconfirmed: set[asyncio.Task[None]] = set()  # _release_unconfirmed tasks
        self._stopping = asyncio.Event()  # set at shutdown: no new ask of a lost Reserve

    # ---- planning -------------------------------------------------------------------------

    def _plan(self, caller: Identity | None, req: GenerateRequest) -> _Plan:
        req, prompt = self._rendered(req)  # before anything is sized from the text
        check_call(req)  # text fields: one rule set for both transports
        if not req.content.strip():
            raise invalid("content", "must not be empty")
        if len(req.content) + len(req.system_prompt) > self.max_prompt_chars:
            raise invalid("content", f"prompt exceeds {self.max_prompt_chars} characters")
        if req.max_tokens < 0 or req.max_tokens > MAX_OUTPUT_TOKENS:
            raise invalid("max_tokens", f"must be within 0..{MAX_OUTPUT_TOKENS}")
        if len(req.idempotency_key) > MAX_KEY_CHARS or not req.idempotency_key.isprintable():
            raise invalid("idempotency_key", f"at most {MAX_KEY_CHARS} printable characters")
        byok = bool(req.api_key)
        if not byok and caller is None:
            raise GatewayError(
                Failure.UNAUTHENTICATED,
                "AUTHENTICATION_REQUIRED",
                "sign in (authorization: Bearer <JWT>) or bring your own provider API key",
            )
        try:
            provider, model = self.providers.resolve(req.provider, req.model)
        except ProviderError as exc:
            raise invalid("provider", str(exc).split(": ", 1)[-1]) from None
        request = CompletionRequest(
            content=req.content,
            model=model,
            max_tokens=req.max_tokens or self.default_max_tokens,
            system_prompt=req.system_prompt,
            api_key=req.api_key or None,
        )
        if caller is None:
            return _Plan(provider.name, request, byok, None, prompt=prompt)
        # A BYOK key belongs to one provider: only calls on the platform's keys fall back.
        fallbacks = () if byok else self._fallbacks(provider.name, request)
        return _Plan(
            provider.name,
            request,
            byok,
            caller.user_id,
            caller.tier,
            caller.quota,
            prompt,
            fallbacks,
        )

    def _fallbacks(
        self, provider: str, request: CompletionRequest
    ) -> tuple[tuple[str, CompletionRequest], ...]:
        chain = self.providers.fallbacks_of(provider, request.model)
        return tuple((t.provider, replace(request, model=t.model)) for t in chain)

    def _rendered(self, req: GenerateRequest) -> tuple[GenerateRequest, PromptRef | None]:
        """A call naming a server-held prompt, as if its caller had sent the rendered text (and
        the prompt's provider, model and max_tokens where the call left them empty): it is then
        validated, sized, held and charged exactly like that call."""
        if not req.prompt_id:
            if req.variables:
                raise invalid("variables", "only with prompt_id")
            return req, None
        if req.system_prompt:
            raise invalid("system_prompt", "give either system_prompt or prompt_id, not both")
        prompt = self.prompts.get(req.prompt_id)
        names_model = bool(req.provider.strip() or req.model.strip())
        rendered = replace(
            req,
            system_prompt=prompt.render(req.variables),
            provider=req.provider if names_model else prompt.provider,
            model=req.model if names_model else prompt.model,
            max_tokens=req.max_tokens or prompt.max_tokens,
        )
        return rendered, PromptRef(prompt.id, prompt.version)

    def _limited(self, plan: _Plan, req: GenerateRequest) -> Caller:
        """The call's caller as its rate limits see it."""
        return Caller(plan.user_id, plan.byok, plan.tier, req.client_address, req.api_key)

    async def _admit(self, plan: _Plan, req: GenerateRequest) -> Admission:
        """Takes the call's share of its limits (the tokens of its hold size), or refuses it
        before any hold or provider call."""
        return await self.gate.admit(self._limited(plan, req), plan.hold_tokens)

    def _key_refused(self, plan: _Plan, req: GenerateRequest, exc: GatewayError) -> None:
        if exc.reason == "PROVIDER_KEY_REFUSED" and plan.user_id is None:
            self._spawn(self.gate.key_refused(self._limited(plan, req)))

    def _reserve_key(self, plan: _Plan, req: GenerateRequest) -> str:
        if req.idempotency_key:
            # Fixed length whatever the sub and key, so derived retry keys fit the ledger's bound.
            digest = hashlib.sha256(f"{plan.user_id}\x00{req.idempotency_key}".encode())
            return f"generate:{digest.hexdigest()[:40]}"
        return f"generate:{uuid.uuid4()}"

    def _candidates(self, plan: _Plan, req: GenerateRequest) -> tuple[_Plan, ...]:
        """Who may serve a subscription call, in order. A provider whose breaker is open is
        passed over before any hold is made; all of them open: the call is refused, fast. Not
        a keyed call: it may have an answer to replay, which needs no provider (its Reserve
        tells; the provider's own check still refuses a new attempt, and the hold is released)."""
        plans = plan.candidates
        if req.idempotency_key:
            return plans
        serving = tuple(p for p in plans if not self.providers.is_open(p.provider_name))
        if not serving:
            try:
                self.providers.check_open(plan.provider_name)
            except ProviderError as exc:
                raise provider_failure(exc, byok=plan.byok) from None
            return plans  # its cool-down ended meanwhile: half-open, it takes a probe
        if serving[0] is not plan:
            _fell_back(plan, serving[0])
        return serving

    async def _first_answer(self, plans: tuple[_Plan, ...]) -> tuple[_Plan, Completion]:
        """The answer of the first candidate that serves the call, and that candidate."""
        for plan, after in itertools.pairwise(plans):
            try:
                return plan, await self.providers.get(plan.provider_name).generate(plan.request)
            except ProviderError as exc:
                if not falls_back(exc):
                    raise
                _fell_back(plan, after, exc)
        last = plans[-1]
        return last, await self.providers.get(last.provider_name).generate(last.request)

    def _lease(self, hold: _Hold | None, started: float, max_seconds: float) -> HoldLease:
        extend = None
        if hold is not None:
            reservation_id, user_id = hold.reply.reservation_id, hold.user_id
            started = hold.sent_at

            async def extend(ttl: int) -> None:
                await self.ledger.extend_hold(reservation_id, user_id, ttl)

        lease = HoldLease(
            extend,
            ttl=self.limits.hold_ttl_seconds,
            margin=self.limits.margin_seconds,
            started=started,
            max_seconds=max_seconds,
        )
        lease.start()
        return lease

    # ---- unary ----------------------------------------------------------------------------

    @tracing.traced_call("gateway.generate", _span_of_call, _span_of_result)
    async def generate(self, caller: Identity | None, req: GenerateRequest) -> GenerateResult:
        plan = self._plan(caller, req)
        observe.note(user_type=plan.user_type)
        admission = await self._admit(plan, req)
        used = 0
        try:
            result = await self._generate(plan, req)
            used = result.input_tokens + result.output_tokens
            return replace(result, rate=admission.rate)
        except GatewayError as exc:
            self._key_refused(plan, req, exc)
            _with_rate(exc, admission.rate)
            raise
        finally:
            # Its slot and unused tokens go back whatever happened (in the background: a
            # cancelled call still gives them back).
            if admission.holds_anything:
                self._spawn(admission.finish(used))

    async def _generate(self, plan: _Plan, req: GenerateRequest) -> GenerateResult:
        if plan.byok:
            provider = self.providers.get(plan.provider_name)
            try:
                completion = await provider.generate(plan.request)
            except ProviderError as exc:
                raise provider_failure(exc, byok=True) from None
            usage = Usage(completion.input_tokens, completion.output_tokens, estimated=False)
            # Served: its record must land even if the caller leaves now.
            info = await self._shielded(self._record_byok(plan, completion.model, usage))
            return _result(completion, usage_info=info)

        plans = self._candidates(plan, req)
        hold = await self._reserve(plan, req)
        if hold.reply.replayed:
            # An earlier attempt with this key: its answer, never a second charge.
            return _replayed_answer(hold.reply)
        lease = self._lease(hold, hold.sent_at, self.limits.call_seconds)
        try:
            served, completion = await lease.run(self._first_answer(plans))
        except BaseException as exc:
            # Failed, timed out, cut or cancelled: nothing to charge. Released even when
            # cancelled (the release is shielded; nothing before it awaits).
            released = self._spawn(self._release(hold.reply.reservation_id, hold.user_id))
            lease.stop()
            await asyncio.shield(released)
            if isinstance(exc, ProviderError):
                raise provider_failure(exc, byok=False) from None
            if isinstance(exc, CallCut):
                raise call_cut() from None
            raise
        lease.stop()
        usage = Usage(completion.input_tokens, completion.output_tokens, estimated=False)
        result = _result(completion)
        answer = _encode_answer(result) if req.idempotency_key else b""
        settled = await self._shielded(
            self._settle(hold.reply, served, completion.model, usage, answer)
        )
        observe.note(tokens_charged=settled.tokens_charged)
        return replace(result, token_usage=settled)

    # ---- streaming ------------------------------------------------------------------------

    @tracing.traced_stream("gateway.stream", _span_of_call, _span_of_result)
    async def stream(
        self, caller: Identity | None, req: GenerateRequest
    ) -> AsyncGenerator[StreamEvent]:
        """`Admitted`, deltas, then one GenerateResult. Closing the iterator early (the caller
        went away, a write timed out) stops the provider stream and charges what was consumed;
        a stream that would outlive its hold is cut the same way. No hold is left behind."""
        plan = self._plan(caller, req)
        observe.note(user_type=plan.user_type)
        admission = await self._admit(plan, req)
        spent = _Spent()
        events = self._stream(plan, req, spent)
        try:
            yield Admitted(admission.rate)
            async with contextlib.aclosing(events):
                async for event in events:
                    yield event
        except GatewayError as exc:
            self._key_refused(plan, req, exc)
            _with_rate(exc, admission.rate)
            raise
        finally:
            if admission.holds_anything:
                self._spawn(admission.finish(spent.tokens))

    async def _stream(
        self, plan: _Plan, req: GenerateRequest, spent: _Spent
    ) -> AsyncGenerator[Delta | GenerateResult]:
        hold: _Hold | None = None
        later: list[_Plan] = []
        if not plan.byok:
            plans = self._candidates(plan, req)
            hold = await self._reserve(plan, req)
            if hold.reply.replayed:
                first = _replayed_answer(hold.reply)
                yield Delta(first.text)
                yield first
                return
            plan, *later = plans  # charged as the candidate that serves it
        loop = asyncio.get_running_loop()
        lease = self._lease(hold, loop.time(), self.limits.stream_seconds)
        stream = self.providers.get(plan.provider_name).stream(plan.request)
        # The whole text is kept only when it is stored as the answer for retries (a keyed
        # metered call); otherwise a stream's memory would grow with everything it sent.
        parts: list[str] | None = [] if hold is not None and req.idempotency_key else None
        delivered = 0
        metered = False
        failed = False
        try:
            end: StreamEnd | None = None
            try:
                while end is None:
                    try:
                        item = await lease.run(anext(stream))
                    except ProviderError as exc:
                        # Nothing reached the caller yet: the next candidate may serve it.
                        if delivered or not later or not falls_back(exc):
                            raise
                        with contextlib.suppress(Exception):
                            await stream.aclose()
                        _fell_back(plan, later[0], exc)
                        plan = later.pop(0)
                        stream = self.providers.get(plan.provider_name).stream(plan.request)
                        continue
                    if isinstance(item, TextDelta):
                        delivered += 1
                        if parts is not None:
                            parts.append(item.text)
                        yield Delta(item.text)
                        if lease.expired():  # the consumer took its time over that delta
                            raise CallCut
                    else:
                        end = item
            except ProviderError as exc:
                failed = True
                raise provider_failure(exc, byok=plan.byok) from None
            except CallCut:
                raise call_cut() from None
            usage = stream.usage
            spent.tokens = usage.total
            # From here the call is metered below, shielded from cancellation: the cleanup in
            # `finally` must not meter it a second time.
            metered = True
            lease.stop()
            text = "".join(parts) if parts is not None else ""
            if hold is None:
                info = await self._shielded(self._record_byok(plan, end.model, usage))
                yield _stream_result(plan, end, text, usage_info=info)
            else:
                result = _stream_result(plan, end, text)
                answer = _encode_answer(result) if req.idempotency_key else b""
                settled = await self._shielded(
                    self._settle(hold.reply, plan, end.model, usage, answer)
                )
                observe.note(tokens_charged=settled.tokens_charged)
                yield replace(result, token_usage=settled)
        finally:
            metering: asyncio.Task[Any] | None = None
            if not metered:
                # Cut, abandoned or failed mid-way: meter what was consumed. Started before
                # anything else here awaits, so no cancellation can come between the call and
                # its charge. A provider failure before any text delivered nothing: free.
                consumed = stream.usage
                if failed and not delivered:
                    consumed = Usage(0, 0, estimated=True)
                spent.tokens = consumed.total
                if hold is not None:
                    metering = self._spawn(self._finish(hold.reply, plan, consumed))
                elif consumed.total:
                    metering = self._spawn(self._record_byok(plan, plan.request.model, consumed))
            lease.stop()
            with contextlib.suppress(Exception):
                await stream.aclose()
            if metering is not None:
                await asyncio.shield(metering)

    # ---- reads ----------------------------------------------------------------------------

    async def user_status(self, caller: Identity) -> UserStatus:
        """The caller's balance, and the limits and quota its calls (without a key of its own)
        run under, with what is left of them now."""
        as_limited = Caller(caller.user_id, False, caller.tier)
        s, now = await asyncio.gather(
            self.ledger.user_status(caller.user_id), self.gate.check(as_limited, 0)
        )
        limit = self.gate.limit_of(as_limited)
        quota = self.gate.monthly_quota(caller.tier, caller.quota)
        return UserStatus(
            user_type=s.user_type,
            has_subscription=s.has_subscription,
            has_purchases=s.has_purchases,
            available_tokens=s.balance.available_tokens,
            reserved_tokens=s.balance.reserved_tokens,
            subscription_tier=caller.tier,
            quota=caller.quota,
            limits=LimitsStatus(
                requests_per_minute=limit.requests_per_minute,
                tokens_per_minute=limit.tokens_per_minute,
                calls_in_flight=limit.calls_in_flight,
                requests_remaining=now.remaining,
                tokens_remaining=now.tokens_remaining,
                calls_in_flight_now=now.in_flight,
            ),
            month=QuotaStatus(
                quota_tokens=quota,
                used_tokens=s.month.charged_tokens + s.month.held_tokens,
                resets_at=s.month.resets_at.ToDatetime(UTC),
            ),
        )

    async def eligibility(
        self,
        caller: Identity | None,
        estimated_tokens: int,
        has_api_key: bool,
        call: GenerateRequest | None = None,
    ) -> Eligibility:
        """Would a call be allowed, and what would it hold. Given the call itself (`call`), the
        hold is sized exactly as that call's Reserve would size it; else from
        `estimated_tokens` (the tokens it may use, input and output)."""
        if call is not None:
            if call.prompt_id and not call.content:
                raise invalid("content", "needed with prompt_id: the call's hold is sized from it")
            call, _ = self._rendered(call)  # sized from the text the server would send
            if call.max_tokens < 0 or call.max_tokens > MAX_OUTPUT_TOKENS:
                raise invalid("max_tokens", f"must be within 0..{MAX_OUTPUT_TOKENS}")
            if len(call.content) + len(call.system_prompt) > self.max_prompt_chars:
                raise invalid("content", f"prompt exceeds {self.max_prompt_chars} characters")
            estimated_tokens = hold_estimate(
                CompletionRequest(
                    content=call.content,
                    model="",
                    max_tokens=call.max_tokens or self.default_max_tokens,
                    system_prompt=call.system_prompt,
                )
            )
        if estimated_tokens < 0 or estimated_tokens > 10**9:
            raise invalid("estimated_tokens", "must be within 0..1000000000")
        if has_api_key:
            return Eligibility(True, "", lpb.USER_TYPE_BYOK, 0, 0)
        if caller is None:
            return Eligibility(
                False, "sign in or bring your own API key", lpb.USER_TYPE_UNKNOWN, 0, 0
            )
        quota = self.gate.monthly_quota(caller.tier, caller.quota)
        status, quote, limits = await asyncio.gather(
            self.ledger.user_status(caller.user_id),
            self.ledger.quote(caller.user_id, max(1, estimated_tokens), quota),
            self.gate.check(Caller(caller.user_id, False, caller.tier), estimated_tokens),
        )
        reason = ""
        if not limits.allowed:
            reason = _REFUSALS.get(limits.reason, "rate limited")
        elif not quote.within_quota:
            reason = "monthly quota exceeded"
        elif not quote.sufficient:
            reason = "insufficient balance"
        return Eligibility(
            not reason,
            reason,
            status.user_type,
            quote.required_tokens,
            quote.balance.available_tokens,
        )

    async def usage_analytics(
        self, caller: Identity, days: int, include_history: bool
    ) -> lpb.GetUsageAnalyticsResponse:
        return await self.ledger.usage_analytics(caller.user_id, days, include_history)

    async def purchase_history(
        self, caller: Identity, page_size: int, page_token: str
    ) -> lpb.GetPurchaseHistoryResponse:
        return await self.ledger.purchase_history(caller.user_id, page_size, page_token)

    # ---- metering -------------------------------------------------------------------------

    async def _reserve(self, plan: _Plan, req: GenerateRequest) -> _Hold:
        """Reserve; if the caller goes away while the hold is being made, release it as soon as
        it exists (unless it is an earlier attempt's hold), instead of leaving it to its TTL."""
        task = asyncio.ensure_future(self._reserve_once(plan, req))
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            task.add_done_callback(self._release_abandoned)
            raise

    def _release_abandoned(self, task: asyncio.Task[_Hold]) -> None:
        if task.cancelled() or task.exception() is not None:
            return
        hold = task.result()
        if not hold.reply.replayed:
            self._spawn(self._release(hold.reply.reservation_id, hold.user_id))

    async def _reserve_once(self, plan: _Plan, req: GenerateRequest) -> _Hold:
        assert plan.user_id is not None
        key = self._reserve_key(plan, req)
        loop = asyncio.get_running_loop()
        for _ in range(MAX_KEYED_ATTEMPTS):
            sent_at = loop.time()
            request = lpb.ReserveRequest(
                # Ours alone (the ledger's transport retries resend it): a replay that names it
                # answers with a hold this attempt made.
                attempt_id=uuid.uuid4().hex,
                idempotency_key=key,
                user_id=plan.user_id,
                estimated_tokens=plan.hold_tokens,
                ttl_seconds=self.limits.hold_ttl_seconds,
                request_fingerprint=plan.fingerprint,
                transient_key=not req.idempotency_key,
                monthly_quota=self.gate.monthly_quota(plan.tier, plan.quota_claim),
                quota_at=_timestamp(self.quota_clock()) if self.quota_clock else None,
            )
            try:
                hold = await self.ledger.reserve(request)
            except GatewayError as exc:
                if not is_definitive(exc):
                    self._watch_unconfirmed(request)
                raise
            if hold.replayed and hold.status == "held" and hold.attempt_id == request.attempt_id:
                # A transport retry of this very attempt, whose first answer was lost: the hold
                # is this attempt's own (any other attempt names another id), so it serves on
                # it, instead of being told its own call is still running.
                hold.replayed, hold.status = False, ""
            if not (hold.replayed and hold.status in ("released", "expired")):
                return _Hold(hold, sent_at, plan.user_id)
            # The earlier attempt failed and cost nothing: this retry is a new attempt, under a
            # key derived from the failed hold (so concurrent retries converge; fixed length).
            chained = hashlib.sha256(f"{key}\x00{hold.reservation_id}".encode()).hexdigest()
            key = f"generate:{chained[:40]}"
        raise GatewayError(
            Failure.CONFLICT, "TOO_MANY_ATTEMPTS", "this idempotency key failed too many times"
        )

    def _watch_unconfirmed(self, request: lpb.ReserveRequest) -> None:
        if len(self._unconfirmed) >= MAX_UNCONFIRMED_HOLDS:
            LOST_RESERVE_HOLDS.labels("skipped").inc()
            return
        task = asyncio.ensure_future(self._release_unconfirmed(request))
        self._unconfirmed.add(task)
        task.add_done_callback(self._unconfirmed.discard)

    async def _release_unconfirmed(self, request: lpb.ReserveRequest) -> None:
        """A Reserve whose answer never came (lost on the way back, the ledger unreachable) may
        still have made its hold, and the call failed: nothing would settle it, and the user's
        tokens would stay held for the hold's whole TTL (and, under a key the caller chose, the
        caller's retries told REQUEST_IN_PROGRESS all that time). The same request asked again
        answers with that hold, or makes it now (the first was never applied); either way it is
        released at once, when this attempt made it. Under a key the caller chose, the caller's
        retry may have made the hold instead and be serving on it: releasing that one would
        leave a served call unpaid, so a hold the ledger says another attempt made is left be.
        (Only the attempt that made a hold serves on it: a later one is told REQUEST_IN_PROGRESS.)
        A key of the gateway's own no other call can hold, whatever the ledger names."""
        for pause in UNCONFIRMED_HOLD_RETRIES:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(pause):
                    await self._stopping.wait()
            if self._stopping.is_set():
                # Shutting down: no new ask (it could make a hold this process would not live
                # to release). A hold the lost Reserve made resolves at its TTL.
                LOST_RESERVE_HOLDS.labels("gave_up").inc()
                return
            try:
                hold = await self.ledger.reserve(request)
            except GatewayError as exc:
                if is_definitive(exc):
                    # Refused (a replay never is): no hold under this key.
                    LOST_RESERVE_HOLDS.labels("none").inc()
                    return
                continue
            if hold.replayed and hold.status != "held":
                LOST_RESERVE_HOLDS.labels("none").inc()  # resolved already (expired, released)
                return
            if (
                hold.replayed
                and not request.transient_key
                and hold.attempt_id != request.attempt_id
            ):
                # Not made by this ask (a replay) nor named as this attempt's: another attempt's,
                # or a ledger too old to say (its hold resolves at its TTL, as it did before).
                LOST_RESERVE_HOLDS.labels("another_attempt").inc()
                return
            log.warning(
                "releasing hold %s: its Reserve's answer was lost and its call failed",
                hold.reservation_id,
            )
            LOST_RESERVE_HOLDS.labels("released").inc()
            await self._release(hold.reservation_id, request.user_id)
            return
        LOST_RESERVE_HOLDS.labels("gave_up").inc()

    async def _release(self, reservation_id: str, user_id: str) -> None:
        request = lpb.ReleaseRequest(reservation_id=reservation_id, user_id=user_id)
        try:
            await self.ledger.release(request)
        except GatewayError as exc:
            if is_definitive(exc):
                # Already resolved another way (settled, expired): nothing left to give back.
                log.warning("release of a hold refused: %s", exc.reason)
                return
            # Not the ledger's last word: the outbox delivers it; the hold's TTL is the backstop.
            await self.outbox.submit("Release", request.SerializeToString())

    async def _settle(
        self,
        hold: lpb.ReserveResponse,
        plan: _Plan,
        model: str,
        usage: Usage,
        answer: bytes = b"",
    ) -> TokenUsage:
        """Charges the call. Never raises: a charge the ledger did not take now is queued in the
        outbox (retried until the ledger answers definitively; a refusal is kept and alerted)."""
        provider = plan.provider_name
        model = storable_model(model, plan.request.model)
        input_tokens = storable_count(usage.input_tokens)
        output_tokens = storable_count(usage.output_tokens)
        request = lpb.SettleRequest(
            reservation_id=hold.reservation_id,
            user_id=plan.user_id or "",
            usage=_ledger_usage(plan, provider, model, input_tokens, output_tokens),
            answer=answer,
        )
        cost = estimate_cost_micro_usd(provider, model, input_tokens, output_tokens)
        if cost is not None:
            request.estimated_cost_micro_usd = cost
        try:
            s = await self.ledger.settle(request)
        except GatewayError as exc:
            # The provider already answered: the charge must still land.
            if is_definitive(exc):
                log.error("the ledger refused a settle (%s); kept for an operator", exc.reason)
                await self.outbox.keep_refused("Settle", request.SerializeToString(), exc.reason)
            else:
                await self.outbox.submit("Settle", request.SerializeToString())
            return TokenUsage(
                tokens_charged=0,
                remaining_balance=hold.balance.available_tokens,
                tokens_used=input_tokens + output_tokens,
                fee_tokens=0,
                settlement_pending=True,
            )
        if s.overrun_tokens:
            log.warning(
                "provider %s reported %d tokens beyond the hold of reservation %s",
                provider,
                s.overrun_tokens,
                hold.reservation_id,
            )
        return _token_usage(s)

    async def _finish(self, hold: lpb.ReserveResponse, plan: _Plan, consumed: Usage) -> None:
        if consumed.total == 0:
            await self._release(hold.reservation_id, plan.user_id or "")
        else:
            await self._settle(hold, plan, plan.request.model, consumed)

    async def _record_byok(self, plan: _Plan, model: str, usage: Usage) -> UsageInfo:
        model = storable_model(model, plan.request.model)
        input_tokens = storable_count(usage.input_tokens)
        output_tokens = storable_count(usage.output_tokens)
        cost = estimate_cost_micro_usd(plan.provider_name, model, input_tokens, output_tokens)
        info = UsageInfo(tokens_used=input_tokens + output_tokens, estimated_cost_micro_usd=cost)
        # A public caller has no account: the call is recorded without a user, for analytics.
        request = lpb.RecordUsageRequest(
            idempotency_key=f"byok:{uuid.uuid4()}",
            user_id=plan.user_id or "",
            user_type=lpb.USER_TYPE_PUBLIC_BYOK if plan.user_id is None else lpb.USER_TYPE_BYOK,
            usage=_ledger_usage(plan, plan.provider_name, model, input_tokens, output_tokens),
        )
        if cost is not None:
            request.estimated_cost_micro_usd = cost
        try:
            await self.ledger.record_usage(request)
        except GatewayError as exc:
            if is_definitive(exc):
                log.error("the ledger refused a usage record (%s); kept", exc.reason)
                await self.outbox.keep_refused(
                    "RecordUsage", request.SerializeToString(), exc.reason
                )
            else:
                await self.outbox.submit("RecordUsage", request.SerializeToString())
        return info

    def _spawn(self, work: Awaitable[T]) -> asyncio.Task[T]:
        """Starts `work` now, to run to its end whatever happens to the caller (a shutdown
        waits for it: `stop_background`)."""
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def _shielded(self, work: Awaitable[T]) -> T:
        """Runs `work` to the end even if the caller is cancelled meanwhile: a hold must be
        settled or released whatever happens to the call that made it."""
        return await asyncio.shield(self._spawn(work))

    async def wait_background(self) -> None:
        """Waits for the work started to outlive its call (settles, releases, records)."""
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)

    async def stop_background(self) -> None:
        """At shutdown: no lost Reserve is asked after again (not worth a slow stop: their TTL
        releases those holds), an ask on its way is waited for (cut off, it could still make a
        hold that nothing would release before its TTL), then the rest of the background work."""
        self._stopping.set()
        if self._unconfirmed:
            _, late = await asyncio.wait(self._unconfirmed, timeout=UNCONFIRMED_STOP_SECONDS)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
        await self.wait_background()


def _fell_back(plan: _Plan, to: _Plan, failure: ProviderError | None = None) -> None:
    if failure is not None and failure.kind is ProviderErrorKind.AUTH:
        # Served anyway, but our own key is missing or refused: the operator must know.
        log.error("provider %s refused the platform key", failure.provider)
    PROVIDER_FALLBACKS.labels(plan.provider_name, to.provider_name).inc()


# Why eligibility says no, for each limit.
_REFUSALS = {
    "RATE_LIMITED": "rate limited",
    "TOKENS_PER_MINUTE_EXCEEDED": "tokens per minute exceeded",
    "TOO_MANY_CALLS_IN_FLIGHT": "too many calls in flight",
    "UNAVAILABLE": "rate limiter unavailable",
}


def _ledger_usage(
    plan: _Plan, provider: str, model: str, input_tokens: int, output_tokens: int
) -> lpb.Usage:
    """A call's usage as the ledger records it, with the server-held prompt it used."""
    usage = lpb.Usage(
        provider=provider, model=model, input_tokens=input_tokens, output_tokens=output_tokens
    )
    if plan.prompt is not None:
        usage.prompt.id = plan.prompt.id
        usage.prompt.version = plan.prompt.version
    return usage


def _timestamp(moment: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(moment)
    return stamp


def _token_usage(s: lpb.SettleResponse) -> TokenUsage:
    return TokenUsage(
        tokens_charged=s.tokens_charged,
        remaining_balance=s.balance.available_tokens,
        tokens_used=s.tokens_used,
        fee_tokens=s.fee_tokens,
    )


_ANSWER_FIELDS = ("text", "provider", "model", "input_tokens", "output_tokens", "stop_reason")


def _encode_answer(result: GenerateResult) -> bytes:
    """A call's answer as the ledger keeps it with the hold (opaque to the ledger)."""
    return json.dumps(
        {name: getattr(result, name) for name in _ANSWER_FIELDS}, separators=(",", ":")
    ).encode()


def _replayed_answer(hold: lpb.ReserveResponse) -> GenerateResult:
    """The first answer of a keyed call, from the ledger (kept with its hold and its charge)."""
    if (
        hold.status in ("settled", "settled_after_expiry")
        and hold.answer
        and hold.HasField("settlement")
    ):
        fields = json.loads(hold.answer)
        return GenerateResult(
            text=str(fields["text"]),
            provider=str(fields["provider"]),
            model=str(fields["model"]),
            input_tokens=int(fields["input_tokens"]),
            output_tokens=int(fields["output_tokens"]),
            stop_reason=str(fields["stop_reason"]),
            token_usage=_token_usage(hold.settlement),
        )
    raise _duplicate(hold)


def _duplicate(hold: lpb.ReserveResponse) -> GatewayError:
    if hold.status == "held":
        return GatewayError(
            Failure.CONFLICT,
            "REQUEST_IN_PROGRESS",
            "a call with this idempotency key is still running; retry later for its answer",
        )
    return GatewayError(
        Failure.CONFLICT,
        "DUPLICATE_REQUEST",
        "this idempotency key was already used for a call; it was not charged again",
    )


def _result(
    completion: Completion,
    token_usage: TokenUsage | None = None,
    usage_info: UsageInfo | None = None,
) -> GenerateResult:
    return GenerateResult(
        text=completion.text,
        provider=completion.provider,
        model=completion.model,
        input_tokens=completion.input_tokens,
        output_tokens=completion.output_tokens,
        stop_reason=completion.stop_reason or "",
        token_usage=token_usage,
        usage_info=usage_info,
    )


def _stream_result(
    plan: _Plan,
    end: StreamEnd,
    text: str,
    token_usage: TokenUsage | None = None,
    usage_info: UsageInfo | None = None,
) -> GenerateResult:
    return GenerateResult(
        text=text,
        provider=plan.provider_name,
        model=end.model,
        input_tokens=end.input_tokens,
        output_tokens=end.output_tokens,
        stop_reason=end.stop_reason or "",
        token_usage=token_usage,
        usage_info=usage_info,
    )
