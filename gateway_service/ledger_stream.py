"""The batches of hot-path writes (ledger_batch.WriteBatcher) as messages on one long-lived
ApplyBatches stream to the ledger, each matched to its answer by `batch_id`.

Why: a gRPC call costs both sides more than twice what a message on an open stream costs (on
the 2-core machine, an empty unary call took ~390 us of server and ~300 us of client CPU, a
stream message ~170 us each), and at one caller the two ledger round trips are most of a
metered call's latency.

- The stream opens with the first batch, and again after it ends. A batch whose stream ended
  before its answer goes again on a new stream while its deadline lasts (ATTEMPTS sendings in
  all): a clean end means the ledger was shutting down and never read it; after a failure its
  writes may have been applied, and their idempotency makes the second sending change nothing.
- A stream has no deadline per message: a batch's deadline is kept here, and past it the batch
  fails as a call past its deadline would (DEADLINE_EXCEEDED: outcome unknown). The message
  carries what is left of it (`timeout_ms`), so the ledger does not begin a write nobody waits
  for any more (a Reserve applied then would hold its tokens until its TTL).
- Messages are written by one task per stream, never by the caller: cancelling a gRPC write
  cancels the whole call, and with it every other batch on the stream.
- A ledger without ApplyBatches (an older one during a rolling upgrade: UNIMPLEMENTED) gets
  ApplyBatch calls from then on.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
from collections.abc import Awaitable, Callable

import grpc

from shared.gen.rpcai.ledger.v1 import ledger_pb2 as lpb

log = logging.getLogger(__name__)

Call = grpc.aio.StreamStreamCall[lpb.ApplyBatchRequest, lpb.ApplyBatchResponse]
Open = Callable[[], Call]
Unary = Callable[[lpb.ApplyBatchRequest, float], Awaitable[lpb.ApplyBatchResponse]]

ATTEMPTS = 3
# Before sending again after a failed stream (a clean end goes again at once), as gRPC's retry
# policy waits between a lone call's attempts.
BACKOFF = (0.05, 0.15)


class _Ended(Exception):
    """The stream ended before this batch's answer; `error` is None for a clean end."""

    def __init__(self, error: grpc.aio.AioRpcError | None) -> None:
        super().__init__("the ApplyBatches stream ended")
        self.error = error


def _status(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


def _copy(error: grpc.aio.AioRpcError) -> grpc.aio.AioRpcError:
    """A fresh exception for one batch (an exception object is never shared by two tasks)."""
    return grpc.aio.AioRpcError(
        error.code(),
        error.initial_metadata() or grpc.aio.Metadata(),
        error.trailing_metadata() or grpc.aio.Metadata(),
        error.details(),
        error.debug_error_string(),
    )


class _Stream:
    """One open ApplyBatches call: its writer, its reader, the batches waiting for answers."""

    def __init__(self, call: Call, on_end: Callable[[_Stream], None]) -> None:
        self.call = call
        self.waiting: dict[int, asyncio.Future[lpb.ApplyBatchResponse]] = {}
        # Each batch with its deadline (the event loop's clock).
        self.outgoing: asyncio.Queue[tuple[lpb.ApplyBatchRequest, float]] = asyncio.Queue()
        self.ended = False
        self._on_end = on_end
        self._writer = asyncio.create_task(self._write())
        self._reader = asyncio.create_task(self._read())

    async def _write(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            request, deadline = await self.outgoing.get()
            if request.batch_id not in self.waiting:
                continue  # its caller gave up while it queued here: never sent
            request.timeout_ms = max(1, math.ceil(1000 * (deadline - loop.time())))
            try:
                await self.call.write(request)
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
                return  # the stream is over: the reader fails what waits
            except Exception:
                log.exception("writing to the ledger's stream failed")
                self.call.cancel()  # the reader ends it and fails what waits
                return

    async def _read(self) -> None:
        error: grpc.aio.AioRpcError | None = None
        try:
            while True:
                response = await self.call.read()
                if response is grpc.aio.EOF:
                    break
                assert isinstance(response, lpb.ApplyBatchResponse)
                answer = self.waiting.get(response.batch_id)
                if answer is not None and not answer.done():
                    answer.set_result(response)
        except grpc.aio.AioRpcError as exc:
            error = exc
        except Exception:
            log.exception("reading the ledger's stream failed")
            self.call.cancel()
            error = _status(grpc.StatusCode.UNKNOWN, "reading the ledger's stream failed")
        finally:
            self.ended = True
            self._writer.cancel()
            self._on_end(self)
            for answer in self.waiting.values():
                if not answer.done():
                    answer.set_exception(_Ended(None if error is None else _copy(error)))

    async def close(self) -> None:
        self.call.cancel()
        for task in (self._writer, self._reader):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


class BatchStream:
    def __init__(self, open_call: Open, unary: Unary) -> None:
        self._open = open_call
        self._unary = unary
        self._stream: _Stream | None = None
        self._ids = itertools.count(1)
        self._closed = False
        # False once the ledger said it has no ApplyBatches: ApplyBatch calls from then on.
        self.supported = True

    @property
    def open(self) -> bool:
        """A stream is open now (it opens with the next batch otherwise)."""
        return self._stream is not None and not self._stream.ended

    def _current(self) -> _Stream:
        if self._stream is None or self._stream.ended:
            self._stream = _Stream(self._open(), self._forget)
        return self._stream

    def _forget(self, stream: _Stream) -> None:
        if self._stream is stream:
            self._stream = None

    async def send(self, request: lpb.ApplyBatchRequest, within: float) -> lpb.ApplyBatchResponse:
        """The batch's answer within `within` seconds; raises grpc.aio.AioRpcError as an
        ApplyBatch call would."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        if not self.supported or self._closed:
            return await self._unary(request, within)
        for attempt in range(ATTEMPTS):
            if self._closed:
                break
            stream = self._current()
            batch_id = next(self._ids)
            request.batch_id = batch_id
            answer: asyncio.Future[lpb.ApplyBatchResponse] = loop.create_future()
            stream.waiting[batch_id] = answer
            stream.outgoing.put_nowait((request, deadline))
            try:
                async with asyncio.timeout_at(deadline):
                    return await answer
            except TimeoutError:
                raise _status(
                    grpc.StatusCode.DEADLINE_EXCEEDED, "the ledger did not answer in time"
                ) from None
            except _Ended as ended:
                error = ended.error
            finally:
                del stream.waiting[batch_id]
            if error is not None and error.code() is grpc.StatusCode.UNIMPLEMENTED:
                log.warning("the ledger has no ApplyBatches: sending ApplyBatch calls")
                self.supported = False
                return await self._unary(request, max(0.001, deadline - loop.time()))
            if error is not None and error.code() is not grpc.StatusCode.UNAVAILABLE:
                # The stream's status, not an answer about this batch (which may have been
                # applied): never the ledger's last word on its writes.
                raise _status(
                    grpc.StatusCode.UNKNOWN,
                    f"the ledger's stream ended ({error.code().name}): {error.details()}",
                )
            if attempt + 1 < ATTEMPTS and error is not None:
                await asyncio.sleep(min(BACKOFF[attempt], max(0.0, deadline - loop.time())))
        raise _status(grpc.StatusCode.UNAVAILABLE, "the ledger's stream ended before it answered")

    async def close(self) -> None:
        self._closed = True
        if self._stream is not None:
            await self._stream.close()
            self._stream = None
