"""The HTTP API's answers, each described once as a `@reply` TypedDict (`http.shapes`), and how
the core's results become them: camelCase names on the wire, USD estimates as decimal strings
next to their integer micro-dollars, `null` for what does not apply or is unknown. The shapes
are what the document says and what is sent: `shapes.to_json` serializes them, /openapi.json
lists them."""

from __future__ import annotations

from typing import Annotated, Literal, get_args, overload

from annotated_types import Ge
from google.protobuf.timestamp_pb2 import Timestamp
from pydantic import Field, StringConstraints
from typing_extensions import TypedDict

from gateway_service import core
from gateway_service.http.shapes import reply, to_data
from gateway_service.prompts import Prompt
from gateway_service.webhooks.lemonsqueezy import Status
from shared.gen.rpcai.ledger.v1 import ledger_pb2 as lpb

UserType = Literal["subscription", "byok", "unknown"]
PurchaseType = Literal["subscription", "one_time", "unknown"]

USER_TYPES: dict[int, UserType] = {
    lpb.USER_TYPE_SUBSCRIPTION: "subscription",
    lpb.USER_TYPE_BYOK: "byok",
}
PURCHASE_TYPES: dict[int, PurchaseType] = {
    lpb.PURCHASE_TYPE_SUBSCRIPTION: "subscription",
    lpb.PURCHASE_TYPE_ONE_TIME: "one_time",
}
assert set(get_args(UserType)) == {*USER_TYPES.values(), "unknown"}
assert set(get_args(PurchaseType)) == {*PURCHASE_TYPES.values(), "unknown"}

Count = Annotated[int, Ge(0)]
MicroUsd = Annotated[int, Field(description="US dollars times 1,000,000 (exact)")]
Usd = Annotated[
    str,
    StringConstraints(pattern=r"^-?[0-9]+\.[0-9]{6}$"),
    Field(description='The same amount as a decimal string of dollars, e.g. "0.007500"'),
]
Timestamp_ = Annotated[str, Field(json_schema_extra={"format": "date-time"})]


def user_type(value: int) -> UserType:
    return USER_TYPES.get(value, "unknown")


@overload
def usd(micro_usd: int) -> str: ...
@overload
def usd(micro_usd: None) -> None: ...
@overload
def usd(micro_usd: int | None) -> str | None: ...
def usd(micro_usd: int | None) -> str | None:
    """Integer micro-dollars as an exact decimal string: 7500 -> "0.007500"; None stays None."""
    if micro_usd is None:
        return None
    sign = "-" if micro_usd < 0 else ""
    whole, fraction = divmod(abs(micro_usd), 1_000_000)
    return f"{sign}{whole}.{fraction:06d}"


def timestamp(ts: Timestamp) -> str:
    return ts.ToJsonString()  # RFC 3339, UTC, "Z"


# ---- a call ---------------------------------------------------------------------------------


@reply
class Usage(TypedDict):
    """What the provider reported."""

    input_tokens: Count
    output_tokens: Count


@reply
class TokenUsage(TypedDict):
    """Subscription calls: what the ledger charged."""

    tokens_charged: Count
    """used tokens plus the usage fee"""
    remaining_balance: Count
    tokens_used: Count
    fee_tokens: Count
    settlement_pending: bool
    """the ledger was unreachable when the call ended: the charge is queued (tokensCharged 0 and
    remainingBalance the pre-call value until it lands)"""


@reply
class UsageInfo(TypedDict):
    """BYOK calls: tracked, never charged. Costs are null when the model's price is unknown."""

    tokens_used: Count
    estimated_cost_micro_usd: MicroUsd | None
    estimated_cost_usd: Usd | None


@reply
class StreamUsage(TypedDict):
    """A finished call without its text (the `usage` event of a stream)."""

    provider: str
    model: str
    stop_reason: str
    usage: Usage
    token_usage: TokenUsage | None
    usage_info: UsageInfo | None


@reply
class GenerateResponse(StreamUsage):
    """The answer and what it cost."""

    text: str


@reply
class StreamDelta(TypedDict):
    """The `delta` event: a chunk of text."""

    text: str


@reply
class StreamDone(TypedDict):
    """The `done` event: the stream is complete."""


def _token_usage(t: core.TokenUsage | None) -> TokenUsage | None:
    if t is None:
        return None
    return TokenUsage(
        tokens_charged=t.tokens_charged,
        remaining_balance=t.remaining_balance,
        tokens_used=t.tokens_used,
        fee_tokens=t.fee_tokens,
        settlement_pending=t.settlement_pending,
    )


def _usage_info(u: core.UsageInfo | None) -> UsageInfo | None:
    if u is None:
        return None
    return UsageInfo(
        tokens_used=u.tokens_used,
        estimated_cost_micro_usd=u.estimated_cost_micro_usd,
        estimated_cost_usd=usd(u.estimated_cost_micro_usd),
    )


def generate(r: core.GenerateResult) -> GenerateResponse:
    return GenerateResponse(
        text=r.text,
        provider=r.provider,
        model=r.model,
        stop_reason=r.stop_reason,
        usage=Usage(input_tokens=r.input_tokens, output_tokens=r.output_tokens),
        token_usage=_token_usage(r.token_usage),
        usage_info=_usage_info(r.usage_info),
    )


def stream_usage(r: core.GenerateResult) -> dict[str, object]:
    """The `usage` event's data (sse.encode takes a mapping)."""
    usage = StreamUsage(
        provider=r.provider,
        model=r.model,
        stop_reason=r.stop_reason,
        usage=Usage(input_tokens=r.input_tokens, output_tokens=r.output_tokens),
        token_usage=_token_usage(r.token_usage),
        usage_info=_usage_info(r.usage_info),
    )
    return to_data(StreamUsage, usage)


# ---- the caller -----------------------------------------------------------------------------


@reply
class RateLimits(TypedDict):
    """The caller's rate limits and what is left of them now."""

    requests_per_minute: Count
    """0: unlimited"""
    tokens_per_minute: Count
    """0: unlimited"""
    calls_in_flight: Count
    """0: unlimited"""
    requests_remaining: Count
    """requests left right now"""
    tokens_remaining: Count
    """provider tokens left this minute"""
    calls_in_flight_now: Count
    """the caller's calls running now"""


@reply
class MonthlyQuota(TypedDict):
    """The monthly quota and this month's use of it."""

    quota_tokens: Count
    """tokens a calendar month; 0: no quota"""
    used_tokens: Count
    """charged plus held this month"""
    resets_at: Timestamp_
    """RFC 3339, UTC: when the month ends"""


@reply
class UserStatus(TypedDict):
    """Who you are to the gateway: user type, balance, tier, limits."""

    user_type: UserType
    has_subscription: bool
    has_purchases: bool
    available_tokens: Count
    reserved_tokens: Count
    subscription_tier: str | None
    """from the JWT's tier claim"""
    quota: int | None
    """from the JWT's quota claim"""
    limits: RateLimits | None
    month: MonthlyQuota | None


def status(s: core.UserStatus) -> UserStatus:
    limits = s.limits
    month = s.month
    return UserStatus(
        user_type=user_type(s.user_type),
        has_subscription=s.has_subscription,
        has_purchases=s.has_purchases,
        available_tokens=s.available_tokens,
        reserved_tokens=s.reserved_tokens,
        subscription_tier=s.subscription_tier,
        quota=s.quota,
        limits=None
        if limits is None
        else RateLimits(
            requests_per_minute=limits.requests_per_minute,
            tokens_per_minute=limits.tokens_per_minute,
            calls_in_flight=limits.calls_in_flight,
            requests_remaining=limits.requests_remaining,
            tokens_remaining=limits.tokens_remaining,
            calls_in_flight_now=limits.calls_in_flight_now,
        ),
        month=None
        if month is None
        else MonthlyQuota(
            quota_tokens=month.quota_tokens,
            used_tokens=month.used_tokens,
            resets_at=month.resets_at.isoformat().replace("+00:00", "Z"),
        ),
    )


@reply
class Eligibility(TypedDict):
    """Would a call be allowed, and what would it hold."""

    can_make_request: bool
    reason: str
    user_type: UserType
    required_tokens: Count
    """what the call would hold (its tokens plus the fee), as its Reserve would"""
    available_tokens: Count


def eligibility(e: core.Eligibility) -> Eligibility:
    return Eligibility(
        can_make_request=e.can_make_request,
        reason=e.reason,
        user_type=user_type(e.user_type),
        required_tokens=e.required_tokens,
        available_tokens=e.available_tokens,
    )


# ---- server-held prompts --------------------------------------------------------------------


@reply
class PromptVariable(TypedDict):
    name: str
    type: Literal["string", "integer", "boolean"]
    required: bool
    default: str | int | bool | None
    """the value used when the call gives none; null for a required variable"""
    description: str


@reply
class PromptInfo(TypedDict):
    """A server-held prompt, without its text."""

    id: str
    version: str
    description: str
    variables: list[PromptVariable]
    provider: str | None
    """used when the call names no provider or model; null: the server's default"""
    model: str | None
    max_tokens: Count | None
    """used when the call gives none; null: the server's default"""


@reply
class PromptList(TypedDict):
    prompts: list[PromptInfo]


def prompt_list(prompts: list[Prompt]) -> PromptList:
    return PromptList(
        prompts=[
            PromptInfo(
                id=prompt.id,
                version=prompt.version,
                description=prompt.description,
                variables=[
                    PromptVariable(
                        name=variable.name,
                        type=variable.type.value,
                        required=variable.required,
                        default=variable.default,
                        description=variable.description,
                    )
                    for variable in prompt.variables
                ],
                provider=prompt.provider or None,
                model=prompt.model or None,
                max_tokens=prompt.max_tokens or None,
            )
            for prompt in prompts
        ]
    )


# ---- usage and purchases --------------------------------------------------------------------


@reply
class UsageSummary(TypedDict):
    total_requests: Count
    total_tokens: Count
    tokens_charged: Count
    estimated_total_cost_micro_usd: MicroUsd
    """over the calls whose cost is known (US dollars times 1,000,000)"""
    estimated_total_cost_usd: Usd
    unknown_cost_requests: Count


@reply
class UsageBreakdown(TypedDict):
    provider: str
    model: str
    summary: UsageSummary


@reply
class UsageRecord(TypedDict):
    usage_id: str
    user_type: UserType
    provider: str
    model: str
    input_tokens: Count
    output_tokens: Count
    tokens_charged: Count
    estimated_cost_micro_usd: MicroUsd | None
    estimated_cost_usd: Usd | None
    created_at: Timestamp_
    prompt_id: str | None
    """the server-held prompt the call used (GET /v1/prompts); null: none"""
    prompt_version: str | None


@reply
class PromptUsage(TypedDict):
    prompt_id: str
    prompt_version: str
    summary: UsageSummary


@reply
class UsageAnalytics(TypedDict):
    """Your usage over the window, by provider and model, and by server-held prompt."""

    summary: UsageSummary
    breakdown: list[UsageBreakdown]
    history: list[UsageRecord]
    """newest first; empty unless include_history=true"""
    by_prompt: list[PromptUsage]
    """by prompt and version, most used first; calls that used none are in no entry"""


def _summary(s: lpb.UsageSummary) -> UsageSummary:
    return UsageSummary(
        total_requests=s.total_requests,
        total_tokens=s.total_tokens,
        tokens_charged=s.tokens_charged,
        estimated_total_cost_micro_usd=s.estimated_total_cost_micro_usd,
        estimated_total_cost_usd=usd(s.estimated_total_cost_micro_usd),
        unknown_cost_requests=s.unknown_cost_requests,
    )


def _record(h: lpb.UsageRecord) -> UsageRecord:
    cost = h.estimated_cost_micro_usd if h.HasField("estimated_cost_micro_usd") else None
    return UsageRecord(
        usage_id=h.usage_id,
        user_type=user_type(h.user_type),
        provider=h.usage.provider,
        model=h.usage.model,
        input_tokens=h.usage.input_tokens,
        output_tokens=h.usage.output_tokens,
        tokens_charged=h.tokens_charged,
        estimated_cost_micro_usd=cost,
        estimated_cost_usd=usd(cost),
        created_at=timestamp(h.created_at),
        prompt_id=h.usage.prompt.id or None,
        prompt_version=h.usage.prompt.version or None,
    )


def usage_analytics(a: lpb.GetUsageAnalyticsResponse) -> UsageAnalytics:
    return UsageAnalytics(
        summary=_summary(a.summary),
        breakdown=[
            UsageBreakdown(provider=b.provider, model=b.model, summary=_summary(b.summary))
            for b in a.breakdown
        ],
        history=[_record(h) for h in a.history],
        by_prompt=[
            PromptUsage(
                prompt_id=p.prompt.id, prompt_version=p.prompt.version, summary=_summary(p.summary)
            )
            for p in a.by_prompt
        ],
    )


@reply
class Purchase(TypedDict):
    purchase_id: str
    purchase_type: PurchaseType
    tokens_purchased: Count
    tokens_credited: Count
    platform_fee_tokens: Count
    tokens_refunded: Count
    created_at: Timestamp_


@reply
class PurchasePage(TypedDict):
    """A page of your purchases, newest first."""

    purchases: list[Purchase]
    next_page_token: str | None
    """pass as page_token for the next page; null on the last page"""


def purchases(page: lpb.GetPurchaseHistoryResponse) -> PurchasePage:
    return PurchasePage(
        purchases=[
            Purchase(
                purchase_id=p.purchase_id,
                purchase_type=PURCHASE_TYPES.get(p.purchase_type, "unknown"),
                tokens_purchased=p.tokens_purchased,
                tokens_credited=p.tokens_credited,
                platform_fee_tokens=p.platform_fee_tokens,
                tokens_refunded=p.tokens_refunded,
                created_at=timestamp(p.created_at),
            )
            for p in page.purchases
        ],
        next_page_token=page.next_page_token or None,
    )


# ---- the process ----------------------------------------------------------------------------


@reply
class Health(TypedDict):
    status: Literal["ok"]


@reply
class Ready(TypedDict):
    status: Literal["ready"]


WebhookStatus = Literal["applied", "duplicate", "ignored", "waiting", "dead_letter"]


@reply
class WebhookOutcome(TypedDict):
    """What became of a webhook delivery."""

    status: WebhookStatus
    """waiting: kept by the ledger until its subscription or payment arrives; dead_letter: kept
    with its body and reason for an operator"""
    detail: str


assert set(get_args(WebhookStatus)) == {status.value for status in Status}
