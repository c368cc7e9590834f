"""What payment-provider webhooks hand the ledger, through the real gRPC server on a real Postgres:

- subscription state, ordered by the provider's updated_at, so that a stale, replayed or duplicate
  delivery changes nothing, whatever order (or concurrency) the deliveries arrive in;
- GetUserStatus.has_subscription, true only for a live subscription (by the database clock);
- cumulative refunds (providers report the refunded total): only the difference is refunded,
  never a negative amount, also when several race on one purchase.
"""

from __future__ import annotations

import asyncio
import itertools
import random
from datetime import UTC, datetime, timedelta

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from ledger_service.audit import run_audit
from shared.gen.rpcai.ledger.v1 import ledger_pb2 as pb
from shared.rich_errors import error_info
from tests.conftest import AUTH, LedgerHarness
from tests.ledger_service.helpers import balance, credit, failure, new_key

SOURCE = "lemonsqueezy"
T0 = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)


def ts(moment: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(moment)
    return stamp


def state(
    external_id: str,
    updated: datetime,
    status: str = "active",
    user: str = "sub-user",
    variant: str = "v-1",
    renews_at: datetime | None = None,
    ends_at: datetime | None = None,
) -> pb.Subscription:
    s = pb.Subscription(
        source=SOURCE,
        external_id=external_id,
        user_id=user,
        variant_id=variant,
        status=status,
        provider_updated_at=ts(updated),
    )
    if renews_at is not None:
        s.renews_at.CopyFrom(ts(renews_at))
    if ends_at is not None:
        s.ends_at.CopyFrom(ts(ends_at))
    return s


async def upsert(ledger: LedgerHarness, s: pb.Subscription) -> pb.UpsertSubscriptionResponse:
    response: pb.UpsertSubscriptionResponse = await ledger.stub.UpsertSubscription(
        pb.UpsertSubscriptionRequest(subscription=s), metadata=AUTH
    )
    return response


async def get(ledger: LedgerHarness, external_id: str) -> pb.Subscription:
    response: pb.GetSubscriptionResponse = await ledger.stub.GetSubscription(
        pb.GetSubscriptionRequest(source=SOURCE, external_id=external_id), metadata=AUTH
    )
    return response.subscription


async def status_of(ledger: LedgerHarness, user: str) -> pb.GetUserStatusResponse:
    response: pb.GetUserStatusResponse = await ledger.stub.GetUserStatus(
        pb.GetUserStatusRequest(user_id=user), metadata=AUTH
    )
    return response


async def db_now(ledger: LedgerHarness) -> datetime:
    conn = await ledger.db()
    try:
        value: datetime = await conn.fetchval("SELECT now()")
        return value
    finally:
        await conn.close()


# --- upsert and get ----------------------------------------------------------------------------


async def test_a_new_subscription_is_stored_and_read_back_field_for_field(
    ledger: LedgerHarness,
) -> None:
    sent = state(
        "sub-1",
        T0 + timedelta(microseconds=123456),
        status="on_trial",
        renews_at=T0 + timedelta(days=30),
    )
    reply = await upsert(ledger, sent)
    assert reply.applied
    assert reply.subscription == sent
    stored = await get(ledger, "sub-1")
    assert stored == sent
    assert not stored.HasField("ends_at")  # never sent: unset, not the epoch
    assert stored.provider_updated_at.ToDatetime(UTC) == T0 + timedelta(microseconds=123456)


async def test_a_newer_state_replaces_the_stored_one(ledger: LedgerHarness) -> None:
    await upsert(ledger, state("sub-2", T0, renews_at=T0 + timedelta(days=30)))
    newer = state(
        "sub-2", T0 + timedelta(seconds=1), status="cancelled", ends_at=T0 + timedelta(days=30)
    )
    reply = await upsert(ledger, newer)
    assert reply.applied
    assert await get(ledger, "sub-2") == newer
    assert not (await get(ledger, "sub-2")).HasField("renews_at")  # the newer state has none


async def test_an_older_state_after_a_newer_one_is_not_applied(ledger: LedgerHarness) -> None:
    newer = state("sub-3", T0 + timedelta(minutes=5), status="expired", ends_at=T0)
    older = state("sub-3", T0, status="active", renews_at=T0 + timedelta(days=30))
    assert (await upsert(ledger, newer)).applied
    conn = await ledger.db()
    try:
        row_before = await conn.fetchrow("SELECT * FROM subscriptions WHERE external_id = 'sub-3'")
        reply = await upsert(ledger, older)
        row_after = await conn.fetchrow("SELECT * FROM subscriptions WHERE external_id = 'sub-3'")
    finally:
        await conn.close()
    assert not reply.applied
    assert reply.subscription == newer  # the answer is the stored, newer state
    assert await get(ledger, "sub-3") == newer
    assert row_after == row_before  # not even the ledger's own updated_at moved


async def test_a_duplicate_delivery_is_not_applied(ledger: LedgerHarness) -> None:
    s = state("sub-4", T0)
    assert (await upsert(ledger, s)).applied
    again = await upsert(ledger, s)
    assert not again.applied
    assert again.subscription == s
    # Same provider time, other content: still "as new", so still not applied.
    other = state("sub-4", T0, status="paused")
    assert not (await upsert(ledger, other)).applied
    assert (await get(ledger, "sub-4")).status == "active"


async def test_a_microsecond_newer_state_is_applied(ledger: LedgerHarness) -> None:
    await upsert(ledger, state("sub-5", T0))
    reply = await upsert(ledger, state("sub-5", T0 + timedelta(microseconds=1), status="paused"))
    assert reply.applied
    assert (await get(ledger, "sub-5")).status == "paused"


async def test_every_delivery_order_ends_in_the_newest_state(ledger: LedgerHarness) -> None:
    states = [
        state("", T0, status="on_trial"),
        state("", T0 + timedelta(seconds=1), status="active"),
        state("", T0 + timedelta(seconds=2), status="past_due"),
        state("", T0 + timedelta(seconds=3), status="cancelled", ends_at=T0 + timedelta(days=9)),
    ]
    for n, order in enumerate(itertools.permutations(states)):
        external_id = f"perm-{n}"
        applied = []
        for s in order:
            s = changed(s, external_id=external_id)
            applied.append((await upsert(ledger, s)).applied)
        final = await get(ledger, external_id)
        assert final.status == "cancelled", order
        assert final.ends_at == ts(T0 + timedelta(days=9))
        # Applied exactly when newer than everything delivered before it.
        times = [s.provider_updated_at.ToDatetime() for s in order]
        expected = [t > max(times[:i], default=datetime.min) for i, t in enumerate(times)]
        assert applied == expected, order


def changed(s: pb.Subscription, **fields: str) -> pb.Subscription:
    copy = pb.Subscription()
    copy.CopyFrom(s)
    for name, value in fields.items():
        setattr(copy, name, value)
    return copy


async def test_concurrent_deliveries_in_any_order_end_in_the_newest_state(
    ledger: LedgerHarness,
) -> None:
    rng = random.Random(7)
    statuses = ["active", "past_due", "paused", "active", "cancelled", "expired"]
    states = [
        state("sub-race", T0 + timedelta(seconds=i), status=statuses[i % len(statuses)])
        for i in range(30)
    ]
    deliveries = [*states, *states]  # every event twice, as providers retry
    rng.shuffle(deliveries)
    replies = await asyncio.gather(*(upsert(ledger, s) for s in deliveries))
    assert await get(ledger, "sub-race") == states[-1]
    # The newest state was applied exactly once: its duplicate found it already stored.
    newest = [r.applied for r, s in zip(replies, deliveries, strict=True) if s == states[-1]]
    assert sorted(newest) == [False, True]
    # An applied delivery answers its own state; one not applied answers a state as new or newer.
    for reply, sent in zip(replies, deliveries, strict=True):
        if reply.applied:
            assert reply.subscription == sent
        else:
            assert reply.subscription.provider_updated_at.ToDatetime() >= (
                sent.provider_updated_at.ToDatetime()
            )


async def test_concurrent_copies_of_one_delivery_apply_once(ledger: LedgerHarness) -> None:
    s = state("sub-copies", T0)
    replies = await asyncio.gather(*(upsert(ledger, s) for _ in range(20)))
    assert sum(r.applied for r in replies) == 1
    assert all(r.subscription == s for r in replies)


async def test_sources_keep_their_subscriptions_apart(ledger: LedgerHarness) -> None:
    live = state("same-id", T0, status="active")
    test = changed(live, source="lemonsqueezy-test", status="expired")
    assert (await upsert(ledger, live)).applied
    assert (await upsert(ledger, test)).applied
    assert (await get(ledger, "same-id")).status == "active"


async def test_an_unknown_subscription_is_not_found(ledger: LedgerHarness) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await get(ledger, "no-such-subscription")
    assert failure(caught.value) == (grpc.StatusCode.NOT_FOUND, "SUBSCRIPTION_NOT_FOUND")
    info = error_info(caught.value)
    assert info is not None
    assert info.domain == "ledger.rpcai"


# --- has_subscription --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "live"),
    [
        ("active", True),
        ("on_trial", True),
        ("past_due", True),
        ("paused", False),
        ("unpaid", False),
        ("expired", False),
        ("cancelled", False),  # without ends_at: nothing left of it
    ],
)
async def test_has_subscription_follows_the_status(
    ledger: LedgerHarness, status: str, live: bool
) -> None:
    user = new_key("status")
    assert not (await status_of(ledger, user)).has_subscription
    await upsert(ledger, state(f"s-{user}", T0, status=status, user=user))
    reply = await status_of(ledger, user)
    assert reply.has_subscription is live
    assert reply.user_type == pb.USER_TYPE_SUBSCRIPTION  # a subscriber, live or not
    assert not reply.has_purchases


async def test_has_subscription_flips_with_each_applied_state(ledger: LedgerHarness) -> None:
    user = new_key("flips")
    sub = f"s-{user}"
    now = await db_now(ledger)
    steps = [
        ("on_trial", None, True),
        ("active", None, True),
        ("past_due", None, True),
        ("cancelled", now + timedelta(days=3), True),  # cancelled, paid until then
        ("active", None, True),  # resumed
        ("paused", None, False),
        ("active", None, True),
        ("cancelled", now - timedelta(seconds=1), False),  # grace period already over
        ("expired", now - timedelta(seconds=1), False),
    ]
    for i, (status, ends_at, live) in enumerate(steps):
        applied = await upsert(
            ledger,
            state(sub, T0 + timedelta(minutes=i), status=status, user=user, ends_at=ends_at),
        )
        assert applied.applied
        assert (await status_of(ledger, user)).has_subscription is live, (status, ends_at)
    # A late copy of an old "active" changes nothing: still not a live subscription.
    stale = await upsert(ledger, state(sub, T0 + timedelta(minutes=1), user=user))
    assert not stale.applied
    assert not (await status_of(ledger, user)).has_subscription


async def test_a_cancelled_subscription_ends_by_the_database_clock(ledger: LedgerHarness) -> None:
    user = new_key("ends")
    ends_at = await db_now(ledger) + timedelta(seconds=1)
    await upsert(ledger, state(f"s-{user}", T0, status="cancelled", user=user, ends_at=ends_at))
    assert (await status_of(ledger, user)).has_subscription
    while await db_now(ledger) <= ends_at:
        await asyncio.sleep(0.1)
    assert not (await status_of(ledger, user)).has_subscription


async def test_has_subscription_is_per_user(ledger: LedgerHarness) -> None:
    await upsert(ledger, state("someone-elses", T0, user="subscriber"))
    assert (await status_of(ledger, "subscriber")).has_subscription
    other = await status_of(ledger, "not-a-subscriber")
    assert not other.has_subscription
    assert other.user_type == pb.USER_TYPE_UNKNOWN


async def test_any_live_subscription_of_the_user_counts(ledger: LedgerHarness) -> None:
    user = new_key("two")
    await upsert(ledger, state(f"a-{user}", T0, status="expired", user=user))
    assert not (await status_of(ledger, user)).has_subscription
    await upsert(ledger, state(f"b-{user}", T0, status="active", user=user))
    assert (await status_of(ledger, user)).has_subscription


async def test_a_subscription_purchase_alone_is_not_a_subscription(ledger: LedgerHarness) -> None:
    """has_subscription comes from the subscription's state, not from having bought tokens."""
    user = new_key("bought")
    await ledger.stub.CreditPurchase(
        pb.CreditPurchaseRequest(
            idempotency_key=new_key(),
            user_id=user,
            tokens_purchased=1000,
            purchase_type=pb.PURCHASE_TYPE_SUBSCRIPTION,
            external_id=new_key("invoice"),
            source=SOURCE,
        ),
        metadata=AUTH,
    )
    reply = await status_of(ledger, user)
    assert (reply.has_subscription, reply.has_purchases) == (False, True)
    assert reply.user_type == pb.USER_TYPE_SUBSCRIPTION
    assert reply.balance.available_tokens == 800


# --- cumulative refunds ------------------------------------------------------------------------


async def refund(
    ledger: LedgerHarness,
    purchase_id: str,
    tokens: int,
    cumulative: bool = True,
    key: str | None = None,
) -> pb.RefundPurchaseResponse:
    response: pb.RefundPurchaseResponse = await ledger.stub.RefundPurchase(
        pb.RefundPurchaseRequest(
            idempotency_key=key or new_key("refund"),
            purchase_id=purchase_id,
            tokens_to_refund=tokens,
            cumulative=cumulative,
        ),
        metadata=AUTH,
    )
    return response


async def refunded_total(ledger: LedgerHarness, purchase_id: str) -> int:
    conn = await ledger.db()
    try:
        total: int = await conn.fetchval(
            "SELECT tokens_refunded FROM purchases WHERE id = $1::uuid", purchase_id
        )
        return total
    finally:
        await conn.close()


async def test_cumulative_refunds_refund_only_the_difference(ledger: LedgerHarness) -> None:
    bought = await credit(ledger.stub, "cumulative", 1000)  # 800 usable, 200 fee
    first = await refund(ledger, bought.purchase_id, 300)
    assert (first.tokens_refunded, first.tokens_debited, first.platform_fee_reversed) == (
        300,
        240,
        60,
    )
    second = await refund(ledger, bought.purchase_id, 500)  # the total is now 500: 200 more
    assert (second.tokens_refunded, second.tokens_debited, second.platform_fee_reversed) == (
        200,
        160,
        40,
    )
    assert await refunded_total(ledger, bought.purchase_id) == 500
    assert (await balance(ledger.stub, "cumulative")).available_tokens == 400
    assert (await run_audit(ledger.database_url)).ok


@pytest.mark.parametrize("target", [0, 200, 500])
async def test_a_cumulative_total_already_reached_refunds_nothing(
    ledger: LedgerHarness, target: int
) -> None:
    """Never backwards: a stale (lower) or repeated total refunds zero, and 0 is a total of zero,
    not "everything" as without `cumulative`."""
    user = new_key("stale")
    bought = await credit(ledger.stub, user, 1000)
    await refund(ledger, bought.purchase_id, 500)
    conn = await ledger.db()
    try:
        journal_before = await conn.fetchval("SELECT count(*) FROM journal_entries")
        reply = await refund(ledger, bought.purchase_id, target)
        journal_after = await conn.fetchval("SELECT count(*) FROM journal_entries")
    finally:
        await conn.close()
    assert not reply.replayed
    assert (reply.tokens_refunded, reply.tokens_debited, reply.shortfall_tokens) == (0, 0, 0)
    assert reply.platform_fee_reversed == 0
    assert reply.balance.available_tokens == 400
    assert journal_after == journal_before
    assert await refunded_total(ledger, bought.purchase_id) == 500


async def test_cumulative_refund_to_the_whole_purchase_and_past_spending(
    ledger: LedgerHarness,
) -> None:
    user = new_key("spent")
    bought = await credit(ledger.stub, user, 1000)  # 800
    await refund(ledger, bought.purchase_id, 250)  # 200 debited: 600 left
    hold = await ledger.stub.Reserve(
        pb.ReserveRequest(idempotency_key=new_key(), user_id=user, estimated_tokens=400),
        metadata=AUTH,
    )
    await ledger.stub.Settle(
        pb.SettleRequest(
            reservation_id=hold.reservation_id,
            usage=pb.Usage(provider="p", model="m", input_tokens=200, output_tokens=200),
        ),
        metadata=AUTH,
    )  # 500 charged: 100 left
    whole = await refund(ledger, bought.purchase_id, 1000)
    assert whole.tokens_refunded == 750
    assert whole.tokens_debited + whole.shortfall_tokens == 600  # 800 credited - 200 before
    assert (whole.tokens_debited, whole.shortfall_tokens) == (100, 500)
    assert whole.balance.available_tokens == 0
    assert await refunded_total(ledger, bought.purchase_id) == 1000
    assert (await refund(ledger, bought.purchase_id, 1000)).tokens_refunded == 0
    assert (await run_audit(ledger.database_url)).ok


async def test_a_cumulative_total_beyond_the_purchase_is_invalid(ledger: LedgerHarness) -> None:
    bought = await credit(ledger.stub, new_key("beyond"), 1000)
    await refund(ledger, bought.purchase_id, 400)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await refund(ledger, bought.purchase_id, 1001)
    assert failure(caught.value) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT")
    info = error_info(caught.value)
    assert info is not None
    assert info.metadata["field"] == "tokens_to_refund"
    assert await refunded_total(ledger, bought.purchase_id) == 400


async def test_a_cumulative_refund_by_external_reference(ledger: LedgerHarness) -> None:
    bought = await credit(ledger.stub, new_key("ext"), 1000, external_id="order:77")
    reply = await ledger.stub.RefundPurchase(
        pb.RefundPurchaseRequest(
            idempotency_key=new_key(),
            external=pb.PurchaseRef(source="test", external_id="order:77"),
            tokens_to_refund=100,
            cumulative=True,
        ),
        metadata=AUTH,
    )
    assert reply.tokens_refunded == 100
    assert await refunded_total(ledger, bought.purchase_id) == 100


async def test_a_replayed_cumulative_refund_answers_its_original(ledger: LedgerHarness) -> None:
    bought = await credit(ledger.stub, new_key("replay"), 1000)
    key = new_key("refund")
    first = await refund(ledger, bought.purchase_id, 300, key=key)
    await refund(ledger, bought.purchase_id, 600)  # the total moves on under another key
    again = await refund(ledger, bought.purchase_id, 300, key=key)
    assert again.replayed
    assert again.tokens_refunded == first.tokens_refunded == 300
    assert again.balance == first.balance
    assert await refunded_total(ledger, bought.purchase_id) == 600


async def test_the_same_key_with_and_without_cumulative_is_a_reused_key(
    ledger: LedgerHarness,
) -> None:
    bought = await credit(ledger.stub, new_key("reuse"), 1000)
    key = new_key("refund")
    await refund(ledger, bought.purchase_id, 100, cumulative=True, key=key)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await refund(ledger, bought.purchase_id, 100, cumulative=False, key=key)
    assert failure(caught.value) == (grpc.StatusCode.ALREADY_EXISTS, "IDEMPOTENCY_KEY_REUSED")
    assert await refunded_total(ledger, bought.purchase_id) == 100


async def _refund_retrying(
    ledger: LedgerHarness, purchase_id: str, target: int
) -> pb.RefundPurchaseResponse:
    """A client's retry on ABORTED (the ledger's own retries ran out), with the same key."""
    key = new_key("race")
    while True:
        try:
            return await refund(ledger, purchase_id, target, key=key)
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.ABORTED:
                raise


async def test_racing_cumulative_refunds_reach_the_highest_total_exactly(
    ledger: LedgerHarness,
) -> None:
    rng = random.Random(11)
    bought = await credit(ledger.stub, "racing-refunds", 10_000)  # 8000 usable
    targets = [rng.randrange(0, 10_001) for _ in range(24)]
    replies = await asyncio.gather(
        *(_refund_retrying(ledger, bought.purchase_id, t) for t in targets)
    )
    assert all(r.tokens_refunded >= 0 for r in replies)
    assert sum(r.tokens_refunded for r in replies) == max(targets)
    assert await refunded_total(ledger, bought.purchase_id) == max(targets)
    assert (await balance(ledger.stub, "racing-refunds")).available_tokens == (
        8000 - max(targets) * 8000 // 10_000
    )
    assert (await run_audit(ledger.database_url)).ok
