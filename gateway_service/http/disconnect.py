"""Noticing a client that went away, as gRPC does: the call is cancelled, so the core releases a
hold (unary) or settles what was consumed (stream), instead of finishing work nobody reads.

aiohttp does not cancel handlers on a disconnect by default (and the webhook route must not be
cancelled), so the calls that meter tokens run their work in a task and watch the connection.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

from aiohttp import web

from gateway_service.errors import Failure, GatewayError
from gateway_service.http.state import STATE

T = TypeVar("T")

POLL_SECONDS = 0.1
# nginx's code for "the client closed the request": only ever seen in access logs.
CLIENT_CLOSED_REQUEST = 499


class ClientGone(Exception):
    """The client disconnected before its call finished; the call was cancelled."""


def client_gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


def shutting_down() -> GatewayError:
    return GatewayError(
        Failure.UNAVAILABLE, "SHUTTING_DOWN", "the gateway is shutting down; retry the call"
    )


async def until_disconnected(
    request: web.Request, work: Coroutine[Any, Any, T], poll: float = POLL_SECONDS
) -> T:
    """Runs `work` to its end, or cancels it (and waits for its cleanup) once the client has
    disconnected, raising ClientGone. A shutdown past its grace cancels the work (a
    GatewayError SHUTTING_DOWN for the caller); a cancelled handler cancels it too."""
    task = asyncio.create_task(work)
    request.app[STATE].add_call(task)
    try:
        while True:
            done, _ = await asyncio.wait((task,), timeout=poll)
            if done:
                if task.cancelled():
                    raise shutting_down()
                return task.result()
            if client_gone(request):
                break
    except asyncio.CancelledError:
        await _cancel(task)
        raise
    await _cancel(task)
    raise ClientGone


async def _cancel(task: asyncio.Task[Any]) -> None:
    task.cancel()
    await asyncio.wait((task,))  # its cleanup (settle or release) runs to the end
    if not task.cancelled():
        task.exception()  # retrieved: finished some other way while being cancelled
