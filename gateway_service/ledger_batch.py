"""Concurrent hot-path writes to the ledger, carried together by one ApplyBatch call.

One gRPC call costs the gateway and the ledger far more CPU than the write it carries (at 32
callers most of the ledger's time per call was gRPC itself), so writes waiting at the same moment
travel together. Natural batching, no timer: a write leaves at once when fewer than `in_flight`
batches are out (a lone caller waits for nobody); otherwise it joins the next batch, which leaves
as soon as one comes back. Each write keeps its own answer, error and idempotency, exactly as if
sent alone: the ledger applies each one as its own call would."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import grpc

from shared import tracing
from shared.gen.rpcai.ledger.v1 import ledger_pb2 as lpb

log = logging.getLogger(__name__)

Send = Callable[[lpb.ApplyBatchRequest, float], Awaitable[lpb.ApplyBatchResponse]]
# Exceptions for one write, built per write (an exception object is never shared by two tasks).
FailureOf = Callable[[grpc.aio.AioRpcError | None], BaseException]

MAX_ITEMS = 64
# Well under gRPC's 4 MiB message bound; a larger write (a settle with a big stored answer) goes
# alone.
MAX_BYTES = 1 << 20


class BatchUnsupported(Exception):
    """The ledger has no ApplyBatch (an older ledger during a rolling upgrade)."""


@dataclass
class _Item:
    write: lpb.LedgerWrite
    future: asyncio.Future[lpb.LedgerWriteResult]
    deadline: float
    size: int = field(default=0)
    # The writer's trace context (its write's span), when tracing is on.
    trace: tracing.Context | None = None


class WriteBatcher:
    def __init__(
        self,
        send: Send,
        failure_of: FailureOf,
        timeout: float,
        max_items: int = MAX_ITEMS,
        in_flight: int = 2,
    ) -> None:
        self._send_rpc = send
        self._failure_of = failure_of
        self.timeout = timeout
        self.max_items = max_items
        self.max_in_flight = in_flight
        self.supported = True
        self._queue: list[_Item] = []
        self._in_flight = 0
        self._launch_pending = False
        self._tasks: set[asyncio.Task[None]] = set()

    async def write(self, write: lpb.LedgerWrite) -> lpb.LedgerWriteResult:
        """The write's result (its response or its error status); raises what a failed
        ApplyBatch call stands for (from `failure_of`), or BatchUnsupported."""
        loop = asyncio.get_running_loop()
        item = _Item(write, loop.create_future(), loop.time() + self.timeout, write.ByteSize())
        if tracing.enabled():
            item.trace = tracing.current_context()
        self._queue.append(item)
        self._schedule()
        return await item.future

    def _schedule(self) -> None:
        if self._queue and self._in_flight < self.max_in_flight and not self._launch_pending:
            # On the next turn of the loop: writes made in this turn leave together.
            self._launch_pending = True
            asyncio.get_running_loop().call_soon(self._launch)

    def _launch(self) -> None:
        self._launch_pending = False
        now = asyncio.get_running_loop().time()
        while self._queue and self._in_flight < self.max_in_flight:
            batch: list[_Item] = []
            size = 0
            while self._queue and len(batch) < self.max_items:
                item = self._queue[0]
                if batch and size + item.size > MAX_BYTES:
                    break
                del self._queue[0]
                if item.future.done():  # its caller is gone before it left: never sent
                    continue
                if item.deadline <= now:  # waited out its deadline in the queue: never sent
                    item.future.set_exception(self._failure_of(None))
                    continue
                batch.append(item)
                size += item.size
            if not batch:
                continue
            self._in_flight += 1
            task = asyncio.get_running_loop().create_task(self._send(batch, now))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _send(self, batch: list[_Item], now: float) -> None:
        try:
            # No write waits past its own deadline.
            timeout = max(0.001, min(item.deadline for item in batch) - now)
            request = lpb.ApplyBatchRequest(writes=[item.write for item in batch])
            try:
                sending = self._send_rpc(request, timeout)
                if tracing.enabled():
                    # In the lone write's trace, or a batch span linked to each write's.
                    sending = tracing.sent_in_batch(sending, [item.trace for item in batch])
                reply = await sending
            except grpc.aio.AioRpcError as exc:
                if exc.code() is grpc.StatusCode.UNIMPLEMENTED:
                    self.supported = False
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(
                            BatchUnsupported()
                            if exc.code() is grpc.StatusCode.UNIMPLEMENTED
                            else self._failure_of(exc)
                        )
                return
            except asyncio.CancelledError:
                for item in batch:
                    item.future.cancel()
                raise
            except Exception:
                # Anything else (a closed channel...): its callers must not wait forever.
                log.exception("an ApplyBatch call failed before the ledger answered")
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(self._failure_of(None))
                return
            if len(reply.results) != len(batch):
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(self._failure_of(None))
                return
            for item, result in zip(batch, reply.results, strict=True):
                if not item.future.done():
                    item.future.set_result(result)
        finally:
            self._in_flight -= 1
            self._schedule()
