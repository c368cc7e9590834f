"""The HTTP side of the process-wide stream cap (gateway_service.stream_slots): a streaming
handler holds one slot for as long as it runs, or is refused at once, before it reads or
reserves anything, with the API's JSON error: 503, reason TOO_MANY_STREAMS, Retry-After."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable

from aiohttp import hdrs, web

from gateway_service import stream_slots
from gateway_service.http.errors import error_response
from gateway_service.http.state import STREAMS

StreamHandler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def too_many_streams() -> web.Response:
    return error_response(
        503,
        stream_slots.MESSAGE,
        stream_slots.REASON,
        headers={hdrs.RETRY_AFTER: str(stream_slots.RETRY_AFTER_SECONDS)},
    )


def one_stream_slot(handler: StreamHandler) -> StreamHandler:
    @functools.wraps(handler)
    async def counted(request: web.Request) -> web.StreamResponse:
        slots = request.app[STREAMS]
        if not slots.take():
            return too_many_streams()
        try:
            return await handler(request)
        finally:
            slots.release()

    return counted
