"""The audit recomputes every balance from the journal: it passes on a busy, consistent ledger and
catches every kind of tampering done behind the ledger's back; `python -m ledger_service audit`
says so on stdout and in its exit status."""

from __future__ import annotations

import asyncio
import os
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import asyncpg
import pytest

from ledger_service.audit import AuditReport, run_audit
from shared.gen.rpcai.ledger.v1 import ledger_pb2 as pb
from shared.gen.rpcai.ledger.v1 import ledger_pb2_grpc
from tests.conftest import AUTH, LedgerHarness

ROOT = Path(__file__).resolve().parents[2]

SUMS_TO_ZERO = "every journal transaction sums to zero"
CACHED_BALANCE = "every user's cached balance equals the sum of its entries"
RESERVED = "every user's reserved tokens equal their open holds"
JOURNALED_ONCE = "every purchase is journaled exactly once"
SETTLED_ONCE = "every hold is settled at most once"
ROLLED_DAYS = "every rolled day of the analytics rollup holds exactly its usage records"
ROLLED_MONTHS = "every rolled month of the analytics rollup holds exactly its days"


if TYPE_CHECKING:
    Stub = ledger_pb2_grpc.LedgerServiceAsyncStub


def new_key(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4()}"


async def credit(stub: Stub, user: str, tokens: int) -> pb.CreditPurchaseResponse:
    request = pb.CreditPurchaseRequest(
        idempotency_key=new_key("buy"),
        user_id=user,
        tokens_purchased=tokens,
        purchase_type=pb.PURCHASE_TYPE_ONE_TIME,
        external_id=new_key("order"),
        source="test",
    )
    return await stub.CreditPurchase(request, metadata=AUTH)


async def reserve(stub: Stub, user: str, estimated: int) -> pb.ReserveResponse:
    request = pb.ReserveRequest(
        idempotency_key=new_key("hold"), user_id=user, estimated_tokens=estimated
    )
    return await stub.Reserve(request, metadata=AUTH)


async def settle(stub: Stub, reservation_id: str, used_in: int, used_out: int) -> None:
    usage = pb.Usage(provider="anthropic", model="m", input_tokens=used_in, output_tokens=used_out)
    await stub.Settle(pb.SettleRequest(reservation_id=reservation_id, usage=usage), metadata=AUTH)


async def release(stub: Stub, reservation_id: str) -> None:
    await stub.Release(pb.ReleaseRequest(reservation_id=reservation_id), metadata=AUTH)


@dataclass
class Activity:
    user: str
    purchase_id: str
    open_hold: str
    settled_hold: str


async def consistent_activity(harness: LedgerHarness, user: str) -> Activity:
    """Every kind of operation once, for one user, leaving one hold open."""
    stub = harness.stub
    bought = await credit(stub, user, 1000)  # 800 usable
    await credit(stub, user, 999)  # 799 usable
    settled = await reserve(stub, user, 100)
    await settle(stub, settled.reservation_id, 40, 60)  # 125 charged
    released = await reserve(stub, user, 50)
    await release(stub, released.reservation_id)
    beyond = await reserve(stub, user, 10)
    await settle(stub, beyond.reservation_id, 30, 30)  # 75 owed, 13 held: more from the balance
    expired = await reserve(stub, user, 20)
    conn = await harness.db()
    try:
        await conn.execute(
            "UPDATE holds SET expires_at = now() - interval '1 second' WHERE id = $1",
            uuid.UUID(expired.reservation_id),
        )
    finally:
        await conn.close()
    assert await harness.app.ledger.sweep_expired(100) == 1
    await settle(stub, expired.reservation_id, 5, 5)  # late settle, after expiry
    await stub.RefundPurchase(
        pb.RefundPurchaseRequest(
            idempotency_key=new_key("refund"), purchase_id=bought.purchase_id, tokens_to_refund=333
        ),
        metadata=AUTH,
    )
    await stub.RecordUsage(
        pb.RecordUsageRequest(
            idempotency_key=new_key("byok"),
            user_id=f"{user}-byok",
            user_type=pb.USER_TYPE_BYOK,
            usage=pb.Usage(provider="openai", model="gpt", input_tokens=5, output_tokens=5),
        ),
        metadata=AUTH,
    )
    still_open = await reserve(stub, user, 30)
    return Activity(user, bought.purchase_id, still_open.reservation_id, settled.reservation_id)


async def spend_everything(stub: Stub, user: str) -> None:
    """A user who spends more than the balance holds (unbilled usage), then is refunded after
    the tokens were spent (a shortfall on the receivable)."""
    bought = await credit(stub, user, 100)  # 80 usable
    hold = await reserve(stub, user, 40)  # holds 50
    await settle(stub, hold.reservation_id, 40, 40)  # 100 owed: 50 + the 30 left, 20 unbilled
    await stub.RefundPurchase(
        pb.RefundPurchaseRequest(idempotency_key=new_key("refund"), purchase_id=bought.purchase_id),
        metadata=AUTH,
    )


def assert_only(report: AuditReport, check: str, subject: str) -> None:
    assert not report.ok
    assert set(report.violations) == {check}, report.render()
    assert subject in [row[0] for row in report.violations[check]], report.render()
    assert f"VIOLATION: {check}" in report.render()
    assert report.render().endswith("audit: FAILED")


# --- a consistent ledger -----------------------------------------------------------------------


async def test_audit_passes_on_a_busy_consistent_ledger(ledger: LedgerHarness) -> None:
    users = [f"busy-{i}" for i in range(6)]
    for user in users[:3]:
        await consistent_activity(ledger, user)
    await spend_everything(ledger.stub, "spender")

    # More traffic in flight while the audit runs, many times over: its one snapshot must never
    # see half an operation.
    async def traffic(user: str) -> None:
        await credit(ledger.stub, user, 5000)
        for _ in range(8):
            hold = await reserve(ledger.stub, user, 100)
            await settle(ledger.stub, hold.reservation_id, 50, 7)

    async def audits() -> list[AuditReport]:
        reports = []
        for _ in range(8):
            reports.append(await run_audit(ledger.database_url))
            await asyncio.sleep(0)
        return reports

    auditing = asyncio.create_task(audits())
    await asyncio.gather(*(traffic(u) for u in users[3:]))
    for report in await auditing:
        assert report.ok, report.render()

    report = await run_audit(ledger.database_url)
    assert report.ok, report.render()
    assert report.render().endswith("audit: OK")
    assert "VIOLATION" not in report.render()
    assert report.users == len(users) + 1  # BYOK users get no account
    balances = report.platform_balances
    # Fees earned, the shortfall booked on the receivable, usage nobody could pay unbilled.
    assert balances["purchase_fee"] > 0
    assert balances["usage_fee"] > 0
    assert balances["refund_receivable"] == -80
    assert balances["unbilled_usage"] == -20
    conn = await ledger.db()
    try:
        users_total = await conn.fetchval(
            "SELECT sum(available + reserved) FROM accounts WHERE user_id IS NOT NULL"
        )
        transactions = await conn.fetchval("SELECT count(*) FROM journal_transactions")
    finally:
        await conn.close()
    assert users_total + sum(balances.values()) == 0
    assert report.transactions == transactions


async def test_audit_of_an_empty_ledger_is_ok(ledger: LedgerHarness) -> None:
    report = await run_audit(ledger.database_url)
    assert report.ok, report.render()
    assert (report.users, report.transactions) == (0, 0)
    assert set(report.platform_balances.values()) == {0}


# --- tampering ---------------------------------------------------------------------------------


@pytest.fixture
async def tampered(ledger: LedgerHarness) -> tuple[LedgerHarness, Activity, asyncpg.Connection]:
    activity = await consistent_activity(ledger, "victim")
    await consistent_activity(ledger, "bystander")
    assert (await run_audit(ledger.database_url)).ok
    conn = await ledger.db()
    return ledger, activity, conn


Tampered = tuple[LedgerHarness, Activity, asyncpg.Connection]


async def test_detects_a_cached_balance_changed_behind_the_ledgers_back(tampered: Tampered) -> None:
    ledger, activity, conn = tampered
    try:
        await conn.execute(
            "UPDATE accounts SET available = available + 7 WHERE user_id = $1", activity.user
        )
    finally:
        await conn.close()
    assert_only(await run_audit(ledger.database_url), CACHED_BALANCE, activity.user)


async def test_detects_a_cached_balance_moved_between_available_and_reserved(
    tampered: Tampered,
) -> None:
    # The total still equals the entries; only the holds tell that 1 token was freed.
    ledger, activity, conn = tampered
    try:
        await conn.execute(
            "UPDATE accounts SET available = available + 1, reserved = reserved - 1"
            " WHERE user_id = $1",
            activity.user,
        )
    finally:
        await conn.close()
    assert_only(await run_audit(ledger.database_url), RESERVED, activity.user)


async def test_detects_an_unbalanced_journal_transaction(tampered: Tampered) -> None:
    ledger, _, conn = tampered
    try:
        tx = await conn.fetchval(
            "INSERT INTO journal_transactions (kind, user_id) VALUES ('forged', 'forger')"
            " RETURNING id"
        )
        # 500 fee tokens from nowhere, on a platform account (no cached balance to disagree).
        await conn.execute(
            "INSERT INTO journal_entries (user_id, transaction_id, account_id, amount)"
            " VALUES ('forger', $1, 2, 500)",
            tx,
        )
    finally:
        await conn.close()
    assert_only(await run_audit(ledger.database_url), SUMS_TO_ZERO, str(tx))


async def test_detects_a_hold_whose_amount_does_not_match_the_reserved_balance(
    tampered: Tampered,
) -> None:
    ledger, activity, conn = tampered
    try:
        await conn.execute(
            "UPDATE holds SET amount = amount + 1 WHERE id = $1", uuid.UUID(activity.open_hold)
        )
    finally:
        await conn.close()
    assert_only(await run_audit(ledger.database_url), RESERVED, activity.user)


async def test_detects_a_hold_reopened_behind_the_ledgers_back(tampered: Tampered) -> None:
    ledger, activity, conn = tampered
    try:
        await conn.execute(
            "UPDATE holds SET status = 'held' WHERE id = $1", uuid.UUID(activity.settled_hold)
        )
    finally:
        await conn.close()
    assert_only(await run_audit(ledger.database_url), RESERVED, activity.user)


async def test_detects_a_purchase_that_was_never_journaled(tampered: Tampered) -> None:
    ledger, activity, conn = tampered
    forged = uuid.uuid4()
    try:
        await conn.execute(
            """INSERT INTO purchases (id, user_id, account_id, purchase_type, tokens_purchased,
                                      tokens_credited, platform_fee_tokens, source, external_id,
                                      request_hash, user_share_percent)
               SELECT $1, user_id, id, 'one_time', 100, 80, 20, 'forged', 'x', '\\x00', 80
                 FROM accounts WHERE user_id = $2""",
            forged,
            activity.user,
        )
    finally:
        await conn.close()
    assert_only(await run_audit(ledger.database_url), JOURNALED_ONCE, str(forged))


async def test_detects_a_hold_settled_twice(tampered: Tampered) -> None:
    ledger, activity, conn = tampered
    try:
        # A balanced second usage posting for an already settled hold.
        tx = await conn.fetchval(
            "INSERT INTO journal_transactions (kind, user_id, hold_id) VALUES ('usage', $1, $2)"
            " RETURNING id",
            activity.user,
            uuid.UUID(activity.settled_hold),
        )
        await conn.execute(
            "INSERT INTO journal_entries (user_id, transaction_id, account_id, amount)"
            " VALUES ($2, $1, 3, 4), ($2, $1, 4, 1), ($2, $1, 6, -5)",
            tx,
            activity.user,
        )
    finally:
        await conn.close()
    assert_only(await run_audit(ledger.database_url), SETTLED_ONCE, activity.settled_hold)


# --- the command -------------------------------------------------------------------------------


async def run_audit_command(database_url: str) -> tuple[int, str]:
    env = {**os.environ, "DATABASE_URL": database_url, "LOG_LEVEL": "WARNING"}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "ledger_service",
        "audit",
        cwd=ROOT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode is not None
    return process.returncode, output.decode()


async def test_audit_command_exit_status_and_output(tampered: Tampered) -> None:
    ledger, activity, conn = tampered
    code, output = await run_audit_command(ledger.database_url)
    assert code == 0, output
    assert "audit: OK" in output
    assert "VIOLATION" not in output

    try:
        await conn.execute(
            "UPDATE accounts SET available = available - 3 WHERE user_id = $1", activity.user
        )
    finally:
        await conn.close()
    code, output = await run_audit_command(ledger.database_url)
    assert code != 0, output
    assert f"VIOLATION: {CACHED_BALANCE}" in output
    assert activity.user in output
    assert "audit: FAILED" in output


async def test_detects_usage_recorded_into_a_day_the_rollup_already_took(
    tampered: Tampered,
) -> None:
    """The analytics rollup is checked against the records: a call that lands in a rolled day
    (it would be missing from the figures) is reported, and so is a month that is not its days."""
    ledger, _, conn = tampered
    try:
        await conn.execute("UPDATE usage_records SET created_at = created_at - interval '40 days'")
        while await ledger.app.ledger.rollup_usage():
            pass
        assert (await run_audit(ledger.database_url)).ok
        late = await conn.fetchval(
            "UPDATE usage_records SET created_at = created_at - interval '1 day'"
            " WHERE ctid = (SELECT min(ctid) FROM usage_records) RETURNING created_at"
        )
        report = await run_audit(ledger.database_url)
        assert_only(report, ROLLED_DAYS, str(late.date()))
        # Put back, the month is doctored instead.
        await conn.execute(
            "UPDATE usage_records SET created_at = created_at + interval '1 day'"
            " WHERE created_at = $1",
            late,
        )
        assert (await run_audit(ledger.database_url)).ok
        month = await conn.fetchval(
            "UPDATE usage_monthly SET requests = requests + 1"
            " WHERE ctid = (SELECT min(ctid) FROM usage_monthly) RETURNING month"
        )
    finally:
        await conn.close()
    assert_only(await run_audit(ledger.database_url), ROLLED_MONTHS, str(month))
