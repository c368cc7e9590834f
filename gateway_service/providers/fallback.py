"""Fallback chains: the provider/model pairs a subscription call is tried on, in order, when the
one it asked for cannot serve it now.

Configured as `PROVIDER_FALLBACKS`, chains separated by `;`, each `head > target > target ...`
where a pair is `provider/model`; the head's model may be `*` (any model of that provider):

    anthropic/claude-sonnet-4-5 > openai/gpt-4o; anthropic/* > openai/gpt-4o-mini

A call's chain is the one whose head names its provider and model exactly, else its provider's
`*` chain. Rules (the gateway applies them, `core.Gateway`):
- Only a failure that says "cannot serve now" moves on (`falls_back`): what retries would retry
  (after its own retries ran out), an open breaker, or the platform key missing or refused.
  The caller's own fault (a 400) is the same on every provider: it is the answer.
- Only before anything reached the caller (a stream's first delta), as for retries.
- Only calls on the platform's key: a BYOK key belongs to one provider.
- One hold for the whole chain, sized for the candidate that can use the most tokens; only the
  candidate that answered is charged, for what it reported, and the answer names it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from gateway_service.providers.errors import ProviderError, ProviderErrorKind
from gateway_service.providers.retry import is_retryable

ANY_MODEL = "*"


@dataclass(frozen=True, slots=True)
class Target:
    provider: str
    model: str

    def __str__(self) -> str:
        return f"{self.provider}/{self.model}"


def falls_back(error: ProviderError) -> bool:
    """Whether a failure of one candidate lets the next one try."""
    return is_retryable(error) or error.kind is ProviderErrorKind.AUTH


class Fallbacks:
    """The configured chains, by head."""

    def __init__(self, chains: Mapping[Target, tuple[Target, ...]] | None = None) -> None:
        self._chains = dict(chains or {})

    def __bool__(self) -> bool:
        return bool(self._chains)

    def after(self, provider: str, model: str) -> tuple[Target, ...]:
        """The candidates to try, in order, after `provider`/`model` (none: no fallback)."""
        chain = self._chains.get(Target(provider, model))
        if chain is None:
            chain = self._chains.get(Target(provider, ANY_MODEL), ())
        # A candidate equal to the call itself (a `*` head) would only fail the same way again.
        return tuple(t for t in chain if t != Target(provider, model))

    @classmethod
    def parse(cls, text: str, providers: Iterable[str]) -> Fallbacks:
        """The chains `text` describes (see the module doc); ValueError saying what is wrong."""
        known = frozenset(providers)
        chains: dict[Target, tuple[Target, ...]] = {}
        for raw in text.split(";"):
            if not raw.strip():
                continue
            pairs = [_pair(part, known) for part in raw.split(">")]
            if len(pairs) < 2:
                raise ValueError(f"chain {raw.strip()!r}: give at least one fallback after '>'")
            head, *rest = pairs
            if any(t.model == ANY_MODEL for t in rest):
                raise ValueError(f"chain {raw.strip()!r}: a fallback must name its model")
            if head in chains:
                raise ValueError(f"chain {raw.strip()!r}: {head} already has a chain")
            if len(set(pairs)) != len(pairs):
                raise ValueError(f"chain {raw.strip()!r}: a pair appears twice")
            chains[head] = tuple(rest)
        return cls(chains)


def _pair(text: str, known: frozenset[str]) -> Target:
    provider, slash, model = text.strip().partition("/")
    provider, model = provider.strip().lower(), model.strip()
    if not slash or not model:
        raise ValueError(f"{text.strip()!r}: expected provider/model")
    if provider not in known:
        raise ValueError(f"{text.strip()!r}: unknown provider (expected one of {sorted(known)})")
    return Target(provider, model)
