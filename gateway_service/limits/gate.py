"""Who is limited by what: the buckets of one call, and the answer when one is full.

- A subscription caller: its user id, with its tier's limits (the JWT `tier` claim).
- A signed-in BYOK caller: its user id, with the BYOK limits.
- A public caller (no JWT, its own key): its client address and a hash of its key, each with the
  public limits; and, before anything, its address's record of provider keys refused (someone
  testing stolen keys through us).

A refused call is refused before any hold or provider call. An admitted call holds a slot and
the tokens of its hold size until `Admission.finish`, which gives back what it did not use.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import uuid
from dataclasses import dataclass, field

from gateway_service.errors import Failure, GatewayError
from gateway_service.limits.config import Limit, LimitsConfig
from gateway_service.limits.limiter import Bucket, Decision, Limiter
from gateway_service.limits.rate import RateInfo
from gateway_service.metrics import RATE_LIMIT_REFUSALS

log = logging.getLogger(__name__)

_MESSAGES = {
    "RATE_LIMITED": "too many requests; retry after the time given",
    "TOKENS_PER_MINUTE_EXCEEDED": "too many tokens this minute; retry after the time given",
    "TOO_MANY_CALLS_IN_FLIGHT": "too many calls at once; wait for one to finish",
    "UNAVAILABLE": "the rate limiter is unavailable; retry shortly",
}


@dataclass(frozen=True, slots=True)
class Caller:
    """A caller as limits see it."""

    user_id: str | None  # None: a public caller
    byok: bool
    tier: str | None = None
    address: str = ""
    api_key: str = field(default="", repr=False)

    @property
    def kind(self) -> str:
        if self.user_id is None:
            return "public"
        return "byok" if self.byok else "subscription"


@dataclass
class Admission:
    """An admitted call's share of its limits, given back (once) when it ends."""

    gate: RateGate
    buckets: list[Bucket]
    call_id: str
    tokens: int
    rate: RateInfo | None
    _finished: bool = False

    @property
    def holds_anything(self) -> bool:
        """False for a call under no limit: `finish` has nothing to give back."""
        return bool(self.buckets)

    async def finish(self, used_tokens: int) -> None:
        if self._finished:
            return
        self._finished = True
        try:
            await self.gate.limiter.release(
                self.buckets, self.call_id, max(0, self.tokens - used_tokens)
            )
        except Exception:
            log.exception("rate limiter: releasing a call failed (its slot's lease ends it)")


def _rate(decision: Decision) -> RateInfo | None:
    if not decision.limit:
        return None
    return RateInfo(decision.limit, decision.remaining, decision.reset)


def limited(decision: Decision, detail: str = "") -> GatewayError:
    reason = decision.reason or "RATE_LIMITED"
    RATE_LIMIT_REFUSALS.labels(reason).inc()
    if reason == "UNAVAILABLE":
        return GatewayError(
            Failure.UNAVAILABLE,
            "RATE_LIMITER_UNAVAILABLE",
            _MESSAGES["UNAVAILABLE"],
            retry_after=decision.retry_after,
        )
    return GatewayError(
        Failure.RATE_LIMITED,
        reason,
        detail or _MESSAGES[reason],
        {"retry_after_seconds": f"{max(1, round(decision.retry_after))}"},
        retry_after=max(1.0, decision.retry_after),
        rate=_rate(decision),
    )


class RateGate:
    def __init__(self, limiter: Limiter, config: LimitsConfig, lease_seconds: float) -> None:
        self.limiter = limiter
        self.config = config
        self._lease_ms = int(lease_seconds * 1000)

    def limit_of(self, caller: Caller) -> Limit:
        if caller.user_id is None:
            return self.config.public
        return self.config.byok if caller.byok else self.config.for_tier(caller.tier)

    def monthly_quota(self, tier: str | None, claim: int | None) -> int:
        """The caller's monthly quota: the JWT's claim, else its tier's (0: none)."""
        if claim is not None and claim > 0:
            return claim
        return self.config.for_tier(tier).monthly_quota

    def _buckets(self, caller: Caller, tokens: int) -> list[Bucket]:
        limit = self.limit_of(caller)
        if caller.user_id is not None:
            return [Bucket(f"{caller.kind}:{caller.user_id}", limit, tokens)]
        key_hash = hashlib.sha256(caller.api_key.encode("utf-8", "surrogatepass")).hexdigest()
        return [
            Bucket(f"public:addr:{caller.address}", limit, tokens),
            Bucket(f"public:key:{key_hash[:32]}", limit, tokens),
        ]

    def _failed_keys(self, caller: Caller) -> Bucket | None:
        per_minute = self.config.failed_key_attempts_per_minute
        if caller.user_id is not None or not per_minute:
            return None
        return Bucket(f"failed-keys:{caller.address}", Limit(requests_per_minute=per_minute))

    async def admit(self, caller: Caller, tokens: int) -> Admission:
        """Takes the call's share of its limits, or raises GatewayError (RATE_LIMITED...)."""
        failed = self._failed_keys(caller)
        if failed is not None:
            record = await self.limiter.peek([failed])
            if not record.allowed:
                raise limited(record, "too many refused provider keys from this address")
        buckets = self._buckets(caller, tokens)
        if all(bucket.limit.unlimited for bucket in buckets):
            # Nothing to count or give back: no limiter round trip (a Redis call) either way.
            return Admission(self, [], "", tokens, None)
        call_id = uuid.uuid4().hex
        decision = await self.limiter.acquire(buckets, call_id, self._lease_ms)
        if not decision.allowed:
            raise limited(decision)
        return Admission(self, buckets, call_id, tokens, _rate(decision))

    async def check(self, caller: Caller, tokens: int) -> Decision:
        """What `admit` would decide now, taking nothing (eligibility, status)."""
        failed = self._failed_keys(caller)
        if failed is not None:
            record = await self.limiter.peek([failed])
            if not record.allowed:
                return record
        return await self.limiter.peek(self._buckets(caller, tokens))

    async def key_refused(self, caller: Caller) -> None:
        """A provider refused a public caller's key: one more failed attempt for its address."""
        failed = self._failed_keys(caller)
        if failed is None:
            return
        try:
            await self.limiter.acquire([failed], uuid.uuid4().hex, 0)
        except Exception:
            log.exception("rate limiter: could not count a refused key")

    async def warm(self) -> None:
        await self.limiter.warm()

    async def close(self) -> None:
        await asyncio.shield(self.limiter.close())
