"""The HTTP edge's connections: how long each may take, how many there may be, and how much a
client that reads nothing can make the gateway buffer for it.

aiohttp alone has a keep-alive timeout measured from the last response (not from a request's
first byte), nothing for a request whose headers or body trickle in, and no limit on how many
connections it accepts: held connections pile up until the process runs out of file descriptors
and stops answering anyone. So each connection is watched here:

- Headers: a new connection must deliver its first request's headers within
  HTTP_HEADER_TIMEOUT_SECONDS; a later request on a keep-alive connection, its headers within that
  long of its first byte. A client that sends a header line now and then (slowloris) is closed.
- Idle: a keep-alive connection with no request under way is closed after
  HTTP_IDLE_TIMEOUT_SECONDS, counted from the end of its last request's handler (so a response
  the client does not take within that long goes with it).
- Body: a request's body must arrive within HTTP_BODY_TIMEOUT_SECONDS of its headers, else it is
  answered 408 BODY_TIMEOUT and the connection closed. Every route here reads its whole (bounded)
  body, so the edge reads it first, under the timeout; handlers get it from aiohttp's cache.
- Count: at most HTTP_MAX_CONNECTIONS at once. One more is answered 503 TOO_MANY_CONNECTIONS
  (the API's JSON error body) as soon as it is accepted, and closed within a second: refused, not
  held (see shared.open_files for the descriptors this needs).
- Send buffer: each connection's kernel send buffer is bounded (HTTP_SEND_BUFFER_BYTES). Linux
  grows it to megabytes for a client that reads nothing, and a stream's write only blocks (and
  meets STREAM_WRITE_TIMEOUT_SECONDS) once it is full: minutes of text later, not seconds.

`GuardedSite` is the listening site whose connections go through a `ConnectionGuard`; the guard's
middlewares tell each connection when a request's handler starts and ends, and read bodies.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from gateway_service.http.errors import HttpRefusal, error_body
from shared.config import Settings

log = logging.getLogger(__name__)

TOO_MANY_CONNECTIONS = "TOO_MANY_CONNECTIONS"
BODY_TIMEOUT = "BODY_TIMEOUT"
# Set on a request whose body timed out: its connection is closed after the 408.
BODY_TIMED_OUT = web.RequestKey("body_timed_out", bool)
# A refused connection, or one closed after a 408, may take this long to send the rest of its
# request (read and dropped) before it is closed: the client reads our answer, not a reset.
LINGER_SECONDS = 1.0
# Refused connections lingering at once; past this a refused connection is closed at once.
MAX_LINGERING = 1024
# At most one warning this often while connections are being refused.
WARN_EVERY_SECONDS = 60.0


@dataclass(frozen=True)
class ConnectionLimits:
    header_timeout: float
    body_timeout: float
    idle_timeout: float
    max_connections: int
    send_buffer_bytes: int  # 0: the kernel sizes it

    @classmethod
    def from_settings(cls, settings: Settings) -> ConnectionLimits:
        return cls(
            header_timeout=settings.http_header_timeout_seconds,
            body_timeout=settings.http_body_timeout_seconds,
            idle_timeout=settings.http_idle_timeout_seconds,
            max_connections=settings.http_max_connections,
            send_buffer_bytes=settings.http_send_buffer_bytes,
        )


def _refusal() -> bytes:
    """The whole HTTP answer to a connection beyond the cap (nothing of it depends on the
    request, which has not been read)."""
    body = json.dumps(
        error_body(503, "the gateway has too many open connections; retry", TOO_MANY_CONNECTIONS)
    ).encode()
    head = (
        "HTTP/1.1 503 Service Unavailable\r\n"
        "Content-Type: application/json; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Retry-After: 1\r\n"
        "Connection: close\r\n"
        "\r\n"
    )
    return head.encode() + body


REFUSAL = _refusal()


class _State(enum.Enum):
    HEADERS = "headers"  # waiting for a request's headers (the header timeout runs)
    IDLE = "idle"  # between requests (the idle timeout runs)
    BUSY = "busy"  # a handler runs (its own timeouts apply)
    CLOSING = "closing"  # answered and closing: what still comes in is dropped
    REFUSED = "refused"  # beyond the cap: answered 503, closing


class _Connection(asyncio.Protocol):
    """One accepted connection: aiohttp's protocol (made only if the connection is admitted)
    behind the guard's timers, or a refusal."""

    def __init__(self, guard: ConnectionGuard, make: Callable[[], asyncio.Protocol]) -> None:
        self._guard = guard
        self._make = make
        self._inner: asyncio.Protocol | None = None
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._state = _State.HEADERS
        self._lingers = False  # a refusal counted among the guard's lingering ones

    # ---- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport (uvloop's does not derive from asyncio.Transport).
        self._transport = cast(asyncio.Transport, transport)
        if not self._guard._admit(self):
            self._refuse(self._transport)
            return
        self._bound_send_buffer(self._transport)
        self._arm(self._guard.limits.header_timeout)
        self._inner = self._make()
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self._state is _State.IDLE:  # the next request's first bytes: its headers are due
            self._state = _State.HEADERS
            self._arm(self._guard.limits.header_timeout)
        if self._inner is not None and self._state is not _State.CLOSING:
            self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        if self._inner is None:
            return False  # a refused client finished sending: close
        return self._inner.eof_received()

    def pause_writing(self) -> None:
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._inner is not None:
            self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self._guard._forget(self)
        self._transport = None
        if self._inner is not None:
            self._inner.connection_lost(exc)

    # ---- what the middleware tells it -------------------------------------------------------

    def request_started(self) -> None:
        if self._state is not _State.CLOSING:
            self._state = _State.BUSY
            self._disarm()

    def request_finished(self, close: bool) -> None:
        """The handler has answered; with `close`, the connection is closed shortly after."""
        if close or self._state is _State.CLOSING:
            self._state = _State.CLOSING
            self._arm(LINGER_SECONDS)
        else:
            self._state = _State.IDLE
            self._arm(self._guard.limits.idle_timeout)

    # ---- timers -----------------------------------------------------------------------------

    def _arm(self, seconds: float) -> None:
        self._disarm()
        self._timer = asyncio.get_running_loop().call_later(seconds, self._expire)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expire(self) -> None:
        self._timer = None
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        if self._state in (_State.HEADERS, _State.IDLE):
            self._guard.timed_out[self._state.value] += 1
            log.debug("http: closing a connection after its %s timeout", self._state.value)
        # Nothing may stay queued for a client that does not read: drop it rather than wait.
        if transport.get_write_buffer_size():
            transport.abort()
        else:
            transport.close()

    def _refuse(self, transport: asyncio.Transport) -> None:
        self._state = _State.REFUSED
        transport.write(REFUSAL)
        if self._guard._lingering >= MAX_LINGERING:
            transport.close()
            return
        self._guard._lingering += 1
        self._lingers = True
        if transport.can_write_eof():
            transport.write_eof()  # our side is done; the client's rest is read and dropped
        self._arm(LINGER_SECONDS)

    def _bound_send_buffer(self, transport: asyncio.Transport) -> None:
        size = self._guard.limits.send_buffer_bytes
        sock = transport.get_extra_info("socket")
        if size and sock is not None:
            with contextlib.suppress(OSError):  # not a socket that has one: nothing to bound
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)


class ConnectionGuard:
    """The connections of one HTTP server: their count, their timers, and the two middlewares
    (`middleware`, outermost; `body_middleware`, innermost) that drive them."""

    def __init__(self, limits: ConnectionLimits) -> None:
        self.limits = limits
        self._open: dict[asyncio.BaseTransport, _Connection] = {}
        self._lingering = 0
        self.refused = 0
        self.timed_out: dict[str, int] = {"headers": 0, "idle": 0, "body": 0}
        self._warned_at = -WARN_EVERY_SECONDS

    @property
    def open_connections(self) -> int:
        return len(self._open)

    def protocol_factory(self, make: Callable[[], asyncio.Protocol]) -> Callable[[], _Connection]:
        """What the listening socket makes for each accepted connection: `make` is aiohttp's
        own factory (the runner's Server), called only for admitted connections."""
        return lambda: _Connection(self, make)

    def _admit(self, connection: _Connection) -> bool:
        transport = connection._transport
        assert transport is not None
        if len(self._open) < self.limits.max_connections:
            self._open[transport] = connection
            return True
        self.refused += 1
        now = time.monotonic()
        if now - self._warned_at >= WARN_EVERY_SECONDS:
            self._warned_at = now
            log.warning(
                "http: %d connections open (HTTP_MAX_CONNECTIONS): refusing new ones with 503",
                len(self._open),
            )
        return False

    def _forget(self, connection: _Connection) -> None:
        if connection._lingers:
            self._lingering -= 1
            connection._lingers = False
        elif connection._transport is not None:
            self._open.pop(connection._transport, None)

    def _connection(self, request: web.Request) -> _Connection | None:
        transport = request.transport
        return None if transport is None else self._open.get(transport)

    def middleware(self) -> Middleware:
        """Outermost: the connection's timers stop while a handler runs and restart after it;
        a request whose body timed out closes its connection."""
        guard = self

        @web.middleware
        async def track(request: web.Request, handler: Handler) -> web.StreamResponse:
            connection = guard._connection(request)
            if connection is None:
                return await handler(request)
            connection.request_started()
            close = False
            try:
                response = await handler(request)
                close = request.get(BODY_TIMED_OUT, False)
                if close and not response.prepared:
                    response.force_close()
                return response
            finally:
                connection.request_finished(close)

        return track

    def body_middleware(self) -> Middleware:
        """Innermost (inside the JSON error middleware): the whole body, within the body
        timeout, else 408. A body over the size limit is still aiohttp's 413."""
        timeout = self.limits.body_timeout
        guard = self

        @web.middleware
        async def read_body(request: web.Request, handler: Handler) -> web.StreamResponse:
            if request.body_exists:
                try:
                    async with asyncio.timeout(timeout):
                        await request.read()
                except TimeoutError:
                    guard.timed_out["body"] += 1
                    request[BODY_TIMED_OUT] = True
                    raise HttpRefusal(
                        408, f"the request body did not arrive within {timeout:g}s", BODY_TIMEOUT
                    ) from None
            return await handler(request)

        return read_body


class GuardedSite(web.BaseSite):
    """A TCP site (as aiohttp's TCPSite) whose connections go through `guard`."""

    __slots__ = ("_guard", "_host", "_port")

    def __init__(self, runner: web.BaseRunner, host: str, port: int, guard: ConnectionGuard):
        super().__init__(runner, backlog=1024)
        self._host = host
        self._port = port
        self._guard = guard

    @property
    def name(self) -> str:
        return f"http://{self._host}:{self._port}"

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None
        self._server = await asyncio.get_running_loop().create_server(
            self._guard.protocol_factory(server),
            self._host,
            self._port,
            backlog=self._backlog,
            reuse_port=True,  # WORKERS share the port, as the gRPC server does by default
        )


CONNECTIONS = web.AppKey("connection_guard", ConnectionGuard)
