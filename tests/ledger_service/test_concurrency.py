"""Concurrency over real sockets: no overspend, and every hold resolves exactly once."""

from __future__ import annotations

import asyncio

import grpc

from ledger_service.audit import run_audit
from tests.conftest import LedgerHarness
from tests.ledger_service.helpers import balance, credit, failure, release, reserve, settle


async def test_200_parallel_reserves_against_a_balance_for_80(ledger: LedgerHarness) -> None:
    await credit(ledger.stub, "hot", 1000)  # 800 usable; each reserve of 8 holds 10
    results = await asyncio.gather(
        *(reserve(ledger.stub, "hot", 8) for _ in range(200)), return_exceptions=True
    )
    won = [r for r in results if not isinstance(r, BaseException)]
    lost = [r for r in results if isinstance(r, BaseException)]
    assert len(won) == 80
    assert {failure(e) for e in lost} == {
        (grpc.StatusCode.FAILED_PRECONDITION, "INSUFFICIENT_BALANCE")
    }
    assert all(r.balance.available_tokens >= 0 for r in won)
    assert min(r.balance.available_tokens for r in won) == 0
    final = await balance(ledger.stub, "hot")
    assert (final.available_tokens, final.reserved_tokens) == (0, 800)
    assert (await run_audit(ledger.database_url)).ok


async def _expire_all(ledger: LedgerHarness) -> None:
    conn = await ledger.db()
    try:
        await conn.execute(
            "UPDATE holds SET expires_at = now() - interval '1 second' WHERE status = 'held'"
        )
    finally:
        await conn.close()


async def _statuses(ledger: LedgerHarness) -> dict[str, str]:
    conn = await ledger.db()
    try:
        rows = await conn.fetch("SELECT id::text, status FROM holds")
    finally:
        await conn.close()
    return {r["id"]: r["status"] for r in rows}


async def test_settle_racing_release_one_wins(ledger: LedgerHarness) -> None:
    await credit(ledger.stub, "racer", 10_000)  # 8000
    holds = [await reserve(ledger.stub, "racer", 40) for _ in range(30)]  # 50 each
    outcomes = await asyncio.gather(
        *(
            asyncio.gather(
                settle(ledger.stub, h.reservation_id, 10, 10),  # charges 25
                release(ledger.stub, h.reservation_id),
                return_exceptions=True,
            )
            for h in holds
        )
    )
    charged = 0
    for settled, released in outcomes:
        ok = [not isinstance(settled, BaseException), not isinstance(released, BaseException)]
        assert ok.count(True) == 1, (settled, released)
        loser = released if ok[0] else settled
        assert failure(loser) == (grpc.StatusCode.FAILED_PRECONDITION, "RESERVATION_NOT_HELD")
        charged += 25 if ok[0] else 0
    final = await balance(ledger.stub, "racer")
    assert (final.available_tokens, final.reserved_tokens) == (8000 - charged, 0)
    assert (await run_audit(ledger.database_url)).ok


async def test_settle_release_and_sweeper_racing_on_expired_holds(ledger: LedgerHarness) -> None:
    await credit(ledger.stub, "sweepy", 10_000)  # 8000
    holds = [await reserve(ledger.stub, "sweepy", 40) for _ in range(30)]  # 50 each
    await _expire_all(ledger)

    async def sweep() -> int:
        return await ledger.app.ledger.sweep_expired(1)

    outcomes = await asyncio.gather(
        *(
            asyncio.gather(
                settle(ledger.stub, h.reservation_id, 10, 10),
                release(ledger.stub, h.reservation_id),
                sweep(),
                return_exceptions=True,
            )
            for h in holds
        )
    )
    # Whatever the sweeper left behind, a final sweep takes.
    while await ledger.app.ledger.sweep_expired(100):
        pass
    statuses = await _statuses(ledger)
    expected_available = 8000
    for hold, (settled, released, _swept) in zip(holds, outcomes, strict=True):
        status = statuses[hold.reservation_id]
        if status == "settled":  # settle won: release refused
            assert failure(released)[1] == "RESERVATION_NOT_HELD"
            expected_available -= 25
        elif status == "released":  # release won: settle refused
            assert failure(settled)[1] == "RESERVATION_NOT_HELD"
            assert not isinstance(released, BaseException)
            assert released.released_tokens == 50
        else:  # the sweeper won: settle charged late; release got nothing back, or was
            # refused when the late settle came first
            assert status == "settled_after_expiry", status
            if isinstance(released, BaseException):
                assert failure(released)[1] == "RESERVATION_NOT_HELD"
            else:
                assert released.released_tokens == 0
            assert not isinstance(settled, BaseException)
            assert settled.tokens_charged == 25
            expected_available -= 25
    final = await balance(ledger.stub, "sweepy")
    assert (final.available_tokens, final.reserved_tokens) == (expected_available, 0)
    assert (await run_audit(ledger.database_url)).ok


async def test_many_users_in_parallel_stay_exact(ledger: LedgerHarness) -> None:
    users = [f"u{i}" for i in range(20)]
    await asyncio.gather(*(credit(ledger.stub, u, 1000) for u in users))

    async def spend(user: str) -> None:
        for _ in range(5):
            h = await reserve(ledger.stub, user, 100)
            await settle(ledger.stub, h.reservation_id, 30, 10)  # 50 charged

    await asyncio.gather(*(spend(u) for u in users))
    for u in users:
        b = await balance(ledger.stub, u)
        assert (b.available_tokens, b.reserved_tokens) == (800 - 250, 0)
    report = await run_audit(ledger.database_url)
    assert report.ok
    assert report.platform_balances["usage"] == 20 * 5 * 40
    assert report.platform_balances["usage_fee"] == 20 * 5 * 10
