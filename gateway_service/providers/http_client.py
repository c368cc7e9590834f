"""The HTTP client both provider SDKs send through: the SDK's own httpx2 client (its timeouts,
redirects followed) over an aiohttp connection pool, with a bounded receive buffer and TCP
keepalive on every provider connection.

Why aiohttp under the SDK: the SDKs' default stack (httpx2 → httpcore2 → anyio) cost about 2 ms
of gateway CPU per call, much of it a pool that checks every connection on every request and
anyio's per-write bookkeeping; aiohttp's connector hands out an idle connection in O(1). The
SDKs ship an aiohttp transport of their own, but it drops socket options, and OpenAI's copy
reports a refused connection as a timeout; this one is ours, with one exception mapping.

Why the receive bound: a stream is read from its provider only as fast as its client takes the
text, and a provider sends ahead as far as the receive window lets it, which Linux grows to
megabytes (measured before this bound: about 5 MB kept per stalled stream against a fast
provider). SO_RCVBUF = RECEIVE_BUFFER_BYTES makes TCP hold the provider back instead, and
aiohttp stops reading a connection once READ_BUFFER_BYTES * 2 wait unread in the process; what
one read takes from the kernel is bounded by the receive buffer too. Measured with 50 stalled
streams (tests/e2e/test_edge_abuse.py): the gateway grew 27-29 MB with 64/16 KiB, 54-100 MB with
128/64 KiB (the old httpx2 stack: 34 MB). 64 KiB still carries about 640 KB/s at a 100 ms round
trip, far more than a model streams.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from functools import lru_cache
from typing import Any

import aiohttp
import httpx2
from yarl import URL

from shared import tracing

RECEIVE_BUFFER_BYTES = 64 * 1024
# aiohttp pauses reading a connection when twice this waits unread in its buffer.
READ_BUFFER_BYTES = 16 * 1024
# As the SDKs' own clients: up to 1000 connections shared by every call and every key; an idle
# connection is kept 5 s (httpx's keepalive expiry), so a provider rarely closes one under us.
MAX_CONNECTIONS = 1000
CHUNK_BYTES = 16 * 1024
KEEPALIVE_SECONDS = 5.0


def _socket_options() -> list[tuple[int, int, int]]:
    options = [
        (socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER_BYTES),
        # Find a provider connection that died silently (as the Anthropic SDK does by default).
        (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1),
    ]
    for name, value in (("TCP_KEEPIDLE", 60), ("TCP_KEEPINTVL", 60), ("TCP_KEEPCNT", 5)):
        option = getattr(socket, name, None)
        if option is not None:
            options.append((socket.IPPROTO_TCP, option, value))
    return options


SOCKET_OPTIONS = _socket_options()


def provider_socket(addr_info: tuple[Any, ...]) -> socket.socket:
    """Every provider connection's socket, its options set before connect (the receive window's
    scale is agreed in the handshake)."""
    family, type_, proto = addr_info[0], addr_info[1], addr_info[2]
    sock = socket.socket(family=family, type=type_, proto=proto)
    try:
        for level, option, value in SOCKET_OPTIONS:
            sock.setsockopt(level, option, value)
    except OSError:
        sock.close()
        raise
    return sock


@lru_cache(maxsize=32)
def _client_timeout(
    connect: float | None, read: float | None, pool: float | None
) -> aiohttp.ClientTimeout:
    # The SDK sends the same timeouts with every call: build each aiohttp form once.
    # aiohttp's `connect` covers waiting for a pooled connection and opening one (httpx: pool).
    return aiohttp.ClientTimeout(total=None, connect=pool, sock_connect=connect, sock_read=read)


@contextmanager
def _mapped(request: httpx2.Request) -> Iterator[None]:
    """aiohttp's failures as the httpx2 exceptions the SDKs turn into APITimeoutError and
    APIConnectionError (a timeout stays a timeout, a refused connection is not one)."""
    try:
        yield
    except aiohttp.ConnectionTimeoutError as exc:
        raise httpx2.ConnectTimeout(str(exc) or "connect timed out", request=request) from exc
    except aiohttp.SocketTimeoutError as exc:
        raise httpx2.ReadTimeout(str(exc) or "read timed out", request=request) from exc
    except TimeoutError as exc:
        raise httpx2.TimeoutException(str(exc) or "timed out", request=request) from exc
    except aiohttp.ClientConnectorError as exc:
        raise httpx2.ConnectError(str(exc), request=request) from exc
    except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as exc:
        raise httpx2.ReadError(str(exc) or "connection lost", request=request) from exc
    except (aiohttp.InvalidURL, aiohttp.NonHttpUrlClientError) as exc:
        raise httpx2.UnsupportedProtocol(str(exc), request=request) from exc
    except aiohttp.ClientError as exc:
        raise httpx2.TransportError(str(exc), request=request) from exc


class _ResponseStream(httpx2.AsyncByteStream):
    def __init__(self, response: aiohttp.ClientResponse, request: httpx2.Request) -> None:
        self._response = response
        self._request = request

    async def __aiter__(self) -> AsyncIterator[bytes]:
        with _mapped(self._request):
            # At most CHUNK_BYTES at a time, even when more waits: the SDKs split each chunk into
            # all of its lines at once, so a larger chunk is that many more objects per stream.
            async for chunk in self._response.content.iter_chunked(CHUNK_BYTES):
                yield chunk

    async def aclose(self) -> None:
        # A response read to its end returns its connection to the pool; one left part-read
        # (a stream the caller left) closes it, so the provider stops generating.
        self._response.release()


class AiohttpTransport(httpx2.AsyncBaseTransport):
    """httpx2's transport interface over one aiohttp session (one pool), opened on first use
    inside the running event loop."""

    def __init__(self, ssl_context: ssl.SSLContext | None = None) -> None:
        self._ssl = ssl_context if ssl_context is not None else httpx2.create_ssl_context()
        self._session: aiohttp.ClientSession | None = None

    def _open(self) -> aiohttp.ClientSession:
        connector = aiohttp.TCPConnector(
            limit=MAX_CONNECTIONS,
            keepalive_timeout=KEEPALIVE_SECONDS,
            ssl=self._ssl,
            socket_factory=provider_socket,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            read_bufsize=READ_BUFFER_BYTES,
            auto_decompress=False,  # httpx2 decodes, as with its own transport
            cookie_jar=aiohttp.DummyCookieJar(),  # nothing a provider sets joins other calls
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding"),  # the SDK's own
            trace_configs=tracing.http_client_trace_configs(),  # None when tracing is off
        )
        return self._session

    @property
    def session(self) -> aiohttp.ClientSession | None:
        return self._session

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        session = self._session or self._open()
        timeout = request.extensions.get("timeout", {})
        body = await request.aread()
        headers = [(k, v) for k, v in request.headers.multi_items() if k != "transfer-encoding"]
        with _mapped(request):
            response = await session.request(
                request.method,
                URL(str(request.url), encoded=True),
                headers=headers,
                data=body or None,
                allow_redirects=False,  # httpx2 follows them, as the SDK expects
                compress=False,
                timeout=_client_timeout(
                    timeout.get("connect"), timeout.get("read"), timeout.get("pool")
                ),
            )
        extensions: dict[str, Any] = {"http_version": b"HTTP/1.1"}
        if response.reason:
            extensions["reason_phrase"] = response.reason.encode()
        return httpx2.Response(
            status_code=response.status,
            headers=response.raw_headers,
            stream=_ResponseStream(response, request),
            request=request,
            extensions=extensions,
        )

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()


def provider_http_client() -> httpx2.AsyncClient:
    """A new client (one pool) for one provider SDK; the SDK closes it with itself. Timeouts
    are the SDK's, sent with every request."""
    return httpx2.AsyncClient(transport=AiohttpTransport(), follow_redirects=True)
