"""The rate limits and monthly quotas, from one configuration.

Limits apply per caller: a signed-in caller by user id (per user type: subscription callers by
the tier in their JWT's `tier` claim, "default" when it names no configured tier; BYOK callers
apart), a public caller (no JWT, bringing a provider key) by client address and by a hash of the
key. Each limit is a number of requests per minute, of provider tokens per minute, and of calls
in flight at once; 0 means unlimited. Subscription tiers may also set a monthly quota (tokens
charged per calendar month), unless the JWT's `quota` claim sets one.

The defaults protect a fresh install: public callers are limited, and so are failed key attempts
(someone testing stolen keys through us) and everyone's calls in flight.

`RATE_LIMITS` (JSON) or `RATE_LIMITS_FILE` (a .json or .toml file) overrides any part:

    {"public": {"requests_per_minute": 30, "calls_in_flight": 4},
     "byok": {"requests_per_minute": 1200},
     "subscription": {"default": {"calls_in_flight": 16},
                      "pro": {"requests_per_minute": 600, "tokens_per_minute": 200000,
                              "monthly_quota": 5000000}},
     "failed_key_attempts_per_minute": 10}
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

DEFAULT_TIER = "default"


@dataclass(frozen=True, slots=True)
class Limit:
    requests_per_minute: int = 0
    tokens_per_minute: int = 0
    calls_in_flight: int = 0
    # Subscription tiers only: tokens charged per calendar month (the JWT's quota claim wins).
    monthly_quota: int = 0

    @property
    def unlimited(self) -> bool:
        return not (self.requests_per_minute or self.tokens_per_minute or self.calls_in_flight)


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    public: Limit = Limit(requests_per_minute=30, calls_in_flight=4)
    byok: Limit = Limit(requests_per_minute=1200, calls_in_flight=16)
    subscription: Mapping[str, Limit] = field(
        default_factory=lambda: {DEFAULT_TIER: Limit(requests_per_minute=600, calls_in_flight=16)}
    )
    # Provider keys refused (401/403) for public callers, per client address.
    failed_key_attempts_per_minute: int = 10

    def for_tier(self, tier: str | None) -> Limit:
        return self.subscription.get(tier or DEFAULT_TIER) or self.subscription[DEFAULT_TIER]


def _limit(section: str, raw: object, base: Limit) -> Limit:
    if not isinstance(raw, dict):
        raise ValueError(f"rate limits: {section} must be a table of limits")
    known = {f.name for f in fields(Limit)}
    changes: dict[str, int] = {}
    for name, value in raw.items():
        if name not in known:
            raise ValueError(f"rate limits: {section}.{name} is not a limit ({', '.join(known)})")
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"rate limits: {section}.{name} must be a whole number >= 0")
        changes[name] = value
    return replace(base, **changes)


def parse_limits(raw: Mapping[str, Any]) -> LimitsConfig:
    """The defaults, overridden by `raw` (the parsed JSON or TOML)."""
    defaults = LimitsConfig()
    unknown = set(raw) - {"public", "byok", "subscription", "failed_key_attempts_per_minute"}
    if unknown:
        raise ValueError(f"rate limits: unknown section(s) {', '.join(sorted(unknown))}")
    tiers = dict(defaults.subscription)
    subscription = raw.get("subscription", {})
    if not isinstance(subscription, dict):
        raise ValueError("rate limits: subscription must be a table of tiers")
    # The default tier first: every other tier starts from it, whatever order they are written in.
    for tier, limits in sorted(subscription.items(), key=lambda item: item[0] != DEFAULT_TIER):
        tiers[str(tier)] = _limit(f"subscription.{tier}", limits, tiers.get(DEFAULT_TIER, Limit()))
    attempts = raw.get("failed_key_attempts_per_minute", defaults.failed_key_attempts_per_minute)
    if not isinstance(attempts, int) or isinstance(attempts, bool) or attempts < 0:
        raise ValueError("rate limits: failed_key_attempts_per_minute must be a whole number")
    return LimitsConfig(
        public=_limit("public", raw.get("public", {}), defaults.public),
        byok=_limit("byok", raw.get("byok", {}), defaults.byok),
        subscription=tiers,
        failed_key_attempts_per_minute=attempts,
    )


def load_limits(inline: str, file: Path | None) -> LimitsConfig:
    """From RATE_LIMITS (JSON) or RATE_LIMITS_FILE (.json or .toml); the defaults without."""
    if file is not None:
        text = file.read_text()
        raw = tomllib.loads(text) if file.suffix == ".toml" else json.loads(text)
    elif inline.strip():
        raw = json.loads(inline)
    else:
        return LimitsConfig()
    if not isinstance(raw, dict):
        raise ValueError("rate limits: the configuration must be a table")
    return parse_limits(raw)


NO_LIMIT = Limit()
# No limits at all (a Gateway built without a configuration; tests that are not about limits).
UNLIMITED = LimitsConfig(
    public=NO_LIMIT,
    byok=NO_LIMIT,
    subscription={DEFAULT_TIER: NO_LIMIT},
    failed_key_attempts_per_minute=0,
)
