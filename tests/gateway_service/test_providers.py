"""The providers over the official SDKs, talking HTTP to provider_sim: answers, usage, every
failure directive, cut and cancelled streams, BYOK keys."""

from __future__ import annotations

import asyncio
import gc
import logging
import math
import time

import pytest

from gateway_service.providers import (
    ANTHROPIC,
    OPENAI,
    AnthropicProvider,
    CompletionRequest,
    CompletionStream,
    OpenAIProvider,
    ProviderError,
    ProviderErrorKind,
    Providers,
    StreamEnd,
    TextDelta,
    UnknownProviderError,
    Usage,
    provider_for,
)
from tests.gateway_service.conftest import BYOK_KEY, Sim, eventually, make_providers

BOTH = [ANTHROPIC, OPENAI]
MODELS = {ANTHROPIC: "claude-haiku-4-5", OPENAI: "gpt-5-mini"}


def request(
    name: str, content: str, *, system_prompt: str = "", api_key: str | None = None
) -> CompletionRequest:
    return CompletionRequest(
        content=content,
        model=MODELS[name],
        max_tokens=200,
        system_prompt=system_prompt,
        api_key=api_key,
    )


async def drain(stream: CompletionStream, sink: list[str] | None = None) -> None:
    """Read a stream to its end inside `async with`, keeping the text deltas in `sink`."""
    async with stream:
        async for item in stream:
            if isinstance(item, TextDelta) and sink is not None:
                sink.append(item.text)


async def read_stream(
    providers: Providers, req: CompletionRequest, name: str
) -> tuple[list[str], list[StreamEnd]]:
    deltas: list[str] = []
    ends: list[StreamEnd] = []
    async with providers.get(name).stream(req) as stream:
        async for item in stream:
            if isinstance(item, TextDelta):
                deltas.append(item.text)
            else:
                ends.append(item)
    return deltas, ends


@pytest.mark.parametrize("name", BOTH)
async def test_generate_reports_real_usage(providers: Providers, name: str) -> None:
    system = "You are terse."
    content = "What is the capital of France? Answer in one word."
    req = request(name, content, system_prompt=system)
    completion = await providers.get(name).generate(req)
    assert completion.provider == name
    assert completion.model == MODELS[name]
    assert completion.input_tokens == math.ceil((len(system) + len(content)) / 4)
    assert completion.output_tokens == len(completion.text.split(" ")) > 0
    assert completion.stop_reason == ("end_turn" if name == ANTHROPIC else "stop")


@pytest.mark.parametrize("name", BOTH)
async def test_generate_usage_directive_and_max_tokens(providers: Providers, name: str) -> None:
    completion = await providers.get(name).generate(request(name, "go [[usage:60,40]]"))
    assert (completion.input_tokens, completion.output_tokens) == (60, 40)
    capped = CompletionRequest(content="go [[usage:60,40]]", model=MODELS[name], max_tokens=7)
    completion = await providers.get(name).generate(capped)
    assert completion.output_tokens == 7
    assert completion.stop_reason == ("max_tokens" if name == ANTHROPIC else "length")


@pytest.mark.parametrize("name", BOTH)
async def test_stream_ends_with_reported_usage(providers: Providers, sim: Sim, name: str) -> None:
    completed = sim.stats.streams_completed
    req = request(name, "stream it [[usage:33,6]]")
    deltas, ends = await read_stream(providers, req, name)
    assert len(deltas) == 6
    assert ends == [
        StreamEnd(
            model=MODELS[name],
            input_tokens=33,
            output_tokens=6,
            stop_reason="end_turn" if name == ANTHROPIC else "stop",
        )
    ]
    assert "".join(deltas) == (await providers.get(name).generate(req)).text
    assert sim.stats.streams_completed == completed + 1


@pytest.mark.parametrize("name", BOTH)
async def test_stream_usage_property_after_completion(providers: Providers, name: str) -> None:
    stream = providers.get(name).stream(request(name, "x [[usage:10,2]]"))
    async with stream:
        items = [item async for item in stream]
    assert isinstance(items[-1], StreamEnd)
    assert stream.usage == Usage(10, 2, estimated=False)
    # A finished stream stays finished.
    assert [item async for item in stream] == []


ERROR_CASES = [
    ("[[fail:500]]", ProviderErrorKind.UNAVAILABLE, 500),
    ("[[fail:529]]", ProviderErrorKind.UNAVAILABLE, 529),
    ("[[fail:429]]", ProviderErrorKind.RATE_LIMITED, 429),
    ("[[fail:400]]", ProviderErrorKind.INVALID_REQUEST, 400),
    ("[[fail:403]]", ProviderErrorKind.AUTH, 403),
    ("[[malformed]]", ProviderErrorKind.MALFORMED, None),
]


@pytest.mark.parametrize("name", BOTH)
@pytest.mark.parametrize(("directive", "kind", "status"), ERROR_CASES)
async def test_generate_errors(
    providers: Providers,
    name: str,
    directive: str,
    kind: ProviderErrorKind,
    status: int | None,
) -> None:
    with pytest.raises(ProviderError) as caught:
        await providers.get(name).generate(request(name, f"x {directive}"))
    error = caught.value
    assert (error.kind, error.status_code, error.provider) == (kind, status, name)
    assert error.__cause__ is None
    assert error.__context__ is None
    if kind is ProviderErrorKind.RATE_LIMITED:
        assert error.retry_after == 1.0
    if status is not None:
        assert (error.request_id or "").startswith("req_")


@pytest.mark.parametrize("name", BOTH)
@pytest.mark.parametrize(("directive", "kind", "status"), ERROR_CASES)
async def test_stream_errors_consume_nothing(
    providers: Providers,
    name: str,
    directive: str,
    kind: ProviderErrorKind,
    status: int | None,
) -> None:
    stream = providers.get(name).stream(request(name, f"x {directive}"))
    with pytest.raises(ProviderError) as caught:
        await drain(stream)
    assert (caught.value.kind, caught.value.status_code) == (kind, status)
    if status is not None:
        # Refused before a 200: the provider generated nothing, so nothing is owed.
        assert stream.usage == Usage(0, 0, estimated=False)


@pytest.mark.parametrize("name", BOTH)
async def test_timeout(sim: Sim, name: str) -> None:
    providers = make_providers(sim, timeout_seconds=0.3)
    try:
        started = time.monotonic()
        with pytest.raises(ProviderError) as caught:
            await providers.get(name).generate(request(name, "slow [[delay:3]]"))
        assert caught.value.kind is ProviderErrorKind.TIMEOUT
        assert time.monotonic() - started < 2
        stream = providers.get(name).stream(request(name, "slow [[delay:3]]"))
        with pytest.raises(ProviderError) as caught:
            async with stream:
                await anext(stream)
        assert caught.value.kind is ProviderErrorKind.TIMEOUT
    finally:
        await providers.aclose()


@pytest.mark.parametrize("name", BOTH)
async def test_cut_stream_yields_partial_usage(providers: Providers, name: str) -> None:
    content = "a long answer please [[usage:50,10]] [[cut:3]]"
    stream = providers.get(name).stream(request(name, content))
    deltas: list[str] = []
    with pytest.raises(ProviderError) as caught:
        await drain(stream, deltas)
    assert caught.value.kind is ProviderErrorKind.UNAVAILABLE
    assert len(deltas) == 3
    usage = stream.usage
    assert usage.estimated
    assert usage.output_tokens == 3
    # Anthropic reported input tokens in message_start; OpenAI only does at the end.
    expected_input = 50 if name == ANTHROPIC else math.ceil(len(content) / 4)
    assert usage.input_tokens == expected_input


@pytest.mark.parametrize("name", BOTH)
async def test_cancel_mid_stream_closes_http_stream(
    providers: Providers, sim: Sim, name: str
) -> None:
    disconnects = sim.stats.client_disconnects
    content = "slowly [[usage:20,30]] [[pace:0.2]]"
    stream = providers.get(name).stream(request(name, content))
    received: list[str] = []
    two_received = asyncio.Event()

    async def consume() -> None:
        # No `async with` here: cancellation alone must close the HTTP stream.
        async for item in stream:
            assert isinstance(item, TextDelta)
            received.append(item.text)
            if len(received) == 2:
                two_received.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(two_received.wait(), timeout=5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # The server notices the closed connection long before its 28 remaining deltas (5.6 s).
    await eventually(lambda: sim.stats.client_disconnects == disconnects + 1, within=2)
    expected_input = 20 if name == ANTHROPIC else math.ceil(len(content) / 4)
    assert stream.usage == Usage(expected_input, len(received), estimated=True)


@pytest.mark.parametrize("name", BOTH)
async def test_cancel_before_first_byte(providers: Providers, sim: Sim, name: str) -> None:
    disconnects = sim.stats.client_disconnects
    stream = providers.get(name).stream(request(name, "think first [[delay:5]]"))
    task = asyncio.create_task(drain(stream))
    await asyncio.sleep(0.2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await eventually(lambda: sim.stats.client_disconnects == disconnects + 1, within=2)
    assert stream.usage == Usage(0, 0, estimated=False)


@pytest.mark.parametrize("name", BOTH)
async def test_leaving_early_closes_http_stream(providers: Providers, sim: Sim, name: str) -> None:
    disconnects = sim.stats.client_disconnects
    stream = providers.get(name).stream(request(name, "slowly [[pace:0.2]]"))
    async with stream:
        async for _ in stream:
            break
    await eventually(lambda: sim.stats.client_disconnects == disconnects + 1, within=2)
    usage = stream.usage
    assert usage.estimated
    assert usage.output_tokens == 1


@pytest.mark.parametrize("name", BOTH)
async def test_byok_shares_pool_and_never_leaks_key(
    providers: Providers, name: str, caplog: pytest.LogCaptureFixture
) -> None:
    provider = providers.get(name)
    assert isinstance(provider, AnthropicProvider | OpenAIProvider)
    byok = request(name, "mine [[usage:5,5]]", api_key=BYOK_KEY)
    assert BYOK_KEY not in repr(byok)
    # with_options makes a client over the same httpx client: one connection pool for all keys.
    assert provider.client_for(byok)._client is provider.client_for(request(name, "x"))._client
    caplog.set_level(logging.DEBUG)
    completion = await provider.generate(byok)
    assert completion.output_tokens == 5
    # The per-call clients are garbage; collecting them must leave the shared pool open.
    gc.collect()
    await asyncio.sleep(0)
    assert not provider.client_for(request(name, "x")).is_closed()
    assert (await provider.generate(request(name, "platform again"))).output_tokens > 0

    wrong_key = "sk-caller-wrong-key-abcdefgh"
    with pytest.raises(ProviderError) as caught:
        await provider.generate(request(name, "mine", api_key=wrong_key))
    error = caught.value
    assert error.kind is ProviderErrorKind.AUTH
    assert error.status_code == 401
    # OpenAI's 401 body quotes a masked key ("sk-****efgh"): none of it may pass through.
    shown = f"{error} {error!r} {error.args}"
    assert wrong_key not in shown
    assert wrong_key[-4:] not in shown
    assert error.__cause__ is None
    assert error.__context__ is None
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert caplog.records, "expected SDK debug logs to check"
    assert BYOK_KEY not in logged
    assert wrong_key not in logged


@pytest.mark.parametrize("name", BOTH)
async def test_without_platform_key_only_byok_calls(sim: Sim, name: str) -> None:
    providers = make_providers(sim, platform_key=None)
    try:
        requests_before = sim.stats.requests
        with pytest.raises(ProviderError) as caught:
            await providers.get(name).generate(request(name, "x"))
        assert caught.value.kind is ProviderErrorKind.AUTH
        assert sim.stats.requests == requests_before  # refused before any HTTP call
        completion = await providers.get(name).generate(request(name, "x", api_key=BYOK_KEY))
        assert completion.output_tokens > 0
    finally:
        await providers.aclose()


@pytest.mark.parametrize(
    ("provider", "model", "expected"),
    [
        ("anthropic", "", ANTHROPIC),
        (" OpenAI ", "claude-haiku-4-5", OPENAI),  # an explicit provider wins
        ("", "claude-sonnet-4-5-20250929", ANTHROPIC),
        ("", "gpt-4o-mini", OPENAI),
        ("", "o1", OPENAI),
        ("", "o3-mini", OPENAI),
        ("", "o4-mini", OPENAI),
        ("", "chatgpt-4o-latest", OPENAI),
        ("", "", ANTHROPIC),
    ],
)
def test_provider_for(provider: str, model: str, expected: str) -> None:
    assert provider_for(provider, model) == expected


@pytest.mark.parametrize(("provider", "model"), [("", "llama-3-70b"), ("mistral", ""), ("", "o2")])
def test_provider_for_unknown(provider: str, model: str) -> None:
    with pytest.raises(UnknownProviderError) as caught:
        provider_for(provider, model)
    assert caught.value.kind is ProviderErrorKind.INVALID_REQUEST


def test_resolve_fills_default_model(providers: Providers) -> None:
    chosen, model = providers.resolve("openai", "")
    assert (chosen.name, model) == (OPENAI, chosen.default_model)
    chosen, model = providers.resolve("", "claude-opus-4-5")
    assert (chosen.name, model) == (ANTHROPIC, "claude-opus-4-5")
