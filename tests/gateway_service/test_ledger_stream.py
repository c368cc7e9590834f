"""The gateway's batches travel as messages on one ApplyBatches stream
(gateway_service/ledger_stream.py): one stream carries them all; a stream refused when it opens,
failing under a batch or ending cleanly before reading it is opened again and the batch sent again
(applied once: its writes are idempotent); a stream that keeps failing, fails for any reason, or
is closed under a batch is a non-definitive failure; a ledger without ApplyBatches gets
ApplyBatch calls; a ledger shutting down ends the stream and the next batch opens another.

A real ledger serves every test; the e2e ledger proxy stands in front of it where one needs the
stream to fail."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from gateway_service.errors import Failure
from gateway_service.ledger_client import LedgerClient, LedgerError, is_definitive
from shared.gen.rpcai.ledger.v1 import ledger_pb2 as pb
from tests.conftest import AUTH, SERVICE_TOKEN, LedgerHarness
from tests.e2e.ledger_proxy import Fault, LedgerProxy
from tests.ledger_service.helpers import (
    balance,
    credit,
    holds_of_key,
    lock_account,
    new_key,
    until_a_write_waits_for_a_lock,
)


def _reserve(user: str, estimated: int = 100) -> pb.ReserveRequest:
    return pb.ReserveRequest(idempotency_key=new_key(), user_id=user, estimated_tokens=estimated)


async def test_every_batch_travels_on_one_stream(ledger: LedgerHarness, proxy: LedgerProxy) -> None:
    await credit(ledger.stub, "alice", 10_000)
    client = LedgerClient(proxy.address, SERVICE_TOKEN, timeout=10.0)
    try:
        holds = [await client.reserve(_reserve("alice", 100 + i)) for i in range(5)]
        holds += await asyncio.gather(*(client.reserve(_reserve("alice", 100)) for _ in range(5)))
    finally:
        await client.close()
    assert [h.reserved_tokens for h in holds[:5]] == [125, 127, 128, 129, 130]
    assert [h.reserved_tokens for h in holds[5:]] == [125] * 5
    assert proxy.calls["ApplyBatches"] == 1
    assert proxy.calls["Reserve"] == 10
    assert (await balance(ledger.stub, "alice")).reserved_tokens == 1264


async def test_a_stream_refused_when_it_opens_is_opened_again(
    ledger: LedgerHarness, proxy: LedgerProxy
) -> None:
    await credit(ledger.stub, "bob", 1000)
    proxy.faults["ApplyBatches"] = Fault(grpc.StatusCode.UNAVAILABLE, times=1)
    client = LedgerClient(proxy.address, SERVICE_TOKEN, timeout=10.0)
    try:
        hold = await client.reserve(_reserve("bob"))
    finally:
        await client.close()
    assert hold.reserved_tokens == 125
    assert proxy.calls["ApplyBatches"] == 2
    assert client.stream.supported


# Each test below first has one batch answered on the stream: gRPC then no longer replays the
# stream by itself (its retry policy stops at the first answer), so what follows is the client's.


async def test_a_batch_whose_stream_failed_after_applying_it_is_sent_again_and_applied_once(
    ledger: LedgerHarness, proxy: LedgerProxy
) -> None:
    await credit(ledger.stub, "carol", 1000)
    client = LedgerClient(proxy.address, SERVICE_TOKEN, timeout=10.0)
    try:
        await client.reserve(_reserve("carol"))
        # The ledger applied the batch; the stream broke before its answer came back.
        proxy.faults["ApplyBatch"] = Fault(
            grpc.StatusCode.UNAVAILABLE, after_forwarding=True, times=1
        )
        hold = await client.reserve(_reserve("carol"))
    finally:
        await client.close()
    assert hold.reserved_tokens == 125
    assert hold.replayed  # the second sending found the first one's hold
    assert proxy.calls["ApplyBatches"] == 2
    assert proxy.calls["Reserve"] == 3
    assert (await balance(ledger.stub, "carol")).reserved_tokens == 250


async def test_a_batch_left_unread_by_a_clean_end_goes_again_on_a_new_stream(
    ledger: LedgerHarness, proxy: LedgerProxy
) -> None:
    await credit(ledger.stub, "cleo", 1000)
    client = LedgerClient(proxy.address, SERVICE_TOKEN, timeout=10.0)
    try:
        await client.reserve(_reserve("cleo"))
        # The stream ends with OK and the batch was never read (a ledger shutting down).
        proxy.faults["ApplyBatch"] = Fault(grpc.StatusCode.OK, times=1)
        hold = await client.reserve(_reserve("cleo"))
    finally:
        await client.close()
    assert hold.reserved_tokens == 125
    assert not hold.replayed  # applied by its second sending only
    assert proxy.calls["ApplyBatches"] == 2
    assert proxy.calls["Reserve"] == 2
    assert (await balance(ledger.stub, "cleo")).reserved_tokens == 250


async def test_a_closing_client_fails_the_batches_on_its_stream_instead_of_leaving_them(
    ledger: LedgerHarness, proxy: LedgerProxy
) -> None:
    await credit(ledger.stub, "cody", 1000)
    held = asyncio.Event()

    async def hold_forever() -> None:
        held.set()
        await asyncio.sleep(3600)

    client = LedgerClient(proxy.address, SERVICE_TOKEN, timeout=30.0)
    await client.reserve(_reserve("cody"))
    proxy.before["ApplyBatch"] = hold_forever
    waiting = asyncio.ensure_future(client.reserve(_reserve("cody")))
    await asyncio.wait_for(held.wait(), 10)
    await asyncio.wait_for(client.close(), 10)
    with pytest.raises(LedgerError) as caught:
        await asyncio.wait_for(waiting, 10)
    assert not is_definitive(caught.value)  # a charge behind it would go to the outbox


async def test_a_stream_that_keeps_failing_is_not_the_ledgers_last_word(
    ledger: LedgerHarness, proxy: LedgerProxy
) -> None:
    await credit(ledger.stub, "dave", 1000)
    client = LedgerClient(proxy.address, SERVICE_TOKEN, timeout=10.0)
    try:
        await client.reserve(_reserve("dave"))
        proxy.faults["ApplyBatch"] = Fault(grpc.StatusCode.UNAVAILABLE)
        with pytest.raises(LedgerError) as caught:
            await client.reserve(_reserve("dave"))
    finally:
        await client.close()
    assert caught.value.failure is Failure.UNAVAILABLE
    assert not is_definitive(caught.value)
    # Sent on three streams (the first committed; gRPC may replay the fresh ones itself).
    assert proxy.calls["ApplyBatches"] >= 3
    assert proxy.calls["Reserve"] == 1  # only the first batch reached the ledger
    assert (await balance(ledger.stub, "dave")).reserved_tokens == 125


async def test_a_stream_refused_for_a_reason_about_a_request_is_not_the_ledgers_last_word(
    ledger: LedgerHarness, proxy: LedgerProxy
) -> None:
    """A stream's status says nothing certain about a batch on it (it may have been applied)."""
    await credit(ledger.stub, "dora", 1000)
    client = LedgerClient(proxy.address, SERVICE_TOKEN, timeout=10.0)
    try:
        await client.reserve(_reserve("dora"))
        proxy.faults["ApplyBatch"] = Fault(
            grpc.StatusCode.FAILED_PRECONDITION, after_forwarding=True, times=1
        )
        with pytest.raises(LedgerError) as caught:
            await client.reserve(_reserve("dora"))
    finally:
        await client.close()
    assert not is_definitive(caught.value)  # as a call would be, FAILED_PRECONDITION is final


async def test_a_ledger_without_apply_batches_gets_apply_batch_calls(
    ledger: LedgerHarness, proxy: LedgerProxy
) -> None:
    proxy.missing = {"ApplyBatches"}  # the ledger before streams
    await credit(ledger.stub, "erin", 1000)
    client = LedgerClient(proxy.address, SERVICE_TOKEN, timeout=10.0)
    try:
        first = await client.reserve(_reserve("erin"))
        assert not client.stream.supported
        second = await client.reserve(_reserve("erin"))
    finally:
        await client.close()
    assert (first.reserved_tokens, second.reserved_tokens) == (125, 125)
    assert proxy.calls["ApplyBatches"] == 1  # asked once, then never again
    assert proxy.calls["ApplyBatch"] == 2
    assert client.batcher.supported


async def test_a_ledger_shutting_down_ends_the_stream_and_the_next_batch_opens_another(
    ledger: LedgerHarness,
) -> None:
    await credit(ledger.stub, "frank", 1000)
    client = LedgerClient(ledger.address, SERVICE_TOKEN, timeout=10.0)
    try:
        await client.reserve(_reserve("frank"))
        assert client.stream.open
        ledger.app.grpc.draining.set()  # what the ledger's shutdown begins with
        async with asyncio.timeout(10):
            while client.stream.open:
                await asyncio.sleep(0.01)
        ledger.app.grpc.draining.clear()  # (a new ledger took its place)
        hold = await client.reserve(_reserve("frank"))
        assert client.stream.open
    finally:
        await client.close()
    assert hold.reserved_tokens == 125
    assert (await balance(ledger.stub, "frank")).reserved_tokens == 250


@pytest.mark.parametrize("kind", ["stream", "unary"])
async def test_a_reserve_its_caller_gave_up_on_before_the_ledger_began_it_holds_nothing(
    one_batch_ledger: LedgerHarness, kind: str
) -> None:
    # The first batch is held up on a row this test locks, so the client's Reserve waits for its
    # turn past the client's deadline. Applied after that, its hold would keep erin's tokens for
    # its whole TTL: the gateway took the outcome for unknown and has no hold id to release.
    ledger = one_batch_ledger
    await credit(ledger.stub, "stuck", 1000)
    await credit(ledger.stub, "erin", 1000)
    client = LedgerClient(ledger.address, SERVICE_TOKEN, timeout=0.5)
    if kind == "unary":
        client.stream.supported = False  # ApplyBatch calls, under gRPC's own deadline
    lock = await lock_account(ledger, "stuck")
    stuck = asyncio.ensure_future(ledger.stub.Reserve(_reserve("stuck"), metadata=AUTH))
    late = _reserve("erin")
    try:
        await until_a_write_waits_for_a_lock(ledger)
        with pytest.raises(LedgerError) as caught:
            await client.reserve(late)
        await lock.close()
        assert (await stuck).reserved_tokens == 125
    finally:
        stuck.cancel()
        await lock.close()
        await client.close()
    assert not is_definitive(caught.value)
    assert await holds_of_key(ledger, late.idempotency_key) == 0
    assert (await balance(ledger.stub, "erin")).reserved_tokens == 0
