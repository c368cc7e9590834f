"""List prices per provider and model, for the estimated USD cost of BYOK calls.

Prices are integer micro-USD per million tokens ($3 / MTok = 3_000_000), standard tier, no cache
or batch discounts. A dated id (claude-sonnet-4-5-20250929, gpt-4o-2024-08-06) or a `-latest`
alias is priced as its base model. Matching is exact after that: gpt-4o-mini is never priced as
gpt-4o, and a model missing here has an unknown cost (None), never zero.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Price:
    input_per_mtok: int  # micro-USD per million input tokens
    output_per_mtok: int  # micro-USD per million output tokens


PRICES: dict[tuple[str, str], Price] = {
    # Anthropic, https://docs.anthropic.com/en/docs/about-claude/pricing
    ("anthropic", "claude-opus-4-6"): Price(5_000_000, 25_000_000),
    ("anthropic", "claude-sonnet-4-6"): Price(3_000_000, 15_000_000),
    ("anthropic", "claude-opus-4-5"): Price(5_000_000, 25_000_000),
    ("anthropic", "claude-sonnet-4-5"): Price(3_000_000, 15_000_000),
    ("anthropic", "claude-haiku-4-5"): Price(1_000_000, 5_000_000),
    ("anthropic", "claude-opus-4-1"): Price(15_000_000, 75_000_000),
    ("anthropic", "claude-opus-4"): Price(15_000_000, 75_000_000),
    ("anthropic", "claude-sonnet-4"): Price(3_000_000, 15_000_000),
    ("anthropic", "claude-3-5-haiku"): Price(800_000, 4_000_000),
    ("anthropic", "claude-3-haiku"): Price(250_000, 1_250_000),
    # OpenAI, https://platform.openai.com/docs/pricing
    ("openai", "gpt-5.1"): Price(1_250_000, 10_000_000),
    ("openai", "gpt-5"): Price(1_250_000, 10_000_000),
    ("openai", "gpt-5-mini"): Price(250_000, 2_000_000),
    ("openai", "gpt-5-nano"): Price(50_000, 400_000),
    ("openai", "gpt-4.1"): Price(2_000_000, 8_000_000),
    ("openai", "gpt-4.1-mini"): Price(400_000, 1_600_000),
    ("openai", "gpt-4.1-nano"): Price(100_000, 400_000),
    ("openai", "gpt-4o"): Price(2_500_000, 10_000_000),
    ("openai", "gpt-4o-mini"): Price(150_000, 600_000),
    ("openai", "o3"): Price(2_000_000, 8_000_000),
    ("openai", "o3-mini"): Price(1_100_000, 4_400_000),
    ("openai", "o4-mini"): Price(1_100_000, 4_400_000),
    ("openai", "o1"): Price(15_000_000, 60_000_000),
}

# claude-...-20250929, gpt-...-2024-08-06, ...-latest
_VERSION_SUFFIX = re.compile(r"-(?:\d{8}|\d{4}-\d{2}-\d{2}|latest)$")


def price_for(provider: str, model: str) -> Price | None:
    provider = provider.strip().lower()
    model = model.strip().lower()
    price = PRICES.get((provider, model))
    if price is None:
        price = PRICES.get((provider, _VERSION_SUFFIX.sub("", model)))
    return price


def estimate_cost_micro_usd(
    provider: str, model: str, input_tokens: int, output_tokens: int
) -> int | None:
    """Cost of a call in integer micro-USD, rounded up; None when the model has no known price."""
    if input_tokens < 0 or output_tokens < 0:
        raise ValueError("token counts must be non-negative")
    price = price_for(provider, model)
    if price is None:
        return None
    scaled = input_tokens * price.input_per_mtok + output_tokens * price.output_per_mtok
    return -(-scaled // 1_000_000)
