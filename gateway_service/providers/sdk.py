"""What both providers do the same way around their SDK client: one long-lived client per
process, the caller's key on the shared connection pool for BYOK calls, SDK errors mapped to one
ProviderError without chaining the SDK exception, and retries with a circuit breaker
(`retry.Resilience`: which failures are tried again, how long to wait, when to stop)."""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from typing import Generic, TypeVar

import anthropic
import openai

from gateway_service.metrics import ProviderCall
from gateway_service.providers.base import Completion, CompletionRequest
from gateway_service.providers.errors import ProviderError, ProviderErrorKind, map_sdk_error
from gateway_service.providers.retry import Resilience

Client = TypeVar("Client", anthropic.AsyncAnthropic, openai.AsyncOpenAI)


class SdkProvider(ABC, Generic[Client]):
    name: str
    _client: Client

    def __init__(
        self,
        client: Client,
        has_platform_key: bool,
        default_model: str,
        resilience: Resilience | None = None,
    ) -> None:
        self.default_model = default_model
        self._client = client
        self._has_platform_key = has_platform_key
        self.resilience = resilience or Resilience(self.name)

    def client_for(self, request: CompletionRequest) -> Client:
        """The SDK client for this call: the caller's key on the shared pool, or the platform's."""
        if request.api_key:
            # `with_options` builds a new client over the same HTTP client (same pool), and the
            # key travels as client auth, outside the request options the SDK logs at DEBUG.
            return self._client.with_options(api_key=request.api_key)
        if not self._has_platform_key:
            raise ProviderError(self.name, ProviderErrorKind.AUTH, "no platform API key configured")
        return self._client

    @abstractmethod
    async def _create(self, client: Client, request: CompletionRequest) -> Completion:
        """One non-streaming call through the SDK."""

    async def generate(self, request: CompletionRequest) -> Completion:
        """The answer of the first attempt that succeeds (see `retry` for which are made)."""
        client = self.client_for(request)
        platform_key = not request.api_key  # BYOK attempts leave the breaker alone
        failures = 0
        loop = asyncio.get_running_loop()
        while True:
            self.resilience.admit(platform_key)
            sent = loop.time()
            try:
                completion = await self._attempt(client, request)
            except ProviderError as error:
                failures += 1
                took = loop.time() - sent
                if not await self.resilience.again(
                    error, failures, counted=platform_key, took=took
                ):
                    raise
                continue
            self.resilience.succeeded(platform_key)
            return completion

    async def _attempt(self, client: Client, request: CompletionRequest) -> Completion:
        call = ProviderCall(self.name, request.model)
        try:
            completion = await self._create(client, request)
        except ProviderError as exc:
            call.done(exc.kind.value)
            raise
        except Exception as exc:
            error = map_sdk_error(self.name, exc)
            if error is None:
                call.done("error")
                raise
        except BaseException:
            call.done("cancelled")
            raise
        else:
            call.done("ok")
            return completion
        call.done(error.kind.value)
        raise error  # outside the except block: the SDK exception is not chained

    async def aclose(self) -> None:
        await self._client.close()
