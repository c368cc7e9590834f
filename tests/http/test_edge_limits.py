"""The edge's connection rules over raw sockets (gateway_service/http/connections.py), with
timeouts of about a second so each test takes a few:

- a connection that sends nothing, or trickles its headers (slowloris), is closed after the
  header timeout; one that trickles its body is answered 408 and closed after the body timeout;
  an idle keep-alive connection is closed after the idle timeout, and the next request on one
  must send its headers within the header timeout of its first byte. Normal calls are served
  meanwhile, and a keep-alive client that keeps calling keeps its connection.
- beyond HTTP_MAX_CONNECTIONS a connection is answered 503 TOO_MANY_CONNECTIONS (the documented
  error body) and closed; once one closes, new ones are served again.
- beyond MAX_CONCURRENT_STREAMS a new stream is refused with 503 TOO_MANY_STREAMS; unary calls
  are not counted, and the slot comes back when a stream ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from dataclasses import dataclass
from typing import Any

import aiohttp

from gateway_service.http.connections import CONNECTIONS, REFUSAL
from tests.e2e.conftest import Stack, mint
from tests.http.conftest import check_component, check_response, start_edge
from tests.ledger_service.helpers import credit

QUICK = 1.0  # the timeout under test, in seconds
LONG = 30.0  # the timeouts not under test
SLACK = 1.5  # how late a close may come (a loaded machine)


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: Any


class Raw:
    """One client connection, byte by byte."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, port: int) -> Raw:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def answer(self) -> Answer:
        """One HTTP response (status line, headers, a Content-Length body)."""
        head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), 10)
        lines = head.decode().split("\r\n")
        status = int(lines[0].split(" ")[1])
        headers = {}
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        raw = await self.reader.readexactly(int(headers.get("content-length", "0")))
        body = (
            json.loads(raw)
            if headers.get("content-type", "").startswith("application/json")
            else raw
        )
        return Answer(status, headers, body)

    async def closed_after(self, within: float) -> float:
        """Seconds until the server closes the connection (EOF or reset); fails past `within`."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        with contextlib.suppress(ConnectionError):
            while await asyncio.wait_for(self.reader.read(65536), within):
                pass
        return loop.time() - start

    def close(self) -> None:
        self.writer.close()


def request(path: str = "/healthz", method: str = "GET", body: bytes = b"") -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: edge\r\n"
    if body:
        head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    return (head + "\r\n").encode() + body


async def edge_port(stack: Stack, **settings: Any) -> tuple[Any, int]:
    server, url = await start_edge(stack, **settings)
    return server, int(url.rsplit(":", 1)[1])


async def served(port: int, calls: int = 3) -> None:
    """Normal calls, each on a new connection, answered as usual."""
    for _ in range(calls):
        client = await Raw.open(port)
        await client.send(request())
        assert (await client.answer()).status == 200
        client.close()


# ---- timeouts -----------------------------------------------------------------------------------


async def test_silent_and_slow_header_connections_are_closed_after_the_header_timeout(
    stack: Stack,
) -> None:
    server, port = await edge_port(
        stack, http_header_timeout_seconds=QUICK, http_idle_timeout_seconds=LONG
    )
    try:
        silent = await Raw.open(port)
        slow = await Raw.open(port)
        await slow.send(b"POST /v1/generate HTTP/1.1\r\nHost: edge\r\n")

        async def trickle() -> None:  # a header line every 0.2 s, for as long as it is let
            for n in range(100):
                await asyncio.sleep(0.2)
                await slow.send(f"X-Slow-{n}: 1\r\n".encode())

        dripping = asyncio.create_task(trickle())
        closes = asyncio.gather(
            silent.closed_after(QUICK + SLACK), slow.closed_after(QUICK + SLACK)
        )
        await served(port)  # meanwhile, everyone else is answered
        silent_s, slow_s = await closes
        assert QUICK - 0.2 <= silent_s <= QUICK + SLACK
        assert QUICK - 0.2 <= slow_s <= QUICK + SLACK
        dripping.cancel()
        with contextlib.suppress(asyncio.CancelledError, ConnectionError):
            await dripping
        assert server.app[CONNECTIONS].timed_out["headers"] == 2
        await served(port)
    finally:
        await server.stop(0)


async def test_a_slow_body_is_answered_408_and_its_connection_closed(stack: Stack) -> None:
    server, port = await edge_port(stack, http_body_timeout_seconds=QUICK)
    try:
        client = await Raw.open(port)
        body = json.dumps({"content": "hi", "maxTokens": 5}).encode()
        await client.send(request("/v1/generate", "POST", body)[: -len(body) + 3])

        async def trickle() -> None:
            for byte in body[3:]:
                await asyncio.sleep(0.3)
                await client.send(bytes([byte]))

        dripping = asyncio.create_task(trickle())
        loop = asyncio.get_running_loop()
        start = loop.time()
        answer = await client.answer()
        assert QUICK - 0.2 <= loop.time() - start <= QUICK + SLACK
        assert answer.status == 408
        assert answer.headers["connection"] == "close"
        check_response("/v1/generate", "post", 408, answer.body)
        assert answer.body["error"]["reason"] == "BODY_TIMEOUT"
        assert await client.closed_after(SLACK) <= SLACK
        dripping.cancel()
        with contextlib.suppress(asyncio.CancelledError, ConnectionError):
            await dripping
        await served(port)
    finally:
        await server.stop(0)


async def test_an_idle_keepalive_connection_is_closed_and_a_busy_one_kept(stack: Stack) -> None:
    server, port = await edge_port(
        stack, http_idle_timeout_seconds=QUICK, http_header_timeout_seconds=LONG
    )
    try:
        # A client that calls again within the idle timeout keeps its connection, however long.
        busy = await Raw.open(port)
        for _ in range(4):
            await busy.send(request())
            assert (await busy.answer()).status == 200
            await asyncio.sleep(QUICK * 0.6)
        # One that stops calling loses it after the idle timeout.
        assert QUICK * 0.4 - 0.2 <= await busy.closed_after(QUICK + SLACK) <= QUICK + SLACK
        assert server.app[CONNECTIONS].timed_out["idle"] == 1
    finally:
        await server.stop(0)


async def test_the_next_request_on_a_connection_must_send_its_headers_in_time(
    stack: Stack,
) -> None:
    server, port = await edge_port(
        stack, http_header_timeout_seconds=QUICK, http_idle_timeout_seconds=LONG
    )
    try:
        client = await Raw.open(port)
        await client.send(request())
        assert (await client.answer()).status == 200
        await asyncio.sleep(QUICK * 1.5)  # idle for longer than the header timeout: allowed
        await client.send(b"GET /healthz HTTP/1.1\r\n")  # then headers that never end
        assert QUICK - 0.2 <= await client.closed_after(QUICK + SLACK) <= QUICK + SLACK
    finally:
        await server.stop(0)


# ---- caps ---------------------------------------------------------------------------------------


async def test_connections_beyond_the_cap_get_503_and_are_closed(stack: Stack) -> None:
    server, port = await edge_port(stack, http_max_connections=3, http_header_timeout_seconds=LONG)
    guard = server.app[CONNECTIONS]
    held = [await Raw.open(port) for _ in range(3)]
    try:
        for _ in range(50):  # until the server has seen all three
            if guard.open_connections == 3:
                break
            await asyncio.sleep(0.02)
        assert guard.open_connections == 3
        for _ in range(2):
            extra = await Raw.open(port)
            await extra.send(request())
            answer = await extra.answer()
            assert answer.status == 503
            assert answer.headers["retry-after"] == "1"
            assert answer.headers["connection"] == "close"
            check_component("Error", answer.body)
            assert answer.body["error"] == {
                "code": 503,
                "message": "the gateway has too many open connections; retry",
                "reason": "TOO_MANY_CONNECTIONS",
            }
            assert await extra.closed_after(SLACK) <= SLACK
        assert guard.refused == 2
        # Without a request at all, the answer is the same (written as soon as accepted).
        mute = await Raw.open(port)
        assert await asyncio.wait_for(mute.reader.read(), 5) == REFUSAL
        # Once one of the three goes, a new connection is served again.
        held.pop().close()
        for _ in range(50):
            if guard.open_connections < 3:
                break
            await asyncio.sleep(0.02)
        await served(port, 1)
        assert guard.open_connections <= 3
    finally:
        for client in held:
            client.close()
        await server.stop(0)


SLOW_STREAM = "[[usage:10,30]] [[pace:0.05]] slowly"  # 30 deltas, 1.5 s


async def test_streams_beyond_the_cap_are_refused_with_503(stack: Stack) -> None:
    server, url = await start_edge(stack, max_concurrent_streams=2)
    user = "streams-cap"
    await credit(stack.ledger.stub, user, 100_000)
    auth = {"Authorization": f"Bearer {mint(user)}"}
    call = {"content": SLOW_STREAM, "maxTokens": 40}
    try:
        async with aiohttp.ClientSession() as session:

            async def stream() -> int:
                async with session.post(f"{url}/v1/generate/stream", json=call, headers=auth) as r:
                    assert r.status == 200
                    return len(await r.read())

            running = [asyncio.create_task(stream()) for _ in range(2)]
            await asyncio.sleep(0.5)  # both are streaming
            async with session.post(
                f"{url}/v1/generate/stream", json=call, headers=auth
            ) as refused:
                body = await refused.json()
                assert refused.status == 503
                assert refused.headers["Retry-After"] == "1"
            check_response("/v1/generate/stream", "post", 503, body)
            assert body["error"]["reason"] == "TOO_MANY_STREAMS"
            # Unary calls do not count against the streams.
            async with session.post(
                f"{url}/v1/generate",
                json={"content": "[[usage:5,5]] hi", "maxTokens": 10},
                headers=auth,
            ) as unary:
                assert unary.status == 200
            assert all(size > 0 for size in await asyncio.gather(*running))
            # Their slots came back.
            async with session.post(f"{url}/v1/generate/stream", json=call, headers=auth) as r:
                assert r.status == 200
                await r.read()
    finally:
        await server.stop(0)
