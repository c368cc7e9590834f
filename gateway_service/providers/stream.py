"""The stream wrapper both providers share: SDK events in, text deltas and usage out.

Usage rule (what `usage` reports, and what the gateway settles):
- the provider's own figures once its final usage event arrived (`estimated=False`);
- zero if the provider never accepted the request (no HTTP 200: nothing was generated);
- otherwise an estimate of what was consumed: input tokens as reported at the start of the stream
  (Anthropic's message_start) or else ceil(prompt chars / 4); output tokens the largest of what
  the provider reported so far, the number of deltas received, and ceil(delta chars / 4).

Retries (`retry`): a failure before the first item reached the caller (while opening, or after a
200 but before any text) is tried again on a fresh request; the usage the failed attempt had
consumed by the rule above is the platform's loss (counted, never charged), and `usage` then
describes the new attempt only. From the first item on, a failure ends the stream.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from contextlib import suppress
from types import TracebackType
from typing import Any, Protocol, Self

from gateway_service.metrics import ProviderCall
from gateway_service.providers.base import (
    CompletionRequest,
    StreamEnd,
    StreamItem,
    TextDelta,
    Usage,
    estimate_input_tokens,
    estimate_output_tokens,
)
from gateway_service.providers.errors import ProviderError, ProviderErrorKind, map_sdk_error
from gateway_service.providers.retry import Resilience


class SdkStream(Protocol):
    async def __anext__(self) -> Any: ...

    async def close(self) -> None: ...


class ProviderStream(ABC):
    def __init__(
        self, provider: str, request: CompletionRequest, resilience: Resilience | None = None
    ) -> None:
        self.provider = provider
        self._request = request
        self._resilience = resilience  # None: one attempt
        self._finished = False  # StreamEnd delivered, or failed, or closed
        self._delivered = False  # an item reached the caller: no retry from here on
        self._sdk: SdkStream | None = None
        self._call: ProviderCall | None = None  # timed from the request's sending
        self._fresh()

    def _fresh(self) -> None:
        """The state of an attempt that has not been sent yet."""
        self.model = self._request.model
        self.stop_reason: str | None = None
        self._opened = False  # the provider answered 200: from here on, tokens are consumed
        self._deltas = 0
        self._chars = 0
        # Subclasses fill these from provider events; _final once the closing usage arrived.
        self._input_tokens: int | None = None
        self._output_tokens: int | None = None
        self._final = False

    @abstractmethod
    async def _open(self) -> SdkStream:
        """Send the request; return the SDK's event stream."""

    @abstractmethod
    def _on_event(self, event: Any) -> str | None:
        """Record what the event says about usage and stop reason; return its text, if any."""

    @property
    def usage(self) -> Usage:
        if self._final and self._input_tokens is not None and self._output_tokens is not None:
            return Usage(self._input_tokens, self._output_tokens, estimated=False)
        if not self._opened:
            return Usage(0, 0, estimated=False)
        input_tokens = self._input_tokens
        if input_tokens is None:
            input_tokens = estimate_input_tokens(self._request)
        output_tokens = max(
            self._output_tokens or 0, estimate_output_tokens(self._deltas, self._chars)
        )
        return Usage(input_tokens, output_tokens, estimated=True)

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> StreamItem:
        if self._finished:
            raise StopAsyncIteration
        try:
            item = await self._advance()
        except StopAsyncIteration:
            raise
        except ProviderError as exc:
            self._called(exc.kind.value)
            await self.aclose()
            raise
        except Exception as exc:
            error = map_sdk_error(self.provider, exc)
            if error is None:
                self._called("error")
                await self.aclose()
                raise
        except BaseException:  # cancelled: the HTTP stream must not outlive the consumer
            await self.aclose()
            raise
        else:
            if self._call is not None:
                if isinstance(item, TextDelta):
                    self._call.first_token()
                else:
                    self._called("ok")
            return item
        # Raised outside the except block so the SDK exception (which may quote the provider's
        # body or hold the request headers) is not chained onto ours.
        self._called(error.kind.value)
        await self.aclose()
        raise error

    def _called(self, outcome: str) -> None:
        call, self._call = self._call, None
        if call is not None:
            call.done(outcome)

    async def _advance(self) -> StreamItem:
        if self._delivered or self._resilience is None:
            return await self._next_item()
        failures = 0
        loop = asyncio.get_running_loop()
        while True:
            self._resilience.admit(not self._request.api_key)
            error: ProviderError | None = None
            sent = loop.time()
            try:
                item = await self._next_item()
            except ProviderError as exc:
                error = exc
            except StopAsyncIteration:
                raise
            except Exception as exc:
                error = map_sdk_error(self.provider, exc)
                if error is None:
                    raise
            if error is None:
                self._delivered = True
                self._resilience.succeeded(not self._request.api_key)
                return item
            # Outside the except block: the SDK exception is not chained onto ours.
            failures += 1
            lost = self.usage.total
            self._called(error.kind.value)
            sdk, self._sdk = self._sdk, None
            # Forgotten before anything awaits: a call cut or cancelled while the failed
            # attempt closes must not be charged for it (it is the platform's loss).
            self._fresh()
            if sdk is not None:
                with suppress(Exception):
                    await sdk.close()
            if not await self._resilience.again(
                error,
                failures,
                lost_tokens=lost,
                counted=not self._request.api_key,
                took=loop.time() - sent,
            ):
                raise error

    async def _next_item(self) -> StreamItem:
        if self._sdk is None:
            self._call = ProviderCall(self.provider, self.model)
            self._sdk = await self._open()
            self._opened = True
        while True:
            try:
                event = await self._sdk.__anext__()
            except StopAsyncIteration:
                return await self._end()
            try:
                text = self._on_event(event)
            except (AttributeError, TypeError, KeyError, IndexError) as exc:
                raise ProviderError(self.provider, ProviderErrorKind.MALFORMED) from exc
            if text:
                self._deltas += 1
                self._chars += len(text)
                return TextDelta(text)

    async def _end(self) -> StreamEnd:
        self._finished = True
        if not self._final or self._input_tokens is None or self._output_tokens is None:
            raise ProviderError(
                self.provider,
                ProviderErrorKind.MALFORMED,
                "provider stream ended without its final usage event",
            )
        return StreamEnd(self.model, self._input_tokens, self._output_tokens, self.stop_reason)

    async def aclose(self) -> None:
        """Close the HTTP stream (idempotent). Iteration stops; `usage` stays readable."""
        self._finished = True
        self._called("abandoned")  # closed before its end (a call cut or a client gone)
        sdk, self._sdk = self._sdk, None
        if sdk is not None:
            with suppress(Exception):
                await sdk.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()
