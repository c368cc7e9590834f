"""A charge the ledger did not confirm is applied exactly once: the ledger answers a Settle with
INTERNAL, UNKNOWN, CANCELLED, UNAVAILABLE or DEADLINE_EXCEEDED (having applied it or not: the
answer may be lost on the way back); the gateway queues it, is restarted while the ledger still
fails, and delivers it after the restart."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from shared.gen.rpcai.gateway.v1 import gateway_pb2 as gpb
from tests.conftest import LedgerHarness
from tests.e2e.e2e_support import (
    Sim,
    assert_audit_ok,
    charge_for,
    fetchval,
    gateway_on,
    own_sim,
    usage_rows,
)
from tests.e2e.ledger_proxy import Fault, LedgerProxy
from tests.ledger_service.helpers import balance, credit

__all__ = ["own_sim"]  # fixtures used by this module

CODES = [
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
]


@pytest.mark.parametrize("applied", [False, True], ids=["not-applied", "answer-lost"])
@pytest.mark.parametrize("code", CODES, ids=[c.name for c in CODES])
async def test_a_failed_settle_is_charged_once_after_a_restart(
    ledger: LedgerHarness, own_sim: Sim, tmp_path: Path, code: grpc.StatusCode, applied: bool
) -> None:
    proxy = LedgerProxy(ledger.address)
    await proxy.start()
    proxy.faults["Settle"] = Fault(code, after_forwarding=applied)
    user = ""
    try:
        async with gateway_on(
            ledger, own_sim.url, ledger_addr=proxy.address, data_dir=str(tmp_path)
        ) as stack:
            user, auth = stack.user()
            await credit(ledger.stub, user, 1000)  # 800
            reply = await stack.stub.GenerateText(
                gpb.GenerateTextRequest(content="[[usage:40,60]] hi", max_tokens=100),
                metadata=auth,
            )
            assert reply.token_usage.settlement_pending  # served, its charge queued
            assert stack.gateway.outbox.pending == 1
        # The gateway is gone (its outbox could not deliver); the ledger still fails Settle.
        assert proxy.calls["Settle"] >= 1
        proxy.faults.clear()
        async with gateway_on(
            ledger, own_sim.url, ledger_addr=proxy.address, data_dir=str(tmp_path)
        ) as again:
            assert again.gateway.outbox.pending == 1
            assert await again.gateway.outbox.drain(15)
    finally:
        await proxy.stop()
    [row] = await usage_rows(ledger, user)
    assert row.tokens_charged == charge_for(100) == 125
    b = await balance(ledger.stub, user)
    assert (b.available_tokens, b.reserved_tokens) == (800 - 125, 0)
    settled = await fetchval(
        ledger, "SELECT count(*) FROM holds WHERE user_id = $1 AND status = 'settled'", user
    )
    assert settled == 1
    await assert_audit_ok(ledger)
