"""Commands and results of the ledger's operations: plain values, no gRPC, no SQL."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any


class PurchaseType(enum.StrEnum):
    SUBSCRIPTION = "subscription"
    ONE_TIME = "one_time"


class UserType(enum.StrEnum):
    SUBSCRIPTION = "subscription"
    BYOK = "byok"
    UNKNOWN = "unknown"
    # A BYOK call by a caller with no account: recorded with an empty user id (and only it).
    PUBLIC_BYOK = "public_byok"


class Granularity(enum.StrEnum):
    """The length of one period of platform analytics, in UTC."""

    HOUR = "hour"
    DAY = "day"
    MONTH = "month"


@dataclass(frozen=True, slots=True)
class Balance:
    available: int
    reserved: int
    # Tokens of refunded payments still to collect (see Account.owed).
    owed: int = 0


@dataclass(frozen=True, slots=True)
class Usage:
    provider: str
    model: str
    input_tokens: int
    output_tokens: int
    # The server-held prompt the call used (both or neither), for analytics by prompt.
    prompt_id: str | None = None
    prompt_version: str | None = None

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens


@dataclass(frozen=True, slots=True)
class Payment:
    """What a buyer paid, as the payment provider reported it (analytics only)."""

    currency: str  # ISO 4217, upper case; "" unknown (then amount_minor is 0)
    amount_minor: int  # in the currency's minor unit
    amount_usd_cents: int | None  # the US-dollar value; None: not reported

    def to_json(self) -> list[object]:
        return [self.currency, self.amount_minor, self.amount_usd_cents]

    @classmethod
    def from_json(cls, data: list[Any] | None) -> Payment | None:
        if data is None:
            return None
        currency, amount, usd = data
        return cls(str(currency), int(amount), None if usd is None else int(usd))


@dataclass(frozen=True, slots=True)
class PurchaseCredited:
    purchase_id: str
    tokens_credited: int
    platform_fee_tokens: int
    balance: Balance
    replayed: bool = False
    # Waits for its subscription: nothing credited yet.
    parked: bool = False
    owed_collected: int = 0


PARKED_CREDIT = PurchaseCredited("", 0, 0, Balance(0, 0), parked=True)


@dataclass(frozen=True, slots=True)
class Reservation:
    reservation_id: str
    reserved_tokens: int
    expires_at: datetime
    balance: Balance
    replayed: bool = False
    status: str = "held"
    # On a replay of a settled hold: the answer its Settle stored, and what the Settle answered.
    answer: bytes | None = None
    settlement: Settlement | None = None
    # The attempt that made the hold (what its Reserve named), also on a replay.
    attempt_id: str = ""


@dataclass(frozen=True, slots=True)
class HoldExtension:
    expires_at: datetime


@dataclass(frozen=True, slots=True)
class Settlement:
    tokens_used: int
    fee_tokens: int
    tokens_charged: int
    released_tokens: int
    unbilled_tokens: int
    balance: Balance
    replayed: bool = False
    overrun_tokens: int = 0
    owed_collected: int = 0
    answer_stored: bool = False


@dataclass(frozen=True, slots=True)
class Release:
    released_tokens: int
    balance: Balance
    replayed: bool = False
    owed_collected: int = 0


@dataclass(frozen=True, slots=True)
class PurchaseRef:
    """A purchase named by its id, or by the payment provider's (source, external id)."""

    purchase_id: str | None = None
    source: str | None = None
    external_id: str | None = None


@dataclass(frozen=True, slots=True)
class PurchaseSnapshot:
    purchase_id: str
    tokens_purchased: int
    tokens_credited: int
    tokens_refunded: int


@dataclass(frozen=True, slots=True)
class Refund:
    tokens_refunded: int
    tokens_debited: int
    shortfall_tokens: int
    platform_fee_reversed: int
    balance: Balance
    replayed: bool = False
    # Waits for its purchase: nothing moved yet.
    parked: bool = False


PARKED_REFUND = Refund(0, 0, 0, 0, Balance(0, 0), parked=True)


@dataclass(frozen=True, slots=True)
class RefundShare:
    """A refund as the payment provider states it: money out of the payment's total."""

    refunded_amount: int
    total_amount: int


@dataclass(frozen=True, slots=True)
class RefundCommand:
    """A validated RefundPurchase. Stored as JSON while it waits for its purchase."""

    key: str
    request_hash: bytes
    ref: PurchaseRef
    tokens: int  # with `share` None: tokens (0: everything not yet refunded)
    share: RefundShare | None
    cumulative: bool
    wait_for_purchase: bool

    def to_json(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "request_hash": self.request_hash.hex(),
            "purchase_id": self.ref.purchase_id,
            "source": self.ref.source,
            "external_id": self.ref.external_id,
            "tokens": self.tokens,
            "share": (
                None
                if self.share is None
                else [self.share.refunded_amount, self.share.total_amount]
            ),
            "cumulative": self.cumulative,
            "wait_for_purchase": self.wait_for_purchase,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RefundCommand:
        share = data["share"]
        return cls(
            key=data["key"],
            request_hash=bytes.fromhex(data["request_hash"]),
            ref=PurchaseRef(data["purchase_id"], data["source"], data["external_id"]),
            tokens=int(data["tokens"]),
            share=None if share is None else RefundShare(int(share[0]), int(share[1])),
            cumulative=bool(data["cumulative"]),
            wait_for_purchase=bool(data["wait_for_purchase"]),
        )


@dataclass(frozen=True, slots=True)
class RefundPlan:
    """What one refund moves, sized by the domain from the locked purchase."""

    tokens: int
    user_part: int
    fee_part: int


@dataclass(frozen=True, slots=True)
class CreditCommand:
    """A validated CreditPurchase. Stored as JSON while it waits for its subscription."""

    key: str
    request_hash: bytes
    user_id: str  # "" for a subscription payment: its subscription's user
    purchase_type: PurchaseType
    tokens: int  # 0 for a subscription payment: its subscription's tokens_per_period
    source: str
    external_id: str
    subscription: str | None  # the subscription's external id (same source), if any
    # What was paid (not part of request_hash: see Ledger.credit_purchase).
    payment: Payment | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "request_hash": self.request_hash.hex(),
            "user_id": self.user_id,
            "purchase_type": self.purchase_type.value,
            "tokens": self.tokens,
            "source": self.source,
            "external_id": self.external_id,
            "subscription": self.subscription,
            "payment": None if self.payment is None else self.payment.to_json(),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CreditCommand:
        return cls(
            key=data["key"],
            request_hash=bytes.fromhex(data["request_hash"]),
            user_id=data["user_id"],
            purchase_type=PurchaseType(data["purchase_type"]),
            tokens=int(data["tokens"]),
            source=data["source"],
            external_id=data["external_id"],
            subscription=data["subscription"],
            # Credits parked before payments were recorded have none.
            payment=Payment.from_json(data.get("payment")),
        )


@dataclass(frozen=True, slots=True)
class ParkedOperation:
    parked_id: str
    operation: str  # "credit_purchase" | "refund_purchase"
    request: dict[str, Any]


@dataclass(frozen=True, slots=True)
class UsageRecorded:
    usage_id: str
    replayed: bool = False


@dataclass(frozen=True, slots=True)
class MonthlyUsage:
    """The current calendar month's usage, as monthly quotas count it."""

    starts_at: datetime
    resets_at: datetime
    charged: int
    held: int

    @property
    def used(self) -> int:
        return self.charged + self.held


@dataclass(frozen=True, slots=True)
class Quote:
    """What a Reserve would hold, and whether it would be taken now."""

    required: int
    balance: Balance
    month: MonthlyUsage
    within_quota: bool

    @property
    def sufficient(self) -> bool:
        return self.balance.available >= self.required


@dataclass(frozen=True, slots=True)
class UserStatus:
    user_type: UserType
    has_subscription: bool
    has_purchases: bool
    balance: Balance
    month: MonthlyUsage


@dataclass(frozen=True, slots=True)
class UsageSummary:
    total_requests: int
    total_tokens: int
    tokens_charged: int
    estimated_total_cost_micro_usd: int
    unknown_cost_requests: int


@dataclass(frozen=True, slots=True)
class UsageBreakdown:
    provider: str
    model: str
    summary: UsageSummary


@dataclass(frozen=True, slots=True)
class UsageEntry:
    usage_id: str
    user_type: UserType
    usage: Usage
    tokens_charged: int
    estimated_cost_micro_usd: int | None
    created_at: datetime


@dataclass(frozen=True, slots=True)
class PromptBreakdown:
    prompt_id: str
    prompt_version: str
    summary: UsageSummary


@dataclass(frozen=True, slots=True)
class UsageAnalytics:
    summary: UsageSummary
    breakdown: list[UsageBreakdown]
    history: list[UsageEntry]
    by_prompt: list[PromptBreakdown]


@dataclass(frozen=True, slots=True)
class PurchaseRecord:
    purchase_id: str
    purchase_type: PurchaseType
    tokens_purchased: int
    tokens_credited: int
    platform_fee_tokens: int
    tokens_refunded: int
    source: str
    external_id: str
    created_at: datetime
    payment: Payment | None = None


@dataclass(frozen=True, slots=True)
class PurchasePage:
    purchases: list[PurchaseRecord]
    next_cursor: tuple[datetime, str] | None


@dataclass(frozen=True, slots=True)
class Subscription:
    """A payment provider's subscription, as its latest applied webhook described it."""

    source: str
    external_id: str
    user_id: str
    variant_id: str
    status: str
    renews_at: datetime | None
    ends_at: datetime | None
    provider_updated_at: datetime
    # Tokens each payment buys (from the gateway's catalog); None: unknown.
    tokens_per_period: int | None = None


@dataclass(frozen=True, slots=True)
class SubscriptionUpsert:
    # False: the stored state was as new or newer (a duplicate or stale delivery).
    applied: bool
    subscription: Subscription
    # Payments that waited for this subscription, credited in the same transaction.
    parked_credits_applied: int = 0


@dataclass(frozen=True, slots=True)
class DeadLetterRecorded:
    dead_letter_id: str
    replayed: bool = False


@dataclass(frozen=True, slots=True)
class DeadLetter:
    dead_letter_id: str
    source: str
    event_name: str
    subject: str
    reason: str
    raw_body: bytes
    created_at: datetime
    resolved_at: datetime | None
    resolution: str | None


@dataclass(frozen=True, slots=True)
class DeadLetterPage:
    letters: list[DeadLetter]
    # (created_at, id) of the last letter when more follow.
    next_cursor: tuple[datetime, str] | None


@dataclass(frozen=True, slots=True)
class RetentionPolicy:
    """How long what only serves replays is kept (seconds; 0 keeps it forever)."""

    transient_key_seconds: int = 86_400
    key_seconds: int = 30 * 86_400
    answer_seconds: int = 86_400
    resolved_seconds: int = 90 * 86_400


# ---- operator analytics ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class UsageFigures:
    """Calls of one period, one model, or a whole range (additive: sums of sums)."""

    requests: int = 0
    provider_tokens_used: int = 0
    tokens_charged: int = 0
    usage_fee_tokens: int = 0
    # Known estimates of subscription calls (the platform's cost) and of BYOK calls (public too).
    provider_cost_micro_usd: int = 0
    byok_cost_micro_usd: int = 0
    unknown_cost_requests: int = 0
    public_byok_requests: int = 0

    def __add__(self, other: UsageFigures) -> UsageFigures:
        return UsageFigures(*(getattr(self, f) + getattr(other, f) for f in UsageFigures.__slots__))


@dataclass(frozen=True, slots=True)
class UserCounts:
    """Distinct signed-in users with calls (not additive across periods)."""

    active: int = 0
    subscription: int = 0
    byok: int = 0


@dataclass(frozen=True, slots=True)
class PurchaseGroup:
    """Purchases of one period, source and currency (None: no currency recorded)."""

    period: datetime
    source: str
    currency: str | None
    purchases: int
    tokens_sold: int
    tokens_credited: int
    purchase_fee_tokens: int
    amount_minor: int
    usd_cents: int
    without_usd: int
    # tokens_credited of the purchases that have a USD value.
    credited_with_usd: int


@dataclass(frozen=True, slots=True)
class JournalFigures:
    """What the journal booked in one period besides purchases and charges."""

    tokens_refunded: int = 0
    shortfall_tokens: int = 0
    unbilled_tokens: int = 0

    def __add__(self, other: JournalFigures) -> JournalFigures:
        return JournalFigures(
            self.tokens_refunded + other.tokens_refunded,
            self.shortfall_tokens + other.shortfall_tokens,
            self.unbilled_tokens + other.unbilled_tokens,
        )


@dataclass(frozen=True, slots=True)
class ModelUsage:
    provider: str
    model: str
    usage: UsageFigures


@dataclass(frozen=True, slots=True)
class TopUser:
    user_id: str
    requests: int
    tokens_charged: int
    provider_tokens_used: int


@dataclass(frozen=True, slots=True)
class PlatformRows:
    """What the store reads for one range, grouped by period (the start of each), in one
    snapshot; the domain turns it into figures."""

    usage: dict[datetime, UsageFigures]
    users: dict[datetime, UserCounts]
    users_total: UserCounts
    models: list[ModelUsage]
    period_models: dict[datetime, list[ModelUsage]]
    top_users: list[TopUser]
    purchases: list[PurchaseGroup]
    journal: dict[datetime, JournalFigures]
    open_receivable_tokens: int
    open_holds: int
    held_tokens: int


@dataclass(frozen=True, slots=True)
class CurrencyAmount:
    currency: str
    amount_minor: int


@dataclass(frozen=True, slots=True)
class PlatformFigures:
    purchases: int
    tokens_sold: int
    tokens_credited: int
    purchase_fee_tokens: int
    revenue: list[CurrencyAmount]
    revenue_micro_usd: int
    purchases_without_amount: int
    usage: UsageFigures
    gross_margin_micro_usd: int
    journal: JournalFigures
    users: UserCounts


@dataclass(frozen=True, slots=True)
class PlatformPeriod:
    start: datetime
    figures: PlatformFigures
    models: list[ModelFigures] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class ModelFigures:
    provider: str
    model: str
    usage: UsageFigures
    gross_margin_micro_usd: int


@dataclass(frozen=True, slots=True)
class PurchaseSource:
    source: str
    purchases: int
    tokens_sold: int
    revenue_micro_usd: int


@dataclass(frozen=True, slots=True)
class PlatformAnalytics:
    periods: list[PlatformPeriod]
    totals: PlatformFigures
    models: list[ModelFigures]
    top_users: list[TopUser]
    sources: list[PurchaseSource]
    open_receivable_tokens: int
    open_holds: int
    held_tokens: int
    revenue_per_token_micro_usd: int


@dataclass(frozen=True, slots=True)
class OpenHold:
    hold_id: str
    amount: int
    created_at: datetime
    expires_at: datetime


@dataclass(frozen=True, slots=True)
class UserAccount:
    balance: Balance
    holds: list[OpenHold]
    # The ledger has an account, a usage record or a subscription of this user.
    known: bool
