"""provider_sim at the wire: the bytes, headers and event order of each provider's format.

(The SDK-level tests in test_providers.py show the official clients parse all of it.)
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import socket
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from provider_sim.script import DEFAULT_REPLY_WORDS, make_plan
from tests.gateway_service.conftest import BYOK_KEY, PLATFORM_KEY, Sim

ANTHROPIC_HEADERS = {"x-api-key": PLATFORM_KEY, "anthropic-version": "2023-06-01"}
OPENAI_HEADERS = {"Authorization": f"Bearer {PLATFORM_KEY}"}


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def anthropic_body(content: str, max_tokens: int = 100, **extra: Any) -> dict[str, Any]:
    return {
        "model": "claude-haiku-4-5",
        "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": content}],
        **extra,
    }


def openai_body(content: str, **extra: Any) -> dict[str, Any]:
    return {"model": "gpt-5-mini", "messages": [{"role": "user", "content": content}], **extra}


def parse_sse(raw: str) -> list[tuple[str | None, str]]:
    events = []
    for block in raw.strip().split("\n\n"):
        event = None
        data = ""
        for line in block.split("\n"):
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                data = line[6:]
        events.append((event, data))
    return events


async def test_anthropic_json_message(sim: Sim, http: aiohttp.ClientSession) -> None:
    system = "Be brief."
    content = "Tell me about the weather today, please."
    body = anthropic_body(content, system=system)
    async with http.post(f"{sim.url}/v1/messages", json=body, headers=ANTHROPIC_HEADERS) as resp:
        assert resp.status == 200
        assert resp.content_type == "application/json"
        assert resp.headers["request-id"].startswith("req_")
        message = await resp.json()
    assert message["id"].startswith("msg_")
    assert (message["type"], message["role"], message["model"]) == (
        "message",
        "assistant",
        "claude-haiku-4-5",
    )
    assert message["stop_reason"] == "end_turn"
    [block] = message["content"]
    assert block["type"] == "text"
    words = block["text"].split(" ")
    assert message["usage"]["input_tokens"] == math.ceil((len(system) + len(content)) / 4)
    assert message["usage"]["output_tokens"] == len(words) > 0


async def test_anthropic_max_tokens_truncates(sim: Sim, http: aiohttp.ClientSession) -> None:
    body = anthropic_body("hello", max_tokens=3)
    async with http.post(f"{sim.url}/v1/messages", json=body, headers=ANTHROPIC_HEADERS) as resp:
        message = await resp.json()
    assert message["stop_reason"] == "max_tokens"
    assert message["usage"]["output_tokens"] == 3
    assert len(message["content"][0]["text"].split(" ")) == 3


async def test_anthropic_stream_event_sequence(sim: Sim, http: aiohttp.ClientSession) -> None:
    body = anthropic_body("hi [[usage:30,5]]", stream=True)
    async with http.post(f"{sim.url}/v1/messages", json=body, headers=ANTHROPIC_HEADERS) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "text/event-stream; charset=utf-8"
        assert resp.headers["request-id"].startswith("req_")
        events = parse_sse(await resp.text())
    names = [name for name, _ in events]
    assert names == [
        "message_start",
        "content_block_start",
        "ping",
        *["content_block_delta"] * 5,
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    payloads = [json.loads(data) for _, data in events]
    assert all(p["type"] == name for p, name in zip(payloads, names, strict=True))
    assert payloads[0]["message"]["usage"]["input_tokens"] == 30
    assert payloads[0]["message"]["stop_reason"] is None
    text = "".join(p["delta"]["text"] for p in payloads if p["type"] == "content_block_delta")
    assert len(text.split(" ")) == 5
    assert payloads[-2]["usage"]["output_tokens"] == 5
    assert payloads[-2]["delta"]["stop_reason"] == "end_turn"


async def test_openai_json_completion(sim: Sim, http: aiohttp.ClientSession) -> None:
    body = openai_body("Hello there [[usage:21,4]]", max_completion_tokens=50)
    url = f"{sim.url}/v1/chat/completions"
    async with http.post(url, json=body, headers=OPENAI_HEADERS) as resp:
        assert resp.status == 200
        assert resp.content_type == "application/json"
        assert resp.headers["x-request-id"].startswith("req_")
        completion = await resp.json()
    assert completion["id"].startswith("chatcmpl-")
    assert completion["object"] == "chat.completion"
    [choice] = completion["choices"]
    assert choice["finish_reason"] == "stop"
    assert len(choice["message"]["content"].split(" ")) == 4
    assert completion["usage"]["prompt_tokens"] == 21
    assert completion["usage"]["completion_tokens"] == 4
    assert completion["usage"]["total_tokens"] == 25


async def test_openai_stream_with_usage(sim: Sim, http: aiohttp.ClientSession) -> None:
    body = openai_body("hi [[usage:9,3]]", stream=True, stream_options={"include_usage": True})
    url = f"{sim.url}/v1/chat/completions"
    async with http.post(url, json=body, headers=OPENAI_HEADERS) as resp:
        assert resp.headers["Content-Type"] == "text/event-stream; charset=utf-8"
        events = parse_sse(await resp.text())
    assert events[-1] == (None, "[DONE]")
    chunks = [json.loads(data) for _, data in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    *content_chunks, usage_chunk = chunks
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"]["prompt_tokens"] == 9
    assert usage_chunk["usage"]["completion_tokens"] == 3
    assert all("usage" in c and c["usage"] is None for c in content_chunks)
    assert content_chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert content_chunks[-1]["choices"][0]["finish_reason"] == "stop"
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in content_chunks)
    assert len(text.split(" ")) == 3


async def test_openai_stream_without_usage_option(sim: Sim, http: aiohttp.ClientSession) -> None:
    body = openai_body("hi", stream=True)
    url = f"{sim.url}/v1/chat/completions"
    async with http.post(url, json=body, headers=OPENAI_HEADERS) as resp:
        events = parse_sse(await resp.text())
    chunks = [json.loads(data) for _, data in events[:-1]]
    assert all("usage" not in c and c["choices"] for c in chunks)


@pytest.mark.parametrize("fmt", ["anthropic", "openai"])
@pytest.mark.parametrize("status", [429, 500, 400])
async def test_fail_directive_returns_provider_error_body(
    sim: Sim, http: aiohttp.ClientSession, fmt: str, status: int
) -> None:
    content = f"please [[fail:{status}]]"
    if fmt == "anthropic":
        url, body, headers = f"{sim.url}/v1/messages", anthropic_body(content), ANTHROPIC_HEADERS
    else:
        url, body, headers = f"{sim.url}/v1/chat/completions", openai_body(content), OPENAI_HEADERS
    async with http.post(url, json=body, headers=headers) as resp:
        assert resp.status == status
        assert resp.content_type == "application/json"
        error_body = await resp.json()
        retry_after = resp.headers.get("retry-after")
    assert (retry_after == "1") is (status == 429)
    if fmt == "anthropic":
        assert error_body["type"] == "error"
        expected = {429: "rate_limit_error", 500: "api_error", 400: "invalid_request_error"}
        assert error_body["error"]["type"] == expected[status]
        assert error_body["request_id"].startswith("req_")
    else:
        assert set(error_body["error"]) == {"message", "type", "param", "code"}
        if status == 429:
            assert error_body["error"]["code"] == "rate_limit_exceeded"


async def test_auth_check_uses_each_provider_401(sim: Sim, http: aiohttp.ClientSession) -> None:
    wrong = "sk-not-a-valid-key-12345"
    async with http.post(
        f"{sim.url}/v1/messages", json=anthropic_body("hi"), headers={"x-api-key": wrong}
    ) as resp:
        assert resp.status == 401
        body = await resp.json()
        assert body["error"]["type"] == "authentication_error"
    async with http.post(f"{sim.url}/v1/messages", json=anthropic_body("hi")) as resp:
        assert resp.status == 401
    async with http.post(
        f"{sim.url}/v1/chat/completions",
        json=openai_body("hi"),
        headers={"Authorization": f"Bearer {wrong}"},
    ) as resp:
        assert resp.status == 401
        body = await resp.json()
        assert body["error"]["code"] == "invalid_api_key"
        assert wrong not in body["error"]["message"]  # masked, as OpenAI does
    # Both accepted keys work, through either auth header the SDKs use.
    async with http.post(
        f"{sim.url}/v1/messages",
        json=anthropic_body("hi"),
        headers={"Authorization": f"Bearer {BYOK_KEY}"},
    ) as resp:
        assert resp.status == 200


async def test_malformed_body_does_not_parse(sim: Sim, http: aiohttp.ClientSession) -> None:
    body = anthropic_body("x [[malformed]]")
    async with http.post(f"{sim.url}/v1/messages", json=body, headers=ANTHROPIC_HEADERS) as resp:
        assert resp.status == 200
        raw = await resp.text()
    with pytest.raises(json.JSONDecodeError):
        json.loads(raw)


async def test_cut_drops_connection_after_n_deltas(sim: Sim, http: aiohttp.ClientSession) -> None:
    before = sim.stats.streams_cut
    body = anthropic_body("x [[cut:2]]", stream=True)
    received = bytearray()

    async def read_all(resp: aiohttp.ClientResponse) -> None:
        async for chunk in resp.content.iter_any():
            received.extend(chunk)

    async with http.post(f"{sim.url}/v1/messages", json=body, headers=ANTHROPIC_HEADERS) as resp:
        with pytest.raises(aiohttp.ClientPayloadError):
            await read_all(resp)
    assert received.count(b"event: content_block_delta") == 2
    assert b"message_delta" not in received
    assert sim.stats.streams_cut == before + 1


async def test_delay_directive(sim: Sim, http: aiohttp.ClientSession) -> None:
    started = time.monotonic()
    body = openai_body("x [[delay:0.3]]")
    url = f"{sim.url}/v1/chat/completions"
    async with http.post(url, json=body, headers=OPENAI_HEADERS) as resp:
        assert resp.status == 200
    assert time.monotonic() - started >= 0.3


async def test_invalid_request_is_400(sim: Sim, http: aiohttp.ClientSession) -> None:
    body = {"model": "claude-haiku-4-5", "messages": [{"role": "user", "content": "hi"}]}
    async with http.post(f"{sim.url}/v1/messages", json=body, headers=ANTHROPIC_HEADERS) as resp:
        assert resp.status == 400
        error = await resp.json()
    assert error["error"]["type"] == "invalid_request_error"
    assert "max_tokens" in error["error"]["message"]


async def test_module_entry_point_serves(http: aiohttp.ClientSession) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "PROVIDER_SIM_ADDR": f"127.0.0.1:{port}"}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "provider_sim", env=env, stdout=asyncio.subprocess.PIPE
    )
    try:
        assert process.stdout is not None
        line = await asyncio.wait_for(process.stdout.readline(), timeout=20)
        assert line.decode().strip() == f"provider_sim listening on http://127.0.0.1:{port}"
        async with http.get(f"http://127.0.0.1:{port}/health") as resp:
            assert resp.status == 200
    finally:
        process.terminate()
        assert await asyncio.wait_for(process.wait(), timeout=10) == 0


def test_plan_directives() -> None:
    plan = make_plan(["x" * 100], "x [[usage:7,3]] [[cut:2]] [[pace:0.5]] [[fail:429]]", None)
    assert (plan.input_tokens, len(plan.words), plan.cut, plan.pace, plan.fail) == (
        7,
        3,
        2,
        0.5,
        429,
    )
    # Every streamed delta is four characters at most: one token by the chars/4 rule.
    assert all(len(delta) <= 4 for delta in plan.deltas)


def test_plan_ignores_bad_directives() -> None:
    directives = "[[usage:x,1]] [[fail:200]] [[cut:-]] [[delay:soon]] [[nope]] [[tokenizer:x]]"
    plan = make_plan(["y" * 10], directives, None)
    assert plan == make_plan(["y" * 10], "", None)
    assert (plan.input_tokens, len(plan.words)) == (3, DEFAULT_REPLY_WORDS)
    assert plan.fail is None


def test_the_bytes_tokenizer_counts_every_utf8_byte_and_the_framing() -> None:
    texts = ["système", "日本語で答えて 🎉 [[tokenizer:bytes]]"]
    plan = make_plan(texts, texts[1], None)
    # "système": 8 bytes; 7 kana/kanji of 3 bytes, 2 spaces, a 4-byte emoji, 19 ASCII; framing.
    assert plan.input_tokens == 8 + (7 * 3 + 2 + 4 + 19) + 3 + 4 * 2
