"""Anthropic Messages API: `POST /v1/messages`, JSON and SSE, with Anthropic's error bodies."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from provider_sim.common import (
    API_KEYS,
    SLOT,
    STATS,
    bearer_key,
    json_response,
    malformed_json_response,
    pause,
    random_id,
    scripted_outcome,
    sse,
    stream_events,
    text_event,
)
from provider_sim.script import Plan, make_plan, text_of

_ERRORS = {
    400: ("invalid_request_error", "Invalid request."),
    401: ("authentication_error", "invalid x-api-key"),
    403: (
        "permission_error",
        "Your API key does not have permission to use the specified resource.",
    ),
    404: ("not_found_error", "The requested resource could not be found."),
    413: ("request_too_large", "Request exceeds the maximum allowed number of bytes."),
    429: (
        "rate_limit_error",
        "Number of request tokens has exceeded your per-minute rate limit; see the response "
        "headers for current usage. Please reduce the prompt length or try again later.",
    ),
    500: ("api_error", "Internal server error"),
    529: ("overloaded_error", "Overloaded"),
}


def error_response(
    status: int, headers: dict[str, str], message: str | None = None
) -> web.Response:
    kind, default = _ERRORS.get(
        status, ("api_error" if status >= 500 else "invalid_request_error", "Error")
    )
    body = {
        "type": "error",
        "error": {"type": kind, "message": message or default},
        "request_id": headers["request-id"],
    }
    if status == 429:
        headers = {**headers, "retry-after": "1"}
    return json_response(body, status, headers)


_TEXT_DELTA = text_event(
    "content_block_delta",
    {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": SLOT}},
)


def _usage(plan: Plan, output_tokens: int) -> dict[str, Any]:
    return {
        "input_tokens": plan.input_tokens,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
        "output_tokens": output_tokens,
        "service_tier": "standard",
    }


def _validate(body: Any) -> str | None:
    if not isinstance(body, dict):
        return "Request body must be a JSON object."
    if not isinstance(body.get("model"), str):
        return "model: Field required"
    max_tokens = body.get("max_tokens")
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        return "max_tokens: Field required and must be a positive integer"
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return "messages: Field required"
    if not all(isinstance(m, dict) for m in messages):
        return "messages: each message must be an object"
    return None


async def messages(request: web.Request) -> web.StreamResponse:
    request.app[STATS].requests += 1
    headers = {"request-id": random_id("req_01", 22), "anthropic-organization-id": "sim-org"}
    keys = request.app[API_KEYS]
    if keys is not None:
        key = request.headers.get("x-api-key") or bearer_key(request)
        if not key:
            return error_response(401, headers, "x-api-key header is required")
        if key not in keys:
            return error_response(401, headers)
    try:
        body = await request.json()
    except ValueError:
        return error_response(400, headers, "There was an error parsing the body of your request.")
    problem = _validate(body)
    if problem:
        return error_response(400, headers, problem)

    msgs: list[dict[str, Any]] = body["messages"]
    system = text_of(body.get("system"))
    prompt_texts = ([system] if system else []) + [text_of(m.get("content")) for m in msgs]
    user_text = "".join(text_of(m.get("content")) for m in msgs if m.get("role") == "user")
    plan = make_plan(prompt_texts, user_text, body["max_tokens"])
    await pause(request, plan.delay)
    outcome = scripted_outcome(request, plan, user_text, body, headers, error_response)
    if isinstance(outcome, web.Response):
        return outcome
    plan = outcome

    model = body["model"]
    message_id = random_id("msg_01", 22)
    stop_reason = "max_tokens" if plan.truncated else "end_turn"
    if body.get("stream") is True:
        return await _stream(request, headers, plan, model, message_id, stop_reason)
    if plan.malformed:
        return malformed_json_response(headers)
    message = {
        "id": message_id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [{"type": "text", "text": plan.text}],
        "stop_reason": stop_reason,
        "stop_sequence": None,
        "usage": _usage(plan, len(plan.words)),
    }
    return json_response(message, 200, headers)


async def _stream(
    request: web.Request,
    headers: dict[str, str],
    plan: Plan,
    model: str,
    message_id: str,
    stop_reason: str,
) -> web.StreamResponse:
    if plan.malformed:
        head = [b'event: message_start\ndata: {"type": "message_start", "message": {\n\n']
        return await stream_events(request, headers, head, [], [], 0.0, None)
    start: dict[str, Any] = {
        "id": message_id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": _usage(plan, 1),
    }
    head = [
        sse("message_start", {"type": "message_start", "message": start}),
        sse(
            "content_block_start",
            {
                "type": "content_block_start",
                "index": 0,
                "content_block": {"type": "text", "text": ""},
            },
        ),
        sse("ping", {"type": "ping"}),
    ]
    deltas = [_TEXT_DELTA(d) for d in plan.deltas]
    tail = [
        sse("content_block_stop", {"type": "content_block_stop", "index": 0}),
        sse(
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": stop_reason, "stop_sequence": None},
                "usage": {"output_tokens": len(plan.words)},
            },
        ),
        sse("message_stop", {"type": "message_stop"}),
    ]
    return await stream_events(request, headers, head, deltas, tail, plan.pace, plan.cut)
