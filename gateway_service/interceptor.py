"""JWT authentication as a server interceptor.

The interceptor wraps each handler so that, inside the call's own task, the bearer token is
verified and the caller's identity is put in a context variable the servicer reads. No token:
a public caller (identity None), who may only make BYOK calls. A bad token: UNAUTHENTICATED.
"""

from __future__ import annotations

import contextvars
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from gateway_service.auth import AuthError, Identity, JwtVerifier
from shared.grpc_server import is_open_method
from shared.rich_errors import rich_status

DOMAIN = "gateway.rpcai"
_identity: contextvars.ContextVar[Identity | None] = contextvars.ContextVar(
    "identity", default=None
)


def current_identity() -> Identity | None:
    return _identity.get()


def _bearer(metadata: Any) -> str | None:
    for key, value in metadata or ():
        if key == "authorization":
            text = value.decode() if isinstance(value, bytes) else str(value)
            scheme, _, token = text.partition(" ")
            return token.strip() if scheme.lower() == "bearer" else ""
    return None


async def _authenticate(
    verifier: JwtVerifier, context: grpc.aio.ServicerContext[Any, Any]
) -> Identity | None:
    token = _bearer(context.invocation_metadata())
    if token is None:
        return None
    try:
        return await verifier.verify(token)
    except AuthError as exc:
        await context.abort_with_status(
            rich_status(grpc.StatusCode.UNAUTHENTICATED, str(exc), exc.reason, DOMAIN)
        )
        raise AssertionError("unreachable") from None


class JwtInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, verifier: JwtVerifier) -> None:
        self.verifier = verifier

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        if handler is None or is_open_method(handler_call_details.method):
            return handler
        verifier = self.verifier
        if handler.unary_unary is not None:
            inner_unary: Any = handler.unary_unary  # typed for the sync server; ours is async

            async def unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                _identity.set(await _authenticate(verifier, context))
                return await inner_unary(request, context)

            return grpc.unary_unary_rpc_method_handler(
                unary, handler.request_deserializer, handler.response_serializer
            )
        if handler.unary_stream is not None:
            inner_stream: Any = handler.unary_stream

            async def stream(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
                # A coroutine, not a generator: streaming handlers that write their messages
                # themselves (to time each write out) are awaited; generators are written out.
                _identity.set(await _authenticate(verifier, context))
                responses = inner_stream(request, context)
                if hasattr(responses, "__aiter__"):
                    async for item in responses:
                        await context.write(item)
                else:
                    await responses

            return grpc.unary_stream_rpc_method_handler(
                stream, handler.request_deserializer, handler.response_serializer
            )
        return handler
