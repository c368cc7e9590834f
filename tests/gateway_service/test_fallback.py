"""Fallback chains as configured (PROVIDER_FALLBACKS), and which failures hand a call on."""

from __future__ import annotations

from dataclasses import replace

import pytest

from gateway_service.core import _Plan
from gateway_service.metering import hold_estimate
from gateway_service.providers import PROVIDER_NAMES, CompletionRequest
from gateway_service.providers.errors import ProviderError, ProviderErrorKind
from gateway_service.providers.fallback import Fallbacks, Target, falls_back


def parse(text: str) -> Fallbacks:
    return Fallbacks.parse(text, PROVIDER_NAMES)


def test_an_exact_head_wins_over_its_providers_wildcard() -> None:
    chains = parse(
        " anthropic/claude-opus-4 > openai/gpt-4o > openai/gpt-4o-mini ;"
        "ANTHROPIC/* > openai/gpt-4o-mini;"
    )
    assert chains.after("anthropic", "claude-opus-4") == (
        Target("openai", "gpt-4o"),
        Target("openai", "gpt-4o-mini"),
    )
    assert chains.after("anthropic", "claude-haiku-4-5") == (Target("openai", "gpt-4o-mini"),)
    assert chains.after("openai", "gpt-4o") == ()
    assert not parse("")
    assert not parse(" ; ")


def test_a_wildcard_never_falls_back_to_the_call_itself() -> None:
    chains = parse("openai/* > openai/gpt-4o-mini > anthropic/claude-haiku-4-5")
    assert chains.after("openai", "gpt-4o-mini") == (Target("anthropic", "claude-haiku-4-5"),)


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("anthropic/claude", "at least one fallback"),
        ("anthropic > openai/gpt-4o", "expected provider/model"),
        ("anthropic/ > openai/gpt-4o", "expected provider/model"),
        ("mistral/large > openai/gpt-4o", "unknown provider"),
        ("anthropic/* > openai/*", "must name its model"),
        ("anthropic/a > openai/b; anthropic/a > openai/c", "already has a chain"),
        ("anthropic/a > openai/b > openai/b", "appears twice"),
    ],
)
def test_bad_chains_say_what_is_wrong(text: str, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        parse(text)


@pytest.mark.parametrize(
    ("error", "hands_on"),
    [
        (ProviderError("a", ProviderErrorKind.UNAVAILABLE, status_code=529), True),
        (ProviderError("a", ProviderErrorKind.RATE_LIMITED, status_code=429), True),
        (ProviderError("a", ProviderErrorKind.UNAVAILABLE), True),  # connection dropped
        (ProviderError("a", ProviderErrorKind.TIMEOUT), True),
        (ProviderError("a", ProviderErrorKind.AUTH, status_code=401), True),  # platform key
        (ProviderError("a", ProviderErrorKind.INVALID_REQUEST, status_code=400), False),
        (ProviderError("a", ProviderErrorKind.MALFORMED), False),  # it served (and billed) it
    ],
)
def test_which_failures_hand_a_call_on(error: ProviderError, hands_on: bool) -> None:
    assert falls_back(error) is hands_on


def test_the_hold_covers_the_candidate_that_can_use_the_most() -> None:
    small = CompletionRequest(content="hello", model="claude-haiku-4-5", max_tokens=100)
    large = replace(small, model="gpt-4o", max_tokens=400)
    plan = _Plan("anthropic", small, False, "u1", fallbacks=(("openai", large),))
    assert plan.hold_tokens == hold_estimate(large) > hold_estimate(small)
    served = plan.candidates[1]
    assert (served.provider_name, served.request, served.user_id) == ("openai", large, "u1")
    assert served.fallbacks == ()
