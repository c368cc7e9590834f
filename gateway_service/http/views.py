"""The core's results as the JSON the extensions read: camelCase names, USD estimates as decimal
strings next to their integer micro-dollars, `null` for what does not apply or is unknown."""

from __future__ import annotations

from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from gateway_service.core import Eligibility, GenerateResult, TokenUsage, UsageInfo, UserStatus
from shared.gen.rpcai.ledger.v1 import ledger_pb2 as lpb

USER_TYPES: dict[int, str] = {
    lpb.USER_TYPE_SUBSCRIPTION: "subscription",
    lpb.USER_TYPE_BYOK: "byok",
}
PURCHASE_TYPES: dict[int, str] = {
    lpb.PURCHASE_TYPE_SUBSCRIPTION: "subscription",
    lpb.PURCHASE_TYPE_ONE_TIME: "one_time",
}


def user_type(value: int) -> str:
    return USER_TYPES.get(value, "unknown")


def usd(micro_usd: int | None) -> str | None:
    """Integer micro-dollars as an exact decimal string: 7500 -> "0.007500"; None stays None."""
    if micro_usd is None:
        return None
    sign = "-" if micro_usd < 0 else ""
    whole, fraction = divmod(abs(micro_usd), 1_000_000)
    return f"{sign}{whole}.{fraction:06d}"


def timestamp(ts: Timestamp) -> str:
    return ts.ToJsonString()  # RFC 3339, UTC, "Z"


def token_usage(t: TokenUsage | None) -> dict[str, Any] | None:
    if t is None:
        return None
    return {
        "tokensCharged": t.tokens_charged,
        "remainingBalance": t.remaining_balance,
        "tokensUsed": t.tokens_used,
        "feeTokens": t.fee_tokens,
        "settlementPending": t.settlement_pending,
    }


def usage_info(u: UsageInfo | None) -> dict[str, Any] | None:
    if u is None:
        return None
    return {
        "tokensUsed": u.tokens_used,
        "estimatedCostMicroUsd": u.estimated_cost_micro_usd,
        "estimatedCostUsd": usd(u.estimated_cost_micro_usd),
    }


def stream_usage(r: GenerateResult) -> dict[str, Any]:
    """Everything about a finished call but its text (the `usage` event of a stream)."""
    return {
        "provider": r.provider,
        "model": r.model,
        "stopReason": r.stop_reason,
        "usage": {"inputTokens": r.input_tokens, "outputTokens": r.output_tokens},
        "tokenUsage": token_usage(r.token_usage),
        "usageInfo": usage_info(r.usage_info),
    }


def generate(r: GenerateResult) -> dict[str, Any]:
    return {"text": r.text, **stream_usage(r)}


def status(s: UserStatus) -> dict[str, Any]:
    return {
        "userType": user_type(s.user_type),
        "hasSubscription": s.has_subscription,
        "hasPurchases": s.has_purchases,
        "availableTokens": s.available_tokens,
        "reservedTokens": s.reserved_tokens,
        "subscriptionTier": s.subscription_tier,
        "quota": s.quota,
        "limits": None
        if s.limits is None
        else {
            "requestsPerMinute": s.limits.requests_per_minute,
            "tokensPerMinute": s.limits.tokens_per_minute,
            "callsInFlight": s.limits.calls_in_flight,
            "requestsRemaining": s.limits.requests_remaining,
            "tokensRemaining": s.limits.tokens_remaining,
            "callsInFlightNow": s.limits.calls_in_flight_now,
        },
        "month": None
        if s.month is None
        else {
            "quotaTokens": s.month.quota_tokens,
            "usedTokens": s.month.used_tokens,
            "resetsAt": s.month.resets_at.isoformat().replace("+00:00", "Z"),
        },
    }


def eligibility(e: Eligibility) -> dict[str, Any]:
    return {
        "canMakeRequest": e.can_make_request,
        "reason": e.reason,
        "userType": user_type(e.user_type),
        "requiredTokens": e.required_tokens,
        "availableTokens": e.available_tokens,
    }


def _summary(s: lpb.UsageSummary) -> dict[str, Any]:
    return {
        "totalRequests": s.total_requests,
        "totalTokens": s.total_tokens,
        "tokensCharged": s.tokens_charged,
        "estimatedTotalCostMicroUsd": s.estimated_total_cost_micro_usd,
        "estimatedTotalCostUsd": usd(s.estimated_total_cost_micro_usd),
        "unknownCostRequests": s.unknown_cost_requests,
    }


def _record(h: lpb.UsageRecord) -> dict[str, Any]:
    cost = h.estimated_cost_micro_usd if h.HasField("estimated_cost_micro_usd") else None
    return {
        "usageId": h.usage_id,
        "userType": user_type(h.user_type),
        "provider": h.usage.provider,
        "model": h.usage.model,
        "inputTokens": h.usage.input_tokens,
        "outputTokens": h.usage.output_tokens,
        "tokensCharged": h.tokens_charged,
        "estimatedCostMicroUsd": cost,
        "estimatedCostUsd": usd(cost),
        "createdAt": timestamp(h.created_at),
    }


def usage_analytics(a: lpb.GetUsageAnalyticsResponse) -> dict[str, Any]:
    return {
        "summary": _summary(a.summary),
        "breakdown": [
            {"provider": b.provider, "model": b.model, "summary": _summary(b.summary)}
            for b in a.breakdown
        ],
        "history": [_record(h) for h in a.history],
    }


def purchases(page: lpb.GetPurchaseHistoryResponse) -> dict[str, Any]:
    return {
        "purchases": [
            {
                "purchaseId": p.purchase_id,
                "purchaseType": PURCHASE_TYPES.get(p.purchase_type, "unknown"),
                "tokensPurchased": p.tokens_purchased,
                "tokensCredited": p.tokens_credited,
                "platformFeeTokens": p.platform_fee_tokens,
                "tokensRefunded": p.tokens_refunded,
                "createdAt": timestamp(p.created_at),
            }
            for p in page.purchases
        ],
        "nextPageToken": page.next_page_token or None,
    }
