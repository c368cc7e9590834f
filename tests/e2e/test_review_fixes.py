"""Regressions from review: long keys and subs."""

from __future__ import annotations

import grpc
import pytest

from shared.gen.rpcai.gateway.v1 import gateway_pb2 as gpb
from tests.e2e.conftest import Stack, bearer, mint
from tests.ledger_service.helpers import balance, credit


async def test_the_longest_key_and_a_long_sub_are_served_and_retried(stack: Stack) -> None:
    user = "u" * 120  # identity providers' subs can be long
    auth = bearer(mint(user))
    await credit(stack.ledger.stub, user, 1000)
    key = "k" * 200  # the most the gateway accepts
    # Each attempt fails at the provider (nothing charged); every retry derives a new ledger
    # key from the failed hold, and that key must still fit the ledger's bound.
    failing = gpb.GenerateTextRequest(
        content="[[fail:500]] hi", idempotency_key=key, max_tokens=100
    )
    for _ in range(3):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stack.stub.GenerateText(failing, metadata=auth)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value.details()
    ok = await stack.stub.GenerateText(
        gpb.GenerateTextRequest(
            content="[[usage:40,60]] hi", idempotency_key="x" * 200, max_tokens=100
        ),
        metadata=auth,
    )
    assert ok.token_usage.tokens_charged == 125
    assert (await balance(stack.ledger.stub, user)).available_tokens == 675
