"""OpenTelemetry tracing across the real stack, in one process on real sockets: a ledger on a fresh
database, the provider stand-in over HTTP, the gateway's gRPC server and HTTP edge; spans caught
by an InMemorySpanExporter behind the scrubber (`shared.tracing.enable_for_tests`).

- One POST /v1/generate is one trace: the edge's server span, the core's call span, the Reserve
  and Settle client spans, the ledger's server spans and per-write spans, the provider's HTTP
  client span, each the child it should be.
- One gRPC GenerateText likewise, continuing the caller's `traceparent`.
- Writes sharing one ApplyBatch keep their callers' traces (a batch span linked to each write).
- No span holds the prompt, the completion, a key, the JWT, the service token, the webhook
  secret or the user id, even with every header capture switched on; failed and refused calls
  are traced and leak nothing either.
- Off: no interceptor, middleware or trace config exists.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
import grpc
import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from gateway_service.app import GatewayApp
from gateway_service.app import create_app as create_gateway
from gateway_service.ledger_client import LedgerClient
from ledger_service.app import LedgerApp
from ledger_service.app import create_app as create_ledger
from shared import tracing
from shared.config import Settings
from shared.gen.rpcai.gateway.v1 import gateway_pb2 as gpb
from shared.gen.rpcai.gateway.v1 import gateway_pb2_grpc
from shared.gen.rpcai.ledger.v1 import ledger_pb2 as lpb
from shared.gen.rpcai.ledger.v1 import ledger_pb2_grpc
from tests.conftest import ledger_settings
from tests.e2e.conftest import gateway_settings, mint, sim_url

__all__ = ["sim_url"]  # the session's provider stand-in, from the e2e suite

MARK = uuid.uuid4().hex[:12]
USER = f"MARKER-USER-{MARK}"
SERVICE_TOKEN = f"MARKER-SERVICE-TOKEN-{MARK}"
PROVIDER_KEY = f"sk-MARKER-PROVIDER-KEY-{MARK}"
BYOK_KEY = f"sk-MARKER-BYOK-KEY-{MARK}"
WEBHOOK_SECRET = f"MARKER-WEBHOOK-SECRET-{MARK}"
SYSTEM_PROMPT = f"MARKER-SYSTEM-{MARK}"
IDEMPOTENCY_KEY = f"MARKER-IDEMPOTENCY-{MARK}"


def prompt(directives: str = "[[usage:40,60]]") -> str:
    return f"MARKER-PROMPT-{MARK} {directives} tell me a story"


LEDGER = "/rpcai.ledger.v1.LedgerService/ApplyBatch"
RESERVE = "rpcai.ledger.v1.LedgerService/Reserve"
SETTLE = "rpcai.ledger.v1.LedgerService/Settle"


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    tracing.enable_for_tests(SimpleSpanProcessor(exporter))
    try:
        yield exporter
    finally:
        tracing.shutdown()
    assert not tracing.enabled()


@dataclass
class Stack:
    ledger: LedgerApp
    ledger_address: str
    ledger_stub: ledger_pb2_grpc.LedgerServiceAsyncStub
    gateway: GatewayApp
    stub: gateway_pb2_grpc.AiGatewayAsyncStub
    http_url: str
    session: aiohttp.ClientSession
    jwt: str


def traced_settings(ledger_address: str, sim: str) -> Settings:
    return gateway_settings(
        ledger_address,
        sim,
        ledger_service_token=SERVICE_TOKEN,
        anthropic_api_key=PROVIDER_KEY,
        openai_api_key=PROVIDER_KEY,
        lemonsqueezy_webhook_secret=WEBHOOK_SECRET,
    )


async def _start_stack(database_url: str, sim: str) -> tuple[Stack, Callable[[], Any]]:
    ledger = await create_ledger(
        ledger_settings(ledger_service_token=SERVICE_TOKEN), database_url, run_sweeper=False
    )
    ledger_address = f"127.0.0.1:{await ledger.start('127.0.0.1:0')}"
    gateway = create_gateway(traced_settings(ledger_address, sim))
    grpc_port = await gateway.start("127.0.0.1:0")
    http_port = await gateway.start_http("127.0.0.1:0")
    ledger_channel = grpc.aio.insecure_channel(ledger_address)
    gateway_channel = grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}")
    session = aiohttp.ClientSession()
    stack = Stack(
        ledger,
        ledger_address,
        ledger_pb2_grpc.LedgerServiceStub(ledger_channel),
        gateway,
        gateway_pb2_grpc.AiGatewayStub(gateway_channel),
        f"http://127.0.0.1:{http_port}",
        session,
        mint(USER),
    )

    async def close() -> None:
        await session.close()
        await gateway_channel.close()
        await ledger_channel.close()
        await gateway.close()
        await ledger.close()

    return stack, close


@pytest.fixture
async def stack(
    exporter: InMemorySpanExporter, database_url: str, sim_url: str
) -> AsyncIterator[Stack]:
    built, close = await _start_stack(database_url, sim_url)
    try:
        await built.ledger_stub.CreditPurchase(
            lpb.CreditPurchaseRequest(
                idempotency_key=f"buy-{MARK}",
                user_id=USER,
                tokens_purchased=100_000,
                purchase_type=lpb.PURCHASE_TYPE_ONE_TIME,
                external_id=f"order-{MARK}",
                source="test",
            ),
            metadata=(("authorization", f"Bearer {SERVICE_TOKEN}"),),
        )
        exporter.clear()
        yield built
    finally:
        await close()


# ---- helpers ----------------------------------------------------------------------------------


async def spans_when(
    exporter: InMemorySpanExporter,
    done: Callable[[Sequence[ReadableSpan]], bool],
    within: float = 5.0,
) -> list[ReadableSpan]:
    """The finished spans once `done` holds (server spans end as their answers leave)."""
    deadline = time.monotonic() + within
    while True:
        spans = list(exporter.get_finished_spans())
        if done(spans):
            await asyncio.sleep(0.05)  # anything else of the same call ends too
            return list(exporter.get_finished_spans())
        assert time.monotonic() < deadline, sorted(s.name for s in spans)
        await asyncio.sleep(0.02)


def count(name: str, kind: SpanKind | None = None) -> Callable[[Sequence[ReadableSpan]], int]:
    """How many of the spans have this name (and kind)."""
    return lambda spans: sum(1 for s in spans if s.name == name and kind in (None, s.kind))


def one(spans: Sequence[ReadableSpan], name: str, kind: SpanKind | None = None) -> ReadableSpan:
    found = [s for s in spans if s.name == name and kind in (None, s.kind)]
    assert len(found) == 1, (name, [s.name for s in spans])
    return found[0]


def span_id(span: ReadableSpan) -> int:
    assert span.context is not None
    return int(span.context.span_id)


def parent_id(span: ReadableSpan) -> int | None:
    return int(span.parent.span_id) if span.parent is not None else None


def children(spans: Sequence[ReadableSpan], parent: ReadableSpan) -> list[ReadableSpan]:
    return [s for s in spans if parent_id(s) == span_id(parent)]


def assert_one_consistent_trace(spans: Sequence[ReadableSpan], root_parent: int | None) -> int:
    """All spans share one trace id; every parent is among them except the root's
    (`root_parent`: the caller's span id, or None for a trace we started); returns the id."""
    trace_ids = {int(s.context.trace_id) for s in spans if s.context is not None}
    assert len(trace_ids) == 1, sorted((s.name, s.context) for s in spans)
    ids = {span_id(s) for s in spans}
    roots = [s for s in spans if parent_id(s) not in ids]
    assert [parent_id(s) for s in roots] == [root_parent], [(s.name, parent_id(s)) for s in roots]
    return trace_ids.pop()


def assert_ledger_write(spans: Sequence[ReadableSpan], write: ReadableSpan, rpc: str) -> None:
    """`write` (a client span) -> the ApplyBatch call -> the ledger's server span -> its span
    for the write."""
    call = [s for s in children(spans, write) if s.name == LEDGER]
    assert len(call) == 1, [s.name for s in call]
    assert call[0].kind is SpanKind.CLIENT
    served = children(spans, call[0])
    assert [(s.name, s.kind) for s in served] == [(LEDGER, SpanKind.SERVER)]
    applied = children(spans, served[0])
    assert [s.name for s in applied] == [f"ledger.apply {rpc}"]


def text_of(span: ReadableSpan) -> str:
    """Everything a span carries, as an exporter would see it (name, attributes, events,
    links, status, resource)."""
    return str(span.to_json(indent=None))


def assert_no_secrets(spans: Sequence[ReadableSpan], *extra: str) -> None:
    secrets = {
        "prompt": f"MARKER-PROMPT-{MARK}",
        "system prompt": SYSTEM_PROMPT,
        "user id": USER,
        "service token": SERVICE_TOKEN,
        "provider key": PROVIDER_KEY,
        "byok key": BYOK_KEY,
        "webhook secret": WEBHOOK_SECRET,
        "idempotency key": IDEMPOTENCY_KEY,
        **{f"extra {i}": value for i, value in enumerate(extra)},
    }
    for span in spans:
        text = text_of(span)
        for what, secret in secrets.items():
            assert secret not in text, f"the {what} is in span {span.name!r}: {text}"


def assert_installed(
    app: GatewayApp, on: bool, called: Sequence[str] = ("anthropic", "openai")
) -> None:
    """The edge's middleware, the ledger channel's interceptors and the provider sessions'
    trace configs are there exactly when tracing is on."""
    middleware = [m for m in app.http.app.middlewares if "tracing" in getattr(m, "__name__", "")]
    assert bool(middleware) is on
    if on:
        assert app.http.app.middlewares[0] is middleware[0]  # outermost
    channel: Any = app.ledger.channel
    assert bool(channel._unary_unary_interceptors) is on
    for name in called:
        # The provider's SDK client -> its httpx2 client -> our aiohttp transport.
        provider: Any = app.providers.get(name)
        session = provider._client._client._transport.session
        assert session is not None, f"a call to {name} opened its session"
        assert bool(session._trace_configs) is on


# ---- one call, one trace ----------------------------------------------------------------------


async def test_one_http_call_is_one_trace(
    stack: Stack, exporter: InMemorySpanExporter, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Header capture switched on for everything: the scrubber must still keep the JWT out.
    monkeypatch.setenv("OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_SERVER_REQUEST", ".*")
    monkeypatch.setenv("OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_SERVER_RESPONSE", ".*")
    body = {
        "content": prompt(),
        "systemPrompt": SYSTEM_PROMPT,
        "model": "claude-haiku-4-5",
        "maxTokens": 100,
        "idempotencyKey": IDEMPOTENCY_KEY,
    }
    async with stack.session.post(
        f"{stack.http_url}/v1/generate?marker=MARKER-QUERY-{MARK}",
        json=body,
        headers={"Authorization": f"Bearer {stack.jwt}"},
    ) as response:
        answer = await response.json()
        assert response.status == 200, answer
    assert answer["tokenUsage"]["tokensCharged"] == 125

    spans = await spans_when(
        exporter,
        lambda s: count(LEDGER, SpanKind.SERVER)(s) == 2 and count("POST /v1/generate")(s) == 1,
    )
    assert_one_consistent_trace(spans, root_parent=None)

    edge = one(spans, "POST /v1/generate", SpanKind.SERVER)
    assert edge.parent is None
    core = one(spans, "gateway.generate")
    assert parent_id(core) == span_id(edge)
    assert core.attributes is not None
    assert core.attributes["rpcai.user_type"] == "subscription"
    assert core.attributes["gen_ai.provider.name"] == "anthropic"
    assert core.attributes["gen_ai.request.model"] == "claude-haiku-4-5"
    assert core.attributes["rpcai.tokens_charged"] == 125
    assert core.attributes["gen_ai.usage.input_tokens"] == 40

    reserve = one(spans, RESERVE, SpanKind.CLIENT)
    settle = one(spans, SETTLE, SpanKind.CLIENT)
    assert parent_id(reserve) == parent_id(settle) == span_id(core)
    assert reserve.end_time is not None
    assert settle.start_time is not None
    assert reserve.end_time <= settle.start_time
    assert_ledger_write(spans, reserve, "Reserve")
    assert_ledger_write(spans, settle, "Settle")

    provider = [
        s
        for s in spans
        if s.kind is SpanKind.CLIENT
        and s.instrumentation_scope is not None
        and "aiohttp_client" in s.instrumentation_scope.name
    ]
    assert len(provider) == 1, [s.name for s in spans]
    assert parent_id(provider[0]) == span_id(core)
    assert provider[0].attributes is not None
    assert provider[0].attributes["http.status_code"] == 200
    # The edge's URL kept without its query.
    assert edge.attributes is not None
    assert "?" not in str(edge.attributes.get("http.url", "")), edge.attributes
    assert not [k for k in edge.attributes if k.startswith("http.request.header.")]

    assert {s.name for s in spans} == {
        "POST /v1/generate",
        "gateway.generate",
        RESERVE,
        SETTLE,
        LEDGER,
        "ledger.apply Reserve",
        "ledger.apply Settle",
        provider[0].name,
    }
    assert len(spans) == 11  # two ApplyBatch calls: a client and a server span each
    assert_no_secrets(spans, stack.jwt, stack.jwt.split(".")[-1], answer["text"], "MARKER-QUERY")
    assert_installed(stack.gateway, on=True, called=["anthropic"])


async def test_one_grpc_call_is_one_trace_continuing_the_callers(
    stack: Stack, exporter: InMemorySpanExporter
) -> None:
    trace_id, caller_span = uuid.uuid4().int >> 64 << 64 | 1, 0x1234567890ABCDEF
    traceparent = f"00-{trace_id:032x}-{caller_span:016x}-01"
    reply = await stack.stub.GenerateText(
        gpb.GenerateTextRequest(content=prompt(), model="gpt-4o", max_tokens=100),
        metadata=(("authorization", f"Bearer {stack.jwt}"), ("traceparent", traceparent)),
    )
    assert reply.token_usage.tokens_charged == 125

    name = "/rpcai.gateway.v1.AiGateway/GenerateText"
    spans = await spans_when(
        exporter, lambda s: count(LEDGER, SpanKind.SERVER)(s) == 2 and count(name)(s) == 1
    )
    assert assert_one_consistent_trace(spans, root_parent=caller_span) == trace_id
    server = one(spans, name, SpanKind.SERVER)
    assert server.parent is not None
    assert server.parent.is_remote
    core = one(spans, "gateway.generate")
    assert parent_id(core) == span_id(server)
    assert core.attributes is not None
    assert core.attributes["gen_ai.provider.name"] == "openai"
    reserve = one(spans, RESERVE, SpanKind.CLIENT)
    settle = one(spans, SETTLE, SpanKind.CLIENT)
    assert parent_id(reserve) == parent_id(settle) == span_id(core)
    assert_ledger_write(spans, reserve, "Reserve")
    assert_ledger_write(spans, settle, "Settle")
    provider = [s for s in children(spans, core) if s.kind is SpanKind.CLIENT and s.name == "POST"]
    assert len(provider) == 1
    assert len(spans) == 11, sorted(s.name for s in spans)
    assert_no_secrets(spans, stack.jwt, reply.text)


async def test_stream_is_one_trace(stack: Stack, exporter: InMemorySpanExporter) -> None:
    async with stack.session.post(
        f"{stack.http_url}/v1/generate/stream",
        json={"content": prompt("[[usage:10,5]]"), "model": "claude-haiku-4-5", "maxTokens": 50},
        headers={"Authorization": f"Bearer {stack.jwt}"},
    ) as response:
        assert response.status == 200
        text = await response.text()
    assert "event: done" in text
    spans = await spans_when(
        exporter,
        lambda s: (
            count(LEDGER, SpanKind.SERVER)(s) == 2 and count("POST /v1/generate/stream")(s) == 1
        ),
    )
    assert_one_consistent_trace(spans, root_parent=None)
    edge = one(spans, "POST /v1/generate/stream", SpanKind.SERVER)
    core = one(spans, "gateway.stream")
    assert parent_id(core) == span_id(edge)
    assert core.attributes is not None
    assert core.attributes["rpcai.tokens_charged"] == 19  # 15 used + 4 fee
    for rpc, name in (("Reserve", RESERVE), ("Settle", SETTLE)):
        write = one(spans, name, SpanKind.CLIENT)
        assert parent_id(write) == span_id(core)
        assert_ledger_write(spans, write, rpc)
    assert_no_secrets(spans, stack.jwt)


# ---- batches ----------------------------------------------------------------------------------


async def test_batched_writes_keep_their_callers_traces(
    stack: Stack, exporter: InMemorySpanExporter
) -> None:
    """Writes waiting at the same moment share one ApplyBatch; each write's span stays in its
    caller's trace, the batch has a span of its own linked to each, and the ledger's span for
    each write joins its caller's trace, linked to the batch's server span."""
    client = LedgerClient(stack.ledger_address, SERVICE_TOKEN, 5.0)
    writers = 8

    async def caller(i: int) -> int:
        with tracing.tracer().start_as_current_span(f"caller {i}") as span:
            await client.reserve(
                lpb.ReserveRequest(
                    idempotency_key=f"batched-{i}-{MARK}", user_id=USER, estimated_tokens=10
                )
            )
            trace_id: int = span.get_span_context().trace_id
            return trace_id

    try:
        trace_ids = await asyncio.gather(*(caller(i) for i in range(writers)))
    finally:
        await client.close()
    spans = await spans_when(
        exporter, lambda s: count("ledger.apply Reserve")(s) == writers and count(LEDGER)(s) == 2
    )
    batch = one(spans, "ledger.batch")
    assert batch.parent is None  # a trace of its own, not its first writer's
    writes = [s for s in spans if s.name == RESERVE]
    assert len(writes) == writers
    assert {link.context.span_id for link in batch.links} == {span_id(w) for w in writes}
    served = one(spans, LEDGER, SpanKind.SERVER)
    assert served.context is not None
    assert batch.context is not None
    assert served.context.trace_id == batch.context.trace_id
    assert len(set(trace_ids)) == writers
    for i, trace_id in enumerate(trace_ids):
        # The caller's trace: its span -> its write's client span -> the ledger's span for it.
        mine = [s for s in spans if s.context is not None and s.context.trace_id == trace_id]
        assert sorted(s.name for s in mine) == sorted(
            [f"caller {i}", RESERVE, "ledger.apply Reserve"]
        )
        root = one(mine, f"caller {i}")
        write = one(mine, RESERVE)
        applied = one(mine, "ledger.apply Reserve")
        assert parent_id(write) == span_id(root)
        assert parent_id(applied) == span_id(write)
        assert [link.context.span_id for link in applied.links] == [span_id(served)]
    assert_no_secrets(spans)


async def test_a_lone_write_sent_after_anothers_batch_joins_its_own_trace(
    stack: Stack, exporter: InMemorySpanExporter
) -> None:
    """With one batch in flight at a time, B's write waits for A's batch and leaves from A's
    batch's task: it must still be sent in B's trace, not A's."""
    client = LedgerClient(stack.ledger_address, SERVICE_TOKEN, 5.0)
    client.batcher.max_in_flight = 1

    async def caller(name: str) -> int:
        with tracing.tracer().start_as_current_span(name) as span:
            await client.reserve(
                lpb.ReserveRequest(
                    idempotency_key=f"{name}-{MARK}", user_id=USER, estimated_tokens=10
                )
            )
            trace_id: int = span.get_span_context().trace_id
            return trace_id

    try:
        first = asyncio.create_task(caller("caller A"))
        while not client.batcher._in_flight:  # A's batch is out
            await asyncio.sleep(0)
        second = asyncio.create_task(caller("caller B"))
        trace_ids = [await first, await second]
    finally:
        await client.close()
    spans = await spans_when(exporter, lambda s: count("ledger.apply Reserve")(s) == 2)
    assert not [s for s in spans if s.name == "ledger.batch"]  # two lone writes
    for name, trace_id in zip(("caller A", "caller B"), trace_ids, strict=True):
        mine = [s for s in spans if s.context is not None and s.context.trace_id == trace_id]
        assert sorted(s.name for s in mine) == sorted(
            [name, RESERVE, LEDGER, LEDGER, "ledger.apply Reserve"]
        )
        assert_one_consistent_trace(mine, root_parent=None)
        assert_ledger_write(mine, one(mine, RESERVE), "Reserve")


# ---- failures and refusals are traced, and leak nothing ---------------------------------------


async def test_refused_and_failed_calls(stack: Stack, exporter: InMemorySpanExporter) -> None:
    # A bad JWT: refused by the auth interceptor, after the tracing one.
    bad = stack.jwt[:-4] + "AAAA"
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stack.stub.GenerateText(
            gpb.GenerateTextRequest(content=prompt(), model="gpt-4o"),
            metadata=(("authorization", f"Bearer {bad}"),),
        )
    assert refused.value.code() is grpc.StatusCode.UNAUTHENTICATED
    # A provider failure: the hold is released; a BYOK key the provider refuses.
    async with stack.session.post(
        f"{stack.http_url}/v1/generate",
        json={"content": prompt("[[fail:500]]"), "model": "claude-haiku-4-5", "maxTokens": 10},
        headers={"Authorization": f"Bearer {stack.jwt}"},
    ) as response:
        assert response.status == 503, await response.text()
    async with stack.session.post(
        f"{stack.http_url}/v1/generate",
        json={"content": prompt("[[fail:401]]"), "model": "gpt-4o", "apiKey": BYOK_KEY},
    ) as response:
        assert response.status == 403, await response.text()

    spans = await spans_when(
        exporter,
        lambda s: (
            count("/rpcai.gateway.v1.AiGateway/GenerateText")(s) == 1
            and count("POST /v1/generate")(s) == 2
            and count("ledger.apply Release")(s) == 1
        ),
    )
    unauthenticated = one(spans, "/rpcai.gateway.v1.AiGateway/GenerateText", SpanKind.SERVER)
    assert unauthenticated.attributes is not None
    assert (
        unauthenticated.attributes["rpc.grpc.status_code"]
        == grpc.StatusCode.UNAUTHENTICATED.value[0]
    )
    calls = [s for s in spans if s.name == "gateway.generate"]
    assert sorted(s.status.description or "" for s in calls) == [
        "PROVIDER_KEY_REFUSED",
        "PROVIDER_UNAVAILABLE",
    ]
    byok = next(s for s in calls if s.status.description == "PROVIDER_KEY_REFUSED")
    assert byok.attributes is not None
    assert byok.attributes["rpcai.user_type"] == "public"
    assert_no_secrets(spans, stack.jwt, bad, BYOK_KEY[-12:])


# ---- off ----------------------------------------------------------------------------------------


async def test_off_installs_nothing(
    database_url: str, sim_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert not tracing.enabled()
    assert not tracing.setup_tracing(Settings(otel_exporter_otlp_endpoint=""), "rpcai-gateway")
    assert not tracing.enabled()
    chains: list[list[Any]] = []
    server = grpc.aio.server

    def spy(*args: Any, **kwargs: Any) -> grpc.aio.Server:
        chains.append(list(kwargs.get("interceptors") or []))
        return server(*args, **kwargs)

    monkeypatch.setattr(grpc.aio, "server", spy)
    built, close = await _start_stack(database_url, sim_url)
    try:
        # One call of each kind, so the provider sessions open.
        await built.ledger_stub.CreditPurchase(
            lpb.CreditPurchaseRequest(
                idempotency_key=f"buy-off-{MARK}",
                user_id=USER,
                tokens_purchased=10_000,
                purchase_type=lpb.PURCHASE_TYPE_ONE_TIME,
                external_id=f"order-off-{MARK}",
                source="test",
            ),
            metadata=(("authorization", f"Bearer {SERVICE_TOKEN}"),),
        )
        for model in ("claude-haiku-4-5", "gpt-4o"):
            async with built.session.post(
                f"{built.http_url}/v1/generate",
                json={"content": prompt(), "model": model, "maxTokens": 100},
                headers={"Authorization": f"Bearer {built.jwt}"},
            ) as response:
                assert response.status == 200
        assert len(chains) == 2  # the ledger's server and the gateway's
        for chain in chains:
            assert chain, "the services' own interceptors are there"
            assert not [i for i in chain if "opentelemetry" in type(i).__module__]
        assert_installed(built.gateway, on=False)
    finally:
        await close()


async def test_on_installs_tracing_first(
    exporter: InMemorySpanExporter,
    database_url: str,
    sim_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The positive control of the test above: the same checks find everything when on."""
    chains: list[list[Any]] = []
    server = grpc.aio.server

    def spy(*args: Any, **kwargs: Any) -> grpc.aio.Server:
        chains.append(list(kwargs.get("interceptors") or []))
        return server(*args, **kwargs)

    monkeypatch.setattr(grpc.aio, "server", spy)
    built, close = await _start_stack(database_url, sim_url)
    try:
        await built.ledger_stub.CreditPurchase(
            lpb.CreditPurchaseRequest(
                idempotency_key=f"buy-on-{MARK}",
                user_id=USER,
                tokens_purchased=10_000,
                purchase_type=lpb.PURCHASE_TYPE_ONE_TIME,
                external_id=f"order-on-{MARK}",
                source="test",
            ),
            metadata=(("authorization", f"Bearer {SERVICE_TOKEN}"),),
        )
        for model in ("claude-haiku-4-5", "gpt-4o"):
            async with built.session.post(
                f"{built.http_url}/v1/generate",
                json={"content": prompt(), "model": model, "maxTokens": 100},
                headers={"Authorization": f"Bearer {built.jwt}"},
            ) as response:
                assert response.status == 200
        assert len(chains) == 2
        for chain in chains:
            assert "opentelemetry" in type(chain[0]).__module__, chain
            assert len(chain) > 1
        assert_installed(built.gateway, on=True)
    finally:
        await close()


def test_setup_reads_the_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", raising=False)
    assert tracing.traces_url("http://collector:4318/") == "http://collector:4318/v1/traces"
    settings = Settings(otel_exporter_otlp_endpoint="http://127.0.0.1:9", otel_service_name="")
    try:
        assert tracing.setup_tracing(settings, "rpcai-ledger")
        assert tracing.enabled()
        provider: Any = tracing._provider
        assert provider.resource.attributes["service.name"] == "rpcai-ledger"
    finally:
        tracing.shutdown()
    named = Settings(otel_exporter_otlp_endpoint="http://127.0.0.1:9", otel_service_name="edge-7")
    try:
        assert tracing.setup_tracing(named, "rpcai-gateway")
        provider = tracing._provider
        assert provider.resource.attributes["service.name"] == "edge-7"
    finally:
        tracing.shutdown()
    assert not tracing.enabled()
