"""The ledger's use cases: validate, apply the money rules, hand exact amounts to the store.

Knows nothing of gRPC or SQL: the store is any object with the `LedgerStore` methods.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Protocol

from ledger_service.domain import money
from ledger_service.domain.errors import InvalidArgument
from ledger_service.domain.types import (
    Balance,
    DeadLetter,
    DeadLetterRecorded,
    PurchaseCredited,
    PurchasePage,
    PurchaseRef,
    PurchaseSnapshot,
    PurchaseType,
    Refund,
    Release,
    Reservation,
    Settlement,
    Subscription,
    SubscriptionUpsert,
    Usage,
    UsageAnalytics,
    UsageRecorded,
    UserStatus,
    UserType,
)

# Bounds that no honest request comes near; past them a request is a bug or an attack.
MAX_ID_CHARS = 256
MAX_TOKENS_PER_CALL = 10**9  # one AI call
MAX_TOKENS_PER_PURCHASE = 10**12  # one payment
MAX_COST_MICRO_USD = 10**12  # one call: a million dollars
MAX_ANALYTICS_DAYS = 366
MAX_PAGE_SIZE = 100
DEFAULT_PAGE_SIZE = 20
DEFAULT_ANALYTICS_DAYS = 30
# Free text kept for people (dead-letter reasons, resolutions): one line, bounded.
MAX_NOTE_CHARS = 4096
# A webhook body kept as a dead letter; the table refuses larger ones too.
MAX_RAW_BODY_BYTES = 1024 * 1024
# Raw bodies in one ListDeadLetters page (at least one letter): the page must fit the 4 MiB that
# gRPC clients accept by default.
MAX_DEAD_LETTER_PAGE_BYTES = 3 * 1024 * 1024
# A timestamp at or before the epoch is a zero value sent by mistake, not a provider's time.
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# Refunds are rare; two racing on one purchase retry a few times, then give up loudly.
REFUND_ATTEMPTS = 5


class RefundRaced(Exception):
    """The purchase changed between reading it and refunding it (another refund won)."""


class LedgerStore(Protocol):
    async def credit_purchase(
        self,
        key: str,
        request_hash: bytes,
        user_id: str,
        purchase_type: PurchaseType,
        tokens: int,
        credited: int,
        fee: int,
        user_share_percent: int,
        source: str,
        external_id: str,
    ) -> PurchaseCredited: ...

    async def reserve(
        self,
        key: str,
        request_hash: bytes,
        user_id: str,
        amount: int,
        ttl_seconds: int,
        usage_fee_percent: int,
    ) -> Reservation: ...

    async def settle(
        self,
        reservation_id: uuid.UUID,
        request_hash: bytes,
        usage: Usage,
        tokens_used: int,
        fee: int,
        usage_fee_percent: int,
        cost_micro_usd: int | None,
    ) -> Settlement: ...

    async def release(self, reservation_id: uuid.UUID) -> Release: ...

    async def find_purchase(self, ref: PurchaseRef) -> PurchaseSnapshot: ...

    async def refund_purchase(
        self,
        key: str,
        request_hash: bytes,
        purchase: PurchaseSnapshot,
        tokens: int,
        user_part: int,
        fee_part: int,
    ) -> Refund:
        """Raises RefundRaced when `purchase.tokens_refunded` is no longer current."""
        ...

    async def replayed_refund(self, key: str, request_hash: bytes) -> Refund | None: ...

    async def record_usage(
        self,
        key: str,
        request_hash: bytes,
        user_id: str,
        user_type: UserType,
        usage: Usage,
        cost_micro_usd: int | None,
    ) -> UsageRecorded: ...

    async def balance(self, user_id: str) -> Balance: ...

    async def user_status(self, user_id: str) -> UserStatus: ...

    async def usage_analytics(
        self, user_id: str, since: datetime, include_history: bool
    ) -> UsageAnalytics: ...

    async def purchase_history(
        self, user_id: str, limit: int, after: tuple[datetime, str] | None
    ) -> PurchasePage: ...

    async def sweep_expired(self, limit: int) -> int: ...

    async def now(self) -> datetime: ...

    async def upsert_subscription(self, subscription: Subscription) -> SubscriptionUpsert: ...

    async def get_subscription(self, source: str, external_id: str) -> Subscription:
        """Raises SubscriptionNotFound."""
        ...

    async def record_dead_letter(
        self,
        source: str,
        event_name: str,
        subject: str,
        reason: str,
        raw_body: bytes,
        dedupe_key: str,
    ) -> DeadLetterRecorded: ...

    async def list_dead_letters(
        self, source: str, subject: str, include_resolved: bool, limit: int, max_body_bytes: int
    ) -> list[DeadLetter]: ...

    async def resolve_dead_letter(self, dead_letter_id: uuid.UUID, resolution: str) -> DeadLetter:
        """Raises DeadLetterNotFound."""
        ...


@dataclass(frozen=True, slots=True)
class HoldPolicy:
    default_ttl_seconds: int = 300
    max_ttl_seconds: int = 3600


def request_hash(operation: str, **fields: object) -> bytes:
    """A fingerprint of a request's content, to tell a replay from a reused key."""
    canonical = json.dumps([operation, fields], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).digest()


class Ledger:
    def __init__(
        self, store: LedgerStore, rates: money.Rates, holds: HoldPolicy | None = None
    ) -> None:
        self.store = store
        self.rates = rates
        self.holds = holds or HoldPolicy()

    async def credit_purchase(
        self,
        idempotency_key: str,
        user_id: str,
        tokens_purchased: int,
        purchase_type: PurchaseType | None,
        external_id: str,
        source: str,
    ) -> PurchaseCredited:
        key = _id("idempotency_key", idempotency_key)
        user = _id("user_id", user_id)
        tokens = _amount("tokens_purchased", tokens_purchased, 1, MAX_TOKENS_PER_PURCHASE)
        if purchase_type is None:
            raise InvalidArgument("purchase_type", "must be SUBSCRIPTION or ONE_TIME")
        ext = _id("external_id", external_id)
        src = _id("source", source)
        share = self.rates.user_share_percent
        credited, fee = money.split_purchase(tokens, share)
        digest = request_hash(
            "credit_purchase",
            user=user,
            tokens=tokens,
            type=purchase_type.value,
            source=src,
            external_id=ext,
        )
        return await self.store.credit_purchase(
            key, digest, user, purchase_type, tokens, credited, fee, share, src, ext
        )

    async def reserve(
        self,
        idempotency_key: str,
        user_id: str,
        estimated_tokens: int,
        ttl_seconds: int,
        fingerprint: str = "",
    ) -> Reservation:
        key = _id("idempotency_key", idempotency_key)
        user = _id("user_id", user_id)
        estimate = _amount("estimated_tokens", estimated_tokens, 1, MAX_TOKENS_PER_CALL)
        ttl = ttl_seconds or self.holds.default_ttl_seconds
        _amount("ttl_seconds", ttl, 1, self.holds.max_ttl_seconds)
        fee_percent = self.rates.usage_fee_percent
        amount = money.hold_amount(estimate, fee_percent)
        if len(fingerprint) > MAX_ID_CHARS:
            raise InvalidArgument("request_fingerprint", f"at most {MAX_ID_CHARS} characters")
        digest = request_hash(
            "reserve", user=user, estimated=estimate, ttl=ttl_seconds, fingerprint=fingerprint
        )
        return await self.store.reserve(key, digest, user, amount, ttl, fee_percent)

    async def settle(
        self, reservation_id: str, usage: Usage | None, cost_micro_usd: int | None
    ) -> Settlement:
        hold = _uuid("reservation_id", reservation_id)
        checked = _usage(usage)
        if cost_micro_usd is not None:
            _amount("estimated_cost_micro_usd", cost_micro_usd, 0, MAX_COST_MICRO_USD)
        fee_percent = self.rates.usage_fee_percent
        used, fee = money.usage_charge(checked.total_tokens, fee_percent)
        digest = request_hash(
            "settle",
            provider=checked.provider,
            model=checked.model,
            input=checked.input_tokens,
            output=checked.output_tokens,
            cost=cost_micro_usd,
        )
        return await self.store.settle(
            hold, digest, checked, used, fee, fee_percent, cost_micro_usd
        )

    async def release(self, reservation_id: str) -> Release:
        return await self.store.release(_uuid("reservation_id", reservation_id))

    async def refund_purchase(
        self,
        idempotency_key: str,
        ref: PurchaseRef,
        tokens_to_refund: int,
        cumulative: bool = False,
    ) -> Refund:
        """Refunds `tokens_to_refund` purchased tokens (0: all not yet refunded), or, when
        `cumulative`, whatever brings the purchase's refunded total up to `tokens_to_refund`
        (a total already reached or passed refunds nothing: never a negative refund)."""
        key = _id("idempotency_key", idempotency_key)
        if ref.purchase_id is not None:
            ref = PurchaseRef(purchase_id=str(_uuid("purchase_id", ref.purchase_id)))
        elif ref.source is not None or ref.external_id is not None:
            ref = PurchaseRef(
                source=_id("external.source", ref.source or ""),
                external_id=_id("external.external_id", ref.external_id or ""),
            )
        else:
            raise InvalidArgument("purchase", "name a purchase_id or an external (source, id)")
        requested = _amount("tokens_to_refund", tokens_to_refund, 0, MAX_TOKENS_PER_PURCHASE)
        fields: dict[str, object] = {
            "purchase_id": ref.purchase_id,
            "source": ref.source,
            "external_id": ref.external_id,
            "tokens": requested,
        }
        if cumulative:
            # Only when set, so that keys stored before the flag existed still replay.
            fields["cumulative"] = True
        digest = request_hash("refund_purchase", **fields)
        for _ in range(REFUND_ATTEMPTS):
            # A replay must answer the original even after the purchase changed since.
            replay = await self.store.replayed_refund(key, digest)
            if replay is not None:
                return replay
            purchase = await self.store.find_purchase(ref)
            remaining = purchase.tokens_purchased - purchase.tokens_refunded
            if cumulative:
                if requested > purchase.tokens_purchased:
                    raise InvalidArgument(
                        "tokens_to_refund",
                        f"exceeds the {purchase.tokens_purchased} tokens purchased",
                    )
                # From this snapshot; if another refund moves the total first, the store
                # answers RefundRaced and the next attempt recomputes from the new total.
                tokens = max(0, requested - purchase.tokens_refunded)
            else:
                tokens = remaining if requested == 0 else requested
            if tokens > remaining:
                raise InvalidArgument(
                    "tokens_to_refund", f"exceeds the {remaining} tokens not yet refunded"
                )
            user_part, fee_part = money.refund_split(
                purchase.tokens_purchased,
                purchase.tokens_credited,
                purchase.tokens_refunded,
                tokens,
            )
            try:
                return await self.store.refund_purchase(
                    key, digest, purchase, tokens, user_part, fee_part
                )
            except RefundRaced:
                continue
        raise RefundRaced("the purchase kept changing; retry the refund")

    async def record_usage(
        self,
        idempotency_key: str,
        user_id: str,
        user_type: UserType | None,
        usage: Usage | None,
        cost_micro_usd: int | None,
    ) -> UsageRecorded:
        key = _id("idempotency_key", idempotency_key)
        user = _id("user_id", user_id)
        if user_type is None:
            raise InvalidArgument("user_type", "must be SUBSCRIPTION, BYOK or UNKNOWN")
        checked = _usage(usage)
        if cost_micro_usd is not None:
            _amount("estimated_cost_micro_usd", cost_micro_usd, 0, MAX_COST_MICRO_USD)
        digest = request_hash(
            "record_usage",
            user=user,
            type=user_type.value,
            provider=checked.provider,
            model=checked.model,
            input=checked.input_tokens,
            output=checked.output_tokens,
            cost=cost_micro_usd,
        )
        return await self.store.record_usage(key, digest, user, user_type, checked, cost_micro_usd)

    async def balance(self, user_id: str) -> Balance:
        return await self.store.balance(_id("user_id", user_id))

    async def quote_reserve(self, user_id: str, estimated_tokens: int) -> tuple[int, Balance]:
        """(what a Reserve of this estimate would hold, the balance now)."""
        user = _id("user_id", user_id)
        estimate = _amount("estimated_tokens", estimated_tokens, 1, MAX_TOKENS_PER_CALL)
        required = money.hold_amount(estimate, self.rates.usage_fee_percent)
        return required, await self.store.balance(user)

    async def user_status(self, user_id: str) -> UserStatus:
        return await self.store.user_status(_id("user_id", user_id))

    async def usage_analytics(
        self, user_id: str, days: int, include_history: bool
    ) -> UsageAnalytics:
        user = _id("user_id", user_id)
        window = _amount("days", days or DEFAULT_ANALYTICS_DAYS, 1, MAX_ANALYTICS_DAYS)
        since = await self.store.now() - timedelta(days=window)
        return await self.store.usage_analytics(user, since, include_history)

    async def purchase_history(
        self, user_id: str, page_size: int, after: tuple[datetime, str] | None
    ) -> PurchasePage:
        user = _id("user_id", user_id)
        size = _amount("page_size", page_size or DEFAULT_PAGE_SIZE, 1, MAX_PAGE_SIZE)
        return await self.store.purchase_history(user, size, after)

    async def sweep_expired(self, batch: int) -> int:
        """Expires due holds; returns how many. Safe to run from any number of replicas."""
        return await self.store.sweep_expired(batch)

    async def upsert_subscription(
        self,
        source: str,
        external_id: str,
        user_id: str,
        variant_id: str,
        status: str,
        renews_at: datetime | None,
        ends_at: datetime | None,
        provider_updated_at: datetime | None,
    ) -> SubscriptionUpsert:
        """Stores the provider's state unless the stored one is as new or newer (by the
        provider's updated_at): stale and duplicate deliveries change nothing."""
        if provider_updated_at is None:
            raise InvalidArgument("subscription.provider_updated_at", "is required")
        subscription = Subscription(
            source=_id("subscription.source", source),
            external_id=_id("subscription.external_id", external_id),
            user_id=_id("subscription.user_id", user_id),
            variant_id=_optional_id("subscription.variant_id", variant_id),
            status=_id("subscription.status", status),
            renews_at=_optional_moment("subscription.renews_at", renews_at),
            ends_at=_optional_moment("subscription.ends_at", ends_at),
            provider_updated_at=_moment("subscription.provider_updated_at", provider_updated_at),
        )
        return await self.store.upsert_subscription(subscription)

    async def subscription(self, source: str, external_id: str) -> Subscription:
        return await self.store.get_subscription(
            _id("source", source), _id("external_id", external_id)
        )

    async def record_dead_letter(
        self,
        source: str,
        event_name: str,
        subject: str,
        reason: str,
        raw_body: bytes,
        dedupe_key: str,
    ) -> DeadLetterRecorded:
        """Parks an event that could not be applied; the same dedupe_key is stored once (the
        first letter stays as it was; later copies answer its id with `replayed`)."""
        src = _id("source", source)
        event = _id("event_name", event_name)
        about = _optional_id("subject", subject)
        why = _id("reason", reason, MAX_NOTE_CHARS)
        if len(raw_body) > MAX_RAW_BODY_BYTES:
            raise InvalidArgument("raw_body", f"must be at most {MAX_RAW_BODY_BYTES} bytes")
        key = _id("dedupe_key", dedupe_key)
        return await self.store.record_dead_letter(src, event, about, why, raw_body, key)

    async def dead_letters(
        self, source: str, subject: str, include_resolved: bool, page_size: int
    ) -> list[DeadLetter]:
        """Oldest first; a page stops early rather than carry more than
        MAX_DEAD_LETTER_PAGE_BYTES of raw bodies."""
        src = _id("source", source)
        about = _optional_id("subject", subject)
        size = _amount("page_size", page_size or DEFAULT_PAGE_SIZE, 1, MAX_PAGE_SIZE)
        return await self.store.list_dead_letters(
            src, about, include_resolved, size, MAX_DEAD_LETTER_PAGE_BYTES
        )

    async def resolve_dead_letter(self, dead_letter_id: str, resolution: str) -> DeadLetter:
        """Resolves once; resolving again answers the stored resolution unchanged."""
        letter = _uuid("dead_letter_id", dead_letter_id)
        note = _id("resolution", resolution, MAX_NOTE_CHARS)
        return await self.store.resolve_dead_letter(letter, note)


def _id(field: str, value: str, max_chars: int = MAX_ID_CHARS) -> str:
    if not value or not value.strip():
        raise InvalidArgument(field, "must not be empty")
    if len(value) > max_chars:
        raise InvalidArgument(field, f"must be at most {max_chars} characters")
    if not value.isprintable():
        raise InvalidArgument(field, "must not contain control characters")
    return value


def _optional_id(field: str, value: str) -> str:
    """Empty means absent; anything else follows the rules of an id."""
    return _id(field, value) if value else ""


def _moment(field: str, value: datetime) -> datetime:
    if value.tzinfo is None:
        raise InvalidArgument(field, "must carry a time zone")
    if value <= EPOCH:
        raise InvalidArgument(field, "must be after 1970-01-01T00:00:00Z")
    return value


def _optional_moment(field: str, value: datetime | None) -> datetime | None:
    return None if value is None else _moment(field, value)


def _amount(field: str, value: int, low: int, high: int) -> int:
    if not low <= value <= high:
        raise InvalidArgument(field, f"must be within {low}..{high}, got {value}")
    return value


def _uuid(field: str, value: str) -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except (ValueError, AttributeError, TypeError):
        raise InvalidArgument(field, "must be a UUID") from None


def _usage(usage: Usage | None) -> Usage:
    if usage is None:
        raise InvalidArgument("usage", "is required")
    _id("usage.provider", usage.provider)
    _id("usage.model", usage.model)
    _amount("usage.input_tokens", usage.input_tokens, 0, MAX_TOKENS_PER_CALL)
    _amount("usage.output_tokens", usage.output_tokens, 0, MAX_TOKENS_PER_CALL)
    return usage
