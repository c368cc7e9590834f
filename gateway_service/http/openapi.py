"""The HTTP API as an OpenAPI 3.1 document (served at GET /openapi.json). Schemas are JSON Schema
2020-12; the tests validate every real response body against them, so they stay true. Response
objects list every field (`required`) and no other (`additionalProperties: false`)."""

from __future__ import annotations

from typing import Any

from gateway_service.core import MAX_KEY_CHARS, MAX_OUTPUT_TOKENS

Schema = dict[str, Any]

API_VERSION = "1.0.0"


def ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def nullable(schema: Schema) -> Schema:
    return {"anyOf": [schema, {"type": "null"}]}


def obj(
    properties: dict[str, Schema], required: list[str] | None = None, description: str = ""
) -> Schema:
    schema: Schema = {
        "type": "object",
        "properties": properties,
        "required": list(properties) if required is None else required,
        "additionalProperties": False,
    }
    if description:
        schema["description"] = description
    return schema


def described(schema: Schema, description: str) -> Schema:
    return {**schema, "description": description}


STRING: Schema = {"type": "string"}
BOOL: Schema = {"type": "boolean"}
COUNT: Schema = {"type": "integer", "minimum": 0}
INT: Schema = {"type": "integer"}
MICRO_USD: Schema = {"type": "integer", "description": "US dollars times 1,000,000 (exact)"}
USD: Schema = {
    "type": "string",
    "pattern": r"^-?[0-9]+\.[0-9]{6}$",
    "description": 'The same amount as a decimal string of dollars, e.g. "0.007500"',
}
TIMESTAMP: Schema = {"type": "string", "format": "date-time"}
USER_TYPE: Schema = {"type": "string", "enum": ["subscription", "byok", "unknown"]}

SCHEMAS: dict[str, Schema] = {
    "Error": obj(
        {
            "error": obj(
                {
                    "code": described(INT, "the HTTP status"),
                    "message": described(STRING, "what went wrong, for a person"),
                    "reason": described(
                        STRING,
                        "what went wrong, for a program: INVALID_ARGUMENT, INVALID_JSON, "
                        "AUTHENTICATION_REQUIRED, INVALID_TOKEN, TOKEN_EXPIRED, "
                        "INSUFFICIENT_BALANCE, IDEMPOTENCY_KEY_REUSED, PROVIDER_RATE_LIMITED, "
                        "LEDGER_UNAVAILABLE, BODY_TOO_LARGE, NOT_FOUND, ...",
                    ),
                    "field": described(STRING, "the request field at fault (400 only)"),
                },
                required=["code", "message", "reason"],
            )
        }
    ),
    "GenerateRequest": obj(
        {
            "content": described(STRING, "the prompt (bounded by the server's MAX_PROMPT_CHARS)"),
            "systemPrompt": nullable(STRING),
            "provider": nullable(
                described(STRING, '"anthropic" or "openai"; empty: chosen from the model name')
            ),
            "model": nullable(STRING),
            "maxTokens": nullable(
                {
                    "type": "integer",
                    "minimum": 0,
                    "maximum": MAX_OUTPUT_TOKENS,
                    "description": "upper bound on output tokens; 0: the server's default",
                }
            ),
            "apiKey": nullable(
                described(STRING, "your own provider key (BYOK): never logged, never stored")
            ),
            "idempotencyKey": nullable(
                {
                    "type": "string",
                    "maxLength": MAX_KEY_CHARS,
                    "description": "a retried call with the same key is not charged twice",
                }
            ),
        },
        required=["content"],
        description="Fields not listed here are refused (400), `null` means not given.",
    ),
    "Usage": obj({"inputTokens": COUNT, "outputTokens": COUNT}),
    "TokenUsage": obj(
        {
            "tokensCharged": described(COUNT, "used tokens plus the usage fee"),
            "remainingBalance": COUNT,
            "tokensUsed": COUNT,
            "feeTokens": COUNT,
            "settlementPending": described(
                BOOL,
                "the ledger was unreachable when the call ended: the charge is queued "
                "(tokensCharged 0 and remainingBalance the pre-call value until it lands)",
            ),
        },
        description="Subscription calls: what the ledger charged.",
    ),
    "UsageInfo": obj(
        {
            "tokensUsed": COUNT,
            "estimatedCostMicroUsd": nullable(MICRO_USD),
            "estimatedCostUsd": nullable(USD),
        },
        description="BYOK calls: tracked, never charged. Costs are null when the model's "
        "price is unknown.",
    ),
    "StreamUsage": obj(
        {
            "provider": STRING,
            "model": STRING,
            "stopReason": STRING,
            "usage": ref("Usage"),
            "tokenUsage": nullable(ref("TokenUsage")),
            "usageInfo": nullable(ref("UsageInfo")),
        },
        description="The `usage` event of a stream: the finished call without its text.",
    ),
    "GenerateResponse": obj(
        {
            "text": STRING,
            "provider": STRING,
            "model": STRING,
            "stopReason": STRING,
            "usage": ref("Usage"),
            "tokenUsage": nullable(ref("TokenUsage")),
            "usageInfo": nullable(ref("UsageInfo")),
        }
    ),
    "StreamDelta": obj({"text": STRING}, description="The `delta` event: a chunk of text."),
    "StreamDone": obj({}, description="The `done` event: the stream is complete."),
    "UserStatus": obj(
        {
            "userType": USER_TYPE,
            "hasSubscription": BOOL,
            "hasPurchases": BOOL,
            "availableTokens": COUNT,
            "reservedTokens": COUNT,
            "subscriptionTier": nullable(described(STRING, "from the JWT's tier claim")),
            "quota": nullable(described(INT, "from the JWT's quota claim")),
            "limits": nullable(
                obj(
                    {
                        "requestsPerMinute": described(COUNT, "0: unlimited"),
                        "tokensPerMinute": described(COUNT, "0: unlimited"),
                        "callsInFlight": described(COUNT, "0: unlimited"),
                        "requestsRemaining": described(COUNT, "requests left right now"),
                        "tokensRemaining": described(COUNT, "provider tokens left this minute"),
                        "callsInFlightNow": described(COUNT, "the caller's calls running now"),
                    },
                    description="The caller's rate limits and what is left of them now.",
                )
            ),
            "month": nullable(
                obj(
                    {
                        "quotaTokens": described(COUNT, "tokens a calendar month; 0: no quota"),
                        "usedTokens": described(COUNT, "charged plus held this month"),
                        "resetsAt": described(STRING, "RFC 3339, UTC: when the month ends"),
                    },
                    description="The monthly quota and this month's use of it.",
                )
            ),
        }
    ),
    "EligibilityRequest": obj(
        {
            "estimatedTokens": nullable(
                described(COUNT, "tokens the call may use; ignored when `content` is given")
            ),
            "hasApiKey": nullable(BOOL),
            "content": nullable(
                described(STRING, "the call itself: its hold is sized exactly as the call's")
            ),
            "systemPrompt": nullable(STRING),
            "maxTokens": nullable(INT),
        },
        required=[],
        description="Fields not listed here are refused (400), `null` means not given.",
    ),
    "Eligibility": obj(
        {
            "canMakeRequest": BOOL,
            "reason": STRING,
            "userType": USER_TYPE,
            "requiredTokens": described(
                COUNT, "what the call would hold (its tokens plus the fee), as its Reserve would"
            ),
            "availableTokens": COUNT,
        }
    ),
    "UsageSummary": obj(
        {
            "totalRequests": COUNT,
            "totalTokens": COUNT,
            "tokensCharged": COUNT,
            "estimatedTotalCostMicroUsd": described(
                MICRO_USD, "over the calls whose cost is known"
            ),
            "estimatedTotalCostUsd": USD,
            "unknownCostRequests": COUNT,
        }
    ),
    "UsageBreakdown": obj({"provider": STRING, "model": STRING, "summary": ref("UsageSummary")}),
    "UsageRecord": obj(
        {
            "usageId": STRING,
            "userType": USER_TYPE,
            "provider": STRING,
            "model": STRING,
            "inputTokens": COUNT,
            "outputTokens": COUNT,
            "tokensCharged": COUNT,
            "estimatedCostMicroUsd": nullable(MICRO_USD),
            "estimatedCostUsd": nullable(USD),
            "createdAt": TIMESTAMP,
        }
    ),
    "UsageAnalytics": obj(
        {
            "summary": ref("UsageSummary"),
            "breakdown": {"type": "array", "items": ref("UsageBreakdown")},
            "history": {
                "type": "array",
                "items": ref("UsageRecord"),
                "description": "newest first; empty unless include_history=true",
            },
        }
    ),
    "Purchase": obj(
        {
            "purchaseId": STRING,
            "purchaseType": {"type": "string", "enum": ["subscription", "one_time", "unknown"]},
            "tokensPurchased": COUNT,
            "tokensCredited": COUNT,
            "platformFeeTokens": COUNT,
            "tokensRefunded": COUNT,
            "createdAt": TIMESTAMP,
        }
    ),
    "PurchasePage": obj(
        {
            "purchases": {"type": "array", "items": ref("Purchase")},
            "nextPageToken": nullable(described(STRING, "null on the last page")),
        }
    ),
    "Health": obj({"status": {"type": "string", "enum": ["ok"]}}),
    "WebhookOutcome": obj(
        {
            "status": {
                "type": "string",
                "enum": ["applied", "duplicate", "ignored", "dead_letter"],
                "description": "dead_letter: kept with its body and reason for an operator",
            },
            "detail": {"type": "string"},
        }
    ),
    "Ready": obj({"status": {"type": "string", "enum": ["ready"]}}),
}

_ERRORS = {
    400: "Invalid input: the body is not a JSON object, a field has the wrong type or is "
    "unknown, or a value is out of range (`error.field` names it)",
    401: "Missing, malformed, expired or otherwise invalid JWT (or sign-in required)",
    402: "Not enough tokens for this call",
    403: "The provider refused your own API key",
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
RATE_LIMIT = {
    "RateLimit-Limit": {
        "description": "the caller's requests per minute (sent when that is limited)",
        "schema": _SECONDS,
    },
    "RateLimit-Remaining": {"description": "requests left now", "schema": _SECONDS},
    "RateLimit-Reset": {"description": "seconds until all are left again", "schema": _SECONDS},
}
RETRY_AFTER = {
    "Retry-After": {
        "description": "seconds to wait before retrying",
        "schema": {"type": "integer", "minimum": 1},
    },
    **RATE_LIMIT,
}


def _json(description: str, schema: Schema, headers: Schema | None = None) -> Schema:
    response: Schema = {
        "description": description,
        "content": {"application/json": {"schema": schema}},
    }
    if headers:
        response["headers"] = headers
    return response


def _errors(*statuses: int) -> dict[str, Schema]:
    return {
        str(s): _json(_ERRORS[s], ref("Error"), RETRY_AFTER if s == 429 else None) for s in statuses
    }


def _query(name: str, schema: Schema, description: str) -> Schema:
    return {"name": name, "in": "query", "required": False, "schema": schema,
            "description": description}  # fmt: skip


SIGNED_IN: list[dict[str, list[str]]] = [{"bearer": []}]
SIGNED_IN_OR_PUBLIC: list[dict[str, list[str]]] = [{"bearer": []}, {}]
GENERATE_ERRORS = (400, 401, 402, 403, 408, 409, 413, 415, 429, 500, 503, 504)
READ_ERRORS = (400, 401, 500, 503)

OPENAPI: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {
        "title": "rpcai gateway",
        "version": API_VERSION,
        "description": "AI calls metered against prepaid tokens. Authenticate with "
        "`Authorization: Bearer <JWT>`; without a token you are a public caller, who may only "
        "make BYOK calls (with `apiKey`) and check eligibility. Every error is "
        '`{"error": {"code", "message", "reason"}}`.',
    },
    "paths": {
        "/v1/generate": {
            "post": {
                "operationId": "generate",
                "summary": "One AI call, metered (subscription) or tracked (BYOK)",
                "security": SIGNED_IN_OR_PUBLIC,
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": ref("GenerateRequest")}},
                },
                "responses": {
                    "200": _json(
                        "The answer and what it cost", ref("GenerateResponse"), RATE_LIMIT
                    ),
                    **_errors(*GENERATE_ERRORS),
                },
            }
        },
        "/v1/generate/stream": {
            "post": {
                "operationId": "generateStream",
                "summary": "The same call, streamed as Server-Sent Events",
                "description": "Events: `delta` (StreamDelta) per chunk of text, then one "
                "`usage` (StreamUsage), then `done` (StreamDone). A failure after the stream "
                "started is one `error` event (Error) instead of usage and done. A refusal "
                "before the stream starts is an ordinary JSON error with its status. A client "
                "that disconnects is charged for what was streamed.",
                "security": SIGNED_IN_OR_PUBLIC,
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": ref("GenerateRequest")}},
                },
                "responses": {
                    "200": {
                        "description": "text/event-stream of delta, usage, done (or error)",
                        "headers": RATE_LIMIT,
                        "content": {
                            "text/event-stream": {
                                "schema": {"type": "string"},
                                "x-events": {
                                    "delta": ref("StreamDelta"),
                                    "usage": ref("StreamUsage"),
                                    "done": ref("StreamDone"),
                                    "error": ref("Error"),
                                },
                            }
                        },
                    },
                    **_errors(*GENERATE_ERRORS),
                },
            }
        },
        "/v1/me/status": {
            "get": {
                "operationId": "userStatus",
                "summary": "Who you are to the gateway: user type, balance, tier",
                "security": SIGNED_IN,
                "responses": {
                    "200": _json("Your status", ref("UserStatus")),
                    **_errors(*READ_ERRORS),
                },
            }
        },
        "/v1/me/usage": {
            "get": {
                "operationId": "usageAnalytics",
                "summary": "Your usage over the last days, by provider and model",
                "security": SIGNED_IN,
                "parameters": [
                    _query("days", {"type": "integer", "minimum": 1, "default": 30}, "window"),
                    _query(
                        "include_history",
                        {"type": "boolean", "default": False},
                        "also list the calls themselves (newest first)",
                    ),
                ],
                "responses": {
                    "200": _json("Your usage", ref("UsageAnalytics")),
                    **_errors(*READ_ERRORS),
                },
            }
        },
        "/v1/me/purchases": {
            "get": {
                "operationId": "purchaseHistory",
                "summary": "Your purchases, newest first, a page at a time",
                "security": SIGNED_IN,
                "parameters": [
                    _query(
                        "page_size",
                        {"type": "integer", "minimum": 1, "maximum": 100, "default": 20},
                        "purchases per page",
                    ),
                    _query("page_token", STRING, "nextPageToken of the previous page"),
                ],
                "responses": {
                    "200": _json("A page of purchases", ref("PurchasePage")),
                    **_errors(*READ_ERRORS),
                },
            }
        },
        "/v1/eligibility": {
            "post": {
                "operationId": "eligibility",
                "summary": "Would a call of this size be allowed, and what would it hold",
                "security": SIGNED_IN_OR_PUBLIC,
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": ref("EligibilityRequest")}},
                },
                "responses": {
                    "200": _json("The answer", ref("Eligibility")),
                    **_errors(400, 401, 408, 413, 415, 500, 503),
                },
            }
        },
        "/webhooks/lemonsqueezy": {
            "post": {
                "operationId": "lemonsqueezyWebhook",
                "summary": "A LemonSqueezy event, signed with X-Signature (hex HMAC-SHA256 of the"
                " raw body); applied exactly once",
                "security": [],
                "parameters": [
                    {
                        "name": "X-Signature",
                        "in": "header",
                        "required": True,
                        "schema": {"type": "string"},
                    }
                ],
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": {"type": "object"}}},
                },
                "responses": {
                    "200": _json("Applied, a duplicate, ignored, or parked", ref("WebhookOutcome")),
                    "401": _json("Missing or invalid signature; nothing changed", ref("Error")),
                    "413": _json("Body too large", ref("Error")),
                    "503": _json("Ledger unavailable (the provider retries)", ref("Error")),
                },
            }
        },
        "/healthz": {
            "get": {
                "operationId": "healthz",
                "summary": "The process is up",
                "security": [],
                "responses": {"200": _json("Up", ref("Health"))},
            }
        },
        "/readyz": {
            "get": {
                "operationId": "readyz",
                "summary": "Ready to serve: the token ledger answers its health check",
                "security": [],
                "responses": {
                    "200": _json("Ready", ref("Ready")),
                    "503": _json("Not ready (ledger unreachable, or shutting down)", ref("Error")),
                },
            }
        },
        "/openapi.json": {
            "get": {
                "operationId": "openapi",
                "summary": "This document",
                "security": [],
                "responses": {"200": _json("OpenAPI 3.1", {"type": "object"})},
            }
        },
    },
    "components": {
        "schemas": SCHEMAS,
        "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}},
    },
}
