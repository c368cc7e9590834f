"""A gRPC proxy in front of a real ledger, on real sockets, that can fail chosen methods: the
ledger answering INTERNAL, UNKNOWN, CANCELLED or UNAVAILABLE to a Settle, before applying it or
after (the answer lost on the way back). Bytes pass through untouched, metadata (the service
token) and rich error details included."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import grpc


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

    def service(
        self, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        method = handler_call_details.method
        if method.endswith("/Watch"):
            return None  # the only streaming method (health Watch) is not needed here
        forward: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = self._channel.unary_unary(method)
        name = method.rsplit("/", 1)[1]

        async def handle(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
            self.calls[name] = self.calls.get(name, 0) + 1
            self.requests.setdefault(name, []).append(request)
            metadata = tuple(
                (k, v)
                for k, v in (context.invocation_metadata() or ())
                if not k.startswith(":") and not k.startswith("grpc-")
            )
            fault = self.faults.get(name)
            if fault is not None and fault.times is not None:
                fault.times -= 1
                if fault.times < 0:
                    fault = None
            if fault is not None and not fault.after_forwarding:
                await context.abort(fault.code, f"injected {fault.code.name}")
            try:
                answer: bytes = await forward(request, metadata=metadata, timeout=10)
            except grpc.aio.AioRpcError as exc:
                await context.abort(exc.code(), exc.details() or "", exc.trailing_metadata())
                raise  # unreachable: abort raises
            if fault is not None:
                await context.abort(fault.code, f"injected {fault.code.name} (answer lost)")
            return answer

        return grpc.unary_unary_rpc_method_handler(handle)
