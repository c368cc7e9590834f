"""A settle the ledger refuses for good, after the provider answered, is kept for an operator:

The ledger answers a Settle with FAILED_PRECONDITION or INVALID_ARGUMENT (its definitive word, not
applied). The caller was served; the gateway logs an ERROR naming the reason, keeps the settle in
its outbox marked refused (on disk, across a restart), and neither retries it forever nor drops
it. The hold is not given up meanwhile (no release): it still stands, and the kept record names
it with the call's full usage, so an operator replaying it charges the call exactly once.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from shared.gen.rpcai.gateway.v1 import gateway_pb2 as gpb
from shared.gen.rpcai.ledger.v1 import ledger_pb2 as lpb
from tests.conftest import AUTH, LedgerHarness
from tests.e2e.e2e_support import (
    Sim,
    assert_audit_ok,
    charge_for,
    fetchval,
    gateway_on,
    held_for,
    own_sim,
    usage_rows,
)
from tests.e2e.ledger_proxy import Fault, LedgerProxy
from tests.ledger_service.helpers import balance, credit

__all__ = ["own_sim"]  # fixtures used by this module

CODES = [grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.INVALID_ARGUMENT]
CONTENT = "[[usage:40,60]] hi"
MAX_TOKENS = 100
OUTBOX_FILE = "gateway-outbox.sqlite3"


@dataclass(frozen=True)
class KeptJob:
    method: str
    payload: bytes
    refused: str | None
    attempts: int


def _jobs(data_dir: Path) -> list[KeptJob]:
    """The outbox's own file, read as an operator would."""
    db = sqlite3.connect(data_dir / OUTBOX_FILE)
    try:
        rows = db.execute("SELECT method, payload, refused, attempts FROM jobs").fetchall()
    finally:
        db.close()
    return [KeptJob(r[0], bytes(r[1]), r[2], r[3]) for r in rows]


async def _hold(ledger: LedgerHarness, user: str) -> tuple[str, str, int]:
    conn = await ledger.db()
    try:
        [row] = await conn.fetch("SELECT id, status, amount FROM holds WHERE user_id = $1", user)
    finally:
        await conn.close()
    return str(row["id"]), row["status"], row["amount"]


def _refusals_logged(caplog: pytest.LogCaptureFixture, code: grpc.StatusCode) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.ERROR and "settle" in r.getMessage() and code.name in r.getMessage()
    ]


@pytest.mark.parametrize("code", CODES, ids=[c.name for c in CODES])
async def test_a_settle_the_ledger_refuses_is_kept_logged_and_not_retried(
    ledger: LedgerHarness,
    own_sim: Sim,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    code: grpc.StatusCode,
) -> None:
    caplog.set_level(logging.ERROR)
    proxy = LedgerProxy(ledger.address)
    await proxy.start()
    proxy.faults["Settle"] = Fault(code)  # every Settle refused, never applied
    try:
        async with gateway_on(
            ledger, own_sim.url, ledger_addr=proxy.address, data_dir=str(tmp_path)
        ) as stack:
            user, auth = stack.user()
            await credit(ledger.stub, user, 1000)  # 800 usable
            reply = await stack.stub.GenerateText(
                gpb.GenerateTextRequest(content=CONTENT, max_tokens=MAX_TOKENS), metadata=auth
            )
            # The caller was served; its charge did not land and says so.
            assert reply.text
            assert (reply.usage.input_tokens, reply.usage.output_tokens) == (40, 60)
            assert reply.token_usage.settlement_pending
            assert reply.token_usage.tokens_charged == 0
            assert proxy.calls["Settle"] == 1

            # An ERROR line names the reason; the settle is kept, not queued for retries.
            assert len(_refusals_logged(caplog, code)) == 1, caplog.text
            outbox = stack.gateway.outbox
            assert (outbox.pending, outbox.refused) == (0, 1)
            # Not retried: the outbox would have tried many times by now (0.2 s backoff).
            await asyncio.sleep(3)
            assert proxy.calls["Settle"] == 1
            assert (outbox.pending, outbox.refused) == (0, 1)
            assert proxy.calls.get("Release", 0) == 0  # the hold was not given up either

        # The gateway is gone; its refused settle is on disk, naming the hold and the usage.
        hold_id, status, amount = await _hold(ledger, user)
        assert (status, amount) == ("held", held_for(CONTENT, MAX_TOKENS))
        b = await balance(ledger.stub, user)
        assert (b.available_tokens, b.reserved_tokens) == (800 - amount, amount)
        [job] = _jobs(tmp_path)
        assert (job.method, job.refused, job.attempts) == ("Settle", code.name, 0)
        kept = lpb.SettleRequest.FromString(job.payload)
        assert (kept.reservation_id, kept.user_id) == (hold_id, user)
        assert (kept.usage.input_tokens, kept.usage.output_tokens) == (40, 60)

        # A restart keeps it, says so at ERROR, and still does not send it again.
        caplog.clear()
        async with gateway_on(
            ledger, own_sim.url, ledger_addr=proxy.address, data_dir=str(tmp_path)
        ) as again:
            assert (again.gateway.outbox.pending, again.gateway.outbox.refused) == (0, 1)
            assert any(
                r.levelno == logging.ERROR and "refused" in r.getMessage() for r in caplog.records
            ), caplog.text
            await asyncio.sleep(1)
            assert proxy.calls["Settle"] == 1
        assert len(_jobs(tmp_path)) == 1
    finally:
        await proxy.stop()

    # The operator replays the kept settle once the cause is fixed: charged exactly once.
    settled: lpb.SettleResponse = await ledger.stub.Settle(kept, metadata=AUTH)
    assert settled.tokens_charged == charge_for(100) == 125
    assert settled.overrun_tokens == 0
    b = await balance(ledger.stub, user)
    assert (b.available_tokens, b.reserved_tokens) == (800 - 125, 0)
    assert (await _hold(ledger, user))[1] == "settled"
    [row] = await usage_rows(ledger, user)
    assert (row.input_tokens, row.output_tokens, row.tokens_charged) == (40, 60, 125)
    unbilled = await fetchval(
        ledger, "SELECT coalesce(sum(amount), 0) FROM journal_entries WHERE account_id = 6"
    )
    assert unbilled == 0
    await assert_audit_ok(ledger)
