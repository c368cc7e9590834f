"""LemonSqueezy deliveries end to end: signed bodies over HTTP, applied to a real ledger."""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
from collections.abc import AsyncIterator

import pytest

from ledger_service.audit import run_audit
from shared.gen.rpcai.ledger.v1 import ledger_pb2 as lpb
from tests.conftest import AUTH, SERVICE_TOKEN
from tests.ledger_service.helpers import balance, reserve, settle, table_counts
from tests.webhooks.conftest import Hooks, start_hooks
from tests.webhooks.payloads import SUBSCRIPTION_VARIANT, encode, invoice, order, sign, subscription


async def _counts(hooks: Hooks) -> dict[str, int]:
    conn = await hooks.ledger.db()
    try:
        return await table_counts(conn)
    finally:
        await conn.close()


async def _status(hooks: Hooks, user: str) -> lpb.GetUserStatusResponse:
    reply: lpb.GetUserStatusResponse = await hooks.ledger.stub.GetUserStatus(
        lpb.GetUserStatusRequest(user_id=user), metadata=AUTH
    )
    return reply


async def test_order_created_credits_800_of_1000(hooks: Hooks) -> None:
    status, body = await hooks.deliver(order("order_created", 1, "ada"))
    assert (status, body["status"]) == (200, "applied")
    b = await balance(hooks.ledger.stub, "ada")
    assert (b.available_tokens, b.reserved_tokens) == (800, 0)


async def test_the_same_delivery_20_times_credits_once(hooks: Hooks) -> None:
    payload = order("order_created", 2, "bea")
    concurrent = await asyncio.gather(*(hooks.deliver(payload) for _ in range(20)))
    in_sequence = [await hooks.deliver(payload) for _ in range(20)]
    statuses = [s for s, _ in concurrent + in_sequence]
    outcomes = [b["status"] for _, b in concurrent + in_sequence]
    assert statuses == [200] * 40
    assert outcomes.count("applied") == 1
    assert outcomes.count("duplicate") == 39
    assert (await balance(hooks.ledger.stub, "bea")).available_tokens == 800
    assert (await run_audit(hooks.ledger.database_url)).ok


async def test_bad_signatures_are_refused_and_change_nothing(hooks: Hooks) -> None:
    genuine = encode(order("order_created", 3, "cy"))
    other = encode(order("order_created", 4, "cy"))
    before = await _counts(hooks)
    tampered = genuine.replace(b'"cy"', b'"eve"')
    cases = {
        "tampered body": (tampered, sign(genuine)),
        "wrong secret": (genuine, sign(genuine, "not-the-secret")),
        "missing header": (genuine, ""),
        "another event's signature": (genuine, sign(other)),
        "garbage": (genuine, "zz"),
    }
    for name, (body, signature) in cases.items():
        status, reply = await hooks.deliver(body, signature=signature)
        assert status == 401, name
        assert reply["error"]["reason"] == "INVALID_SIGNATURE", name
    assert await _counts(hooks) == before


async def test_refund_after_the_tokens_were_partly_spent(hooks: Hooks) -> None:
    await hooks.deliver(order("order_created", 5, "dee"))  # 800
    hold = await reserve(hooks.ledger.stub, "dee", 400)
    await settle(hooks.ledger.stub, hold.reservation_id, 300, 100)  # 500 charged, 300 left
    status, body = await hooks.deliver(
        order("order_refunded", 5, "dee", total=999, refunded_amount=999)
    )
    assert (status, body["status"]) == (200, "applied")
    assert (await balance(hooks.ledger.stub, "dee")).available_tokens == 0
    report = await run_audit(hooks.ledger.database_url)
    assert report.ok
    assert report.platform_balances["refund_receivable"] == -500
    # Delivered again: nothing more.
    status, body = await hooks.deliver(
        order("order_refunded", 5, "dee", total=999, refunded_amount=999)
    )
    assert (status, body["status"]) == (200, "duplicate")


async def test_partial_refunds_arrive_in_any_order(hooks: Hooks) -> None:
    await hooks.deliver(order("order_created", 6, "eli", total=1000))  # 800
    full = order("order_refunded", 6, "eli", total=1000, refunded_amount=1000)
    half = order("order_refunded", 6, "eli", total=1000, refunded_amount=500)
    assert (await hooks.deliver(full))[1]["status"] == "applied"
    await hooks.deliver(half)  # older news: the cumulative target is already passed
    assert (await balance(hooks.ledger.stub, "eli")).available_tokens == 0
    assert (await run_audit(hooks.ledger.database_url)).ok


async def test_subscription_lifecycle_and_renewals(hooks: Hooks) -> None:
    await hooks.deliver(subscription("subscription_created", 70, "fay"))
    assert (await _status(hooks, "fay")).has_subscription
    # The subscription's own order is acknowledged; its invoices carry the tokens.
    status, body = await hooks.deliver(order("order_created", 700, "fay", SUBSCRIPTION_VARIANT))
    assert (status, body["status"]) == (200, "ignored")
    await hooks.deliver(invoice(7001, 70, "fay", "initial"))
    await hooks.deliver(invoice(7002, 70, "fay", "renewal"))
    await hooks.deliver(invoice(7002, 70, "fay", "renewal"))  # a retry
    assert (await balance(hooks.ledger.stub, "fay")).available_tokens == 2 * 4000

    newer = "2026-11-26T09:00:00.000000Z"
    await hooks.deliver(
        subscription("subscription_cancelled", 70, "fay", "cancelled", updated_at=newer,
                     ends_at="2026-12-25T09:00:00.000000Z")
    )  # fmt: skip
    assert (await _status(hooks, "fay")).has_subscription  # paid until ends_at
    later = "2026-12-26T09:00:00.000000Z"
    await hooks.deliver(
        subscription("subscription_expired", 70, "fay", "expired", updated_at=later,
                     ends_at="2026-11-01T09:00:00.000000Z")
    )  # fmt: skip
    assert not (await _status(hooks, "fay")).has_subscription
    # A stale update arriving late changes nothing.
    status, body = await hooks.deliver(subscription("subscription_updated", 70, "fay", "active"))
    assert (status, body["status"]) == (200, "duplicate")
    assert not (await _status(hooks, "fay")).has_subscription


async def test_an_invoice_before_its_subscription_waits_then_applies(hooks: Hooks) -> None:
    status, body = await hooks.deliver(invoice(8001, 80, "gil", "initial"))
    assert (status, body["status"]) == (200, "waiting")
    assert (await balance(hooks.ledger.stub, "gil")).available_tokens == 0
    status, body = await hooks.deliver(subscription("subscription_created", 80, "gil"))
    assert (status, body["status"]) == (200, "applied")
    assert "1 waiting payment(s) credited" in body["detail"]
    assert (await balance(hooks.ledger.stub, "gil")).available_tokens == 4000
    # Delivered again, the invoice is a duplicate: the waiting copy was credited.
    assert (await hooks.deliver(invoice(8001, 80, "gil", "initial")))[1]["status"] == "duplicate"
    assert not (await _open_letters(hooks))


async def _open_letters(hooks: Hooks) -> list[lpb.DeadLetter]:
    page = await hooks.ledger.stub.ListDeadLetters(
        lpb.ListDeadLettersRequest(source="lemonsqueezy"), metadata=AUTH
    )
    return list(page.dead_letters)


async def test_a_refund_before_its_order_waits_then_applies(hooks: Hooks) -> None:
    refund = order("order_refunded", 16, "ona", total=1000, refunded_amount=250)
    assert (await hooks.deliver(refund))[1]["status"] == "waiting"
    assert (await hooks.deliver(order("order_created", 16, "ona", total=1000)))[1][
        "status"
    ] == "applied"
    # 1000 bought, a quarter of the money returned: 750 left, 600 of them usable.
    assert (await balance(hooks.ledger.stub, "ona")).available_tokens == 600
    assert (await hooks.deliver(refund))[1]["status"] == "duplicate"
    assert not (await _open_letters(hooks))
    assert (await run_audit(hooks.ledger.database_url)).ok


async def test_a_refund_takes_back_what_the_order_bought_not_todays_catalog(
    hooks: Hooks,
) -> None:
    """The variant sold 1000 tokens when the order was paid; it sells 500 now. Refunding the
    order in full takes back the 800 it credited (and its 200 fee), not 400."""
    await hooks.deliver(order("order_created", 17, "pia"))  # 1000 -> 800
    runner, _, client, url = await start_hooks(hooks.ledger, catalog='{"111": 500}')
    try:
        refund = order("order_refunded", 17, "pia", total=999, refunded_amount=999)
        async with hooks.session.post(
            url, data=encode(refund), headers={"X-Signature": sign(encode(refund))}
        ) as response:
            assert (response.status, (await response.json())["status"]) == (200, "applied")
    finally:
        await runner.cleanup()
        await client.close()
    assert await balance(hooks.ledger.stub, "pia") == lpb.Balance()
    report = await run_audit(hooks.ledger.database_url)
    assert report.ok
    assert report.platform_balances["purchase_fee"] == 0


async def test_a_live_event_cannot_credit_the_test_namespace(hooks: Hooks) -> None:
    status, body = await hooks.deliver(order("order_created", 18, "test-mode:ivy"))
    assert (status, body["status"]) == (200, "dead_letter")
    assert "test-mode namespace" in body["detail"]
    assert (await balance(hooks.ledger.stub, "test-mode:ivy")).available_tokens == 0


async def test_unknown_variant_is_parked_and_replayed_after_the_fix(hooks: Hooks) -> None:
    payload = order("order_created", 9, "hal", variant_id=999)
    status, body = await hooks.deliver(payload)
    assert (status, body["status"]) == (200, "dead_letter")
    assert "unknown variant" in body["detail"]
    letters = await hooks.ledger.stub.ListDeadLetters(
        lpb.ListDeadLettersRequest(source="lemonsqueezy"), metadata=AUTH
    )
    [letter] = letters.dead_letters
    assert letter.raw_body == encode(payload)
    assert (await balance(hooks.ledger.stub, "hal")).available_tokens == 0

    # The operator adds the variant and replays.
    fixed = '{"111": 1000, "999": 2000}'
    runner, processor, client, _ = await start_hooks(hooks.ledger, catalog=fixed)
    try:
        outcome = await processor.replay(letter)
    finally:
        await runner.cleanup()
        await client.close()
    assert str(outcome.status) == "applied"
    assert (await balance(hooks.ledger.stub, "hal")).available_tokens == 1600
    pending = await hooks.ledger.stub.ListDeadLetters(
        lpb.ListDeadLettersRequest(source="lemonsqueezy"), metadata=AUTH
    )
    assert not pending.dead_letters


async def test_missing_user_id_is_a_dead_letter(hooks: Hooks) -> None:
    status, body = await hooks.deliver(order("order_created", 10, None))
    assert (status, body["status"]) == (200, "dead_letter")


async def test_test_mode_is_kept_apart(hooks: Hooks) -> None:
    status, body = await hooks.deliver(order("order_created", 11, "ivy", test_mode=True))
    assert (status, body["status"]) == (200, "ignored")
    runner, processor, client, _ = await start_hooks(hooks.ledger, test_mode="credit")
    try:
        outcome = await processor.handle(encode(order("order_created", 11, "ivy", test_mode=True)))
    finally:
        await runner.cleanup()
        await client.close()
    assert str(outcome.status) == "applied"
    assert (await balance(hooks.ledger.stub, "ivy")).available_tokens == 0  # live: untouched
    assert (await balance(hooks.ledger.stub, "test-mode:ivy")).available_tokens == 800


async def test_other_events_are_acknowledged_and_ignored(hooks: Hooks) -> None:
    payload = order("license_key_created", 12, "jay")
    status, body = await hooks.deliver(payload)
    assert (status, body["status"]) == (200, "ignored")


async def test_ledger_outage_answers_503_so_the_provider_retries(hooks: Hooks) -> None:
    await hooks.ledger.app.grpc.server.stop(0)
    status, body = await hooks.deliver(order("order_created", 13, "kim"))
    assert status == 503
    assert body["error"]["reason"] == "LEDGER_UNAVAILABLE"


async def test_operator_command_replays_dead_letters(hooks: Hooks) -> None:
    await hooks.deliver(order("order_created", 14, "lou", variant_id=777))
    await hooks.deliver(order("order_refunded", 14, "lou", variant_id=777, refunded_amount=999))
    env = {
        **os.environ,
        "LEDGER_ADDR": hooks.ledger.address,
        "LEDGER_SERVICE_TOKEN": SERVICE_TOKEN,
        "JWT_SECRET": "unused-by-this-command",
        "LEMONSQUEEZY_VARIANT_TOKENS": '{"777": 500}',
        "DATA_DIR": tempfile.mkdtemp(prefix="rpcai-replay-"),
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway_service", "replay-dead-letters",
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await proc.communicate()
    assert proc.returncode == 0, out.decode()
    # Only the order was a dead letter: its refund waited in the ledger for the payment.
    assert "1 replayed, 0 still unapplicable" in out.decode()
    # The order was credited (400 of 500), then its refund applied: in that order.
    assert (await balance(hooks.ledger.stub, "lou")).available_tokens == 0
    report = await run_audit(hooks.ledger.database_url)
    assert report.ok
    assert report.platform_balances["purchase_fee"] == 0


async def test_a_body_arriving_in_pieces_is_read_whole(hooks: Hooks) -> None:
    body = encode(order("order_created", 15, "max"))

    async def pieces() -> AsyncIterator[bytes]:
        for start in range(0, len(body), 500):
            yield body[start : start + 500]
            await asyncio.sleep(0.01)

    async with hooks.session.post(
        hooks.url, data=pieces(), headers={"X-Signature": sign(body)}
    ) as response:
        assert response.status == 200
        assert (await response.json())["status"] == "applied"
    assert (await balance(hooks.ledger.stub, "max")).available_tokens == 800


async def test_a_refunded_subscription_invoice_takes_its_tokens_back(hooks: Hooks) -> None:
    await hooks.deliver(subscription("subscription_created", 90, "ned"))
    await hooks.deliver(invoice(9001, 90, "ned", "initial"))
    assert (await balance(hooks.ledger.stub, "ned")).available_tokens == 4000
    refunded = invoice(9001, 90, "ned", "initial")
    refunded["meta"]["event_name"] = "subscription_payment_refunded"
    refunded["data"]["attributes"].update(
        {"status": "refunded", "refunded": True, "refunded_amount": 1999}
    )
    status, body = await hooks.deliver(refunded)
    assert (status, body["status"]) == (200, "applied")
    assert (await balance(hooks.ledger.stub, "ned")).available_tokens == 0
    assert (await hooks.deliver(refunded))[1]["status"] == "duplicate"
    assert (await run_audit(hooks.ledger.database_url)).ok


# ---- what was paid ------------------------------------------------------------------------------


async def _payments(hooks: Hooks, user: str) -> list[lpb.Payment | None]:
    """The payments recorded with the user's purchases, oldest first (None: none recorded)."""
    page = await hooks.ledger.stub.GetPurchaseHistory(
        lpb.GetPurchaseHistoryRequest(user_id=user), metadata=AUTH
    )
    return [p.payment if p.HasField("payment") else None for p in reversed(page.purchases)]


def _paid(currency: str, amount: int, usd: int | None) -> lpb.Payment:
    payment = lpb.Payment(currency=currency, amount_minor=amount)
    if usd is not None:
        payment.amount_usd_cents = usd
    return payment


async def test_what_was_paid_is_recorded_with_each_credit(hooks: Hooks) -> None:
    await hooks.deliver(order("order_created", 40, "quin", total=999))
    await hooks.deliver(
        order("order_created", 41, "quin", total=900, currency="EUR", total_usd=1010)
    )
    await hooks.deliver(subscription("subscription_created", 42, "quin"))
    await hooks.deliver(
        invoice(4201, 42, "quin", "initial", currency="GBP", total=1500, total_usd=1890)
    )
    assert (await balance(hooks.ledger.stub, "quin")).available_tokens == 800 + 800 + 4000
    assert await _payments(hooks, "quin") == [
        _paid("USD", 999, 999),
        _paid("EUR", 900, 1010),
        _paid("GBP", 1500, 1890),
    ]


async def test_an_invoice_that_waited_for_its_subscription_keeps_its_payment(
    hooks: Hooks,
) -> None:
    waiting = invoice(4301, 43, "ray", "initial", currency="EUR", total=1850, total_usd=2000)
    assert (await hooks.deliver(waiting))[1]["status"] == "waiting"
    assert (await hooks.deliver(subscription("subscription_created", 43, "ray")))[1][
        "status"
    ] == "applied"
    assert await _payments(hooks, "ray") == [_paid("EUR", 1850, 2000)]


# (what the order says, the payment recorded): a figure that is not clearly valid is left out,
# and the credit applies all the same.
GARBLED: dict[str, tuple[dict[str, object], lpb.Payment | None]] = {
    "no currency": ({"currency": None}, _paid("", 0, 1010)),
    "a currency name": ({"currency": "euros"}, _paid("", 0, 1010)),
    "a number for a currency": ({"currency": 978}, _paid("", 0, 1010)),
    "lower case": ({"currency": "eur"}, _paid("EUR", 900, 1010)),
    "a total in text": ({"total": "9.00"}, _paid("", 0, 1010)),
    "a fractional total": ({"total": 900.5}, _paid("", 0, 1010)),
    "a negative total": ({"total": -900}, _paid("", 0, 1010)),
    "a total beyond any payment": ({"total": 10**16}, _paid("", 0, 1010)),
    "a boolean USD value": ({"total_usd": True}, _paid("EUR", 900, None)),
    "no USD value": ({"total_usd": None}, _paid("EUR", 900, None)),
    "a USD order's other USD value": (
        {"currency": "USD", "total_usd": 5},
        _paid("USD", 900, 900),
    ),
    "nothing usable": ({"currency": "", "total": None, "total_usd": "1010"}, None),
}


@pytest.mark.parametrize("case", list(GARBLED), ids=list(GARBLED))
async def test_garbled_payment_figures_never_cost_the_credit(hooks: Hooks, case: str) -> None:
    changes, recorded = GARBLED[case]
    payload = order("order_created", 44, "sam", total=900, currency="EUR", total_usd=1010)
    payload["data"]["attributes"].update(changes)
    status, body = await hooks.deliver(payload)
    assert (status, body["status"]) == (200, "applied"), body
    assert (await balance(hooks.ledger.stub, "sam")).available_tokens == 800
    assert await _payments(hooks, "sam") == [recorded]
