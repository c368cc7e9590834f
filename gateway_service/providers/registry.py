"""Which provider serves a request, and the process-wide set of provider clients."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Literal

from gateway_service.providers.anthropic_provider import DEFAULT_ANTHROPIC_MODEL, AnthropicProvider
from gateway_service.providers.base import ANTHROPIC, OPENAI, Provider
from gateway_service.providers.breaker import BreakerPolicy, BreakerState
from gateway_service.providers.errors import ProviderError, ProviderErrorKind
from gateway_service.providers.fallback import Fallbacks, Target
from gateway_service.providers.openai_provider import DEFAULT_OPENAI_MODEL, OpenAIProvider
from gateway_service.providers.retry import Resilience, RetryPolicy
from gateway_service.providers.sdk import SdkProvider

if TYPE_CHECKING:
    from shared.config import Settings

PROVIDER_NAMES = (ANTHROPIC, OPENAI)
_STATE_NAMES: dict[BreakerState, Literal["closed", "half_open", "open"]] = {
    BreakerState.CLOSED: "closed",
    BreakerState.HALF_OPEN: "half_open",
    BreakerState.OPEN: "open",
}
_OPENAI_MODEL_PREFIXES = ("gpt", "o1", "o3", "o4", "chatgpt")


class UnknownProviderError(ProviderError):
    def __init__(self, detail: str) -> None:
        super().__init__("gateway", ProviderErrorKind.INVALID_REQUEST, detail)


def provider_for(provider: str, model: str, default: str = ANTHROPIC) -> str:
    """The provider named by the request, else the one the model name belongs to.

    Neither given: `default`. A model no provider claims: UnknownProviderError.
    """
    name = provider.strip().lower()
    if name:
        if name not in PROVIDER_NAMES:
            raise UnknownProviderError(
                f"unknown provider {provider[:40]!r}: expected 'anthropic' or 'openai'"
            )
        return name
    family = model.strip().lower()
    if not family:
        return default
    if family.startswith("claude"):
        return ANTHROPIC
    if family.startswith(_OPENAI_MODEL_PREFIXES):
        return OPENAI
    raise UnknownProviderError(
        f"cannot tell the provider of model {model[:80]!r}: set provider to 'anthropic' or 'openai'"
    )


class Providers:
    """One long-lived provider (one SDK client, one connection pool) per provider name, and
    the fallback chains between them."""

    def __init__(
        self,
        providers: Mapping[str, Provider],
        default_provider: str = ANTHROPIC,
        fallbacks: Fallbacks | None = None,
    ) -> None:
        self._providers = dict(providers)
        self.default_provider = default_provider
        self.fallbacks = fallbacks or Fallbacks()

    def fallbacks_of(self, provider: str, model: str) -> tuple[Target, ...]:
        """Who serves a subscription call to `provider`/`model` it cannot serve now, in order
        (only configured providers)."""
        chain = self.fallbacks.after(provider, model)
        return tuple(t for t in chain if t.provider in self._providers)

    def is_open(self, name: str) -> bool:
        """Whether the provider's breaker refuses calls now (a half-open one still takes probes)."""
        resilience = self._resilience(name)
        return resilience is not None and resilience.breaker.state is BreakerState.OPEN

    def resolve(self, provider: str, model: str) -> tuple[Provider, str]:
        """The provider for a request and the model to ask it for (its default when empty)."""
        name = provider_for(provider, model, self.default_provider)
        chosen = self._providers.get(name)
        if chosen is None:
            raise UnknownProviderError(f"provider {name!r} is not configured")
        return chosen, model.strip() or chosen.default_model

    def get(self, name: str) -> Provider:
        return self._providers[name]

    def _resilience(self, name: str) -> Resilience | None:
        provider = self._providers.get(name)
        return provider.resilience if isinstance(provider, SdkProvider) else None

    def use_policies(
        self,
        retry: RetryPolicy,
        breaker: BreakerPolicy,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Each provider retries by `retry` behind a fresh breaker of `breaker` (at start-up,
        from the settings: `policies_from`)."""
        for name, provider in self._providers.items():
            if isinstance(provider, SdkProvider):
                provider.resilience = Resilience(name, retry, breaker, clock=clock)

    def check_open(self, name: str) -> None:
        """Raises the fast failure of the provider's breaker while it is open (before a call
        makes a hold); a half-open breaker lets the call on to ask for a probe slot."""
        resilience = self._resilience(name)
        if resilience is not None and self.is_open(name):
            resilience.breaker.admit()

    def breakers(self) -> dict[str, Literal["closed", "half_open", "open"]]:
        """Each provider's breaker state (`closed`, `half_open`, `open`), for /readyz."""
        states: dict[str, Literal["closed", "half_open", "open"]] = {}
        for name in self._providers:
            resilience = self._resilience(name)
            if resilience is not None:
                states[name] = _STATE_NAMES[resilience.breaker.state]
        return states

    async def aclose(self) -> None:
        for provider in self._providers.values():
            await provider.aclose()


def build_providers(
    *,
    anthropic_api_key: str | None,
    openai_api_key: str | None,
    anthropic_base_url: str | None = None,
    openai_base_url: str | None = None,
    timeout_seconds: float = 60.0,
    anthropic_default_model: str = DEFAULT_ANTHROPIC_MODEL,
    openai_default_model: str = DEFAULT_OPENAI_MODEL,
    default_provider: str = ANTHROPIC,
    retry: RetryPolicy | None = None,
    breaker: BreakerPolicy | None = None,
    fallbacks: Fallbacks | None = None,
) -> Providers:
    """Both providers. Call inside the running event loop and `aclose()` on shutdown.

    `openai_base_url` includes the API version path (`http://host:port/v1`), as for the SDK.
    `retry` and `breaker` apply to each provider (one breaker per provider).
    """

    def resilience(name: str) -> Resilience:
        return Resilience(name, retry, breaker)

    return Providers(
        {
            ANTHROPIC: AnthropicProvider(
                api_key=anthropic_api_key,
                base_url=anthropic_base_url,
                timeout_seconds=timeout_seconds,
                default_model=anthropic_default_model,
                resilience=resilience(ANTHROPIC),
            ),
            OPENAI: OpenAIProvider(
                api_key=openai_api_key,
                base_url=openai_base_url,
                timeout_seconds=timeout_seconds,
                default_model=openai_default_model,
                resilience=resilience(OPENAI),
            ),
        },
        default_provider=default_provider,
        fallbacks=fallbacks,
    )


def policies_from(settings: Settings) -> tuple[RetryPolicy, BreakerPolicy]:
    """The retry and breaker policies the settings describe (for `build_providers`)."""
    retry = RetryPolicy(
        max_attempts=settings.provider_max_attempts,
        base_seconds=settings.provider_retry_base_seconds,
        max_seconds=settings.provider_retry_max_seconds,
    )
    breaker = BreakerPolicy(
        failure_rate=settings.breaker_failure_rate,
        min_calls=settings.breaker_min_calls,
        window_seconds=settings.breaker_window_seconds,
        open_seconds=settings.breaker_open_seconds,
    )
    return retry, breaker
