"""The HTTP edge on a real socket (port 0) around the e2e stack's gateway core and JWT verifier
(a real ledger on a fresh database, provider_sim over HTTP), an aiohttp client, and a check of
every response body (and every event of a stream) against the OpenAPI document."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.typedefs import Handler
from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from gateway_service.http import HttpServer, create_http_app, openapi
from gateway_service.webhooks.http import lemonsqueezy_route
from tests.e2e.conftest import Stack, gateway_settings, mint, sim_url, stack

__all__ = ["sim_url", "stack"]  # fixtures reused from the e2e suite

ORIGIN = "chrome-extension://rpcai-test-extension"
WILDCARD_ORIGINS = "vscode-webview://*"
MAX_BODY = 64 * 1024
DOC_URI = "urn:rpcai:openapi"
# Every route described (the edges below serve all of them): what the responses must match.
OPENAPI = openapi.document()
_REGISTRY: Registry[Any] = Registry().with_resource(
    DOC_URI, Resource.from_contents(OPENAPI, default_specification=DRAFT202012)
)


def _pointer(*parts: str) -> str:
    return "/".join(p.replace("~", "~0").replace("/", "~1") for p in parts)


def check_schema(pointer: str, data: Any) -> None:
    """Validates `data` against the schema at `pointer` (a JSON pointer) in the OpenAPI doc."""
    validator = Draft202012Validator({"$ref": f"{DOC_URI}#/{pointer}"}, registry=_REGISTRY)
    errors = sorted(validator.iter_errors(data), key=lambda e: list(e.path))
    assert not errors, f"{pointer}: " + "; ".join(
        f"{list(e.path)}: {e.message}" for e in errors[:5]
    )


def check_response(path: str, method: str, status: int, body: Any) -> None:
    """The body must match what the document says `method path` answers with `status`."""
    operation = OPENAPI["paths"][path][method.lower()]
    assert str(status) in operation["responses"], f"{method} {path} -> {status} not documented"
    response = ("responses", str(status), "content", "application/json", "schema")
    check_schema(_pointer("paths", path, method.lower(), *response), body)


def check_component(name: str, data: Any) -> None:
    check_schema(_pointer("components", "schemas", name), data)


def check_event(path: str, event: str, data: str) -> None:
    """One event of a stream must be one the document says `POST path` sends: its name one of
    the event schema's, and its data (JSON text) what that event's `contentSchema` says."""
    media = OPENAPI["paths"][path]["post"]["responses"]["200"]["content"]["text/event-stream"]
    name = media["schema"]["$ref"].rsplit("/", 1)[1]
    check_component(name, {"event": event, "data": data})
    events = {
        branch["properties"]["event"]["const"]: branch["properties"]["data"]["contentSchema"]
        for branch in OPENAPI["components"]["schemas"][name]["oneOf"]
    }
    assert event in events, (event, list(events))
    check_component(events[event]["$ref"].rsplit("/", 1)[1], json.loads(data))


@dataclass
class Reply:
    status: int
    headers: Mapping[str, str]
    body: Any

    @property
    def error(self) -> dict[str, Any]:
        assert isinstance(self.body, dict), self.body
        assert "error" in self.body, self.body
        error: dict[str, Any] = self.body["error"]
        assert error["code"] == self.status
        return error


@dataclass
class SseEvent:
    event: str
    data: Any


@dataclass
class Edge:
    stack: Stack
    url: str
    session: aiohttp.ClientSession
    app: web.Application
    server: HttpServer
    users: list[str] = field(default_factory=list)

    def user(self, name: str | None = None, **claims: Any) -> tuple[str, dict[str, str]]:
        sub = name or f"user-{uuid.uuid4().hex[:8]}"
        return sub, {"Authorization": f"Bearer {mint(sub, **claims)}"}

    async def call(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        data: bytes | str | None = None,
        headers: Mapping[str, str] | None = None,
        params: Mapping[str, str] | None = None,
        documented: str | None = None,
    ) -> Reply:
        """One request; a JSON answer is validated against the document for `documented` (the
        route template, default `path`) unless the route is unknown to it."""
        kwargs: dict[str, Any] = {"headers": dict(headers or {}), "params": params}
        if json_body is not None:
            kwargs["json"] = json_body
        elif data is not None:
            kwargs["data"] = data
        async with self.session.request(method, self.url + path, **kwargs) as response:
            raw = await response.read()
            body: Any = None
            if response.content_type == "application/json":
                body = json.loads(raw)
            reply = Reply(response.status, response.headers, body)
        template = documented or path
        if method.lower() in OPENAPI["paths"].get(template, {}) and reply.body is not None:
            check_response(template, method, reply.status, reply.body)
        elif reply.status >= 400:
            check_component("Error", reply.body)
        return reply

    async def stream(
        self, json_body: Any, headers: Mapping[str, str] | None = None
    ) -> tuple[int, list[SseEvent] | Reply]:
        """POST /v1/generate/stream: the SSE events (each checked against its schema), or the
        JSON error reply when the stream was refused before it started."""
        async with self.session.post(
            self.url + "/v1/generate/stream", json=json_body, headers=dict(headers or {})
        ) as response:
            if response.content_type != "text/event-stream":
                body = await response.json()
                check_response("/v1/generate/stream", "post", response.status, body)
                return response.status, Reply(response.status, response.headers, body)
            assert response.headers["Cache-Control"] == "no-cache"
            text = (await response.read()).decode()
        return response.status, parse_sse(text)


def parse_sse(text: str, path: str = "/v1/generate/stream") -> list[SseEvent]:
    events: list[SseEvent] = []
    assert text.endswith("\n\n"), text[-200:]
    for block in text.strip("\n").split("\n\n"):
        fields: dict[str, str] = {}
        for line in block.split("\n"):
            name, _, value = line.partition(": ")
            assert name in ("event", "data"), block
            assert name not in fields, block
            fields[name] = value
        check_event(path, fields["event"], fields["data"])
        events.append(SseEvent(fields["event"], json.loads(fields["data"])))
    return events


# JSON answers an edge sent that the document does not describe, whoever asked (every test's
# requests, raw ones included): `_no_drift` fails the test that caused one.
DRIFTED: list[str] = []


@web.middleware
async def conforming_answers(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Checks every JSON answer against the document, on the server side, so that no request a
    test makes escapes the check (streams are checked event by event by `parse_sse`)."""
    response = await handler(request)
    if not isinstance(response, web.Response) or response.content_type != "application/json":
        return response
    resource = request.match_info.route.resource
    template = resource.canonical if resource is not None else None
    method = request.method.lower()
    try:
        body = json.loads(response.body) if isinstance(response.body, bytes) else None
        if template is not None and method in OPENAPI["paths"].get(template, {}):
            check_response(template, method, response.status, body)
        elif response.status >= 400:
            check_component("Error", body)
    except (AssertionError, ValueError) as drift:
        DRIFTED.append(f"{request.method} {template} -> {response.status}: {drift}")
    return response


@pytest.fixture(autouse=True)
def _no_drift() -> Iterator[None]:
    DRIFTED.clear()
    yield
    assert not DRIFTED, DRIFTED[:5]


async def start_edge(stack: Stack, **overrides: Any) -> tuple[HttpServer, str]:
    values: dict[str, Any] = {
        "http_cors_origins": [ORIGIN, WILDCARD_ORIGINS],
        "http_max_body_bytes": MAX_BODY,
    }
    values.update(overrides)
    settings = gateway_settings(stack.ledger.address, stack.sim_url, **values)
    # The routes production serves: the edge plus the LemonSqueezy webhook.
    webhook = lemonsqueezy_route(stack.gateway.webhooks, "test-webhook-secret")
    app = create_http_app(
        stack.gateway.gateway, stack.gateway.verifier, settings, extra_routes=[webhook]
    )
    app.middlewares.insert(0, conforming_answers)  # outermost: sees every answer as sent
    server = HttpServer(app)
    port = await server.start("127.0.0.1:0")
    return server, f"http://127.0.0.1:{port}"


@pytest.fixture
async def edge(stack: Stack) -> AsyncIterator[Edge]:
    server, url = await start_edge(stack)
    try:
        async with aiohttp.ClientSession() as session:
            yield Edge(stack, url, session, server.app, server)
    finally:
        await server.stop(0)
