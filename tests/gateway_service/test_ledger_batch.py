"""The gateway's ledger client batches concurrent hot-path writes (gateway_service/ledger_batch.py;
each batch a message on its ApplyBatches stream, see test_ledger_stream.py): every caller still
gets its own answer or its own error, as if it had called alone; a write whose caller is gone
before it leaves is never sent; a ledger without ApplyBatch is called one write at a time;
UNAVAILABLE is retried per write, as gRPC's retry policy does for a lone call; a batch past its
deadline is a non-definitive failure.

A real ledger serves every test; where one needs it to misbehave (an older version without
ApplyBatch, a slow or failing batch, a write answered UNAVAILABLE), the e2e ledger proxy stands in
front of it and changes only that."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from gateway_service.errors import Failure
from gateway_service.ledger_client import LedgerClient, LedgerError, is_definitive
from shared.gen.rpcai.ledger.v1 import ledger_pb2 as pb
from tests.conftest import SERVICE_TOKEN, LedgerHarness
from tests.e2e.ledger_proxy import Fault, LedgerProxy
from tests.ledger_service.helpers import balance, credit, new_key, usage


def _reserve(user: str, estimated: int = 100) -> pb.ReserveRequest:
    return pb.ReserveRequest(idempotency_key=new_key(), user_id=user, estimated_tokens=estimated)


def batch_sizes(proxy: LedgerProxy) -> list[int]:
    return [len(pb.ApplyBatchRequest.FromString(r).writes) for r in proxy.requests["ApplyBatch"]]


async def test_concurrent_writes_share_calls_and_keep_their_answers(
    ledger: LedgerHarness, proxy: LedgerProxy
) -> None:
    await credit(ledger.stub, "alice", 100_000)  # 80,000 usable
    client = LedgerClient(proxy.address, SERVICE_TOKEN, timeout=10.0)
    try:
        holds = await asyncio.gather(
            *(client.reserve(_reserve("alice", 100 + i)) for i in range(40))
        )
    finally:
        await client.close()
    # Each its own hold: estimate + ceil(25% of it).
    assert [h.reserved_tokens for h in holds] == [100 + i + -(-(100 + i) // 4) for i in range(40)]
    assert len({h.reservation_id for h in holds}) == 40
    sizes = batch_sizes(proxy)
    assert sum(sizes) == 40
    assert len(sizes) < 40  # shared calls
    assert "Reserve" not in proxy.requests or len(proxy.requests["Reserve"]) == 40
    b = await balance(ledger.stub, "alice")
    assert b.reserved_tokens == sum(h.reserved_tokens for h in holds)


async def test_one_write_at_a_time_goes_alone(ledger: LedgerHarness, proxy: LedgerProxy) -> None:
    await credit(ledger.stub, "bob", 10_000)
    client = LedgerClient(proxy.address, SERVICE_TOKEN, timeout=10.0)
    try:
        for _ in range(3):
            hold = await client.reserve(_reserve("bob"))
            await client.release(pb.ReleaseRequest(reservation_id=hold.reservation_id))
    finally:
        await client.close()
    assert batch_sizes(proxy) == [1] * 6


async def test_each_caller_gets_its_own_error(ledger: LedgerHarness) -> None:
    await credit(ledger.stub, "carol", 1000)  # 800 usable
    client = LedgerClient(ledger.address, SERVICE_TOKEN, timeout=10.0)
    try:
        results = await asyncio.gather(
            client.reserve(_reserve("carol", 400)),  # holds 500
            client.reserve(_reserve("carol", 10_000)),
            client.settle(
                pb.SettleRequest(
                    reservation_id="00000000-0000-4000-8000-000000000000", usage=usage(1, 1)
                )
            ),
            return_exceptions=True,
        )
    finally:
        await client.close()
    held, refused, unknown = results
    assert isinstance(held, pb.ReserveResponse)
    assert held.reserved_tokens == 500
    assert isinstance(refused, LedgerError)
    assert (refused.failure, refused.reason, refused.definitive) == (
        Failure.INSUFFICIENT_BALANCE,
        "INSUFFICIENT_BALANCE",
        True,
    )
    assert isinstance(unknown, LedgerError)
    assert (unknown.failure, unknown.definitive) == (Failure.NOT_FOUND, True)


async def test_a_ledger_without_apply_batch_is_called_one_write_at_a_time(
    ledger: LedgerHarness, proxy: LedgerProxy
) -> None:
    proxy.missing = {"ApplyBatches", "ApplyBatch"}  # an older ledger
    await credit(ledger.stub, "dave", 1000)
    client = LedgerClient(proxy.address, SERVICE_TOKEN, timeout=10.0)
    try:
        first, second = await asyncio.gather(
            client.reserve(_reserve("dave")), client.reserve(_reserve("dave"))
        )
        assert not client.batcher.supported
        assert not client.stream.supported
        third = await client.reserve(_reserve("dave"))
    finally:
        await client.close()
    assert {first.reserved_tokens, second.reserved_tokens, third.reserved_tokens} == {125}
    # Each asked once, then never again.
    assert (proxy.calls["ApplyBatches"], proxy.calls["ApplyBatch"]) == (1, 1)
    assert len(proxy.requests["Reserve"]) == 3  # each alone, the first two after the refusal
    assert (await balance(ledger.stub, "dave")).reserved_tokens == 375


async def test_unavailable_is_tried_again_per_write(
    ledger: LedgerHarness, proxy: LedgerProxy
) -> None:
    await credit(ledger.stub, "erin", 1000)
    proxy.faults["Reserve"] = Fault(grpc.StatusCode.UNAVAILABLE, times=2)
    client = LedgerClient(proxy.address, SERVICE_TOKEN, timeout=10.0)
    try:
        hold = await client.reserve(_reserve("erin"))
    finally:
        await client.close()
    assert hold.reserved_tokens == 125
    assert batch_sizes(proxy) == [1, 1, 1]
    assert (await balance(ledger.stub, "erin")).reserved_tokens == 125


async def test_unavailable_three_times_is_not_the_ledgers_last_word(
    ledger: LedgerHarness, proxy: LedgerProxy
) -> None:
    await credit(ledger.stub, "erin", 1000)
    proxy.faults["Settle"] = Fault(grpc.StatusCode.UNAVAILABLE)
    client = LedgerClient(proxy.address, SERVICE_TOKEN, timeout=10.0)
    try:
        hold = await client.reserve(_reserve("erin"))
        with pytest.raises(LedgerError) as caught:
            await client.settle(
                pb.SettleRequest(reservation_id=hold.reservation_id, usage=usage(1, 1))
            )
    finally:
        await client.close()
    assert caught.value.failure is Failure.UNAVAILABLE
    assert not is_definitive(caught.value)
    assert proxy.calls["Settle"] == 3


async def test_a_batch_past_its_deadline_is_not_the_ledgers_last_word(
    ledger: LedgerHarness, proxy: LedgerProxy
) -> None:
    await credit(ledger.stub, "frank", 1000)

    async def slow() -> None:
        await asyncio.sleep(5)

    proxy.before["ApplyBatch"] = slow
    client = LedgerClient(proxy.address, SERVICE_TOKEN, timeout=0.3)
    try:
        with pytest.raises(LedgerError) as caught:
            await client.reserve(_reserve("frank"))
    finally:
        await client.close()
    assert caught.value.failure is Failure.UNAVAILABLE
    assert not is_definitive(caught.value)


async def test_a_write_whose_caller_left_before_it_was_sent_is_never_sent(
    ledger: LedgerHarness, proxy: LedgerProxy
) -> None:
    await credit(ledger.stub, "gina", 1000)
    gate = asyncio.Event()

    async def opened() -> None:
        await gate.wait()

    proxy.before["ApplyBatch"] = opened
    client = LedgerClient(proxy.address, SERVICE_TOKEN, timeout=10.0)
    client.batcher.max_in_flight = 1
    try:
        first = asyncio.ensure_future(client.reserve(_reserve("gina")))
        while not proxy.calls.get("ApplyBatch"):  # the first batch is at the ledger
            await asyncio.sleep(0.01)
        second = asyncio.ensure_future(client.reserve(_reserve("gina")))
        await asyncio.sleep(0.05)  # queued behind the first
        second.cancel()
        gate.set()
        assert (await first).reserved_tokens == 125
        with pytest.raises(asyncio.CancelledError):
            await second
        third = await client.reserve(_reserve("gina"))  # the queue moves on
    finally:
        await client.close()
    assert third.reserved_tokens == 125
    assert batch_sizes(proxy) == [1, 1]
    assert (await balance(ledger.stub, "gina")).reserved_tokens == 250


async def test_a_write_on_a_closed_client_fails_instead_of_waiting_forever(
    ledger: LedgerHarness,
) -> None:
    client = LedgerClient(ledger.address, SERVICE_TOKEN, timeout=10.0)
    await client.close()
    with pytest.raises(LedgerError) as caught:
        await asyncio.wait_for(client.reserve(_reserve("hank")), 5)
    assert not is_definitive(caught.value)  # a charge behind it goes to the outbox
