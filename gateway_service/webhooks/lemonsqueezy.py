"""LemonSqueezy webhooks: verified, then applied to the ledger exactly once.

- The signature (hex HMAC-SHA256 of the raw body, header X-Signature) is checked in constant time
  before anything is parsed.
- Tokens bought come from the server-side variant catalog, never from the payload's prices or
  names. A subscription's tokens per payment are stored with it (from the catalog) when its
  state is applied; its invoices are credited through it.
- A refund takes back, in proportion to the money returned (refunded_amount / total), what that
  payment credited, as the ledger recorded it: a later catalog change does not matter.
- What the buyer paid (an order's or an invoice's `total` and `currency`, and `total_usd`) is
  recorded with the credit, for the operator's revenue figures. A payload that does not state it
  clearly credits all the same, without a payment: analytics never cost a customer a credit.
- Exactly once: every credit carries an idempotency key derived from the provider's own ids
  (order, invoice), and the ledger also refuses to credit one payment twice; subscription state
  is ordered by the provider's updated_at (a terminal status wins a tie). Duplicates and
  replays change nothing.
- Any order, any interleaving, without an operator: an invoice before its subscription, or a
  refund before its payment, waits in the ledger (`waiting`) and is applied in the very
  transaction that stores the subscription or credits the payment, so a wake-up cannot be lost.
- An event that cannot be applied as configured (unknown variant, no user id) is stored as a
  dead letter with its raw body and reason, and acknowledged; `python -m gateway_service
  replay-dead-letters` applies them again after the configuration is fixed. A ledger outage
  raises (HTTP 503), so LemonSqueezy retries.
"""

from __future__ import annotations

import contextlib
import enum
import hashlib
import hmac
import json
import logging
import re
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
# The ledger's bound on a payment amount (ledger.proto, Payment); beyond it a figure is garbage.
MAX_PAYMENT_AMOUNT = 10**15
CURRENCY_CODE = re.compile(r"[A-Z]{3}")
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
    # Kept by the ledger until its subscription or payment arrives, then applied with it.
    WAITING = "waiting"
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
        result = await self._attempt(raw_body)
        if isinstance(result, Outcome):
            return result
        await self._park(raw_body, result)
        return Outcome(Status.DEAD_LETTER, result.reason)

    async def _attempt(self, raw_body: bytes) -> Outcome | Unapplicable:
        """The event applied, or why it cannot be: unapplicable as it stands, or refused by the
        ledger as invalid. Raises when the ledger is away (or for anything that is ours to
        fix)."""
        try:
            return await self.apply(raw_body)
        except Unapplicable as exc:
            return exc
        except GatewayError as exc:
            if exc.failure is not Failure.INVALID_ARGUMENT:
                raise  # unavailable: the provider retries; anything else is ours to fix
            return Unapplicable(f"the ledger refused it: {exc.message}")

    async def apply(self, raw_body: bytes) -> Outcome:
        """Applies one event (events that wait for another are kept by the ledger)."""
        event = parse_event(raw_body)
        if event.test_mode and self.test_mode == "ignore":
            return Outcome(Status.IGNORED, "test-mode event (LEMONSQUEEZY_TEST_MODE=ignore)")
        if event.name == "order_created":
            return await self._order_created(event)
        if event.name == "order_refunded":
            return await self._order_refunded(event)
        if event.name == "subscription_payment_refunded":
            return await self._refund(event, f"invoice:{event.data_id}")
        if event.name == "subscription_payment_success":
            return await self._payment_success(event)
        if event.name in SUBSCRIPTION_EVENTS:
            return await self._subscription_changed(event)
        return Outcome(Status.IGNORED, f"{event.name} is not handled")

    # ---- events ---------------------------------------------------------------------------

    async def _order_created(self, event: Event) -> Outcome:
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
        return await self._credit(
            event,
            f"order:{event.data_id}",
            lpb.CreditPurchaseRequest(
                user_id=self._user(event, f"order:{event.data_id}"),
                tokens_purchased=variant.tokens,
                purchase_type=lpb.PURCHASE_TYPE_ONE_TIME,
                payment=payment_of(attrs),
            ),
        )

    async def _order_refunded(self, event: Event) -> Outcome:
        item = event.attributes.get("first_order_item") or {}
        variant = self.catalog.get(item.get("variant_id"))
        if variant is not None and variant.subscription:
            return Outcome(
                Status.IGNORED, "subscription order: refunded through subscription_payment_refunded"
            )
        return await self._refund(event, f"order:{event.data_id}")

    async def _payment_success(self, event: Event) -> Outcome:
        """A subscription invoice: credited, through its subscription, with the subscription's
        tokens per payment; before its subscription is known it waits in the ledger."""
        attrs = event.attributes
        if attrs.get("status") not in (None, "paid"):
            return Outcome(Status.IGNORED, f"invoice status {attrs.get('status')!r}, not paid")
        subscription_id = str(attrs.get("subscription_id") or "")
        if not subscription_id:
            raise Unapplicable("invoice without subscription_id")
        if event.user_id is not None:
            self._user(event, f"subscription:{subscription_id}")  # refuses a test-mode id
        return await self._credit(
            event,
            f"invoice:{event.data_id}",
            lpb.CreditPurchaseRequest(
                purchase_type=lpb.PURCHASE_TYPE_SUBSCRIPTION,
                subscription=lpb.PurchaseRef(external_id=subscription_id),
                payment=payment_of(attrs),
            ),
        )

    async def _subscription_changed(self, event: Event) -> Outcome:
        subject = f"subscription:{event.data_id}"
        user = self._user(event, subject)
        attrs = event.attributes
        variant_id = str(attrs.get("variant_id") or "")
        variant = self.catalog.get(variant_id) if variant_id else None
        subscription = lpb.Subscription(
            source=self._source(event),
            external_id=event.data_id,
            user_id=user,
            variant_id=variant_id,
            status=str(attrs.get("status") or event.name.removeprefix("subscription_")),
            tokens_per_period=variant.tokens if variant else 0,
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
        if variant is None and reply.subscription.tokens_per_period == 0:
            # The state is stored; its payments cannot be credited until the catalog knows the
            # variant. The operator's replay of this letter fills the tokens in.
            raise Unapplicable(f"unknown variant {variant_id!r}: its payments wait", subject)
        credited = (
            f"; {reply.parked_credits_applied} waiting payment(s) credited"
            if reply.parked_credits_applied
            else ""
        )
        if not reply.applied:
            return Outcome(Status.DUPLICATE, f"an as-new or newer state is stored{credited}")
        return Outcome(
            Status.APPLIED, f"subscription {event.data_id} is {subscription.status}{credited}"
        )

    async def _refund(self, event: Event, subject: str) -> Outcome:
        """Takes back what the payment credited, in proportion to the money returned (LemonSqueezy
        reports the refunded total, so the refund is cumulative); a refund that comes before its
        payment waits for it in the ledger."""
        total = _amount(event.attributes.get("total"))
        refunded = _amount(event.attributes.get("refunded_amount"))
        if total is not None and refunded is not None and 0 < refunded < total:
            share = lpb.RefundShare(refunded_amount=refunded, total_amount=total)
            label: object = refunded
        else:
            share = lpb.RefundShare(refunded_amount=1, total_amount=1)  # all of it
            label = total if total is not None else "all"
        request = lpb.RefundPurchaseRequest(
            idempotency_key=f"{self._source(event)}:refund:{event.data_id}:{label}",
            external=lpb.PurchaseRef(source=self._source(event), external_id=subject),
            share=share,
            cumulative=True,
            wait_for_purchase=True,
        )
        reply = await self.ledger.call(self.ledger.stub.RefundPurchase, request)
        if reply.parked:
            return Outcome(Status.WAITING, f"refund of {subject} waits for its payment")
        if reply.replayed or reply.tokens_refunded == 0:
            return Outcome(Status.DUPLICATE, "refund already applied")
        return Outcome(
            Status.APPLIED,
            f"refunded {reply.tokens_refunded} tokens: {reply.tokens_debited} from the balance, "
            f"{reply.shortfall_tokens} owed (already spent or on hold)",
        )

    # ---- ledger ---------------------------------------------------------------------------

    async def _credit(
        self, event: Event, external_id: str, request: lpb.CreditPurchaseRequest
    ) -> Outcome:
        source = self._source(event)
        request.idempotency_key = f"{source}:{external_id}"
        request.external_id = external_id
        request.source = source
        try:
            reply = await self.ledger.call(self.ledger.stub.CreditPurchase, request)
        except GatewayError as exc:
            if exc.reason == "SUBSCRIPTION_TOKENS_UNKNOWN":
                subject = f"subscription:{request.subscription.external_id}"
                raise Unapplicable(
                    "the subscription's variant is not in the catalog", subject
                ) from None
            if exc.failure is Failure.CONFLICT:
                raise Unapplicable(f"payment {external_id} was credited with other terms") from None
            raise
        if reply.parked:
            return Outcome(Status.WAITING, f"{external_id} waits for its subscription")
        if reply.replayed:
            return Outcome(Status.DUPLICATE, f"{external_id} already credited")
        return Outcome(Status.APPLIED, f"credited {reply.tokens_credited} tokens")

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

    async def replay(self, letter: lpb.DeadLetter) -> Outcome:
        """Applies a dead letter again; resolves it unless it is still unapplicable."""
        outcome = await self._attempt(letter.raw_body)
        if isinstance(outcome, Unapplicable):
            # Still dead, including one the ledger refuses again: the replay goes on.
            return Outcome(Status.DEAD_LETTER, outcome.reason)
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
        if event.test_mode:
            return f"{TEST_USER_PREFIX}{event.user_id}"
        if event.user_id.startswith(TEST_USER_PREFIX):
            # The prefix names the test ledger: a live payment must never credit it.
            raise Unapplicable("a live event's user id is in the test-mode namespace", subject)
        return event.user_id


def _amount(value: object) -> int | None:
    """A money amount from a payload: a non-negative integer (minor units), else None."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return None


def payment_of(attributes: Mapping[str, Any]) -> lpb.Payment | None:
    """What an order or a subscription invoice says was paid: `total` in `currency`'s minor unit
    and `total_usd` in US cents, kept only where it is a valid figure (the ledger would refuse
    the credit over an invalid one). None when it says nothing usable."""
    raw_currency = attributes.get("currency")
    currency = raw_currency.strip().upper() if isinstance(raw_currency, str) else ""
    total = _amount(attributes.get("total"))
    usd = _amount(attributes.get("total_usd"))
    if total is not None and total > MAX_PAYMENT_AMOUNT:
        total = None
    if usd is not None and usd > MAX_PAYMENT_AMOUNT:
        usd = None
    if not CURRENCY_CODE.fullmatch(currency) or total is None:
        currency, total = "", 0  # an amount means nothing without its currency
    if currency == "USD":
        usd = total  # a US-dollar total is its own USD value, whatever else the payload says
    if not currency and usd is None:
        return None
    payment = lpb.Payment(currency=currency, amount_minor=total)
    if usd is not None:
        payment.amount_usd_cents = usd
    return payment
