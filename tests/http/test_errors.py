"""Every refusal over HTTP: the status a client expects and a JSON body that says what went wrong
(`error.code`, `error.message`, `error.reason`, and `error.field` for bad input), validated
against the OpenAPI document; no token or key ever echoed."""

from __future__ import annotations

import time
from typing import Any

import pytest
from aiohttp import web

from gateway_service.errors import Failure
from gateway_service.http import HttpServer, create_http_app
from gateway_service.http.errors import HTTP_STATUS
from gateway_service.http.views import usd
from tests.e2e.conftest import gateway_settings, mint
from tests.e2e.e2e_support import usage_rows, wait_no_open_holds
from tests.http.conftest import MAX_BODY, Edge, Reply, start_edge
from tests.ledger_service.helpers import balance, credit

CALL = {"content": "[[usage:40,60]] hi", "model": "claude-haiku-4-5", "maxTokens": 100}


async def funded(edge: Edge, tokens: int = 1000) -> tuple[str, dict[str, str]]:
    user, auth = edge.user()
    await credit(edge.stack.ledger.stub, user, tokens)
    return user, auth


def refused(reply: Reply, status: int, reason: str, field: str | None = None) -> str:
    assert reply.status == status, reply.body
    error = reply.error
    assert error["reason"] == reason, error
    assert error["message"]
    assert error.get("field") == field, error
    message: str = error["message"]
    return message


# ---- the table ------------------------------------------------------------------------------


def test_every_failure_has_an_http_status() -> None:
    assert set(HTTP_STATUS) == set(Failure)
    assert HTTP_STATUS[Failure.INSUFFICIENT_BALANCE] == 402
    assert HTTP_STATUS[Failure.RATE_LIMITED] == 429
    assert HTTP_STATUS[Failure.TIMEOUT] == 504


def test_usd_is_an_exact_decimal_string() -> None:
    assert usd(7500) == "0.007500"
    assert usd(0) == "0.000000"
    assert usd(12_345_678) == "12.345678"
    assert usd(None) is None


# ---- 402 ------------------------------------------------------------------------------------


async def test_insufficient_balance_is_402_for_calls_and_streams(edge: Edge) -> None:
    user, auth = await funded(edge, 10)  # 8 usable; the call would hold 125 + more
    reply = await edge.call("POST", "/v1/generate", json_body=CALL, headers=auth)
    message = refused(reply, 402, "INSUFFICIENT_BALANCE")
    assert "not enough tokens" in message

    status, streamed = await edge.stream(CALL, auth)
    assert status == 402
    assert isinstance(streamed, Reply)
    refused(streamed, 402, "INSUFFICIENT_BALANCE")
    assert (await balance(edge.stack.ledger.stub, user)).available_tokens == 8
    assert await usage_rows(edge.stack.ledger, user) == []


# ---- 401 ------------------------------------------------------------------------------------


def expired_token(sub: str) -> str:
    return mint(sub, exp=int(time.time()) - 3600, iat=int(time.time()) - 7200)


BAD_TOKENS: dict[str, tuple[str, str]] = {
    # name: (Authorization header, reason)
    "wrong-secret": (
        "Bearer " + mint("mallory", secret="not-the-secret-but-long-enough-for-hs256"),
        "INVALID_TOKEN",
    ),
    "expired": ("Bearer " + expired_token("late"), "TOKEN_EXPIRED"),
    "garbage": ("Bearer not.a.jwt", "INVALID_TOKEN"),
    "empty": ("Bearer ", "INVALID_TOKEN"),
    "basic-scheme": ("Basic dXNlcjpwYXNz", "INVALID_TOKEN"),
}


@pytest.mark.parametrize("case", list(BAD_TOKENS))
@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "/v1/generate", CALL),
        ("POST", "/v1/generate", {**CALL, "apiKey": "sk-own"}),  # a key does not excuse a bad JWT
        ("POST", "/v1/generate/stream", CALL),
        ("GET", "/v1/me/status", None),
        ("GET", "/v1/me/usage", None),
        ("GET", "/v1/me/purchases", None),
        ("POST", "/v1/eligibility", {"hasApiKey": True}),
    ],
)
async def test_bad_token_is_401_everywhere(
    edge: Edge, case: str, method: str, path: str, body: Any
) -> None:
    header, reason = BAD_TOKENS[case]
    reply = await edge.call(method, path, json_body=body, headers={"Authorization": header})
    refused(reply, 401, reason)
    assert reply.headers["WWW-Authenticate"].startswith("Bearer")
    token = header.partition(" ")[2]
    if token:
        assert token not in str(reply.body)


async def test_expired_token_says_so(edge: Edge) -> None:
    reply = await edge.call(
        "GET", "/v1/me/status", headers={"Authorization": f"Bearer {expired_token('late')}"}
    )
    assert refused(reply, 401, "TOKEN_EXPIRED") == "token expired"


@pytest.mark.parametrize("path", ["/v1/me/status", "/v1/me/usage", "/v1/me/purchases"])
async def test_own_data_needs_a_token(edge: Edge, path: str) -> None:
    refused(await edge.call("GET", path), 401, "AUTHENTICATION_REQUIRED")


async def test_a_public_caller_must_bring_a_key(edge: Edge) -> None:
    message = refused(
        await edge.call("POST", "/v1/generate", json_body=CALL), 401, "AUTHENTICATION_REQUIRED"
    )
    assert "API key" in message
    status, streamed = await edge.stream(CALL)
    assert status == 401
    assert isinstance(streamed, Reply)


# ---- 400 ------------------------------------------------------------------------------------

BAD_BODIES: dict[str, tuple[str, str, str | None, str]] = {
    # name: (raw body, reason, field, words the message must contain)
    "not-json": ('{"content": ', "INVALID_JSON", None, "not valid JSON"),
    "array": ('["hi"]', "INVALID_JSON", None, "JSON object"),
    "string": ('"hi"', "INVALID_JSON", None, "JSON object"),
    "empty": ("", "INVALID_JSON", None, "JSON object"),
    "unknown-field": (
        '{"content": "hi", "max_tokens": 5}',
        "INVALID_ARGUMENT",
        "max_tokens",
        "unknown field",
    ),
    "duplicate-field": (
        '{"content": "hi", "content": "again"}',
        "INVALID_ARGUMENT",
        "content",
        "more than once",
    ),
    "missing-content": ('{"model": "gpt-4o"}', "INVALID_ARGUMENT", "content", "required"),
    "empty-content": ('{"content": "  "}', "INVALID_ARGUMENT", "content", "must not be empty"),
    "content-number": ('{"content": 5}', "INVALID_ARGUMENT", "content", "must be a string"),
    "max-tokens-string": (
        '{"content": "hi", "maxTokens": "10"}',
        "INVALID_ARGUMENT",
        "maxTokens",
        "integer",
    ),
    "max-tokens-float": (
        '{"content": "hi", "maxTokens": 1.5}',
        "INVALID_ARGUMENT",
        "maxTokens",
        "integer",
    ),
    "max-tokens-bool": (
        '{"content": "hi", "maxTokens": true}',
        "INVALID_ARGUMENT",
        "maxTokens",
        "integer",
    ),
    "max-tokens-range": (
        '{"content": "hi", "maxTokens": 1000000}',
        "INVALID_ARGUMENT",
        "maxTokens",
        "must be within 0..128000",
    ),
    "max-tokens-huge": (
        '{"content": "hi", "maxTokens": 99999999999999999999}',
        "INVALID_ARGUMENT",
        "maxTokens",
        "must be within",
    ),
    "api-key-number": (
        '{"content": "hi", "apiKey": 12345}',
        "INVALID_ARGUMENT",
        "apiKey",
        "must be a string",
    ),
    "unknown-provider": (
        '{"content": "hi", "provider": "acme"}',
        "INVALID_ARGUMENT",
        "provider",
        "acme",
    ),
}


@pytest.mark.parametrize("case", list(BAD_BODIES))
async def test_bad_generate_body_is_400_naming_the_field(edge: Edge, case: str) -> None:
    raw, reason, field, words = BAD_BODIES[case]
    _, auth = await funded(edge)
    headers = {**auth, "Content-Type": "application/json"}
    for path in ("/v1/generate", "/v1/generate/stream"):
        reply = await edge.call("POST", path, data=raw, headers=headers)
        message = refused(reply, 400, reason, field)
        assert words in message, message
        if field:
            assert message.startswith(f"{field}:"), message


async def test_bad_input_never_echoes_a_key(edge: Edge) -> None:
    reply = await edge.call(
        "POST", "/v1/generate", json_body={"content": 7, "apiKey": "sk-secret-do-not-echo"}
    )
    refused(reply, 400, "INVALID_ARGUMENT", "content")
    assert "sk-secret" not in str(reply.body)


async def test_non_utf8_body_is_400(edge: Edge) -> None:
    reply = await edge.call(
        "POST",
        "/v1/generate",
        data=b'{"content": "\xff\xfe"}',
        headers={"Content-Type": "application/json"},
    )
    refused(reply, 400, "INVALID_JSON")


@pytest.mark.parametrize(
    ("body", "field", "words"),
    [
        ({"estimatedTokens": -1}, "estimatedTokens", "must be within"),
        ({"estimatedTokens": "5"}, "estimatedTokens", "integer"),
        ({"hasApiKey": "yes"}, "hasApiKey", "true or false"),
        ({"estimated_tokens": 5}, "estimated_tokens", "unknown field"),
    ],
)
async def test_bad_eligibility_body_is_400(
    edge: Edge, body: dict[str, Any], field: str, words: str
) -> None:
    reply = await edge.call("POST", "/v1/eligibility", json_body=body)
    assert words in refused(reply, 400, "INVALID_ARGUMENT", field)


@pytest.mark.parametrize(
    ("path", "query", "field", "words"),
    [
        ("/v1/me/usage", "days=abc", "days", "integer"),
        ("/v1/me/usage", "days=0", "days", "must be within"),
        ("/v1/me/usage", "days=99999999999999", "days", "must be within"),
        ("/v1/me/usage", "include_history=maybe", "include_history", "true or false"),
        ("/v1/me/usage", "days=1&days=2", "days", "more than once"),
        ("/v1/me/usage", "includeHistory=true", "includeHistory", "unknown query parameter"),
        ("/v1/me/purchases", "page_size=-1", "page_size", "must be within"),
        ("/v1/me/purchases", "page_size=1000", "page_size", ""),
        ("/v1/me/purchases", "page_token=forged", "page_token", ""),
        ("/v1/me/status", "verbose=1", "verbose", "unknown query parameter"),
    ],
)
async def test_bad_query_is_400(edge: Edge, path: str, query: str, field: str, words: str) -> None:
    _, auth = edge.user()
    reply = await edge.call("GET", f"{path}?{query}", headers=auth, documented=path)
    assert words in refused(reply, 400, "INVALID_ARGUMENT", field)


async def test_prompt_size_is_bounded_by_the_core(edge: Edge) -> None:
    server, url = await start_edge(edge.stack, http_max_body_bytes=1024 * 1024)
    try:
        edge_big = Edge(edge.stack, url, edge.session, server.app, server)
        _, auth = await funded(edge)
        too_long = "x" * (edge.stack.gateway.gateway.max_prompt_chars + 1)
        reply = await edge_big.call(
            "POST", "/v1/generate", json_body={"content": too_long}, headers=auth
        )
        assert "exceeds" in refused(reply, 400, "INVALID_ARGUMENT", "content")
    finally:
        await server.stop(0)


# ---- 413, 415, 404, 405 ---------------------------------------------------------------------


async def test_body_too_large_is_413(edge: Edge) -> None:
    _, auth = await funded(edge)
    big = {"content": "x" * MAX_BODY}
    for path in ("/v1/generate", "/v1/generate/stream", "/v1/eligibility"):
        reply = await edge.call("POST", path, json_body=big, headers=auth)
        assert str(MAX_BODY) in refused(reply, 413, "BODY_TOO_LARGE")


async def test_other_media_type_is_415(edge: Edge) -> None:
    reply = await edge.call(
        "POST", "/v1/generate", data='{"content": "hi"}', headers={"Content-Type": "text/plain"}
    )
    assert "application/json" in refused(reply, 415, "UNSUPPORTED_MEDIA_TYPE")


async def test_unknown_route_is_a_json_404(edge: Edge) -> None:
    reply = await edge.call("GET", "/v1/nothing-here")
    assert "/v1/nothing-here" in refused(reply, 404, "NOT_FOUND")
    reply = await edge.call("POST", "/")
    refused(reply, 404, "NOT_FOUND")


async def test_wrong_method_is_a_json_405(edge: Edge) -> None:
    reply = await edge.call("GET", "/v1/generate")
    assert reply.status == 405
    assert reply.error["reason"] == "METHOD_NOT_ALLOWED"
    assert reply.headers["Allow"] == "POST"


# ---- 403, 409, 429, 503: refusals from the core, the provider and the ledger ----------------


async def test_provider_refusing_your_own_key_is_403(edge: Edge) -> None:
    call = {"content": "[[fail:401]] hi", "model": "gpt-4o", "apiKey": "sk-revoked"}
    reply = await edge.call("POST", "/v1/generate", json_body=call)
    refused(reply, 403, "PROVIDER_KEY_REFUSED")
    assert "sk-revoked" not in str(reply.body)


async def test_idempotency_key_reused_for_another_request_is_409(edge: Edge) -> None:
    user, auth = await funded(edge)
    first = await edge.call(
        "POST", "/v1/generate", json_body={**CALL, "idempotencyKey": "order-1"}, headers=auth
    )
    assert first.status == 200
    again = await edge.call(
        "POST", "/v1/generate", json_body={**CALL, "idempotencyKey": "order-1"}, headers=auth
    )
    assert again.body == first.body  # a retry: the same answer, charged once
    other = {**CALL, "content": "[[usage:40,60]] something else", "idempotencyKey": "order-1"}
    reply = await edge.call("POST", "/v1/generate", json_body=other, headers=auth)
    assert "different request" in refused(reply, 409, "IDEMPOTENCY_KEY_REUSED")
    assert (await balance(edge.stack.ledger.stub, user)).available_tokens == 675


async def test_provider_rate_limit_is_429_with_retry_after(edge: Edge) -> None:
    user, auth = await funded(edge)
    call = {**CALL, "content": "[[usage:40,60]] [[fail:429]] hi"}
    reply = await edge.call("POST", "/v1/generate", json_body=call, headers=auth)
    refused(reply, 429, "PROVIDER_RATE_LIMITED")
    assert reply.headers["Retry-After"] == "1"

    status, streamed = await edge.stream(call, auth)
    assert status == 429
    assert isinstance(streamed, Reply)
    assert streamed.headers["Retry-After"] == "1"
    refused(streamed, 429, "PROVIDER_RATE_LIMITED")
    await wait_no_open_holds(edge.stack.ledger)
    assert (await balance(edge.stack.ledger.stub, user)).available_tokens == 800


async def test_stream_failing_midway_ends_with_an_error_event(edge: Edge) -> None:
    user, auth = await funded(edge)
    call = {**CALL, "content": "[[usage:40,60]] [[cut:5]] tell me"}
    status, events = await edge.stream(call, auth)
    assert status == 200
    assert isinstance(events, list)
    assert [e.event for e in events] == ["delta"] * 5 + ["error"]
    error = events[-1].data["error"]
    assert (error["code"], error["reason"]) == (503, "PROVIDER_UNAVAILABLE")
    await wait_no_open_holds(edge.stack.ledger)
    [row] = await usage_rows(edge.stack.ledger, user)
    assert row.output_tokens == 5  # charged for what was streamed


async def test_ledger_down_is_503_and_not_ready(edge: Edge) -> None:
    _, auth = await funded(edge)
    assert (await edge.call("GET", "/readyz")).status == 200
    await edge.stack.ledger.app.grpc.server.stop(0)

    reply = await edge.call("POST", "/v1/generate", json_body=CALL, headers=auth)
    assert "unavailable" in refused(reply, 503, "LEDGER_UNAVAILABLE")
    refused(await edge.call("GET", "/v1/me/status", headers=auth), 503, "LEDGER_UNAVAILABLE")
    status, streamed = await edge.stream(CALL, auth)
    assert status == 503
    assert isinstance(streamed, Reply)
    refused(streamed, 503, "LEDGER_UNAVAILABLE")
    refused(await edge.call("GET", "/readyz"), 503, "LEDGER_UNAVAILABLE")
    assert (await edge.call("GET", "/healthz")).status == 200  # the process itself is up


# ---- 500, and routes added by others ---------------------------------------------------------


async def test_extra_routes_share_the_json_errors(edge: Edge) -> None:
    async def broken(request: web.Request) -> web.Response:
        raise RuntimeError("secret internals")

    async def hello(request: web.Request) -> web.Response:
        return web.json_response({"hello": "webhook"})

    settings = gateway_settings(edge.stack.ledger.address, edge.stack.sim_url)
    app = create_http_app(
        edge.stack.gateway.gateway,
        edge.stack.gateway.verifier,
        settings,
        extra_routes=[web.post("/webhooks/test", hello), web.get("/broken", broken)],
    )
    server = HttpServer(app)
    port = await server.start("127.0.0.1:0")
    try:
        url = f"http://127.0.0.1:{port}"
        async with edge.session.post(url + "/webhooks/test", data=b"raw") as response:
            assert (response.status, await response.json()) == (200, {"hello": "webhook"})
        async with edge.session.get(url + "/broken") as response:
            body = await response.json()
        assert response.status == 500
        assert body == {"error": {"code": 500, "message": "internal error", "reason": "INTERNAL"}}
    finally:
        await server.stop(0)
