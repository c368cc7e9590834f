"""Every call the gateway makes on a hold names the hold's user: a ledger sharded by user
(docs/scaling.md) routes Settle, Release and ExtendHold by it instead of asking every shard."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from shared.gen.rpcai.gateway.v1 import gateway_pb2 as gpb
from shared.gen.rpcai.ledger.v1 import ledger_pb2 as lpb
from tests.conftest import LedgerHarness
from tests.e2e.e2e_support import Sim, assert_audit_ok, gateway_on, own_sim
from tests.e2e.ledger_proxy import LedgerProxy
from tests.ledger_service.helpers import balance, credit

__all__ = ["own_sim"]  # fixtures used by this module


async def test_settle_and_release_name_the_user(
    ledger: LedgerHarness, own_sim: Sim, tmp_path: Path
) -> None:
    proxy = LedgerProxy(ledger.address)
    await proxy.start()
    try:
        async with gateway_on(
            ledger, own_sim.url, ledger_addr=proxy.address, data_dir=str(tmp_path)
        ) as stack:
            user, auth = stack.user()
            await credit(ledger.stub, user, 1000)
            served = await stack.stub.GenerateText(
                gpb.GenerateTextRequest(content="[[usage:40,60]] hi", max_tokens=100),
                metadata=auth,
            )
            assert served.token_usage.tokens_charged == 125
            with pytest.raises(grpc.aio.AioRpcError):
                await stack.stub.GenerateText(
                    gpb.GenerateTextRequest(content="[[fail:500]] hi", max_tokens=100),
                    metadata=auth,
                )
    finally:
        await proxy.stop()
    [settle] = [lpb.SettleRequest.FromString(r) for r in proxy.requests["Settle"]]
    [release] = [lpb.ReleaseRequest.FromString(r) for r in proxy.requests["Release"]]
    assert (settle.user_id, release.user_id) == (user, user)
    b = await balance(ledger.stub, user)
    assert (b.available_tokens, b.reserved_tokens) == (800 - 125, 0)
    await assert_audit_ok(ledger)
