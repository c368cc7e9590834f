"""RecordUsage duplicates arriving together: copies of one keyed request sent at once (separate
calls, or writes of one ApplyBatch) are one call. Every copy answers the original's usage_id,
exactly one of them is the original (replayed=False), and one usage row exists. The same key
with a different request is refused ALREADY_EXISTS / IDEMPOTENCY_KEY_REUSED and writes nothing."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from ledger_service.audit import run_audit
from shared.gen.rpcai.ledger.v1 import ledger_pb2 as pb
from shared.rich_errors import status_info
from tests.conftest import AUTH, LedgerHarness
from tests.ledger_service.helpers import failure, new_key, table_counts, usage

COPIES = 20
REUSED = (grpc.StatusCode.ALREADY_EXISTS, "IDEMPOTENCY_KEY_REUSED")


def _request(key: str, user: str = "byo", input_tokens: int = 7) -> pb.RecordUsageRequest:
    return pb.RecordUsageRequest(
        idempotency_key=key,
        user_id=user,
        user_type=pb.USER_TYPE_BYOK,
        usage=usage(input_tokens, 11),
        estimated_cost_micro_usd=42,
    )


async def _record(ledger: LedgerHarness, request: pb.RecordUsageRequest) -> pb.RecordUsageResponse:
    reply: pb.RecordUsageResponse = await ledger.stub.RecordUsage(request, metadata=AUTH)
    return reply


async def _batch(
    ledger: LedgerHarness, requests: list[pb.RecordUsageRequest]
) -> list[pb.LedgerWriteResult]:
    reply: pb.ApplyBatchResponse = await ledger.stub.ApplyBatch(
        pb.ApplyBatchRequest(writes=[pb.LedgerWrite(record_usage=r) for r in requests]),
        metadata=AUTH,
    )
    assert len(reply.results) == len(requests)
    return list(reply.results)


def _answers(results: list[pb.LedgerWriteResult]) -> list[pb.RecordUsageResponse]:
    kinds = [r.WhichOneof("result") for r in results]
    assert kinds == ["record_usage"] * len(results), [r.error for r in results]
    return [r.record_usage for r in results]


async def _counts(ledger: LedgerHarness) -> dict[str, int]:
    conn = await ledger.db()
    try:
        return await table_counts(conn)
    finally:
        await conn.close()


async def _usage_rows(ledger: LedgerHarness, key: str) -> list[tuple[str, str, int, int, int]]:
    conn = await ledger.db()
    try:
        rows = await conn.fetch(
            "SELECT id::text, user_id, input_tokens, output_tokens, estimated_cost_micro_usd"
            " FROM usage_records WHERE idempotency_key = $1",
            key,
        )
    finally:
        await conn.close()
    return [tuple(r.values()) for r in rows]


def _one_original(answers: list[pb.RecordUsageResponse]) -> str:
    """All answers name one usage, and exactly one of them is not a replay."""
    ids = {a.usage_id for a in answers}
    assert len(ids) == 1, ids
    [usage_id] = ids
    assert usage_id
    assert [a.replayed for a in answers].count(False) == 1, [a.replayed for a in answers]
    return usage_id


async def test_concurrent_copies_are_one_usage(ledger: LedgerHarness) -> None:
    key = new_key("usage")
    request = _request(key)
    before = await _counts(ledger)
    answers = await asyncio.gather(*(_record(ledger, request) for _ in range(COPIES)))
    usage_id = _one_original(answers)
    assert await _usage_rows(ledger, key) == [(usage_id, "byo", 7, 11, 42)]
    after = await _counts(ledger)
    assert after["usage_records"] == before["usage_records"] + 1
    # Sent again once everything settled: still the same answer, as a replay, nothing written.
    again = await _record(ledger, request)
    assert (again.usage_id, again.replayed) == (usage_id, True)
    assert await _counts(ledger) == after
    assert (await run_audit(ledger.database_url)).ok


async def test_copies_inside_one_batch_are_one_usage(ledger: LedgerHarness) -> None:
    key = new_key("usage")
    request = _request(key, user="bat")
    before = await _counts(ledger)
    answers = _answers(await _batch(ledger, [request] * COPIES))
    usage_id = _one_original(answers)
    assert await _usage_rows(ledger, key) == [(usage_id, "bat", 7, 11, 42)]
    after = await _counts(ledger)
    assert after["usage_records"] == before["usage_records"] + 1
    # The same batch again: every copy a replay of that one usage.
    replays = _answers(await _batch(ledger, [request] * COPIES))
    assert {(a.usage_id, a.replayed) for a in replays} == {(usage_id, True)}
    assert await _counts(ledger) == after


async def test_batches_and_calls_racing_on_one_key_are_one_usage(ledger: LedgerHarness) -> None:
    key = new_key("usage")
    request = _request(key, user="mix")
    calls = asyncio.gather(*(_record(ledger, request) for _ in range(COPIES // 2)))
    batches = asyncio.gather(*(_batch(ledger, [request] * 5) for _ in range(4)))
    alone, batched = await asyncio.gather(calls, batches)
    answers = list(alone)
    for results in batched:
        answers += _answers(results)
    assert len(answers) == COPIES // 2 + 4 * 5
    usage_id = _one_original(answers)
    assert await _usage_rows(ledger, key) == [(usage_id, "mix", 7, 11, 42)]


def _variants(key: str) -> dict[str, pb.RecordUsageRequest]:
    other_type = _request(key)
    other_type.user_type = pb.USER_TYPE_SUBSCRIPTION
    other_cost = _request(key)
    other_cost.estimated_cost_micro_usd = 43
    no_cost = _request(key)
    no_cost.ClearField("estimated_cost_micro_usd")
    other_model = _request(key)
    other_model.usage.model = "another-model"
    other_output = _request(key)
    other_output.usage.output_tokens = 12
    return {
        "another user": _request(key, user="someone-else"),
        "other input tokens": _request(key, input_tokens=8),
        "other output tokens": other_output,
        "other model": other_model,
        "other user type": other_type,
        "other cost": other_cost,
        "no cost": no_cost,
    }


async def test_a_key_reused_for_another_request_is_refused_and_writes_nothing(
    ledger: LedgerHarness,
) -> None:
    key = new_key("usage")
    original = await _record(ledger, _request(key))
    assert not original.replayed
    before = await _counts(ledger)
    variants = _variants(key)
    # One at a time, then all of them at once, as separate calls.
    for name, request in variants.items():
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await _record(ledger, request)
        assert failure(caught.value) == REUSED, name
    outcomes = await asyncio.gather(
        *(_record(ledger, r) for r in variants.values()), return_exceptions=True
    )
    for name, outcome in zip(variants, outcomes, strict=True):
        assert failure(outcome) == REUSED, name
    # Inside one batch, beside copies of the original (which still answer it).
    results = await _batch(ledger, [*variants.values(), _request(key), _request(key)])
    for name, result in zip(variants, results[: len(variants)], strict=True):
        assert result.WhichOneof("result") == "error", name
        assert result.error.code == grpc.StatusCode.ALREADY_EXISTS.value[0], name
        info = status_info(result.error)
        assert info is not None, name
        assert info.reason == "IDEMPOTENCY_KEY_REUSED", name
    for copy in results[len(variants) :]:
        assert (copy.record_usage.usage_id, copy.record_usage.replayed) == (
            original.usage_id,
            True,
        )
    assert await _counts(ledger) == before
    assert await _usage_rows(ledger, key) == [(original.usage_id, "byo", 7, 11, 42)]
    assert (await run_audit(ledger.database_url)).ok


async def test_racing_requests_on_one_key_one_wins_the_others_are_refused(
    ledger: LedgerHarness,
) -> None:
    """Two different requests under one key, sent together: whichever arrives first is the
    usage; every copy of it answers that usage, every copy of the other is refused."""
    key = new_key("usage")
    first, second = _request(key, input_tokens=1), _request(key, input_tokens=2)
    before = await _counts(ledger)
    sent = [first, second] * (COPIES // 2)
    outcomes = await asyncio.gather(*(_record(ledger, r) for r in sent), return_exceptions=True)
    won = [r for r, o in zip(sent, outcomes, strict=True) if isinstance(o, pb.RecordUsageResponse)]
    assert won, outcomes
    winner = won[0]
    for request, outcome in zip(sent, outcomes, strict=True):
        if request is winner:
            assert isinstance(outcome, pb.RecordUsageResponse), outcome
        else:
            assert failure(outcome) == REUSED
    usage_id = _one_original([o for o in outcomes if isinstance(o, pb.RecordUsageResponse)])
    rows = await _usage_rows(ledger, key)
    assert rows == [(usage_id, "byo", winner.usage.input_tokens, 11, 42)]
    after = await _counts(ledger)
    assert after["usage_records"] == before["usage_records"] + 1
