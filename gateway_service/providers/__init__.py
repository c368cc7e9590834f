"""AI providers behind one small protocol: Anthropic Messages and OpenAI Chat Completions."""

from gateway_service.providers.anthropic_provider import AnthropicProvider
from gateway_service.providers.base import (
    ANTHROPIC,
    OPENAI,
    Completion,
    CompletionRequest,
    CompletionStream,
    Provider,
    StreamEnd,
    StreamItem,
    TextDelta,
    Usage,
    estimate_input_tokens,
    estimate_output_tokens,
)
from gateway_service.providers.errors import ProviderError, ProviderErrorKind
from gateway_service.providers.openai_provider import OpenAIProvider
from gateway_service.providers.registry import (
    PROVIDER_NAMES,
    Providers,
    UnknownProviderError,
    build_providers,
    provider_for,
)

__all__ = [
    "ANTHROPIC",
    "OPENAI",
    "PROVIDER_NAMES",
    "AnthropicProvider",
    "Completion",
    "CompletionRequest",
    "CompletionStream",
    "OpenAIProvider",
    "Provider",
    "ProviderError",
    "ProviderErrorKind",
    "Providers",
    "StreamEnd",
    "StreamItem",
    "TextDelta",
    "UnknownProviderError",
    "Usage",
    "build_providers",
    "estimate_input_tokens",
    "estimate_output_tokens",
    "provider_for",
]
