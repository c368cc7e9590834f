"""The gateway counts each hot-path ledger write by its outcome and times it: the writes travel
on one ApplyBatches stream, which the gRPC metrics see as a single call."""

from __future__ import annotations

from prometheus_client import REGISTRY

from gateway_service.ledger_client import LedgerClient, LedgerError
from shared.gen.rpcai.ledger.v1 import ledger_pb2 as pb
from tests.conftest import SERVICE_TOKEN, LedgerHarness
from tests.ledger_service.helpers import credit, new_key


def _count(write: str, outcome: str) -> float:
    labels = {"write": write, "outcome": outcome}
    return REGISTRY.get_sample_value("rpcai_ledger_client_writes_total", labels) or 0.0


def _timed(write: str) -> float:
    labels = {"write": write}
    return (
        REGISTRY.get_sample_value("rpcai_ledger_client_write_duration_seconds_count", labels) or 0.0
    )


def _reserve(user: str) -> pb.ReserveRequest:
    return pb.ReserveRequest(idempotency_key=new_key(), user_id=user, estimated_tokens=100)


async def test_each_write_is_counted_by_its_outcome_and_timed(ledger: LedgerHarness) -> None:
    await credit(ledger.stub, "frank", 1000)
    before = {
        "ok": _count("reserve", "ok"),
        "refused": _count("reserve", "insufficient_balance"),
        "settled": _count("settle", "ok"),
        "timed": _timed("reserve"),
    }
    client = LedgerClient(ledger.address, SERVICE_TOKEN, timeout=10.0)
    try:
        hold = await client.reserve(_reserve("frank"))
        await client.settle(
            pb.SettleRequest(
                reservation_id=hold.reservation_id,
                user_id="frank",
                usage=pb.Usage(
                    provider="anthropic",
                    model="claude-haiku-4-5",
                    input_tokens=10,
                    output_tokens=10,
                ),
            )
        )
        try:
            await client.reserve(_reserve("nobody-funded"))
        except LedgerError:
            pass
        else:
            raise AssertionError("an unfunded user's reserve was not refused")
    finally:
        await client.close()
    assert _count("reserve", "ok") - before["ok"] == 1
    assert _count("reserve", "insufficient_balance") - before["refused"] == 1
    assert _count("settle", "ok") - before["settled"] == 1
    assert _timed("reserve") - before["timed"] == 2
