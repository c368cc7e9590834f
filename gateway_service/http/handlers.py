"""The HTTP API's routes: a request model in, one core call, a reply model out. Each route is
declared by its handler's signature (`http.api`): who may call it, what it reads and what it
answers are checked and documented from there.

Public (no token needed): POST /v1/generate and /v1/generate/stream with an `apiKey` (BYOK),
POST /v1/eligibility, /healthz, /readyz, /openapi.json. Everything under /v1/me needs a JWT.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, NotRequired, Self

from aiohttp import web
from annotated_types import Interval
from pydantic import AfterValidator, Field, StringConstraints, model_validator
from pydantic_core import PydanticCustomError
from typing_extensions import TypedDict

from gateway_service import core
from gateway_service.auth import Identity
from gateway_service.errors import GatewayError
from gateway_service.http import openapi, views
from gateway_service.http.api import Answer, EventStream, Routes
from gateway_service.http.disconnect import ClientGone, until_disconnected
from gateway_service.http.errors import Error, HttpRefusal
from gateway_service.http.shapes import (
    FROM_TEXT,
    NOT_BLANK,
    PRINTABLE_ASCII,
    Body,
    Printable,
    Query,
    QueryBool,
    Says,
    Text,
    names_pattern,
    prefixes_pattern,
    reply,
)
from gateway_service.http.sse import SseStream
from gateway_service.http.state import ADDRESSES, GATEWAY, STATE
from gateway_service.http.stream_cap import one_stream_slot
from gateway_service.limits.rate import rate_headers
from gateway_service.prompts import MAX_INTEGER, PROMPT_ID
from gateway_service.providers.registry import (
    _OPENAI_MODEL_PREFIXES,
    PROVIDER_NAMES,
    UnknownProviderError,
    provider_for,
)

routes = Routes()

# The ledger's own bounds (ledger_service.domain.ledger; tests/http/test_shapes.py holds them
# equal): stated here so that the document says them and a request past them is refused here.
MAX_USAGE_DAYS = 366
DEFAULT_USAGE_DAYS = 30
MAX_PAGE_SIZE = 100
DEFAULT_PAGE_SIZE = 20
# The core's bound on an estimate (`Gateway.eligibility` states it inline; the test holds it).
MAX_ESTIMATED_TOKENS = 10**9

# ---- requests -------------------------------------------------------------------------------

Prompt = Annotated[
    str,
    StringConstraints(pattern=NOT_BLANK),
    Says(string_pattern_mismatch="must not be empty"),
    Field(description="the prompt: not blank (bounded, with systemPrompt, by MAX_PROMPT_CHARS)"),
]


def _provider_of(provider: str, model: str) -> None:
    """The core's rule (`providers.registry.provider_for`), refused in the core's words."""
    try:
        provider_for(provider, model)
    except UnknownProviderError as exc:
        problem = str(exc).split(": ", 1)[-1]
        raise PydanticCustomError(
            "unknown_provider", "{problem}", {"field": "provider", "problem": problem}
        ) from None


def _known_provider(name: str) -> str:
    if name.strip():  # blank: the model's name tells it (`GenerateRequest._provider_known`)
        _provider_of(name, "")
    return name


ProviderName = Annotated[
    Printable,
    AfterValidator(_known_provider),
    # The same rule as the document says it (a provider's name implies printable text).
    Field(
        description='"anthropic" or "openai" (any case); empty: told by the model\'s name',
        json_schema_extra={"pattern": names_pattern(PROVIDER_NAMES)},
    ),
]
ModelName = Annotated[Printable, Field(description="the provider's model; empty: its default")]
MaxTokens = Annotated[
    int,
    Interval(ge=0, le=core.MAX_OUTPUT_TOKENS),
    Field(description="upper bound on output tokens; 0: the server's default"),
]
ApiKey = Annotated[
    str,
    StringConstraints(pattern=PRINTABLE_ASCII),
    Says(string_pattern_mismatch="must be printable ASCII (no line breaks or control characters)"),
    Field(description="your own provider key (BYOK): never logged, never stored"),
]
IdempotencyKey = Annotated[
    Printable,
    StringConstraints(max_length=core.MAX_KEY_CHARS),
    Says(string_too_long=f"at most {core.MAX_KEY_CHARS} printable characters"),
    Field(description="a retried call with the same key is not charged twice"),
]

PromptId = Annotated[
    str,
    StringConstraints(pattern=f"^{PROMPT_ID.pattern}$"),
    Says(string_pattern_mismatch="must be a prompt's id (GET /v1/prompts)"),
    Field(
        description="a server-held prompt (GET /v1/prompts) as the system prompt, rendered by "
        "the server and never returned; its provider, model and maxTokens apply where the call "
        "leaves them empty. Not with systemPrompt"
    ),
]
# Any name: the prompt's own declaration says which are known (an unknown one is 400, by name).
VariableValue = Text | Annotated[int, Interval(ge=-MAX_INTEGER, le=MAX_INTEGER)] | bool
Variables = Annotated[
    dict[str, VariableValue],
    Field(description="the prompt's variables (only with promptId), each of its declared type"),
]

# Without a provider, the model's name must tell it (`providers.registry.provider_for`).
MODEL_TELLS_PROVIDER = prefixes_pattern(("claude", *_OPENAI_MODEL_PREFIXES))


def _generate_rules(schema: dict[str, Any]) -> None:
    """The call's rules across fields, in JSON Schema: the provider's, and a server-held prompt
    or a system prompt, not both (variables only with a prompt)."""
    _provider_rule(schema)
    _prompt_rule(schema)


def _prompt_rule(schema: dict[str, Any]) -> None:
    """A server-held prompt or a system prompt, not both; variables only with a prompt; a
    prompt only with the content it is for. Stated as the two shapes a body may take (no
    `not`): test generators build valid bodies from positive branches, and filter those of a
    `not` until few are left."""
    schema["description"] += (
        " promptId and systemPrompt exclude each other; variables go with promptId, and"
        " promptId with content."
    )
    absent = {"type": "null"}
    shapes = [
        {"properties": {"promptId": absent, "variables": absent}},
        {
            "required": ["promptId", "content"],
            "properties": {
                "promptId": {"type": "string"},
                "systemPrompt": absent,
                "content": {"type": "string", "minLength": 1},
            },
        },
    ]
    if "anyOf" in schema:  # another rule's branches: both must hold
        schema["allOf"] = [{"anyOf": schema.pop("anyOf")}, {"anyOf": shapes}]
    else:
        schema["anyOf"] = shapes


def _provider_rule(schema: dict[str, Any]) -> None:
    """The provider rule in JSON Schema: a provider named, or a model whose name tells it, or
    neither (the default provider)."""
    families = ", ".join(f"{prefix}..." for prefix in _OPENAI_MODEL_PREFIXES)
    schema["description"] += (
        f" Without a provider, the model's name tells it (claude...: anthropic; {families}: "
        "openai); with neither, the server's default provider and model."
    )
    nothing = {"anyOf": [{"type": "null"}, {"type": "string", "pattern": "^ *$"}]}
    named = {"type": "string", "pattern": "[^ ]"}
    schema["anyOf"] = [
        {"required": ["provider"], "properties": {"provider": named}},
        {
            "properties": {
                "provider": nothing,
                "model": {
                    "anyOf": [
                        {"type": "null"},
                        {"type": "string", "pattern": MODEL_TELLS_PROVIDER},
                    ]
                },
            }
        },
    ]


def _one_of(
    prompt_id: str | None,
    system_prompt: str | None,
    variables: dict[str, Any] | None,
    content: str | None,
) -> None:
    """A server-held prompt or a system prompt, not both; variables only with a prompt; a
    prompt only with the content it is for."""
    if prompt_id is not None and not content:
        raise PydanticCustomError(
            "prompt_without_content",
            "{problem}",
            {"field": "content", "problem": "needed with promptId"},
        )
    if prompt_id is not None and system_prompt is not None:
        raise PydanticCustomError(
            "prompt_and_system_prompt",
            "{problem}",
            {"field": "systemPrompt", "problem": "give either systemPrompt or promptId"},
        )
    if variables is not None and prompt_id is None:
        raise PydanticCustomError(
            "variables_without_prompt",
            "{problem}",
            {"field": "variables", "problem": "only with promptId"},
        )


class GenerateRequest(Body, json_schema_extra=_generate_rules):
    """One AI call. Fields not listed here are refused (400); `null` means not given."""

    content: Prompt
    system_prompt: Text | None = None
    provider: ProviderName | None = None
    model: ModelName | None = None
    max_tokens: MaxTokens | None = None
    api_key: ApiKey | None = None
    idempotency_key: IdempotencyKey | None = None
    prompt_id: PromptId | None = None
    variables: Variables | None = None

    @model_validator(mode="after")
    def _provider_known(self) -> Self:
        if not (self.provider or "").strip():
            _provider_of("", self.model or "")
        return self

    @model_validator(mode="after")
    def _one_system_prompt(self) -> Self:
        _one_of(self.prompt_id, self.system_prompt, self.variables, self.content)
        return self

    def call(self, address: str = "") -> core.GenerateRequest:
        # The prompt's length (a setting) is the core's to check, as over gRPC.
        return core.GenerateRequest(
            client_address=address,
            content=self.content,
            system_prompt=self.system_prompt or "",
            provider=self.provider or "",
            model=self.model or "",
            max_tokens=self.max_tokens or 0,
            api_key=self.api_key or "",
            idempotency_key=self.idempotency_key or "",
            prompt_id=self.prompt_id or "",
            variables=self.variables or {},
        )


class EligibilityRequest(Body, json_schema_extra=_prompt_rule):
    """Would a call be allowed. Fields not listed here are refused (400); `null` means not
    given."""

    estimated_tokens: Annotated[int, Interval(ge=0, le=MAX_ESTIMATED_TOKENS)] | None = None
    """tokens the call may use; ignored when `content` is given"""
    has_api_key: bool | None = None
    content: Text | None = None
    """the call itself: its hold is sized exactly as the call's would be"""
    system_prompt: Text | None = None
    max_tokens: MaxTokens | None = None
    prompt_id: PromptId | None = None
    variables: Variables | None = None

    @model_validator(mode="after")
    def _one_system_prompt(self) -> Self:
        _one_of(self.prompt_id, self.system_prompt, self.variables, self.content)
        return self

    def call(self) -> core.GenerateRequest | None:
        """The call to size, when it is described."""
        if not self.content:
            return None  # (a promptId comes with content: refused above otherwise)
        return core.GenerateRequest(
            content=self.content,
            system_prompt=self.system_prompt or "",
            max_tokens=self.max_tokens or 0,
            prompt_id=self.prompt_id or "",
            variables=self.variables or {},
        )


class UsageQuery(Query):
    days: Annotated[int, Interval(ge=1, le=MAX_USAGE_DAYS), FROM_TEXT] = DEFAULT_USAGE_DAYS
    """the window, in days back from now"""
    include_history: QueryBool = False
    """also list the calls themselves, newest first (true or false; 1 or 0)"""


class PurchasesQuery(Query):
    page_size: Annotated[int, Interval(ge=1, le=MAX_PAGE_SIZE), FROM_TEXT] = DEFAULT_PAGE_SIZE
    """purchases per page"""
    page_token: str = ""
    """nextPageToken of the previous page (any other value is refused); empty: the first page"""


class NoQuery(Query):
    """No parameters: any is refused."""


# ---- routes ---------------------------------------------------------------------------------

RATE_LIMITED = (402, 403, 409, 429, 503, 504)
# A call may name a server-held prompt that does not exist (or no longer does).
GENERATE_ERRORS = {
    **dict.fromkeys(RATE_LIMITED, ""),
    404: "PROMPT_NOT_FOUND: no server-held prompt has that promptId (GET /v1/prompts)",
}
STREAM_EVENTS = EventStream(
    {
        "delta": views.StreamDelta,
        "usage": views.StreamUsage,
        "done": views.StreamDone,
        "error": Error,
    },
    "`delta` events (a chunk of text each), then one `usage` and `done`; a failure after the "
    "stream started is one `error` event instead of usage and done",
)


def address_of(request: web.Request) -> str:
    """The caller's address: the peer, or X-Forwarded-For's last untrusted hop behind a trusted
    proxy (see gateway_service.client_address)."""
    peer = request.remote or "unknown"
    return request.app[ADDRESSES].resolve(peer, request.headers.get("X-Forwarded-For"))


@routes.post(
    "/v1/generate",
    summary="One AI call, metered (subscription) or tracked (BYOK)",
    errors=GENERATE_ERRORS,
    reply_headers=openapi.RATE_LIMIT,
)
async def generate(
    request: web.Request, identity: Identity | None, body: GenerateRequest
) -> Answer[views.GenerateResponse]:
    gateway = request.app[GATEWAY]
    call = gateway.generate(identity, body.call(address_of(request)))
    result = await until_disconnected(request, call)
    return Answer(views.generate(result), rate_headers(result.rate))


@routes.post(
    "/v1/generate/stream",
    operation_id="generateStream",
    summary="The same call, streamed as Server-Sent Events",
    errors=GENERATE_ERRORS,
    answers=STREAM_EVENTS,
    reply_headers=openapi.RATE_LIMIT,
    guard=one_stream_slot,  # refused at once, before the body is read
)
async def generate_stream(
    request: web.Request, identity: Identity | None, body: GenerateRequest
) -> web.StreamResponse:
    """Events: `delta` (StreamDelta) per chunk of text, then one `usage` (StreamUsage), then
    `done` (StreamDone). A failure after the stream started is one `error` event (Error) instead
    of usage and done. A refusal before the stream starts is an ordinary JSON error with its
    status. A client that disconnects is charged for what was streamed."""
    gateway = request.app[GATEWAY]
    sse = SseStream(request, gateway.limits.write_timeout_seconds)
    events = gateway.stream(identity, body.call(address_of(request)))
    try:
        return await until_disconnected(request, sse.run(events))
    except (ClientGone, GatewayError):
        if sse.response is None:
            raise
        return sse.response  # already streamed, and ended with an error event if need be


@routes.get(
    "/v1/me/status",
    operation_id="userStatus",
    summary="Who you are to the gateway: user type, balance, tier",
    errors=(503,),
)
async def user_status(request: web.Request, identity: Identity, query: NoQuery) -> views.UserStatus:
    return views.status(await request.app[GATEWAY].user_status(identity))


@routes.get(
    "/v1/me/usage",
    operation_id="usageAnalytics",
    summary="Your usage over the last days, by provider and model, and by server-held prompt",
    errors=(503,),
)
async def usage_analytics(
    request: web.Request, identity: Identity, query: UsageQuery
) -> views.UsageAnalytics:
    gateway = request.app[GATEWAY]
    analytics = await gateway.usage_analytics(identity, query.days, query.include_history)
    return views.usage_analytics(analytics)


@routes.get(
    "/v1/me/purchases",
    operation_id="purchaseHistory",
    summary="Your purchases, newest first, a page at a time",
    errors=(503,),
)
async def purchase_history(
    request: web.Request, identity: Identity, query: PurchasesQuery
) -> views.PurchasePage:
    gateway = request.app[GATEWAY]
    page = await gateway.purchase_history(identity, query.page_size, query.page_token)
    return views.purchases(page)


@routes.post(
    "/v1/eligibility",
    summary="Would a call of this size be allowed, and what would it hold",
    errors={503: "", 404: GENERATE_ERRORS[404]},
)
async def eligibility(
    request: web.Request, identity: Identity | None, body: EligibilityRequest
) -> views.Eligibility:
    result = await request.app[GATEWAY].eligibility(
        identity, body.estimated_tokens or 0, bool(body.has_api_key), body.call()
    )
    return views.eligibility(result)


@routes.get(
    "/v1/prompts",
    operation_id="listPrompts",
    summary="The server-held prompts a call may name (promptId): never their text",
    errors=(503,),
)
async def list_prompts(
    request: web.Request, identity: Identity | None, query: NoQuery
) -> views.PromptList:
    """Any caller (a BYOK call may name a prompt too): ids, versions, descriptions, variables
    and the defaults a call by promptId takes."""
    return views.prompt_list(request.app[GATEWAY].prompts.list())


@routes.get("/healthz", summary="The process is up")
async def healthz(request: web.Request) -> views.Health:
    return views.Health(status="ok")


BreakerStatus = Literal["closed", "half_open", "open"]


@reply
class Readiness(TypedDict):
    status: Literal["ready"]
    providers: NotRequired[dict[str, BreakerStatus]]
    """Only when a provider's circuit breaker is not closed: its state (calls to an `open` one
    fail fast with 503 PROVIDER_UNAVAILABLE and Retry-After)."""


@routes.get(
    "/readyz",
    summary="Ready to serve: the token ledger answers its health check",
    errors={503: "Not ready (ledger unreachable, or shutting down)"},
)
async def readyz(request: web.Request) -> Readiness:
    """A provider's open breaker keeps the gateway ready (200, named in `providers`): every
    replica sees the same provider outage, and leaving the load balancer would also stop the
    calls to the other provider, the reads and the webhooks."""
    if request.app[STATE].draining:
        raise HttpRefusal(503, "shutting down", "SHUTTING_DOWN")
    if not await request.app[GATEWAY].ledger.ready():
        raise HttpRefusal(503, "the token ledger is unavailable", "LEDGER_UNAVAILABLE")
    breakers = request.app[GATEWAY].providers.breakers()
    degraded: dict[str, BreakerStatus] = {
        name: state for name, state in breakers.items() if state != "closed"
    }
    if degraded:
        return Readiness(status="ready", providers=degraded)
    return Readiness(status="ready")


@routes.get("/openapi.json", summary="This document")
async def openapi_document(request: web.Request) -> openapi.Document:
    return openapi.served(request.app)
