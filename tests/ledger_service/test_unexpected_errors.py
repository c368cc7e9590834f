"""A failure the ledger has no answer for (a database error that is not about the request nor
the connection) is INTERNAL with a fixed message, alone or batched: never gRPC's UNKNOWN with the
exception's text, which may quote the data it was about. The log keeps the text."""

from __future__ import annotations

import logging

import grpc
import pytest

from shared.gen.rpcai.ledger.v1 import ledger_pb2 as pb
from shared.rich_errors import error_reason, status_info
from tests.conftest import AUTH, LedgerHarness
from tests.ledger_service.helpers import balance, credit, new_key


async def test_an_unexpected_failure_is_internal_and_quotes_nothing(
    ledger: LedgerHarness, caplog: pytest.LogCaptureFixture
) -> None:
    await credit(ledger.stub, "ann", 1000)
    conn = await ledger.db()
    try:
        # Not a request's fault nor the connection's: an error whose text names the column.
        await conn.execute("ALTER TABLE accounts RENAME COLUMN owed TO owed_renamed")
        with (
            caplog.at_level(logging.ERROR, logger="ledger_service.servicer"),
            pytest.raises(grpc.aio.AioRpcError) as err,
        ):
            await balance(ledger.stub, "ann")
        assert err.value.code() is grpc.StatusCode.INTERNAL
        assert err.value.details() == "internal error"
        assert error_reason(err.value) == "INTERNAL"
        assert any("owed" in r.getMessage() + str(r.exc_info) for r in caplog.records)
        await conn.execute("ALTER TABLE accounts RENAME COLUMN owed_renamed TO owed")

        # A batched write that fails so answers the same (its batch's other writes unharmed).
        await conn.execute("ALTER FUNCTION ledger_settle RENAME TO ledger_settle_renamed")
        hold = await ledger.stub.Reserve(
            pb.ReserveRequest(idempotency_key=new_key(), user_id="ann", estimated_tokens=10),
            metadata=AUTH,
        )
        settle = pb.SettleRequest(
            reservation_id=hold.reservation_id,
            usage=pb.Usage(provider="anthropic", model="m", input_tokens=1, output_tokens=1),
        )
        with pytest.raises(grpc.aio.AioRpcError) as alone:
            await ledger.stub.Settle(settle, metadata=AUTH)
        batched: pb.ApplyBatchResponse = await ledger.stub.ApplyBatch(
            pb.ApplyBatchRequest(writes=[pb.LedgerWrite(settle=settle)]), metadata=AUTH
        )
        status = batched.results[0].error
        info = status_info(status)
        internal = (grpc.StatusCode.INTERNAL.value[0], "internal error", "INTERNAL")
        assert (status.code, status.message, info.reason if info else None) == internal
        assert (
            alone.value.code().value[0],
            alone.value.details(),
            error_reason(alone.value),
        ) == internal
    finally:
        await conn.close()
