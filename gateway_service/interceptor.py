"""JWT authentication as a server interceptor, and the one place request messages are decoded.

The interceptor wraps each handler so that, inside the call's own task, the bearer token is
verified and the caller's identity is put in a context variable the servicer reads. No token:
a public caller (identity None), who may only make BYOK calls. A bad token, or more than one
`authorization` entry (never "the first"): UNAUTHENTICATED.

Every handler is registered without a request deserializer and decodes its messages here, after
the token check: a message that is not valid protobuf (a corrupt wire format, a string that is not
UTF-8) is the caller's bad input, INVALID_ARGUMENT / MALFORMED_REQUEST with a fixed message. Left
to gRPC it was UNKNOWN, quoting the decoder's exception class and text, with a traceback at
ERROR. The open services (health, reflection) are decoded the same way, without the token check.
A handler that reads its requests with `context.read()` instead of its iterator would get them
undecoded: ours never do.
"""

from __future__ import annotations

import contextvars
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf.message import DecodeError

from gateway_service.auth import AuthError, Identity, JwtVerifier, bearer_token
from shared.grpc_server import is_open_method
from shared.rich_errors import rich_status

DOMAIN = "gateway.rpcai"
MALFORMED_MESSAGE = "the request is not a valid protobuf message for this method"
_identity: contextvars.ContextVar[Identity | None] = contextvars.ContextVar(
    "identity", default=None
)

if TYPE_CHECKING:
    Handler = grpc.RpcMethodHandler[Any, Any]
else:
    Handler = grpc.RpcMethodHandler
Deserializer = Callable[[bytes], Any] | None


def current_identity() -> Identity | None:
    return _identity.get()


def _bearer(metadata: Any) -> str | None:
    values = [
        value.decode(errors="replace") if isinstance(value, bytes) else str(value)
        for key, value in metadata or ()
        if key == "authorization"
    ]
    return bearer_token(values)


async def _authenticate(
    verifier: JwtVerifier, context: grpc.aio.ServicerContext[Any, Any]
) -> Identity | None:
    try:
        token = _bearer(context.invocation_metadata())
        return None if token is None else await verifier.verify(token)
    except AuthError as exc:
        await context.abort_with_status(
            rich_status(grpc.StatusCode.UNAUTHENTICATED, str(exc), exc.reason, DOMAIN)
        )
        raise AssertionError("unreachable") from None


async def _admit(verifier: JwtVerifier | None, context: grpc.aio.ServicerContext[Any, Any]) -> None:
    if verifier is not None:
        _identity.set(await _authenticate(verifier, context))


async def _decode(
    deserialize: Deserializer, raw: Any, context: grpc.aio.ServicerContext[Any, Any]
) -> Any:
    if deserialize is None:
        return raw
    try:
        return deserialize(raw)
    except DecodeError:
        pass  # its text names our message type and what the decoder disliked: not the caller's
    await context.abort_with_status(
        rich_status(
            grpc.StatusCode.INVALID_ARGUMENT, MALFORMED_MESSAGE, "MALFORMED_REQUEST", DOMAIN
        )
    )
    raise AssertionError("unreachable: abort raises")


async def _decode_each(
    deserialize: Deserializer,
    raw_requests: AsyncIterable[Any],
    context: grpc.aio.ServicerContext[Any, Any],
) -> AsyncIterator[Any]:
    async for raw in raw_requests:
        yield await _decode(deserialize, raw, context)


async def _respond(responses: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
    # A coroutine, not a generator: streaming handlers that write their messages themselves (to
    # time each write out) are awaited; generators are written out.
    if hasattr(responses, "__aiter__"):
        async for item in responses:
            await context.write(item)
    else:
        await responses


def _wrap(handler: Handler, verifier: JwtVerifier | None) -> Handler:
    """`handler`, taking undecoded requests: its caller is admitted (unless `verifier` is None),
    then its requests are decoded, then it runs."""
    deserialize: Deserializer = handler.request_deserializer
    serialize = handler.response_serializer
    # The handlers are typed for the sync server; ours are async.
    if handler.unary_unary is not None:
        inner_unary: Any = handler.unary_unary

        async def unary(raw: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            await _admit(verifier, context)
            return await inner_unary(await _decode(deserialize, raw, context), context)

        return grpc.unary_unary_rpc_method_handler(unary, None, serialize)
    if handler.unary_stream is not None:
        inner_stream: Any = handler.unary_stream

        async def stream(raw: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
            await _admit(verifier, context)
            request = await _decode(deserialize, raw, context)
            await _respond(inner_stream(request, context), context)

        return grpc.unary_stream_rpc_method_handler(stream, None, serialize)
    if handler.stream_unary is not None:
        inner_collect: Any = handler.stream_unary

        async def collect(raws: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            await _admit(verifier, context)
            return await inner_collect(_decode_each(deserialize, raws, context), context)

        return grpc.stream_unary_rpc_method_handler(collect, None, serialize)
    if handler.stream_stream is not None:
        inner_bidi: Any = handler.stream_stream

        async def bidi(raws: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
            await _admit(verifier, context)
            await _respond(inner_bidi(_decode_each(deserialize, raws, context), context), context)

        return grpc.stream_stream_rpc_method_handler(bidi, None, serialize)
    return handler


# More than the gateway has methods: an unknown method has no handler and is never cached.
_MAX_WRAPPED_METHODS = 256


class JwtInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, verifier: JwtVerifier) -> None:
        self.verifier = verifier
        # Each method's wrapped handler, built once (the server hands back the same handler
        # for a method on every call): the same object each call also lets the observing
        # interceptor before this one keep its own wrapper.
        self._wrapped: dict[str, tuple[Handler, Handler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = _wrap(handler, None if is_open_method(method) else self.verifier)
        if len(self._wrapped) < _MAX_WRAPPED_METHODS:
            self._wrapped[method] = (handler, wrapped)
        return wrapped
