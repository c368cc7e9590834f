"""rpcai as an MCP server at /mcp: the SDK's own client over real HTTP against a real edge (a
real ledger, the provider stand-in). The tools are the HTTP API's calls: the same metering, the
same answers, the same refusals; who calls comes only from the request's bearer token."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import httpx2
import mcp_types as types
import pytest
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client

from tests.e2e.conftest import mint
from tests.e2e.e2e_support import open_holds, wait_no_open_holds
from tests.http.conftest import ORIGIN, Edge, start_edge
from tests.ledger_service.helpers import balance, credit

HUNDRED_TOKENS = "[[usage:40,60]] hi"  # 40 in + 60 out = 100 used -> 125 charged
CALL = {"content": HUNDRED_TOKENS, "model": "claude-haiku-4-5", "maxTokens": 100}
TOOLS = {
    "generate_text",
    "get_user_status",
    "get_usage_analytics",
    "get_purchase_history",
    "check_request_eligibility",
    "list_prompts",
}


@asynccontextmanager
async def mcp_session(
    edge: Edge, headers: Mapping[str, str] | None = None
) -> AsyncIterator[ClientSession]:
    async with (
        httpx2.AsyncClient(headers=dict(headers or {}), timeout=30) as http,
        streamable_http_client(f"{edge.url}/mcp", http_client=http) as (read, write),
        ClientSession(read, write) as session,
    ):
        await session.initialize()
        yield session


async def call(session: ClientSession, tool: str, **arguments: Any) -> types.CallToolResult:
    result = await session.call_tool(tool, arguments)
    assert isinstance(result, types.CallToolResult)
    # The text says what the structured content does (a client may read either).
    assert len(result.content) == 1
    text = result.content[0]
    assert isinstance(text, types.TextContent)
    if not result.is_error:
        assert json.loads(text.text) == result.structured_content
    return result


def error_text(result: types.CallToolResult) -> str:
    assert result.is_error, result.structured_content
    text = result.content[0]
    assert isinstance(text, types.TextContent)
    return text.text


async def test_tools_are_listed_with_their_schemas(edge: Edge) -> None:
    async with mcp_session(edge) as session:  # no token: listing is public
        listed = await session.list_tools()
    tools = {tool.name: tool for tool in listed.tools}
    assert set(tools) == TOOLS
    generate = tools["generate_text"].input_schema
    assert generate["type"] == "object"
    assert generate["required"] == ["content"]
    assert {"content", "apiKey", "maxTokens", "promptId", "idempotencyKey"} <= set(
        generate["properties"]
    )
    assert generate["additionalProperties"] is False
    assert set(tools["get_usage_analytics"].input_schema["properties"]) == {
        "days",
        "include_history",
    }
    for tool in tools.values():
        assert tool.output_schema is not None
        assert tool.output_schema["type"] == "object"
        assert "userId" not in json.dumps(tool.input_schema)  # never act for another user


async def test_each_tool_answers_as_its_http_operation_does(edge: Edge) -> None:
    """Signed in and funded: every tool's result is the HTTP API's answer to the same call."""
    user, auth = edge.user()
    await credit(edge.stack.ledger.stub, user, 1000)
    async with mcp_session(edge, auth) as session:
        generated = await call(session, "generate_text", **CALL)
        assert not generated.is_error, generated.content
        assert generated.structured_content["provider"] == "anthropic"
        assert generated.structured_content["usage"] == {"inputTokens": 40, "outputTokens": 60}
        assert generated.structured_content["tokenUsage"] == {
            "tokensCharged": 125,
            "remainingBalance": 675,
            "tokensUsed": 100,
            "feeTokens": 25,
            "settlementPending": False,
        }
        await wait_no_open_holds(edge.stack.ledger)
        answers = {
            "get_user_status": await call(session, "get_user_status"),
            "get_usage_analytics": await call(
                session, "get_usage_analytics", days=1, include_history=True
            ),
            "get_purchase_history": await call(session, "get_purchase_history", page_size=5),
            "check_request_eligibility": await call(
                session, "check_request_eligibility", content="hello", maxTokens=100
            ),
            "list_prompts": await call(session, "list_prompts"),
        }
    assert not any(result.is_error for result in answers.values()), answers
    http = {
        "get_user_status": await edge.call("GET", "/v1/me/status", headers=auth),
        "get_usage_analytics": await edge.call(
            "GET", "/v1/me/usage", headers=auth, params={"days": "1", "include_history": "true"}
        ),
        "get_purchase_history": await edge.call(
            "GET", "/v1/me/purchases", headers=auth, params={"page_size": "5"}
        ),
        "check_request_eligibility": await edge.call(
            "POST",
            "/v1/eligibility",
            headers=auth,
            json_body={"content": "hello", "maxTokens": 100},
        ),
        "list_prompts": await edge.call("GET", "/v1/prompts", headers=auth),
    }
    for name, reply in http.items():
        assert reply.status == 200, (name, reply.body)
        assert answers[name].structured_content == reply.body, name
    status = answers["get_user_status"].structured_content
    assert status["availableTokens"] == 675  # the MCP call's charge, seen over HTTP
    [record] = answers["get_usage_analytics"].structured_content["history"]
    assert record["tokensCharged"] == 125
    [purchase] = answers["get_purchase_history"].structured_content["purchases"]
    assert purchase["tokensPurchased"] == 1000


async def test_a_metered_call_costs_the_same_as_over_http(edge: Edge) -> None:
    over_mcp, mcp_auth = edge.user()
    over_http, http_auth = edge.user()
    for user in (over_mcp, over_http):
        await credit(edge.stack.ledger.stub, user, 1000)
    call_ = {**CALL, "content": "[[usage:37,91]] the same words"}
    async with mcp_session(edge, mcp_auth) as session:
        result = await call(session, "generate_text", **call_)
    reply = await edge.call("POST", "/v1/generate", json_body=call_, headers=http_auth)
    assert reply.status == 200, reply.body
    assert not result.is_error, result.content
    assert result.structured_content["tokenUsage"] == reply.body["tokenUsage"]
    assert result.structured_content["text"] == reply.body["text"]
    # 128 used, plus the 25% fee rounded up: 160, from the 800 usable of a 1000 purchase.
    assert reply.body["tokenUsage"]["tokensCharged"] == 160
    await wait_no_open_holds(edge.stack.ledger)
    for user in (over_mcp, over_http):
        b = await balance(edge.stack.ledger.stub, user)
        assert (b.available_tokens, b.reserved_tokens) == (640, 0)


async def test_a_bad_or_expired_token_is_refused_before_any_tool(edge: Edge) -> None:
    user, _ = edge.user()
    await credit(edge.stack.ledger.stub, user, 1000)
    expired = mint(user, exp=1_000_000)
    forged = mint(user, secret="not-the-secret-" + "x" * 32)
    request = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "tools/call",
        "params": {"name": "generate_text", "arguments": CALL},
    }
    headers = {"Accept": "application/json, text/event-stream"}
    for token, reason in ((expired, "TOKEN_EXPIRED"), (forged, "INVALID_TOKEN")):
        reply = await edge.call(
            "POST",
            "/mcp",
            json_body=request,
            headers={**headers, "Authorization": f"Bearer {token}"},
        )
        assert reply.status == 401, reply.body
        assert reply.error["reason"] == reason
        assert reply.headers["WWW-Authenticate"].startswith("Bearer")
        assert token not in json.dumps(reply.body)
        # The SDK's client is refused too: it cannot even initialize.
        with pytest.raises(Exception) as refused:  # noqa: PT011 - the SDK's own error type
            async with mcp_session(edge, {"Authorization": f"Bearer {token}"}):
                pass
        assert token not in str(refused.value)
    b = await balance(edge.stack.ledger.stub, user)
    assert (b.available_tokens, b.reserved_tokens) == (800, 0)  # no call was made


async def test_without_a_token_only_byok_calls(edge: Edge) -> None:
    async with mcp_session(edge) as session:
        listed = await session.list_tools()
        assert {tool.name for tool in listed.tools} == TOOLS
        for tool in ("get_user_status", "get_usage_analytics", "get_purchase_history"):
            refused = await call(session, tool)
            assert error_text(refused).startswith("AUTHENTICATION_REQUIRED: sign in"), tool
            assert refused.structured_content["error"]["code"] == 401
        unpaid = await call(session, "generate_text", **CALL)
        assert error_text(unpaid).startswith("AUTHENTICATION_REQUIRED: sign in")
        byok = await call(
            session, "generate_text", content="[[usage:10,5]] hi", model="gpt-4o", apiKey="sk-own"
        )
        assert not byok.is_error, byok.content
        assert byok.structured_content["tokenUsage"] is None
        assert byok.structured_content["usageInfo"]["tokensUsed"] == 15
        assert "sk-own" not in json.dumps(byok.structured_content)
        # Public, as over HTTP: eligibility and the prompts.
        eligible = await call(session, "check_request_eligibility", hasApiKey=True)
        assert eligible.structured_content["canMakeRequest"] is True
        assert not (await call(session, "list_prompts")).is_error


async def test_two_users_calling_at_once_keep_their_balances_apart(edge: Edge) -> None:
    first, first_auth = edge.user()
    second, second_auth = edge.user()
    # Enough for every hold at once (a hold is sized for the whole call, not what it uses).
    await credit(edge.stack.ledger.stub, first, 4000)  # 3200 usable
    await credit(edge.stack.ledger.stub, second, 5000)  # 4000 usable
    calls = 5
    async with (
        mcp_session(edge, first_auth) as one,
        mcp_session(edge, second_auth) as other,
    ):
        results = await asyncio.gather(
            *(call(one, "generate_text", **CALL) for _ in range(calls)),
            *(
                call(other, "generate_text", **{**CALL, "content": "[[usage:8,12]] hi"})
                for _ in range(calls)
            ),
        )
    assert not any(result.is_error for result in results), [
        r.content for r in results if r.is_error
    ]
    charged = [result.structured_content["tokenUsage"]["tokensCharged"] for result in results]
    assert charged == [125] * calls + [25] * calls  # 100 + 25 fee; 20 + 5 fee
    await wait_no_open_holds(edge.stack.ledger)
    assert (await balance(edge.stack.ledger.stub, first)).available_tokens == 3200 - 125 * calls
    assert (await balance(edge.stack.ledger.stub, second)).available_tokens == 4000 - 25 * calls


async def test_refusals_are_tool_errors_with_their_reason(edge: Edge) -> None:
    user, auth = edge.user()  # never funded
    async with mcp_session(edge, auth) as session:
        poor = await call(session, "generate_text", **CALL)
        assert error_text(poor).startswith("INSUFFICIENT_BALANCE: ")
        assert poor.structured_content["error"]["code"] == 402
        bad = await call(session, "generate_text", **{**CALL, "maxTokens": -1})
        assert error_text(bad).startswith("INVALID_ARGUMENT: maxTokens: must be within")
        assert bad.structured_content["error"]["field"] == "maxTokens"
        unknown = await call(session, "generate_text", content="hi", userId="someone-else")
        assert error_text(unknown).startswith("INVALID_ARGUMENT: userId: unknown field")
        key = "sk-secret-\x01-key"
        leaky = await call(session, "generate_text", content="hi", apiKey=key)
        assert error_text(leaky).startswith("INVALID_ARGUMENT: apiKey: must be printable ASCII")
        assert key not in error_text(leaky)
    # The same refusal over HTTP says the same.
    reply = await edge.call("POST", "/v1/generate", json_body=CALL, headers=auth)
    assert reply.status == 402
    assert poor.structured_content == reply.body
    assert (await balance(edge.stack.ledger.stub, user)).available_tokens == 0


async def test_the_transport_is_stateless_post_only_with_the_edges_errors(edge: Edge) -> None:
    accept = {"Accept": "application/json, text/event-stream"}
    # A notification is accepted with no body (nothing to keep: there is no session).
    note = {"jsonrpc": "2.0", "method": "notifications/initialized"}
    async with edge.session.post(f"{edge.url}/mcp", json=note, headers=accept) as accepted:
        assert (accepted.status, await accepted.read()) == (202, b"")
        assert "mcp-session-id" not in accepted.headers
    # No session means no GET stream and nothing to DELETE.
    for method in ("GET", "DELETE"):
        assert (await edge.call(method, "/mcp", headers=accept)).status == 405
    # Not a JSON-RPC message: the edge's own refusal, before the SDK.
    bad = await edge.call("POST", "/mcp", json_body={"method": "tools/list"}, headers=accept)
    assert bad.status == 400
    assert bad.error["field"] == "jsonrpc"
    # The SDK's own refusal: the protocol's JSON-RPC error, passed on as it is.
    listing = {"jsonrpc": "2.0", "id": 7, "method": "tools/list"}
    refused = await edge.call("POST", "/mcp", json_body=listing, headers={"Accept": "text/html"})
    assert refused.status == 406
    assert refused.body["jsonrpc"] == "2.0"
    assert "application/json" in refused.body["error"]["message"]
    listed = await edge.call("POST", "/mcp", json_body=listing, headers=accept)
    assert listed.status == 200
    assert listed.body["id"] == 7
    assert {tool["name"] for tool in listed.body["result"]["tools"]} == TOOLS


async def test_browser_pages_of_other_origins_are_refused(edge: Edge) -> None:
    """DNS rebinding: a page of another site must not reach the tools through a browser."""
    listing = {"jsonrpc": "2.0", "id": 1, "method": "tools/list"}
    accept = {"Accept": "application/json, text/event-stream"}
    for origin in ("http://attacker.example", "null"):
        refused = await edge.call(
            "POST", "/mcp", json_body=listing, headers={**accept, "Origin": origin}
        )
        assert refused.status == 403, refused.body
        assert refused.error["reason"] == "ORIGIN_NOT_ALLOWED"
    allowed = await edge.call(
        "POST", "/mcp", json_body=listing, headers={**accept, "Origin": ORIGIN}
    )
    assert allowed.status == 200, allowed.body
    assert allowed.headers["Access-Control-Allow-Origin"] == ORIGIN


async def slow_call_at_the_provider(
    edge: Edge, url: str
) -> tuple[str, asyncio.Task[aiohttp.ClientResponse]]:
    """A funded user's generate_text posted raw, once its hold is made (the call then waits
    30 s at the provider): the user and the request's task."""
    user, auth = edge.user()
    await credit(edge.stack.ledger.stub, user, 1000)
    request = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "tools/call",
        "params": {
            "name": "generate_text",
            "arguments": {**CALL, "content": "[[delay:30]] [[usage:40,60]] slow"},
        },
    }
    headers = {**auth, "Accept": "application/json, text/event-stream"}
    post = asyncio.create_task(edge.session.post(f"{url}/mcp", json=request, headers=headers))
    deadline = asyncio.get_running_loop().time() + 5
    while not await open_holds(edge.stack.ledger):
        assert asyncio.get_running_loop().time() < deadline, "the call never made its hold"
        await asyncio.sleep(0.02)
    return user, post


async def test_a_client_that_leaves_mid_call_has_its_hold_released(edge: Edge) -> None:
    """The tool runs in the SDK's task group, not the request's: the client going away must
    still reach the call, so its hold is released (not left to expire) and nothing charged."""
    user, post = await slow_call_at_the_provider(edge, edge.url)
    post.cancel()  # the client leaves: its connection closes
    with pytest.raises(asyncio.CancelledError):
        await post
    await wait_no_open_holds(edge.stack.ledger)
    b = await balance(edge.stack.ledger.stub, user)
    assert (b.available_tokens, b.reserved_tokens) == (800, 0)


async def test_shutdown_past_the_grace_releases_a_tool_call(edge: Edge) -> None:
    """A tool call still running when the edge stops (past its grace) is cancelled with the
    SDK's task group: its hold is released, nothing charged, and the stop does not hang."""
    server, url = await start_edge(edge.stack)
    user, post = await slow_call_at_the_provider(edge, url)
    await asyncio.wait_for(server.stop(grace=0.2), timeout=10)
    with contextlib.suppress(aiohttp.ClientError):
        async with await post as response:
            await response.read()
    await wait_no_open_holds(edge.stack.ledger, within=3)
    b = await balance(edge.stack.ledger.stub, user)
    assert (b.available_tokens, b.reserved_tokens) == (800, 0)


MODERN = {"mcp-protocol-version": "2026-07-28", "Accept": "application/json, text/event-stream"}
MODERN_META = {
    "io.modelcontextprotocol/protocolVersion": "2026-07-28",
    "io.modelcontextprotocol/clientCapabilities": {},
}


async def test_the_per_request_protocol_revision_gets_its_own_errors(edge: Edge) -> None:
    """The 2026-07-28 revision (no handshake) answers its errors as JSON-RPC errors with an
    HTTP status: the client needs them as they are (code, id), not in the edge's shape."""
    user, auth = edge.user()
    await credit(edge.stack.ledger.stub, user, 1000)
    unknown = {"jsonrpc": "2.0", "id": 6, "method": "nope/nope", "params": {"_meta": MODERN_META}}
    reply = await edge.call(
        "POST", "/mcp", json_body=unknown, headers={**auth, **MODERN, "mcp-method": "nope/nope"}
    )
    assert reply.status == 404, reply.body
    assert (reply.body["id"], reply.body["error"]["code"]) == (6, types.METHOD_NOT_FOUND)
    status = {
        "jsonrpc": "2.0",
        "id": 7,
        "method": "tools/call",
        "params": {"name": "get_user_status", "arguments": {}, "_meta": MODERN_META},
    }
    headers = {**auth, **MODERN, "mcp-method": "tools/call", "mcp-name": "get_user_status"}
    reply = await edge.call("POST", "/mcp", json_body=status, headers=headers)
    assert reply.status == 200, reply.body
    assert reply.body["result"]["structuredContent"]["availableTokens"] == 800


async def test_a_browser_client_of_an_allowed_origin_may_send_the_mcp_headers(edge: Edge) -> None:
    """After its handshake an MCP client sends Mcp-Protocol-Version (and Mcp-Method, Mcp-Name
    in the per-request revision): a browser asks first, and must be let through."""
    asked = "authorization, content-type, mcp-protocol-version, mcp-method, mcp-name"
    async with edge.session.options(
        f"{edge.url}/mcp",
        headers={
            "Origin": ORIGIN,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": asked,
        },
    ) as preflight:
        assert preflight.status == 204
        allowed = preflight.headers["Access-Control-Allow-Headers"].lower()
    assert {h.strip() for h in asked.split(",")} <= {h.strip() for h in allowed.split(",")}
