"""A circuit breaker per provider: while a provider fails most calls, stop calling it for a while.

Rules:
- Closed: every call goes through. Each attempt's outcome is kept for `window_seconds`; once at
  least `min_calls` attempts are in the window and at least `failure_rate` of them failed, the
  breaker opens. Only failures that say the provider cannot serve count (connection errors,
  timeouts, 408/409/429/5xx/529: `retry.is_retryable`); the caller's own 4xx is a success here,
  since the provider answered.
- Open: calls fail fast (ProviderError UNAVAILABLE, `retry_after` = the cool-down left) for
  `open_seconds`, without reaching the provider.
- Half-open: after the cool-down, up to `probes` calls go through at once; the first success
  closes the breaker (with an empty window), any failure opens it again for another cool-down.
  A probe that never reports (its caller went away) frees its slot after another cool-down.

State is per process (each gateway worker judges the provider from its own calls): a breaker is
a local guess about a remote service, and a wrong guess costs one cool-down.
"""

from __future__ import annotations

import enum
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from gateway_service.metrics import BREAKER_STATE
from gateway_service.providers.errors import ProviderError, ProviderErrorKind


class BreakerState(enum.IntEnum):
    """The gauge's values: 0 closed, 1 half-open, 2 open."""

    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


@dataclass(frozen=True, slots=True)
class BreakerPolicy:
    failure_rate: float = 0.5
    min_calls: int = 10
    window_seconds: float = 30.0
    open_seconds: float = 30.0
    probes: int = 1


class CircuitBreaker:
    def __init__(
        self,
        provider: str,
        policy: BreakerPolicy | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.provider = provider
        self.policy = policy or BreakerPolicy()
        self._clock = clock
        self._outcomes: deque[tuple[float, bool]] = deque()  # (when, failed)
        self._failures = 0
        self._state = BreakerState.CLOSED
        self._opened_at = 0.0
        self._probes_out = 0
        self._probes_since = 0.0
        self._publish()

    @property
    def state(self) -> BreakerState:
        """The state now (an open breaker whose cool-down is over reads as half-open)."""
        if self._state is BreakerState.OPEN and self.cool_down_left() <= 0:
            self._to(BreakerState.HALF_OPEN)
            self._probes_out = 0
            self._probes_since = self._clock()
        return self._state

    def cool_down_left(self) -> float:
        if self._state is not BreakerState.OPEN:
            return 0.0
        return max(0.0, self._opened_at + self.policy.open_seconds - self._clock())

    def admit(self) -> None:
        """Lets one attempt through, or raises the fast failure of an open breaker."""
        state = self.state
        if state is BreakerState.CLOSED:
            return
        if state is BreakerState.HALF_OPEN:
            now = self._clock()
            if now - self._probes_since >= self.policy.open_seconds:
                self._probes_out, self._probes_since = 0, now  # lost probes: free their slots
            if self._probes_out < self.policy.probes:
                self._probes_out += 1
                return
            wait = max(0.0, self._probes_since + self.policy.open_seconds - now)
        else:
            wait = self.cool_down_left()
        raise ProviderError(
            self.provider,
            ProviderErrorKind.UNAVAILABLE,
            "provider unavailable: too many recent failures, not calling it for now",
            retry_after=max(wait, 0.001),
        )

    def record(self, failed: bool) -> None:
        """One attempt's outcome (`failed`: a failure that counts, see the module rules)."""
        state = self.state
        now = self._clock()
        if state is BreakerState.HALF_OPEN:
            self._probes_out = max(0, self._probes_out - 1)
            if failed:
                self._open(now)
            else:
                self._outcomes.clear()
                self._failures = 0
                self._to(BreakerState.CLOSED)
            return
        if state is BreakerState.OPEN:
            return  # an attempt admitted before the breaker opened: already judged
        self._outcomes.append((now, failed))
        self._failures += failed
        horizon = now - self.policy.window_seconds
        while self._outcomes and self._outcomes[0][0] <= horizon:
            _, old_failed = self._outcomes.popleft()
            self._failures -= old_failed
        calls = len(self._outcomes)
        enough = calls >= self.policy.min_calls
        if failed and enough and self._failures >= self.policy.failure_rate * calls:
            self._open(now)

    def _open(self, now: float) -> None:
        self._opened_at = now
        self._outcomes.clear()
        self._failures = 0
        self._to(BreakerState.OPEN)

    def _to(self, state: BreakerState) -> None:
        self._state = state
        self._publish()

    def _publish(self) -> None:
        BREAKER_STATE.labels(self.provider).set(int(self._state))
