"""Routes declared by their signatures: what a handler takes and answers is read from its type
hints, checked on every request, and documented in /openapi.json (`http.openapi`) with no
second description to keep in step.

    routes = Routes()

    @routes.get("/v1/admin/users/{userId}/usage", summary="One user's usage", errors=(403, 503))
    async def user_usage(
        request: web.Request, identity: Identity, user: UserPath, query: UsageQuery
    ) -> UsageAnalytics:
        if not identity.admin:
            raise HttpRefusal(403, "operators only")
        analytics = await request.app[GATEWAY].usage_analytics_of(user.user_id, query.days)
        return views.usage_analytics(analytics)

    app.router.add_routes(routes)  # in create_http_app; the route is in /openapi.json

What each part of the signature means (one way to say each thing):

- `request: web.Request` comes first, always.
- `identity: Identity`: the caller must be signed in (401 otherwise; documented as bearer auth).
  `identity: Identity | None`: optional (no token: None, a public caller). Neither: public, and
  the handler never looks at a token.
- A `Body` subclass: the JSON body (400 / 413 / 415 documented). A `Query` subclass: the query
  string, every parameter checked (unknown ones refused); without one the query is ignored. A
  `PathParams` subclass: the `{placeholders}` of the path, which must name its fields exactly.
- The return annotation is the answer: a `@reply` TypedDict (JSON, 200); `Answer[SomeReply]`
  (the same with headers); `Html` (a page, text/html). A handler that builds its own response
  (a stream, a file with an ETag) returns `web.StreamResponse` or `web.Response` and says what it
  is with `answers=` (`EventStream(...)`, `HTML_PAGE`, or a `@reply` TypedDict).
- `errors=`: the refusals the handler itself can cause (402, 403, 404, 409, 503, ...). The ones
  the signature implies (400, 401, 408, 413, 415) and 500 are added.

Routes built elsewhere (the LemonSqueezy webhook, which must read its raw bytes before anything
is parsed) are documented with `describe(...)` in `http.openapi`.
"""

from __future__ import annotations

import functools
import inspect
import itertools
import re
import types
import typing
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, Required, TypeVar, Union

from aiohttp import web
from pydantic import BaseModel
from typing_extensions import TypedDict, Unpack, is_typeddict

from gateway_service.auth import Identity
from gateway_service.http.auth import caller, signed_in
from gateway_service.http.body import read_body, read_path, read_query
from gateway_service.http.shapes import Body, PathParams, Query, adapter

ReplyT = TypeVar("ReplyT")
HandlerT = TypeVar("HandlerT", bound=Callable[..., Awaitable[Any]])

Security = Literal["signed_in", "optional", "public"]


@dataclass(frozen=True, slots=True)
class Answer(Generic[ReplyT]):
    """A JSON answer with headers of its own (rate limits, ...)."""

    reply: ReplyT
    headers: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Html:
    """An HTML page."""

    text: str
    headers: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class HtmlPage:
    """What a handler returning its own `web.Response` answers: an HTML page."""

    description: str = "An HTML page"


HTML_PAGE = HtmlPage()


@dataclass(frozen=True, slots=True)
class EventStream:
    """A text/event-stream answer: each event's name and the model of its `data` (JSON)."""

    events: Mapping[str, Any]  # name -> a @reply TypedDict (or a model)
    description: str


@dataclass(frozen=True, slots=True)
class RawBody:
    """A request body the handler reads itself, documented by its JSON Schema."""

    schema: Mapping[str, Any]
    description: str = ""
    required: bool = True


@dataclass(frozen=True, slots=True)
class Header:
    """A request header the operation reads (documented; the handler checks it)."""

    name: str
    description: str
    required: bool = True


# A JSON answer's shape (a @reply TypedDict, or a pydantic model), a page, or a stream.
Answers = type | HtmlPage | EventStream


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One operation as the document describes it."""

    method: str
    path: str
    operation_id: str
    summary: str
    description: str
    security: Security
    answers: Answers
    body: type[Body] | RawBody | None = None
    query: type[Query] | None = None
    path_params: type[PathParams] | None = None
    headers: tuple[Header, ...] = ()
    reply_headers: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    errors: Mapping[int, str] = field(default_factory=dict)  # status -> what it means here
    # What a 202 with no body means here (empty: the operation never answers one).
    accepted: str = ""
    # An error status may carry the operation's own answer shape too (a protocol that answers
    # its errors in its own envelope: JSON-RPC), besides the edge's `Error`.
    errors_in_answer: bool = False


# Every operation described so far, by (METHOD, path template): the document's source. Change
# it with `register` and `forget` only: documents are cached by its version.
ENDPOINTS: dict[tuple[str, str], Endpoint] = {}
_versions = itertools.count(1)
version = 0


def register(endpoint: Endpoint) -> None:
    global version
    key = (endpoint.method, endpoint.path)
    if ENDPOINTS.setdefault(key, endpoint) is not endpoint:
        raise ValueError(f"{endpoint.method} {endpoint.path} is described twice")
    version = next(_versions)


def forget(method: str, path: str) -> None:
    """Removes a description (for tests that declare routes of their own)."""
    global version
    del ENDPOINTS[(method, path)]
    version = next(_versions)


def describe(
    method: str,
    path: str,
    *,
    operation_id: str,
    summary: str,
    answers: Answers,
    description: str = "",
    security: Security = "public",
    body: type[Body] | RawBody | None = None,
    headers: tuple[Header, ...] = (),
    errors: Mapping[int, str] | tuple[int, ...] = (),
    accepted: str = "",
    errors_in_answer: bool = False,
) -> None:
    """Documents a route whose handler is built elsewhere (nothing is checked for it here).
    `accepted`: when it may answer 202 with no body, what that means."""
    endpoint = Endpoint(
        method=method.upper(),
        path=path,
        operation_id=operation_id,
        summary=summary,
        description=description,
        security=security,
        answers=answers,
        body=body,
        headers=headers,
        errors=_errors(errors),
        accepted=accepted,
        errors_in_answer=errors_in_answer,
    )
    register(endpoint)


def _errors(errors: Mapping[int, str] | tuple[int, ...]) -> Mapping[int, str]:
    return dict(errors) if isinstance(errors, Mapping) else dict.fromkeys(errors, "")


# ---- reading a handler's signature ----------------------------------------------------------


def _is_subclass(hint: Any, base: type) -> bool:
    return isinstance(hint, type) and issubclass(hint, base)


def _security(hint: Any) -> Security | None:
    if hint is Identity:
        return "signed_in"
    if typing.get_origin(hint) in (Union, types.UnionType) and set(typing.get_args(hint)) == {
        Identity,
        type(None),
    }:
        return "optional"
    return None


Reader = Callable[[web.Request], Awaitable[Any]]
RouteHandler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Writer = Callable[[Any], web.StreamResponse]


def _json_writer(shape: Any) -> Writer:
    serializer = adapter(shape).serializer

    def write(value: Any) -> web.StreamResponse:
        body = serializer.to_json(value, by_alias=True)
        return web.Response(body=body, content_type="application/json")

    return write


def _answer_writer(shape: Any) -> Writer:
    serializer = adapter(shape).serializer

    def write(value: Any) -> web.StreamResponse:
        answer: Answer[Any] = value
        body = serializer.to_json(answer.reply, by_alias=True)
        return web.Response(body=body, content_type="application/json", headers=answer.headers)

    return write


def is_shape(hint: Any) -> bool:
    """A JSON answer's type: a @reply TypedDict or a pydantic model."""
    return is_typeddict(hint) or _is_subclass(hint, BaseModel)


def _html_writer(value: Any) -> web.StreamResponse:
    page: Html = value
    return web.Response(text=page.text, content_type="text/html", headers=page.headers)


def _as_is(value: Any) -> web.StreamResponse:
    response: web.StreamResponse = value
    return response


def _answers(hint: Any, answers: Answers | None, where: str) -> tuple[Answers, Writer]:
    if typing.get_origin(hint) is Answer and is_shape(typing.get_args(hint)[0]):
        (shape,) = typing.get_args(hint)
        return shape, _answer_writer(shape)
    if is_shape(hint):
        return hint, _json_writer(hint)
    if hint is Html:
        return HTML_PAGE, _html_writer
    if _is_subclass(hint, web.StreamResponse) and answers is not None:
        return answers, _as_is
    raise TypeError(
        f"{where}: return a @reply TypedDict, Answer[...] of one or Html, or a "
        "web.StreamResponse with answers= saying what it is"
    )


async def _signed_in(request: web.Request) -> Identity:
    return await signed_in(request)


async def _optional(request: web.Request) -> Identity | None:
    return await caller(request)


def _reader(hint: Any, where: str, name: str) -> tuple[str, Reader]:
    """What a parameter is (the caller, body, query, path) and how it is read from a request."""
    security = _security(hint)
    if security == "signed_in":
        return "signed_in", _signed_in
    if security == "optional":
        return "optional", _optional
    if _is_subclass(hint, Body):
        body: type[Body] = hint

        async def read_body_of(request: web.Request) -> Body:
            return await read_body(request, body)

        return "body", read_body_of
    if _is_subclass(hint, Query):
        query: type[Query] = hint

        async def read_query_of(request: web.Request) -> Query:
            return read_query(request, query)

        return "query", read_query_of
    if _is_subclass(hint, PathParams):
        path: type[PathParams] = hint

        async def read_path_of(request: web.Request) -> PathParams:
            return read_path(request, path)

        return "path", read_path_of
    raise TypeError(
        f"{where}: parameter {name!r} must be an Identity (or Identity | None), or a Body, "
        "Query or PathParams model"
    )


_PLACEHOLDER = re.compile(r"\{([^{}:]+)(?::[^{}]*)?\}")


class RouteDoc(TypedDict, total=False):
    """What a route's declaration says besides its signature."""

    summary: Required[str]
    operation_id: str  # default: the handler's name in camelCase
    description: str  # default: the handler's docstring
    errors: Mapping[int, str] | tuple[int, ...]  # the refusals the handler itself causes
    answers: Answers  # what a handler returning web.StreamResponse answers
    reply_headers: Mapping[str, Mapping[str, Any]]  # headers of the 200 answer, documented
    # Wraps the route's handler: runs before the caller or anything else is read (a stream cap).
    guard: Callable[[RouteHandler], RouteHandler]


class Routes:
    """Routes declared by their handlers' signatures (see the module docstring); add them to the
    app as any route table: `app.router.add_routes(routes)`."""

    def __init__(self) -> None:
        self._routes: list[web.RouteDef] = []

    def __iter__(self) -> Iterator[web.RouteDef]:
        return iter(self._routes)

    def __len__(self) -> int:
        return len(self._routes)

    def get(self, path: str, **doc: Unpack[RouteDoc]) -> Callable[[HandlerT], HandlerT]:
        """GET (and HEAD, as aiohttp's `web.get`)."""
        return self.route("GET", path, **doc)

    def post(self, path: str, **doc: Unpack[RouteDoc]) -> Callable[[HandlerT], HandlerT]:
        return self.route("POST", path, **doc)

    def put(self, path: str, **doc: Unpack[RouteDoc]) -> Callable[[HandlerT], HandlerT]:
        return self.route("PUT", path, **doc)

    def patch(self, path: str, **doc: Unpack[RouteDoc]) -> Callable[[HandlerT], HandlerT]:
        return self.route("PATCH", path, **doc)

    def delete(self, path: str, **doc: Unpack[RouteDoc]) -> Callable[[HandlerT], HandlerT]:
        return self.route("DELETE", path, **doc)

    def route(
        self, method: str, path: str, **doc: Unpack[RouteDoc]
    ) -> Callable[[HandlerT], HandlerT]:
        def decorate(handler: HandlerT) -> HandlerT:
            serve, endpoint = _declared(handler, method.upper(), path, doc)
            guard = doc.get("guard")
            if guard is not None:
                serve = guard(serve)
            register(endpoint)
            if endpoint.method == "GET":
                self._routes.append(web.get(path, serve))
            else:
                self._routes.append(web.route(endpoint.method, path, serve))
            return handler

        return decorate


# Read in this order whatever the signature's: the caller first (a bad token is 401 before
# anything is parsed), then the path, the query, the body.
_ORDER = {"identity": 0, "path": 1, "query": 2, "body": 3}


def _declared(
    handler: Callable[..., Awaitable[Any]], method: str, path: str, doc: RouteDoc
) -> tuple[RouteHandler, Endpoint]:
    where = f"{method} {path} ({handler.__qualname__})"
    hints = typing.get_type_hints(handler)
    parameters = list(inspect.signature(handler).parameters)
    if not parameters or hints.get(parameters[0]) is not web.Request:
        raise TypeError(f"{where}: the first parameter must be `request: web.Request`")
    readers: list[tuple[int, str, Reader]] = []
    found: dict[str, Any] = {}
    security: Security = "public"
    for name in parameters[1:]:
        kind, reader = _reader(hints.get(name), where, name)
        if kind in ("signed_in", "optional"):
            security = "signed_in" if kind == "signed_in" else "optional"
            kind = "identity"
        if kind in found:
            raise TypeError(f"{where}: more than one {kind} parameter")
        found[kind] = hints[name]
        readers.append((_ORDER[kind], name, reader))
    readers.sort(key=lambda item: item[0])
    answers, write = _answers(hints.get("return"), doc.get("answers"), where)
    path_model: type[PathParams] | None = found.get("path")
    placeholders = set(_PLACEHOLDER.findall(path))
    named = set(path_model.rules) if path_model is not None else set()
    if placeholders != named:
        raise TypeError(
            f"{where}: the path names {sorted(placeholders)}, the model {sorted(named)}"
        )
    endpoint = Endpoint(
        method=method,
        path=path,
        operation_id=doc.get("operation_id") or _camel(handler.__name__),
        summary=doc["summary"],
        description=doc.get("description") or inspect.getdoc(handler) or "",
        security=security,
        answers=answers,
        body=found.get("body"),
        query=found.get("query"),
        path_params=path_model,
        reply_headers=doc.get("reply_headers", {}),
        errors=_errors(doc.get("errors", ())),
    )

    @functools.wraps(handler)
    async def serve(request: web.Request) -> web.StreamResponse:
        arguments = {name: await read(request) for _, name, read in readers}
        return write(await handler(request, **arguments))

    return serve, endpoint


def _camel(name: str) -> str:
    first, *rest = name.split("_")
    return first + "".join(part.title() for part in rest)
