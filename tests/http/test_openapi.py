"""The OpenAPI document: served as it is defined, a route for every path and a path for every
route, well-formed schemas, and schemas strict enough to catch a response that drifts (the
other tests validate every real response against it)."""

from __future__ import annotations

import hashlib
import hmac

import pytest
from jsonschema import Draft202012Validator

from gateway_service.http.openapi import OPENAPI
from tests.http.conftest import Edge, check_component

METHODS = {"get", "post", "put", "patch", "delete"}


async def test_served_document_is_the_defined_one(edge: Edge) -> None:
    reply = await edge.call("GET", "/openapi.json")
    assert reply.status == 200
    assert reply.body == OPENAPI
    assert reply.body["openapi"].startswith("3.1")


async def test_document_and_routes_agree(edge: Edge) -> None:
    routes = {
        (route.resource.canonical, route.method.lower())
        for route in edge.app.router.routes()
        if route.resource is not None and route.method.lower() in METHODS
    }
    documented = {
        (path, method)
        for path, operations in OPENAPI["paths"].items()
        for method in operations
        if method in METHODS
    }
    assert routes == documented


def test_every_schema_is_valid_json_schema_and_every_ref_resolves() -> None:
    for name, schema in OPENAPI["components"]["schemas"].items():
        Draft202012Validator.check_schema(schema)
        assert schema.get("additionalProperties") is False, name
    refs: list[str] = []

    def walk(node: object) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("$ref"), str):
                refs.append(node["$ref"])
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
