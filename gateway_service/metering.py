"""What a metered call holds, what it reports, and how long it may run.

- The hold covers the most a call can use: byte-level tokenizers (Anthropic's, OpenAI's) spend at
  most one token per UTF-8 byte, plus the special tokens that frame each message; the output is
  bounded by max_tokens. So a provider can never report more than the hold, and a served call is
  always paid in full (usage beyond it is a provider anomaly the ledger reports).
- Whatever a provider echoes back (model names, counts) is made storable before it reaches the
  ledger, so a settle is never refused for something the gateway could have checked.
- A `HoldLease` keeps a call's hold alive while the call runs (ExtendHold every third of its
  TTL) and bounds the call: it must end `margin` seconds before the hold could expire, as far as
  this process can tell (it counts from before it asked the ledger, so it errs early), and
  within its own maximum length. A call past that is cut and settled for what it consumed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from gateway_service.errors import Failure, GatewayError
from gateway_service.providers.base import CompletionRequest
from gateway_service.providers.retry import call_deadline

log = logging.getLogger(__name__)
T = TypeVar("T")

# Special tokens around the conversation and each message (role markers, separators): real
# framing is a handful of tokens; these leave room for provider changes.
FRAMING_TOKENS = 16
FRAMING_TOKENS_PER_MESSAGE = 16
# What the ledger stores (its MAX_ID_CHARS and MAX_TOKENS_PER_CALL).
MAX_MODEL_CHARS = 256
MAX_REPORTED_TOKENS = 10**9
UNKNOWN_MODEL = "unknown"


def utf8_bytes(text: str) -> int:
    # surrogatepass: a lone surrogate still costs its three bytes, it does not fail the call.
    return len(text.encode("utf-8", "surrogatepass"))


def input_token_bound(request: CompletionRequest) -> int:
    """The most input tokens a provider can report for this request."""
    messages = 2 if request.system_prompt else 1
    return (
        utf8_bytes(request.system_prompt)
        + utf8_bytes(request.content)
        + FRAMING_TOKENS
        + FRAMING_TOKENS_PER_MESSAGE * messages
    )


def hold_estimate(request: CompletionRequest) -> int:
    """The tokens a call's hold covers (the ledger adds the fee): every token it can use."""
    return input_token_bound(request) + request.max_tokens


def storable_model(echoed: str, requested: str) -> str:
    """The model name to record: the provider's echo, printable and at most MAX_MODEL_CHARS;
    the requested name when nothing usable is left of it."""
    for candidate in (echoed, requested):
        cleaned = "".join(ch for ch in candidate if ch.isprintable()).strip()[:MAX_MODEL_CHARS]
        if cleaned.strip():
            return cleaned.strip()
    return UNKNOWN_MODEL


def storable_count(tokens: int) -> int:
    """A token count the ledger stores: counts past its bound are clamped (and logged), so the
    call is still charged as far as the balance allows instead of not at all."""
    if tokens > MAX_REPORTED_TOKENS:
        log.warning(
            "provider reported %d tokens for one call; recorded as %d", tokens, MAX_REPORTED_TOKENS
        )
        return MAX_REPORTED_TOKENS
    return max(0, tokens)


def call_cut() -> GatewayError:
    return GatewayError(
        Failure.TIMEOUT,
        "CALL_TIME_LIMIT",
        "the call ran past its time limit and was cut; it was charged for what it used",
    )


class CallCut(Exception):
    """The call reached the end of its lease (see HoldLease)."""


Extend = Callable[[int], Awaitable[None]]


class HoldLease:
    """Keeps one call's hold alive and tells when the call must end.

    `extend(ttl)` asks the ledger for `ttl` more seconds and raises GatewayError on failure.
    `started` is the event-loop time taken before the hold was asked for. Without `extend`
    (a BYOK call holds nothing) the lease only bounds the call's length."""

    def __init__(
        self,
        extend: Extend | None,
        ttl: float,
        margin: float,
        started: float,
        max_seconds: float,
    ) -> None:
        self._extend = extend
        self._ttl = ttl
        self._margin = margin
        self._expires = started + ttl if extend else float("inf")
        self._end = started + max_seconds
        self._scopes: set[asyncio.Timeout] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def cut_at(self) -> float:
        """Event-loop time by which the call must be over."""
        return min(self._expires - self._margin, self._end)

    def start(self) -> None:
        if self._extend is not None:
            # A timer, not a task: most calls end before the first extension is due, and a
            # timer handle costs far less per call than a task created only to be cancelled.
            loop = asyncio.get_running_loop()
            self._timer = loop.call_at(loop.time() + self._ttl / 3, self._begin_extending)

    def _begin_extending(self) -> None:
        self._timer = None
        self._task = asyncio.create_task(self._keep_alive())

    def stop(self) -> None:
        """Stops extending (synchronously: call it on every exit path, before metering)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._task is not None:
            self._task.cancel()
            self._task = None

    def expired(self) -> bool:
        return asyncio.get_running_loop().time() >= self.cut_at

    async def run(self, work: Awaitable[T]) -> T:
        """Awaits `work`, cancelling it at `cut_at` (which moves while the hold is extended).
        Provider retries inside `work` never wait past `cut_at` (`retry.call_deadline`)."""
        scope = asyncio.timeout_at(self.cut_at)
        self._scopes.add(scope)
        try:
            async with scope:
                with call_deadline(lambda: self.cut_at):
                    return await work
        except TimeoutError:
            if scope.expired():
                raise CallCut from None
            raise
        finally:
            self._scopes.discard(scope)

    async def _keep_alive(self) -> None:
        assert self._extend is not None
        loop = asyncio.get_running_loop()
        every = self._ttl / 3
        next_at = loop.time()  # the first extension is due now (start's timer waited `every`)
        while True:
            await asyncio.sleep(max(0.0, next_at - loop.time()))
            sent = loop.time()
            try:
                await self._extend(int(self._ttl))
            except GatewayError as exc:
                if exc.failure in (Failure.CONFLICT, Failure.NOT_FOUND):
                    # The hold is no longer held (released, expired): the call must end now.
                    log.warning("hold lost while its call ran (%s): cutting the call", exc.reason)
                    self._expires = loop.time()
                    self._reschedule()
                    return
                # The ledger is away: try again soon; the call is cut if the hold runs short.
                next_at = loop.time() + min(1.0, every)
                continue
            except Exception:
                log.exception("extending a hold failed; will retry")
                next_at = loop.time() + min(1.0, every)
                continue
            self._expires = sent + self._ttl
            self._reschedule()
            next_at = sent + every

    def _reschedule(self) -> None:
        for scope in self._scopes:
            with contextlib.suppress(RuntimeError):  # a scope that is already leaving
                scope.reschedule(self.cut_at)
