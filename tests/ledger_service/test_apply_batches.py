"""ApplyBatches: ApplyBatch over one long-lived stream. Each message is applied as an ApplyBatch
call would apply it and answered under its batch_id; a batch refused whole is answered with the
error for each of its writes and the stream goes on; a caller without the service token is
refused when the stream opens; a shutdown answers what was read, ends the stream with OK, and
does not wait out its grace period for the stream."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from ledger_service.servicer import MAX_BATCH_WRITES
from shared.gen.rpcai.ledger.v1 import ledger_pb2 as pb
from shared.rich_errors import status_info
from tests.conftest import AUTH, LedgerHarness
from tests.ledger_service.helpers import (
    balance,
    credit,
    holds_of_key,
    lock_account,
    new_key,
    until_a_write_waits_for_a_lock,
)

Stream = grpc.aio.StreamStreamCall[pb.ApplyBatchRequest, pb.ApplyBatchResponse]


def _reserve(user: str, estimated: int, key: str | None = None) -> pb.LedgerWrite:
    return pb.LedgerWrite(
        reserve=pb.ReserveRequest(
            idempotency_key=key or new_key("hold"), user_id=user, estimated_tokens=estimated
        )
    )


def _open(ledger: LedgerHarness, metadata: tuple[tuple[str, str], ...] = AUTH) -> Stream:
    return ledger.stub.ApplyBatches(metadata=metadata)


async def _answer(call: Stream) -> pb.ApplyBatchResponse:
    response = await asyncio.wait_for(call.read(), 10)
    assert isinstance(response, pb.ApplyBatchResponse), response
    return response


async def test_each_batch_is_answered_under_its_id(ledger: LedgerHarness) -> None:
    await credit(ledger.stub, "alice", 1000)  # 800 usable
    call = _open(ledger)
    try:
        await call.write(pb.ApplyBatchRequest(batch_id=7, writes=[_reserve("alice", 80)]))
        await call.write(
            pb.ApplyBatchRequest(
                batch_id=8, writes=[_reserve("alice", 160), _reserve("alice", 10_000)]
            )
        )
        answers = {a.batch_id: a for a in [await _answer(call), await _answer(call)]}
    finally:
        call.cancel()
    assert set(answers) == {7, 8}
    assert [r.reserve.reserved_tokens for r in answers[7].results] == [100]
    first, refused = answers[8].results
    assert first.reserve.reserved_tokens == 200
    assert refused.error.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
    assert (await balance(ledger.stub, "alice")).reserved_tokens == 300


async def test_a_batch_refused_whole_is_answered_per_write_and_the_stream_goes_on(
    ledger: LedgerHarness,
) -> None:
    await credit(ledger.stub, "bob", 10**6)
    call = _open(ledger)
    try:
        too_many = [_reserve("bob", 1) for _ in range(MAX_BATCH_WRITES + 1)]
        await call.write(pb.ApplyBatchRequest(batch_id=1, writes=too_many))
        refused = await _answer(call)
        await call.write(pb.ApplyBatchRequest(batch_id=2, writes=[_reserve("bob", 80)]))
        after = await _answer(call)
    finally:
        call.cancel()
    assert refused.batch_id == 1
    assert len(refused.results) == MAX_BATCH_WRITES + 1
    for result in refused.results:
        assert result.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        info = status_info(result.error)
        assert info is not None
        assert info.reason == "INVALID_ARGUMENT"
    assert after.batch_id == 2
    assert after.results[0].reserve.reserved_tokens == 100
    assert (await balance(ledger.stub, "bob")).reserved_tokens == 100  # nothing of the first


@pytest.mark.parametrize("metadata", [(), (("authorization", "Bearer wrong"),)])
async def test_a_stream_without_the_service_token_is_refused_when_it_opens(
    ledger: LedgerHarness, metadata: tuple[tuple[str, str], ...]
) -> None:
    call = _open(ledger, metadata)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await asyncio.wait_for(call.read(), 10)  # no message sent: refused all the same
    assert caught.value.code() is grpc.StatusCode.UNAUTHENTICATED


async def test_a_shutdown_answers_what_was_read_and_ends_the_stream_at_once(
    ledger: LedgerHarness,
) -> None:
    await credit(ledger.stub, "carol", 1000)
    call = _open(ledger)
    await call.write(pb.ApplyBatchRequest(batch_id=1, writes=[_reserve("carol", 80)]))
    assert (await _answer(call)).results[0].reserve.reserved_tokens == 100
    late_key = new_key("late")
    await call.write(pb.ApplyBatchRequest(batch_id=2, writes=[_reserve("carol", 8, late_key)]))
    started = time.monotonic()
    await ledger.app.grpc.stop(grace=30)
    took = time.monotonic() - started
    # Answered if the ledger had read it, else never applied: the caller sends it again.
    answered = []
    while (message := await asyncio.wait_for(call.read(), 10)) is not grpc.aio.EOF:
        assert isinstance(message, pb.ApplyBatchResponse)
        answered.append(message)
    assert await call.code() is grpc.StatusCode.OK
    assert took < 10, f"the open stream held the shutdown for {took:.1f}s"
    connection = await ledger.db()
    try:
        holds = await connection.fetchval(
            "SELECT count(*) FROM idempotency_keys WHERE key = $1", late_key
        )
    finally:
        await connection.close()
    assert holds == len(answered)
    for message in answered:
        assert message.batch_id == 2
        assert message.results[0].reserve.reserved_tokens == 10


async def test_a_write_still_waiting_for_its_turn_when_its_caller_stops_waiting_is_not_applied(
    one_batch_ledger: LedgerHarness,
) -> None:
    # The first batch is held up on a row this test locks, so the second one's write waits for
    # its turn past its timeout_ms: its caller has given up on it. Applied then, its hold would
    # keep dave's tokens until its TTL with nobody left to settle or release it.
    ledger = one_batch_ledger
    await credit(ledger.stub, "stuck", 1000)
    await credit(ledger.stub, "dave", 1000)
    lock = await lock_account(ledger, "stuck")
    call = _open(ledger)
    try:
        await call.write(pb.ApplyBatchRequest(batch_id=1, writes=[_reserve("stuck", 80)]))
        await until_a_write_waits_for_a_lock(ledger)
        late_key = new_key("late")
        late_write = _reserve("dave", 80, late_key)
        await call.write(pb.ApplyBatchRequest(batch_id=2, writes=[late_write], timeout_ms=300))
        late = await _answer(call)  # while the first batch still waits
        await lock.close()
        first = await _answer(call)
    finally:
        call.cancel()
        await lock.close()
    assert late.batch_id == 2
    assert late.results[0].error.code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
    assert first.batch_id == 1
    assert first.results[0].reserve.reserved_tokens == 100
    assert await holds_of_key(ledger, late_key) == 0
    assert (await balance(ledger.stub, "dave")).reserved_tokens == 0
