"""The HTTP API as an OpenAPI 3.1 document (served at GET /openapi.json), derived from the routes'
declarations (`http.api`) and their models (`http.shapes`, `http.views`): nothing here
restates a field. Schemas are JSON Schema 2020-12; request schemas say exactly what the handlers
accept (tests/http/test_schema_contract.py runs schemathesis against a live edge to hold them to
it), and the tests validate every real response against the reply schemas, which list every
field (`required`) and no other (`additionalProperties: false`).

The document served by an app describes exactly the routes that app has (`served`), so a route
added with `http.api.Routes` is documented by being added. Routes built elsewhere are described
here with `describe` (the LemonSqueezy webhook).

A stream (`text/event-stream`) is described one event at a time, as OpenAPI 3.2's `itemSchema`
does and as tools read `schema` for event streams before 3.2: an object with the event's name
(`event`) and its `data`, a JSON text (`contentMediaType`) whose shape is `contentSchema`.
"""

from __future__ import annotations

import functools
from collections.abc import Collection, Iterable, Mapping
from typing import Any

from aiohttp import web
from pydantic import RootModel, TypeAdapter
from pydantic.json_schema import GenerateJsonSchema, JsonSchemaMode, JsonSchemaValue
from pydantic_core import core_schema

from gateway_service.http import api
from gateway_service.http.api import (
    ENDPOINTS,
    Endpoint,
    EventStream,
    Header,
    HtmlPage,
    RawBody,
    describe,
)
from gateway_service.http.errors import Error
from gateway_service.http.shapes import Body, adapter
from gateway_service.http.views import WebhookOutcome

Schema = dict[str, Any]

API_VERSION = "1.0.0"
REF = "#/components/schemas/{model}"

ERRORS = {
    400: "Invalid input: the body is not a JSON object, a field has the wrong type or is "
    "unknown, or a value is out of range (`error.field` names it)",
    401: "Missing, malformed, expired or otherwise invalid JWT (or sign-in required)",
    402: "Not enough tokens for this call",
    403: "The provider refused your own API key",
    404: "Not found",
    408: "The request body did not arrive within the body timeout (`BODY_TIMEOUT`); the "
    "connection is closed",
    409: "This idempotency key was used for a different request, or its call is running",
    413: "The request body is too large",
    415: "The body is not application/json",
    429: "Refused by a rate limit (reason `RATE_LIMITED`, `TOKENS_PER_MINUTE_EXCEEDED`, "
    "`TOO_MANY_CALLS_IN_FLIGHT`) or the monthly quota (`MONTHLY_QUOTA_EXCEEDED`), or rate "
    "limited by the provider; retry after `Retry-After` seconds",
    500: "Internal error",
    503: "The token ledger or the provider is unavailable, or the gateway is at capacity "
    "(`TOO_MANY_STREAMS`, `TOO_MANY_CONNECTIONS`, with `Retry-After`); retry later",
    504: "The provider did not answer in time",
}
_SECONDS = {"type": "integer", "minimum": 0}
RATE_LIMIT: dict[str, Schema] = {
    "RateLimit-Limit": {
        "description": "the caller's requests per minute (sent when that is limited)",
        "schema": _SECONDS,
    },
    "RateLimit-Remaining": {"description": "requests left now", "schema": _SECONDS},
    "RateLimit-Reset": {"description": "seconds until all are left again", "schema": _SECONDS},
}
RETRY_AFTER: dict[str, Schema] = {
    "Retry-After": {
        "description": "seconds to wait before retrying",
        "schema": {"type": "integer", "minimum": 1},
    },
    **RATE_LIMIT,
}
SECURITY: dict[str, list[dict[str, list[str]]]] = {
    "signed_in": [{"bearer": []}],
    "optional": [{"bearer": []}, {}],
    "public": [],
}


class Document(RootModel[dict[str, Any]]):
    """An OpenAPI 3.1 document."""


class _Schemas(GenerateJsonSchema):
    """Pydantic's JSON Schema without per-field titles, and without defaults in answers (every
    field of an answer is sent)."""

    def field_title_should_be_set(self, schema: Any) -> bool:
        return False

    def default_schema(self, schema: core_schema.WithDefaultSchema) -> JsonSchemaValue:
        if self.mode == "serialization":
            return self.generate_inner(schema["schema"])
        return super().default_schema(schema)


def _ref(shape: type) -> Schema:
    return {"$ref": REF.format(model=shape.__name__)}


def _json(
    description: str, schema: Schema, headers: Mapping[str, Mapping[str, Any]] | None = None
) -> Schema:
    response: Schema = {
        "description": description,
        "content": {"application/json": {"schema": schema}},
    }
    if headers:
        response["headers"] = dict(headers)
    return response


def _event_schema(stream: EventStream) -> Schema:
    return {
        "description": stream.description,
        "oneOf": [
            {
                "type": "object",
                "properties": {
                    "event": {"const": name},
                    "data": {
                        "type": "string",
                        "contentMediaType": "application/json",
                        "contentSchema": _ref(model),
                    },
                },
                "required": ["event", "data"],
                "additionalProperties": False,
            }
            for name, model in stream.events.items()
        ],
    }


def _event_schema_name(endpoint: Endpoint) -> str:
    return endpoint.operation_id[:1].upper() + endpoint.operation_id[1:] + "Event"


def _success(endpoint: Endpoint) -> Schema:
    answers = endpoint.answers
    headers = dict(endpoint.reply_headers)
    if isinstance(answers, EventStream):
        schema = {"$ref": REF.format(model=_event_schema_name(endpoint))}
        response: Schema = {
            "description": f"text/event-stream: {answers.description}",
            "content": {"text/event-stream": {"schema": schema}},
        }
        if headers:
            response["headers"] = headers
        return response
    if isinstance(answers, HtmlPage):
        return {
            "description": answers.description,
            "content": {"text/html": {"schema": {"type": "string"}}},
        }
    description = " ".join((answers.__doc__ or "").split()) or endpoint.summary
    if answers is Document:
        return _json(description, {"type": "object"})
    return _json(description, _ref(answers), headers)


def _statuses(endpoint: Endpoint) -> dict[int, str]:
    """The refusals an operation documents: its own, and those its declaration implies."""
    implied: set[int] = {500}
    if isinstance(endpoint.body, type) and issubclass(endpoint.body, Body):
        implied |= {400, 408, 413, 415}
    if endpoint.query is not None or endpoint.path_params is not None:
        implied.add(400)
    if endpoint.security != "public":
        implied.add(401)
    statuses = dict.fromkeys(implied, "")
    statuses.update(endpoint.errors)
    return {status: statuses[status] or ERRORS[status] for status in sorted(statuses)}


def _parameters(endpoint: Endpoint) -> list[Schema]:
    parameters: list[Schema] = []
    for where, model in (("path", endpoint.path_params), ("query", endpoint.query)):
        if model is None:
            continue
        schema = model.model_json_schema(ref_template=REF, schema_generator=_Schemas)
        required = set(schema.get("required", ()))
        for name, property_schema in schema.get("properties", {}).items():
            property_schema = dict(property_schema)
            parameter: Schema = {"name": name, "in": where, "required": name in required}
            if "description" in property_schema:
                parameter["description"] = property_schema.pop("description")
            parameter["schema"] = property_schema
            parameters.append(parameter)
    for header in endpoint.headers:
        parameters.append(_header(header))
    return parameters


def _header(header: Header) -> Schema:
    return {
        "name": header.name,
        "in": "header",
        "required": header.required,
        "description": header.description,
        "schema": {"type": "string"},
    }


def _operation(endpoint: Endpoint) -> Schema:
    operation: Schema = {"operationId": endpoint.operation_id, "summary": endpoint.summary}
    if endpoint.description:
        operation["description"] = " ".join(endpoint.description.split())
    operation["security"] = SECURITY[endpoint.security]
    if parameters := _parameters(endpoint):
        operation["parameters"] = parameters
    body = endpoint.body
    if isinstance(body, RawBody):
        operation["requestBody"] = {
            "required": body.required,
            "description": body.description,
            "content": {"application/json": {"schema": dict(body.schema)}},
        }
    elif body is not None:
        operation["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": _ref(body)}},
        }
    responses = {"200": _success(endpoint)}
    if endpoint.accepted:
        responses["202"] = {"description": endpoint.accepted}
    refusal = _ref(Error)
    if endpoint.errors_in_answer and isinstance(endpoint.answers, type):
        refusal = {"anyOf": [refusal, _ref(endpoint.answers)]}
    for status, description in _statuses(endpoint).items():
        headers = RETRY_AFTER if status in (429, 503) else None
        responses[str(status)] = _json(description, refusal, headers)
    operation["responses"] = responses
    return operation


def _shapes(endpoints: Iterable[Endpoint]) -> list[tuple[type, JsonSchemaMode]]:
    """Every shape the operations name, once: request models as they are validated, answers as
    they are sent."""
    shapes: dict[tuple[type, JsonSchemaMode], None] = {(Error, "serialization"): None}
    for endpoint in endpoints:
        if isinstance(endpoint.body, type):
            shapes[(endpoint.body, "validation")] = None
        answers = endpoint.answers
        if isinstance(answers, EventStream):
            shapes.update(
                dict.fromkeys((shape, "serialization") for shape in answers.events.values())
            )
        elif isinstance(answers, type) and answers is not Document:
            shapes[(answers, "serialization")] = None
    return list(shapes)


@functools.lru_cache(maxsize=16)
def _document(routes: frozenset[tuple[str, str]] | None, _version: int) -> Document:
    endpoints = [e for key, e in ENDPOINTS.items() if routes is None or key in routes]
    return Document(_build(endpoints))


def _build(endpoints: list[Endpoint]) -> Schema:
    inputs = [(key, mode, adapter(shape)) for key in _shapes(endpoints) for shape, mode in [key]]
    _, definitions = TypeAdapter.json_schemas(inputs, ref_template=REF, schema_generator=_Schemas)
    schemas: Schema = definitions.get("$defs", {})
    paths: dict[str, Schema] = {}
    for endpoint in endpoints:
        if isinstance(endpoint.answers, EventStream):
            schemas[_event_schema_name(endpoint)] = _event_schema(endpoint.answers)
        paths.setdefault(endpoint.path, {})[endpoint.method.lower()] = _operation(endpoint)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "rpcai gateway",
            "version": API_VERSION,
            "description": "AI calls metered against prepaid tokens. Authenticate with "
            "`Authorization: Bearer <JWT>`; without a token you are a public caller, who may "
            "only make BYOK calls (with `apiKey`) and check eligibility. Request bodies are "
            "I-JSON (RFC 7493): a key given twice or a string with a lone surrogate is refused. "
            'Every error is `{"error": {"code", "message", "reason"}}`.',
        },
        "paths": paths,
        "components": {
            "schemas": dict(sorted(schemas.items())),
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}
            },
        },
    }


def document(routes: Collection[tuple[str, str]] | None = None) -> Schema:
    """The document of every route described so far, or of those among `routes` ((METHOD, path
    template) pairs)."""
    key = None if routes is None else frozenset(routes)
    return _document(key, api.version).root


def served(app: web.Application) -> Document:
    """The document of the routes `app` has."""
    routes = frozenset(
        (route.method, route.resource.canonical)
        for route in app.router.routes()
        if route.resource is not None
    )
    return _document(routes, api.version)


# ---- routes built elsewhere ------------------------------------------------------------------

describe(
    "POST",
    "/webhooks/lemonsqueezy",
    operation_id="lemonsqueezyWebhook",
    summary="A LemonSqueezy event, signed with X-Signature (hex HMAC-SHA256 of the raw body); "
    "applied exactly once",
    answers=WebhookOutcome,
    headers=(Header("X-Signature", "hex HMAC-SHA256 of the raw body with the webhook secret"),),
    body=RawBody(
        {},
        "LemonSqueezy's event ({meta, data}), checked against its signature before it is read: "
        "any signed delivery that cannot be applied (empty, malformed, an unknown variant, no "
        "user) is kept as a dead letter and answered 200, so that it is not retried",
        required=False,
    ),
    errors={
        401: "Missing or invalid signature; nothing changed",
        413: "Body too large",
        500: "The event could not be applied; retry later",
        503: "Ledger unavailable, or webhooks not configured (the provider retries)",
    },
)
