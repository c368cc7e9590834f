"""A Reserve the ledger applied but whose answer never reached the gateway (each attempt's answer
lost on the way back) fails its call with UNAVAILABLE and leaves a hold nothing would settle.
The gateway asks again with the same request once the ledger answers and releases that hold at
once, instead of leaving the user's tokens held for the hold's whole TTL (and, under the
caller's idempotency key, the caller's retries told REQUEST_IN_PROGRESS all that time). Each
Reserve names its attempt, and a replay the attempt that made the hold: under the caller's key,
a hold the caller's retry made (and is serving on) is left to it. A lost answer that a
transport retry of the same attempt recovers serves the call on the hold that attempt made."""

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
from shared.gen.rpcai.ledger.v1 import ledger_pb2 as lpb
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
NEVER_SENT = Fault(grpc.StatusCode.UNAVAILABLE)


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
    proxy: LedgerProxy


@asynccontextmanager
async def _call_whose_reserve_answer_is_lost(
    ledger: LedgerHarness,
    own_sim: Sim,
    tmp_path: Path,
    request: gpb.GenerateTextRequest,
    fault: Fault = ANSWER_LOST,
) -> AsyncIterator[LostHold]:
    """A gateway whose ledger applies `request`'s Reserve but loses every answer (or, with
    another `fault`, fails it otherwise): the call fails with UNAVAILABLE, its hold made (none
    when the fault keeps the Reserve from the ledger). Then the ledger answers again."""
    async with (
        LedgerProxy(ledger.address) as proxy,
        gateway_on(ledger, own_sim.url, ledger_addr=proxy.address, data_dir=str(tmp_path)) as stack,
    ):
        proxy.faults["Reserve"] = fault
        user, auth = stack.user()
        await credit(ledger.stub, user, 1000)  # 800 usable
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stack.stub.GenerateText(request, metadata=auth)
        assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
        held = await _held(ledger, user)
        assert (held > 0) is fault.after_forwarding  # made by the attempt whose answers were lost
        proxy.faults.clear()
        yield LostHold(stack, user, auth, held, proxy)


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


def _attempt(raw: bytes) -> str:
    return lpb.ReserveRequest.FromString(raw).attempt_id


async def _hold_statuses(ledger: LedgerHarness, user: str) -> list[str]:
    statuses: list[str] = await fetchval(
        ledger,
        "SELECT array_agg(status::text ORDER BY created_at) FROM holds WHERE user_id = $1",
        user,
    )
    return statuses


async def test_a_hold_under_the_callers_key_is_released_and_the_callers_retry_served(
    ledger: LedgerHarness, own_sim: Sim, tmp_path: Path
) -> None:
    request = gpb.GenerateTextRequest(
        content="hi [[usage:20,12]]", max_tokens=100, idempotency_key="call-1"
    )
    released = _lost_holds("released")
    async with _call_whose_reserve_answer_is_lost(ledger, own_sim, tmp_path, request) as lost:
        async with asyncio.timeout(20):
            while await _held(ledger, lost.user):
                await asyncio.sleep(0.05)
        assert _lost_holds("released") == released + 1
        # The caller's retry under its key: a new attempt (the released hold cost nothing),
        # served and charged once, not told REQUEST_IN_PROGRESS until the hold's TTL.
        answer = await lost.stack.stub.GenerateText(request, metadata=lost.auth)
        again = await lost.stack.stub.GenerateText(request, metadata=lost.auth)
    assert again == answer  # the stored answer, not a second call
    assert answer.token_usage.tokens_charged == 40  # 32 used + 25% fee
    b = await balance(ledger.stub, lost.user)
    assert (b.available_tokens, b.reserved_tokens) == (760, 0)
    assert await _hold_statuses(ledger, lost.user) == ["released", "settled"]
    assert len(await usage_rows(ledger, lost.user)) == 1
    await assert_audit_ok(ledger)


async def test_a_hold_the_callers_retry_made_under_its_key_is_left_to_it(
    ledger: LedgerHarness, own_sim: Sim, tmp_path: Path
) -> None:
    """The first attempt's Reserve never reaches the ledger (nor do its transport retries), so
    the hold is made by the caller's retry, which is still serving (a slow provider) when the
    first attempt's watcher asks the ledger about its key. Releasing that hold would leave the
    retry's call served and unpaid."""
    request = gpb.GenerateTextRequest(
        content="hi [[usage:20,12]] [[delay:1.5]]", max_tokens=100, idempotency_key="call-2"
    )
    others, released = _lost_holds("another_attempt"), _lost_holds("released")
    async with _call_whose_reserve_answer_is_lost(
        ledger, own_sim, tmp_path, request, NEVER_SENT
    ) as lost:
        first = _attempt(lost.proxy.requests["Reserve"][0])
        retry_holds = asyncio.Event()

        def answered(reply: lpb.ReserveResponse) -> None:
            if reply.attempt_id != first:
                retry_holds.set()

        async def before() -> None:
            # The first attempt's watcher asks only once the retry has its hold.
            if _attempt(lost.proxy.requests["Reserve"][-1]) == first:
                await retry_holds.wait()

        lost.proxy.answered["Reserve"] = answered
        lost.proxy.before["Reserve"] = before
        # The retry's provider call (1.5 s) outlasts the watcher's first pause (0.2 s).
        answer = await lost.stack.stub.GenerateText(request, metadata=lost.auth)
        assert _lost_holds("another_attempt") == others + 1
        # Three tries of the first attempt (all refused), the retry's, the watcher's.
        assert lost.proxy.calls["Reserve"] == 5
    assert _lost_holds("released") == released
    assert answer.token_usage.tokens_charged == 40
    b = await balance(ledger.stub, lost.user)
    assert (b.available_tokens, b.reserved_tokens) == (760, 0)
    assert await _hold_statuses(ledger, lost.user) == ["settled"]
    assert len(await usage_rows(ledger, lost.user)) == 1
    await assert_audit_ok(ledger)


async def test_with_a_ledger_too_old_to_name_attempts_a_hold_the_watcher_made_is_released(
    ledger: LedgerHarness, own_sim: Sim, tmp_path: Path
) -> None:
    """The first attempt's Reserve never reached the ledger, so the watcher's own ask makes the
    hold (not a replay): it is this attempt's even when the ledger (one from before attempt
    ids) does not say so, and is released, the caller's retry served."""
    request = gpb.GenerateTextRequest(
        content="hi [[usage:20,12]]", max_tokens=100, idempotency_key="call-4"
    )
    released = _lost_holds("released")
    async with _call_whose_reserve_answer_is_lost(
        ledger, own_sim, tmp_path, request, NEVER_SENT
    ) as lost:
        lost.proxy.answered["Reserve"] = lambda reply: reply.ClearField("attempt_id")
        async with asyncio.timeout(20):
            while _lost_holds("released") == released:
                await asyncio.sleep(0.05)
        answer = await lost.stack.stub.GenerateText(request, metadata=lost.auth)
    assert answer.token_usage.tokens_charged == 40
    b = await balance(ledger.stub, lost.user)
    assert (b.available_tokens, b.reserved_tokens) == (760, 0)
    assert await _hold_statuses(ledger, lost.user) == ["released", "settled"]
    await assert_audit_ok(ledger)


async def test_a_shutdown_waits_for_an_ask_on_its_way_and_releases_what_it_made(
    ledger: LedgerHarness, own_sim: Sim, tmp_path: Path
) -> None:
    """The gateway stops while the watcher's ask is on its way to the ledger (the first Reserve
    never reached it, so the ask makes the hold): the stop waits for the answer and releases
    the hold. Cut off, the ask was applied anyway and the hold stayed for its whole TTL (seen
    in the two-gateways chaos test, a killed ledger's calls' watchers asking late)."""
    request = gpb.GenerateTextRequest(content="hi", max_tokens=100)
    async with _call_whose_reserve_answer_is_lost(
        ledger, own_sim, tmp_path, request, NEVER_SENT
    ) as lost:
        asked, go = asyncio.Event(), asyncio.Event()

        async def hold_the_ask() -> None:
            asked.set()
            await go.wait()

        lost.proxy.before["Reserve"] = hold_the_ask
        await asyncio.wait_for(asked.wait(), 10)
        stopping = asyncio.create_task(lost.stack.gateway.gateway.stop_background())
        await asyncio.sleep(0.3)  # the stop is under way, the ask still held at the proxy
        go.set()
        await asyncio.wait_for(stopping, 10)
        await asyncio.sleep(0.5)  # whatever the proxy still carries reaches the ledger
        assert await _hold_statuses(ledger, lost.user) == ["released"]
        assert await _held(ledger, lost.user) == 0
    await assert_audit_ok(ledger)


async def test_a_shutdown_makes_no_new_ask(
    ledger: LedgerHarness, own_sim: Sim, tmp_path: Path
) -> None:
    """A watcher still waiting for its next ask when the gateway stops gives up at once."""
    request = gpb.GenerateTextRequest(content="hi", max_tokens=100)
    gave_up = _lost_holds("gave_up")
    async with _call_whose_reserve_answer_is_lost(
        ledger, own_sim, tmp_path, request, NEVER_SENT
    ) as lost:
        reserves = lost.proxy.calls.get("Reserve", 0)
        await asyncio.wait_for(lost.stack.gateway.gateway.stop_background(), 1)
        await asyncio.sleep(0.5)  # past the watcher's first pause
        assert lost.proxy.calls.get("Reserve", 0) == reserves
        assert _lost_holds("gave_up") == gave_up + 1
        assert await _hold_statuses(ledger, lost.user) is None  # never made
    await assert_audit_ok(ledger)


@pytest.mark.parametrize("key", ["", "call-3"], ids=["gateway-key", "caller-key"])
async def test_an_answer_a_transport_retry_recovers_serves_the_call_on_its_hold(
    ledger: LedgerHarness, own_sim: Sim, tmp_path: Path, key: str
) -> None:
    """The first answer is lost, the transport's retry of the same attempt is a replay of it:
    the hold is this attempt's own, so the call is served on it (not refused as a call still
    running, its hold left to the TTL)."""
    request = gpb.GenerateTextRequest(
        content="hi [[usage:20,12]]", max_tokens=100, idempotency_key=key
    )
    async with (
        LedgerProxy(ledger.address) as proxy,
        gateway_on(ledger, own_sim.url, ledger_addr=proxy.address, data_dir=str(tmp_path)) as stack,
    ):
        proxy.faults["Reserve"] = Fault(grpc.StatusCode.UNAVAILABLE, after_forwarding=True, times=1)
        user, auth = stack.user()
        await credit(ledger.stub, user, 1000)
        answer = await stack.stub.GenerateText(request, metadata=auth)
        assert proxy.calls["Reserve"] == 2
    assert answer.token_usage.tokens_charged == 40
    b = await balance(ledger.stub, user)
    assert (b.available_tokens, b.reserved_tokens) == (760, 0)
    assert await _hold_statuses(ledger, user) == ["settled"]
    await assert_audit_ok(ledger)
