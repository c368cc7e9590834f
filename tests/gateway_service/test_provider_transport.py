"""The aiohttp transport under both SDKs, on real sockets: every provider connection's receive
buffer is bounded (a stalled reader holds the provider back), one pool serves the platform key
and BYOK keys, and transport failures keep their kinds (refused or dropped: unavailable; no
answer in time: timeout)."""

from __future__ import annotations

import asyncio
import socket
import sys
from collections.abc import Callable
from typing import Any

import httpx2
import pytest

from gateway_service.providers import (
    ANTHROPIC,
    OPENAI,
    CompletionRequest,
    ProviderError,
    ProviderErrorKind,
    build_providers,
    http_client,
)
from gateway_service.providers.http_client import (
    RECEIVE_BUFFER_BYTES,
    AiohttpTransport,
    provider_socket,
)
from tests.gateway_service.conftest import BYOK_KEY, PLATFORM_KEY, Sim

BOTH = [ANTHROPIC, OPENAI]
MODELS = {ANTHROPIC: "claude-haiku-4-5", OPENAI: "gpt-5-mini"}
TIMEOUT = httpx2.Timeout(5.0)


def request(name: str, content: str, api_key: str | None = None) -> CompletionRequest:
    return CompletionRequest(content=content, model=MODELS[name], max_tokens=50, api_key=api_key)


def test_provider_sockets_bound_their_receive_buffer_and_keep_alive() -> None:
    info = socket.getaddrinfo("127.0.0.1", 80, type=socket.SOCK_STREAM)[0]
    with provider_socket(info) as sock:
        # Linux reports double the value set (its own bookkeeping); its default is 128 KiB, which
        # autotuning then grows: only a value we set reads back as exactly double.
        expected = 2 * RECEIVE_BUFFER_BYTES if sys.platform == "linux" else RECEIVE_BUFFER_BYTES
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) == expected
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        if hasattr(socket, "TCP_KEEPIDLE"):
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 60


async def _server(
    handle: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Any],
) -> tuple[asyncio.Server, int]:
    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def _read_request(reader: asyncio.StreamReader) -> None:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    await reader.readexactly(length)


async def test_a_stalled_reader_holds_the_provider_back() -> None:
    """A provider that sends as fast as it can to a caller that reads nothing past the headers
    gets only about the bounded buffers ahead (kernel and aiohttp), not megabytes (with aiohttp
    reading ahead 4 MB, 8.7 MB went ahead here)."""
    body_size = 64 * 2**20
    sent = 0
    stalled = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal sent
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16 * 1024)
        await _read_request(reader)
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\n"
            + f"content-length: {body_size}\r\n\r\n".encode()
        )
        chunk = b"x" * 16384
        try:
            while sent < body_size:
                writer.write(chunk)
                try:
                    await asyncio.wait_for(writer.drain(), timeout=0.5)
                except TimeoutError:
                    stalled.set()  # the caller's buffers are full: TCP holds us back
                    await writer.drain()
                sent += len(chunk)
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    server, port = await _server(handle)
    client = httpx2.AsyncClient(transport=AiohttpTransport(), timeout=TIMEOUT)
    try:
        async with client.stream("POST", f"http://127.0.0.1:{port}/", content=b"{}") as response:
            assert response.status_code == 200
            await asyncio.wait_for(stalled.wait(), timeout=10)
        # Ahead of a reader that stopped: our bounded kernel buffer, aiohttp's 32 KiB before it
        # pauses, the sender's socket buffers and one chunk. Unbounded it was megabytes.
        assert sent < 2**20, f"{sent} bytes went ahead of a stalled reader"
    finally:
        await client.aclose()
        server.close()


async def test_byok_and_platform_calls_share_one_connection(
    sim: Sim, monkeypatch: pytest.MonkeyPatch
) -> None:
    opened: list[socket.socket] = []

    def counting(addr_info: tuple[Any, ...]) -> socket.socket:
        sock = provider_socket(addr_info)
        opened.append(sock)
        return sock

    monkeypatch.setattr(http_client, "provider_socket", counting)
    providers = build_providers(
        anthropic_api_key=PLATFORM_KEY,
        openai_api_key=PLATFORM_KEY,
        anthropic_base_url=sim.url,
        openai_base_url=f"{sim.url}/v1",
    )
    try:
        for name in BOTH:
            provider = providers.get(name)
            for i in range(6):
                key = BYOK_KEY if i % 2 else None
                completion = await provider.generate(request(name, f"call {i} [[usage:3,2]]", key))
                assert completion.output_tokens == 2
            wrong = request(name, "x", api_key="sk-not-a-key-at-all")
            with pytest.raises(ProviderError) as caught:
                await provider.generate(wrong)
            assert caught.value.kind is ProviderErrorKind.AUTH
        # One connection per provider, reused by every key one after the other (a refused
        # key's answer is read to its end, so its connection goes back to the pool too).
        assert len(opened) == 2
    finally:
        await providers.aclose()
    assert all(sock.fileno() == -1 for sock in opened)  # closed with the providers


@pytest.fixture
def refusing_port() -> int:
    """A port nobody listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def _providers_at(url: str, timeout_seconds: float = 5.0) -> Any:
    return build_providers(
        anthropic_api_key=PLATFORM_KEY,
        openai_api_key=PLATFORM_KEY,
        anthropic_base_url=url,
        openai_base_url=f"{url}/v1",
        timeout_seconds=timeout_seconds,
    )


@pytest.mark.parametrize("name", BOTH)
async def test_connection_refused_is_unavailable_not_a_timeout(
    refusing_port: int, name: str
) -> None:
    providers = _providers_at(f"http://127.0.0.1:{refusing_port}")
    try:
        with pytest.raises(ProviderError) as caught:
            await providers.get(name).generate(request(name, "x"))
        assert caught.value.kind is ProviderErrorKind.UNAVAILABLE
        stream = providers.get(name).stream(request(name, "x"))
        with pytest.raises(ProviderError) as caught:
            async with stream:
                await anext(stream)
        assert caught.value.kind is ProviderErrorKind.UNAVAILABLE
    finally:
        await providers.aclose()


@pytest.mark.parametrize("name", BOTH)
async def test_a_provider_that_hangs_up_is_unavailable_and_one_that_stays_silent_times_out(
    name: str,
) -> None:
    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.close()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        await asyncio.sleep(5)
        writer.close()

    for handle, kind in ((hang_up, ProviderErrorKind.UNAVAILABLE), (silent, None)):
        server, port = await _server(handle)
        providers = _providers_at(f"http://127.0.0.1:{port}", timeout_seconds=0.3)
        try:
            with pytest.raises(ProviderError) as caught:
                await providers.get(name).generate(request(name, "x"))
            assert caught.value.kind is (kind or ProviderErrorKind.TIMEOUT)
        finally:
            await providers.aclose()
            server.close()
