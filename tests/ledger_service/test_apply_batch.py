"""ApplyBatch: several hot-path writes in one call, each answered exactly as its own call would
be. Results come back in order; a refused, unknown, invalid or empty write is an error status for
that write alone; a key named twice in one batch is one hold; too many writes is one
INVALID_ARGUMENT for the call with nothing written. Amounts follow the money rules restated here
(25% usage fee, ceil), not the ledger's code."""

from __future__ import annotations

import grpc
import pytest
from google.rpc import status_pb2

from ledger_service.servicer import MAX_BATCH_WRITES
from shared.gen.rpcai.ledger.v1 import ledger_pb2 as pb
from shared.rich_errors import error_info, status_info
from tests.conftest import AUTH, LedgerHarness
from tests.ledger_service.helpers import balance, credit, new_key, reserve, usage


def _reserve(user: str, estimated: int, key: str | None = None) -> pb.LedgerWrite:
    return pb.LedgerWrite(
        reserve=pb.ReserveRequest(
            idempotency_key=key or new_key("hold"), user_id=user, estimated_tokens=estimated
        )
    )


def _reason(status: status_pb2.Status) -> str:
    info = status_info(status)
    assert info is not None, "no google.rpc.ErrorInfo in the write's status"
    assert info.domain == "ledger.rpcai"
    return str(info.reason)


async def apply(ledger: LedgerHarness, *writes: pb.LedgerWrite) -> list[pb.LedgerWriteResult]:
    reply: pb.ApplyBatchResponse = await ledger.stub.ApplyBatch(
        pb.ApplyBatchRequest(writes=writes), metadata=AUTH
    )
    assert len(reply.results) == len(writes)
    return list(reply.results)


async def test_each_write_gets_its_own_answer_in_order(ledger: LedgerHarness) -> None:
    await credit(ledger.stub, "alice", 1000)  # 800 usable
    open_hold = await reserve(ledger.stub, "alice", 80)  # holds 100
    results = await apply(
        ledger,
        _reserve("alice", 400),  # holds 500: 200 left
        _reserve("alice", 400),  # 500 more: refused, changes nothing
        pb.LedgerWrite(
            settle=pb.SettleRequest(reservation_id=open_hold.reservation_id, usage=usage(30, 10))
        ),
        pb.LedgerWrite(
            release=pb.ReleaseRequest(reservation_id="00000000-0000-4000-8000-000000000000")
        ),
        pb.LedgerWrite(),
        _reserve("", 10),
    )
    kinds = [r.WhichOneof("result") for r in results]
    # The writes run concurrently: either reserve may be the one that fits; exactly one does.
    assert sorted(str(k) for k in kinds[:2]) == ["error", "reserve"]
    assert kinds[2:] == ["settle", "error", "error", "error"]
    held, refused = sorted(results[:2], key=lambda r: r.WhichOneof("result") == "error")
    assert held.reserve.reserved_tokens == 500
    assert refused.error.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
    assert _reason(refused.error) == "INSUFFICIENT_BALANCE"
    assert results[2].settle.tokens_charged == 40 + 10  # 40 used + ceil(25% of 40)
    assert results[3].error.code == grpc.StatusCode.NOT_FOUND.value[0]
    assert _reason(results[3].error) == "RESERVATION_NOT_FOUND"
    assert results[4].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert status_info(results[4].error).metadata["field"] == "write"  # type: ignore[union-attr]
    assert results[5].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert status_info(results[5].error).metadata["field"] == "user_id"  # type: ignore[union-attr]
    b = await balance(ledger.stub, "alice")
    assert (b.available_tokens, b.reserved_tokens) == (800 - 50 - 500, 500)


async def test_a_batched_write_replays_as_its_own_call(ledger: LedgerHarness) -> None:
    await credit(ledger.stub, "bob", 1000)
    key = new_key("same")
    first, again = await apply(ledger, _reserve("bob", 100, key), _reserve("bob", 100, key))
    assert first.reserve.reservation_id == again.reserve.reservation_id
    assert sorted([first.reserve.replayed, again.reserve.replayed]) == [False, True]
    alone = await reserve(ledger.stub, "bob", 100, key=key)
    assert alone.reservation_id == first.reserve.reservation_id
    assert alone.replayed
    b = await balance(ledger.stub, "bob")
    assert b.reserved_tokens == 125  # one hold, not two


async def test_a_key_reused_for_another_request_is_refused_for_that_write_only(
    ledger: LedgerHarness,
) -> None:
    await credit(ledger.stub, "carol", 1000)
    key = new_key("reused")
    await reserve(ledger.stub, "carol", 100, key=key)
    other, fine = await apply(ledger, _reserve("carol", 200, key), _reserve("carol", 10))
    assert other.error.code == grpc.StatusCode.ALREADY_EXISTS.value[0]
    assert _reason(other.error) == "IDEMPOTENCY_KEY_REUSED"
    assert fine.reserve.reserved_tokens == 13


async def test_too_many_writes_is_refused_whole(ledger: LedgerHarness) -> None:
    await credit(ledger.stub, "dave", 10**6)
    writes = [_reserve("dave", 1) for _ in range(MAX_BATCH_WRITES + 1)]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await ledger.stub.ApplyBatch(pb.ApplyBatchRequest(writes=writes), metadata=AUTH)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    info = error_info(caught.value)
    assert info is not None
    assert info.metadata["field"] == "writes"
    b = await balance(ledger.stub, "dave")
    assert b.reserved_tokens == 0


async def test_an_empty_batch_answers_nothing(ledger: LedgerHarness) -> None:
    assert await apply(ledger) == []


async def test_every_kind_of_write(ledger: LedgerHarness) -> None:
    await credit(ledger.stub, "erin", 1000)
    hold = await reserve(ledger.stub, "erin", 100)
    other = await reserve(ledger.stub, "erin", 100)
    extended, settled, released, recorded = await apply(
        ledger,
        pb.LedgerWrite(
            extend_hold=pb.ExtendHoldRequest(
                reservation_id=hold.reservation_id, user_id="erin", ttl_seconds=600
            )
        ),
        pb.LedgerWrite(
            settle=pb.SettleRequest(reservation_id=hold.reservation_id, usage=usage(50, 50))
        ),
        pb.LedgerWrite(release=pb.ReleaseRequest(reservation_id=other.reservation_id)),
        pb.LedgerWrite(
            record_usage=pb.RecordUsageRequest(
                idempotency_key=new_key("byok"),
                user_id="frank",
                user_type=pb.USER_TYPE_BYOK,
                usage=usage(5, 5),
            )
        ),
    )
    assert extended.WhichOneof("result") == "extend_hold"
    assert extended.extend_hold.expires_at.seconds > hold.expires_at.seconds
    assert settled.settle.tokens_charged == 125
    assert released.release.released_tokens == 125
    assert recorded.record_usage.usage_id
    b = await balance(ledger.stub, "erin")
    assert (b.available_tokens, b.reserved_tokens) == (800 - 125, 0)
