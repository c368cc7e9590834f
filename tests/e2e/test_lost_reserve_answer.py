"""A Reserve the ledger applied but whose answer never reached the gateway (each attempt's answer
lost on the way back) fails its call with UNAVAILABLE and leaves a hold nothing would settle.
When the key is the gateway's own (the caller gave none), the gateway asks again with the same
request once the ledger answers and releases that hold at once, instead of leaving the user's
tokens held for the hold's whole TTL. Under a key the caller chose it does not: the caller's
retry with that key may have made the hold anew and be serving on it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from prometheus_client import REGISTRY

from shared.gen.rpcai.gateway.v1 import gateway_pb2 as gpb
from tests.conftest import LedgerHarness
from tests.e2e.conftest import Stack
from tests.e2e.e2e_support import (
    Sim,
    assert_audit_ok,
    fetchval,
    gateway_on,
    own_sim,
    usage_rows,
)
from tests.e2e.ledger_proxy import Fault, LedgerProxy
from tests.ledger_service.helpers import balance, credit

__all__ = ["own_sim"]  # fixtures used by this module

ANSWER_LOST = Fault(grpc.StatusCode.UNAVAILABLE, after_forwarding=True)


def _lost_holds(outcome: str) -> float:
    labels = {"outcome": outcome}
    return REGISTRY.get_sample_value("rpcai_gateway_lost_reserve_holds_total", labels) or 0.0


async def _held(ledger: LedgerHarness, user: str) -> int:
    return (await balance(ledger.stub, user)).reserved_tokens


@dataclass
class LostHold:
    stack: Stack
    user: str
    auth: tuple[tuple[str, str]]
    held: int


@asynccontextmanager
async def _call_whose_reserve_answer_is_lost(
    ledger: LedgerHarness, own_sim: Sim, tmp_path: Path, request: gpb.GenerateTextRequest
) -> AsyncIterator[LostHold]:
    """A gateway whose ledger applies `request`'s Reserve but loses every answer: the call fails
    with UNAVAILABLE, its hold made. Then the ledger answers again."""
    async with (
        LedgerProxy(ledger.address) as proxy,
        gateway_on(ledger, own_sim.url, ledger_addr=proxy.address, data_dir=str(tmp_path)) as stack,
    ):
        proxy.faults["Reserve"] = ANSWER_LOST
        user, auth = stack.user()
        await credit(ledger.stub, user, 1000)  # 800 usable
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stack.stub.GenerateText(request, metadata=auth)
        assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
        held = await _held(ledger, user)
        assert held > 0  # made by the attempts whose answers were lost
        proxy.faults.clear()
        yield LostHold(stack, user, auth, held)


async def test_a_hold_whose_answer_was_lost_is_released_once_the_ledger_answers(
    ledger: LedgerHarness, own_sim: Sim, tmp_path: Path
) -> None:
    request = gpb.GenerateTextRequest(content="hi", max_tokens=100)
    released = _lost_holds("released")
    async with _call_whose_reserve_answer_is_lost(ledger, own_sim, tmp_path, request) as lost:
        async with asyncio.timeout(20):
            while await _held(ledger, lost.user):
                await asyncio.sleep(0.05)
    assert _lost_holds("released") == released + 1
    b = await balance(ledger.stub, lost.user)
    assert (b.available_tokens, b.reserved_tokens) == (800, 0)
    statuses = await fetchval(
        ledger, "SELECT array_agg(status::text) FROM holds WHERE user_id = $1", lost.user
    )
    assert statuses == ["released"]  # the one hold the retried attempts shared, released
    assert await usage_rows(ledger, lost.user) == []
    await assert_audit_ok(ledger)


async def test_a_hold_under_the_callers_key_is_left_to_the_caller(
    ledger: LedgerHarness, own_sim: Sim, tmp_path: Path
) -> None:
    request = gpb.GenerateTextRequest(content="hi", max_tokens=100, idempotency_key="call-1")
    async with _call_whose_reserve_answer_is_lost(ledger, own_sim, tmp_path, request) as lost:
        # Longer than the gateway takes to release a hold of its own key (the test above).
        await asyncio.sleep(1.5)
        assert await _held(ledger, lost.user) == lost.held
        # The caller's retry finds its hold and is told the call is still running (until the
        # hold resolves), never served a second time on it.
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await lost.stack.stub.GenerateText(request, metadata=lost.auth)
        assert caught.value.code() is grpc.StatusCode.ALREADY_EXISTS
    assert await _held(ledger, lost.user) == lost.held
    assert await usage_rows(ledger, lost.user) == []
    await assert_audit_ok(ledger)
