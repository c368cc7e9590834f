"""The OpenAPI document: served as it is derived, a route for every path and a path for every
route, well-formed schemas, and schemas strict enough to catch a response that drifts (the
other tests validate every real response against it)."""

from __future__ import annotations

import hashlib
import hmac

import jsonschema_rs
import pytest
from jsonschema import Draft202012Validator
from schemathesis.specs.openapi import definitions

from gateway_service.http import openapi
from tests.http.conftest import OPENAPI, Edge, check_component, check_event

METHODS = {"get", "post", "put", "patch", "delete"}
# Files the pages load are not API operations.
NOT_OPERATIONS = "/static/"


async def test_served_document_is_the_derived_one(edge: Edge) -> None:
    reply = await edge.call("GET", "/openapi.json")
    assert reply.status == 200
    assert reply.body == OPENAPI == openapi.document()
    assert reply.body["openapi"].startswith("3.1")


async def test_document_and_routes_agree(edge: Edge) -> None:
    routes = {
        (route.resource.canonical, route.method.lower())
        for route in edge.app.router.routes()
        if route.resource is not None
        and route.method.lower() in METHODS
        and not route.resource.canonical.startswith(NOT_OPERATIONS)
    }
    documented = {
        (path, method)
        for path, operations in OPENAPI["paths"].items()
        for method in operations
        if method in METHODS
    }
    assert routes == documented


def test_every_schema_is_valid_json_schema_and_every_ref_resolves() -> None:
    for schema in OPENAPI["components"]["schemas"].values():
        Draft202012Validator.check_schema(schema)
    refs: list[str] = []

    def walk(node: object) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("$ref"), str):
                refs.append(node["$ref"])
            if node.get("type") == "object" and "properties" in node:
                assert node.get("additionalProperties") is False, node  # closed objects
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(OPENAPI)
    assert refs
    for ref in refs:
        assert ref.startswith("#/components/schemas/"), ref
        assert ref.rsplit("/", 1)[1] in OPENAPI["components"]["schemas"], ref


def test_every_operation_documents_its_answers() -> None:
    for path, operations in OPENAPI["paths"].items():
        for method, operation in operations.items():
            assert operation["operationId"], (path, method)
            assert "200" in operation["responses"], (path, method)
            if path.startswith("/v1/"):
                for status in ("400", "401", "503"):
                    assert status in operation["responses"], (path, method, status)
            if path.startswith("/v1/generate"):
                assert "Retry-After" in operation["responses"]["429"]["headers"]


@pytest.mark.parametrize(
    ("name", "body"),
    [
        ("Usage", {"inputTokens": 1, "outputTokens": 2, "extra": 3}),  # an undocumented field
        ("Usage", {"inputTokens": 1}),  # a missing one
        ("Usage", {"inputTokens": "1", "outputTokens": 2}),  # a wrong type
        ("UsageInfo", {"tokensUsed": 1, "estimatedCostMicroUsd": 1, "estimatedCostUsd": 0.1}),
        ("UsageInfo", {"tokensUsed": 1, "estimatedCostMicroUsd": 1, "estimatedCostUsd": "0.1"}),
        ("UserStatus", {"userType": "gold"}),
        ("Error", {"error": {"code": 400, "message": "m"}}),
    ],
)
def test_schemas_catch_a_drifting_response(name: str, body: object) -> None:
    with pytest.raises(AssertionError):
        check_component(name, body)


def test_a_conforming_body_passes() -> None:
    check_component(
        "UsageInfo", {"tokensUsed": 15, "estimatedCostMicroUsd": None, "estimatedCostUsd": None}
    )
    check_component("Error", {"error": {"code": 429, "message": "m", "reason": "R"}})


async def test_webhook_answers_match_the_document(edge: Edge) -> None:
    body = b'{"meta": {"event_name": "license_key_created"}, "data": {"id": "1"}}'
    signature = hmac.new(b"test-webhook-secret", body, hashlib.sha256).hexdigest()
    ok = await edge.call(
        "POST", "/webhooks/lemonsqueezy", data=body, headers={"X-Signature": signature}
    )
    assert (ok.status, ok.body["status"]) == (200, "ignored")
    refused = await edge.call(
        "POST", "/webhooks/lemonsqueezy", data=body, headers={"X-Signature": "0" * 64}
    )
    assert refused.status == 401
    assert refused.error["reason"] == "INVALID_SIGNATURE"


def test_the_document_is_valid_openapi_3_1() -> None:
    validator = jsonschema_rs.validator_for(definitions.OPENAPI_31)
    errors = [str(error) for error in validator.iter_errors(OPENAPI)]
    assert not errors, errors[:5]


@pytest.mark.parametrize(
    ("event", "data"),
    [
        ("delta", '{"text": 5}'),
        ("delta", '{"text": "a", "more": 1}'),
        ("usage", '{"text": "a"}'),
        ("done", '{"extra": true}'),
        ("error", '{"error": {"code": 503}}'),
        ("ping", "{}"),
        ("delta", "not json"),
    ],
)
def test_the_stream_schema_catches_a_drifting_event(event: str, data: str) -> None:
    with pytest.raises((AssertionError, ValueError)):
        check_event("/v1/generate/stream", event, data)


def test_a_conforming_event_passes() -> None:
    check_event("/v1/generate/stream", "delta", '{"text": "hi"}')
    check_event("/v1/generate/stream", "done", "{}")
