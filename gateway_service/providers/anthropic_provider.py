"""Anthropic Messages API through the official async SDK."""

from __future__ import annotations

import json
from typing import Any

import anthropic
import httpx2
from anthropic.types import RawMessageStreamEvent

from gateway_service.providers.base import ANTHROPIC, Completion, CompletionRequest, token_count
from gateway_service.providers.errors import ProviderError, ProviderErrorKind
from gateway_service.providers.http_client import provider_http_client
from gateway_service.providers.retry import Resilience
from gateway_service.providers.sdk import SdkProvider
from gateway_service.providers.stream import ProviderStream, SdkStream

DEFAULT_ANTHROPIC_MODEL = "claude-haiku-4-5"


class AnthropicProvider(SdkProvider[anthropic.AsyncAnthropic]):
    name = ANTHROPIC

    def __init__(
        self,
        *,
        api_key: str | None,
        base_url: str | None = None,
        timeout_seconds: float = 60.0,
        default_model: str = DEFAULT_ANTHROPIC_MODEL,
        resilience: Resilience | None = None,
    ) -> None:
        # One client (one connection pool) per process. The gateway owns retries (retry.py):
        # max_retries=0.
        # Without a platform key the client still exists so BYOK calls can share its pool; the
        # placeholder is never sent (client_for refuses first).
        client = anthropic.AsyncAnthropic(
            api_key=api_key or "unset",
            base_url=base_url,
            timeout=timeout_seconds,
            max_retries=0,
            http_client=provider_http_client(),  # a bounded read-ahead: see http_client
            # The gateway exports no traces: without this the SDK builds a (non-recording)
            # OpenTelemetry span per call, about 2% of the gateway's CPU per metered call.
            open_telemetry=False,
        )
        super().__init__(client, bool(api_key), default_model, resilience)

    async def _create(
        self, client: anthropic.AsyncAnthropic, request: CompletionRequest
    ) -> Completion:
        # The raw reply read as JSON, not the SDK's Message: building that pydantic model (and
        # its content blocks) was about 5% of the gateway's CPU per metered call. `post` is the
        # SDK's own request path (its headers, timeouts, retries and status errors); only the
        # parsing of a successful reply is ours. A body that is not JSON is a ValueError, which
        # map_sdk_error reports as MALFORMED, as the SDK's parse of it was.
        reply = await client.post("/v1/messages", body=_params(request), cast_to=httpx2.Response)
        return _completion(json.loads(reply.content))

    def stream(self, request: CompletionRequest) -> AnthropicStream:
        return AnthropicStream(self, request)


class AnthropicStream(ProviderStream):
    def __init__(self, provider: AnthropicProvider, request: CompletionRequest) -> None:
        super().__init__(provider.name, request, provider.resilience)
        self._provider = provider

    async def _open(self) -> SdkStream:
        client = self._provider.client_for(self._request)
        events: anthropic.AsyncStream[RawMessageStreamEvent] = await client.messages.create(
            **_params(self._request), stream=True
        )
        return events

    def _on_event(self, event: RawMessageStreamEvent) -> str | None:
        if event.type == "content_block_delta":
            return event.delta.text if event.delta.type == "text_delta" else None
        if event.type == "message_start":
            self.model = event.message.model
            usage = event.message.usage
            self._input_tokens = _input_total(
                usage.input_tokens, usage.cache_creation_input_tokens, usage.cache_read_input_tokens
            )
            self._output_tokens = token_count(usage.output_tokens)
        elif event.type == "message_delta":
            # message_delta's usage is cumulative: its output_tokens is the final count.
            delta_usage = event.usage
            if delta_usage.input_tokens is not None:
                self._input_tokens = _input_total(
                    delta_usage.input_tokens,
                    delta_usage.cache_creation_input_tokens,
                    delta_usage.cache_read_input_tokens,
                )
            self._output_tokens = token_count(delta_usage.output_tokens)
            self.stop_reason = event.delta.stop_reason
            self._final = True
        return None


def _params(request: CompletionRequest) -> dict[str, Any]:
    params: dict[str, Any] = {
        "model": request.model,
        "max_tokens": request.max_tokens,
        "messages": [{"role": "user", "content": request.content}],
    }
    if request.system_prompt:
        params["system"] = request.system_prompt
    return params


def _input_total(base: object, cache_write: object, cache_read: object) -> int:
    # Anthropic counts cached prompt tokens apart from input_tokens; all of them were used.
    return token_count(base) + token_count(cache_write or 0) + token_count(cache_read or 0)


def _completion(message: Any) -> Completion:
    """A Messages API reply (decoded JSON) as a Completion; MALFORMED when it lacks a field the
    SDK's Message would have lacked too (content, usage and its counts). A block without a type
    is skipped and a missing model is None, as the SDK's Message had them."""
    try:
        text = "".join(block["text"] for block in message["content"] if block.get("type") == "text")
        usage = message["usage"]
        return Completion(
            text=text,
            model=message.get("model"),
            input_tokens=_input_total(
                usage["input_tokens"],
                usage.get("cache_creation_input_tokens"),
                usage.get("cache_read_input_tokens"),
            ),
            output_tokens=token_count(usage["output_tokens"]),
            stop_reason=message.get("stop_reason"),
            provider=ANTHROPIC,
        )
    except (AttributeError, TypeError, KeyError) as exc:
        raise ProviderError(ANTHROPIC, ProviderErrorKind.MALFORMED) from exc
