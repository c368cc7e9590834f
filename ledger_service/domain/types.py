"""Commands and results of the ledger's operations: plain values, no gRPC, no SQL."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime


class PurchaseType(enum.StrEnum):
    SUBSCRIPTION = "subscription"
    ONE_TIME = "one_time"


class UserType(enum.StrEnum):
    SUBSCRIPTION = "subscription"
    BYOK = "byok"
    UNKNOWN = "unknown"


@dataclass(frozen=True, slots=True)
class Balance:
    available: int
    reserved: int


@dataclass(frozen=True, slots=True)
class Usage:
    provider: str
    model: str
    input_tokens: int
    output_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens


@dataclass(frozen=True, slots=True)
class PurchaseCredited:
    purchase_id: str
    tokens_credited: int
    platform_fee_tokens: int
    balance: Balance
    replayed: bool = False


@dataclass(frozen=True, slots=True)
class Reservation:
    reservation_id: str
    reserved_tokens: int
    expires_at: datetime
    balance: Balance
    replayed: bool = False
    status: str = "held"


@dataclass(frozen=True, slots=True)
class Settlement:
    tokens_used: int
    fee_tokens: int
    tokens_charged: int
    released_tokens: int
    unbilled_tokens: int
    balance: Balance
    replayed: bool = False


@dataclass(frozen=True, slots=True)
class Release:
    released_tokens: int
    balance: Balance
    replayed: bool = False


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


@dataclass(frozen=True, slots=True)
class UsageRecorded:
    usage_id: str
    replayed: bool = False


@dataclass(frozen=True, slots=True)
class UserStatus:
    user_type: UserType
    has_subscription: bool
    has_purchases: bool
    balance: Balance


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
class UsageAnalytics:
    summary: UsageSummary
    breakdown: list[UsageBreakdown]
    history: list[UsageEntry]


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


@dataclass(frozen=True, slots=True)
class SubscriptionUpsert:
    # False: the stored state was as new or newer (a duplicate or stale delivery).
    applied: bool
    subscription: Subscription


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
