"""CORS for extension origins: preflights answered for configured origins only (exact entries and
`*` patterns), the allowed origin echoed on real answers (errors and SSE streams included),
never `*`, never credentials."""

from __future__ import annotations

import pytest

from tests.http.conftest import ORIGIN, Edge
from tests.ledger_service.helpers import credit

PREFLIGHT = {
    "Access-Control-Request-Method": "POST",
    "Access-Control-Request-Headers": "authorization, content-type",
}


@pytest.mark.parametrize("origin", [ORIGIN, "vscode-webview://0a1b2c3d-session"])
async def test_preflight_from_a_configured_origin(edge: Edge, origin: str) -> None:
    async with edge.session.options(
        edge.url + "/v1/generate", headers={"Origin": origin, **PREFLIGHT}
    ) as response:
        assert response.status == 204
        h = response.headers
        assert h["Access-Control-Allow-Origin"] == origin
        assert "POST" in h["Access-Control-Allow-Methods"]
        allowed = {v.strip().lower() for v in h["Access-Control-Allow-Headers"].split(",")}
        assert {"authorization", "content-type"} <= allowed
        assert int(h["Access-Control-Max-Age"]) > 0
        assert "Origin" in h["Vary"]
        assert "Access-Control-Allow-Credentials" not in h


@pytest.mark.parametrize(
    "origin", ["https://evil.example", "null", "chrome-extension://rpcai-test-extension.evil"]
)
async def test_preflight_from_another_origin_is_refused(edge: Edge, origin: str) -> None:
    reply = await edge.call(
        "OPTIONS", "/v1/generate", headers={"Origin": origin, **PREFLIGHT}, documented="-"
    )
    assert reply.status == 403
    assert reply.error["reason"] == "ORIGIN_NOT_ALLOWED"
    assert "Access-Control-Allow-Origin" not in reply.headers


async def test_preflight_for_an_unknown_route_is_404(edge: Edge) -> None:
    reply = await edge.call(
        "OPTIONS", "/v1/nope", headers={"Origin": ORIGIN, **PREFLIGHT}, documented="-"
    )
    assert reply.status == 404


async def test_answers_echo_only_a_configured_origin(edge: Edge) -> None:
    ok = await edge.call("GET", "/healthz", headers={"Origin": ORIGIN})
    assert ok.headers["Access-Control-Allow-Origin"] == ORIGIN
    assert "Retry-After" in ok.headers["Access-Control-Expose-Headers"]
    assert ok.headers["Vary"] == "Origin"

    refused = await edge.call("GET", "/v1/me/status", headers={"Origin": ORIGIN})
    assert refused.status == 401
    assert refused.headers["Access-Control-Allow-Origin"] == ORIGIN  # the page can read why

    other = await edge.call("GET", "/healthz", headers={"Origin": "https://evil.example"})
    assert other.status == 200
    assert "Access-Control-Allow-Origin" not in other.headers
    assert other.headers["Vary"] == "Origin"

    no_origin = await edge.call("GET", "/healthz")
    assert "Access-Control-Allow-Origin" not in no_origin.headers


async def test_a_stream_carries_the_origin_too(edge: Edge) -> None:
    user, auth = edge.user()
    await credit(edge.stack.ledger.stub, user, 1000)
    async with edge.session.post(
        edge.url + "/v1/generate/stream",
        json={"content": "[[usage:4,3]] hi", "model": "gpt-4o", "maxTokens": 10},
        headers={**auth, "Origin": ORIGIN},
    ) as response:
        assert response.status == 200
        assert response.content_type == "text/event-stream"
        assert response.headers["Access-Control-Allow-Origin"] == ORIGIN
        body = (await response.read()).decode()
    assert body.rstrip().endswith("event: done\ndata: {}")
