"""OpenAI Chat Completions through the official async SDK."""

from __future__ import annotations

from typing import Any

import openai
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from gateway_service.providers.base import OPENAI, Completion, CompletionRequest, token_count
from gateway_service.providers.errors import ProviderError, ProviderErrorKind
from gateway_service.providers.http_client import provider_http_client
from gateway_service.providers.retry import Resilience
from gateway_service.providers.sdk import SdkProvider
from gateway_service.providers.stream import ProviderStream, SdkStream

DEFAULT_OPENAI_MODEL = "gpt-5-mini"


class OpenAIProvider(SdkProvider[openai.AsyncOpenAI]):
    name = OPENAI

    def __init__(
        self,
        *,
        api_key: str | None,
        base_url: str | None = None,
        timeout_seconds: float = 60.0,
        default_model: str = DEFAULT_OPENAI_MODEL,
        resilience: Resilience | None = None,
    ) -> None:
        # One client (one connection pool) per process. The gateway owns retries (retry.py):
        # max_retries=0.
        # Without a platform key the client still exists so BYOK calls can share its pool; the
        # placeholder is never sent (client_for refuses first).
        client = openai.AsyncOpenAI(
            api_key=api_key or "unset",
            base_url=base_url,
            timeout=timeout_seconds,
            max_retries=0,
            http_client=provider_http_client(),  # a bounded read-ahead: see http_client
        )
        super().__init__(client, bool(api_key), default_model, resilience)

    async def _create(self, client: openai.AsyncOpenAI, request: CompletionRequest) -> Completion:
        return _completion(await client.chat.completions.create(**_params(request)))

    def stream(self, request: CompletionRequest) -> OpenAIStream:
        return OpenAIStream(self, request)


class OpenAIStream(ProviderStream):
    def __init__(self, provider: OpenAIProvider, request: CompletionRequest) -> None:
        super().__init__(provider.name, request, provider.resilience)
        self._provider = provider

    async def _open(self) -> SdkStream:
        client = self._provider.client_for(self._request)
        # include_usage: the stream ends with a chunk whose `usage` covers the whole call.
        chunks: openai.AsyncStream[ChatCompletionChunk] = await client.chat.completions.create(
            **_params(self._request), stream=True, stream_options={"include_usage": True}
        )
        return chunks

    def _on_event(self, chunk: ChatCompletionChunk) -> str | None:
        if chunk.model:
            self.model = chunk.model
        if chunk.usage is not None:
            self._input_tokens = token_count(chunk.usage.prompt_tokens)
            self._output_tokens = token_count(chunk.usage.completion_tokens)
            self._final = True
        text = None
        for choice in chunk.choices:
            if choice.index != 0:
                continue
            if choice.finish_reason:
                self.stop_reason = choice.finish_reason
            text = choice.delta.content
        return text


def _params(request: CompletionRequest) -> dict[str, Any]:
    messages: list[dict[str, str]] = []
    if request.system_prompt:
        messages.append({"role": "system", "content": request.system_prompt})
    messages.append({"role": "user", "content": request.content})
    # max_completion_tokens, not the deprecated max_tokens that reasoning models refuse.
    return {
        "model": request.model,
        "messages": messages,
        "max_completion_tokens": request.max_tokens,
    }


def _completion(completion: ChatCompletion) -> Completion:
    try:
        usage = completion.usage
        if usage is None:
            raise TypeError("no usage")  # nothing to meter with
        choice = completion.choices[0]
        return Completion(
            text=choice.message.content or "",
            model=completion.model,
            input_tokens=token_count(usage.prompt_tokens),
            output_tokens=token_count(usage.completion_tokens),
            stop_reason=choice.finish_reason,
            provider=OPENAI,
        )
    except (AttributeError, TypeError, IndexError) as exc:
        raise ProviderError(OPENAI, ProviderErrorKind.MALFORMED) from exc
