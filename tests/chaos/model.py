"""The money rules as a plain model of one user's ledger, written from the design (README "How
the money is kept", tests/ledger_service/test_accounting_properties.py), with exact fractions.

Each method applies one operation to the model and returns the answer the ledger must give:
a response message, or a `Failure` (status code, ErrorInfo reason). Server-assigned ids
(reservation and purchase ids) are passed in from the ledger's answer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from fractions import Fraction

import grpc
from google.protobuf.message import Message

from shared.gen.rpcai.ledger.v1 import ledger_pb2 as pb

SHARE = 80  # PURCHASE_USER_SHARE_PERCENT the ledger runs with (its default)
FEE = 25  # USAGE_FEE_PERCENT (its default)
PLATFORM = (
    "payments_clearing",
    "purchase_fee",
    "usage",
    "usage_fee",
    "refund_receivable",
    "unbilled_usage",
)

Failure = tuple[grpc.StatusCode, str]
Outcome = Message | Failure

INSUFFICIENT = (grpc.StatusCode.FAILED_PRECONDITION, "INSUFFICIENT_BALANCE")
NOT_HELD = (grpc.StatusCode.FAILED_PRECONDITION, "RESERVATION_NOT_HELD")
KEY_REUSED = (grpc.StatusCode.ALREADY_EXISTS, "IDEMPOTENCY_KEY_REUSED")
INVALID = (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT")
HOLD_NOT_FOUND = (grpc.StatusCode.NOT_FOUND, "RESERVATION_NOT_FOUND")
PURCHASE_NOT_FOUND = (grpc.StatusCode.NOT_FOUND, "PURCHASE_NOT_FOUND")


def credited_of(tokens: int) -> int:
    return math.floor(Fraction(tokens * SHARE, 100))


def fee_of(used: int) -> int:
    return math.ceil(Fraction(used * FEE, 100))


def hold_of(estimate: int) -> int:
    return estimate + fee_of(estimate)


def max_usage_within(amount: int) -> int:
    """The largest usage whose charge (usage + fee) fits in `amount`."""
    used = math.floor(Fraction(amount * 100, 100 + FEE))
    while used + 1 + fee_of(used + 1) <= amount:
        used += 1
    while used > 0 and used + fee_of(used) > amount:
        used -= 1
    return used


@dataclass
class HoldM:
    id: str
    amount: int
    status: str = "held"
    usage: tuple[int, int] | None = None
    answer: bytes = b""  # what the settle kept for replays of the Reserve
    settle_answer: pb.SettleResponse | None = None
    release_answer: pb.ReleaseResponse | None = None


@dataclass
class PurchaseM:
    id: str
    external_id: str
    tokens: int
    credited: int
    refunded: int = 0


@dataclass
class RefundAsk:
    """What a RefundPurchase asks, as the ledger reads it."""

    tokens: int = 0  # 0 without a share: everything not yet refunded
    cumulative: bool = False
    share: tuple[int, int] | None = None  # (refunded_amount, total_amount)


def replayed(answer: Message) -> Message:
    copy = type(answer)()
    copy.CopyFrom(answer)
    copy.replayed = True  # type: ignore[attr-defined]
    return copy


@dataclass
class UserModel:
    user: str
    available: int = 0
    reserved: int = 0
    owed: int = 0
    # This user's contribution to each platform account (they are sums over all users).
    platform: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PLATFORM, 0))
    holds: list[HoldM] = field(default_factory=list)
    purchases: list[PurchaseM] = field(default_factory=list)

    def balance(self) -> pb.Balance:
        return pb.Balance(
            available_tokens=self.available, reserved_tokens=self.reserved, owed_tokens=self.owed
        )

    def collect(self) -> int:
        """Owed tokens come back first, from whatever has just become available."""
        take = min(self.owed, self.available)
        self.available -= take
        self.owed -= take
        self.platform["refund_receivable"] += take
        return take

    def buy(self, tokens: int, purchase_id: str, external_id: str) -> pb.CreditPurchaseResponse:
        credited = credited_of(tokens)
        fee = tokens - credited
        self.available += credited
        self.platform["payments_clearing"] -= tokens
        self.platform["purchase_fee"] += fee
        self.purchases.append(PurchaseM(purchase_id, external_id, tokens, credited))
        collected = self.collect()
        return pb.CreditPurchaseResponse(
            purchase_id=purchase_id,
            tokens_credited=credited,
            platform_fee_tokens=fee,
            balance=self.balance(),
            owed_collected=collected,
        )

    def reserve(self, estimate: int) -> int | None:
        """The amount now held, or None: refused for the balance (nothing changes)."""
        amount = hold_of(estimate)
        if self.available < amount:
            return None
        self.available -= amount
        self.reserved += amount
        return amount

    def settle(self, hold: HoldM, input_tokens: int, output_tokens: int, answer: bytes) -> Outcome:
        if hold.status in ("settled", "settled_after_expiry"):
            assert hold.settle_answer is not None
            if hold.usage == (input_tokens, output_tokens):
                return replayed(hold.settle_answer)
            return KEY_REUSED
        if hold.status == "released":
            return NOT_HELD
        held = hold.amount if hold.status == "held" else 0  # an expired hold holds nothing
        used = input_tokens + output_tokens
        fee = fee_of(used)
        charge = used + fee
        from_hold = min(charge, held)
        released = held - from_hold
        extra = min(charge - from_hold, self.available)
        charged = from_hold + extra
        unbilled = charge - charged
        self.available += released - extra
        self.reserved -= held
        self.platform["usage"] += used
        self.platform["usage_fee"] += fee
        self.platform["unbilled_usage"] -= unbilled
        collected = self.collect()
        hold.status = "settled" if hold.status == "held" else "settled_after_expiry"
        hold.usage = (input_tokens, output_tokens)
        hold.answer = answer
        hold.settle_answer = pb.SettleResponse(
            tokens_used=used,
            fee_tokens=fee,
            tokens_charged=charged,
            released_tokens=released,
            unbilled_tokens=unbilled,
            balance=self.balance(),
            overrun_tokens=max(0, charge - hold.amount),
            owed_collected=collected,
            answer_stored=bool(answer),
        )
        return hold.settle_answer

    def release(self, hold: HoldM) -> Outcome:
        if hold.status == "held":
            self.available += hold.amount
            self.reserved -= hold.amount
            collected = self.collect()
            hold.status = "released"
            hold.release_answer = pb.ReleaseResponse(
                released_tokens=hold.amount, balance=self.balance(), owed_collected=collected
            )
            return hold.release_answer
        if hold.status == "released":
            assert hold.release_answer is not None
            return replayed(hold.release_answer)
        if hold.status == "expired":
            return pb.ReleaseResponse(released_tokens=0, balance=self.balance())
        return NOT_HELD

    def expire(self, hold: HoldM) -> int:
        """The sweeper voids the hold; returns the owed tokens it collected from it."""
        assert hold.status == "held", hold
        self.available += hold.amount
        self.reserved -= hold.amount
        hold.status = "expired"
        return self.collect()

    def refund(self, purchase: PurchaseM, ask: RefundAsk) -> Outcome:
        tokens = refund_tokens(purchase, ask)
        if tokens is None:
            return INVALID
        ratio = Fraction(purchase.credited, purchase.tokens)
        user_part = math.floor((purchase.refunded + tokens) * ratio) - math.floor(
            purchase.refunded * ratio
        )
        fee_part = tokens - user_part
        debited = min(user_part, self.available)
        shortfall = user_part - debited  # spent or on hold: owed until tokens come back
        self.available -= debited
        self.owed += shortfall
        self.platform["payments_clearing"] += tokens
        self.platform["purchase_fee"] -= fee_part
        self.platform["refund_receivable"] -= shortfall
        purchase.refunded += tokens
        return pb.RefundPurchaseResponse(
            tokens_debited=debited,
            shortfall_tokens=shortfall,
            balance=self.balance(),
            platform_fee_reversed=fee_part,
            tokens_refunded=tokens,
        )


def refund_tokens(purchase: PurchaseM, ask: RefundAsk) -> int | None:
    """Purchased tokens a refund covers, or None when it asks for more than is left."""
    remaining = purchase.tokens - purchase.refunded
    if ask.share is not None:
        refunded_amount, total_amount = ask.share
        amount = math.floor(Fraction(purchase.tokens * refunded_amount, total_amount))
    else:
        amount = ask.tokens
        if ask.cumulative and amount > purchase.tokens:
            return None
    if ask.cumulative:
        tokens = max(0, amount - purchase.refunded)  # only the difference to the target
    elif ask.share is None and amount == 0:
        tokens = remaining
    else:
        tokens = amount
    return None if tokens > remaining else tokens
