"""The money rules, in integers only. Every function here is pure and total over its domain."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Rates:
    """The configured percentages; every journal transaction records the ones it used."""

    user_share_percent: int = 80
    usage_fee_percent: int = 25

    def __post_init__(self) -> None:
        if not 0 <= self.user_share_percent <= 100:
            raise ValueError("user_share_percent must be within 0..100")
        if not 0 <= self.usage_fee_percent <= 1000:
            raise ValueError("usage_fee_percent must be within 0..1000")


def ceil_percent(amount: int, percent: int) -> int:
    """ceil(amount * percent / 100) without floats."""
    return -(-amount * percent // 100)


def split_purchase(tokens: int, user_share_percent: int) -> tuple[int, int]:
    """(credited to the user, platform fee): floor for the user, the rest is the fee."""
    credited = tokens * user_share_percent // 100
    return credited, tokens - credited


def usage_fee(tokens_used: int, usage_fee_percent: int) -> int:
    return ceil_percent(tokens_used, usage_fee_percent)


def usage_charge(tokens_used: int, usage_fee_percent: int) -> tuple[int, int]:
    """(tokens used, fee): the user pays both. 100 used at 25% -> (100, 25)."""
    return tokens_used, usage_fee(tokens_used, usage_fee_percent)


def hold_amount(estimated_tokens: int, usage_fee_percent: int) -> int:
    """What a Reserve holds: the estimate plus its fee, so a settle within it always fits."""
    return estimated_tokens + usage_fee(estimated_tokens, usage_fee_percent)


def refund_split(
    tokens_purchased: int, tokens_credited: int, refunded_before: int, tokens_to_refund: int
) -> tuple[int, int]:
    """(taken back from the user, taken back from the fee) for refunding `tokens_to_refund`.

    Computed on cumulative totals, so any sequence of partial refunds reverses exactly the
    original credit and fee when it reaches the whole purchase: no rounding leak either way.
    """
    user_before = refunded_before * tokens_credited // tokens_purchased
    user_after = (refunded_before + tokens_to_refund) * tokens_credited // tokens_purchased
    user_part = user_after - user_before
    return user_part, tokens_to_refund - user_part


def refund_share_tokens(tokens_purchased: int, refunded_amount: int, total_amount: int) -> int:
    """Purchased tokens a refund of `refunded_amount` out of `total_amount` covers (floor): what
    that purchase bought, in proportion to the money returned. Never the catalog's figure."""
    return tokens_purchased * refunded_amount // total_amount


# Analytics values money in integer micro-dollars; payments arrive in cents.
MICRO_USD_PER_CENT = 10_000


def revenue_per_token(revenue_micro_usd: int, tokens_credited: int) -> int:
    """What one credited token sold for, in micro-dollars, rounded down: the revenue of the
    purchases that have a USD value over the tokens those purchases credited (0: none)."""
    return revenue_micro_usd // tokens_credited if tokens_credited > 0 else 0


def gross_margin(
    tokens_charged: int, revenue_micro_usd: int, tokens_credited: int, cost_micro_usd: int
) -> int:
    """Tokens charged valued at what a credited token sold for, less what the provider cost.
    One floor, at the end: a per-token price rounded to whole micro-dollars first would be
    off by up to 1 micro-dollar a token (at $10 a million tokens, ~8% of the value)."""
    value = tokens_charged * revenue_micro_usd // tokens_credited if tokens_credited > 0 else 0
    return value - cost_micro_usd
