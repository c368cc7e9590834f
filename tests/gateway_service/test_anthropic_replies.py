"""Anthropic replies of every odd shape, from a real HTTP server: the gateway reads the reply's
JSON itself (not the SDK's Message), so each shape must end as the SDK's parse ended — text
from the text blocks only, cached prompt tokens counted, MALFORMED for whatever lacks a field."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from gateway_service.providers import (
    AnthropicProvider,
    Completion,
    CompletionRequest,
    ProviderError,
    ProviderErrorKind,
)

USAGE = {"input_tokens": 7, "output_tokens": 3}


def message(**fields: object) -> dict[str, object]:
    base: dict[str, object] = {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": "claude-x",
        "content": [{"type": "text", "text": "hi"}],
        "stop_reason": "end_turn",
        "usage": USAGE,
    }
    return {**base, **fields}


class Replies:
    """Serves the next queued (body, content type) to every POST /v1/messages."""

    def __init__(self) -> None:
        self.body = b""
        self.content_type = "application/json"

    def set(self, body: object, content_type: str = "application/json") -> None:
        self.body = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.content_type = content_type

    async def handle(self, request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=self.body, content_type=self.content_type)


@pytest.fixture
async def served() -> AsyncIterator[tuple[Replies, AnthropicProvider]]:
    replies = Replies()
    app = web.Application()
    app.router.add_post("/v1/messages", replies.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    provider = AnthropicProvider(api_key="k", base_url=f"http://127.0.0.1:{port}")
    try:
        yield replies, provider
    finally:
        await provider.aclose()
        await runner.cleanup()


REQUEST = CompletionRequest(content="hello", model="claude-x", max_tokens=10)


async def test_text_blocks_only_and_cached_tokens(
    served: tuple[Replies, AnthropicProvider],
) -> None:
    replies, provider = served
    replies.set(
        message(
            content=[
                {"type": "text", "text": "a"},
                {"type": "tool_use", "id": "t", "name": "f", "input": {}},
                {"text": "untyped: skipped"},
                {"type": "text", "text": "b"},
            ],
            usage={
                "input_tokens": 5,
                "output_tokens": 2,
                "cache_creation_input_tokens": 11,
                "cache_read_input_tokens": None,
            },
            stop_reason=None,
        )
    )
    completion = await provider.generate(REQUEST)
    assert completion == Completion("ab", "claude-x", 16, 2, None, "anthropic")


async def test_json_under_another_content_type_is_still_read(
    served: tuple[Replies, AnthropicProvider],
) -> None:
    replies, provider = served
    replies.set(message(), content_type="text/plain")
    completion = await provider.generate(REQUEST)
    assert (completion.text, completion.input_tokens, completion.output_tokens) == ("hi", 7, 3)


MALFORMED = [
    pytest.param(b"not json", "application/json", id="not-json"),
    pytest.param(b"not json", "text/plain", id="text"),
    pytest.param(b"", "application/json", id="empty"),
    pytest.param(b"[1, 2]", "application/json", id="a-list"),
    pytest.param(json.dumps(message(usage=None)).encode(), "application/json", id="usage-null"),
    pytest.param(
        json.dumps({k: v for k, v in message().items() if k != "usage"}).encode(),
        "application/json",
        id="no-usage",
    ),
    pytest.param(
        json.dumps(message(usage={"input_tokens": 1})).encode(), "application/json", id="no-output"
    ),
    pytest.param(
        json.dumps(message(usage={"input_tokens": -1, "output_tokens": 1})).encode(),
        "application/json",
        id="negative",
    ),
    pytest.param(
        json.dumps(message(content=[{"type": "text"}])).encode(), "application/json", id="no-text"
    ),
]


@pytest.mark.parametrize(("body", "content_type"), MALFORMED)
async def test_malformed_replies(
    served: tuple[Replies, AnthropicProvider], body: bytes, content_type: str
) -> None:
    replies, provider = served
    replies.set(body, content_type)
    with pytest.raises(ProviderError) as caught:
        await provider.generate(REQUEST)
    assert caught.value.kind is ProviderErrorKind.MALFORMED
