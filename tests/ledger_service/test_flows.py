"""The ledger's operations end to end over gRPC: the seed scenario and each hold outcome."""

from __future__ import annotations

import grpc
import pytest

from ledger_service.audit import run_audit
from shared.gen.rpcai.ledger.v1 import ledger_pb2 as pb
from tests.conftest import AUTH, LedgerHarness
from tests.ledger_service.helpers import (
    balance,
    credit,
    failure,
    new_key,
    release,
    reserve,
    settle,
)


async def test_seed_scenario_purchase_then_metered_call(ledger: LedgerHarness) -> None:
    bought = await credit(ledger.stub, "alice", 1000)
    assert (bought.tokens_credited, bought.platform_fee_tokens) == (800, 200)
    assert bought.balance.available_tokens == 800

    hold = await reserve(ledger.stub, "alice", 100)
    assert hold.reserved_tokens == 125
    assert (hold.balance.available_tokens, hold.balance.reserved_tokens) == (675, 125)

    settled = await settle(ledger.stub, hold.reservation_id, 40, 60)
    assert (settled.tokens_used, settled.fee_tokens, settled.tokens_charged) == (100, 25, 125)
    assert (settled.released_tokens, settled.unbilled_tokens) == (0, 0)
    assert (settled.balance.available_tokens, settled.balance.reserved_tokens) == (675, 0)
    assert (await run_audit(ledger.database_url)).ok


async def test_settle_below_the_hold_releases_the_rest(ledger: LedgerHarness) -> None:
    await credit(ledger.stub, "bob", 1000)  # 800 usable
    hold = await reserve(ledger.stub, "bob", 400)  # holds 500
    settled = await settle(ledger.stub, hold.reservation_id, 50, 50)  # 125 charged
    assert settled.tokens_charged == 125
    assert settled.released_tokens == 375
    assert settled.balance.available_tokens == 675
    assert settled.balance.reserved_tokens == 0


async def test_usage_beyond_the_hold_takes_what_the_balance_allows(ledger: LedgerHarness) -> None:
    await credit(ledger.stub, "carol", 250)  # 200 usable
    hold = await reserve(ledger.stub, "carol", 100)  # holds 125, 75 left available
    settled = await settle(ledger.stub, hold.reservation_id, 100, 100)  # 250 owed
    assert settled.tokens_charged == 200
    assert settled.unbilled_tokens == 50
    assert settled.balance.available_tokens == 0
    report = await run_audit(ledger.database_url)
    assert report.ok
    assert report.platform_balances["unbilled_usage"] == -50
    assert report.platform_balances["usage"] == 200
    assert report.platform_balances["usage_fee"] == 50


async def test_release_returns_everything_and_is_idempotent(ledger: LedgerHarness) -> None:
    await credit(ledger.stub, "dave", 1000)
    hold = await reserve(ledger.stub, "dave", 200)
    first = await release(ledger.stub, hold.reservation_id)
    assert first.released_tokens == 250
    assert first.balance.available_tokens == 800
    again = await release(ledger.stub, hold.reservation_id)
    assert again.replayed
    assert again.released_tokens == 250
    assert (await balance(ledger.stub, "dave")).available_tokens == 800


async def test_settling_a_released_hold_is_refused(ledger: LedgerHarness) -> None:
    await credit(ledger.stub, "erin", 1000)
    hold = await reserve(ledger.stub, "erin", 100)
    await release(ledger.stub, hold.reservation_id)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await settle(ledger.stub, hold.reservation_id, 10, 10)
    assert failure(err.value) == (grpc.StatusCode.FAILED_PRECONDITION, "RESERVATION_NOT_HELD")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await release(ledger.stub, (await reserve(ledger.stub, "erin", 1)).reservation_id + "x")
    assert failure(err.value)[0] == grpc.StatusCode.INVALID_ARGUMENT


async def test_releasing_a_settled_hold_is_refused(ledger: LedgerHarness) -> None:
    await credit(ledger.stub, "fay", 1000)
    hold = await reserve(ledger.stub, "fay", 100)
    await settle(ledger.stub, hold.reservation_id, 10, 10)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await release(ledger.stub, hold.reservation_id)
    assert failure(err.value) == (grpc.StatusCode.FAILED_PRECONDITION, "RESERVATION_NOT_HELD")


async def test_insufficient_balance_holds_nothing(ledger: LedgerHarness) -> None:
    await credit(ledger.stub, "gus", 100)  # 80 usable
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await reserve(ledger.stub, "gus", 65)  # would hold 82
    assert failure(err.value) == (grpc.StatusCode.FAILED_PRECONDITION, "INSUFFICIENT_BALANCE")
    ok = await reserve(ledger.stub, "gus", 64)  # holds exactly 80
    assert ok.balance.available_tokens == 0
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await reserve(ledger.stub, "nobody", 1)
    assert failure(err.value) == (grpc.StatusCode.FAILED_PRECONDITION, "INSUFFICIENT_BALANCE")


async def test_expired_hold_is_swept_and_a_late_settle_charges_what_is_left(
    ledger: LedgerHarness,
) -> None:
    await credit(ledger.stub, "hal", 1000)  # 800
    hold = await reserve(ledger.stub, "hal", 400, ttl=1)  # holds 500
    conn = await ledger.db()
    try:  # age the hold instead of sleeping: expiry is by the database clock
        await conn.execute(
            "UPDATE holds SET expires_at = now() - interval '1 second' WHERE id = $1::uuid",
            hold.reservation_id,
        )
    finally:
        await conn.close()
    assert await ledger.app.ledger.sweep_expired(100) == 1
    assert (await balance(ledger.stub, "hal")).available_tokens == 800
    assert await ledger.app.ledger.sweep_expired(100) == 0

    # The call did happen: the late settle still charges, from the available balance.
    late = await settle(ledger.stub, hold.reservation_id, 100, 0)
    assert (late.tokens_charged, late.released_tokens, late.unbilled_tokens) == (125, 0, 0)
    assert late.balance.available_tokens == 675
    # Release after expiry releases nothing more.
    hold2 = await reserve(ledger.stub, "hal", 10, ttl=1)
    conn = await ledger.db()
    try:
        await conn.execute(
            "UPDATE holds SET expires_at = now() - interval '1 s' WHERE status = 'held'"
        )
    finally:
        await conn.close()
    await ledger.app.ledger.sweep_expired(100)
    released = await release(ledger.stub, hold2.reservation_id)
    assert released.released_tokens == 0
    assert released.balance.available_tokens == 675
    assert (await run_audit(ledger.database_url)).ok


async def test_refund_after_spending_stops_at_zero_and_records_the_shortfall(
    ledger: LedgerHarness,
) -> None:
    bought = await credit(ledger.stub, "ivy", 1000)  # 800 usable
    hold = await reserve(ledger.stub, "ivy", 500)
    await settle(ledger.stub, hold.reservation_id, 500, 0)  # 625 charged, 175 left
    refund = await ledger.stub.RefundPurchase(
        pb.RefundPurchaseRequest(idempotency_key=new_key("refund"), purchase_id=bought.purchase_id),
        metadata=AUTH,
    )
    assert refund.tokens_refunded == 1000
    assert refund.tokens_debited == 175
    assert refund.shortfall_tokens == 625
    assert refund.platform_fee_reversed == 200
    assert refund.balance.available_tokens == 0
    report = await run_audit(ledger.database_url)
    assert report.ok
    assert report.platform_balances["refund_receivable"] == -625
    assert report.platform_balances["purchase_fee"] == 0


async def test_partial_refunds_by_external_id_reverse_in_proportion(ledger: LedgerHarness) -> None:
    await credit(ledger.stub, "jon", 999, external_id="order-999")  # 799 + 200
    parts = []
    for tokens in (333, 333, 333):
        r = await ledger.stub.RefundPurchase(
            pb.RefundPurchaseRequest(
                idempotency_key=new_key("refund"),
                external=pb.PurchaseRef(source="test", external_id="order-999"),
                tokens_to_refund=tokens,
            ),
            metadata=AUTH,
        )
        parts.append((r.tokens_debited, r.platform_fee_reversed))
    assert sum(p[0] for p in parts) == 799
    assert sum(p[1] for p in parts) == 200
    assert (await balance(ledger.stub, "jon")).available_tokens == 0


async def test_status_analytics_and_history(ledger: LedgerHarness) -> None:
    status = await ledger.stub.GetUserStatus(pb.GetUserStatusRequest(user_id="kim"), metadata=AUTH)
    assert status.user_type == pb.USER_TYPE_UNKNOWN
    await ledger.stub.RecordUsage(
        pb.RecordUsageRequest(
            idempotency_key=new_key("byok"),
            user_id="kim",
            user_type=pb.USER_TYPE_BYOK,
            usage=pb.Usage(provider="openai", model="gpt-4o", input_tokens=10, output_tokens=5),
            estimated_cost_micro_usd=75,
        ),
        metadata=AUTH,
    )
    status = await ledger.stub.GetUserStatus(pb.GetUserStatusRequest(user_id="kim"), metadata=AUTH)
    assert status.user_type == pb.USER_TYPE_BYOK
    assert not status.has_purchases

    for i in range(3):
        await credit(ledger.stub, "kim", 100 + i)
    sub = await ledger.stub.CreditPurchase(
        pb.CreditPurchaseRequest(
            idempotency_key=new_key(),
            user_id="kim",
            tokens_purchased=500,
            purchase_type=pb.PURCHASE_TYPE_SUBSCRIPTION,
            external_id="sub-1",
            source="test",
        ),
        metadata=AUTH,
    )
    status = await ledger.stub.GetUserStatus(pb.GetUserStatusRequest(user_id="kim"), metadata=AUTH)
    assert status.user_type == pb.USER_TYPE_SUBSCRIPTION
    # A purchase is not a subscription: has_subscription follows the subscription's state
    # (UpsertSubscription), see test_subscriptions.py.
    assert not status.has_subscription
    assert status.has_purchases
    assert status.balance.available_tokens == 80 + 80 + 81 + 400

    hold = await reserve(ledger.stub, "kim", 10)
    await settle(ledger.stub, hold.reservation_id, 4, 4)
    analytics = await ledger.stub.GetUsageAnalytics(
        pb.GetUsageAnalyticsRequest(user_id="kim", days=7, include_history=True), metadata=AUTH
    )
    assert analytics.summary.total_requests == 2
    assert analytics.summary.total_tokens == 23
    assert analytics.summary.tokens_charged == 10
    assert analytics.summary.estimated_total_cost_micro_usd == 75
    assert analytics.summary.unknown_cost_requests == 1
    assert {(b.provider, b.model) for b in analytics.breakdown} == {
        ("openai", "gpt-4o"),
        ("anthropic", "claude-test"),
    }
    assert len(analytics.history) == 2
    byok = next(h for h in analytics.history if h.user_type == pb.USER_TYPE_BYOK)
    assert byok.HasField("estimated_cost_micro_usd")
    assert byok.estimated_cost_micro_usd == 75
    metered = next(h for h in analytics.history if h.user_type == pb.USER_TYPE_SUBSCRIPTION)
    assert not metered.HasField("estimated_cost_micro_usd")

    seen: list[str] = []
    token = ""
    while True:
        page = await ledger.stub.GetPurchaseHistory(
            pb.GetPurchaseHistoryRequest(user_id="kim", page_size=3, page_token=token),
            metadata=AUTH,
        )
        seen.extend(p.purchase_id for p in page.purchases)
        token = page.next_page_token
        if not token:
            break
    assert len(seen) == 4
    assert len(set(seen)) == 4
    assert seen[0] == sub.purchase_id  # newest first


async def test_quote_reserve_tells_the_hold_without_taking_it(ledger: LedgerHarness) -> None:
    await credit(ledger.stub, "quin", 200)  # 160
    quote = await ledger.stub.QuoteReserve(
        pb.QuoteReserveRequest(user_id="quin", estimated_tokens=128), metadata=AUTH
    )
    assert (quote.required_tokens, quote.sufficient) == (160, True)
    quote = await ledger.stub.QuoteReserve(
        pb.QuoteReserveRequest(user_id="quin", estimated_tokens=129), metadata=AUTH
    )
    assert (quote.required_tokens, quote.sufficient) == (162, False)
    assert quote.balance.available_tokens == 160
