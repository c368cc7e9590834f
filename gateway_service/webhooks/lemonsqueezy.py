"""LemonSqueezy webhooks: verified, then applied to the ledger exactly once.

- The signature (hex HMAC-SHA256 of the raw body, header X-Signature) is checked in constant time
  before anything is parsed.
- Tokens come from the server-side variant catalog, never from the payload's prices or names.
- Exactly once: every credit carries an idempotency key derived from the provider's own ids
  (order, invoice), and the ledger also refuses to credit one payment twice; subscription state
  is ordered by the provider's updated_at. Duplicates and replays change nothing.
- Out of order: an invoice before its subscription, or a refund before its order, is parked as a
  dead letter under that subject and applied as soon as the missing event arrives.
- An event that cannot be applied (unknown variant, no user id) is stored as a dead letter with
  its raw body and reason, and acknowledged; `python -m gateway_service replay-dead-letters`
  applies them again after the configuration is fixed. A ledger outage raises (HTTP 503), so
  LemonSqueezy retries.
"""

from __future__ import annotations

import contextlib
import enum
import hashlib
import hmac
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from gateway_service.errors import Failure, GatewayError
from gateway_service.ledger_client import LedgerClient
from shared.gen.rpcai.ledger.v1 import ledger_pb2 as lpb

log = logging.getLogger(__name__)

SOURCE = "lemonsqueezy"
TEST_SOURCE = "lemonsqueezy-test"
TEST_USER_PREFIX = "test-mode:"
SUBSCRIPTION_EVENTS = frozenset(
    {
        "subscription_created",
        "subscription_updated",
        "subscription_cancelled",
        "subscription_resumed",
        "subscription_expired",
        "subscription_paused",
        "subscription_unpaused",
    }
)


def signature_valid(raw_body: bytes, signature: str | None, secret: str) -> bool:
    """Constant-time check of LemonSqueezy's X-Signature (hex HMAC-SHA256 of the raw body)."""
    if not signature or not secret:
        return False
    expected = hmac.new(secret.encode(), raw_body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected.encode(), signature.strip().lower().encode())


@dataclass(frozen=True, slots=True)
class Variant:
    tokens: int
    subscription: bool


class Catalog:
    """Variant id -> tokens, from LEMONSQUEEZY_VARIANT_TOKENS."""

    def __init__(self, variants: Mapping[str, Variant]) -> None:
        self.variants = dict(variants)

    @classmethod
    def parse(cls, text: str) -> Catalog:
        raw = json.loads(text or "{}")
        if not isinstance(raw, dict):
            raise ValueError("LEMONSQUEEZY_VARIANT_TOKENS must be a JSON object")
        variants: dict[str, Variant] = {}
        for key, value in raw.items():
            if isinstance(value, int) and not isinstance(value, bool):
                variants[str(key)] = Variant(value, False)
            elif isinstance(value, dict) and isinstance(value.get("tokens"), int):
                variants[str(key)] = Variant(value["tokens"], bool(value.get("subscription")))
            else:
                raise ValueError(f"variant {key}: expected tokens or {{tokens, subscription}}")
            if variants[str(key)].tokens <= 0:
                raise ValueError(f"variant {key}: tokens must be positive")
        return cls(variants)

    def get(self, variant_id: object) -> Variant | None:
        return self.variants.get(str(variant_id)) if variant_id is not None else None


class Status(enum.StrEnum):
    APPLIED = "applied"
    DUPLICATE = "duplicate"
    IGNORED = "ignored"
    DEAD_LETTER = "dead_letter"


@dataclass(frozen=True, slots=True)
class Outcome:
    status: Status
    detail: str


class Unapplicable(Exception):
    """The event cannot be applied as things stand; it becomes a dead letter under `subject`."""

    def __init__(self, reason: str, subject: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.subject = subject


@dataclass(frozen=True, slots=True)
class Event:
    name: str
    test_mode: bool
    user_id: str | None
    data_id: str
    attributes: Mapping[str, Any]


def parse_event(raw_body: bytes) -> Event:
    try:
        body = json.loads(raw_body)
        meta = body["meta"]
        data = body["data"]
        name = str(meta["event_name"])
        attributes = data.get("attributes") or {}
        data_id = str(data["id"])
    except (ValueError, KeyError, TypeError, AttributeError):
        raise Unapplicable("not a LemonSqueezy event: meta.event_name or data.id missing") from None
    custom = meta.get("custom_data") or {}
    user = custom.get("user_id") if isinstance(custom, dict) else None
    user_id = str(user).strip() if user is not None and str(user).strip() else None
    return Event(name, bool(meta.get("test_mode")), user_id, data_id, attributes)


def _timestamp(value: object) -> Timestamp | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    ts = Timestamp()
    ts.FromDatetime(moment)
    return ts


class LemonSqueezyProcessor:
    def __init__(self, ledger: LedgerClient, catalog: Catalog, test_mode: str) -> None:
        self.ledger = ledger
        self.catalog = catalog
        self.test_mode = test_mode

    async def handle(self, raw_body: bytes) -> Outcome:
        """Applies one verified delivery. Raises GatewayError(UNAVAILABLE) when the ledger is
        away (the provider should retry); anything unapplicable becomes a dead letter."""
        try:
            return await self.apply(raw_body)
        except Unapplicable as exc:
            problem = exc
        except GatewayError as exc:
            if exc.failure is not Failure.INVALID_ARGUMENT:
                raise  # unavailable: the provider retries; anything else is ours to fix
            problem = Unapplicable(f"the ledger refused it: {exc.message}")
        await self._park(raw_body, problem)
        return Outcome(Status.DEAD_LETTER, problem.reason)

    async def apply(self, raw_body: bytes, cascade: bool = True) -> Outcome:
        """Applies one event. With `cascade`, dead letters that waited for it are applied too
        (not when replaying a dead letter, so a replay never recurses into itself)."""
        event = parse_event(raw_body)
        if event.test_mode and self.test_mode == "ignore":
            return Outcome(Status.IGNORED, "test-mode event (LEMONSQUEEZY_TEST_MODE=ignore)")
        if event.name == "order_created":
            return await self._order_created(event, cascade)
        if event.name == "order_refunded":
            return await self._order_refunded(event)
        if event.name == "subscription_payment_refunded":
            return await self._invoice_refunded(event)
        if event.name == "subscription_payment_success":
            return await self._payment_success(event)
        if event.name in SUBSCRIPTION_EVENTS:
            return await self._subscription_changed(event, cascade)
        return Outcome(Status.IGNORED, f"{event.name} is not handled")

    # ---- events ---------------------------------------------------------------------------

    async def _order_created(self, event: Event, cascade: bool) -> Outcome:
        attrs = event.attributes
        if attrs.get("status") not in (None, "paid"):
            return Outcome(Status.IGNORED, f"order status {attrs.get('status')!r}, not paid")
        item = attrs.get("first_order_item") or {}
        variant = self.catalog.get(item.get("variant_id"))
        if variant is None:
            raise Unapplicable(
                f"unknown variant {item.get('variant_id')!r}", f"order:{event.data_id}"
            )
        if variant.subscription:
            # The subscription's invoices (subscription_payment_success) carry its tokens.
            return Outcome(Status.IGNORED, "subscription order: credited by its invoices")
        outcome = await self._credit(
            event, f"order:{event.data_id}", variant.tokens, lpb.PURCHASE_TYPE_ONE_TIME
        )
        if cascade:
            await self._release_parked(f"order:{event.data_id}")
        return outcome

    async def _payment_success(self, event: Event) -> Outcome:
        attrs = event.attributes
        if attrs.get("status") not in (None, "paid"):
            return Outcome(Status.IGNORED, f"invoice status {attrs.get('status')!r}, not paid")
        subscription, variant = await self._subscription_of(event)
        if event.user_id is None and subscription.user_id:
            event = Event(event.name, event.test_mode, subscription.user_id, event.data_id, attrs)
        return await self._credit(
            event, f"invoice:{event.data_id}", variant.tokens, lpb.PURCHASE_TYPE_SUBSCRIPTION
        )

    async def _subscription_of(self, event: Event) -> tuple[lpb.Subscription, Variant]:
        """The subscription an invoice belongs to, and its catalog variant; an invoice that
        arrives before its subscription waits as a dead letter under that subscription."""
        subscription_id = str(event.attributes.get("subscription_id") or "")
        if not subscription_id:
            raise Unapplicable("invoice without subscription_id")
        subject = f"subscription:{subscription_id}"
        try:
            found = await self.ledger.call(
                self.ledger.stub.GetSubscription,
                lpb.GetSubscriptionRequest(source=self._source(event), external_id=subscription_id),
            )
        except GatewayError as exc:
            if exc.failure is Failure.NOT_FOUND:
                raise Unapplicable(
                    "unknown subscription: its subscription_created has not arrived yet", subject
                ) from None
            raise
        variant = self.catalog.get(found.subscription.variant_id)
        if variant is None:
            raise Unapplicable(f"unknown variant {found.subscription.variant_id!r}", subject)
        return found.subscription, variant

    async def _subscription_changed(self, event: Event, cascade: bool) -> Outcome:
        user = self._user(event, f"subscription:{event.data_id}")
        attrs = event.attributes
        subscription = lpb.Subscription(
            source=self._source(event),
            external_id=event.data_id,
            user_id=user,
            variant_id=str(attrs.get("variant_id") or ""),
            status=str(attrs.get("status") or event.name.removeprefix("subscription_")),
        )
        for field in ("renews_at", "ends_at"):
            if (ts := _timestamp(attrs.get(field))) is not None:
                getattr(subscription, field).CopyFrom(ts)
        if (updated := _timestamp(attrs.get("updated_at"))) is not None:
            subscription.provider_updated_at.CopyFrom(updated)
        reply = await self.ledger.call(
            self.ledger.stub.UpsertSubscription,
            lpb.UpsertSubscriptionRequest(subscription=subscription),
        )
        if cascade:
            await self._release_parked(f"subscription:{event.data_id}")
        if not reply.applied:
            return Outcome(Status.DUPLICATE, "an as-new or newer state is already stored")
        return Outcome(Status.APPLIED, f"subscription {event.data_id} is {subscription.status}")

    async def _order_refunded(self, event: Event) -> Outcome:
        attrs = event.attributes
        item = attrs.get("first_order_item") or {}
        variant = self.catalog.get(item.get("variant_id"))
        subject = f"order:{event.data_id}"
        if variant is None:
            raise Unapplicable(f"unknown variant {item.get('variant_id')!r}", subject)
        return await self._refund(event, subject, variant.tokens)

    async def _invoice_refunded(self, event: Event) -> Outcome:
        """A refunded subscription invoice takes back, in proportion, what that invoice credited."""
        _, variant = await self._subscription_of(event)
        return await self._refund(event, f"invoice:{event.data_id}", variant.tokens)

    async def _refund(self, event: Event, subject: str, tokens: int) -> Outcome:
        attrs = event.attributes
        total = attrs.get("total")
        refunded = attrs.get("refunded_amount")
        if isinstance(total, int) and isinstance(refunded, int) and 0 < refunded < total:
            target = tokens * refunded // total  # partial: in proportion, rounded down
        else:
            target = tokens
            refunded = total if isinstance(total, int) else "all"
        request = lpb.RefundPurchaseRequest(
            idempotency_key=f"{self._source(event)}:refund:{event.data_id}:{refunded}",
            external=lpb.PurchaseRef(source=self._source(event), external_id=subject),
            tokens_to_refund=target,
            cumulative=True,
        )
        try:
            reply = await self.ledger.call(self.ledger.stub.RefundPurchase, request)
        except GatewayError as exc:
            if exc.failure is Failure.NOT_FOUND:
                raise Unapplicable("refund of a payment not credited (yet)", subject) from None
            raise
        if reply.replayed or reply.tokens_refunded == 0:
            return Outcome(Status.DUPLICATE, "refund already applied")
        return Outcome(
            Status.APPLIED,
            f"refunded {reply.tokens_refunded} tokens: {reply.tokens_debited} from the balance, "
            f"{reply.shortfall_tokens} already spent",
        )

    # ---- ledger ---------------------------------------------------------------------------

    async def _credit(self, event: Event, external_id: str, tokens: int, kind: int) -> Outcome:
        user = self._user(event, external_id)
        source = self._source(event)
        try:
            reply = await self.ledger.call(
                self.ledger.stub.CreditPurchase,
                lpb.CreditPurchaseRequest(
                    idempotency_key=f"{source}:{external_id}",
                    user_id=user,
                    tokens_purchased=tokens,
                    purchase_type=lpb.PurchaseType.ValueType(kind),
                    external_id=external_id,
                    source=source,
                ),
            )
        except GatewayError as exc:
            if exc.failure is Failure.CONFLICT:
                raise Unapplicable(f"payment {external_id} was credited with other terms") from None
            raise
        if reply.replayed:
            return Outcome(Status.DUPLICATE, f"{external_id} already credited")
        return Outcome(Status.APPLIED, f"credited {reply.tokens_credited} tokens to {user}")

    async def _park(self, raw_body: bytes, problem: Unapplicable) -> None:
        event_name = "unknown"
        with contextlib.suppress(Unapplicable):
            event_name = parse_event(raw_body).name
        log.warning("lemonsqueezy %s parked as a dead letter: %s", event_name, problem.reason)
        await self.ledger.call(
            self.ledger.stub.RecordDeadLetter,
            lpb.RecordDeadLetterRequest(
                source=SOURCE,
                event_name=event_name,
                subject=problem.subject,
                reason=problem.reason,
                raw_body=raw_body,
                dedupe_key=hashlib.sha256(raw_body).hexdigest(),
            ),
        )

    async def _release_parked(self, subject: str) -> None:
        """Applies the dead letters that waited for `subject` (an invoice that came before its
        subscription, a refund before its order)."""
        letters = await self.ledger.call(
            self.ledger.stub.ListDeadLetters,
            lpb.ListDeadLettersRequest(source=SOURCE, subject=subject, page_size=100),
        )
        for letter in letters.dead_letters:
            try:
                await self.replay(letter)
            except GatewayError as exc:
                if exc.failure is Failure.UNAVAILABLE:
                    raise
                # That letter stays parked for the operator; this event is applied all the same.
                log.error("parked %s %s not applied: %s", letter.event_name, subject, exc.reason)

    async def replay(self, letter: lpb.DeadLetter) -> Outcome:
        """Applies a dead letter again; resolves it unless it is still unapplicable."""
        try:
            outcome = await self.apply(letter.raw_body, cascade=False)
        except Unapplicable as exc:
            return Outcome(Status.DEAD_LETTER, exc.reason)
        await self.ledger.call(
            self.ledger.stub.ResolveDeadLetter,
            lpb.ResolveDeadLetterRequest(
                dead_letter_id=letter.dead_letter_id,
                resolution=f"{outcome.status}: {outcome.detail}"[:200],
            ),
        )
        return outcome

    def _source(self, event: Event) -> str:
        return TEST_SOURCE if event.test_mode else SOURCE

    def _user(self, event: Event, subject: str) -> str:
        if event.user_id is None:
            raise Unapplicable("meta.custom_data.user_id is missing", subject)
        return f"{TEST_USER_PREFIX}{event.user_id}" if event.test_mode else event.user_id
