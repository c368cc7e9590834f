"""Pieces both wire formats share: ids, JSON bodies, streaming, stats."""

from __future__ import annotations

import asyncio
import json
import math
import random
import socket
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any

from aiohttp import web

from provider_sim.script import Plan

JSON_TYPE = "application/json"
SSE_HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
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
# Requests seen per (route, user text) carrying a `fail_times` directive.
ATTEMPTS: web.AppKey[dict[tuple[str, str], int]] = web.AppKey("provider_sim_attempts", dict)


# One encoder for the process: json.dumps(..., separators=...) would build a new one per call.
_encode = json.JSONEncoder(separators=(",", ":")).encode
SLOT = "\u0000slot\u0000"  # placeholder text in templates rendered once, filled per delta


def encode_json(payload: object) -> bytes:
    return _encode(payload).encode()


def random_id(prefix: str, length: int) -> str:
    # Opaque ids of the providers' shape (prefix + fixed length); hex keeps them cheap to make.
    return prefix + format(random.getrandbits(4 * length), f"0{length}x")


def json_response(payload: object, status: int, headers: dict[str, str]) -> web.Response:
    return web.Response(
        body=encode_json(payload), status=status, headers=headers, content_type=JSON_TYPE
    )


def malformed_json_response(headers: dict[str, str]) -> web.Response:
    # Valid start, truncated object: JSON parsers fail on it, as on a body cut by a proxy.
    return web.Response(
        body=b'{"id": "broken", "content": [', headers=headers, content_type=JSON_TYPE
    )


def bearer_key(request: web.Request) -> str | None:
    auth = request.headers.get("Authorization", "")
    return auth[7:].strip() if auth[:7].lower() == "bearer " else None


class _SseResponse(web.StreamResponse):
    # Hold the headers back until the first body write, so an unpaced stream leaves in a
    # single send (headers, events and the last chunk), as a JSON answer does.
    _send_headers_immediately = False


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
    response = _SseResponse(status=200, headers={**SSE_HEADERS, **headers})
    await response.prepare(request)
    delta_list = list(deltas)
    if cut is not None:
        delta_list = delta_list[:cut]
    try:
        if pace <= 0:
            # One write for the whole body: the cheap path benchmarks take.
            if cut is None:
                await response.write_eof(b"".join([*head, *delta_list, *tail]))
            else:
                await response.write(b"".join([*head, *delta_list]))
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
    data = _encode(payload)
    if event is None:
        return f"data: {data}\n\n".encode()
    return f"event: {event}\ndata: {data}\n\n".encode()


def text_event(event: str | None, payload: object) -> Callable[[str], bytes]:
    """An SSE event rendered once around SLOT; calling it fills in one delta's text.

    Streams send one event per word: encoding only the word keeps a stream's cost near a JSON
    answer's."""
    head, tail = sse(event, payload).split(encode_json(SLOT), 1)
    return lambda text: head + encode_json(text) + tail


def scripted_failure(
    request: web.Request, plan: Plan, user_text: str, model: str
) -> int | str | None:
    """What this request fails with: `fail` always; `down` when it asks for that model;
    `fail_times` for its first N requests (the same route and user text); None: serve it."""
    if plan.fail is not None:
        return plan.fail
    if plan.down is not None and plan.down[0] == model:
        what = plan.down[1]
        return what if what in ("reset", "cut") else int(what)
    if plan.fail_times is None:
        return None
    what, times = plan.fail_times
    attempts = request.app[ATTEMPTS]
    key = (request.path, user_text)
    attempts[key] = seen = attempts.get(key, 0) + 1
    if seen > times:
        return None
    return what if what in ("reset", "cut") else int(what)


ErrorResponse = Callable[[int, dict[str, str]], web.Response]


def scripted_outcome(
    request: web.Request,
    plan: Plan,
    user_text: str,
    body: dict[str, Any],
    headers: dict[str, str],
    error_response: ErrorResponse,
) -> web.Response | Plan:
    """What a request whose directives script a failure gets instead of its answer (an error
    in the provider's format, or a reset connection), else the plan to answer it by (a `cut`
    stream: its opening events only)."""
    failure = scripted_failure(request, plan, user_text, body["model"])
    if isinstance(failure, int):
        return error_response(failure, retry_after_headers(plan, headers))
    if failure == "reset" or (failure == "cut" and body.get("stream") is not True):
        return reset_connection(request)
    if failure == "cut":
        return replace(plan, cut=0, pace=0.0)
    return plan


def retry_after_headers(plan: Plan, headers: dict[str, str]) -> dict[str, str]:
    if plan.retry_after is None:
        return headers
    return {
        **headers,
        "retry-after": str(math.ceil(plan.retry_after)),
        "retry-after-ms": str(round(plan.retry_after * 1000)),
    }


def reset_connection(request: web.Request) -> web.Response:
    """Drop the connection with a TCP reset before any answer (a crashed proxy, a dead peer)."""
    transport = request.transport
    if transport is not None:
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()
    return web.Response(status=500)  # never sent: the connection is gone
