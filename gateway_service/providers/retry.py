"""Provider attempts made again after a failure that says "not now", never one billed twice.

Rules (the SDKs make one attempt each, `max_retries=0`; this is the gateway's only retry):
- Retried: connection errors and timeouts, and HTTP 408, 409, 429, 500, 502, 503, 504, 529.
  Never the caller's own fault or a refused key (400, 401, 403, 404, ...), never a malformed
  answer (the provider served it), for platform and BYOK calls alike.
- Only before anything reached the caller: a unary call until its answer; a stream while it is
  being opened and until its first text delta (a stream cut after that is not retried, and is
  settled for what it delivered). The call's hold is made once, before the first attempt, and
  only the attempt that answers is charged; usage a failed attempt had already reported is
  counted in `rpcai_provider_retry_lost_tokens_total` (the platform's loss), never charged.
- Waits: the provider's `retry-after-ms` / `retry-after` when given, else full jitter
  (uniform in [0, min(max, base * 2^(n-1))] before attempt n+1). A retry is not made when its
  wait plus an attempt as long as the failed one would end past the call's deadline (the hold
  lease's cut, see `call_deadline`): after a timeout, a second one would only be cut. The last
  failure is the answer (with the provider's wait as its Retry-After), and a fallback chain
  may still serve the call. A call without a deadline waits at
  most `max_seconds`.
- Every attempt asks the provider's circuit breaker first and reports its outcome to it.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

from gateway_service.metrics import PROVIDER_LOST_TOKENS, PROVIDER_RETRIES
from gateway_service.providers.breaker import BreakerPolicy, CircuitBreaker
from gateway_service.providers.errors import ProviderError, ProviderErrorKind

RETRYABLE_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504, 529})

# Event-loop time by which the running call must be over (None: no deadline). Set around a call
# by its hold lease (`metering.HoldLease.run`); read as a function because the lease's cut
# moves later each time the hold is extended.
_DEADLINE: ContextVar[Callable[[], float] | None] = ContextVar(
    "provider_call_deadline", default=None
)


@contextmanager
def call_deadline(deadline: Callable[[], float]) -> Iterator[None]:
    """Provider calls made inside this block never wait for a retry past `deadline()`."""
    token = _DEADLINE.set(deadline)
    try:
        yield
    finally:
        _DEADLINE.reset(token)


def is_retryable(error: ProviderError) -> bool:
    """A failure that says the provider cannot serve now (and that a breaker counts)."""
    if error.status_code is not None:
        return error.status_code in RETRYABLE_STATUS
    # No HTTP status: a connection refused or dropped, a timeout, an error event in a stream.
    return error.kind in (ProviderErrorKind.UNAVAILABLE, ProviderErrorKind.TIMEOUT)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    max_attempts: int = 3
    base_seconds: float = 0.25
    max_seconds: float = 4.0

    def backoff(self, failures: int, draw: float) -> float:
        """Full jitter before attempt `failures + 1`; `draw` uniform in [0, 1)."""
        return draw * min(self.max_seconds, self.base_seconds * 2.0 ** (failures - 1))


class Resilience:
    """One provider's retry policy and circuit breaker (one per provider per process)."""

    def __init__(
        self,
        provider: str,
        policy: RetryPolicy | None = None,
        breaker: BreakerPolicy | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        draw: Callable[[], float] = random.random,
    ) -> None:
        self.provider = provider
        self.policy = policy or RetryPolicy()
        self.breaker = CircuitBreaker(provider, breaker, clock)
        self.draw = draw

    # `counted`: the attempt uses the platform's key. A BYOK attempt (the caller's own key)
    # neither passes the breaker nor moves it: a caller whose key is rate-limited or revoked
    # must not be able to open the platform's breaker and stop every subscription call.

    def admit(self, counted: bool = True) -> None:
        """Before each attempt: raises the breaker's fast failure while it is open."""
        if counted:
            self.breaker.admit()

    def succeeded(self, counted: bool = True) -> None:
        if counted:
            self.breaker.record(failed=False)

    async def again(
        self,
        error: ProviderError,
        failures: int,
        lost_tokens: int = 0,
        counted: bool = True,
        took: float = 0.0,
    ) -> bool:
        """After attempt number `failures` failed with `error` (after `took` seconds) before
        anything reached the caller: reports it, and waits before the next attempt. False: no
        next attempt (the caller raises `error`)."""
        retryable = is_retryable(error)
        if counted:
            self.breaker.record(failed=retryable)
        if lost_tokens:
            PROVIDER_LOST_TOKENS.labels(self.provider).inc(lost_tokens)
        if not retryable or failures >= self.policy.max_attempts:
            return False
        wait = error.retry_after
        if wait is None:
            wait = self.policy.backoff(failures, self.draw())
        loop = asyncio.get_running_loop()
        deadline = _DEADLINE.get()
        if deadline is None:
            if wait > self.policy.max_seconds:
                return False  # a call with no deadline (unary BYOK) waits no longer than this
        elif loop.time() + wait + took >= deadline():
            # The next attempt could not end in time if it went as this one did (a timeout
            # would be cut by the lease instead): the failure is the answer, and a fallback
            # chain may still serve the call.
            return False
        PROVIDER_RETRIES.labels(self.provider, error.kind.value).inc()
        await asyncio.sleep(wait)
        return True
