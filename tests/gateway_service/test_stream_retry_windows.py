"""The window between a failed stream attempt and its retry: whatever cuts the call there (the
caller leaving, the hold's lease) must find nothing consumed, because a failed attempt is the
platform's loss, never the caller's charge. A slow connection teardown cannot be timed with the
real SDK, so the SDK's event stream is a stand-in here (the only one)."""

from __future__ import annotations

import asyncio
from typing import Any

from gateway_service.providers.base import CompletionRequest
from gateway_service.providers.errors import ProviderError, ProviderErrorKind, parse_retry_after
from gateway_service.providers.retry import Resilience, RetryPolicy, call_deadline
from gateway_service.providers.stream import ProviderStream


class _OpenedThenFails:
    """An attempt the provider answered 200, that fails before any text; closing it is slow."""

    def __init__(self, closing: asyncio.Event) -> None:
        self.closing = closing

    async def __anext__(self) -> Any:
        raise ProviderError("sim", ProviderErrorKind.UNAVAILABLE, status_code=503)

    async def close(self) -> None:
        self.closing.set()
        await asyncio.sleep(3600)


class _Stream(ProviderStream):
    def __init__(self, request: CompletionRequest, closing: asyncio.Event) -> None:
        policy = RetryPolicy(max_attempts=3, base_seconds=0, max_seconds=0)
        super().__init__("sim", request, Resilience("sim", policy))
        self.closing = closing

    async def _open(self) -> Any:
        return _OpenedThenFails(self.closing)

    def _on_event(self, event: Any) -> str | None:
        raise AssertionError("no event is ever read")


async def test_a_failed_attempt_is_forgotten_before_it_is_closed() -> None:
    closing = asyncio.Event()
    stream = _Stream(CompletionRequest(content="x" * 400, model="m", max_tokens=10), closing)
    reading = asyncio.create_task(anext(stream))
    await asyncio.wait_for(closing.wait(), 5)
    # Cut here, the call is metered by `usage`: the failed attempt must not be in it.
    assert stream.usage.total == 0
    reading.cancel()
    await asyncio.gather(reading, return_exceptions=True)


def test_a_retry_after_that_is_no_number_of_seconds_is_none() -> None:
    assert parse_retry_after(None, "inf") is None
    assert parse_retry_after("nan", None) is None
    assert parse_retry_after("1e999", "7") == 7
    assert parse_retry_after(None, "86400") == 3600  # passed on as at most an hour
    assert parse_retry_after("250", None) == 0.25


async def test_no_retry_that_could_not_end_before_the_deadline() -> None:
    """After an attempt that took T (a timeout: the provider's whole timeout), a retry is made
    only if its wait plus another T still ends before the call's deadline; otherwise the
    failure is the answer at once (and a fallback chain may serve the call), instead of an
    attempt the hold's lease would cut."""
    resilience = Resilience("sim", RetryPolicy(max_attempts=3, base_seconds=0, max_seconds=0))
    timeout = ProviderError("sim", ProviderErrorKind.TIMEOUT)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    with call_deadline(lambda: deadline):
        assert await resilience.again(timeout, 1, took=4)
        assert not await resilience.again(timeout, 1, took=11)
