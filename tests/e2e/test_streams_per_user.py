"""Streams count against a user's calls in flight like unary calls do: a user with two calls in
flight at most gets a third stream refused at once (RESOURCE_EXHAUSTED TOO_MANY_CALLS_IN_FLIGHT,
no hold, no provider call), another user is not affected, and the slot comes back when a stream
ends. That is the cap on streams per user; the cap on streams in total is the edge's."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import grpc
import pytest

from shared.gen.rpcai.gateway.v1 import gateway_pb2 as gpb
from tests.conftest import LedgerHarness
from tests.e2e.conftest import bearer, mint
from tests.e2e.e2e_support import Sim, assert_audit_ok, fetchval, gateway_on, own_sim, rpc_error
from tests.ledger_service.helpers import credit

__all__ = ["own_sim"]  # fixtures used by this module

SLOW = "[[pace:0.2]] [[usage:10,8]] a slow stream"


async def drain(call: Any) -> None:
    """Reads a StreamText call to its end (with read(): a call read once cannot be iterated)."""
    while await call.read() is not grpc.aio.EOF:
        pass


async def test_a_users_streams_are_capped_by_its_calls_in_flight(
    ledger: LedgerHarness, own_sim: Sim
) -> None:
    none = {"requests_per_minute": 0, "calls_in_flight": 0}
    config = json.dumps(
        {
            "public": none,
            "byok": none,
            "subscription": {"default": {"requests_per_minute": 0, "calls_in_flight": 2}},
        }
    )
    request = gpb.GenerateTextRequest(content=SLOW, max_tokens=8)
    async with gateway_on(ledger, own_sim.url, rate_limits=config) as stack:
        user, other = (f"streams-{uuid.uuid4().hex[:8]}" for _ in "ab")
        for who in (user, other):
            await credit(ledger.stub, who, 10**6)
        auth, other_auth = bearer(mint(user)), bearer(mint(other))

        streams = [stack.stub.StreamText(request, metadata=auth) for _ in "ab"]
        for stream in streams:
            await stream.read()  # admitted, held, text flowing
        calls_before = own_sim.stats.requests
        third = stack.stub.StreamText(request, metadata=auth)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await drain(third)
        assert rpc_error(refused.value) == (
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "TOO_MANY_CALLS_IN_FLIGHT",
        )
        assert own_sim.stats.requests == calls_before  # no provider call for the refused stream
        holds = await fetchval(ledger, "SELECT count(*) FROM holds WHERE user_id = $1", user)
        assert holds == 2  # the two streams' holds, none for the refused one

        # Another user has slots of their own.
        await drain(stack.stub.StreamText(request, metadata=other_auth))

        # A stream that ends gives its slot back.
        await drain(streams[0])
        await asyncio.sleep(0.2)  # the slot goes back in the background
        await drain(stack.stub.StreamText(request, metadata=auth))
        await drain(streams[1])
    await assert_audit_ok(ledger)
