"""The ledger's use cases: validate, apply the money rules, hand exact amounts to the store.

Knows nothing of gRPC or SQL: the store is any object with the `LedgerStore` methods.

Hot-path operations (Reserve, Settle, Release, ExtendHold) are one store call each. Payment
operations (credits, refunds, subscription states) run as a unit of work (`PaymentsTx`, one
database transaction) that this module drives: claim the idempotency key first, lock the subject
(a purchase or a subscription), then apply, or park the event until its subject exists. The
transaction that creates a subject applies what waited for it, so parking and waking cannot miss
each other; a refusal rolls everything back, so it burns no key.
"""

from __future__ import annotations

import hashlib
import json
import logging
import uuid
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Protocol, TypeVar

from ledger_service.domain import analytics, money
from ledger_service.domain.errors import (
    InvalidArgument,
    LedgerError,
    PurchaseNotFound,
    SubscriptionTokensUnknown,
    TransactionConflict,
)
from ledger_service.domain.types import (
    PARKED_CREDIT,
    PARKED_REFUND,
    Balance,
    CreditCommand,
    DeadLetter,
    DeadLetterPage,
    DeadLetterRecorded,
    Granularity,
    HoldExtension,
    MonthlyUsage,
    ParkedOperation,
    Payment,
    PlatformAnalytics,
    PlatformRows,
    PurchaseCredited,
    PurchasePage,
    PurchaseRef,
    PurchaseSnapshot,
    PurchaseType,
    Quote,
    Refund,
    RefundCommand,
    RefundPlan,
    RefundShare,
    Release,
    Reservation,
    RetentionPolicy,
    Settlement,
    Subscription,
    SubscriptionUpsert,
    Usage,
    UsageAnalytics,
    UsageRecorded,
    UserAccount,
    UserStatus,
    UserType,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

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
# A refund's money amounts (minor units of the payment's currency).
MAX_MONEY_AMOUNT = 10**15
# One payment, in minor units (cents): $1B. Analytics report revenue in micro-dollars (x10^4 a
# cent) as int64; at 10^15 cents one payment alone would overflow it and break every report.
MAX_PAYMENT_MINOR = 10**11
# Rows deleted per statement by the retention sweep.
RETENTION_BATCH = 1000
# A payment transaction the database rolled back to break a conflict is simply run again.
PAYMENT_ATTEMPTS = 5
# Open holds a user lookup lists (oldest first): calls in flight, far fewer in practice.
MAX_OPEN_HOLDS_LISTED = 1000
# Days (and months) of usage the analytics rollup takes per transaction.
ROLLUP_BATCH = 7


class PaymentsTx(Protocol):
    """One database transaction for a payment operation. Leaving it with an exception rolls
    everything back, the key claim included."""

    async def claim_credit(self, key: str, request_hash: bytes) -> PurchaseCredited | None:
        """The stored answer of this key (IdempotencyKeyReused for another request), or None:
        the key is now claimed by this transaction (a concurrent copy waits for it)."""
        ...

    async def claim_refund(self, key: str, request_hash: bytes) -> Refund | None: ...

    async def lock_subject(self, subject: str) -> None:
        """Serialises this transaction with every other one that locks `subject`."""
        ...

    async def subscription(self, source: str, external_id: str) -> Subscription | None: ...

    async def purchase_for_update(self, ref: PurchaseRef) -> PurchaseSnapshot | None: ...

    async def apply_credit(
        self,
        command: CreditCommand,
        user_id: str,
        tokens: int,
        credited: int,
        fee: int,
        user_share_percent: int,
    ) -> tuple[PurchaseCredited, bool]:
        """(the answer, whether this call created the purchase)."""
        ...

    async def apply_refund(self, key: str, purchase_id: str, plan: RefundPlan) -> Refund: ...

    async def park(
        self, subject: str, operation: str, key: str, request: dict[str, object]
    ) -> None:
        """Keeps the operation until `subject` exists; its key answers "parked" meanwhile."""
        ...

    async def waiting(self, subject: str) -> list[ParkedOperation]:
        """Operations parked on `subject` and not applied yet, oldest first, locked."""
        ...

    async def settle_parked(self, parked: ParkedOperation, outcome: dict[str, object]) -> None:
        """Marks a parked operation done; a refusal becomes its key's answer."""
        ...

    def savepoint(self) -> AbstractAsyncContextManager[None]: ...

    async def upsert_subscription(self, subscription: Subscription) -> SubscriptionUpsert: ...


class LedgerStore(Protocol):
    def payments(self) -> AbstractAsyncContextManager[PaymentsTx]: ...

    async def reserve(
        self,
        key: str,
        request_hash: bytes,
        user_id: str,
        amount: int,
        ttl_seconds: int,
        usage_fee_percent: int,
        transient_key: bool,
        quota: MonthlyQuota | None,
        attempt_id: str = "",
    ) -> Reservation: ...

    async def monthly_usage(self, user_id: str, timezone: str) -> MonthlyUsage: ...

    # user_id None: the caller did not say whose hold it names; the store looks it up.
    async def extend_hold(
        self, reservation_id: uuid.UUID, ttl_seconds: int, user_id: str | None = None
    ) -> HoldExtension: ...

    async def settle(
        self,
        reservation_id: uuid.UUID,
        request_hash: bytes,
        usage: Usage,
        tokens_used: int,
        fee: int,
        usage_fee_percent: int,
        cost_micro_usd: int | None,
        answer: bytes | None,
        user_id: str | None = None,
    ) -> Settlement: ...

    async def release(self, reservation_id: uuid.UUID, user_id: str | None = None) -> Release: ...

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

    async def user_status(self, user_id: str, quota_timezone: str) -> UserStatus: ...

    async def usage_analytics(
        self, user_id: str, since: datetime, include_history: bool
    ) -> UsageAnalytics: ...

    async def purchase_history(
        self, user_id: str, limit: int, after: tuple[datetime, str] | None
    ) -> PurchasePage: ...

    async def platform_rows(
        self, granularity: Granularity, start: datetime, end: datetime, top_users: int
    ) -> PlatformRows:
        """Every user's purchases, usage and journal exceptions of [start, end) grouped by
        period of `granularity` (start is a period's start), and the platform's state now, in
        one snapshot."""
        ...

    async def user_account(self, user_id: str, max_holds: int) -> UserAccount: ...

    async def rollup_usage(self, batch: int) -> int:
        """Rolls up to `batch` complete days of usage into the daily rollup, and up to `batch`
        months whose days are all rolled into the monthly one; returns how many."""
        ...

    async def sweep_expired(self, limit: int) -> int: ...

    async def apply_retention(self, policy: RetentionPolicy, limit: int) -> int: ...

    async def now(self) -> datetime: ...

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
        self,
        source: str,
        subject: str,
        include_resolved: bool,
        limit: int,
        max_body_bytes: int,
        after: tuple[datetime, str] | None,
    ) -> DeadLetterPage: ...

    async def resolve_dead_letter(self, dead_letter_id: uuid.UUID, resolution: str) -> DeadLetter:
        """Raises DeadLetterNotFound."""
        ...


@dataclass(frozen=True, slots=True)
class HoldPolicy:
    default_ttl_seconds: int = 300
    max_ttl_seconds: int = 3600
    # Largest call answer kept with a hold for replays; a larger one is not kept.
    answer_max_bytes: int = 256 * 1024
    # Monthly quotas count calendar months in this time zone (an IANA name).
    quota_timezone: str = "UTC"


@dataclass(frozen=True, slots=True)
class MonthlyQuota:
    """A Reserve's monthly quota: `tokens` per calendar month of `timezone`, counted at `at`
    (None: now, by the database clock)."""

    tokens: int
    timezone: str
    at: datetime | None = None


def request_hash(operation: str, **fields: object) -> bytes:
    """A fingerprint of a request's content, to tell a replay from a reused key."""
    canonical = json.dumps([operation, fields], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).digest()


def purchase_subject(source: str, external_id: str) -> str:
    return f"purchase:{source}:{external_id}"


def subscription_subject(source: str, external_id: str) -> str:
    return f"subscription:{source}:{external_id}"


def plan_refund(command: RefundCommand, purchase: PurchaseSnapshot) -> RefundPlan:
    """What a refund takes back, from the purchase as it stands (locked by the caller): the
    tokens it covers and their split between the user's credit and the fee, in proportion to what
    that purchase credited. A cumulative target already reached refunds nothing."""
    remaining = purchase.tokens_purchased - purchase.tokens_refunded
    if command.share is not None:
        amount = money.refund_share_tokens(
            purchase.tokens_purchased, command.share.refunded_amount, command.share.total_amount
        )
    else:
        amount = command.tokens
        if command.cumulative and amount > purchase.tokens_purchased:
            raise InvalidArgument(
                "tokens_to_refund", f"exceeds the {purchase.tokens_purchased} tokens purchased"
            )
    if command.cumulative:
        tokens = max(0, amount - purchase.tokens_refunded)
    elif command.share is None and amount == 0:
        tokens = remaining
    else:
        tokens = amount
    if tokens > remaining:
        raise InvalidArgument(
            "tokens_to_refund", f"exceeds the {remaining} tokens not yet refunded"
        )
    user_part, fee_part = money.refund_split(
        purchase.tokens_purchased, purchase.tokens_credited, purchase.tokens_refunded, tokens
    )
    return RefundPlan(tokens, user_part, fee_part)


class Ledger:
    def __init__(
        self, store: LedgerStore, rates: money.Rates, holds: HoldPolicy | None = None
    ) -> None:
        self.store = store
        self.rates = rates
        self.holds = holds or HoldPolicy()

    # ---- payments: credits, refunds, subscriptions (one transaction each) -------------------

    async def credit_purchase(
        self,
        idempotency_key: str,
        user_id: str,
        tokens_purchased: int,
        purchase_type: PurchaseType | None,
        external_id: str,
        source: str,
        subscription: str | None = None,
        payment: Payment | None = None,
    ) -> PurchaseCredited:
        """Credits a payment. A subscription payment (`subscription` names it, same source) is
        credited to its subscription's user, and `tokens_purchased` 0 takes the subscription's
        tokens per period; before its subscription is known it is parked, and credited in the
        transaction that stores the subscription.

        `payment` (what the buyer paid) is recorded with the purchase for analytics, and is not
        part of the replay check: it describes the payment the request names, it does not make
        another request of it. So a delivery credited before payments were recorded, sent again
        with its amount, still replays; a replay answers the original and keeps the payment
        first recorded."""
        key = _id("idempotency_key", idempotency_key)
        if purchase_type is None:
            raise InvalidArgument("purchase_type", "must be SUBSCRIPTION or ONE_TIME")
        ext = _id("external_id", external_id)
        src = _id("source", source)
        if subscription is None:
            user = _id("user_id", user_id)
            tokens = _amount("tokens_purchased", tokens_purchased, 1, MAX_TOKENS_PER_PURCHASE)
        else:
            subscription = _id("subscription.external_id", subscription)
            user = _optional_id("user_id", user_id)
            tokens = _amount("tokens_purchased", tokens_purchased, 0, MAX_TOKENS_PER_PURCHASE)
        fields: dict[str, object] = {
            "user": user,
            "tokens": tokens,
            "type": purchase_type.value,
            "source": src,
            "external_id": ext,
        }
        if subscription is not None:
            # Only when set, so that keys stored before the field existed still replay.
            fields["subscription"] = subscription
        paid = _payment(payment)
        command = CreditCommand(
            key=key,
            request_hash=request_hash("credit_purchase", **fields),
            user_id=user,
            purchase_type=purchase_type,
            tokens=tokens,
            source=src,
            external_id=ext,
            subscription=subscription,
            payment=paid,
        )

        async def credit(tx: PaymentsTx) -> PurchaseCredited:
            prior = await tx.claim_credit(command.key, command.request_hash)
            if prior is not None:
                return prior
            return await self._credit(tx, command)

        return await self._transact(credit)

    async def _credit(self, tx: PaymentsTx, command: CreditCommand) -> PurchaseCredited:
        """Applies a credit whose key this transaction holds (or parks it until its subscription
        is known), then the refunds that waited for the purchase it creates."""
        user, tokens = command.user_id, command.tokens
        if command.subscription is not None:
            subject = subscription_subject(command.source, command.subscription)
            await tx.lock_subject(subject)
            found = await tx.subscription(command.source, command.subscription)
            if found is None:
                await tx.park(subject, "credit_purchase", command.key, command.to_json())
                return PARKED_CREDIT
            # The subscription is the authority on whose payments these are.
            user = found.user_id
            if tokens == 0:
                if found.tokens_per_period is None:
                    raise SubscriptionTokensUnknown(
                        f"subscription {command.subscription} has no known tokens per period"
                    )
                tokens = found.tokens_per_period
        subject = purchase_subject(command.source, command.external_id)
        await tx.lock_subject(subject)
        share = self.rates.user_share_percent
        credited, fee = money.split_purchase(tokens, share)
        result, created = await tx.apply_credit(command, user, tokens, credited, fee, share)
        if created:
            await self._wake(tx, subject)
        return result

    async def refund_purchase(
        self,
        idempotency_key: str,
        ref: PurchaseRef,
        tokens_to_refund: int,
        cumulative: bool = False,
        share: RefundShare | None = None,
        wait_for_purchase: bool = False,
    ) -> Refund:
        """Refunds `tokens_to_refund` purchased tokens (0: all not yet refunded), or the tokens
        `share` of the payment covers; when `cumulative`, the amount is the refunded total to
        reach. Sized from the ledger's own record of the purchase, never a catalog. With
        `wait_for_purchase`, a refund of a purchase not credited yet waits for it."""
        key = _id("idempotency_key", idempotency_key)
        if ref.purchase_id is not None:
            ref = PurchaseRef(purchase_id=str(_uuid("purchase_id", ref.purchase_id)))
            if wait_for_purchase:
                raise InvalidArgument(
                    "wait_for_purchase", "only a purchase named by (source, external_id) can wait"
                )
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
        if share is not None:
            total = _amount("share.total_amount", share.total_amount, 1, MAX_MONEY_AMOUNT)
            _amount("share.refunded_amount", share.refunded_amount, 0, total)
            if requested:
                raise InvalidArgument("share", "give tokens_to_refund or share, not both")
            fields["share"] = [share.refunded_amount, share.total_amount]
        # Only when set, so that keys stored before these flags existed still replay.
        if cumulative:
            fields["cumulative"] = True
        if wait_for_purchase:
            fields["wait"] = True
        command = RefundCommand(
            key=key,
            request_hash=request_hash("refund_purchase", **fields),
            ref=ref,
            tokens=requested,
            share=share,
            cumulative=cumulative,
            wait_for_purchase=wait_for_purchase,
        )

        async def refund(tx: PaymentsTx) -> Refund:
            # The key first: a concurrent duplicate waits here for the original's answer instead
            # of judging the purchase as the original left it.
            prior = await tx.claim_refund(command.key, command.request_hash)
            if prior is not None:
                return prior
            return await self._refund(tx, command)

        return await self._transact(refund)

    async def _refund(self, tx: PaymentsTx, command: RefundCommand) -> Refund:
        ref = command.ref
        subject = None
        if ref.source is not None and ref.external_id is not None:
            subject = purchase_subject(ref.source, ref.external_id)
            await tx.lock_subject(subject)
        purchase = await tx.purchase_for_update(ref)
        if purchase is None:
            if command.wait_for_purchase and subject is not None:
                await tx.park(subject, "refund_purchase", command.key, command.to_json())
                return PARKED_REFUND
            raise PurchaseNotFound("no such purchase")
        plan = plan_refund(command, purchase)
        return await tx.apply_refund(command.key, purchase.purchase_id, plan)

    async def _wake(self, tx: PaymentsTx, subject: str) -> int:
        """Applies what waited for `subject`, which this transaction just created. A parked
        operation the rules refuse is settled with its error (its key answers it); one that
        still cannot apply (a subscription's tokens unknown) keeps waiting. Returns how many
        were applied."""
        applied = 0
        for parked in await tx.waiting(subject):
            command = _parked_command(parked)
            try:
                async with tx.savepoint():
                    if isinstance(command, CreditCommand):
                        await self._credit(tx, command)
                    else:
                        await self._refund(tx, command)
            except SubscriptionTokensUnknown:
                continue
            except LedgerError as exc:
                log.warning("parked %s on %s refused: %s", parked.operation, subject, exc.reason)
                await tx.settle_parked(parked, _refusal(exc))
                continue
            await tx.settle_parked(parked, {"applied": True})
            applied += 1
        return applied

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
        tokens_per_period: int = 0,
    ) -> SubscriptionUpsert:
        """Stores the provider's state unless the stored one is newer (or as new and not
        outranked: a terminal status wins a tie); stale and duplicate deliveries change nothing.
        Payments that waited for this subscription are credited in the same transaction."""
        if provider_updated_at is None:
            raise InvalidArgument("subscription.provider_updated_at", "is required")
        tokens = _amount(
            "subscription.tokens_per_period", tokens_per_period, 0, MAX_TOKENS_PER_PURCHASE
        )
        subscription = Subscription(
            source=_id("subscription.source", source),
            external_id=_id("subscription.external_id", external_id),
            user_id=_id("subscription.user_id", user_id),
            variant_id=_optional_id("subscription.variant_id", variant_id),
            status=_id("subscription.status", status),
            renews_at=_optional_moment("subscription.renews_at", renews_at),
            ends_at=_optional_moment("subscription.ends_at", ends_at),
            provider_updated_at=_moment("subscription.provider_updated_at", provider_updated_at),
            tokens_per_period=tokens or None,
        )
        subject = subscription_subject(subscription.source, subscription.external_id)

        async def upsert(tx: PaymentsTx) -> SubscriptionUpsert:
            await tx.lock_subject(subject)
            stored = await tx.upsert_subscription(subscription)
            credited = await self._wake(tx, subject)
            return replace(stored, parked_credits_applied=credited)

        return await self._transact(upsert)

    async def _transact(self, work: Callable[[PaymentsTx], Awaitable[T]]) -> T:
        """Runs `work` in one payment transaction; one the database rolled back to break a
        conflict with a concurrent one (nothing applied) is run again."""
        for attempt in range(1, PAYMENT_ATTEMPTS + 1):
            try:
                async with self.store.payments() as tx:
                    return await work(tx)
            except TransactionConflict:
                if attempt == PAYMENT_ATTEMPTS:
                    raise
                log.info("payment transaction rolled back by a conflict; attempt %d", attempt + 1)
        raise AssertionError("unreachable")

    # ---- holds: the hot path (one store call each) ------------------------------------------

    async def reserve(
        self,
        idempotency_key: str,
        user_id: str,
        estimated_tokens: int,
        ttl_seconds: int,
        fingerprint: str = "",
        transient_key: bool = False,
        monthly_quota: int = 0,
        quota_at: datetime | None = None,
        attempt_id: str = "",
    ) -> Reservation:
        """Holds the estimate and its fee; with a `monthly_quota`, also within the month's
        quota. The quota is policy, not the request: it is not part of the replay check. Nor is
        `attempt_id`: it is kept with the answer, so a replay names the attempt that made the
        hold (a caller that lost an answer tells its own hold from a later attempt's)."""
        key = _id("idempotency_key", idempotency_key)
        user = _id("user_id", user_id)
        estimate = _amount("estimated_tokens", estimated_tokens, 1, MAX_TOKENS_PER_CALL)
        ttl = self._ttl(ttl_seconds)
        fee_percent = self.rates.usage_fee_percent
        amount = money.hold_amount(estimate, fee_percent)
        if len(fingerprint) > MAX_ID_CHARS:
            raise InvalidArgument("request_fingerprint", f"at most {MAX_ID_CHARS} characters")
        quota = self._quota(monthly_quota, quota_at)
        attempt = _optional_id("attempt_id", attempt_id)
        digest = request_hash(
            "reserve", user=user, estimated=estimate, ttl=ttl_seconds, fingerprint=fingerprint
        )
        return await self.store.reserve(
            key, digest, user, amount, ttl, fee_percent, transient_key, quota, attempt
        )

    def _quota(self, monthly_quota: int, at: datetime | None) -> MonthlyQuota | None:
        tokens = _amount("monthly_quota", monthly_quota, 0, MAX_TOKENS_PER_PURCHASE)
        if not tokens:
            return None
        moment = _optional_moment("quota_at", at)
        return MonthlyQuota(tokens, self.holds.quota_timezone, moment)

    async def extend_hold(
        self, reservation_id: str, ttl_seconds: int, user_id: str = ""
    ) -> HoldExtension:
        """The hold lives at least `ttl_seconds` more (by the database clock) while it is held.
        A hold of another user than `user_id` (when given) is not found."""
        hold = _uuid("reservation_id", reservation_id)
        return await self.store.extend_hold(hold, self._ttl(ttl_seconds), user_id or None)

    def _ttl(self, ttl_seconds: int) -> int:
        ttl = ttl_seconds or self.holds.default_ttl_seconds
        return _amount("ttl_seconds", ttl, 1, self.holds.max_ttl_seconds)

    async def settle(
        self,
        reservation_id: str,
        usage: Usage | None,
        cost_micro_usd: int | None,
        answer: bytes = b"",
        user_id: str = "",
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
            **_prompt_fields(checked),
        )
        # An answer too large to keep is not kept: the call is charged all the same, and a retry
        # of it learns that it ran, without its text.
        kept = answer if answer and len(answer) <= self.holds.answer_max_bytes else None
        settlement = await self.store.settle(
            hold, digest, checked, used, fee, fee_percent, cost_micro_usd, kept, user_id or None
        )
        if settlement.overrun_tokens and not settlement.replayed:
            # Holds are sized from an upper bound on what a call can use: past it, the provider
            # reported more than the call could have used. Charged as far as the balance allowed.
            log.warning(
                "settle beyond its hold: reservation %s, %d tokens over, %d unbilled",
                hold,
                settlement.overrun_tokens,
                settlement.unbilled_tokens,
            )
        return settlement

    async def release(self, reservation_id: str, user_id: str = "") -> Release:
        """Voids the hold; a hold of another user than `user_id` (when given) is not found."""
        return await self.store.release(_uuid("reservation_id", reservation_id), user_id or None)

    async def record_usage(
        self,
        idempotency_key: str,
        user_id: str,
        user_type: UserType | None,
        usage: Usage | None,
        cost_micro_usd: int | None,
    ) -> UsageRecorded:
        key = _id("idempotency_key", idempotency_key)
        if user_type is None:
            raise InvalidArgument("user_type", "must be SUBSCRIPTION, BYOK, UNKNOWN or PUBLIC_BYOK")
        # A call with no account has no user: exactly the public BYOK ones.
        if user_type is UserType.PUBLIC_BYOK:
            if user_id:
                raise InvalidArgument("user_id", "must be empty for PUBLIC_BYOK (no account)")
            user = ""
        elif not user_id:
            raise InvalidArgument("user_id", "must not be empty (only PUBLIC_BYOK has no user)")
        else:
            user = _id("user_id", user_id)
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
            **_prompt_fields(checked),
        )
        return await self.store.record_usage(key, digest, user, user_type, checked, cost_micro_usd)

    # ---- reads ------------------------------------------------------------------------------

    async def balance(self, user_id: str) -> Balance:
        return await self.store.balance(_id("user_id", user_id))

    async def quote_reserve(
        self, user_id: str, estimated_tokens: int, monthly_quota: int = 0
    ) -> Quote:
        """What a Reserve of this estimate would hold, and whether the balance and the month's
        quota would take it now."""
        user = _id("user_id", user_id)
        estimate = _amount("estimated_tokens", estimated_tokens, 1, MAX_TOKENS_PER_CALL)
        quota = self._quota(monthly_quota, None)
        required = money.hold_amount(estimate, self.rates.usage_fee_percent)
        balance = await self.store.balance(user)
        month = await self.store.monthly_usage(user, self.holds.quota_timezone)
        within = quota is None or month.used + required <= quota.tokens
        return Quote(required, balance, month, within)

    async def user_status(self, user_id: str) -> UserStatus:
        return await self.store.user_status(_id("user_id", user_id), self.holds.quota_timezone)

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

    # ---- operator analytics -------------------------------------------------------------------

    async def platform_analytics(
        self,
        start: datetime | None,
        end: datetime | None,
        granularity: Granularity | None,
        top_users: int,
    ) -> PlatformAnalytics:
        """The platform's figures for every period of [start, end) (see domain.analytics)."""
        if start is None:
            raise InvalidArgument("start", "is required")
        if end is None:
            raise InvalidArgument("end", "is required")
        if start.tzinfo is None or end.tzinfo is None:
            raise InvalidArgument("start" if start.tzinfo is None else "end", "needs a time zone")
        if end <= start:
            raise InvalidArgument("end", "must be after start")
        if granularity is None:
            raise InvalidArgument("granularity", "must be HOUR, DAY or MONTH")
        top = _amount(
            "top_users", top_users or analytics.DEFAULT_TOP_USERS, 1, analytics.MAX_TOP_USERS
        )
        starts = analytics.period_starts(start, end, granularity)
        if starts is None:
            raise InvalidArgument(
                "end",
                f"the range holds more than {analytics.MAX_PERIODS} periods of a {granularity}",
            )
        rows = await self.store.platform_rows(granularity, starts[0], end, top)
        return analytics.assemble(starts, rows)

    async def user_account(self, user_id: str) -> UserAccount:
        """A user's balance and open holds (oldest first, at most MAX_OPEN_HOLDS_LISTED)."""
        return await self.store.user_account(_id("user_id", user_id), MAX_OPEN_HOLDS_LISTED)

    async def rollup_usage(self) -> int:
        """Rolls the next complete days and months of usage up for analytics (safe from any
        replica); returns how many, 0 when there is nothing to do now."""
        return await self.store.rollup_usage(ROLLUP_BATCH)

    # ---- background ---------------------------------------------------------------------------

    async def sweep_expired(self, batch: int) -> int:
        """Expires due holds; returns how many. Safe to run from any number of replicas."""
        return await self.store.sweep_expired(batch)

    async def apply_retention(self, policy: RetentionPolicy) -> int:
        """Deletes one batch of what outlived its retention; returns how many rows."""
        return await self.store.apply_retention(policy, RETENTION_BATCH)

    # ---- subscriptions and dead letters ----------------------------------------------------

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
        self,
        source: str,
        subject: str,
        include_resolved: bool,
        page_size: int,
        after: tuple[datetime, str] | None = None,
    ) -> DeadLetterPage:
        """Oldest first, after the cursor; a page stops early rather than carry more than
        MAX_DEAD_LETTER_PAGE_BYTES of raw bodies."""
        src = _id("source", source)
        about = _optional_id("subject", subject)
        size = _amount("page_size", page_size or DEFAULT_PAGE_SIZE, 1, MAX_PAGE_SIZE)
        return await self.store.list_dead_letters(
            src, about, include_resolved, size, MAX_DEAD_LETTER_PAGE_BYTES, after
        )

    async def resolve_dead_letter(self, dead_letter_id: str, resolution: str) -> DeadLetter:
        """Resolves once; resolving again answers the stored resolution unchanged."""
        letter = _uuid("dead_letter_id", dead_letter_id)
        note = _id("resolution", resolution, MAX_NOTE_CHARS)
        return await self.store.resolve_dead_letter(letter, note)


def _refusal(exc: LedgerError) -> dict[str, object]:
    """A refusal as a parked operation's key keeps answering it."""
    refusal: dict[str, object] = {"error": exc.reason, "detail": exc.message}
    if isinstance(exc, InvalidArgument):
        refusal.update(field=exc.field, problem=exc.message.split(": ", 1)[-1])
    return refusal


def _parked_command(parked: ParkedOperation) -> CreditCommand | RefundCommand:
    if parked.operation == "credit_purchase":
        return CreditCommand.from_json(parked.request)
    return RefundCommand.from_json(parked.request)


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


def _payment(payment: Payment | None) -> Payment | None:
    """A valid payment, or None when it says nothing. A US-dollar payment's USD value is its
    amount."""
    if payment is None:
        return None
    currency = payment.currency
    if currency and not (
        len(currency) == 3 and currency.isascii() and currency.isalpha() and currency.isupper()
    ):
        raise InvalidArgument("payment.currency", "must be an ISO 4217 code such as USD, or empty")
    amount = _amount("payment.amount_minor", payment.amount_minor, 0, MAX_PAYMENT_MINOR)
    if amount and not currency:
        raise InvalidArgument("payment.amount_minor", "needs a currency")
    usd = payment.amount_usd_cents
    if usd is not None:
        _amount("payment.amount_usd_cents", usd, 0, MAX_PAYMENT_MINOR)
    if currency == "USD":
        if usd is not None and usd != amount:
            raise InvalidArgument("payment.amount_usd_cents", "must equal amount_minor for USD")
        usd = amount
    if not currency and usd is None:
        return None
    return Payment(currency, amount, usd)


def _usage(usage: Usage | None) -> Usage:
    if usage is None:
        raise InvalidArgument("usage", "is required")
    _id("usage.provider", usage.provider)
    _id("usage.model", usage.model)
    _amount("usage.input_tokens", usage.input_tokens, 0, MAX_TOKENS_PER_CALL)
    _amount("usage.output_tokens", usage.output_tokens, 0, MAX_TOKENS_PER_CALL)
    if usage.prompt_id is not None or usage.prompt_version is not None:
        # A server-held prompt is named whole: its id and its version, each an id.
        _id("usage.prompt.id", usage.prompt_id or "")
        _id("usage.prompt.version", usage.prompt_version or "")
    return usage


def _prompt_fields(usage: Usage) -> dict[str, object]:
    """The prompt's part of a request hash: nothing when the call used none, so the hashes of
    calls without one stay what they were before prompts existed (their replays still match)."""
    if usage.prompt_id is None:
        return {}
    return {"prompt": [usage.prompt_id, usage.prompt_version]}
