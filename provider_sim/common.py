"""Pieces both wire formats share: ids, JSON bodies, streaming, stats."""

from __future__ import annotations

import asyncio
import json
import random
import string
from collections.abc import Iterable
from dataclasses import dataclass

from aiohttp import web

_ALPHABET = string.ascii_letters + string.digits
JSON_TYPE = "application/json"
SSE_HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
    "Connection": "keep-alive",
}


@dataclass(slots=True)
class SimStats:
    """Counters tests read to see what the server observed (plain ints: no per-request logging)."""

    requests: int = 0
    streams_completed: int = 0
    streams_cut: int = 0
    # The client went away before the stream ended (seen on paced streams or during a delay).
    client_disconnects: int = 0


STATS: web.AppKey[SimStats] = web.AppKey("provider_sim_stats", SimStats)
API_KEYS: web.AppKey[frozenset[str] | None] = web.AppKey("provider_sim_api_keys")


def random_id(prefix: str, length: int) -> str:
    return prefix + "".join(random.choices(_ALPHABET, k=length))


def json_response(payload: object, status: int, headers: dict[str, str]) -> web.Response:
    body = json.dumps(payload, separators=(",", ":")).encode()
    return web.Response(body=body, status=status, headers=headers, content_type=JSON_TYPE)


def malformed_json_response(headers: dict[str, str]) -> web.Response:
    # Valid start, truncated object: JSON parsers fail on it, as on a body cut by a proxy.
    return web.Response(
        body=b'{"id": "broken", "content": [', headers=headers, content_type=JSON_TYPE
    )


def bearer_key(request: web.Request) -> str | None:
    auth = request.headers.get("Authorization", "")
    return auth[7:].strip() if auth[:7].lower() == "bearer " else None


async def stream_events(
    request: web.Request,
    headers: dict[str, str],
    head: Iterable[bytes],
    deltas: Iterable[bytes],
    tail: Iterable[bytes],
    pace: float,
    cut: int | None,
) -> web.StreamResponse:
    """Send an SSE body: head events, deltas (paced if asked), tail events, or drop after `cut`."""
    stats = request.app[STATS]
    response = web.StreamResponse(status=200, headers={**SSE_HEADERS, **headers})
    await response.prepare(request)
    delta_list = list(deltas)
    if cut is not None:
        delta_list = delta_list[:cut]
    try:
        if pace <= 0:
            # One write for the whole body: the cheap path benchmarks take.
            body = b"".join([*head, *delta_list, *(() if cut is not None else tail)])
            await response.write(body)
        else:
            await response.write(b"".join(head))
            for chunk in delta_list:
                await asyncio.sleep(pace)
                await response.write(chunk)
            if cut is None:
                await response.write(b"".join(tail))
    except ConnectionError:
        stats.client_disconnects += 1
        return response
    except asyncio.CancelledError:  # handler cancelled: the client closed the connection
        stats.client_disconnects += 1
        raise
    if cut is not None:
        stats.streams_cut += 1
        # Close the socket without the terminating chunk: the client sees an incomplete body.
        if request.transport is not None:
            request.transport.close()
        return response
    stats.streams_completed += 1
    return response


async def pause(request: web.Request, seconds: float) -> None:
    if seconds <= 0:
        return
    try:
        await asyncio.sleep(seconds)
    except asyncio.CancelledError:
        request.app[STATS].client_disconnects += 1
        raise


def sse(event: str | None, payload: object) -> bytes:
    data = json.dumps(payload, separators=(",", ":"))
    if event is None:
        return f"data: {data}\n\n".encode()
    return f"event: {event}\ndata: {data}\n\n".encode()
