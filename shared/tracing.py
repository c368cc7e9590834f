"""OpenTelemetry tracing: edge → gateway → ledger → provider, in one trace per call.

Off unless OTEL_EXPORTER_OTLP_ENDPOINT is set, and then free: nothing is instrumented at all (no
interceptor, middleware or trace config exists; neither the tracing SDK nor the instrumentations
are even imported). The wiring asks `enabled()` when it builds each server, channel and session,
so `setup_tracing` (or, in tests, `enable_for_tests`) must run before the service's app is
created.

What is traced, when on:
- both gRPC servers (the OpenTelemetry aio server interceptor, first in the chain so calls the
  auth interceptors refuse are traced too; health and reflection are not);
- the gateway's ledger channel (the aio client interceptors) and every hot-path write: each
  write gets a client span of its own in its caller's context, named for the RPC it stands for
  (`rpcai.ledger.v1.LedgerService/Reserve`...). An ApplyBatch carrying one write is sent under
  that write's span, so the ledger's spans join the caller's trace; one carrying several gets a
  span of its own (`ledger.batch`, a new trace) with a link to each write's span, and carries
  each write's trace context in `rpcai-write-traceparents` metadata, so the ledger's span for
  each write (`ledger.apply Reserve`...) still joins its caller's trace, linked to the batch;
- the provider calls (the aiohttp client trace config on the SDKs' sessions);
- the HTTP edge (the aiohttp server middleware, outermost; /healthz, /readyz and /metrics not);
- the gateway core's call (`gateway.generate`, `gateway.stream`), with provider, model, user
  type, token counts.

Context crosses processes as W3C `traceparent` (gRPC metadata, HTTP headers) and nothing else:
baggage is not propagated (a caller's baggage would otherwise travel to the ledger and to the
providers), unless OTEL_PROPAGATORS says otherwise.

Nothing secret, and no user id, is ever put on a span by our code, and every span passes a
scrubber before any exporter sees it (`scrub`), whatever the instrumentations or the
OTEL_* variables would record: captured headers and metadata are dropped (so
OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_* cannot leak an Authorization header), URLs lose their
query string, exception events keep only the exception's type (its message and traceback may
quote anything: the logs have them), and status descriptions keep only what precedes the first
":" (a code, not the message that followed it)."""

from __future__ import annotations

import contextvars
import itertools
import logging
import os
import warnings
from collections.abc import AsyncGenerator, Awaitable, Callable, Coroutine, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar
from urllib.parse import urlsplit

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Link, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

Context = otel_context.Context

if TYPE_CHECKING:
    import aiohttp
    import grpc
    from aiohttp import web
    from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
    from opentelemetry.util.types import Attributes

    from shared.config import Settings
    from shared.gen.rpcai.ledger.v1 import ledger_pb2 as lpb

log = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")
E = TypeVar("E")

GATEWAY_SERVICE_NAME = "rpcai-gateway"
LEDGER_SERVICE_NAME = "rpcai-ledger"
LEDGER_SERVICE = "rpcai.ledger.v1.LedgerService"
# Each write's `traceparent` (or "" for none) in a multi-write ApplyBatch, in order.
WRITE_PARENTS_KEY = "rpcai-write-traceparents"
# Served by the edge for probes and scrapes: not calls, not traced.
UNTRACED_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})

_provider: TracerProvider | None = None
_tracer: trace.Tracer = trace.NoOpTracer()
_propagator = TraceContextTextMapPropagator()
# The per-write `traceparent`s of the multi-write ApplyBatch being sent (see client_interceptors).
_write_parents: contextvars.ContextVar[str] = contextvars.ContextVar(
    "rpcai_write_parents", default=""
)


def enabled() -> bool:
    """Whether tracing is on in this process (the wiring installs nothing when it is not)."""
    return _provider is not None


def tracer() -> trace.Tracer:
    """Our own spans' tracer (a no-op one when tracing is off)."""
    return _tracer


# ---- set-up and shutdown ----------------------------------------------------------------------


def traces_url(endpoint: str) -> str:
    """OTEL_EXPORTER_OTLP_ENDPOINT is the collector's base URL: traces go to `/v1/traces` under
    it (as the OTLP exporter specification says for the all-signals variable)."""
    return endpoint.rstrip("/") + "/v1/traces"


def setup_tracing(settings: Settings, service_name: str) -> bool:
    """Exports this process's spans over OTLP/HTTP (batched, in a background thread) when
    OTEL_EXPORTER_OTLP_ENDPOINT is set, as OTEL_SERVICE_NAME or `service_name`; returns whether
    tracing is on. OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, when set, wins over the derived URL;
    OTEL_EXPORTER_OTLP_HEADERS, OTEL_TRACES_SAMPLER, OTEL_BSP_* apply as the SDK documents."""
    endpoint = settings.otel_exporter_otlp_endpoint.strip()
    if not endpoint:
        return False
    if enabled():
        return True
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    explicit = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip()
    url = explicit or traces_url(endpoint)
    name = settings.otel_service_name or service_name
    _install(BatchSpanProcessor(OTLPSpanExporter(endpoint=url)), name)
    parts = urlsplit(url)
    where = f"{parts.hostname}:{parts.port}" if parts.port else parts.hostname
    # Scheme, host and port only: a URL may carry credentials.
    log.info("tracing on: spans of %s go to %s://%s", name, parts.scheme, where)
    return True


def enable_for_tests(processor: SpanProcessor, service_name: str = "rpcai-test") -> None:
    """Turns tracing on with `processor` (e.g. a SimpleSpanProcessor over an
    InMemorySpanExporter); the spans it sees have passed the scrubber. Undo with `shutdown()`."""
    shutdown()
    _install(processor, service_name)


def _install(processor: SpanProcessor, service_name: str) -> None:
    global _provider, _tracer
    from opentelemetry import propagate
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider

    # Our own provider, passed explicitly to every instrumentation: the global one can be set
    # only once per process, and tests turn tracing on and off.
    provider = TracerProvider(resource=Resource.create({SERVICE_NAME: service_name}))
    provider.add_span_processor(_scrubbed(processor))
    if "OTEL_PROPAGATORS" not in os.environ:
        propagate.set_global_textmap(_propagator)
    _provider = provider
    _tracer = provider.get_tracer("rpcai")


def shutdown() -> None:
    """Flushes what is still buffered and turns tracing off (blocking: at most the exporter's
    timeout). Called when a service stops."""
    global _provider, _tracer
    provider, _provider = _provider, None
    _tracer = trace.NoOpTracer()
    if provider is not None:
        provider.shutdown()


# ---- what the wiring installs (nothing when off) -------------------------------------------


def server_interceptors() -> list[grpc.aio.ServerInterceptor]:
    """The gRPC server interceptor to put first in a server's chain; none when off."""
    if _provider is None:
        return []
    from opentelemetry.instrumentation.grpc import aio_server_interceptor

    from shared.grpc_server import is_open_method

    def traced(details: grpc.HandlerCallDetails) -> bool:
        return not is_open_method(details.method or "")

    interceptor: grpc.aio.ServerInterceptor = aio_server_interceptor(  # type: ignore[no-untyped-call]
        tracer_provider=_provider, filter_=traced
    )
    return [interceptor]


def client_interceptors() -> list[grpc.aio.ClientInterceptor]:
    """The gRPC client interceptors of the gateway's ledger channel; none when off. Health
    checks (the edge's readiness probe) are not traced."""
    if _provider is None:
        return []
    from opentelemetry.instrumentation.grpc import aio_client_interceptors

    from shared.grpc_server import is_open_method

    def traced(details: grpc.ClientCallDetails) -> bool:
        method = details.method
        if isinstance(method, bytes):
            method = method.decode()
        return not is_open_method(method)

    interceptors: list[grpc.aio.ClientInterceptor] = aio_client_interceptors(  # type: ignore[no-untyped-call]
        tracer_provider=_provider, filter_=traced
    )
    return [*interceptors, _write_parents_interceptor()]


def http_client_trace_configs() -> list[aiohttp.TraceConfig] | None:
    """The aiohttp trace config of the provider sessions; None (aiohttp's default) when off.
    Request and response headers are never captured; the URL is recorded without its query."""
    if _provider is None:
        return None
    from opentelemetry.instrumentation.aiohttp_client import create_trace_config
    from opentelemetry.metrics import NoOpMeterProvider

    def without_query(url: Any) -> str:
        return str(url.with_query(None).with_fragment(None))

    return [
        create_trace_config(
            url_filter=without_query,
            tracer_provider=_provider,
            meter_provider=NoOpMeterProvider(),  # tracing only: metrics are Prometheus's
        )
    ]


def edge_middlewares() -> list[Any]:
    """The aiohttp server middleware, to put outermost on the HTTP edge; none when off."""
    if _provider is None:
        return []
    from aiohttp import web
    from opentelemetry.instrumentation import aiohttp_server

    instrumentor = aiohttp_server.AioHttpServerInstrumentor()
    if not instrumentor.is_instrumented_by_opentelemetry:
        # instrument() is the one public way to set the middleware's module state (excluded
        # URLs, its request counter); it also patches web.Application for every app in the
        # process, which is undone at once: the middleware goes on the edge alone, explicitly.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # its web.Application subclass
            instrumentor.instrument(tracer_provider=_provider)
        instrumentor.uninstrument()
    traced = aiohttp_server.create_aiohttp_middleware(tracer_provider=_provider)

    @web.middleware
    async def tracing_middleware(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if request.path in UNTRACED_PATHS:
            return await handler(request)
        response: web.StreamResponse = await traced(request, handler)
        return response

    return [tracing_middleware]


# ---- our own spans ----------------------------------------------------------------------------


def _end_on_error(span: trace.Span, exc: BaseException) -> None:
    """The error's reason code (never its message) as the span's status."""
    if isinstance(exc, Exception):
        reason = getattr(exc, "reason", None)
        span.set_status(Status(StatusCode.ERROR, str(reason or type(exc).__name__)))


@contextmanager
def _current(span: trace.Span) -> Iterator[trace.Span]:
    """`span` current until the block ends, then ended; an exception sets its status to the
    error's reason (no exception event: its message may quote anything)."""
    with trace.use_span(
        span, end_on_exit=True, record_exception=False, set_status_on_exception=False
    ):
        try:
            yield span
        except BaseException as exc:
            _end_on_error(span, exc)
            raise


def traced_call(
    name: str,
    start: Callable[P, Attributes],
    end: Callable[[Any], Attributes],
) -> Callable[[Callable[P, Coroutine[Any, Any, R]]], Callable[P, Coroutine[Any, Any, R]]]:
    """A coroutine function run in a span of its own when tracing is on; attributes from its
    arguments (`start`) and its result (`end`), built only when the span records. When off the
    call goes straight through (the decorated function returns the same coroutine)."""

    def decorate(
        fn: Callable[P, Coroutine[Any, Any, R]],
    ) -> Callable[P, Coroutine[Any, Any, R]]:
        async def run_traced(*args: P.args, **kwargs: P.kwargs) -> R:
            span = _tracer.start_span(name)
            with _current(span):
                if span.is_recording():
                    span.set_attributes(start(*args, **kwargs) or {})
                result = await fn(*args, **kwargs)
                if span.is_recording():
                    span.set_attributes(end(result) or {})
                return result

        def call(*args: P.args, **kwargs: P.kwargs) -> Coroutine[Any, Any, R]:
            if _provider is None:
                return fn(*args, **kwargs)
            return run_traced(*args, **kwargs)

        call.__doc__, call.__name__, call.__qualname__ = fn.__doc__, fn.__name__, fn.__qualname__
        return call

    return decorate


def traced_stream(
    name: str,
    start: Callable[P, Attributes],
    end: Callable[[Any], Attributes],
) -> Callable[[Callable[P, AsyncGenerator[E]]], Callable[P, AsyncGenerator[E]]]:
    """`traced_call` for an async generator: the span lives from the first step to the close,
    and is current only while the generator itself runs (never in its consumer's code between
    two items), so no context is left attached across a yield. `end` sees every item."""

    def decorate(fn: Callable[P, AsyncGenerator[E]]) -> Callable[P, AsyncGenerator[E]]:
        async def run_traced(*args: P.args, **kwargs: P.kwargs) -> AsyncGenerator[E]:
            span = _tracer.start_span(name)
            scope = trace.set_span_in_context(span)
            recording = span.is_recording()
            if recording:
                span.set_attributes(start(*args, **kwargs) or {})
            # Created (not started) under the span: whatever it spawns inherits it.
            token = otel_context.attach(scope)
            try:
                inner = fn(*args, **kwargs)
            finally:
                otel_context.detach(token)
            try:
                while True:
                    token = otel_context.attach(scope)
                    try:
                        item = await anext(inner)
                    except StopAsyncIteration:
                        return
                    except BaseException as exc:
                        _end_on_error(span, exc)
                        raise
                    finally:
                        otel_context.detach(token)
                    if recording:
                        span.set_attributes(end(item) or {})
                    yield item
            finally:
                token = otel_context.attach(scope)
                try:
                    await inner.aclose()
                finally:
                    otel_context.detach(token)
                    span.end()

        def call(*args: P.args, **kwargs: P.kwargs) -> AsyncGenerator[E]:
            if _provider is None:
                return fn(*args, **kwargs)
            return run_traced(*args, **kwargs)

        call.__doc__, call.__name__, call.__qualname__ = fn.__doc__, fn.__name__, fn.__qualname__
        return call

    return decorate


@contextmanager
def write_span(rpc: str) -> Iterator[trace.Span]:
    """The client span of one ledger write (`rpc`: the method it stands for, e.g. "Reserve"),
    current in its caller's context while the write is under way (and retried)."""
    span = _tracer.start_span(
        f"{LEDGER_SERVICE}/{rpc}",
        kind=SpanKind.CLIENT,
        attributes={"rpc.system": "grpc", "rpc.service": LEDGER_SERVICE, "rpc.method": rpc},
    )
    with _current(span):
        yield span


def current_context() -> Context:
    return otel_context.get_current()


async def sent_in_batch(send: Awaitable[R], contexts: Sequence[Context | None]) -> R:
    """Awaits the ApplyBatch call `send` (not started yet) in the right trace: a lone write's
    context (the call joins that write's trace), or, for several, a span of the batch's own in
    a new trace, linked to each write's span, with each write's `traceparent` in the call's
    metadata (see `write_applier`)."""
    if len(contexts) == 1:
        token = otel_context.attach(contexts[0] or Context())
        try:
            return await send
        finally:
            otel_context.detach(token)
    links: list[Link] = []
    parents: list[str] = []
    for context in contexts:
        span_context = trace.get_current_span(context).get_span_context() if context else None
        carrier: dict[str, str] = {}
        if span_context is not None and span_context.is_valid:
            links.append(Link(span_context))
            _propagator.inject(carrier, context=context)
        parents.append(carrier.get("traceparent", ""))
    span = _tracer.start_span(
        "ledger.batch",
        context=Context(),  # a trace of its own, not its first writer's
        links=links,
        attributes={"rpcai.batch.writes": len(contexts)},
    )
    with _current(span):
        marked = _write_parents.set(",".join(parents))
        try:
            return await send
        finally:
            _write_parents.reset(marked)


def _write_parents_interceptor() -> grpc.aio.UnaryUnaryClientInterceptor:
    import grpc

    class WriteParents(grpc.aio.UnaryUnaryClientInterceptor):
        """Adds the per-write trace contexts `sent_in_batch` set to the ApplyBatch call."""

        async def intercept_unary_unary(
            self,
            continuation: Callable[[grpc.aio.ClientCallDetails, Any], Any],
            client_call_details: grpc.aio.ClientCallDetails,
            request: Any,
        ) -> Any:
            parents = _write_parents.get()
            if parents:
                metadata = grpc.aio.Metadata(*tuple(client_call_details.metadata or ()))
                metadata.add(WRITE_PARENTS_KEY, parents)
                client_call_details = grpc.aio.ClientCallDetails(
                    client_call_details.method,
                    client_call_details.timeout,
                    metadata,
                    client_call_details.credentials,
                    client_call_details.wait_for_ready,
                )
            return await continuation(client_call_details, request)

    return WriteParents()


def _write_name(kind: str) -> str:
    return "".join(part.title() for part in kind.split("_"))  # extend_hold -> ExtendHold


def write_applier(
    apply: Callable[[lpb.LedgerWrite], Awaitable[lpb.LedgerWriteResult]],
    context: grpc.aio.ServicerContext[Any, Any],
) -> Callable[[lpb.LedgerWrite], Awaitable[lpb.LedgerWriteResult]]:
    """`apply` with a span per write (`ledger.apply Reserve`...), for the ledger's ApplyBatch.
    Call it once per write, in the batch's order. Under the ApplyBatch server span for a lone
    write; for one of several, under the write's own client span when the call carried it
    (its caller's trace), linked to the batch's server span."""
    server = trace.get_current_span().get_span_context()
    parents: list[str] = []
    for key, value in context.invocation_metadata() or ():
        if key == WRITE_PARENTS_KEY:
            parents = (value.decode() if isinstance(value, bytes) else str(value)).split(",")
    position = itertools.count()

    def traced(write: lpb.LedgerWrite) -> Awaitable[lpb.LedgerWriteResult]:
        # The index is taken now, when the batch's coroutines are made (in order), not when
        # each starts running.
        return run(write, next(position))

    async def run(write: lpb.LedgerWrite, index: int) -> lpb.LedgerWriteResult:
        kind = write.WhichOneof("write") or "none"
        parent: Context | None = None
        links: list[Link] = []
        if index < len(parents) and parents[index]:
            parent = _propagator.extract({"traceparent": parents[index]})
            if server.is_valid:
                links.append(Link(server))
        span = _tracer.start_span(
            f"ledger.apply {_write_name(kind)}",
            context=parent,
            links=links,
            attributes={"rpcai.batch.index": index},
        )
        with _current(span):
            result = await apply(write)
            if result.WhichOneof("result") == "error":
                from shared.rich_errors import status_info

                info = status_info(result.error)
                span.set_status(Status(StatusCode.ERROR, info.reason if info else "ERROR"))
            return result

    return traced


# ---- the scrubber -----------------------------------------------------------------------------

_DROPPED_PREFIXES = (
    "http.request.header.",
    "http.response.header.",
    "rpc.request.metadata.",
    "rpc.response.metadata.",
)
_DROPPED_KEYS = frozenset({"url.query"})
_URL_KEYS = frozenset({"http.url", "url.full", "http.target"})
_EXCEPTION_KEPT = frozenset({"exception.type", "exception.escaped"})


def _clean(attributes: Attributes, keep: frozenset[str] | None = None) -> dict[str, Any] | None:
    """The attributes without what may hold a secret; None when nothing had to go."""
    if not attributes:
        return None
    cleaned: dict[str, Any] = {}
    changed = False
    for key, value in attributes.items():
        if keep is not None and key not in keep:
            changed = True
            continue
        if key in _DROPPED_KEYS or key.startswith(_DROPPED_PREFIXES):
            changed = True
            continue
        if key in _URL_KEYS and isinstance(value, str) and ("?" in value or "#" in value):
            value = value.split("#", 1)[0].split("?", 1)[0]
            changed = True
        cleaned[key] = value
    return cleaned if changed else None


def _scrubbed(inner: SpanProcessor) -> SpanProcessor:
    """A SpanProcessor in front of `inner` that hands it each ended span without what may hold
    a secret (see the module's doc). A span with nothing to remove is passed as it is."""
    from opentelemetry.sdk.trace import SpanProcessor

    class Scrubbed(SpanProcessor):
        def on_start(self, span: Any, parent_context: Context | None = None) -> None:
            inner.on_start(span, parent_context=parent_context)

        def _on_ending(self, span: Any) -> None:
            inner._on_ending(span)

        def on_end(self, span: ReadableSpan) -> None:
            inner.on_end(scrub(span))

        def shutdown(self) -> None:
            inner.shutdown()

        def force_flush(self, timeout_millis: int = 30000) -> bool:
            return inner.force_flush(timeout_millis)

    return Scrubbed()


def scrub(span: ReadableSpan) -> ReadableSpan:
    from opentelemetry.sdk.trace import Event
    from opentelemetry.sdk.trace import ReadableSpan as Readable

    attributes = _clean(span.attributes)
    events: list[Event] | None = None
    for i, event in enumerate(span.events):
        keep = _EXCEPTION_KEPT if event.name == "exception" else None
        cleaned = _clean(event.attributes, keep)
        if cleaned is not None:
            events = events if events is not None else list(span.events)
            events[i] = Event(event.name, cleaned, event.timestamp)
    status = span.status
    description = status.description or ""
    if ":" in description:
        status = Status(status.status_code, description.split(":", 1)[0])
    if attributes is None and events is None and status is span.status:
        return span
    return Readable(
        name=span.name,
        context=span.context,
        parent=span.parent,
        resource=span.resource,
        attributes=attributes if attributes is not None else span.attributes,
        events=events if events is not None else span.events,
        links=span.links,
        kind=span.kind,
        status=status,
        start_time=span.start_time,
        end_time=span.end_time,
        instrumentation_scope=span.instrumentation_scope,
    )
