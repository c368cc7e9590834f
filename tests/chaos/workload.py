"""Workers that drive the ledger with random operations and check every answer against the model.

Each worker owns its users and runs one operation at a time, so every user's history is
sequential and the model of it is deterministic: the operations drawn depend only on the seed
and the model, never on timing. An operation is applied to the model exactly once, when its
definitive answer has arrived, and every copy of it (a retry after a crash, a concurrent
duplicate) must have been answered like the model predicts.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import asyncpg
from google.protobuf import text_format
from google.protobuf.message import Message

from shared.gen.rpcai.ledger.v1 import ledger_pb2 as pb
from tests.chaos.harness import Client, Stats
from tests.chaos.model import (
    HOLD_NOT_FOUND,
    INSUFFICIENT,
    KEY_REUSED,
    PURCHASE_NOT_FOUND,
    HoldM,
    Outcome,
    PurchaseM,
    RefundAsk,
    UserModel,
    max_usage_within,
    replayed,
)

SOURCE = "chaos"
TTL_SECONDS = 3600  # RESERVE_DEFAULT_TTL_SECONDS the ledger runs with
DUPLICATE_PROBABILITY = 0.12
EXPIRY_WITHIN = 180.0  # the sweeper runs every 0.2 s, but the ledger may be down meanwhile
KINDS = {
    "buy": 12,
    "payment_again": 2,
    "reserve": 20,
    "settle": 14,
    "overrun": 4,
    "release": 7,
    "expire": 6,
    "late_settle": 4,
    "settle_any": 3,
    "release_any": 2,
    "refund": 7,
    "refund_on_hold": 3,
    "replay": 10,
    "reuse_key": 3,
    "not_found": 1,
}


# Applies the operation to the model, given the first definitive answer (for the ids the ledger
# assigned), and returns the answer every copy must have had.
Predict = Callable[[Outcome], Outcome]


@dataclass
class Plan:
    op: str
    rpc: str
    request: Message
    predict: Predict


@dataclass
class Sent:
    """An operation already answered, to replay it or reuse its key."""

    rpc: str
    request: Message
    answer: Message | None  # the stored answer; None: refused, and the key was not burned
    hold: HoldM | None = None
    # A refused operation sent again is a new attempt: the plan for it.
    again: Callable[[], Plan] | None = None


@dataclass
class Progress:
    """Operations completed by all workers: the chaos monkey kills at seeded counts of them."""

    done: int = 0


def one_line(value: object) -> str:
    if isinstance(value, Message):
        return f"{type(value).__name__}({text_format.MessageToString(value, as_one_line=True)})"
    if isinstance(value, tuple):
        return f"{value[0].name}/{value[1]}"
    return repr(value)


def is_replayed(answer: Message) -> bool:
    return bool(getattr(answer, "replayed", False))


def outcome_names(expected: Outcome) -> list[str]:
    """What an answer shows, for the run's report."""
    if isinstance(expected, tuple):
        return [expected[1].lower()]
    names: list[str] = []
    if isinstance(expected, pb.SettleResponse) and not expected.replayed:
        names += ["overrun"] * (expected.overrun_tokens > 0)
        names += ["unbilled"] * (expected.unbilled_tokens > 0)
        names += ["owed_collected"] * (expected.owed_collected > 0)
    if isinstance(expected, pb.ReleaseResponse | pb.CreditPurchaseResponse):
        names += ["owed_collected"] * (expected.owed_collected > 0 and not expected.replayed)
    if isinstance(expected, pb.ReleaseResponse) and expected.released_tokens == 0:
        names.append("release_after_expiry")
    if isinstance(expected, pb.RefundPurchaseResponse) and not expected.replayed:
        names += ["shortfall"] * (expected.shortfall_tokens > 0)
        names += ["refund_of_nothing"] * (expected.tokens_refunded == 0)
    return names


class Worker:
    """Runs one operation at a time over its own users, each with its model and history."""

    def __init__(
        self,
        index: int,
        seed: int,
        users: int,
        client: Client,
        db: asyncpg.Pool,
        stats: Stats,
        progress: Progress,
    ) -> None:
        self.rng = random.Random(f"{seed}:{index}")
        self.models = [UserModel(f"chaos-{seed}-w{index}-u{i}") for i in range(users)]
        self.sent: dict[str, list[Sent]] = {m.user: [] for m in self.models}
        # The recent history of each user: what to quote when a check fails.
        self.history: dict[str, deque[str]] = {m.user: deque(maxlen=25) for m in self.models}
        self.client = client
        self.db = db
        self.stats = stats
        self.progress = progress
        self.serial = 0

    # ---- running --------------------------------------------------------------------------

    async def run(self, ops: int) -> None:
        # Money first, or most early operations would only meet empty balances.
        for model in self.models[:ops]:
            await self.execute(model, self.buy(model), 1)
        for _ in range(ops - len(self.models)):
            await self.step(self.rng.choice(self.models))

    async def step(self, model: UserModel) -> None:
        kind = self.rng.choices(list(KINDS), weights=list(KINDS.values()))[0]
        held = [h for h in model.holds if h.status == "held"]
        # Owing with tokens on hold: let the sweeper collect it now and then.
        owed_on_hold = model.owed > 0 and held and self.rng.random() < 0.2
        if (kind == "expire" or owed_on_hold) and held:
            await self.expire(model, self.rng.choice(held))
            return
        plan = self.plan(kind, model, held)
        copies = self.rng.choice((2, 3)) if self.rng.random() < DUPLICATE_PROBABILITY else 1
        await self.execute(model, plan, copies)

    def plan(self, kind: str, model: UserModel, held: list[HoldM]) -> Plan:
        """The operation of that kind, or the nearest one the user's state allows."""
        rng = self.rng
        expired = [h for h in model.holds if h.status == "expired"]
        keyed = [
            s
            for s in self.sent[model.user]
            if s.rpc in ("CreditPurchase", "Reserve", "RefundPurchase") and s.answer is not None
        ]
        if kind in ("settle", "overrun", "release") and held:
            hold = rng.choice(held)
            if kind == "release":
                return self.release(model, hold, kind)
            cap = max_usage_within(hold.amount)
            if kind == "overrun":
                used = rng.randint(cap + 1, cap + hold.amount + 2000)
                return self.settle(model, hold, used, "overrun")
            return self.settle(model, hold, rng.randint(0, cap))
        if kind == "late_settle" and expired:
            hold = rng.choice(expired)
            return self.settle(model, hold, rng.randint(0, 2 * hold.amount + 10), "late_settle")
        if kind in ("settle_any", "release_any", "late_settle") and model.holds:
            hold = rng.choice(model.holds)
            if kind == "release_any":
                return self.release(model, hold, kind)
            if hold.usage is not None and rng.random() < 0.5:
                # The same usage again (a replay, whatever the answer sent with it).
                return self.settle(model, hold, sum(hold.usage), "settle_any", hold.usage)
            return self.settle(model, hold, rng.randint(0, 2 * hold.amount + 10), "settle_any")
        if kind == "refund" and model.purchases:
            return self.refund(model, rng.choice(model.purchases))
        if kind == "refund_on_hold" and held and model.purchases:
            # All of the largest purchase while tokens are on hold: what is on hold becomes owed.
            purchase = max(model.purchases, key=lambda p: p.tokens - p.refunded)
            return self.refund(model, purchase, RefundAsk(tokens=0), op=kind)
        if kind == "payment_again" and model.purchases:
            return self.payment_again(model, rng.choice(model.purchases))
        if kind == "replay" and self.sent[model.user]:
            return self.replay(model, rng.choice(self.sent[model.user]))
        if kind == "reuse_key" and keyed:
            return self.reuse_key(rng.choice(keyed))
        if kind == "not_found":
            return self.not_found(model)
        # A buy, a reserve, or instead of an operation the state does not allow: a hold to work
        # with next, or, out of tokens, a top-up first.
        broke = kind != "reserve" and model.available == 0
        if kind == "buy" or not model.purchases or broke:
            return self.buy(model)
        return self.reserve(model)

    async def execute(self, model: UserModel, plan: Plan, copies: int) -> None:
        """Sends `copies` identical requests at once, each retried until definitive; applies the
        operation to the model once; checks every answer."""
        answers = await asyncio.gather(
            *(self.client.call(plan.rpc, plan.request) for _ in range(copies))
        )
        expected = plan.predict(answers[0])
        self.history[model.user].append(
            f"{plan.op} x{copies}: {one_line(plan.request)} -> {one_line(expected)}"
        )
        for answer in answers:
            if self.check(model, plan, answer, expected) and copies == 1:
                # Its first attempt committed, and the answer was lost with the ledger.
                self.stats.outcomes["answer_lost_in_crash"] += 1
        self.stats.ops[plan.op] += 1
        self.stats.outcomes.update(outcome_names(expected))
        self.stats.duplicates += copies > 1
        self.stats.replays += plan.op in ("replay", "final_replay")
        self.progress.done += 1

    def check(self, model: UserModel, plan: Plan, actual: Outcome, expected: Outcome) -> bool:
        """Fails unless the answer is the model's; True when a new operation was answered as
        a replay (it had already been applied, by an earlier attempt or a concurrent copy)."""
        fresh = isinstance(expected, Message) and not is_replayed(expected)
        was_replayed = fresh and isinstance(actual, Message) and is_replayed(actual)
        if fresh and isinstance(actual, Message):
            actual = self.as_new(actual)
        if actual != expected:
            history = "\n    ".join(self.history[model.user])
            raise AssertionError(
                f"user {model.user}, {plan.op} {one_line(plan.request)}:\n"
                f"  ledger answered {one_line(actual)}\n  model expected  {one_line(expected)}\n"
                f"  the user's recent operations (the last is this one):\n    {history}"
            )
        return was_replayed

    def as_new(self, answer: Message) -> Message:
        """A new operation may be answered as a replay: its first attempt committed before a
        crash, or a concurrent copy got there first. Then it must be the original answer."""
        if not is_replayed(answer):
            return answer
        copy = type(answer)()
        copy.CopyFrom(answer)
        copy.replayed = False  # type: ignore[attr-defined]
        if isinstance(copy, pb.ReserveResponse):
            # A replayed Reserve tells what became of its hold: nothing yet.
            if copy.status != "held" or copy.HasField("settlement") or copy.answer:
                return answer
            copy.status = ""
        return copy

    # ---- operations -----------------------------------------------------------------------

    def key(self, prefix: str, model: UserModel) -> str:
        self.serial += 1
        return f"{prefix}-{model.user}-{self.serial}"

    def remember(self, model: UserModel, sent: Sent) -> None:
        self.sent[model.user].append(sent)

    def buy(self, model: UserModel) -> Plan:
        roll = self.rng.random()
        # Mostly small, so that holds and refunds meet empty balances; sometimes large.
        tokens = self.rng.randint(1, 5000) if roll < 0.6 else self.rng.randint(5000, 30000)
        if roll > 0.97:
            tokens = self.rng.randint(10**5, 10**6)
        key = self.key("buy", model)
        external_id = f"order-{key}"
        request = pb.CreditPurchaseRequest(
            idempotency_key=key,
            user_id=model.user,
            tokens_purchased=tokens,
            purchase_type=pb.PURCHASE_TYPE_ONE_TIME,
            external_id=external_id,
            source=SOURCE,
        )

        def predict(first: Outcome) -> Outcome:
            purchase_id = first.purchase_id if isinstance(first, pb.CreditPurchaseResponse) else "?"
            answer = model.buy(tokens, purchase_id, external_id)
            self.remember(model, Sent("CreditPurchase", request, answer))
            return answer

        return Plan("buy", "CreditPurchase", request, predict)

    def payment_again(self, model: UserModel, purchase: PurchaseM) -> Plan:
        """The same payment delivered again under a new key (a webhook retried after a crash):
        credited once, so the answer is the purchase's, with the balance as it is now."""
        request = pb.CreditPurchaseRequest(
            idempotency_key=self.key("buy-again", model),
            user_id=model.user,
            tokens_purchased=purchase.tokens,
            purchase_type=pb.PURCHASE_TYPE_ONE_TIME,
            external_id=purchase.external_id,
            source=SOURCE,
        )

        def predict(first: Outcome) -> Outcome:
            answer = pb.CreditPurchaseResponse(
                purchase_id=purchase.id,
                tokens_credited=purchase.credited,
                platform_fee_tokens=purchase.tokens - purchase.credited,
                balance=model.balance(),
            )
            self.remember(model, Sent("CreditPurchase", request, answer))
            return replayed(answer)

        return Plan("payment_again", "CreditPurchase", request, predict)

    def reserve(self, model: UserModel, request: pb.ReserveRequest | None = None) -> Plan:
        again = request is not None  # the key of a refused Reserve, tried again
        if request is None:
            roll = self.rng.random()
            estimate = self.rng.randint(1, 1000) if roll < 0.7 else self.rng.randint(1000, 6000)
            if roll > 0.85 and model.available > 1:
                # About everything available: a refund now meets tokens on hold (owed).
                estimate = max(1, model.available * 4 // 5)
            request = pb.ReserveRequest(
                idempotency_key=self.key("hold", model),
                user_id=model.user,
                estimated_tokens=estimate,
            )
        sent_request = request

        def predict(first: Outcome) -> Outcome:
            amount = model.reserve(sent_request.estimated_tokens)
            if amount is None:

                def retry() -> Plan:
                    return self.reserve(model, sent_request)

                self.remember(model, Sent("Reserve", sent_request, None, again=retry))
                return INSUFFICIENT
            if again:
                self.stats.outcomes["held_with_a_refused_key"] += 1
            got = first if isinstance(first, pb.ReserveResponse) else pb.ReserveResponse()
            if got.reservation_id:
                # The database's clock is this machine's; a stored answer may be older than now.
                expires_in = got.expires_at.seconds - time.time()
                assert TTL_SECONDS - 600 < expires_in <= TTL_SECONDS + 5, one_line(got)
            hold = HoldM(got.reservation_id, amount)
            model.holds.append(hold)
            answer = pb.ReserveResponse(
                reservation_id=hold.id,
                reserved_tokens=amount,
                expires_at=got.expires_at,
                balance=model.balance(),
            )
            self.remember(model, Sent("Reserve", sent_request, answer, hold=hold))
            return answer

        return Plan("reserve", "Reserve", request, predict)

    def settle(
        self,
        model: UserModel,
        hold: HoldM,
        used: int,
        op: str = "settle",
        split: tuple[int, int] | None = None,
        request: pb.SettleRequest | None = None,
    ) -> Plan:
        if request is None:
            input_tokens = self.rng.randint(0, used) if split is None else split[0]
            kept = f"answer {self.serial}".encode() if self.rng.random() < 0.3 else b""
            request = pb.SettleRequest(
                reservation_id=hold.id,
                usage=pb.Usage(
                    provider="chaos",
                    model="m",
                    input_tokens=input_tokens,
                    output_tokens=used - input_tokens,
                ),
                answer=kept,
            )
        sent_request = request
        usage = sent_request.usage

        def predict(first: Outcome) -> Outcome:
            was = hold.status
            answer = model.settle(
                hold, usage.input_tokens, usage.output_tokens, sent_request.answer
            )
            if was in ("held", "expired") and isinstance(answer, pb.SettleResponse):
                self.remember(model, Sent("Settle", sent_request, answer, hold=hold))
            return answer

        return Plan(op, "Settle", request, predict)

    def release(self, model: UserModel, hold: HoldM, op: str = "release") -> Plan:
        request = pb.ReleaseRequest(reservation_id=hold.id)

        def predict(first: Outcome) -> Outcome:
            was = hold.status
            answer = model.release(hold)
            if was == "held" and isinstance(answer, pb.ReleaseResponse):
                self.remember(model, Sent("Release", request, answer, hold=hold))
            return answer

        return Plan(op, "Release", request, predict)

    def refund_ask(self, purchase: PurchaseM) -> RefundAsk:
        rng = self.rng
        remaining = purchase.tokens - purchase.refunded
        roll = rng.random()
        if roll < 0.4:  # a part, or everything left (0); sometimes more than is left
            part = rng.choice(
                (0, rng.randint(1, max(1, remaining)), remaining + rng.randint(1, 99))
            )
            return RefundAsk(tokens=part)
        if roll < 0.65:  # a running total to reach, sometimes one already passed
            target = rng.randint(0, purchase.tokens) if rng.random() < 0.95 else purchase.tokens + 1
            return RefundAsk(tokens=target, cumulative=True)
        total = rng.choice((999, 1000, 4999, 12345))  # the payment's minor units
        return RefundAsk(cumulative=True, share=(rng.randint(0, total), total))

    def refund(
        self,
        model: UserModel,
        purchase: PurchaseM,
        ask: RefundAsk | None = None,
        request: pb.RefundPurchaseRequest | None = None,
        op: str = "refund",
    ) -> Plan:
        if request is None:
            if ask is None:
                ask = self.refund_ask(purchase)
            request = pb.RefundPurchaseRequest(
                idempotency_key=self.key("refund", model),
                tokens_to_refund=ask.tokens,
                cumulative=ask.cumulative,
            )
            if self.rng.random() < 0.3:
                request.external.CopyFrom(
                    pb.PurchaseRef(source=SOURCE, external_id=purchase.external_id)
                )
            else:
                request.purchase_id = purchase.id
            if ask.share is not None:
                request.share.CopyFrom(
                    pb.RefundShare(refunded_amount=ask.share[0], total_amount=ask.share[1])
                )
        assert ask is not None, "a request sent again comes with its ask"
        sent_ask, sent_request = ask, request

        def predict(first: Outcome) -> Outcome:
            answer = model.refund(purchase, sent_ask)
            if isinstance(answer, Message):
                self.remember(model, Sent("RefundPurchase", sent_request, answer))
            else:  # refused: it rolled back and burned no key

                def retry() -> Plan:
                    return self.refund(model, purchase, sent_ask, sent_request)

                self.remember(model, Sent("RefundPurchase", sent_request, None, again=retry))
            return answer

        return Plan(op, "RefundPurchase", request, predict)

    def replay(self, model: UserModel, sent: Sent, op: str = "replay") -> Plan:
        """The identical request again: answered like the original, with `replayed` set."""
        if sent.again is not None:
            self.sent[model.user].remove(sent)  # the new attempt is remembered afresh
            plan = sent.again()
            return Plan(op, plan.rpc, plan.request, plan.predict)
        hold = sent.hold
        if isinstance(sent.request, pb.SettleRequest) and hold is not None:
            usage = sent.request.usage
            total = usage.input_tokens + usage.output_tokens
            split = (usage.input_tokens, usage.output_tokens)
            return self.settle(model, hold, total, op, split, sent.request)
        if isinstance(sent.request, pb.ReleaseRequest) and hold is not None:
            return self.release(model, hold, op)

        def predict(first: Outcome) -> Outcome:
            assert sent.answer is not None
            answer = replayed(sent.answer)
            if isinstance(answer, pb.ReserveResponse) and hold is not None:
                # A replayed Reserve also tells what became of its hold, and its settlement.
                answer.status = hold.status
                answer.answer = hold.answer
                if hold.settle_answer is not None:
                    answer.settlement.CopyFrom(hold.settle_answer)
            return answer

        return Plan(op, sent.rpc, sent.request, predict)

    def reuse_key(self, sent: Sent) -> Plan:
        """The key of an earlier operation with a different (still valid) request."""
        changed = type(sent.request)()
        changed.CopyFrom(sent.request)
        if isinstance(changed, pb.CreditPurchaseRequest):
            changed.tokens_purchased += 1
        elif isinstance(changed, pb.ReserveRequest):
            changed.estimated_tokens += 1
        elif isinstance(changed, pb.RefundPurchaseRequest):
            if changed.HasField("share"):
                share = changed.share
                share.refunded_amount += 1 if share.refunded_amount < share.total_amount else -1
            else:
                changed.tokens_to_refund += 1
        return Plan("reuse_key", sent.rpc, changed, lambda first: KEY_REUSED)

    def not_found(self, model: UserModel) -> Plan:
        unknown = str(uuid.UUID(int=self.rng.getrandbits(128), version=4))
        which = self.rng.randrange(3)
        if which == 0:
            usage = pb.Usage(provider="chaos", model="m", input_tokens=1, output_tokens=1)
            request: Message = pb.SettleRequest(reservation_id=unknown, usage=usage)
            return Plan("not_found", "Settle", request, lambda first: HOLD_NOT_FOUND)
        if which == 1:
            request = pb.ReleaseRequest(reservation_id=unknown)
            return Plan("not_found", "Release", request, lambda first: HOLD_NOT_FOUND)
        request = pb.RefundPurchaseRequest(
            idempotency_key=self.key("refund", model), purchase_id=unknown
        )
        return Plan("not_found", "RefundPurchase", request, lambda first: PURCHASE_NOT_FOUND)

    async def expire(self, model: UserModel, hold: HoldM) -> None:
        """Makes the hold due by the database clock and waits for the ledger's own sweeper."""
        hold_id = uuid.UUID(hold.id)
        await self.db.execute(
            "UPDATE holds SET expires_at = now() - interval '1 second' WHERE id = $1", hold_id
        )
        deadline = time.monotonic() + EXPIRY_WITHIN
        query = "SELECT status FROM holds WHERE id = $1"
        while (status := await self.db.fetchval(query, hold_id)) == "held":
            assert time.monotonic() < deadline, f"hold {hold.id} was never swept"
            await asyncio.sleep(0.05)
        self.history[model.user].append(f"expire {hold.id}: {status}")
        assert status == "expired", f"hold {hold.id} became {status}, not expired"
        if model.expire(hold):
            self.stats.outcomes["owed_collected_by_sweeper"] += 1
        # The sweeper pays what is owed from the hold, as a release would.
        request = pb.GetBalanceRequest(user_id=model.user)
        expected = pb.GetBalanceResponse(balance=model.balance())
        await self.execute(model, Plan("expire", "GetBalance", request, lambda first: expected), 1)
        self.stats.outcomes["expired"] += 1

    async def final_replays(self, per_user: int) -> int:
        """Replays a sample of every user's answered operations, after all the restarts."""
        count = 0
        for model in self.models:
            answered = [s for s in self.sent[model.user] if s.again is None]
            for sent in self.rng.sample(answered, min(per_user, len(answered))):
                await self.execute(model, self.replay(model, sent, "final_replay"), 1)
                count += 1
        return count
