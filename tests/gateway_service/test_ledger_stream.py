"""The gateway's batches travel as messages on one ApplyBatches stream
(gateway_service/ledger_stream.py): one stream carries them all; a stream refused when it opens
or failing under a batch is opened again and the batch sent again (applied once: its writes are
idempotent); a stream that keeps failing is a non-definitive failure; a ledger without
ApplyBatches gets ApplyBatch calls; a ledger shutting down ends the stream and the next batch
opens another.

A real ledger serves every test; the e2e ledger proxy stands in front of it where one needs the
stream to fail."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest

from gateway_service.errors import Failure
from gateway_service.ledger_client import LedgerClient, LedgerError, is_definitive
from shared.gen.rpcai.ledger.v1 import ledger_pb2 as pb
from tests.conftest import SERVICE_TOKEN, LedgerHarness
from tests.e2e.ledger_proxy import Fault, LedgerProxy
from tests.ledger_service.helpers import balance, credit, new_key


def _reserve(user: str, estimated: int = 100) -> pb.ReserveRequest:
    return pb.ReserveRequest(idempotency_key=new_key(), user_id=user, estimated_tokens=estimated)


@pytest.fixture
async def proxy(ledger: LedgerHarness) -> AsyncIterator[LedgerProxy]:
    front = LedgerProxy(ledger.address)
    await front.start()
    try:
        yield front
    finally:
        await front.stop()


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


async def test_a_batch_whose_stream_failed_after_applying_it_is_sent_again_and_applied_once(
    ledger: LedgerHarness, proxy: LedgerProxy
) -> None:
    await credit(ledger.stub, "carol", 1000)
    # The ledger applied the batch; the stream broke before its answer came back.
    proxy.faults["ApplyBatch"] = Fault(grpc.StatusCode.UNAVAILABLE, after_forwarding=True, times=1)
    client = LedgerClient(proxy.address, SERVICE_TOKEN, timeout=10.0)
    try:
        hold = await client.reserve(_reserve("carol"))
    finally:
        await client.close()
    assert hold.reserved_tokens == 125
    assert hold.replayed  # the second sending found the first one's hold
    assert proxy.calls["ApplyBatches"] == 2
    assert proxy.calls["Reserve"] == 2
    assert (await balance(ledger.stub, "carol")).reserved_tokens == 125


async def test_a_stream_that_keeps_failing_is_not_the_ledgers_last_word(
    ledger: LedgerHarness, proxy: LedgerProxy
) -> None:
    await credit(ledger.stub, "dave", 1000)
    proxy.faults["ApplyBatches"] = Fault(grpc.StatusCode.UNAVAILABLE)
    client = LedgerClient(proxy.address, SERVICE_TOKEN, timeout=10.0)
    try:
        with pytest.raises(LedgerError) as caught:
            await client.reserve(_reserve("dave"))
    finally:
        await client.close()
    assert caught.value.failure is Failure.UNAVAILABLE
    assert not is_definitive(caught.value)
    # Three sendings of the batch on three streams, and gRPC's own retries of each opening;
    # the write's own attempts (UNAVAILABLE is tried again per write) multiply them.
    assert proxy.calls["ApplyBatches"] >= 3
    assert "Reserve" not in proxy.calls  # never reached the ledger
    assert (await balance(ledger.stub, "dave")).reserved_tokens == 0


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
