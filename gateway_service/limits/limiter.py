"""Limiters: one decision per call, atomic over every bucket the call touches.

Requests and tokens per minute use GCRA (the generic cell rate algorithm): each bucket keeps one
number, its theoretical arrival time (TAT). A limit of L per minute spaces units 60/L s apart and
allows a burst of a minute's worth: a cost of c is allowed when max(TAT, now) + c * 60/L - now
<= 60 s, and then becomes the new TAT. So 50 per minute serves exactly 50 at once, then one more
every 1.2 s. Tokens per minute are taken before the call at its hold size (the most it can use)
and the unused part is given back after it (the TAT moves back), so concurrent calls cannot
overrun the limit. Calls in flight are leased slots (a set of call ids with an expiry, so a
crashed gateway's slots come back by themselves).

`acquire` checks every bucket of every key and takes from all of them, or from none. The Redis
limiter does that in one Lua script (one atomic step, shared by every gateway replica); the local
one in one event-loop step (for a single process). `ResilientLimiter` puts Redis first and falls
back to the local limiter, or refuses, while Redis cannot answer (RATE_LIMIT_REDIS_FAILURE).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import redis.asyncio as redis
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError

from gateway_service.limits.config import Limit

log = logging.getLogger(__name__)

MINUTE_MS = 60_000.0
# The longest a call's release waits to share a trip with other calls' decisions: a slot and
# unused tokens come back this much later, at most (calls last far longer).
DEFER_SECONDS = 0.005
# How long start-up waits for Redis to be ready (connection, scripts) before serving anyway.
WARM_SECONDS = 2.0

Reason = Literal[
    "", "RATE_LIMITED", "TOKENS_PER_MINUTE_EXCEEDED", "TOO_MANY_CALLS_IN_FLIGHT", "UNAVAILABLE"
]


@dataclass(frozen=True, slots=True)
class Bucket:
    """One caller's limits under one key, and the tokens this call asks for."""

    key: str
    limit: Limit
    tokens: int = 0


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    reason: Reason = ""
    retry_after: float = 0.0  # seconds
    # The first bucket's requests-per-minute state, for RateLimit-* headers (limit 0: none).
    limit: int = 0
    remaining: int = 0
    reset: float = 0.0  # seconds until the bucket is full again
    # The first bucket's tokens left this minute and calls in flight now (status).
    tokens_remaining: int = 0
    in_flight: int = 0


class Limiter(Protocol):
    async def acquire(self, buckets: Sequence[Bucket], call_id: str, lease_ms: int) -> Decision:
        """Takes a request, the tokens asked for and a slot from every bucket, or nothing."""
        ...

    async def release(self, buckets: Sequence[Bucket], call_id: str, unused_tokens: int) -> None:
        """The call ended: frees its slot and gives back the tokens it did not use."""
        ...

    async def peek(self, buckets: Sequence[Bucket]) -> Decision:
        """What acquire would decide now, taking nothing."""
        ...

    async def warm(self) -> None:
        """Readies what the first decisions would otherwise wait for (at start-up)."""
        ...

    async def close(self) -> None: ...


# ---- the algorithm, once, on plain state (the Lua script mirrors it) ---------------------------


# Times are float milliseconds: a burst of exactly a minute's worth can come out a rounding error
# past MINUTE_MS (1e6 + 0.1 + 60000 - (1e6 + 0.1) > 60000), and was refused. A microsecond's
# slack absorbs that (Redis's clock, ~1.8e12 ms, rounds to ~2.4e-4 ms); a call a microsecond early
# is all it can let through.
SLACK_MS = 0.001


def _gcra(tat: float, now: float, per_minute: int, cost: int) -> tuple[bool, float, float]:
    """(allowed, new TAT, retry after ms) for `cost` units of a `per_minute` limit."""
    interval = MINUTE_MS / per_minute
    new_tat = max(tat, now) + cost * interval
    if new_tat - now <= MINUTE_MS + SLACK_MS:
        return True, new_tat, 0.0
    if cost > per_minute:
        return False, tat, MINUTE_MS  # can never fit: ask again in a minute
    return False, tat, new_tat - MINUTE_MS - now


def _remaining(tat: float, now: float, per_minute: int) -> tuple[int, float]:
    interval = MINUTE_MS / per_minute
    used = max(0.0, tat - now)
    return max(0, math.floor((MINUTE_MS - used) / interval)), used / 1000


@dataclass
class _State:
    tats: dict[str, float] = field(default_factory=dict)
    slots: dict[str, dict[str, float]] = field(default_factory=dict)


class LocalLimiter:
    """The limits of one process, in its memory (the default without REDIS_URL)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._state = _State()
        self._ops = 0

    def _now(self) -> float:
        return self._clock() * 1000

    def _decide(
        self, buckets: Sequence[Bucket], now: float, take: bool, call_id: str, lease_ms: int
    ) -> Decision:
        state = self._state
        new_tats: dict[str, float] = {}
        for bucket in buckets:
            limit = bucket.limit
            checks: list[tuple[str, int, int, Reason]] = []
            if limit.requests_per_minute:
                checks.append((f"{bucket.key}:rpm", limit.requests_per_minute, 1, "RATE_LIMITED"))
            if limit.tokens_per_minute and bucket.tokens:
                tpm_check: tuple[str, int, int, Reason] = (
                    f"{bucket.key}:tpm",
                    limit.tokens_per_minute,
                    bucket.tokens,
                    "TOKENS_PER_MINUTE_EXCEEDED",
                )
                checks.append(tpm_check)
            for name, per_minute, cost, reason in checks:
                ok, tat, retry = _gcra(state.tats.get(name, now), now, per_minute, cost)
                if not ok:
                    return _headers(buckets, state, now, False, reason, retry / 1000)
                new_tats[name] = tat
            if limit.calls_in_flight:
                slots = state.slots.setdefault(f"{bucket.key}:inflight", {})
                for held, expiry in list(slots.items()):
                    if expiry <= now:
                        del slots[held]
                if len(slots) >= limit.calls_in_flight:
                    return _headers(buckets, state, now, False, "TOO_MANY_CALLS_IN_FLIGHT", 1.0)
        if take:
            state.tats.update(new_tats)
            for bucket in buckets:
                if bucket.limit.calls_in_flight:
                    state.slots[f"{bucket.key}:inflight"][call_id] = now + lease_ms
        return _headers(buckets, state, now, allowed=True)

    async def acquire(self, buckets: Sequence[Bucket], call_id: str, lease_ms: int) -> Decision:
        now = self._now()
        self._sweep(now)
        return self._decide(buckets, now, True, call_id, lease_ms)

    async def peek(self, buckets: Sequence[Bucket]) -> Decision:
        return self._decide(buckets, self._now(), False, "", 0)

    async def release(self, buckets: Sequence[Bucket], call_id: str, unused_tokens: int) -> None:
        for bucket in buckets:
            limit = bucket.limit
            if limit.tokens_per_minute and unused_tokens > 0:
                name = f"{bucket.key}:tpm"
                if name in self._state.tats:
                    self._state.tats[name] -= unused_tokens * MINUTE_MS / limit.tokens_per_minute
            if limit.calls_in_flight:
                self._state.slots.get(f"{bucket.key}:inflight", {}).pop(call_id, None)

    def _sweep(self, now: float) -> None:
        """Every so often, forget buckets that are full again (bounded memory)."""
        self._ops += 1
        if self._ops % 1024:
            return
        self._state.tats = {k: v for k, v in self._state.tats.items() if v > now}
        self._state.slots = {
            k: live
            for k, s in self._state.slots.items()
            if (live := {c: e for c, e in s.items() if e > now})
        }

    async def warm(self) -> None:
        return None

    async def close(self) -> None:
        return None


def _headers(
    buckets: Sequence[Bucket],
    state: _State,
    now: float,
    allowed: bool,
    reason: Reason = "",
    retry_after: float = 0.0,
) -> Decision:
    """The decision, with the first bucket's state (headers and status)."""
    if not buckets:
        return Decision(allowed, reason, retry_after)
    first = buckets[0]
    limit = first.limit
    remaining, reset = 0, 0.0
    if limit.requests_per_minute:
        remaining, reset = _remaining(
            state.tats.get(f"{first.key}:rpm", now), now, limit.requests_per_minute
        )
    tokens = 0
    if limit.tokens_per_minute:
        tokens, _ = _remaining(
            state.tats.get(f"{first.key}:tpm", now), now, limit.tokens_per_minute
        )
    slots = state.slots.get(f"{first.key}:inflight", {})
    return Decision(
        allowed,
        reason,
        retry_after,
        limit=limit.requests_per_minute,
        remaining=remaining,
        reset=reset,
        tokens_remaining=tokens,
        in_flight=sum(1 for expiry in slots.values() if expiry > now),
    )


# ---- Redis: the same decision, in one atomic Lua script shared by every replica ---------------

_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local take = ARGV[1] == '1'
local call_id = ARGV[2]
local lease = tonumber(ARGV[3])
local n = #KEYS / 3
-- The decision, with the first bucket's state after it: requests and tokens left, calls in
-- flight (for headers and status, refusals included).
local function left(key, per_minute)
  if per_minute <= 0 then return 0, 0 end
  local tat = tonumber(redis.call('GET', key)) or now
  local used = math.max(0, tat - now)
  return math.max(0, math.floor((60000 - used) / (60000 / per_minute))), used
end
local function state(allowed, reason, retry)
  if n == 0 then return {allowed, reason, retry, 0, 0, '0', 0, 0} end
  local rpm = tonumber(ARGV[4])
  local remaining, used = left(KEYS[1], rpm)
  local tokens_left = left(KEYS[2], tonumber(ARGV[5]))
  local in_flight = 0
  if tonumber(ARGV[6]) > 0 then in_flight = redis.call('ZCOUNT', KEYS[3], '(' .. now, '+inf') end
  return {allowed, reason, retry, rpm, remaining, tostring(used), tokens_left, in_flight}
end
local taken = {}
for i = 0, n - 1 do
  local rpm = tonumber(ARGV[4 + i * 4])
  local tpm = tonumber(ARGV[5 + i * 4])
  local slots = tonumber(ARGV[6 + i * 4])
  local tokens = tonumber(ARGV[7 + i * 4])
  local checks = {}
  if rpm > 0 then checks[#checks + 1] = {KEYS[i * 3 + 1], rpm, 1, 'RATE_LIMITED'} end
  if tpm > 0 and tokens > 0 then
    checks[#checks + 1] = {KEYS[i * 3 + 2], tpm, tokens, 'TOKENS_PER_MINUTE_EXCEEDED'}
  end
  for _, c in ipairs(checks) do
    local tat = tonumber(redis.call('GET', c[1])) or now
    if tat < now then tat = now end
    local new_tat = tat + c[3] * 60000 / c[2]
    if new_tat - now > 60000 + 0.001 then  -- SLACK_MS
      local retry = new_tat - 60000 - now
      if c[3] > c[2] then retry = 60000 end
      return state(0, c[4], tostring(retry))
    end
    taken[#taken + 1] = {c[1], new_tat}
  end
  if slots > 0 then
    local key = KEYS[i * 3 + 3]
    redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
    if redis.call('ZCARD', key) >= slots then
      return state(0, 'TOO_MANY_CALLS_IN_FLIGHT', '1000')
    end
  end
end
if take then
  for _, v in ipairs(taken) do
    -- %.17g: tostring keeps 14 digits, which would round a TAT (ms since 1970) to 0.1 ms
    redis.call('SET', v[1], string.format('%.17g', v[2]), 'PX', math.ceil(v[2] - now) + 1000)
  end
  for i = 0, n - 1 do
    if tonumber(ARGV[6 + i * 4]) > 0 then
      redis.call('ZADD', KEYS[i * 3 + 3], now + lease, call_id)
      redis.call('PEXPIRE', KEYS[i * 3 + 3], lease + 1000)
    end
  end
end
return state(1, '', '0')
"""

_RELEASE = """
local call_id = ARGV[1]
local unused = tonumber(ARGV[2])
for i = 0, #KEYS / 2 - 1 do
  local tpm = tonumber(ARGV[3 + i])
  if tpm > 0 and unused > 0 then
    local tat = tonumber(redis.call('GET', KEYS[i * 2 + 1]))
    if tat then
      local back = string.format('%.17g', tat - unused * 60000 / tpm)
      redis.call('SET', KEYS[i * 2 + 1], back, 'KEEPTTL')
    end
  end
  redis.call('ZREM', KEYS[i * 2 + 2], call_id)
end
return 1
"""


def shared_client(url: str, timeout: float = 0.25, connections: int = 64) -> redis.Redis:
    """A Redis client for the limiter: a bounded pool that waits for a free connection (the
    limiter's own timeout bounds the wait) instead of failing a burst of calls."""
    pool = redis.BlockingConnectionPool.from_url(
        url,
        max_connections=connections,
        timeout=None,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
    )
    return redis.Redis(connection_pool=pool)


class _Pipeline:
    """Script calls made in one turn of the event loop go to Redis in one pipeline: one round
    trip, one connection taken from the pool, for all of them. Each call is still its own
    atomic script with its own answer; only the trip is shared (a Redis client's cost per
    call is mostly the trip, not the script)."""

    def __init__(self, client: redis.Redis) -> None:
        self._client = client
        self._queue: list[tuple[AsyncScript, list[str], list[str | int], asyncio.Future[Any]]] = []
        self._due = False
        self._timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def run(
        self, script: AsyncScript, keys: list[str], args: list[str | int], urgent: bool = True
    ) -> Any:
        """`urgent`: leaves on the next turn of the loop (a call waits for the answer). Not
        urgent (a release, which no call waits for): leaves with the next urgent trip, or after
        DEFER_SECONDS, so that most releases cost no trip of their own."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._queue.append((script, keys, args, future))
        if urgent:
            if not self._due:
                self._due = True
                loop.call_soon(self._flush)
        elif self._timer is None and not self._due:
            self._timer = loop.call_later(DEFER_SECONDS, self._flush)
        return await future

    async def drain(self) -> None:
        """Sends what waits (deferred releases included) and waits for the trips under way."""
        if self._queue:
            self._flush()
        if self._tasks:
            await asyncio.wait(list(self._tasks))

    def _flush(self) -> None:
        self._due = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        # A caller that gave up (its limiter timeout) before the trip left is not sent.
        batch = [entry for entry in self._queue if not entry[3].done()]
        self._queue = []
        if batch:
            task = asyncio.get_running_loop().create_task(self._send(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _send(
        self, batch: list[tuple[AsyncScript, list[str], list[str | int], asyncio.Future[Any]]]
    ) -> None:
        pipe = self._client.pipeline(transaction=False)
        for script, keys, args, _ in batch:
            # EVALSHA straight into the pipeline: registering the script with it would cost a
            # SCRIPT EXISTS round trip per pipeline. A missing script is loaded below instead.
            pipe.evalsha(script.sha, len(keys), *keys, *args)
        try:
            results = await pipe.execute(raise_on_error=False)
        except asyncio.CancelledError:
            for *_, future in batch:
                future.cancel()
            raise
        except Exception as exc:
            for *_, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        for (script, keys, args, future), result in zip(batch, results, strict=True):
            if isinstance(result, NoScriptError):
                # Redis restarted or its script cache was flushed: the script loads itself.
                try:
                    result = await script(keys=keys, args=args)
                except Exception as exc:
                    result = exc
            if future.done():
                continue
            if isinstance(result, Exception):
                future.set_exception(result)
            else:
                future.set_result(result)


class RedisLimiter:
    """The limits of every replica sharing one Redis: each decision one Lua script, timed by the
    Redis server's clock (so replicas' clocks do not matter). The scripts of concurrent calls
    share round trips (_Pipeline)."""

    def __init__(self, client: redis.Redis, prefix: str = "rl:") -> None:
        self._client = client
        self._prefix = prefix
        self._acquire = client.register_script(_ACQUIRE)
        self._release = client.register_script(_RELEASE)
        self._pipeline = _Pipeline(client)

    def _keys(self, buckets: Sequence[Bucket]) -> list[str]:
        return [
            f"{self._prefix}{b.key}:{kind}" for b in buckets for kind in ("rpm", "tpm", "inflight")
        ]

    async def _decide(
        self, buckets: Sequence[Bucket], take: bool, call_id: str, lease_ms: int
    ) -> Decision:
        args: list[str | int] = ["1" if take else "0", call_id, lease_ms]
        for b in buckets:
            args += [
                b.limit.requests_per_minute,
                b.limit.tokens_per_minute,
                b.limit.calls_in_flight,
                b.tokens,
            ]
        answer = await self._pipeline.run(self._acquire, self._keys(buckets), args)
        allowed = int(answer[0]) == 1
        reason: Reason = ""
        if not allowed:
            text = answer[1].decode() if isinstance(answer[1], bytes) else str(answer[1])
            reason = _reason(text)
        limit, remaining, used = int(answer[3]), int(answer[4]), float(answer[5])
        return Decision(
            allowed,
            reason,
            float(answer[2]) / 1000,
            limit=limit,
            remaining=remaining,
            reset=used / 1000,
            tokens_remaining=int(answer[6]),
            in_flight=int(answer[7]),
        )

    async def acquire(self, buckets: Sequence[Bucket], call_id: str, lease_ms: int) -> Decision:
        return await self._decide(buckets, True, call_id, lease_ms)

    async def peek(self, buckets: Sequence[Bucket]) -> Decision:
        return await self._decide(buckets, False, "", 0)

    async def release(self, buckets: Sequence[Bucket], call_id: str, unused_tokens: int) -> None:
        keys = [f"{self._prefix}{b.key}:{kind}" for b in buckets for kind in ("tpm", "inflight")]
        args: list[str | int] = [call_id, max(0, unused_tokens)]
        args += [b.limit.tokens_per_minute for b in buckets]
        await self._pipeline.run(self._release, keys, args, urgent=False)

    async def warm(self) -> None:
        """A connection open and both scripts in Redis's cache before the first burst of calls
        (which would otherwise pay the connect and a NOSCRIPT reload within the timeout)."""
        for script in (self._acquire, self._release):
            script.sha = await self._client.script_load(script.script)

    async def close(self) -> None:
        await self._pipeline.drain()  # releases still deferred free their slots first
        await self._client.aclose()


def _reason(value: str) -> Reason:
    if value == "TOKENS_PER_MINUTE_EXCEEDED":
        return "TOKENS_PER_MINUTE_EXCEEDED"
    if value == "TOO_MANY_CALLS_IN_FLIGHT":
        return "TOO_MANY_CALLS_IN_FLIGHT"
    return "RATE_LIMITED"


FailurePolicy = Literal["local", "refuse"]


class ResilientLimiter:
    """Redis first. While Redis cannot answer within `timeout`, every decision is the local
    limiter's ("local") or a refusal ("refuse"); Redis is tried again every `retry_seconds`, so
    the shared limits come back by themselves. No call waits longer than `timeout` on Redis."""

    RELEASE_TRIES = 3

    def __init__(
        self,
        shared: RedisLimiter,
        local: LocalLimiter,
        on_failure: FailurePolicy,
        timeout: float = 0.25,
        retry_seconds: float = 2.0,
    ) -> None:
        self._shared = shared
        self._local = local
        self._on_failure = on_failure
        self._timeout = timeout
        self._retry = retry_seconds
        self._down_until = 0.0
        self._local_calls: set[str] = set()

    def _shared_usable(self) -> bool:
        return time.monotonic() >= self._down_until

    def _failed(self, exc: BaseException) -> None:
        if self._shared_usable():
            fallback = "limiting locally" if self._on_failure == "local" else "refusing calls"
            log.warning(
                "rate limiter: Redis unreachable (%s); %s for %.0fs",
                type(exc).__name__,
                fallback,
                self._retry,
            )
        self._down_until = time.monotonic() + self._retry

    async def acquire(self, buckets: Sequence[Bucket], call_id: str, lease_ms: int) -> Decision:
        if self._shared_usable():
            try:
                async with asyncio.timeout(self._timeout):
                    return await self._shared.acquire(buckets, call_id, lease_ms)
            except (redis.RedisError, OSError, TimeoutError) as exc:
                self._failed(exc)
        if self._on_failure == "refuse":
            return Decision(False, "UNAVAILABLE", self._retry)
        self._local_calls.add(call_id)
        return await self._local.acquire(buckets, call_id, lease_ms)

    async def peek(self, buckets: Sequence[Bucket]) -> Decision:
        if self._shared_usable():
            try:
                async with asyncio.timeout(self._timeout):
                    return await self._shared.peek(buckets)
            except (redis.RedisError, OSError, TimeoutError) as exc:
                self._failed(exc)
        return await self._local.peek(buckets)

    async def release(self, buckets: Sequence[Bucket], call_id: str, unused_tokens: int) -> None:
        """Frees the call's slot in Redis even when the call was admitted locally: an acquire
        that timed out may still have landed there, and a slot left behind would stay taken
        for its whole lease (the longest a call may run). A failed release is retried while
        Redis comes back; this runs in the background, never on a call's path."""
        if call_id in self._local_calls:
            self._local_calls.discard(call_id)
            await self._local.release(buckets, call_id, unused_tokens)
            unused_tokens = 0  # no tokens were taken in Redis; only a slot may have been
        for attempt in range(self.RELEASE_TRIES):
            try:
                async with asyncio.timeout(self._timeout):
                    await self._shared.release(buckets, call_id, unused_tokens)
                return
            except (redis.RedisError, OSError, TimeoutError) as exc:
                self._failed(exc)
                if attempt + 1 < self.RELEASE_TRIES:
                    await asyncio.sleep(self._retry)

    async def warm(self) -> None:
        """Best effort: a Redis not there yet is found by the first calls, as configured."""
        try:
            async with asyncio.timeout(max(self._timeout, WARM_SECONDS)):
                await self._shared.warm()
        except (redis.RedisError, OSError, TimeoutError) as exc:
            log.warning("rate limiter: Redis not ready at start-up (%s)", type(exc).__name__)

    async def close(self) -> None:
        await self._shared.close()
