"""The HTTP API's routes: request JSON in, one core call, camelCase JSON out.

Public (no token needed): POST /v1/generate and /v1/generate/stream with an `apiKey` (BYOK),
POST /v1/eligibility, /healthz, /readyz, /openapi.json. Everything under /v1/me needs a JWT.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from gateway_service.core import GenerateRequest
from gateway_service.errors import GatewayError
from gateway_service.http import body, views
from gateway_service.http.auth import caller, signed_in
from gateway_service.http.disconnect import ClientGone, until_disconnected
from gateway_service.http.errors import error_response
from gateway_service.http.openapi import OPENAPI
from gateway_service.http.sse import SseStream
from gateway_service.http.state import ADDRESSES, GATEWAY, STATE
from gateway_service.http.stream_cap import one_stream_slot
from gateway_service.limits.rate import rate_headers

routes = web.RouteTableDef()

GENERATE_FIELDS = frozenset(
    {"content", "systemPrompt", "provider", "model", "maxTokens", "apiKey", "idempotencyKey"}
)
ELIGIBILITY_FIELDS = frozenset(
    {"estimatedTokens", "hasApiKey", "content", "systemPrompt", "maxTokens"}
)
USAGE_PARAMS = frozenset({"days", "include_history"})
PURCHASE_PARAMS = frozenset({"page_size", "page_token"})
DEFAULT_USAGE_DAYS = 30


def generate_request(obj: dict[str, Any], address: str = "") -> GenerateRequest:
    # Ranges beyond the transport's own (int32) are the core's to check, as over gRPC.
    return GenerateRequest(
        client_address=address,
        content=body.string(obj, "content", required=True),
        system_prompt=body.string(obj, "systemPrompt"),
        provider=body.string(obj, "provider"),
        model=body.string(obj, "model"),
        max_tokens=body.integer(obj, "maxTokens", -body.INT32_MAX, body.INT32_MAX),
        api_key=body.string(obj, "apiKey"),
        idempotency_key=body.string(obj, "idempotencyKey"),
    )


def address_of(request: web.Request) -> str:
    """The caller's address: the peer, or X-Forwarded-For's last untrusted hop behind a trusted
    proxy (see gateway_service.client_address)."""
    peer = request.remote or "unknown"
    return request.app[ADDRESSES].resolve(peer, request.headers.get("X-Forwarded-For"))


@routes.post("/v1/generate")
async def generate(request: web.Request) -> web.Response:
    identity = await caller(request)
    req = generate_request(await body.read_object(request, GENERATE_FIELDS), address_of(request))
    result = await until_disconnected(request, request.app[GATEWAY].generate(identity, req))
    return web.json_response(views.generate(result), headers=rate_headers(result.rate))


@routes.post("/v1/generate/stream")
@one_stream_slot
async def generate_stream(request: web.Request) -> web.StreamResponse:
    identity = await caller(request)
    req = generate_request(await body.read_object(request, GENERATE_FIELDS), address_of(request))
    sse = SseStream(request, request.app[GATEWAY].limits.write_timeout_seconds)
    events = request.app[GATEWAY].stream(identity, req)
    try:
        return await until_disconnected(request, sse.run(events))
    except (ClientGone, GatewayError):
        if sse.response is None:
            raise
        return sse.response  # already streamed, and ended with an error event if need be


@routes.get("/v1/me/status")
async def user_status(request: web.Request) -> web.Response:
    identity = await signed_in(request)
    body.query(request, frozenset())
    return web.json_response(views.status(await request.app[GATEWAY].user_status(identity)))


@routes.get("/v1/me/usage")
async def usage_analytics(request: web.Request) -> web.Response:
    identity = await signed_in(request)
    params = body.query(request, USAGE_PARAMS)
    days = body.query_int(params, "days", DEFAULT_USAGE_DAYS, 1, body.INT32_MAX)
    include_history = body.query_bool(params, "include_history", False)
    analytics = await request.app[GATEWAY].usage_analytics(identity, days, include_history)
    return web.json_response(views.usage_analytics(analytics))


@routes.get("/v1/me/purchases")
async def purchase_history(request: web.Request) -> web.Response:
    identity = await signed_in(request)
    params = body.query(request, PURCHASE_PARAMS)
    page_size = body.query_int(params, "page_size", 0, 1, body.INT32_MAX)
    page_token = params.get("page_token", "")
    page = await request.app[GATEWAY].purchase_history(identity, page_size, page_token)
    return web.json_response(views.purchases(page))


@routes.post("/v1/eligibility")
async def eligibility(request: web.Request) -> web.Response:
    identity = await caller(request)
    obj = await body.read_object(request, ELIGIBILITY_FIELDS)
    estimated = body.integer(obj, "estimatedTokens", -body.INT64_MAX, body.INT64_MAX)
    has_api_key = body.boolean(obj, "hasApiKey")
    content = body.string(obj, "content")
    call = None
    if content:
        call = GenerateRequest(
            content=content,
            system_prompt=body.string(obj, "systemPrompt"),
            max_tokens=body.integer(obj, "maxTokens", -body.INT32_MAX, body.INT32_MAX),
        )
    result = await request.app[GATEWAY].eligibility(identity, estimated, has_api_key, call)
    return web.json_response(views.eligibility(result))


@routes.get("/healthz")
async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


@routes.get("/readyz")
async def readyz(request: web.Request) -> web.Response:
    if request.app[STATE].draining:
        return error_response(503, "shutting down", "SHUTTING_DOWN")
    if not await request.app[GATEWAY].ledger.ready():
        return error_response(503, "the token ledger is unavailable", "LEDGER_UNAVAILABLE")
    return web.json_response({"status": "ready"})


@routes.get("/openapi.json")
async def openapi(request: web.Request) -> web.Response:
    return web.json_response(OPENAPI)
