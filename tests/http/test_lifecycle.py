"""Health and readiness, clients that leave mid-call (the hold is settled or released, as over
gRPC), graceful shutdown of the edge, and `python -m gateway_service` serving gRPC and HTTP
together and draining both on SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import signal
import subprocess
import threading
import time
from pathlib import Path

import aiohttp
import grpc
import pytest

from shared import processes
from shared.gen.rpcai.gateway.v1 import gateway_pb2 as gpb
from shared.gen.rpcai.gateway.v1 import gateway_pb2_grpc
from tests.conftest import LedgerHarness
from tests.e2e.conftest import gateway_process_env, mint
from tests.e2e.e2e_support import charge_for, fetchval, usage_rows, wait_no_open_holds
from tests.http.conftest import Edge, parse_sse, start_edge
from tests.ledger_service.helpers import balance, credit

PACED = "[[usage:40,60]] [[pace:0.05]] tell me a story"  # 60 deltas, 3 s in all


async def test_healthz_and_readyz(edge: Edge) -> None:
    health = await edge.call("GET", "/healthz")
    assert (health.status, health.body) == (200, {"status": "ok"})
    ready = await edge.call("GET", "/readyz")
    assert (ready.status, ready.body) == (200, {"status": "ready"})


async def test_client_leaving_a_stream_is_charged_for_what_it_got(edge: Edge) -> None:
    user, auth = edge.user()
    await credit(edge.stack.ledger.stub, user, 1000)
    request = {"content": PACED, "model": "claude-haiku-4-5", "maxTokens": 100}
    async with edge.session.post(
        edge.url + "/v1/generate/stream", json=request, headers=auth
    ) as response:
        assert response.status == 200
        deltas = 0
        while deltas < 5:
            line = await response.content.readline()
            deltas += line.startswith(b"event: delta")
        response.close()  # drop the connection mid-stream

    await wait_no_open_holds(edge.stack.ledger, within=3)
    [row] = await usage_rows(edge.stack.ledger, user)
    assert 5 <= row.output_tokens < 60  # what was streamed before the client left, not all
    assert row.tokens_charged == charge_for(row.input_tokens + row.output_tokens)
    b = await balance(edge.stack.ledger.stub, user)
    assert (b.available_tokens, b.reserved_tokens) == (800 - row.tokens_charged, 0)


async def test_client_leaving_a_call_releases_its_hold(
    edge: Edge, caplog: pytest.LogCaptureFixture
) -> None:
    user, auth = edge.user()
    await credit(edge.stack.ledger.stub, user, 1000)
    request = {"content": "[[usage:40,60]] [[delay:3]] hi", "model": "gpt-4o", "maxTokens": 100}
    started = time.monotonic()
    try:
        async with edge.session.post(
            edge.url + "/v1/generate",
            json=request,
            headers=auth,
            timeout=aiohttp.ClientTimeout(total=0.5),
        ):
            raise AssertionError("the call should not have answered yet")
    except TimeoutError:
        pass
    await wait_no_open_holds(edge.stack.ledger, within=2)
    assert time.monotonic() - started < 2.5  # released when the client left, not at the end
    status = await fetchval(edge.stack.ledger, "SELECT status FROM holds WHERE user_id = $1", user)
    assert status == "released"
    assert (await balance(edge.stack.ledger.stub, user)).available_tokens == 800
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_shutdown_lets_a_stream_finish_within_the_grace(edge: Edge) -> None:
    server, url = await start_edge(edge.stack)
    user, auth = edge.user()
    await credit(edge.stack.ledger.stub, user, 1000)
    request = {"content": "[[usage:40,20]] [[pace:0.05]] hi", "model": "gpt-4o", "maxTokens": 50}
    async with edge.session.post(url + "/v1/generate/stream", json=request, headers=auth) as r:
        assert r.status == 200
        first = await r.content.readline()
        assert first == b"event: delta\n"
        stopping = asyncio.create_task(server.stop(grace=10))
        await asyncio.sleep(0.1)
        try:
            async with edge.session.get(url + "/healthz") as late:
                raise AssertionError(f"a new request was served while draining: {late.status}")
        except aiohttp.ClientConnectionError:
            pass  # no longer listening
        rest = (await r.read()).decode()
    events = parse_sse(first.decode() + rest)
    assert [e.event for e in events] == ["delta"] * 20 + ["usage", "done"]
    assert events[-2].data["tokenUsage"]["tokensCharged"] == charge_for(60)
    await stopping


async def test_shutdown_past_the_grace_settles_a_cut_stream(edge: Edge) -> None:
    server, url = await start_edge(edge.stack)
    user, auth = edge.user()
    await credit(edge.stack.ledger.stub, user, 1000)
    request = {"content": PACED, "model": "claude-haiku-4-5", "maxTokens": 100}
    async with edge.session.post(url + "/v1/generate/stream", json=request, headers=auth) as r:
        assert r.status == 200
        first = await r.content.readline()
        await server.stop(grace=0.2)
        rest = (await r.read()).decode()
    events = parse_sse(first.decode() + rest)
    assert "done" not in [e.event for e in events]
    assert events[-1].event == "error"
    assert events[-1].data["error"]["reason"] == "SHUTTING_DOWN"
    await wait_no_open_holds(edge.stack.ledger, within=3)
    [row] = await usage_rows(edge.stack.ledger, user)
    assert 0 < row.output_tokens < 60


async def test_shutdown_past_the_grace_releases_a_call_and_says_why(edge: Edge) -> None:
    server, url = await start_edge(edge.stack)
    user, auth = edge.user()
    await credit(edge.stack.ledger.stub, user, 1000)
    request = {"content": "[[usage:40,60]] [[delay:3]] hi", "model": "gpt-4o", "maxTokens": 100}
    call = asyncio.create_task(edge.session.post(url + "/v1/generate", json=request, headers=auth))
    await asyncio.sleep(0.3)
    await server.stop(grace=0.2)
    async with await call as response:
        body = await response.json()
    assert response.status == 503
    assert body["error"]["reason"] == "SHUTTING_DOWN"
    await wait_no_open_holds(edge.stack.ledger, within=2)
    assert (await balance(edge.stack.ledger.stub, user)).available_tokens == 800


# ---- the process -------------------------------------------------------------------------------


def _drain(proc: subprocess.Popen[str], into: list[str]) -> None:
    def pump() -> None:
        assert proc.stdout is not None
        into.extend(proc.stdout)

    threading.Thread(target=pump, daemon=True).start()


async def test_the_process_serves_grpc_and_http_and_drains_both_on_sigterm(
    ledger: LedgerHarness, sim_url: str, tmp_path: Path
) -> None:
    env = gateway_process_env(
        ledger.address,
        sim_url,
        str(tmp_path),
        SHUTDOWN_GRACE_SECONDS="10",
        LOG_LEVEL="INFO",
    )
    service = processes.start("gateway_service", env)
    proc = service.proc
    try:
        assert proc.stdout is not None
        second = await asyncio.to_thread(proc.stdout.readline)
        assert second.startswith("gateway http listening on 127.0.0.1:"), second
        http_url = "http://" + second.rsplit(" ", 1)[1].strip()
        output: list[str] = []
        _drain(proc, output)

        user = "process-user"
        token = mint(user)
        await credit(ledger.stub, user, 1000)
        auth = {"Authorization": f"Bearer {token}"}
        async with aiohttp.ClientSession() as session:
            async with session.get(http_url + "/readyz") as response:
                assert response.status == 200
            async with session.post(
                http_url + "/v1/generate",
                json={"content": "[[usage:40,60]] hi", "maxTokens": 100},
                headers=auth,
            ) as response:
                body = await response.json()
            assert response.status == 200, body
            assert body["tokenUsage"]["tokensCharged"] == 125
            assert body["tokenUsage"]["remainingBalance"] == 675

            async with grpc.aio.insecure_channel(service.address) as channel:
                status = await gateway_pb2_grpc.AiGatewayStub(channel).GetUserStatus(
                    gpb.GetUserStatusRequest(), metadata=(("authorization", f"Bearer {token}"),)
                )
            assert status.available_tokens == 675  # gRPC and HTTP over the same core

            # SIGTERM mid-stream: the stream still finishes, then the process exits cleanly.
            request = {"content": "[[usage:40,20]] [[pace:0.05]] hi", "maxTokens": 50}
            async with session.post(
                http_url + "/v1/generate/stream", json=request, headers=auth
            ) as response:
                assert response.status == 200
                first = await response.content.readline()
                proc.send_signal(signal.SIGTERM)
                rest = (await response.read()).decode()
            events = parse_sse(first.decode() + rest)
            assert [e.event for e in events[-2:]] == ["usage", "done"]
        code = await asyncio.to_thread(proc.wait, 20)
        assert code == 0, "".join(output)[-3000:]
        await asyncio.sleep(0.1)  # the drain thread reads the last lines
        assert token not in "".join(output)
        assert (await balance(ledger.stub, user)).available_tokens == 675 - charge_for(60)
    finally:
        service.stop()
