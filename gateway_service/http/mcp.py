"""rpcai as an MCP server (Streamable HTTP, the official `mcp` SDK) at POST /mcp on the edge.

    app.router.add_routes(mcp_routes()); app.cleanup_ctx.append(mcp_lifecycle)  # create_http_app

Each tool is one HTTP API operation over the same core call: its arguments are that
operation's request model (`handlers.GenerateRequest`, `handlers.UsageQuery`, ...: the same
names, rules and refusals) and its result is that operation's answer (`views`), sent as
structured content and as JSON text. A core refusal is a tool error (`isError`) holding the
HTTP API's error body and the text "REASON: message".

Stateless, JSON responses: every POST is served on its own (no session, no GET stream), so any
worker process can answer any request.

Who is calling comes only from the Authorization header of that HTTP request, read and verified
by the edge's own rule (`auth.bearer_token`, the app's `JwtVerifier`): a bad token is the edge's
401 before the SDK sees the request; no token is a public caller, who may only make BYOK calls
(`apiKey`). The identity reaches the tools through the SDK's auth context (`get_access_token()`,
an `AccessToken` carrying the `Identity`); no tool takes a user id.

The SDK speaks ASGI and the edge is aiohttp: `_serve_asgi` hands the request over as an ASGI
scope and body, and streams back what the SDK sends.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, Literal, NotRequired

import mcp_types as types
from aiohttp import hdrs, web
from mcp.server.auth.middleware.auth_context import AuthContextMiddleware, get_access_token
from mcp.server.auth.middleware.bearer_auth import AuthenticatedUser
from mcp.server.auth.provider import AccessToken
from mcp.server.context import ServerRequestContext
from mcp.server.lowlevel import Server
from mcp.server.streamable_http_manager import StreamableHTTPSessionManager
from pydantic import ConfigDict
from starlette.authentication import AuthCredentials
from starlette.types import Message, Scope
from typing_extensions import TypedDict  # pydantic reads it on Python < 3.12

from gateway_service import core
from gateway_service.auth import Identity, bearer_token
from gateway_service.errors import Failure, GatewayError
from gateway_service.http import views
from gateway_service.http.api import describe
from gateway_service.http.body import body_of, query_of, read_body
from gateway_service.http.cors import CORS
from gateway_service.http.disconnect import until_disconnected
from gateway_service.http.errors import HTTP_REASONS, error_response, gateway_error, retry_after
from gateway_service.http.handlers import (
    EligibilityRequest,
    GenerateRequest,
    NoQuery,
    PurchasesQuery,
    UsageQuery,
    address_of,
)
from gateway_service.http.shapes import Body, Query, _Request, adapter, reply, to_data
from gateway_service.http.state import GATEWAY, VERIFIER

# The SDK logs its manager's start and stop, and "Terminating session: None" after every stateless
# request, at INFO: noise beside the edge's own access lines (its warnings still show).
for _name in ("mcp.server.streamable_http_manager", "mcp.server.streamable_http"):
    logging.getLogger(_name).setLevel(logging.WARNING)

PATH = "/mcp"
SERVER_NAME = "rpcai"
_MAX_MESSAGE_CHARS = 200
MANAGER = web.AppKey("mcp_session_manager", StreamableHTTPSessionManager)

# The caller's address (trusted proxies resolved), set per HTTP request: public callers are
# rate-limited by it, as over HTTP. The SDK carries context variables into the tool's task.
_ADDRESS: contextvars.ContextVar[str] = contextvars.ContextVar("mcp_client_address", default="")


class IdentityToken(AccessToken):
    """The SDK's view of a verified JWT, with the edge's `Identity` for the tools."""

    model_config = ConfigDict(arbitrary_types_allowed=True, frozen=True)

    identity: Identity

    def __repr__(self) -> str:  # never show the token in a log line
        return f"IdentityToken(client_id={self.client_id!r})"


VERIFIED = "(verified by the edge)"


def _access_token(identity: Identity) -> IdentityToken:
    exp = identity.claims.get("exp")
    return IdentityToken(
        # Not the JWT: nothing past the edge needs it, and a model prints every field.
        token=VERIFIED,
        client_id=identity.user_id,
        subject=identity.user_id,
        scopes=["admin"] if identity.admin else [],
        expires_at=int(exp) if isinstance(exp, int | float) else None,
        identity=identity,
    )


def _identity() -> Identity | None:
    token = get_access_token()
    return token.identity if isinstance(token, IdentityToken) else None


def _signed_in() -> Identity:
    identity = _identity()
    if identity is None:  # the same refusal as the HTTP API's /v1/me
        raise GatewayError(
            Failure.UNAUTHENTICATED,
            "AUTHENTICATION_REQUIRED",
            "sign in: Authorization: Bearer <JWT>",
        )
    return identity


# ---- tools ------------------------------------------------------------------------------------

Run = Callable[[core.Gateway, Any], Awaitable[object]]


@dataclass(frozen=True, slots=True)
class Tool:
    """One HTTP operation as a tool: its request model in, its answer (a `views` shape) out."""

    name: str
    description: str
    arguments: type[_Request]
    answer: Any  # a @reply TypedDict
    run: Run

    def describe(self) -> types.Tool:
        schema = self.arguments.model_json_schema()
        schema.pop("title", None)
        return types.Tool(
            name=self.name,
            description=self.description,
            input_schema=schema,
            output_schema=adapter(self.answer).json_schema(mode="serialization"),
        )

    def parse(self, arguments: Mapping[str, Any]) -> Any:
        """The arguments as the HTTP API reads that body or query (its refusals, its words)."""
        if issubclass(self.arguments, Body):
            return body_of(self.arguments, dict(arguments))
        assert issubclass(self.arguments, Query)
        return query_of(self.arguments, arguments.items())


async def _generate(gateway: core.Gateway, args: GenerateRequest) -> views.GenerateResponse:
    # Metered exactly as POST /v1/generate: the same core call with the same request.
    return views.generate(await gateway.generate(_identity(), args.call(_ADDRESS.get())))


async def _status(gateway: core.Gateway, args: NoQuery) -> views.UserStatus:
    return views.status(await gateway.user_status(_signed_in()))


async def _usage(gateway: core.Gateway, args: UsageQuery) -> views.UsageAnalytics:
    analytics = await gateway.usage_analytics(_signed_in(), args.days, args.include_history)
    return views.usage_analytics(analytics)


async def _purchases(gateway: core.Gateway, args: PurchasesQuery) -> views.PurchasePage:
    page = await gateway.purchase_history(_signed_in(), args.page_size, args.page_token)
    return views.purchases(page)


async def _eligibility(gateway: core.Gateway, args: EligibilityRequest) -> views.Eligibility:
    result = await gateway.eligibility(
        _identity(), args.estimated_tokens or 0, bool(args.has_api_key), args.call()
    )
    return views.eligibility(result)


async def _prompts(gateway: core.Gateway, args: NoQuery) -> views.PromptList:
    return views.prompt_list(gateway.prompts.list())


TOOLS = {
    tool.name: tool
    for tool in (
        Tool(
            "generate_text",
            "One AI call (POST /v1/generate), metered against your tokens when signed in; "
            "without a token, only with your own provider key (apiKey).",
            GenerateRequest,
            views.GenerateResponse,
            _generate,
        ),
        Tool(
            "get_user_status",
            "Your balance, limits and quota (GET /v1/me/status). Needs a token.",
            NoQuery,
            views.UserStatus,
            _status,
        ),
        Tool(
            "get_usage_analytics",
            "Your usage over the last days, by provider and model (GET /v1/me/usage). "
            "Needs a token.",
            UsageQuery,
            views.UsageAnalytics,
            _usage,
        ),
        Tool(
            "get_purchase_history",
            "Your purchases, newest first, a page at a time (GET /v1/me/purchases). Needs a token.",
            PurchasesQuery,
            views.PurchasePage,
            _purchases,
        ),
        Tool(
            "check_request_eligibility",
            "Would a call of this size be allowed, and what would it hold (POST /v1/eligibility).",
            EligibilityRequest,
            views.Eligibility,
            _eligibility,
        ),
        Tool(
            "list_prompts",
            "The server-held prompts a call may name (promptId): ids, versions, descriptions "
            "and variables, never their text (GET /v1/prompts).",
            NoQuery,
            views.PromptList,
            _prompts,
        ),
    )
}


def _refused(exc: GatewayError) -> types.CallToolResult:
    """A core refusal as a tool error: the HTTP API's error body, and its reason in the text."""
    _, body, _ = gateway_error(exc)
    text = f"{exc.reason}: {body['error']['message']}"
    if (wait := retry_after(exc)) is not None:
        text += f" (retry after {wait}s)"
    return types.CallToolResult(
        content=[types.TextContent(type="text", text=text)],
        structured_content=body,
        is_error=True,
    )


def mcp_server(gateway: core.Gateway) -> Server[Any]:
    async def list_tools(
        ctx: ServerRequestContext[Any], params: types.PaginatedRequestParams | None
    ) -> types.ListToolsResult:
        return types.ListToolsResult(tools=[tool.describe() for tool in TOOLS.values()])

    async def call_tool(
        ctx: ServerRequestContext[Any], params: types.CallToolRequestParams
    ) -> types.CallToolResult:
        tool = TOOLS.get(params.name)
        if tool is None:
            error = GatewayError(
                Failure.NOT_FOUND, "NOT_FOUND", f"no such tool (known: {', '.join(TOOLS)})"
            )
            return _refused(error)
        try:
            answer = await tool.run(gateway, tool.parse(params.arguments or {}))
        except GatewayError as exc:
            return _refused(exc)
        data = to_data(tool.answer, answer)
        text = json.dumps(data, ensure_ascii=False)
        return types.CallToolResult(
            content=[types.TextContent(type="text", text=text)], structured_content=data
        )

    return Server(SERVER_NAME, on_list_tools=list_tools, on_call_tool=call_tool)


class JsonRpcMessage(Body):
    """One MCP message: a JSON-RPC 2.0 request (with `id`) or notification (without; answered
    202 with no body). Read by the edge's rules before the SDK sees it, so anything else is the
    edge's own 400."""

    jsonrpc: Literal["2.0"]
    id: int | str | None = None
    method: str
    params: dict[str, Any] | None = None


@reply
class JsonRpcAnswer(TypedDict):
    """The JSON-RPC 2.0 response to a request (a tool's own failure is a result with
    `isError`); a notification is answered 202 with no body."""

    jsonrpc: Literal["2.0"]
    id: str | int | None
    result: NotRequired[dict[str, Any]]
    error: NotRequired[dict[str, Any]]


# ---- the bridge -------------------------------------------------------------------------------


def _scope(request: web.Request, user: AuthenticatedUser | None) -> Scope:
    scope: Scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": f"{request.version.major}.{request.version.minor}",
        "method": request.method,
        "scheme": request.scheme,
        "path": request.path,
        "raw_path": request.rel_url.raw_path.encode("ascii"),
        "query_string": request.rel_url.raw_query_string.encode("ascii"),
        "root_path": "",
        "headers": [(name.lower(), value) for name, value in request.raw_headers],
        "client": (request.remote or "", 0),
        "server": None,
        "state": {},
    }
    if user is not None:
        scope["user"] = user
        scope["auth"] = AuthCredentials(user.scopes)
    return scope


async def _serve_asgi(request: web.Request, user: AuthenticatedUser | None) -> web.StreamResponse:
    """Runs the SDK's ASGI handler for `request`, writing what it sends to a StreamResponse. A
    JSON-RPC error the protocol answers with an HTTP error status (the per-request protocol
    revision does) goes out as it is; another refusal of the SDK's own (406 for an Accept
    without JSON, ...) is the edge's JSON error."""
    body = await request.read()  # already read, within its timeout (ConnectionGuard)
    response = web.StreamResponse()
    delivered = False
    done = False
    answered = asyncio.Event()
    refused: int | None = None  # the SDK's status when it refused: its body is held, not sent
    held = bytearray()

    async def receive() -> Message:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        # The body was whole. The SDK now watches for the client leaving, which cancels this
        # whole call (`until_disconnected`): until the answer is out, nothing happened.
        await answered.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        nonlocal done, refused
        if message["type"] == "http.response.start":
            if message["status"] >= 400:
                refused = message["status"]
                return
            response.set_status(message["status"])
            for name, value in message.get("headers", ()):
                response.headers.add(name.decode("latin-1"), value.decode("latin-1"))
            await response.prepare(request)
        elif message["type"] == "http.response.body" and not done:
            chunk = message.get("body", b"")
            if refused is not None:
                held.extend(chunk)
            elif chunk:
                await response.write(chunk)
            if not message.get("more_body", False):
                done = True
                answered.set()
                if refused is None:
                    await response.write_eof()

    manager = request.app[MANAGER]
    _ADDRESS.set(address_of(request))
    await AuthContextMiddleware(manager.handle_request)(_scope(request, user), receive, send)
    if refused is not None:
        if _is_jsonrpc(bytes(held)):
            return web.Response(status=refused, body=bytes(held), content_type="application/json")
        return error_response(refused, _sdk_message(bytes(held), refused), _sdk_reason(refused))
    if not response.prepared:  # the SDK sent nothing: a crash it swallowed
        raise web.HTTPInternalServerError
    if not done:
        await response.write_eof()
    return response


def _is_jsonrpc(body: bytes) -> bool:
    try:
        message = json.loads(body)
    except ValueError:
        return False
    return isinstance(message, dict) and message.get("jsonrpc") == "2.0"


def _sdk_message(body: bytes, status: int) -> str:
    """The message of the SDK's JSON-RPC error body (its own words, never a token)."""
    try:
        message = json.loads(body)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = None
    if not isinstance(message, str) or not message:
        return HTTPStatus(status).phrase
    return message[:_MAX_MESSAGE_CHARS]


def _sdk_reason(status: int) -> str:
    return (
        "NOT_ACCEPTABLE"
        if status == HTTPStatus.NOT_ACCEPTABLE
        else HTTP_REASONS.get(status, "ERROR")
    )


async def handle(request: web.Request) -> web.StreamResponse:
    # DNS rebinding: a page of any site, its name pointed at this host, could make a browser
    # post here (with no token: BYOK calls, the prompt list). A browser always says where the
    # page came from; only configured origins (HTTP_CORS_ORIGINS) may call. Other clients
    # (IDE agents, the SDK) send no Origin.
    origin = request.headers.get(hdrs.ORIGIN)
    if origin is not None and not request.app[CORS].allows(origin):
        return error_response(
            HTTPStatus.FORBIDDEN, "this origin may not call /mcp", "ORIGIN_NOT_ALLOWED"
        )
    # The rule of `http.auth.caller`: a bad token is an AuthError (the edge's 401) before the
    # SDK sees anything; no token is a public caller.
    token = bearer_token(request.headers.getall(hdrs.AUTHORIZATION, []))
    user = None
    if token is not None:
        identity = await request.app[VERIFIER].verify(token)
        user = AuthenticatedUser(_access_token(identity))
    await read_body(request, JsonRpcMessage)  # the edge's JSON rules: 400 / 415, as any body
    # A client that leaves cancels its call, as on POST /v1/generate (a hold is released).
    return await until_disconnected(request, _serve_asgi(request, user))


def mcp_routes() -> list[web.RouteDef]:
    return [web.post(PATH, handle)]


async def mcp_lifecycle(app: web.Application) -> AsyncIterator[None]:
    """aiohttp cleanup_ctx: the session manager's task group lives as long as the app. It runs
    in a task of its own: aiohttp starts and cleans up an app in different tasks, and an anyio
    task group must be left by the task that entered it."""
    manager = StreamableHTTPSessionManager(
        mcp_server(app[GATEWAY]), json_response=True, stateless=True
    )
    app[MANAGER] = manager
    running = asyncio.Event()
    stop = asyncio.Event()

    async def run() -> None:
        async with manager.run():
            running.set()
            await stop.wait()

    task = asyncio.create_task(run())
    waiting = asyncio.create_task(running.wait())
    await asyncio.wait((task, waiting), return_when=asyncio.FIRST_COMPLETED)
    waiting.cancel()
    await asyncio.gather(waiting, return_exceptions=True)
    if task.done():
        task.result()  # raises what stopped it
        raise RuntimeError("the MCP session manager stopped as it started")
    try:
        yield
    finally:
        stop.set()
        await task


describe(
    "POST",
    PATH,
    operation_id="mcp",
    summary="Model Context Protocol (Streamable HTTP, stateless, JSON responses): the tools "
    "generate_text, get_user_status, get_usage_analytics, get_purchase_history, "
    "check_request_eligibility and list_prompts",
    answers=JsonRpcAnswer,
    security="optional",
    body=JsonRpcMessage,
    errors={
        403: "ORIGIN_NOT_ALLOWED: a browser page of an origin not in HTTP_CORS_ORIGINS",
        404: "(per-request protocol revision) a JSON-RPC error: no such method",
        406: "The Accept header does not include application/json",
        503: "SHUTTING_DOWN: the edge stopped while the call ran (its hold was released)",
    },
    accepted="A notification (a message without `id`): accepted, no body",
    errors_in_answer=True,  # the SDK's refusals are JSON-RPC errors, passed on as they are
)
