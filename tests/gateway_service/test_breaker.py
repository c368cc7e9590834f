"""The circuit breaker as a unit, on an injected clock: when it opens, how long it stays open,
what a half-open breaker lets through, and what closes or reopens it."""

from __future__ import annotations

import pytest

from gateway_service.providers.breaker import BreakerPolicy, BreakerState, CircuitBreaker
from gateway_service.providers.errors import ProviderError, ProviderErrorKind
from gateway_service.providers.retry import RetryPolicy, is_retryable

POLICY = BreakerPolicy(failure_rate=0.5, min_calls=10, window_seconds=30, open_seconds=20)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def breaker() -> tuple[CircuitBreaker, Clock]:
    clock = Clock()
    return CircuitBreaker("anthropic", POLICY, clock), clock


def state(b: CircuitBreaker) -> BreakerState:
    return b.state  # read afresh each time (mypy would narrow the property)


def outcomes(b: CircuitBreaker, failed: int, ok: int) -> None:
    for _ in range(ok):
        b.admit()
        b.record(failed=False)
    for _ in range(failed):
        b.admit()
        b.record(failed=True)


def test_opens_at_the_failure_rate_over_enough_calls_only() -> None:
    b, _ = breaker()
    outcomes(b, failed=9, ok=0)  # 100% failures, but fewer than min_calls
    assert state(b) is BreakerState.CLOSED
    b, _ = breaker()
    outcomes(b, failed=4, ok=6)  # 40% of 10
    assert state(b) is BreakerState.CLOSED
    outcomes(b, failed=1, ok=0)  # 5 of 11: 45%
    assert state(b) is BreakerState.CLOSED
    outcomes(b, failed=1, ok=0)  # 6 of 12: 50%
    assert state(b) is BreakerState.OPEN


def test_old_outcomes_leave_the_window() -> None:
    b, clock = breaker()
    outcomes(b, failed=5, ok=0)
    clock.now += 31  # those failures are now out of the window
    outcomes(b, failed=4, ok=6)
    assert state(b) is BreakerState.CLOSED


def test_open_fails_fast_with_the_cool_down_left_then_half_opens() -> None:
    b, clock = breaker()
    outcomes(b, failed=10, ok=0)
    clock.now += 5
    with pytest.raises(ProviderError) as err:
        b.admit()
    assert err.value.kind is ProviderErrorKind.UNAVAILABLE
    assert err.value.retry_after == pytest.approx(15)
    clock.now += 15
    assert state(b) is BreakerState.HALF_OPEN
    b.admit()  # the probe
    with pytest.raises(ProviderError):
        b.admit()  # one probe at a time
    b.record(failed=False)
    assert state(b) is BreakerState.CLOSED
    outcomes(b, failed=9, ok=0)  # a fresh window: not enough calls to open yet
    assert state(b) is BreakerState.CLOSED


def test_a_failed_probe_reopens_for_a_whole_cool_down() -> None:
    b, clock = breaker()
    outcomes(b, failed=10, ok=0)
    clock.now += 20
    b.admit()
    b.record(failed=True)
    assert state(b) is BreakerState.OPEN
    assert b.cool_down_left() == pytest.approx(20)


def test_a_probe_that_never_reports_frees_its_slot_after_a_cool_down() -> None:
    b, clock = breaker()
    outcomes(b, failed=10, ok=0)
    clock.now += 20
    b.admit()  # its caller goes away: no outcome is ever recorded
    clock.now += 10
    with pytest.raises(ProviderError):
        b.admit()
    clock.now += 10
    b.admit()
    b.record(failed=False)
    assert state(b) is BreakerState.CLOSED


@pytest.mark.parametrize(
    ("status", "kind", "retryable"),
    [
        (None, ProviderErrorKind.UNAVAILABLE, True),  # connection refused or reset
        (None, ProviderErrorKind.TIMEOUT, True),
        (None, ProviderErrorKind.MALFORMED, False),  # the provider answered: it may have billed
        (None, ProviderErrorKind.AUTH, False),  # no platform key
        *((s, ProviderErrorKind.UNAVAILABLE, True) for s in (500, 502, 503, 504, 529)),
        (429, ProviderErrorKind.RATE_LIMITED, True),
        (408, ProviderErrorKind.TIMEOUT, True),
        (409, ProviderErrorKind.INVALID_REQUEST, True),
        *((s, ProviderErrorKind.INVALID_REQUEST, False) for s in (400, 404, 413, 422)),
        *((s, ProviderErrorKind.AUTH, False) for s in (401, 403)),
    ],
)
def test_which_failures_are_retried_and_counted(
    status: int | None, kind: ProviderErrorKind, retryable: bool
) -> None:
    assert is_retryable(ProviderError("openai", kind, status_code=status)) is retryable


def test_full_jitter_backoff_is_capped() -> None:
    policy = RetryPolicy(max_attempts=5, base_seconds=0.25, max_seconds=4)
    assert [policy.backoff(n, 0.999999) for n in (1, 2, 3, 4, 5, 6, 7)] == pytest.approx(
        [0.25, 0.5, 1.0, 2.0, 4.0, 4.0, 4.0], rel=1e-5
    )
    assert policy.backoff(3, 0.0) == 0.0
