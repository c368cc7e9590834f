"""What the HTTP handlers share through the aiohttp Application: the core, the JWT verifier, the
edge's own state (requests in flight, draining for a graceful shutdown), and the process's stream
slots (gateway_service.stream_slots, shared with the gRPC server)."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from gateway_service.auth import JwtVerifier
from gateway_service.client_address import ClientAddresses
from gateway_service.core import Gateway
from gateway_service.stream_slots import StreamSlots


class EdgeState:
    """Counts requests in flight so a shutdown can wait for them; `draining` makes /readyz
    answer 503 so load balancers stop sending traffic first. Metered calls register their
    task, so a shutdown past its grace can cancel them while their client still listens (a
    stream is told why, a hold is settled or released) before the connections close."""

    def __init__(self) -> None:
        self.draining = False
        self.in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._calls: set[asyncio.Task[Any]] = set()

    def add_call(self, task: asyncio.Task[Any]) -> None:
        self._calls.add(task)
        task.add_done_callback(self._calls.discard)

    async def cancel_calls(self) -> None:
        calls = list(self._calls)
        for task in calls:
            task.cancel()
        if calls:
            await asyncio.wait(calls)

    def middleware(self) -> Middleware:
        state = self

        @web.middleware
        async def track(request: web.Request, handler: Handler) -> web.StreamResponse:
            state.in_flight += 1
            state._idle.clear()
            try:
                return await handler(request)
            finally:
                state.in_flight -= 1
                if state.in_flight == 0:
                    state._idle.set()

        return track

    async def wait_idle(self, within: float) -> bool:
        """True once no request is in flight, False if some still are after `within` seconds."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), within)
        return self._idle.is_set()


GATEWAY = web.AppKey("gateway", Gateway)
ADDRESSES = web.AppKey("client_addresses", ClientAddresses)
VERIFIER = web.AppKey("verifier", JwtVerifier)
STATE = web.AppKey("edge_state", EdgeState)
STREAMS = web.AppKey("stream_slots", StreamSlots)
