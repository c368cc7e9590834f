"""The money rules at the ledger's edges, over gRPC on a real Postgres:

- a refund that arrives while tokens are on hold (or already spent) leaves them owed, and what is
  owed is collected first whenever tokens become available (release, settle, expiry, purchase),
  so no token of a refunded payment can ever be spent;
- refunds are sized from the ledger's record of the purchase (a share of the money paid);
- concurrent duplicates of a refund all answer the original;
- payment events that arrive before their subject wait in the ledger and are applied in the
  transaction that creates it, however the two interleave;
- holds can be kept alive (ExtendHold); a Settle can keep the call's answer for its replays;
- what only serves replays is deleted after its retention.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import Awaitable
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from ledger_service.audit import run_audit
from ledger_service.domain.types import RetentionPolicy
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
    usage,
)

SOURCE = "shop"


async def _audit_ok(ledger: LedgerHarness) -> dict[str, tuple[str, str]]:
    report = await run_audit(ledger.database_url)
    assert report.ok, report.render()
    return report.findings


async def _platform(ledger: LedgerHarness, code: str) -> int:
    report = await run_audit(ledger.database_url)
    return report.platform_balances[code]


async def _refund(ledger: LedgerHarness, **fields: Any) -> pb.RefundPurchaseResponse:
    fields.setdefault("idempotency_key", new_key("refund"))
    reply: pb.RefundPurchaseResponse = await ledger.stub.RefundPurchase(
        pb.RefundPurchaseRequest(**fields), metadata=AUTH
    )
    return reply


# --- a refund while tokens are on hold ---------------------------------------------------------


async def _refunded_while_held(ledger: LedgerHarness, user: str) -> pb.ReserveResponse:
    bought = await credit(ledger.stub, user, 1000)  # 800 usable
    hold = await reserve(ledger.stub, user, 640)  # holds 800: nothing left available
    refunded = await _refund(ledger, purchase_id=bought.purchase_id)
    assert (refunded.tokens_debited, refunded.shortfall_tokens) == (0, 800)
    assert refunded.balance == pb.Balance(reserved_tokens=800, owed_tokens=800)
    return hold


async def test_a_hold_released_after_a_refund_pays_the_refund(ledger: LedgerHarness) -> None:
    hold = await _refunded_while_held(ledger, "ria")
    released = await release(ledger.stub, hold.reservation_id)
    assert (released.released_tokens, released.owed_collected) == (800, 800)
    assert released.balance == pb.Balance()  # nothing of the refunded payment is spendable
    assert await _platform(ledger, "refund_receivable") == 0  # collected in full
    findings = await _audit_ok(ledger)
    assert findings["open refund receivables (users, tokens owed)"] == ("0", "0")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await reserve(ledger.stub, "ria", 1)
    assert failure(err.value)[1] == "INSUFFICIENT_BALANCE"


async def test_a_hold_settled_after_a_refund_pays_what_it_did_not_use(
    ledger: LedgerHarness,
) -> None:
    hold = await _refunded_while_held(ledger, "rob")
    settled = await settle(ledger.stub, hold.reservation_id, 120, 120)  # 300 charged
    assert (settled.tokens_charged, settled.released_tokens) == (300, 500)
    assert settled.owed_collected == 500
    # The 300 spent on the call stay owed: a receivable the next purchase pays first.
    assert settled.balance == pb.Balance(owed_tokens=300)
    findings = await _audit_ok(ledger)
    assert findings["open refund receivables (users, tokens owed)"] == ("1", "300")
    again = await credit(ledger.stub, "rob", 1000)
    assert again.owed_collected == 300
    assert again.balance == pb.Balance(available_tokens=500)
    assert await _platform(ledger, "refund_receivable") == 0
    await _audit_ok(ledger)


async def test_an_expired_hold_pays_the_refund_too(ledger: LedgerHarness) -> None:
    hold = await _refunded_while_held(ledger, "rex")
    conn = await ledger.db()
    try:
        await conn.execute(
            "UPDATE holds SET expires_at = now() - interval '1 second' WHERE id = $1",
            uuid.UUID(hold.reservation_id),
        )
    finally:
        await conn.close()
    assert await ledger.app.ledger.sweep_expired(100) == 1
    assert await balance(ledger.stub, "rex") == pb.Balance()
    assert await _platform(ledger, "refund_receivable") == 0
    await _audit_ok(ledger)


async def test_a_partial_refund_of_tokens_on_hold_takes_only_its_share(
    ledger: LedgerHarness,
) -> None:
    bought = await credit(ledger.stub, "ray", 1000)  # 800
    hold = await reserve(ledger.stub, "ray", 400)  # holds 500, 300 available
    refunded = await _refund(
        ledger,
        purchase_id=bought.purchase_id,
        share=pb.RefundShare(refunded_amount=999, total_amount=1998),  # half the money
    )
    # Half the purchase: 500 tokens, 400 of them the user's (300 available, 100 owed).
    assert (refunded.tokens_refunded, refunded.platform_fee_reversed) == (500, 100)
    assert (refunded.tokens_debited, refunded.shortfall_tokens) == (300, 100)
    released = await release(ledger.stub, hold.reservation_id)
    assert released.owed_collected == 100
    assert released.balance == pb.Balance(available_tokens=400)
    await _audit_ok(ledger)


# --- refunds sized from the purchase, and their duplicates -------------------------------------


async def test_a_refund_share_is_sized_from_what_the_purchase_credited(
    ledger: LedgerHarness,
) -> None:
    """Whatever a catalog says today, a payment refunded in part gives back that part of what
    the payment bought: floor(tokens_purchased * refunded / total)."""
    bought = await credit(ledger.stub, "sid", 999, external_id="order-sid")
    first = await _refund(
        ledger,
        external=pb.PurchaseRef(source="test", external_id="order-sid"),
        share=pb.RefundShare(refunded_amount=100, total_amount=300),
        cumulative=True,
    )
    assert first.tokens_refunded == 333  # floor(999 / 3)
    full = await _refund(
        ledger,
        purchase_id=bought.purchase_id,
        share=pb.RefundShare(refunded_amount=300, total_amount=300),
        cumulative=True,
    )
    assert full.tokens_refunded == 666
    assert await balance(ledger.stub, "sid") == pb.Balance()
    assert await _platform(ledger, "purchase_fee") == 0  # the fee went back in full
    await _audit_ok(ledger)


@pytest.mark.parametrize("cumulative", [False, True])
async def test_concurrent_duplicates_of_a_partial_refund_answer_the_original(
    ledger: LedgerHarness, cumulative: bool
) -> None:
    user = f"dup-{cumulative}"
    bought = await credit(ledger.stub, user, 1000)
    request = pb.RefundPurchaseRequest(
        idempotency_key=new_key("refund"),
        purchase_id=bought.purchase_id,
        tokens_to_refund=600,
        cumulative=cumulative,
    )
    for round_ in range(5):  # the race needs the copies to meet; repeat it
        answers = await asyncio.gather(
            *(ledger.stub.RefundPurchase(request, metadata=AUTH) for _ in range(20)),
            return_exceptions=True,
        )
        assert all(isinstance(a, pb.RefundPurchaseResponse) for a in answers), answers
        originals = [a for a in answers if isinstance(a, pb.RefundPurchaseResponse)]
        assert {a.tokens_refunded for a in originals} == {600 if round_ == 0 else 100}
        assert sum(not a.replayed for a in originals) == 1
        request.idempotency_key = new_key("refund")
        request.tokens_to_refund = 100 if not cumulative else request.tokens_to_refund + 100
    # 600, then five more refunds of 100 (plain) or up to 1000 in total (cumulative): 1000.
    assert await balance(ledger.stub, user) == pb.Balance()
    await _audit_ok(ledger)


# --- events before their subject ---------------------------------------------------------------


async def test_a_refund_before_its_purchase_waits_and_applies_with_it(
    ledger: LedgerHarness,
) -> None:
    ref = pb.PurchaseRef(source=SOURCE, external_id="order-early")
    key = new_key("refund")
    parked = await _refund(
        ledger,
        idempotency_key=key,
        external=ref,
        share=pb.RefundShare(refunded_amount=50, total_amount=100),
        cumulative=True,
        wait_for_purchase=True,
    )
    assert parked.parked
    assert (await _refund(ledger, idempotency_key=key, external=ref,
                          share=pb.RefundShare(refunded_amount=50, total_amount=100),
                          cumulative=True, wait_for_purchase=True)).parked  # fmt: skip
    await ledger.stub.CreditPurchase(
        pb.CreditPurchaseRequest(
            idempotency_key=new_key("buy"),
            user_id="early",
            tokens_purchased=1000,
            purchase_type=pb.PURCHASE_TYPE_ONE_TIME,
            external_id="order-early",
            source=SOURCE,
        ),
        metadata=AUTH,
    )
    assert await balance(ledger.stub, "early") == pb.Balance(available_tokens=400)
    # The refund's key now answers what the refund did.
    replay = await _refund(
        ledger,
        idempotency_key=key,
        external=ref,
        share=pb.RefundShare(refunded_amount=50, total_amount=100),
        cumulative=True,
        wait_for_purchase=True,
    )
    assert (replay.replayed, replay.parked, replay.tokens_refunded) == (True, False, 500)
    findings = await _audit_ok(ledger)
    assert (
        findings["payment events waiting for their purchase or subscription (events, oldest)"][0]
        == "0"
    )


async def test_a_refund_of_an_unknown_purchase_without_waiting_burns_no_key(
    ledger: LedgerHarness,
) -> None:
    key = new_key("refund")
    ref = pb.PurchaseRef(source=SOURCE, external_id="order-later")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _refund(ledger, idempotency_key=key, external=ref)
    assert failure(err.value) == (grpc.StatusCode.NOT_FOUND, "PURCHASE_NOT_FOUND")
    await credit(ledger.stub, "later", 1000, external_id="order-later")
    await ledger.stub.CreditPurchase(
        pb.CreditPurchaseRequest(
            idempotency_key=new_key("buy"),
            user_id="later",
            tokens_purchased=1000,
            purchase_type=pb.PURCHASE_TYPE_ONE_TIME,
            external_id="order-later",
            source=SOURCE,
        ),
        metadata=AUTH,
    )
    refunded = await _refund(ledger, idempotency_key=key, external=ref)
    assert (refunded.replayed, refunded.tokens_refunded) == (False, 1000)


def _subscription(external_id: str, tokens: int, updated: datetime) -> pb.Subscription:
    stamp = Timestamp()
    stamp.FromDatetime(updated)
    return pb.Subscription(
        source=SOURCE,
        external_id=external_id,
        user_id=f"owner-{external_id}",
        variant_id="monthly",
        status="active",
        provider_updated_at=stamp,
        tokens_per_period=tokens,
    )


def _invoice(invoice_id: str, subscription_id: str) -> pb.CreditPurchaseRequest:
    return pb.CreditPurchaseRequest(
        idempotency_key=f"{SOURCE}:invoice:{invoice_id}",
        purchase_type=pb.PURCHASE_TYPE_SUBSCRIPTION,
        external_id=f"invoice:{invoice_id}",
        source=SOURCE,
        subscription=pb.PurchaseRef(external_id=subscription_id),
    )


async def test_an_invoice_and_its_refund_before_the_subscription_apply_with_it(
    ledger: LedgerHarness,
) -> None:
    parked = await ledger.stub.CreditPurchase(_invoice("i-1", "s-1"), metadata=AUTH)
    assert parked.parked
    await ledger.stub.CreditPurchase(_invoice("i-2", "s-1"), metadata=AUTH)
    refund = await _refund(
        ledger,
        external=pb.PurchaseRef(source=SOURCE, external_id="invoice:i-1"),
        share=pb.RefundShare(refunded_amount=1999, total_amount=1999),
        cumulative=True,
        wait_for_purchase=True,
    )
    assert refund.parked
    upsert = await ledger.stub.UpsertSubscription(
        pb.UpsertSubscriptionRequest(
            subscription=_subscription("s-1", 5000, datetime(2026, 1, 1, tzinfo=UTC))
        ),
        metadata=AUTH,
    )
    assert upsert.parked_credits_applied == 2
    # Two invoices of 5000 (4000 usable each), the first refunded in full.
    assert await balance(ledger.stub, "owner-s-1") == pb.Balance(available_tokens=4000)
    replay = await ledger.stub.CreditPurchase(_invoice("i-2", "s-1"), metadata=AUTH)
    assert (replay.replayed, replay.parked, replay.tokens_credited) == (True, False, 4000)
    await _audit_ok(ledger)


async def test_an_invoice_of_a_subscription_without_known_tokens_waits_for_the_catalog(
    ledger: LedgerHarness,
) -> None:
    moment = datetime(2026, 2, 1, tzinfo=UTC)
    await ledger.stub.UpsertSubscription(
        pb.UpsertSubscriptionRequest(subscription=_subscription("s-2", 0, moment)),
        metadata=AUTH,
    )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await ledger.stub.CreditPurchase(_invoice("i-3", "s-2"), metadata=AUTH)
    assert failure(err.value) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "SUBSCRIPTION_TOKENS_UNKNOWN",
    )
    # The same state again, now that the catalog knows the variant: it fills in the tokens.
    again = await ledger.stub.UpsertSubscription(
        pb.UpsertSubscriptionRequest(subscription=_subscription("s-2", 300, moment)),
        metadata=AUTH,
    )
    assert (again.applied, again.subscription.tokens_per_period) == (False, 300)
    credited = await ledger.stub.CreditPurchase(_invoice("i-3", "s-2"), metadata=AUTH)
    assert (credited.replayed, credited.tokens_credited) == (False, 240)


async def test_creating_subjects_and_waiting_for_them_never_miss_each_other(
    ledger: LedgerHarness,
) -> None:
    """Each round sends a subscription, its invoice and the invoice's partial refund, and an
    order with its refund, all at once, in a random order: whatever interleaving happens, every
    payment is credited once and every refund applied once, and nothing is left waiting."""
    rng = random.Random(7)
    rounds = 60
    for n in range(rounds):
        moment = datetime(2026, 3, 1, tzinfo=UTC) + timedelta(minutes=n)
        sub, inv, order = f"rs-{n}", f"ri-{n}", f"order-r-{n}"
        calls: list[Awaitable[object]] = [
            ledger.stub.UpsertSubscription(
                pb.UpsertSubscriptionRequest(subscription=_subscription(sub, 1000, moment)),
                metadata=AUTH,
            ),
            ledger.stub.CreditPurchase(_invoice(inv, sub), metadata=AUTH),
            _refund(
                ledger,
                external=pb.PurchaseRef(source=SOURCE, external_id=f"invoice:{inv}"),
                share=pb.RefundShare(refunded_amount=1, total_amount=4),
                cumulative=True,
                wait_for_purchase=True,
            ),
            ledger.stub.CreditPurchase(
                pb.CreditPurchaseRequest(
                    idempotency_key=new_key("buy"),
                    user_id=f"owner-{sub}",
                    tokens_purchased=100,
                    purchase_type=pb.PURCHASE_TYPE_ONE_TIME,
                    external_id=order,
                    source=SOURCE,
                ),
                metadata=AUTH,
            ),
            _refund(
                ledger,
                external=pb.PurchaseRef(source=SOURCE, external_id=order),
                share=pb.RefundShare(refunded_amount=1, total_amount=2),
                cumulative=True,
                wait_for_purchase=True,
            ),
        ]
        rng.shuffle(calls)
        await asyncio.gather(*calls)
        # Invoice: 1000 bought, a quarter refunded: 750 * 80% = 600. Order: 100, half: 40.
        assert await balance(ledger.stub, f"owner-{sub}") == pb.Balance(available_tokens=640)
    findings = await _audit_ok(ledger)
    assert (
        findings["payment events waiting for their purchase or subscription (events, oldest)"][0]
        == "0"
    )


# --- equal provider times: a terminal status wins ---------------------------------------------


@pytest.mark.parametrize("first", ["cancelled", "expired"])
async def test_at_an_equal_time_expired_wins(ledger: LedgerHarness, first: str) -> None:
    moment = datetime(2026, 4, 1, tzinfo=UTC)
    second = "expired" if first == "cancelled" else "cancelled"
    for status in (first, second):
        state = _subscription("s-eq", 100, moment)
        state.status = status
        await ledger.stub.UpsertSubscription(
            pb.UpsertSubscriptionRequest(subscription=state), metadata=AUTH
        )
    stored = await ledger.stub.GetSubscription(
        pb.GetSubscriptionRequest(source=SOURCE, external_id="s-eq"), metadata=AUTH
    )
    assert stored.subscription.status == "expired"


# --- holds kept alive, answers kept for replays -----------------------------------------------


async def test_extend_hold_keeps_a_hold_from_the_sweeper(ledger: LedgerHarness) -> None:
    await credit(ledger.stub, "ext", 1000)
    hold = await reserve(ledger.stub, "ext", 100, ttl=1)
    extended = await ledger.stub.ExtendHold(
        pb.ExtendHoldRequest(reservation_id=hold.reservation_id, ttl_seconds=600), metadata=AUTH
    )
    assert extended.expires_at.ToDatetime() > hold.expires_at.ToDatetime() + timedelta(seconds=500)
    await asyncio.sleep(1.1)
    assert await ledger.app.ledger.sweep_expired(100) == 0
    await release(ledger.stub, hold.reservation_id)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await ledger.stub.ExtendHold(
            pb.ExtendHoldRequest(reservation_id=hold.reservation_id), metadata=AUTH
        )
    assert failure(err.value) == (grpc.StatusCode.FAILED_PRECONDITION, "RESERVATION_NOT_HELD")


async def test_a_replayed_reserve_returns_the_answer_its_settle_kept(
    ledger: LedgerHarness,
) -> None:
    await credit(ledger.stub, "ans", 10_000)
    key = new_key("call")
    hold = await reserve(ledger.stub, "ans", 100, key=key)
    settled = await ledger.stub.Settle(
        pb.SettleRequest(reservation_id=hold.reservation_id, usage=usage(10, 10), answer=b"42"),
        metadata=AUTH,
    )
    assert settled.answer_stored
    replay = await reserve(ledger.stub, "ans", 100, key=key)
    assert (replay.replayed, replay.status, replay.answer) == (True, "settled", b"42")

    big = new_key("call")
    hold = await reserve(ledger.stub, "ans", 100, key=big)
    too_large = b"x" * (ledger.app.ledger.holds.answer_max_bytes + 1)
    settled = await ledger.stub.Settle(
        pb.SettleRequest(reservation_id=hold.reservation_id, usage=usage(1, 1), answer=too_large),
        metadata=AUTH,
    )
    assert not settled.answer_stored  # charged all the same
    assert settled.tokens_charged == 3
    assert (await reserve(ledger.stub, "ans", 100, key=big)).answer == b""


async def test_a_settle_beyond_its_hold_is_reported(ledger: LedgerHarness) -> None:
    await credit(ledger.stub, "ovr", 10_000)
    hold = await reserve(ledger.stub, "ovr", 100)  # holds 125
    settled = await settle(ledger.stub, hold.reservation_id, 100, 60)  # 200 charged
    assert (settled.tokens_charged, settled.overrun_tokens, settled.unbilled_tokens) == (200, 75, 0)
    findings = await _audit_ok(ledger)
    assert findings["holds settled beyond their hold, a provider anomaly (holds, tokens over)"] == (
        "1",
        "75",
    )


# --- retention ---------------------------------------------------------------------------------


async def test_retention_deletes_only_what_outlived_it(ledger: LedgerHarness) -> None:
    await credit(ledger.stub, "ret", 10_000, key="keyed-buy")
    keyless = await ledger.stub.Reserve(
        pb.ReserveRequest(
            idempotency_key="made-up", user_id="ret", estimated_tokens=10, transient_key=True
        ),
        metadata=AUTH,
    )
    keyed = await reserve(ledger.stub, "ret", 10, key="caller-key")
    for hold in (keyless, keyed):
        await ledger.stub.Settle(
            pb.SettleRequest(reservation_id=hold.reservation_id, usage=usage(1, 1), answer=b"a"),
            metadata=AUTH,
        )
    letter = await ledger.stub.RecordDeadLetter(
        pb.RecordDeadLetterRequest(
            source="s", event_name="e", reason="r", raw_body=b"{}", dedupe_key="d"
        ),
        metadata=AUTH,
    )
    await ledger.stub.ResolveDeadLetter(
        pb.ResolveDeadLetterRequest(dead_letter_id=letter.dead_letter_id, resolution="done"),
        metadata=AUTH,
    )
    policy = RetentionPolicy(
        transient_key_seconds=3600, key_seconds=7200, answer_seconds=3600, resolved_seconds=3600
    )
    assert await ledger.app.ledger.apply_retention(policy) == 0  # all fresh

    async def age(hours: int) -> None:
        conn = await ledger.db()
        try:
            for table in ("idempotency_keys", "hold_answers", "dead_letters"):
                column = "created_at"
                await conn.execute(
                    f"UPDATE {table} SET {column} = {column} - make_interval(hours => $1)", hours
                )
            await conn.execute(
                "UPDATE dead_letters SET resolved_at = resolved_at - make_interval(hours => $1)",
                hours,
            )
        finally:
            await conn.close()

    await age(1)  # past the transient, answer and resolved retentions, not the keyed one
    conn = await ledger.db()
    try:
        assert await ledger.app.ledger.apply_retention(policy) == 4
        keys = {r["key"] for r in await conn.fetch("SELECT key FROM idempotency_keys")}
        assert keys == {"keyed-buy", "caller-key"}
        assert await conn.fetchval("SELECT count(*) FROM hold_answers") == 0
        assert await conn.fetchval("SELECT count(*) FROM dead_letters") == 0
        await age(1)
        assert await ledger.app.ledger.apply_retention(policy) == 2
        assert await conn.fetchval("SELECT count(*) FROM idempotency_keys") == 0
        # The money itself is never subject to retention.
        assert await conn.fetchval("SELECT count(*) FROM holds") == 2
    finally:
        await conn.close()
    await _audit_ok(ledger)


# --- dead letters page with a cursor -----------------------------------------------------------


async def test_dead_letters_page_with_a_cursor(ledger: LedgerHarness) -> None:
    for n in range(7):
        await ledger.stub.RecordDeadLetter(
            pb.RecordDeadLetterRequest(
                source="pager", event_name="e", reason="r", raw_body=b"{}", dedupe_key=f"d{n}"
            ),
            metadata=AUTH,
        )
    seen: list[str] = []
    token = ""
    pages = 0
    while True:
        page = await ledger.stub.ListDeadLetters(
            pb.ListDeadLettersRequest(source="pager", page_size=3, page_token=token),
            metadata=AUTH,
        )
        pages += 1
        seen += [d.dead_letter_id for d in page.dead_letters]
        token = page.next_page_token
        if not token:
            break
    assert pages == 3
    assert len(seen) == len(set(seen)) == 7


async def test_quote_reserve_reports_exactly_what_reserve_holds(ledger: LedgerHarness) -> None:
    await credit(ledger.stub, "quo", 10**12)
    for estimate in (1, 3, 4, 5, 99, 100, 101, 12_345, 999_999_999):
        quote = await ledger.stub.QuoteReserve(
            pb.QuoteReserveRequest(user_id="quo", estimated_tokens=estimate), metadata=AUTH
        )
        hold = await reserve(ledger.stub, "quo", estimate)
        assert quote.required_tokens == hold.reserved_tokens, estimate
        assert quote.sufficient
        await release(ledger.stub, hold.reservation_id)
