"""Every exit of a stream is metered exactly once, over real sockets:

- 100 stalled streams whose clients all leave at the same moment, while other calls load the
  gateway, over gRPC and over HTTP (SSE): every hold is settled (text was delivered) and none is
  left to expire unmetered. Repeated, because the race this guards is a matter of timing.
- A stream slower than its hold's TTL is kept alive (ExtendHold) and charged in full once; the
  tokens it holds cannot be spent elsewhere meanwhile.
- A stream whose client stops reading is cut after the write timeout and settled for what it
  consumed; its hold never expires under it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import uuid

import aiohttp
import grpc
import pytest

from shared.gen.rpcai.gateway.v1 import gateway_pb2 as gpb
from shared.gen.rpcai.gateway.v1 import gateway_pb2_grpc
from tests.conftest import LedgerHarness
from tests.e2e.conftest import Stack, bearer, mint
from tests.e2e.e2e_support import (
    Sim,
    assert_audit_ok,
    charge_for,
    fetchval,
    gateway_on,
    held_for,
    own_sim,
    rpc_error,
    usage_rows,
)
from tests.e2e.ledger_proxy import Fault, LedgerProxy
from tests.ledger_service.helpers import balance, credit

__all__ = ["own_sim"]  # fixtures used by this module

STREAMS = 100
ROUNDS = 3
# 200 words, one every 50 ms: ten seconds of stream, far longer than the test lets it run.
SLOW = "[[usage:40,200]] [[pace:0.05]] tell me a long story"


async def _hold_statuses(ledger: LedgerHarness, user: str) -> dict[str, int]:
    conn = await ledger.db()
    try:
        rows = await conn.fetch(
            "SELECT status, count(*) AS n FROM holds WHERE user_id = $1 GROUP BY status", user
        )
    finally:
        await conn.close()
    return {r["status"]: r["n"] for r in rows}


async def _until_resolved(ledger: LedgerHarness, user: str, within: float = 20.0) -> dict[str, int]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    statuses = await _hold_statuses(ledger, user)
    while statuses.get("held") and loop.time() < deadline:
        await asyncio.sleep(0.05)
        statuses = await _hold_statuses(ledger, user)
    return statuses


async def _load(stack: Stack, stop: asyncio.Event) -> int:
    """Unary calls from another user, back to back, until `stop`."""
    sub = f"load-{uuid.uuid4().hex[:8]}"
    await credit(stack.ledger.stub, sub, 10**9)
    auth = bearer(mint(sub))
    served = 0
    while not stop.is_set():
        await stack.stub.GenerateText(
            gpb.GenerateTextRequest(content="[[usage:5,5]] hi", max_tokens=20), metadata=auth
        )
        served += 1
    return served


async def _grpc_stalled_stream(
    stack: Stack, auth: tuple[tuple[str, str]], flowing: asyncio.Barrier, leave: asyncio.Event
) -> None:
    call = stack.stub.StreamText(
        gpb.GenerateTextRequest(content=SLOW, max_tokens=200), metadata=auth
    )
    await call.read()
    await call.read()  # text is flowing: the call is being metered
    await flowing.wait()
    await leave.wait()
    call.cancel()


async def _http_stalled_stream(
    url: str, token: str, flowing: asyncio.Barrier, leave: asyncio.Event
) -> None:
    async with aiohttp.ClientSession() as session:
        response = await session.post(
            f"{url}/v1/generate/stream",
            json={"content": SLOW, "maxTokens": 200},
            headers={"Authorization": f"Bearer {token}"},
        )
        assert response.status == 200, await response.text()
        seen = 0
        async for line in response.content:
            seen += line.startswith(b"event: delta")
            if seen == 2:
                break
        await flowing.wait()
        await leave.wait()
        response.close()  # the connection goes, mid-stream


@pytest.mark.parametrize("transport", ["grpc", "http"])
async def test_streams_closed_at_once_under_load_are_all_metered(
    ledger: LedgerHarness, own_sim: Sim, transport: str
) -> None:
    # The whole stack shares this process: under the burst, give ledger calls time.
    async with gateway_on(ledger, own_sim.url, ledger_timeout_seconds=20) as stack:
        http_port = await stack.gateway.start_http("127.0.0.1:0")
        url = f"http://127.0.0.1:{http_port}"
        for round_ in range(ROUNDS):
            user = f"stall-{transport}-{round_}-{uuid.uuid4().hex[:6]}"
            await credit(ledger.stub, user, 10**8)
            token = mint(user)
            flowing = asyncio.Barrier(STREAMS + 1)
            leave = asyncio.Event()
            stop = asyncio.Event()
            load = asyncio.create_task(_load(stack, stop))
            if transport == "grpc":
                clients = [
                    _grpc_stalled_stream(stack, bearer(token), flowing, leave)
                    for _ in range(STREAMS)
                ]
            else:
                clients = [_http_stalled_stream(url, token, flowing, leave) for _ in range(STREAMS)]
            tasks = [asyncio.create_task(c) for c in clients]
            await asyncio.wait_for(flowing.wait(), 60)
            leave.set()  # every client leaves at the same moment
            await asyncio.gather(*tasks)
            statuses = await _until_resolved(ledger, user)
            stop.set()
            assert await load > 0
            # Text was delivered to every stream: each one is charged, none left to expire.
            assert statuses == {"settled": STREAMS}, f"round {round_}: {statuses}"
            rows = await usage_rows(ledger, user)
            assert len(rows) == STREAMS
            for r in rows:
                assert r.tokens_charged == charge_for(r.input_tokens + r.output_tokens)
            assert all(r.output_tokens >= 2 for r in rows)
    await assert_audit_ok(ledger)


# ---- streams that outlive their hold, and clients that stop reading ---------------------------


async def _stream_texts(stack: Stack, auth: tuple[tuple[str, str]], content: str) -> list[str]:
    out: list[str] = []
    async for message in stack.stub.StreamText(
        gpb.GenerateTextRequest(content=content, max_tokens=40), metadata=auth
    ):
        out.append(message.delta)
    return out


async def test_a_stream_longer_than_its_hold_is_kept_alive_and_charged_once(
    ledger: LedgerHarness, own_sim: Sim
) -> None:
    # A 3-second hold, the ledger's sweeper running: a 6-second stream must keep its hold.
    ledger_task = asyncio.create_task(_sweep(ledger))
    try:
        async with gateway_on(
            ledger, own_sim.url, hold_ttl_seconds=3, stream_write_timeout_seconds=0.5
        ) as stack:
            user, auth = stack.user()
            content = "[[usage:40,30]] [[pace:0.2]] slowly"
            held = held_for(content, 40)
            await credit(ledger.stub, user, -(-held * 100 // 80))  # exactly one hold (or a bit)
            stream = asyncio.create_task(_stream_texts(stack, auth, content))
            await asyncio.sleep(4.5)  # past the hold's first TTL
            assert await _hold_statuses(ledger, user) == {"held": 1}
            # Meanwhile the held tokens cannot be spent by another call.
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stack.stub.GenerateText(
                    gpb.GenerateTextRequest(content="[[usage:1,1]] hi", max_tokens=5),
                    metadata=auth,
                )
            assert rpc_error(err.value)[1] == "INSUFFICIENT_BALANCE"
            texts = await stream
            assert len([t for t in texts if t]) == 30
            assert await _hold_statuses(ledger, user) == {"settled": 1}
            [row] = await usage_rows(ledger, user)
            assert row.tokens_charged == charge_for(70)
            unbilled = await fetchval(
                ledger, "SELECT coalesce(sum(amount), 0) FROM journal_entries WHERE account_id = 6"
            )
            assert unbilled == 0
    finally:
        ledger_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await ledger_task
    await assert_audit_ok(ledger)


async def _sweep(ledger: LedgerHarness) -> None:
    """The ledger's sweeper, as it runs in production (the test fixture starts it off)."""
    while True:
        await ledger.app.ledger.sweep_expired(100)
        await asyncio.sleep(0.2)


async def test_a_stream_that_cannot_keep_its_hold_is_cut_before_it_expires(
    ledger: LedgerHarness, own_sim: Sim
) -> None:
    """The ledger stops answering ExtendHold (only that): the gateway cuts the stream while the
    hold still stands and settles what was delivered; nothing is unbilled, nothing expires."""
    proxy = LedgerProxy(ledger.address)
    await proxy.start()
    proxy.faults["ExtendHold"] = Fault(grpc.StatusCode.UNAVAILABLE)
    try:
        async with gateway_on(
            ledger,
            own_sim.url,
            ledger_addr=proxy.address,
            hold_ttl_seconds=3,
            stream_write_timeout_seconds=0.5,
        ) as stack:
            user, auth = stack.user()
            await credit(ledger.stub, user, 10_000)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await _stream_texts(stack, auth, "[[usage:40,30]] [[pace:0.2]] slowly")
            assert rpc_error(err.value) == (
                grpc.StatusCode.DEADLINE_EXCEEDED,
                "CALL_TIME_LIMIT",
            )
            assert proxy.calls["ExtendHold"] >= 1
            statuses = await _until_resolved(ledger, user)
            assert statuses == {"settled": 1}
            [row] = await usage_rows(ledger, user)
            assert 0 < row.output_tokens < 30  # cut: charged for what it consumed
            assert row.tokens_charged == charge_for(row.input_tokens + row.output_tokens)
    finally:
        await proxy.stop()
    await assert_audit_ok(ledger)


# A client that stops reading. gRPC: a small receive window, so the server's writes block after
# a few kilobytes (with the defaults, megabytes are buffered first). HTTP: loopback buffers hold
# ~2.5 MB of a stream whatever the client asks, so the stream must be longer than that.
SMALL_WINDOW = [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 1024)]
FLOOD = "[[usage:40,6000]] say everything"
HTTP_FLOOD = "[[usage:40,100000]] say everything"


async def test_a_grpc_client_that_stops_reading_is_cut_and_charged_for_what_it_used(
    ledger: LedgerHarness, own_sim: Sim
) -> None:
    async with gateway_on(
        ledger, own_sim.url, hold_ttl_seconds=4, stream_write_timeout_seconds=0.5
    ) as stack:
        user, auth = stack.user()
        await credit(ledger.stub, user, 100_000)
        port = stack.gateway.grpc.port
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=SMALL_WINDOW) as channel:
            stub = gateway_pb2_grpc.AiGatewayStub(channel)
            call = stub.StreamText(
                gpb.GenerateTextRequest(content=FLOOD, max_tokens=6000), metadata=auth
            )
            await call.read()  # then nothing more is read
            statuses = await _until_resolved(ledger, user, within=10)
            assert statuses == {"settled": 1}, statuses
            call.cancel()
        [row] = await usage_rows(ledger, user)
        assert 0 < row.output_tokens < 6000  # cut: charged for what the stream consumed
        assert row.tokens_charged == charge_for(row.input_tokens + row.output_tokens)
        assert (await balance(ledger.stub, user)).reserved_tokens == 0
    await assert_audit_ok(ledger)


async def test_an_http_client_that_stops_reading_is_cut_and_charged_for_what_it_used(
    ledger: LedgerHarness, own_sim: Sim
) -> None:
    async with gateway_on(
        ledger, own_sim.url, hold_ttl_seconds=4, stream_write_timeout_seconds=0.5
    ) as stack:
        http_port = await stack.gateway.start_http("127.0.0.1:0")
        user, _ = stack.user()
        await credit(ledger.stub, user, 1_000_000)
        reader, writer = await _small_window_connection(http_port)
        body = json.dumps({"content": HTTP_FLOOD, "maxTokens": 100_000}).encode()
        writer.write(
            b"POST /v1/generate/stream HTTP/1.1\r\nHost: x\r\n"
            + f"Authorization: Bearer {mint(user)}\r\n".encode()
            + b"Content-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        await writer.drain()
        assert (await reader.readline()).startswith(b"HTTP/1.1 200")
        # ... and nothing more is read.
        statuses = await _until_resolved(ledger, user, within=60)
        writer.close()
        assert statuses == {"settled": 1}, statuses
        [row] = await usage_rows(ledger, user)
        assert 0 < row.output_tokens < 100_000
        assert row.tokens_charged == charge_for(row.input_tokens + row.output_tokens)
    await assert_audit_ok(ledger)


async def _small_window_connection(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    return await asyncio.open_connection(sock=sock, limit=4096)
