"""OpenAI Chat Completions: `POST /v1/chat/completions`, JSON and SSE, OpenAI's error bodies."""

from __future__ import annotations

import time
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

_ERRORS: dict[int, tuple[str, str | None, str]] = {
    400: ("invalid_request_error", None, "Invalid request."),
    401: ("invalid_request_error", "invalid_api_key", "Incorrect API key provided."),
    403: ("invalid_request_error", "unsupported_country_region_territory", "Forbidden."),
    404: ("invalid_request_error", "model_not_found", "The model does not exist."),
    429: (
        "requests",
        "rate_limit_exceeded",
        "Rate limit reached for requests. Please try again in 1s.",
    ),
    500: (
        "server_error",
        None,
        "The server had an error while processing your request. Sorry about that!",
    ),
    503: ("server_error", None, "The engine is currently overloaded, please try again later."),
}
_DONE = b"data: [DONE]\n\n"


def _mask(key: str) -> str:
    # OpenAI's own 401 message echoes a masked key: the gateway must not pass it on.
    return key[:3] + "*" * max(0, len(key) - 7) + key[-4:] if len(key) > 8 else "***"


def error_response(
    status: int, headers: dict[str, str], message: str | None = None, code: str | None = None
) -> web.Response:
    kind, default_code, default_message = _ERRORS.get(
        status, ("server_error" if status >= 500 else "invalid_request_error", None, "Error")
    )
    error = {
        "message": message or default_message,
        "type": kind,
        "param": None,
        "code": code or default_code,
    }
    if status == 429:
        headers = {**headers, "retry-after": "1", "x-ratelimit-reset-requests": "1s"}
    return json_response({"error": error}, status, headers)


def _usage(plan: Plan) -> dict[str, Any]:
    output = len(plan.words)
    return {
        "prompt_tokens": plan.input_tokens,
        "completion_tokens": output,
        "total_tokens": plan.input_tokens + output,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


def _validate(body: Any) -> str | None:
    if not isinstance(body, dict):
        return "Request body must be a JSON object."
    if not isinstance(body.get("model"), str):
        return "you must provide a model parameter"
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return "[] is too short - 'messages'"
    if not all(isinstance(m, dict) for m in messages):
        return "Invalid type for 'messages': expected an array of objects."
    limit = body.get("max_completion_tokens", body.get("max_tokens"))
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        return "Invalid 'max_completion_tokens': integer below minimum value 1."
    return None


async def chat_completions(request: web.Request) -> web.StreamResponse:
    request.app[STATS].requests += 1
    headers = {
        "x-request-id": random_id("req_", 32),
        "openai-organization": "sim-org",
        "openai-processing-ms": "1",
        "openai-version": "2020-10-01",
    }
    keys = request.app[API_KEYS]
    if keys is not None:
        key = bearer_key(request)
        if not key:
            return error_response(
                401,
                headers,
                "You didn't provide an API key. You need to provide your API key in an "
                "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
                code="missing_api_key",
            )
        if key not in keys:
            message = (
                f"Incorrect API key provided: {_mask(key)}. You can find your API key at "
                "https://platform.openai.com/account/api-keys."
            )
            return error_response(401, headers, message)
    try:
        body = await request.json()
    except ValueError:
        return error_response(400, headers, "We could not parse the JSON body of your request.")
    problem = _validate(body)
    if problem:
        return error_response(400, headers, problem)

    msgs: list[dict[str, Any]] = body["messages"]
    prompt_texts = [text_of(m.get("content")) for m in msgs]
    user_text = "".join(text_of(m.get("content")) for m in msgs if m.get("role") == "user")
    plan = make_plan(
        prompt_texts, user_text, body.get("max_completion_tokens", body.get("max_tokens"))
    )
    await pause(request, plan.delay)
    outcome = scripted_outcome(request, plan, user_text, body, headers, error_response)
    if isinstance(outcome, web.Response):
        return outcome
    plan = outcome

    base = {
        "id": random_id("chatcmpl-", 29),
        "created": int(time.time()),
        "model": body["model"],
        "service_tier": "default",
        "system_fingerprint": "fp_sim",
    }
    finish_reason = "length" if plan.truncated else "stop"
    if body.get("stream") is True:
        options = body.get("stream_options")
        include_usage = isinstance(options, dict) and options.get("include_usage") is True
        return await _stream(request, headers, plan, base, finish_reason, include_usage)
    if plan.malformed:
        return malformed_json_response(headers)
    completion = {
        **base,
        "object": "chat.completion",
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": plan.text,
                    "refusal": None,
                    "annotations": [],
                },
                "logprobs": None,
                "finish_reason": finish_reason,
            }
        ],
        "usage": _usage(plan),
    }
    return json_response(completion, 200, headers)


async def _stream(
    request: web.Request,
    headers: dict[str, str],
    plan: Plan,
    base: dict[str, Any],
    finish_reason: str,
    include_usage: bool,
) -> web.StreamResponse:
    if plan.malformed:
        head = [b'data: {"id": "chatcmpl-broken", "choices": [\n\n']
        return await stream_events(request, headers, head, [], [], 0.0, None)
    chunk_base = {**base, "object": "chat.completion.chunk"}
    if include_usage:
        # With include_usage every chunk carries `usage: null` except the last one.
        chunk_base["usage"] = None

    def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return sse(None, {**chunk_base, "choices": [choice]})

    head = [chunk({"role": "assistant", "content": "", "refusal": None})]
    content = {"index": 0, "delta": {"content": SLOT}, "logprobs": None, "finish_reason": None}
    content_delta = text_event(None, {**chunk_base, "choices": [content]})
    deltas = [content_delta(d) for d in plan.deltas]
    tail = [chunk({}, finish_reason)]
    if include_usage:
        tail.append(sse(None, {**chunk_base, "choices": [], "usage": _usage(plan)}))
    tail.append(_DONE)
    return await stream_events(request, headers, head, deltas, tail, plan.pace, plan.cut)
