"""Monthly quotas, enforced where the money is: a Reserve that would take the month's usage
(charged + held) past the quota is refused like one past the balance, atomically, whatever the
concurrency; settles, releases and expiries move the month's usage; a new month starts from zero
(a new row, never an overwrite)."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from ledger_service.audit import run_audit
from shared.gen.rpcai.ledger.v1 import ledger_pb2 as pb
from shared.rich_errors import error_info
from tests.conftest import AUTH, LedgerHarness
from tests.ledger_service.helpers import balance, credit, failure, new_key, release, settle, usage

NOVEMBER = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)
DECEMBER = datetime(2026, 12, 1, 0, 0, 1, tzinfo=UTC)


def _at(moment: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(moment)
    return stamp


async def _reserve(
    ledger: LedgerHarness,
    user: str,
    estimate: int,
    quota: int,
    at: datetime | None = NOVEMBER,
    key: str | None = None,
) -> pb.ReserveResponse:
    request = pb.ReserveRequest(
        idempotency_key=key or new_key("hold"),
        user_id=user,
        estimated_tokens=estimate,
        monthly_quota=quota,
    )
    if at is not None:
        request.quota_at.CopyFrom(_at(at))
    reply: pb.ReserveResponse = await ledger.stub.Reserve(request, metadata=AUTH)
    return reply


async def _month(ledger: LedgerHarness, user: str, month: str) -> tuple[int, int]:
    conn = await ledger.db()
    try:
        row = await conn.fetchrow(
            "SELECT charged, held FROM monthly_usage WHERE user_id = $1 AND month = $2::date",
            user,
            datetime.fromisoformat(month).date(),
        )
    finally:
        await conn.close()
    return (row["charged"], row["held"]) if row else (0, 0)


async def test_a_reserve_past_the_quota_is_refused_and_changes_nothing(
    ledger: LedgerHarness,
) -> None:
    await credit(ledger.stub, "qa", 100_000)
    first = await _reserve(ledger, "qa", 400, quota=1000)  # holds 500
    assert first.reserved_tokens == 500
    key = new_key("hold")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _reserve(ledger, "qa", 500, quota=1000, key=key)  # 625 more: 1125 > 1000
    assert failure(err.value) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "MONTHLY_QUOTA_EXCEEDED")
    assert await _month(ledger, "qa", "2026-11-01") == (0, 500)
    b = await balance(ledger.stub, "qa")
    assert (b.available_tokens, b.reserved_tokens) == (80_000 - 500, 500)
    # The settle charges 125 of the 500: the month now counts 125, and the key is still free.
    settled = await settle(ledger.stub, first.reservation_id, 40, 60)
    assert settled.tokens_charged == 125
    assert await _month(ledger, "qa", "2026-11-01") == (125, 0)
    again = await _reserve(ledger, "qa", 500, quota=1000, key=key)
    assert again.reserved_tokens == 625
    assert not again.replayed
    await release(ledger.stub, again.reservation_id)
    assert await _month(ledger, "qa", "2026-11-01") == (125, 0)
    assert (await run_audit(ledger.database_url)).ok


async def test_the_refusal_says_what_is_used_and_when_it_resets(ledger: LedgerHarness) -> None:
    await credit(ledger.stub, "qb", 100_000)
    await _reserve(ledger, "qb", 80, quota=150)  # holds 100
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _reserve(ledger, "qb", 80, quota=150)
    info = error_info(err.value)
    assert info is not None
    assert dict(info.metadata) == {
        "quota": "150",
        "used": "100",
        "required": "100",
        "resets_at": "2026-12-01T00:00:00+00:00",
    }


async def test_a_hundred_concurrent_reserves_never_overrun_the_quota(ledger: LedgerHarness) -> None:
    user = f"qc-{uuid.uuid4().hex[:6]}"
    await credit(ledger.stub, user, 10**9)
    quota = 30 * 125
    outcomes = await asyncio.gather(
        *(_reserve(ledger, user, 100, quota=quota) for _ in range(100)), return_exceptions=True
    )
    holds = [o for o in outcomes if isinstance(o, pb.ReserveResponse)]
    refused = [o for o in outcomes if not isinstance(o, pb.ReserveResponse)]
    assert len(holds) == 30
    assert {failure(r)[1] for r in refused} == {"MONTHLY_QUOTA_EXCEEDED"}
    assert await _month(ledger, user, "2026-11-01") == (0, quota)
    # Settled for less than held: room comes back for exactly what was not charged.
    for hold in holds:
        await settle(ledger.stub, hold.reservation_id, 20, 20)  # 50 charged of 125
    assert await _month(ledger, user, "2026-11-01") == (30 * 50, 0)
    assert (await run_audit(ledger.database_url)).ok


async def test_a_new_month_starts_from_zero(ledger: LedgerHarness) -> None:
    await credit(ledger.stub, "qd", 100_000)
    hold = await _reserve(ledger, "qd", 800, quota=1000)  # 1000: the whole quota
    await settle(ledger.stub, hold.reservation_id, 400, 400)
    with pytest.raises(grpc.aio.AioRpcError):
        await _reserve(ledger, "qd", 1, quota=1000)
    december = await _reserve(ledger, "qd", 800, quota=1000, at=DECEMBER)
    assert december.reserved_tokens == 1000
    assert await _month(ledger, "qd", "2026-11-01") == (1000, 0)  # November is kept as it was
    assert await _month(ledger, "qd", "2026-12-01") == (0, 1000)


async def test_expired_quota_holds_leave_their_month(ledger: LedgerHarness) -> None:
    await credit(ledger.stub, "qe", 100_000)
    hold = await _reserve(ledger, "qe", 400, quota=1000)
    conn = await ledger.db()
    try:
        await conn.execute(
            "UPDATE holds SET expires_at = now() - interval '1 second' WHERE id = $1",
            uuid.UUID(hold.reservation_id),
        )
    finally:
        await conn.close()
    assert await ledger.app.ledger.sweep_expired(10) == 1
    assert await _month(ledger, "qe", "2026-11-01") == (0, 0)
    # A late settle is charged in the hold's month all the same.
    late = await ledger.stub.Settle(
        pb.SettleRequest(reservation_id=hold.reservation_id, usage=usage(10, 10)), metadata=AUTH
    )
    assert late.tokens_charged == 25
    assert await _month(ledger, "qe", "2026-11-01") == (25, 0)
    assert (await run_audit(ledger.database_url)).ok


async def test_status_and_quote_report_the_current_month(ledger: LedgerHarness) -> None:
    await credit(ledger.stub, "qf", 100_000)
    await _reserve(ledger, "qf", 80, quota=1000, at=None)  # this month, by the database clock
    status = await ledger.stub.GetUserStatus(pb.GetUserStatusRequest(user_id="qf"), metadata=AUTH)
    assert (status.month.charged_tokens, status.month.held_tokens) == (0, 100)
    assert status.month.resets_at.ToDatetime() > status.month.starts_at.ToDatetime()
    quote = await ledger.stub.QuoteReserve(
        pb.QuoteReserveRequest(user_id="qf", estimated_tokens=720, monthly_quota=1000),
        metadata=AUTH,
    )
    assert (quote.required_tokens, quote.sufficient, quote.within_quota) == (900, True, True)
    over = await ledger.stub.QuoteReserve(
        pb.QuoteReserveRequest(user_id="qf", estimated_tokens=721, monthly_quota=1000),
        metadata=AUTH,
    )
    assert (over.required_tokens, over.within_quota) == (902, False)
