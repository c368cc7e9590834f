"""Service-to-service auth: every call must carry `authorization: Bearer <LEDGER_SERVICE_TOKEN>`.

The ledger mints money, so nothing but our own services may call it. Health and reflection stay
open (they reveal no data), for load balancers, grpcurl and ghz.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from shared.grpc_server import is_open_method
from shared.rich_errors import rich_status

DOMAIN = "ledger.rpcai"


def _deny(
    message: str, method: grpc.RpcMethodHandler[Any, Any] | None
) -> grpc.RpcMethodHandler[Any, Any]:
    """A handler that refuses the call, of the same kind as the method's own: a streaming
    method's caller is refused at once, not after the first message it sends."""

    async def abort(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        await context.abort_with_status(
            rich_status(grpc.StatusCode.UNAUTHENTICATED, message, "UNAUTHENTICATED", DOMAIN)
        )

    if method is not None and method.request_streaming and method.response_streaming:
        return grpc.stream_stream_rpc_method_handler(abort)
    if method is not None and method.request_streaming:
        return grpc.stream_unary_rpc_method_handler(abort)
    if method is not None and method.response_streaming:
        return grpc.unary_stream_rpc_method_handler(abort)
    return grpc.unary_unary_rpc_method_handler(abort)


class ServiceTokenInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, token: str) -> None:
        if not token:
            raise ValueError("a service token is required")
        self._expected = f"Bearer {token}".encode()

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        if is_open_method(handler_call_details.method):
            return await continuation(handler_call_details)
        presented = b""
        for key, value in handler_call_details.invocation_metadata or ():
            if key == "authorization":
                presented = value.encode() if isinstance(value, str) else value
                break
        # Constant time: the comparison must not tell an attacker how much of a guess was right.
        if presented and hmac.compare_digest(presented, self._expected):
            return await continuation(handler_call_details)
        method = await continuation(handler_call_details)
        return _deny("invalid service token" if presented else "missing service token", method)
