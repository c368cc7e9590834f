"""Replays return the original answer and write nothing; a reused key is refused."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest

from ledger_service.audit import run_audit
from shared.gen.rpcai.ledger.v1 import ledger_pb2 as pb
from tests.conftest import AUTH, LedgerHarness
from tests.ledger_service.helpers import (
    balance,
    credit,
    failure,
    release,
    reserve,
    settle,
    table_counts,
    usage,
)


async def _counts(ledger: LedgerHarness) -> dict[str, int]:
    conn = await ledger.db()
    try:
        return await table_counts(conn)
    finally:
        await conn.close()


async def test_replays_of_every_mutating_call_write_nothing(ledger: LedgerHarness) -> None:
    bought = await credit(ledger.stub, "rex", 1000, key="buy-1", external_id="ord-1")
    hold = await reserve(ledger.stub, "rex", 100, key="hold-1")
    settled = await settle(ledger.stub, hold.reservation_id, 60, 40)
    hold2 = await reserve(ledger.stub, "rex", 10, key="hold-2")
    released = await release(ledger.stub, hold2.reservation_id)
    refund_request = pb.RefundPurchaseRequest(
        idempotency_key="refund-1", purchase_id=bought.purchase_id, tokens_to_refund=100
    )
    refunded = await ledger.stub.RefundPurchase(refund_request, metadata=AUTH)
    usage_request = pb.RecordUsageRequest(
        idempotency_key="usage-1",
        user_id="rex",
        user_type=pb.USER_TYPE_BYOK,
        usage=usage(1, 2),
        estimated_cost_micro_usd=3,
    )
    recorded = await ledger.stub.RecordUsage(usage_request, metadata=AUTH)

    before = await _counts(ledger)
    balance_before = await balance(ledger.stub, "rex")

    again_bought = await credit(ledger.stub, "rex", 1000, key="buy-1", external_id="ord-1")
    again_hold = await reserve(ledger.stub, "rex", 100, key="hold-1")
    again_settled = await settle(ledger.stub, hold.reservation_id, 60, 40)
    again_released = await release(ledger.stub, hold2.reservation_id)
    again_refunded = await ledger.stub.RefundPurchase(refund_request, metadata=AUTH)
    again_recorded = await ledger.stub.RecordUsage(usage_request, metadata=AUTH)

    pairs: list[tuple[Any, Any]] = [
        (bought, again_bought),
        (hold, again_hold),
        (settled, again_settled),
        (released, again_released),
        (refunded, again_refunded),
        (recorded, again_recorded),
    ]
    for original, replay in pairs:
        assert not original.replayed
        assert replay.replayed
        replay.replayed = False
        if isinstance(replay, pb.ReserveResponse):
            assert replay.status == "settled"  # what became of the hold since
            assert replay.settlement == settled  # and what its Settle answered
            replay.status = ""
            replay.ClearField("settlement")
        assert replay == original  # the stored original, balance at that time included
    assert await _counts(ledger) == before
    assert await balance(ledger.stub, "rex") == balance_before
    assert (await run_audit(ledger.database_url)).ok


async def test_a_key_reused_with_a_different_request_is_refused(ledger: LedgerHarness) -> None:
    await credit(ledger.stub, "sam", 1000, key="buy-s", external_id="ord-s")
    hold = await reserve(ledger.stub, "sam", 100, key="hold-s")
    await settle(ledger.stub, hold.reservation_id, 10, 10)
    before = await _counts(ledger)

    attempts = [
        credit(ledger.stub, "sam", 2000, key="buy-s", external_id="ord-s"),
        credit(ledger.stub, "sam", 2000, key="buy-other", external_id="ord-s"),  # same payment
        reserve(ledger.stub, "sam", 101, key="hold-s"),
        reserve(ledger.stub, "someone-else", 100, key="hold-s"),
        settle(ledger.stub, hold.reservation_id, 10, 11),
    ]
    for attempt in attempts:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await attempt
        assert failure(err.value) == (grpc.StatusCode.ALREADY_EXISTS, "IDEMPOTENCY_KEY_REUSED")
    usage_request = pb.RecordUsageRequest(
        idempotency_key="u-s", user_id="sam", user_type=pb.USER_TYPE_BYOK, usage=usage(1, 1)
    )
    await ledger.stub.RecordUsage(usage_request, metadata=AUTH)
    usage_request.usage.output_tokens = 2
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await ledger.stub.RecordUsage(usage_request, metadata=AUTH)
    assert failure(err.value) == (grpc.StatusCode.ALREADY_EXISTS, "IDEMPOTENCY_KEY_REUSED")
    after = await _counts(ledger)
    after["usage_records"] -= 1  # the one RecordUsage that succeeded
    # Refusals change nothing, and keep no key: "buy-other" is as free as it was.
    assert after == before


async def test_the_same_payment_under_a_new_key_answers_the_original(
    ledger: LedgerHarness,
) -> None:
    first = await credit(ledger.stub, "tia", 1000, key="evt-1", external_id="order-7")
    second = await credit(ledger.stub, "tia", 1000, key="evt-1-redelivered", external_id="order-7")
    assert second.replayed
    assert second.purchase_id == first.purchase_id
    assert (await balance(ledger.stub, "tia")).available_tokens == 800


async def test_a_refusal_for_balance_burns_no_key(ledger: LedgerHarness) -> None:
    await credit(ledger.stub, "uma", 100)  # 80
    before = await _counts(ledger)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await reserve(ledger.stub, "uma", 100, key="big")
    assert failure(err.value)[1] == "INSUFFICIENT_BALANCE"
    assert await _counts(ledger) == before  # nothing written, the key included
    await credit(ledger.stub, "uma", 1000)
    # The refusal changed nothing, so the same call is simply made again after the top-up.
    hold = await reserve(ledger.stub, "uma", 100, key="big")
    assert (hold.reserved_tokens, hold.replayed) == (125, False)
    again = await reserve(ledger.stub, "uma", 100, key="big")
    assert (again.reservation_id, again.replayed) == (hold.reservation_id, True)


async def test_concurrent_copies_of_a_refused_reserve_agree(ledger: LedgerHarness) -> None:
    """While the first copy holds the key, the others wait for it; once it gives the key back
    (refused), each claims it in turn and is refused on its own: all say INSUFFICIENT_BALANCE."""
    await credit(ledger.stub, "una", 100)  # 80
    outcomes = await asyncio.gather(
        *(reserve(ledger.stub, "una", 100, key="big-c") for _ in range(10)),
        return_exceptions=True,
    )
    assert {failure(o)[1] for o in outcomes} == {"INSUFFICIENT_BALANCE"}
    assert (await balance(ledger.stub, "una")).available_tokens == 80


async def test_50_parallel_copies_of_one_purchase_credit_once(ledger: LedgerHarness) -> None:
    results = await asyncio.gather(
        *(credit(ledger.stub, "vic", 1000, key="evt-50", external_id="ord-50") for _ in range(50))
    )
    assert len({r.purchase_id for r in results}) == 1
    assert sum(not r.replayed for r in results) == 1
    assert (await balance(ledger.stub, "vic")).available_tokens == 800
    counts = await _counts(ledger)
    assert counts["purchases"] == 1
    assert counts["journal_transactions"] == 1
    assert (await run_audit(ledger.database_url)).ok


async def test_parallel_copies_of_settle_and_release_apply_once(ledger: LedgerHarness) -> None:
    await credit(ledger.stub, "wes", 1000)
    hold = await reserve(ledger.stub, "wes", 100)
    settles = await asyncio.gather(
        *(settle(ledger.stub, hold.reservation_id, 50, 50) for _ in range(20))
    )
    assert sum(not s.replayed for s in settles) == 1
    hold2 = await reserve(ledger.stub, "wes", 100)
    releases = await asyncio.gather(
        *(release(ledger.stub, hold2.reservation_id) for _ in range(20))
    )
    assert sum(not r.replayed for r in releases) == 1
    assert (await balance(ledger.stub, "wes")).available_tokens == 675
    assert (await run_audit(ledger.database_url)).ok


async def test_a_reserve_replay_names_the_attempt_that_made_the_hold(
    ledger: LedgerHarness,
) -> None:
    """The attempt id is kept with the answer and is not part of the request: a later attempt
    under the same key is a replay (not a reused key) and learns whose hold it is."""
    await credit(ledger.stub, "ann", 1000)

    def attempt(attempt_id: str, key: str = "call-7") -> pb.ReserveRequest:
        return pb.ReserveRequest(
            idempotency_key=key, user_id="ann", estimated_tokens=10, attempt_id=attempt_id
        )

    first = await ledger.stub.Reserve(attempt("attempt-1"), metadata=AUTH)
    assert (first.replayed, first.attempt_id) == (False, "attempt-1")
    for asker in ("attempt-2", "attempt-1", ""):
        again = await ledger.stub.Reserve(attempt(asker), metadata=AUTH)
        assert (again.replayed, again.status, again.reservation_id, again.attempt_id) == (
            True,
            "held",
            first.reservation_id,
            "attempt-1",
        )
    unnamed = await ledger.stub.Reserve(attempt("", key="call-8"), metadata=AUTH)
    assert unnamed.attempt_id == ""
    assert (await ledger.stub.Reserve(attempt("attempt-9", key="call-8"), metadata=AUTH)) == (
        pb.ReserveResponse(
            reservation_id=unnamed.reservation_id,
            reserved_tokens=unnamed.reserved_tokens,
            expires_at=unnamed.expires_at,
            balance=unnamed.balance,
            replayed=True,
            status="held",
        )
    )
    # Through the hot path's batches too (the gateway's way): the same answer.
    batch = pb.ApplyBatchRequest(writes=[pb.LedgerWrite(reserve=attempt("attempt-3"))])
    [result] = (await ledger.stub.ApplyBatch(batch, metadata=AUTH)).results
    assert (result.reserve.reservation_id, result.reserve.attempt_id) == (
        first.reservation_id,
        "attempt-1",
    )
