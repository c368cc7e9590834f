"""What every provider takes and returns, and the `Provider` protocol the gateway codes against."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from types import TracebackType
from typing import Protocol, Self

ANTHROPIC = "anthropic"
OPENAI = "openai"


@dataclass(frozen=True, slots=True)
class CompletionRequest:
    content: str
    model: str
    max_tokens: int
    system_prompt: str = ""
    # BYOK: the caller's own key. repr=False keeps it out of logs, reprs and tracebacks.
    api_key: str | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True)
class Completion:
    text: str
    model: str
    input_tokens: int
    output_tokens: int
    stop_reason: str | None
    provider: str


@dataclass(frozen=True, slots=True)
class TextDelta:
    text: str


@dataclass(frozen=True, slots=True)
class StreamEnd:
    """The last item of a stream: the usage the provider reported in its final event."""

    model: str
    input_tokens: int
    output_tokens: int
    stop_reason: str | None


StreamItem = TextDelta | StreamEnd


@dataclass(frozen=True, slots=True)
class Usage:
    input_tokens: int
    output_tokens: int
    # True when the provider never sent its final usage (stream cut, cancelled, or failed).
    estimated: bool

    @property
    def total(self) -> int:
        return self.input_tokens + self.output_tokens


def token_count(value: object) -> int:
    """A token count from a provider response; TypeError (reported as MALFORMED) otherwise."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    raise TypeError("token count is not a non-negative integer")


def estimate_input_tokens(request: CompletionRequest) -> int:
    """About four characters per token, at least one: used only when the provider reported none."""
    chars = len(request.system_prompt) + len(request.content)
    return max(1, -(-chars // 4))


def estimate_output_tokens(deltas: int, chars: int) -> int:
    """Every delta carries at least one token, and a token is about four characters."""
    return max(deltas, -(-chars // 4))


class CompletionStream(Protocol):
    """Text deltas, then one `StreamEnd`. Use with `async with`: leaving it closes the HTTP stream.

    `usage` is always available: the provider's figures once its final event arrived, otherwise
    an estimate of what was consumed (see `ProviderStream.usage`).
    """

    model: str

    @property
    def usage(self) -> Usage: ...

    def __aiter__(self) -> AsyncIterator[StreamItem]: ...

    async def __anext__(self) -> StreamItem: ...

    async def aclose(self) -> None: ...

    async def __aenter__(self) -> Self: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...


class Provider(Protocol):
    name: str
    default_model: str

    async def generate(self, request: CompletionRequest) -> Completion: ...

    def stream(self, request: CompletionRequest) -> CompletionStream:
        """Lazy: the HTTP request starts on the first `__anext__`, so errors surface there."""
        ...

    async def aclose(self) -> None: ...
