"""One record per request, whatever the transport: its request id, trace id, method, status and
latency, and what the call was (user type, tokens charged), logged as one access line and
counted in the request metrics.

The transport opens the record (the gRPC `ObservingInterceptor` here, the HTTP edge's
middleware); code deeper in the call adds what only it knows with `note(...)`, which does nothing
outside a request. The record never holds a prompt, completion, key or token: only the fields
below exist.

The request id is the caller's `x-request-id` when it is a plain short token (so a caller can
follow its own id through our logs), else a fresh one; it is returned in the `x-request-id`
response header (HTTP) or trailing metadata (gRPC)."""

from __future__ import annotations

import contextvars
import inspect
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc
from opentelemetry import trace

from shared.grpc_server import is_open_method
from shared.metrics import GRPC_HANDLED, GRPC_SECONDS

if TYPE_CHECKING:
    Handler = grpc.RpcMethodHandler[Any, Any]
    Context = grpc.aio.ServicerContext[Any, Any]
else:
    Handler = grpc.RpcMethodHandler
    Context = grpc.aio.ServicerContext

access_log = logging.getLogger("rpcai.access")

REQUEST_ID_HEADER = "x-request-id"
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
_TRACEPARENT = re.compile(r"[0-9a-f]{2}-([0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}")


@dataclass(slots=True)
class RequestRecord:
    request_id: str
    method: str
    trace_id: str = ""
    user_type: str = ""
    tokens_charged: int | None = None


_current: contextvars.ContextVar[RequestRecord | None] = contextvars.ContextVar(
    "request_record", default=None
)


def request_id_from(offered: str | None) -> str:
    if offered and _REQUEST_ID.fullmatch(offered):
        return offered
    return uuid.uuid4().hex


def trace_id_from(traceparent: str | None) -> str:
    """The current span's trace id when tracing is on; else the caller's W3C `traceparent`'s,
    so a request still joins the caller's trace in the logs."""
    context = trace.get_current_span().get_span_context()
    if context.is_valid:
        return format(context.trace_id, "032x")
    if traceparent:
        match = _TRACEPARENT.fullmatch(traceparent.strip())
        if match and match.group(1) != "0" * 32:
            return match.group(1)
    return ""


def begin(method: str, request_id: str, traceparent: str | None) -> RequestRecord:
    record = RequestRecord(request_id, method, trace_id_from(traceparent))
    _current.set(record)
    return record


def current() -> RequestRecord | None:
    return _current.get()


def note(*, user_type: str | None = None, tokens_charged: int | None = None) -> None:
    """Adds what the call was to the current request's record (no-op outside a request)."""
    record = _current.get()
    if record is None:
        return
    if user_type is not None:
        record.user_type = user_type
    if tokens_charged is not None:
        record.tokens_charged = tokens_charged


def log_request(record: RequestRecord, status: str, seconds: float) -> None:
    if not access_log.isEnabledFor(logging.INFO):
        return
    fields: dict[str, object] = {
        "request_id": record.request_id,
        "trace_id": record.trace_id,
        "method": record.method,
        "status": status,
        "latency_ms": round(seconds * 1000, 3),
    }
    if record.user_type:
        fields["user_type"] = record.user_type
    if record.tokens_charged is not None:
        fields["tokens_charged"] = record.tokens_charged
    access_log.info("%s %s %.1fms", record.method, status, seconds * 1000, extra=fields)


# ---- gRPC -------------------------------------------------------------------------------------


def _metadata_value(metadata: Iterable[tuple[str, Any]] | None, key: str) -> str | None:
    for k, value in metadata or ():
        if k == key:
            return value.decode(errors="replace") if isinstance(value, bytes) else str(value)
    return None


class _Context:
    """The servicer's context with the request id kept in whatever trailing metadata the
    servicer sets or aborts with (gRPC would otherwise replace ours with theirs)."""

    def __init__(self, inner: Context, request_id: str) -> None:
        self._inner = inner
        self._id = ((REQUEST_ID_HEADER, request_id),)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def set_trailing_metadata(self, metadata: Any) -> None:
        self._inner.set_trailing_metadata(tuple(metadata) + self._id)

    async def abort(
        self, code: grpc.StatusCode, details: str = "", trailing_metadata: Any = ()
    ) -> Any:
        await self._inner.abort(code, details, tuple(trailing_metadata) + self._id)

    async def abort_with_status(self, status: grpc.Status) -> Any:
        await self.abort(status.code, status.details, status.trailing_metadata)


def _code_name(context: Context, default: grpc.StatusCode) -> str:
    code = context.code()
    if code is None:
        return default.name
    if isinstance(code, grpc.StatusCode):
        return code.name
    return grpc.StatusCode(code).name if not isinstance(code, int) else _code_of_int(code)


def _code_of_int(value: int) -> str:
    for code in grpc.StatusCode:
        if code.value[0] == value:
            return code.name
    return "UNKNOWN"


# More than any service has methods: the cache cannot grow with what callers send (an unknown
# method has no handler and is never cached).
_MAX_OBSERVED_METHODS = 256


class ObservingInterceptor(grpc.aio.ServerInterceptor):
    """Counts and times every call and logs it as one access line. First in the chain, so the
    calls the auth interceptor refuses are seen too. Health and reflection are left alone."""

    def __init__(self) -> None:
        # The observed form of each method's handler, built once: the server hands back the
        # same handler object for a method on every call (a refusal's is new each time, and is
        # wrapped anew), so the per-call cost is one dict lookup, not closures and label lookups.
        self._observed: dict[str, tuple[Handler, Handler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = await continuation(details)
        if handler is None or is_open_method(details.method):
            return handler
        cached = self._observed.get(details.method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        observed = _observed(handler, details.method)
        if len(self._observed) < _MAX_OBSERVED_METHODS:
            self._observed[details.method] = (handler, observed)
        return observed


def _observed(handler: Handler, method: str) -> Handler:
    service, _, name = method.lstrip("/").rpartition("/")
    seconds_metric = GRPC_SECONDS.labels(service, name)

    def open_call(context: Context) -> tuple[RequestRecord, _Context, float]:
        metadata = context.invocation_metadata()
        request_id = request_id_from(_metadata_value(metadata, REQUEST_ID_HEADER))
        record = begin(method, request_id, _metadata_value(metadata, "traceparent"))
        context.set_trailing_metadata(((REQUEST_ID_HEADER, request_id),))
        return record, _Context(context, request_id), time.perf_counter()

    handled: dict[str, Any] = {}  # status code -> its counter child

    def close_call(record: RequestRecord, context: Context, started: float, code: str) -> None:
        elapsed = time.perf_counter() - started
        counter = handled.get(code)
        if counter is None:
            counter = handled[code] = GRPC_HANDLED.labels(service, name, code)
        counter.inc()
        seconds_metric.observe(elapsed)
        log_request(record, code, elapsed)

    def outcome(context: Context, exc: BaseException | None) -> str:
        if exc is None:
            return _code_name(context, grpc.StatusCode.OK)
        if isinstance(exc, grpc.aio.AbortError):
            return _code_name(context, grpc.StatusCode.UNKNOWN)
        if isinstance(exc, BaseException) and not isinstance(exc, Exception):
            return grpc.StatusCode.CANCELLED.name
        return grpc.StatusCode.UNKNOWN.name

    def wrap_call(behavior: Any) -> Any:
        if inspect.isasyncgenfunction(behavior):

            async def generator(request: Any, context: Context) -> AsyncIterator[Any]:
                record, proxy, started = open_call(context)
                failure: BaseException | None = None
                try:
                    async for item in behavior(request, proxy):
                        yield item
                except BaseException as exc:
                    failure = exc
                    raise
                finally:
                    close_call(record, context, started, outcome(context, failure))

            return generator

        async def call(request: Any, context: Context) -> Any:
            record, proxy, started = open_call(context)
            failure: BaseException | None = None
            try:
                return await behavior(request, proxy)
            except BaseException as exc:
                failure = exc
                raise
            finally:
                close_call(record, context, started, outcome(context, failure))

        return call

    for kind in ("unary_unary", "unary_stream", "stream_unary", "stream_stream"):
        behavior = getattr(handler, kind)
        if behavior is not None:
            # RpcMethodHandler is a namedtuple at run time (typed as a plain class).
            replaced: Handler = handler._replace(**{kind: wrap_call(behavior)})  # type: ignore[attr-defined]
            return replaced
    return handler
