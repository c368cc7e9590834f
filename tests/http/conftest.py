"""The HTTP edge on a real socket (port 0) around the e2e stack's gateway core and JWT verifier
(a real ledger on a fresh database, provider_sim over HTTP), an aiohttp client, and a check of
every response body against the served OpenAPI document."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from gateway_service.http import HttpServer, create_http_app
from gateway_service.http.openapi import OPENAPI
from gateway_service.webhooks.http import lemonsqueezy_route
from tests.e2e.conftest import Stack, gateway_settings, mint, sim_url, stack

__all__ = ["sim_url", "stack"]  # fixtures reused from the e2e suite

ORIGIN = "chrome-extension://rpcai-test-extension"
WILDCARD_ORIGINS = "vscode-webview://*"
MAX_BODY = 64 * 1024
DOC_URI = "urn:rpcai:openapi"
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


EVENT_SCHEMAS = {
    "delta": "StreamDelta",
    "usage": "StreamUsage",
    "done": "StreamDone",
    "error": "Error",
}


def parse_sse(text: str) -> list[SseEvent]:
    events: list[SseEvent] = []
    assert text.endswith("\n\n"), text[-200:]
    for block in text.strip("\n").split("\n\n"):
        fields: dict[str, str] = {}
        for line in block.split("\n"):
            name, _, value = line.partition(": ")
            assert name in ("event", "data"), block
            assert name not in fields, block
            fields[name] = value
        event = SseEvent(fields["event"], json.loads(fields["data"]))
        check_component(EVENT_SCHEMAS[event.event], event.data)
        events.append(event)
    return events


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
