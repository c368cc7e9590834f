"""Server-Sent Events for a streamed generation.

    event: delta   data: {"text": "..."}        one per chunk of text
    event: usage   data: {provider, model, stopReason, usage, tokenUsage, usageInfo}
    event: done    data: {}
    event: error   data: {"error": {code, message, reason}}   instead of usage/done on a failure
                                                              (or a shutdown past its grace)

A refusal before the first event (bad input, insufficient balance, a provider that refuses at
once) is an ordinary JSON error with its HTTP status: nothing has been streamed yet. The core's
generator is always closed, so an abandoned stream is settled for what was consumed. A client
that reads nothing for `write_timeout` seconds is treated as gone: its connection is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncGenerator, Mapping
from typing import Any

from aiohttp import hdrs, web

from gateway_service.core import Admitted, Delta, GenerateResult, StreamEvent
from gateway_service.errors import GatewayError
from gateway_service.http import views
from gateway_service.http.errors import error_body, gateway_error, gateway_error_response
from gateway_service.limits.rate import RateInfo, rate_headers

HEADERS = {
    hdrs.CONTENT_TYPE: "text/event-stream; charset=utf-8",
    hdrs.CACHE_CONTROL: "no-cache",
    "X-Accel-Buffering": "no",  # proxies such as nginx must not buffer the stream
}


def encode(event: str, data: Mapping[str, Any]) -> bytes:
    # json.dumps never emits a raw newline, so one `data:` line carries the whole payload.
    payload = json.dumps(data, separators=(",", ":"), ensure_ascii=False)
    return f"event: {event}\ndata: {payload}\n\n".encode()


class ClientStalled(Exception):
    """A write to the client did not complete within the write timeout."""


class SseStream:
    def __init__(self, request: web.Request, write_timeout: float) -> None:
        self.request = request
        self.write_timeout = write_timeout
        self.response: web.StreamResponse | None = None

    async def _write(self, response: web.StreamResponse, data: bytes) -> None:
        try:
            async with asyncio.timeout(self.write_timeout):
                await response.write(data)
        except TimeoutError:
            raise ClientStalled from None

    async def run(self, events: AsyncGenerator[StreamEvent]) -> web.StreamResponse:
        async with contextlib.aclosing(events):
            rate: RateInfo | None = None
            try:
                event = await anext(events)
                if isinstance(event, Admitted):
                    rate = event.rate
                    event = await anext(events)
            except GatewayError as exc:
                return gateway_error_response(exc)
            response = self.response = web.StreamResponse(headers={**HEADERS, **rate_headers(rate)})
            await response.prepare(self.request)
            try:
                while True:
                    if isinstance(event, GenerateResult):
                        await self._write(response, encode("usage", views.stream_usage(event)))
                        await self._write(response, encode("done", {}))
                        break
                    if isinstance(event, Delta):
                        await self._write(response, encode("delta", {"text": event.text}))
                    event = await anext(events)
            except GatewayError as exc:
                _, body, _ = gateway_error(exc)
                with contextlib.suppress(ConnectionResetError, ClientStalled):
                    await self._write(response, encode("error", body))
            except ConnectionResetError:
                return response  # the client left; closing `events` settles what was consumed
            except ClientStalled:
                # Not reading: the connection is closed, and closing `events` settles what the
                # stream consumed so far.
                if self.request.transport is not None:
                    self.request.transport.abort()
                return response
            except asyncio.CancelledError:
                # The server is shutting down past its grace (or the client left): say so if
                # anyone still listens; closing `events` settles what was consumed.
                body = error_body(503, "the gateway is shutting down; retry", "SHUTTING_DOWN")
                with contextlib.suppress(ConnectionResetError, ClientStalled):
                    await self._write(response, encode("error", body))
                    await response.write_eof()
                raise
        with contextlib.suppress(ConnectionResetError, TimeoutError):
            async with asyncio.timeout(self.write_timeout):
                await response.write_eof()
        return response
