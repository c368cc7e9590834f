"""Which provider serves a request, and the process-wide set of provider clients."""

from __future__ import annotations

from collections.abc import Mapping

from gateway_service.providers.anthropic_provider import DEFAULT_ANTHROPIC_MODEL, AnthropicProvider
from gateway_service.providers.base import ANTHROPIC, OPENAI, Provider
from gateway_service.providers.errors import ProviderError, ProviderErrorKind
from gateway_service.providers.openai_provider import DEFAULT_OPENAI_MODEL, OpenAIProvider

PROVIDER_NAMES = (ANTHROPIC, OPENAI)
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
    """One long-lived provider (one SDK client, one connection pool) per provider name."""

    def __init__(
        self, providers: Mapping[str, Provider], default_provider: str = ANTHROPIC
    ) -> None:
        self._providers = dict(providers)
        self.default_provider = default_provider

    def resolve(self, provider: str, model: str) -> tuple[Provider, str]:
        """The provider for a request and the model to ask it for (its default when empty)."""
        name = provider_for(provider, model, self.default_provider)
        chosen = self._providers.get(name)
        if chosen is None:
            raise UnknownProviderError(f"provider {name!r} is not configured")
        return chosen, model.strip() or chosen.default_model

    def get(self, name: str) -> Provider:
        return self._providers[name]

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
) -> Providers:
    """Both providers. Call inside the running event loop and `aclose()` on shutdown.

    `openai_base_url` includes the API version path (`http://host:port/v1`), as for the SDK.
    """
    return Providers(
        {
            ANTHROPIC: AnthropicProvider(
                api_key=anthropic_api_key,
                base_url=anthropic_base_url,
                timeout_seconds=timeout_seconds,
                default_model=anthropic_default_model,
            ),
            OPENAI: OpenAIProvider(
                api_key=openai_api_key,
                base_url=openai_base_url,
                timeout_seconds=timeout_seconds,
                default_model=openai_default_model,
            ),
        },
        default_provider=default_provider,
    )
