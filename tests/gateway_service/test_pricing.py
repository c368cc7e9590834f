"""The pricing table: integer micro-USD, rounded up, unknown models unknown (never free)."""

from __future__ import annotations

from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway_service.pricing import PRICES, estimate_cost_micro_usd, price_for


def test_known_model_cost() -> None:
    # $3 / MTok in, $15 / MTok out: 1000 in + 500 out = $0.003 + $0.0075 = 10_500 micro-USD.
    assert estimate_cost_micro_usd("anthropic", "claude-sonnet-4-5", 1000, 500) == 10_500
    # $0.15 / $0.60: 1M in + 1M out = $0.75.
    assert estimate_cost_micro_usd("openai", "gpt-4o-mini", 1_000_000, 1_000_000) == 750_000


def test_rounds_up_to_the_next_micro_dollar() -> None:
    # One input token of gpt-5-nano costs $0.00000005: a fraction of a micro-dollar, billed as 1.
    assert estimate_cost_micro_usd("openai", "gpt-5-nano", 1, 0) == 1
    assert estimate_cost_micro_usd("openai", "gpt-5-nano", 20, 0) == 1
    assert estimate_cost_micro_usd("openai", "gpt-5-nano", 21, 0) == 2
    assert estimate_cost_micro_usd("anthropic", "claude-haiku-4-5", 0, 0) == 0


@pytest.mark.parametrize(
    ("provider", "dated", "base"),
    [
        ("anthropic", "claude-sonnet-4-5-20250929", "claude-sonnet-4-5"),
        ("anthropic", "claude-haiku-4-5-20251001", "claude-haiku-4-5"),
        ("anthropic", "claude-3-5-haiku-latest", "claude-3-5-haiku"),
        ("openai", "gpt-4o-2024-08-06", "gpt-4o"),
        ("openai", "gpt-4o-mini-2024-07-18", "gpt-4o-mini"),
        ("openai", "o3-mini-2025-01-31", "o3-mini"),
        ("openai", "GPT-4.1", "gpt-4.1"),
    ],
)
def test_dated_ids_and_aliases_priced_as_base(provider: str, dated: str, base: str) -> None:
    assert price_for(provider, dated) == PRICES[(provider, base)]
    assert estimate_cost_micro_usd(provider, dated, 12_345, 678) == estimate_cost_micro_usd(
        provider, base, 12_345, 678
    )


def test_no_prefix_confusion() -> None:
    # A longer id is a different model, never priced as its prefix.
    assert price_for("openai", "gpt-4o-mini") != price_for("openai", "gpt-4o")
    assert price_for("anthropic", "claude-opus-4-5") != price_for("anthropic", "claude-opus-4")
    assert price_for("openai", "gpt-4o-audio-preview") is None
    assert price_for("openai", "o3-pro") is None


@pytest.mark.parametrize(
    ("provider", "model"),
    [
        ("anthropic", "claude-unknown-9"),
        ("openai", "claude-sonnet-4-5"),  # right model, wrong provider
        ("mistral", "gpt-4o"),
        ("openai", ""),
    ],
)
def test_unknown_model_has_unknown_cost(provider: str, model: str) -> None:
    assert estimate_cost_micro_usd(provider, model, 1000, 1000) is None


def test_negative_tokens_refused() -> None:
    with pytest.raises(ValueError, match="non-negative"):
        estimate_cost_micro_usd("openai", "gpt-4o", -1, 0)


def test_table_is_integers() -> None:
    for price in PRICES.values():
        assert isinstance(price.input_per_mtok, int)
        assert isinstance(price.output_per_mtok, int)
        assert price.input_per_mtok > 0
        assert price.output_per_mtok > 0


@given(
    key=st.sampled_from(sorted(PRICES)),
    input_tokens=st.integers(0, 10**12),
    output_tokens=st.integers(0, 10**12),
)
def test_cost_is_exact_ceiling(key: tuple[str, str], input_tokens: int, output_tokens: int) -> None:
    price = PRICES[key]
    exact = Fraction(
        input_tokens * price.input_per_mtok + output_tokens * price.output_per_mtok, 1_000_000
    )
    cost = estimate_cost_micro_usd(key[0], key[1], input_tokens, output_tokens)
    assert isinstance(cost, int)
    assert exact <= cost < exact + 1
