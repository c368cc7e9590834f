"""A gRPC proxy in front of a real ledger, on real sockets, that can fail chosen methods: the
ledger answering INTERNAL, UNKNOWN, CANCELLED or UNAVAILABLE to a Settle, before applying it or
after (the answer lost on the way back). Bytes pass through untouched, metadata (the service
token) and rich error details included.

The gateway sends its hot-path writes in batches, as messages on an ApplyBatches stream (or as
ApplyBatch calls). Each batch counts and is recorded as an "ApplyBatch" call, whichever way it
came; each write in one counts and is recorded as a call of its own method (a batched Settle is a
"Settle"), and a fault on that method fails that write alone, as the ledger would answer it inside
a batch: not applied, or applied with its answer replaced by the error. A fault on "ApplyBatch"
fails the whole call (on a stream: the stream, and every batch on it; a fault with code OK ends
the stream cleanly, the batch not forwarded, as a ledger shutting down does); one on "ApplyBatches"
refuses the stream when it opens. Methods named in `missing` are not there at all, as in an older
ledger (UNIMPLEMENTED); they are still counted."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.rpc import status_pb2

from gateway_service.ledger_client import RPC_OF_WRITE
from shared.gen.rpcai.ledger.v1 import ledger_pb2 as lpb


@dataclass
class Fault:
    code: grpc.StatusCode
    # Forward the call first (it is applied), then fail: the caller never sees the answer.
    after_forwarding: bool = False
    # How many calls fail; None: until the fault is removed.
    times: int | None = None


class LedgerProxy(grpc.GenericRpcHandler):
    def __init__(self, target: str) -> None:
        self.target = target
        self.faults: dict[str, Fault] = {}
        self.calls: dict[str, int] = {}
        self.requests: dict[str, list[bytes]] = {}  # each call's serialized request, by method
        # Awaited before a call of that method goes on (to hold it, or slow it down).
        self.before: dict[str, Callable[[], Awaitable[None]]] = {}
        # Called with each answer to a write of that method carried in a batch, before it goes
        # back (e.g. to answer as an older ledger would, without a field it added since).
        self.answered: dict[str, Callable[[Any], None]] = {}
        self.missing: set[str] = set()
        self._channel = grpc.aio.insecure_channel(target)
        self._server = grpc.aio.server()
        self._server.add_generic_rpc_handlers((self,))
        self.address = ""

    async def start(self) -> str:
        port = self._server.add_insecure_port("127.0.0.1:0")
        await self._server.start()
        self.address = f"127.0.0.1:{port}"
        return self.address

    async def stop(self) -> None:
        await self._server.stop(0)
        await self._channel.close()

    async def __aenter__(self) -> LedgerProxy:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def service(
        self, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        method = handler_call_details.method
        if method.endswith("/Watch"):
            return None  # the only streaming method (health Watch) is not needed here
        name = method.rsplit("/", 1)[1]
        if name in self.missing:
            self.calls[name] = self.calls.get(name, 0) + 1
            return None
        if name == "ApplyBatches":
            return grpc.stream_stream_rpc_method_handler(self._stream)
        forward: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = self._channel.unary_unary(method)

        async def handle(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
            self.calls[name] = self.calls.get(name, 0) + 1
            self.requests.setdefault(name, []).append(request)
            metadata = _forwarded(context)
            if name in self.before:
                await self.before[name]()
            fault = self._take_fault(name)
            if fault is not None and not fault.after_forwarding:
                await context.abort(fault.code, f"injected {fault.code.name}")
            try:
                if name == "ApplyBatch":
                    answer = await self._batch(forward, request, metadata)
                else:
                    answer = await forward(request, metadata=metadata, timeout=10)
            except grpc.aio.AioRpcError as exc:
                await context.abort(exc.code(), exc.details() or "", exc.trailing_metadata())
                raise  # unreachable: abort raises
            if fault is not None:
                await context.abort(fault.code, f"injected {fault.code.name} (answer lost)")
            return answer

        return grpc.unary_unary_rpc_method_handler(handle)

    async def _stream(
        self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[Any, Any]
    ) -> None:
        """ApplyBatches: each message goes on to the ledger as an ApplyBatch call of its own
        (the per-write faults apply), concurrently, and is answered under its batch_id."""
        self.calls["ApplyBatches"] = self.calls.get("ApplyBatches", 0) + 1
        metadata = _forwarded(context)
        opening = self._take_fault("ApplyBatches")
        if opening is not None:
            await context.abort(opening.code, f"injected {opening.code.name}")
        forward: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = self._channel.unary_unary(
            "/rpcai.ledger.v1.LedgerService/ApplyBatch"
        )
        writing = asyncio.Lock()
        failed: asyncio.Future[grpc.StatusCode] = asyncio.get_running_loop().create_future()

        async def one(raw: bytes) -> None:
            self.calls["ApplyBatch"] = self.calls.get("ApplyBatch", 0) + 1
            self.requests.setdefault("ApplyBatch", []).append(raw)
            batch_id = lpb.ApplyBatchRequest.FromString(raw).batch_id
            if "ApplyBatch" in self.before:
                await self.before["ApplyBatch"]()
            fault = self._take_fault("ApplyBatch")
            if fault is not None and not fault.after_forwarding and not failed.done():
                failed.set_result(fault.code)
                return
            answer = lpb.ApplyBatchResponse.FromString(await self._batch(forward, raw, metadata))
            if fault is not None and not failed.done():
                failed.set_result(fault.code)
                return
            answer.batch_id = batch_id
            async with writing:
                await context.write(answer.SerializeToString())

        async def read() -> None:
            async for raw in requests:
                tasks.add(asyncio.create_task(one(raw)))

        tasks: set[asyncio.Task[None]] = set()
        reading = asyncio.create_task(read())
        try:
            await asyncio.wait((reading, failed), return_when=asyncio.FIRST_COMPLETED)
            if failed.done() and failed.result() is not grpc.StatusCode.OK:
                await context.abort(failed.result(), f"injected {failed.result().name}")
            if failed.done():
                return  # ended with OK, what is still running unanswered
            await asyncio.gather(*tasks)
        finally:
            for task in (reading, *tasks):
                task.cancel()

    def _take_fault(self, name: str) -> Fault | None:
        fault = self.faults.get(name)
        if fault is not None and fault.times is not None:
            fault.times -= 1
            if fault.times < 0:
                fault = None
        return fault

    async def _batch(
        self,
        forward: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes],
        request: bytes,
        metadata: tuple[tuple[str, str | bytes], ...],
    ) -> bytes:
        batch = lpb.ApplyBatchRequest.FromString(request)
        results: list[lpb.LedgerWriteResult] = [lpb.LedgerWriteResult() for _ in batch.writes]
        sent = lpb.ApplyBatchRequest()
        sent_at: list[int] = []
        lost: dict[int, Fault] = {}  # applied, then the answer replaced by the fault's error
        for i, write in enumerate(batch.writes):
            kind = write.WhichOneof("write")
            name = RPC_OF_WRITE.get(kind or "", "Unknown")
            self.calls[name] = self.calls.get(name, 0) + 1
            if kind is not None:
                self.requests.setdefault(name, []).append(getattr(write, kind).SerializeToString())
            if name in self.before:
                await self.before[name]()
            fault = self._take_fault(name)
            if fault is not None and not fault.after_forwarding:
                results[i].error.CopyFrom(_injected(fault))
                continue
            if fault is not None:
                lost[i] = fault
            sent.writes.append(write)
            sent_at.append(i)
        if sent.writes:
            raw = await forward(sent.SerializeToString(), metadata=metadata, timeout=10)
            answered = lpb.ApplyBatchResponse.FromString(raw)
            for i, result in zip(sent_at, answered.results, strict=True):
                if i in lost:
                    results[i].error.CopyFrom(_injected(lost[i], " (answer lost)"))
                else:
                    results[i].CopyFrom(result)
                    answer_kind = result.WhichOneof("result")
                    rpc = RPC_OF_WRITE.get(answer_kind or "", "")
                    if rpc in self.answered:
                        self.answered[rpc](getattr(results[i], answer_kind or ""))
        return lpb.ApplyBatchResponse(results=results).SerializeToString()


def _forwarded(context: grpc.aio.ServicerContext[Any, Any]) -> tuple[tuple[str, Any], ...]:
    """The caller's metadata (its service token) to send on to the ledger."""
    return tuple(
        (k, v)
        for k, v in (context.invocation_metadata() or ())
        if not k.startswith(":") and not k.startswith("grpc-")
    )


def _injected(fault: Fault, note: str = "") -> status_pb2.Status:
    return status_pb2.Status(code=fault.code.value[0], message=f"injected {fault.code.name}{note}")
