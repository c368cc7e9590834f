"""`make soak`: the whole stack under steady mixed load for SOAK_SECONDS (default 600), failing if
anything piles up.

Why: the benchmarks measure speed over seconds; what breaks a service after days is what grows
slowly: memory, file descriptors, connections, holds nobody settles, outbox jobs nobody
delivers, and money that drifts. A soak run makes those visible in minutes.

What runs, each as its own process (as `make bench` starts them): an embedded Postgres (under
.data/soak), the ledger (WORKERS=2), the provider stand-in (provider_sim), a Redis for the shared
rate limits (`redis-server`, as `make bench` uses; the gateway's default limits, every call through
them) and the gateway (WORKERS=2). A Python asyncio load generator (aiohttp; paced callers, so
the load is steady and moderate, about a tenth of what the stack can serve, and the generator's
own CPU stays small on a 2-core machine) sends, at once:

- metered unary calls: POST /v1/generate, JWT, charged 40 tokens each ([[usage:20,12]]);
- metered SSE streams: POST /v1/generate/stream, paced deltas, charged 40 tokens each;
- BYOK calls: the caller's own provider key, nothing charged, the usage recorded;
- webhook purchases: signed LemonSqueezy `order_created` events, each with a unique order id,
  crediting the metered users (every balance comes only from them: a large purchase per user
  first); some deliveries repeat an earlier one, some are sent twice at once (idempotency).

Every SOAK_SAMPLE_SECONDS (default 60) one line: elapsed, calls so far by kind, errors, RSS
(MiB) of each service's process tree (supervisor + workers), open holds, the gateway's outbox
depth, open file descriptors / connections (TCP and Unix sockets: the embedded Postgres and its
clients speak over a Unix socket) per service, and the generator's own CPU.

At the end the load stops, in-flight calls finish (polled with a deadline), and the run FAILS
(exit 1, each reason printed) when:
- any call failed (the stack runs with no fault injected: every call must be served);
- a service's RSS (gateway, ledger, provider, redis: the whole process tree) at any later
  sample exceeds its first sample (taken after SOAK_SAMPLE_SECONDS of load: pools and caches
  warm) by more than 10% + 20 MiB (measured runs stay within 1 MiB; the slack absorbs
  allocator noise and a late-warming code path, and a leak of ~1 KiB per call still crosses it
  within a 600-s run). Postgres's bound applies to its private memory (USS) instead: each
  backend's RSS counts every shared buffer it has touched, so the tree's RSS climbs towards
  backends x shared_buffers as the tables grow (measured: RSS +360 to +470 MiB in 600 s
  while USS grew 2 MiB), which is not a leak; its RSS is reported;
- a worker process was replaced (a crash the supervisor hid);
- a hold is still open, or the outbox holds any job (pending or refused);
- a service's descriptors or connections exceed its first sample by more than 10% + 32 at a
  sample under load (in-flight calls move them by up to a connection per caller on each side
  of the gateway) or 10% + 16 after the drain (nothing in flight: only pools may have grown).
  Postgres's connections are its client backends (pg_stat_activity); its open files are
  reported, not bound (each backend keeps the relation files it touched open, a cache);
- the books are not exact: every served metered call has one usage record charged exactly 40,
  every served BYOK call one record charged 0, every metered user's balance is what its
  purchases credited minus 40 per call it was served (computed here, from the generator's own
  counts), nothing is reserved or owed, and the ledger's audit finds nothing;
- the tokens credited differ from what the webhooks bought (computed here: 80% of each unique
  order's variant tokens, floor), or a delivery of a known order was not answered `duplicate`.

The last lines are a summary block to paste into the README.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import os
import platform
import secrets
import sqlite3
import sys
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import jwt
import psutil

from bench.ledger_bench import table
from ledger_service.audit import run_audit
from ledger_service.store.database import migrate, recreate_database, start_embedded, with_database
from shared import eventloop, processes

DATA = Path(".data/soak")
LEDGER_TOKEN = "soak-service-token"
JWT_SECRET = "soak-jwt-secret-long-enough-for-hs256-signing"
OWN_KEY = "sk-soak-caller-own-key"  # BYOK: the stand-in accepts any key
MODELS = ("claude-haiku-4-5", "gpt-4o")  # both providers, alternately
MAX_TOKENS = 64
PROMPT = "[[usage:20,12]] Write one short sentence about the sea."
# 12 deltas 50 ms apart: a stream stays open ~0.6 s, so several are always in flight.
STREAM_PROMPT = "[[usage:20,12]] [[pace:0.05]] Tell me about the sky."
USED_PER_CALL = 32  # 20 in + 12 out
CHARGED_PER_CALL = 40  # 32 used + ceil(32 x 25%) fee
USER_SHARE_PERCENT = 80  # of a purchase, floor (the ledger's default)
METERED_USERS = [f"soak-user-{i}" for i in range(50)]
BYOK_USERS = [f"soak-byok-{i}" for i in range(20)]
SEED_VARIANT = 900  # each metered user's first purchase: enough for any soak
VARIANT_TOKENS = {SEED_VARIANT: 10_000_000, 111: 1_000, 112: 5_000}
ORDER_VARIANTS = (111, 112)

# The bounds (module docstring).
RSS_GROWTH_PERCENT = 10
RSS_GROWTH_MIB = 20
# Under load, in-flight calls move the counts by up to a connection per caller on each side of
# the gateway; after the drain nothing is in flight.
FD_GROWTH_PERCENT = 10
FD_GROWTH_UNDER_LOAD = 32
FD_GROWTH_AFTER_DRAIN = 16
FD_BOUND_SERVICES = ("gateway", "ledger", "provider", "redis")  # Postgres: its connections
DRAIN_SECONDS = 60.0  # in-flight calls to finish; then holds and outbox to empty
CALL_TIMEOUT_SECONDS = 60.0


@dataclass(frozen=True)
class Kind:
    """One kind of load: `rate` calls per second from `callers` paced callers."""

    name: str
    rate: float
    callers: int


KINDS = (
    Kind("unary", 40.0, 8),
    Kind("stream", 8.0, 8),
    Kind("byok", 16.0, 4),
    Kind("webhook", 1.0, 2),
)


# ---- what the load generator saw -------------------------------------------------------------


@dataclass
class Tally:
    calls: Counter[str] = field(default_factory=Counter)  # answered as expected, by kind
    errors: Counter[str] = field(default_factory=Counter)
    error_samples: list[str] = field(default_factory=list)
    served: Counter[str] = field(default_factory=Counter)  # metered calls served, per user
    uncertain: Counter[str] = field(default_factory=Counter)  # may or may not have been charged
    # order id -> (user, variant); deliveries and `applied` answers per order id
    orders: dict[str, tuple[str, int]] = field(default_factory=dict)
    bodies: dict[str, bytes] = field(default_factory=dict)
    deliveries: Counter[str] = field(default_factory=Counter)
    applied: Counter[str] = field(default_factory=Counter)
    outcomes: Counter[str] = field(default_factory=Counter)

    def error(self, kind: str, what: str) -> None:
        self.errors[kind] += 1
        if len(self.error_samples) < 10:
            self.error_samples.append(f"{kind}: {what}"[:300])

    def expected_credit(self) -> Counter[str]:
        credit: Counter[str] = Counter()
        for user, variant in self.orders.values():
            credit[user] += VARIANT_TOKENS[variant] * USER_SHARE_PERCENT // 100
        return credit


def token_for(user: str, lifetime: float) -> str:
    now = int(time.time())
    claims = {"sub": user, "iat": now, "exp": now + int(lifetime)}
    return jwt.encode(claims, JWT_SECRET, "HS256")


class Load:
    """The calls, made through one aiohttp session (keep-alive shorter than the gateway's idle
    timeout, so a connection is never reused as the server closes it)."""

    def __init__(self, base: str, webhook_secret: str, lifetime: float, tally: Tally) -> None:
        self.base = base
        self.secret = webhook_secret
        self.tally = tally
        self.auth = {
            user: {"Authorization": f"Bearer {token_for(user, lifetime)}"}
            for user in [*METERED_USERS, *BYOK_USERS]
        }
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=10),
            timeout=aiohttp.ClientTimeout(total=CALL_TIMEOUT_SECONDS),
        )
        self.next_order = 100_000

    async def close(self) -> None:
        await self.session.close()

    async def unary(self, n: int) -> None:
        user = METERED_USERS[n % len(METERED_USERS)]
        body = {"content": PROMPT, "model": MODELS[n % 2], "maxTokens": MAX_TOKENS}
        try:
            async with self.session.post(
                f"{self.base}/v1/generate", json=body, headers=self.auth[user]
            ) as r:
                text = await r.text()
        except (aiohttp.ClientError, TimeoutError) as exc:
            self.tally.uncertain[user] += 1
            self.tally.error("unary", repr(exc))
            return
        if r.status != 200:
            self.tally.uncertain[user] += 1
            self.tally.error("unary", f"HTTP {r.status} {text}")
            return
        self._metered("unary", user, json.loads(text))

    def _metered(self, kind: str, user: str, answer: dict[str, Any]) -> None:
        usage = answer.get("tokenUsage") or {}
        charged = usage.get("tokensCharged")
        self.tally.served[user] += 1  # served: the ledger charged it (whatever it says)
        if charged != CHARGED_PER_CALL:
            self.tally.error(kind, f"charged {charged}, expected {CHARGED_PER_CALL}")
            return
        self.tally.calls[kind] += 1

    async def stream(self, n: int) -> None:
        user = METERED_USERS[(n * 7 + 3) % len(METERED_USERS)]
        body = {"content": STREAM_PROMPT, "model": MODELS[n % 2], "maxTokens": MAX_TOKENS}
        usage: dict[str, Any] | None = None
        done = False
        failure = ""
        try:
            async with self.session.post(
                f"{self.base}/v1/generate/stream", json=body, headers=self.auth[user]
            ) as r:
                if r.status != 200:
                    failure = f"HTTP {r.status} {await r.text()}"
                else:
                    event = ""
                    async for raw in r.content:
                        line = raw.decode().rstrip("\r\n")
                        if line.startswith("event: "):
                            event = line.removeprefix("event: ")
                        elif line.startswith("data: "):
                            if event == "usage":
                                usage = json.loads(line.removeprefix("data: "))
                            elif event == "done":
                                done = True
                            elif event == "error":
                                failure = line
        except (aiohttp.ClientError, TimeoutError) as exc:
            failure = repr(exc)
        if failure or usage is None or not done:
            self.tally.uncertain[user] += 1  # a stream cut midway is charged what it consumed
            self.tally.error("stream", failure or "no usage/done event")
            return
        self._metered("stream", user, usage)

    async def byok(self, n: int) -> None:
        user = BYOK_USERS[n % len(BYOK_USERS)]
        body = {
            "content": PROMPT,
            "model": MODELS[n % 2],
            "maxTokens": MAX_TOKENS,
            "apiKey": OWN_KEY,
        }
        try:
            async with self.session.post(
                f"{self.base}/v1/generate", json=body, headers=self.auth[user]
            ) as r:
                text = await r.text()
        except (aiohttp.ClientError, TimeoutError) as exc:
            self.tally.error("byok", repr(exc))
            return
        if r.status != 200:
            self.tally.error("byok", f"HTTP {r.status} {text}")
            return
        answer = json.loads(text)
        info = answer.get("usageInfo") or {}
        if answer.get("tokenUsage") is not None or info.get("tokensUsed") != USED_PER_CALL:
            self.tally.error("byok", f"not a BYOK answer: {text[:200]}")
            return
        self.tally.calls["byok"] += 1

    def order(self, user: str, variant: int) -> str:
        """A new order: its id, body and expected credit kept for the checks."""
        self.next_order += 1
        order_id = str(self.next_order)
        payload = {
            "meta": {
                "event_name": "order_created",
                "test_mode": False,
                "custom_data": {"user_id": user},
                "webhook_id": secrets.token_hex(8),
            },
            "data": {
                "type": "orders",
                "id": order_id,
                "attributes": {
                    "status": "paid",
                    "total": 999,
                    "currency": "USD",
                    "first_order_item": {"variant_id": variant},
                },
            },
        }
        self.tally.orders[order_id] = (user, variant)
        self.tally.bodies[order_id] = json.dumps(payload).encode()
        return order_id

    async def deliver(self, order_id: str) -> None:
        body = self.tally.bodies[order_id]
        signature = hmac.new(self.secret.encode(), body, hashlib.sha256).hexdigest()
        headers = {"Content-Type": "application/json", "X-Signature": signature}
        self.tally.deliveries[order_id] += 1
        try:
            async with self.session.post(
                f"{self.base}/webhooks/lemonsqueezy", data=body, headers=headers
            ) as r:
                text = await r.text()
        except (aiohttp.ClientError, TimeoutError) as exc:
            self.tally.error("webhook", repr(exc))
            return
        if r.status != 200:
            self.tally.error("webhook", f"HTTP {r.status} {text}")
            return
        status = str(json.loads(text).get("status"))
        self.tally.outcomes[status] += 1
        if status == "applied":
            self.tally.applied[order_id] += 1
        elif status != "duplicate":
            self.tally.error("webhook", f"order {order_id}: {text[:200]}")
            return
        self.tally.calls["webhook"] += 1

    async def webhook(self, n: int) -> None:
        """One op in ten delivers a new order twice at once, one in ten repeats an earlier
        order; the others deliver a new order once."""
        if n % 10 == 5 and self.tally.orders:
            earlier = list(self.tally.orders)
            await self.deliver(earlier[(n * 7919) % len(earlier)])
            return
        user = METERED_USERS[(n * 13 + 1) % len(METERED_USERS)]
        order_id = self.order(user, ORDER_VARIANTS[n % len(ORDER_VARIANTS)])
        if n % 10 == 0:
            await asyncio.gather(self.deliver(order_id), self.deliver(order_id))
        else:
            await self.deliver(order_id)


async def paced(
    kind: Kind, index: int, op: Callable[[int], Awaitable[None]], stop: asyncio.Event
) -> None:
    """One caller of `kind`: a call every callers/rate seconds, offset so the callers of a kind
    spread evenly; a late call starts at once, without a burst to catch up."""
    loop = asyncio.get_running_loop()
    period = kind.callers / kind.rate
    next_at = loop.time() + period * index / kind.callers
    n = index
    while not stop.is_set():
        delay = next_at - loop.time()
        if delay > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
            if stop.is_set():
                break
        await op(n)
        n += kind.callers
        next_at = max(next_at + period, loop.time())


# ---- what the services hold ------------------------------------------------------------------


@dataclass
class Tree:
    """A service's process tree: its root (the supervisor, or the process) and its children."""

    name: str
    pid: int
    workers: frozenset[int] = frozenset()

    def processes(self) -> list[psutil.Process]:
        root = psutil.Process(self.pid)
        return [root, *root.children(recursive=True)]


@dataclass
class Usage:
    rss: int = 0
    fds: int = 0
    conns: int = 0  # TCP and Unix sockets
    private: int = 0  # USS, Postgres only: its RSS counts each touched shared buffer per backend
    pids: frozenset[int] = frozenset()

    @property
    def memory(self) -> int:
        """The figure the memory bound applies to."""
        return self.private or self.rss


def measure(tree: Tree) -> Usage:
    usage = Usage()
    pids = set()
    for proc in tree.processes():
        try:
            usage.rss += proc.memory_info().rss
            if tree.name == "postgres":
                usage.private += proc.memory_full_info().uss
            usage.fds += proc.num_fds()
            usage.conns += len(proc.net_connections(kind="all"))
            pids.add(proc.pid)
        except psutil.NoSuchProcess:
            continue
    usage.pids = frozenset(pids)
    return usage


def outbox_depth(path: Path) -> tuple[int, int]:
    """(pending, refused) jobs in the gateway's outbox file (shared by its workers)."""
    if not path.exists():
        return 0, 0
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5.0)
    try:
        row = db.execute(
            "SELECT count(*) FILTER (WHERE refused IS NULL),"
            " count(*) FILTER (WHERE refused IS NOT NULL) FROM jobs"
        ).fetchone()
    except sqlite3.OperationalError:  # no table yet
        return 0, 0
    finally:
        db.close()
    return int(row[0]), int(row[1])


@dataclass
class Sample:
    label: str
    elapsed: float
    calls: Counter[str]
    errors: int
    usage: dict[str, Usage]
    holds: int
    outbox: tuple[int, int]
    loadgen_cpu: float  # share of one core since the previous sample

    def line(self) -> str:
        calls = " ".join(f"{k.name} {self.calls[k.name]}" for k in KINDS)
        rss = " ".join(
            f"{n} {u.rss / 2**20:.0f}"
            + (f" (private {u.private / 2**20:.0f})" if u.private else "")
            for n, u in self.usage.items()
        )
        fds = " ".join(f"{n} {u.fds}/{u.conns}" for n, u in self.usage.items())
        pending, refused = self.outbox
        return (
            f"[{self.label:>6}] calls {calls} | errors {self.errors} | RSS MiB {rss}"
            f" | holds {self.holds} | outbox {pending}+{refused} refused | fds/conns {fds}"
            f" | loadgen cpu {self.loadgen_cpu:.0%}"
        )


class Sampler:
    def __init__(
        self, trees: list[Tree], db: asyncpg.Connection, outbox: Path, tally: Tally
    ) -> None:
        self.trees = trees
        self.db = db
        self.outbox = outbox
        self.tally = tally
        self.samples: list[Sample] = []
        self.started = time.monotonic()
        self.cpu_at = (time.monotonic(), time.process_time())

    async def open_holds(self) -> int:
        count: int = await self.db.fetchval("SELECT count(*) FROM holds WHERE status = 'held'")
        return count

    async def take(self, label: str | None = None) -> Sample:
        usage = await asyncio.to_thread(lambda: {t.name: measure(t) for t in self.trees})
        if "postgres" in usage:
            # Its clients come over a Unix socket: count them as Postgres sees them.
            usage["postgres"].conns = await self.db.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'"
            )
        pending = await asyncio.to_thread(outbox_depth, self.outbox)
        now, cpu = time.monotonic(), time.process_time()
        wall, spent = now - self.cpu_at[0], cpu - self.cpu_at[1]
        self.cpu_at = (now, cpu)
        elapsed = now - self.started
        sample = Sample(
            label or f"{elapsed:.0f}s",
            elapsed,
            Counter(self.tally.calls),
            sum(self.tally.errors.values()),
            usage,
            await self.open_holds(),
            pending,
            spent / wall if wall > 0 else 0.0,
        )
        self.samples.append(sample)
        print(sample.line(), flush=True)
        return sample


# ---- the stack -------------------------------------------------------------------------------


def _drain_output(service: processes.Service, path: Path) -> None:
    """A service's output (WARNING and above) to a file: an unread pipe would block it."""

    def pump() -> None:
        assert service.proc.stdout is not None
        with path.open("w") as out:
            for line in service.proc.stdout:
                out.write(line)
                out.flush()

    threading.Thread(target=pump, daemon=True).start()


@dataclass
class Stack:
    url: str
    http: str
    webhook_secret: str
    outbox: Path
    logs: Path
    trees: list[Tree]


@contextlib.contextmanager
def stack() -> Iterator[Stack]:
    admin = with_database(start_embedded(DATA), "postgres")
    url = recreate_database(admin, "rpcai_soak")
    migrate(url)
    logs = DATA / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    gateway_data = DATA / "gateway"
    outbox = gateway_data / "gateway-outbox.sqlite3"
    for stale in gateway_data.glob("gateway-outbox.sqlite3*"):
        stale.unlink()  # a fresh database: a previous run's jobs would name unknown holds
    webhook_secret = secrets.token_hex(24)
    started: list[tuple[str, processes.Service]] = []
    try:

        def start(name: str, module: str, env: dict[str, str]) -> processes.Service:
            service = processes.start(module, {"LOG_LEVEL": "WARNING", **env})
            started.append((name, service))
            _drain_output(service, logs / f"{name}.log")
            return service

        ledger = start(
            "ledger",
            "ledger_service",
            {
                "DATABASE_URL": url,
                "LEDGER_ADDR": "127.0.0.1:0",
                "LEDGER_SERVICE_TOKEN": LEDGER_TOKEN,
                "WORKERS": "2",
            },
        )
        sim = start("provider", "provider_sim", {"PROVIDER_SIM_ADDR": "127.0.0.1:0"})
        redis = processes.start_redis(processes.free_port())
        started.append(("redis", redis))
        provider_url = f"http://{sim.address}"
        http = f"127.0.0.1:{processes.free_port()}"
        gateway = start(
            "gateway",
            "gateway_service",
            {
                "GATEWAY_ADDR": "127.0.0.1:0",
                "HTTP_ADDR": http,
                "LEDGER_ADDR": ledger.address,
                "LEDGER_SERVICE_TOKEN": LEDGER_TOKEN,
                "JWT_SECRET": JWT_SECRET,
                "JWT_ISSUER": "",
                "JWT_AUDIENCE": "",
                "ANTHROPIC_BASE_URL": provider_url,
                "ANTHROPIC_API_KEY": "soak-platform-key",
                "OPENAI_BASE_URL": f"{provider_url}/v1",
                "OPENAI_API_KEY": "soak-platform-key",
                "DATA_DIR": str(gateway_data),
                "REDIS_URL": f"redis://{redis.address}/0",
                "WORKERS": "2",
                "LEMONSQUEEZY_WEBHOOK_SECRET": webhook_secret,
                "LEMONSQUEEZY_VARIANT_TOKENS": json.dumps(
                    {str(k): v for k, v in VARIANT_TOKENS.items()}
                ),
            },
        )
        pidfile = DATA / "postgres" / "postmaster.pid"
        trees = [
            Tree("gateway", gateway.proc.pid),
            Tree("ledger", ledger.proc.pid),
            Tree("provider", sim.proc.pid),
            Tree("redis", redis.proc.pid),
            Tree("postgres", int(pidfile.read_text().split()[0])),
        ]
        yield Stack(url, http, webhook_secret, outbox, logs, trees)
    finally:
        for _, service in reversed(started):
            service.stop()


async def wait_ready(http: str, deadline: float = 60.0) -> None:
    end = time.monotonic() + deadline
    async with aiohttp.ClientSession() as session:
        while True:
            with contextlib.suppress(aiohttp.ClientError):
                async with session.get(f"http://{http}/readyz") as r:
                    if r.status == 200:
                        return
            if time.monotonic() > end:
                raise RuntimeError(f"the gateway at {http} was not ready within {deadline:.0f}s")
            await asyncio.sleep(0.2)


# ---- the books -------------------------------------------------------------------------------


async def books(url: str, tally: Tally) -> list[str]:
    """Every reason the money is not exact (empty: exact), from the ledger's own tables."""
    failures: list[str] = []
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch(
            """SELECT user_type, count(*) AS n,
                      count(*) FILTER (WHERE tokens_charged <> CASE user_type
                          WHEN 'subscription' THEN $1::bigint ELSE 0 END) AS wrong
                 FROM usage_records GROUP BY user_type""",
            CHARGED_PER_CALL,
        )
        records = {r["user_type"]: (r["n"], r["wrong"]) for r in rows}
        served = sum(tally.served.values())
        uncertain = sum(tally.uncertain.values())
        metered, wrong = records.pop("subscription", (0, 0))
        if wrong or not served <= metered <= served + uncertain:
            failures.append(
                f"usage records: {metered} metered ({wrong} not charged {CHARGED_PER_CALL}),"
                f" {served} served (+{uncertain} unknown outcome)"
            )
        byok, wrong = records.pop("byok", (0, 0))
        # A BYOK call that failed on the client's side may still have been recorded.
        if wrong or not tally.calls["byok"] <= byok <= tally.calls["byok"] + tally.errors["byok"]:
            failures.append(f"usage records: {byok} BYOK, {tally.calls['byok']} served")
        if records:
            failures.append(f"unexpected usage records: {records}")

        credit = tally.expected_credit()
        bought = {
            r["user_id"]: (r["n"], r["credited"])
            for r in await conn.fetch(
                """SELECT user_id, count(*) AS n, sum(tokens_credited) AS credited
                     FROM purchases WHERE source = 'lemonsqueezy' GROUP BY user_id"""
            )
        }
        orders_of: Counter[str] = Counter(user for user, _ in tally.orders.values())
        for user in sorted(set(credit) | set(bought)):
            n, credited = bought.get(user, (0, 0))
            if (n, credited) != (orders_of[user], credit[user]):
                failures.append(
                    f"{user}: {n} purchases crediting {credited} tokens; the webhooks bought"
                    f" {orders_of[user]} crediting {credit[user]}"
                )

        balances = {
            r["user_id"]: (r["available"], r["reserved"], r["owed"])
            for r in await conn.fetch(
                "SELECT user_id, available, reserved, owed FROM accounts WHERE user_id IS NOT NULL"
            )
        }
        for user in METERED_USERS:
            available, reserved, owed = balances.get(user, (0, 0, 0))
            most = credit[user] - CHARGED_PER_CALL * tally.served[user]
            least = most - CHARGED_PER_CALL * tally.uncertain[user]
            if not least <= available <= most or reserved or owed:
                failures.append(
                    f"{user}: available {available} reserved {reserved} owed {owed}; expected"
                    f" available {most} (credited {credit[user]} - {CHARGED_PER_CALL} x"
                    f" {tally.served[user]} calls)"
                )
    finally:
        await conn.close()
    report = await run_audit(url)
    if not report.ok:
        failures.append("ledger audit:\n" + report.render())
    return failures


# ---- the run ---------------------------------------------------------------------------------


def grew(first: int, later: int, percent: int, extra: int) -> bool:
    return later > first + first * percent // 100 + extra


async def soak(s: Stack, seconds: float, every: float) -> int:
    await wait_ready(s.http)
    tally = Tally()
    load = Load(f"http://{s.http}", s.webhook_secret, seconds + 3600, tally)
    db = await asyncpg.connect(s.url)
    failures: list[str] = []
    try:
        # Every balance comes from a webhook purchase: a large one per metered user first.
        for user in METERED_USERS:
            await load.deliver(load.order(user, SEED_VARIANT))
        seeded = tally.calls["webhook"]
        print(f"seeded {seeded} users by webhook; load for {seconds:.0f}s", flush=True)
        for tree in s.trees:
            tree.workers = frozenset(p.pid for p in tree.processes()[1:])
        sampler = Sampler(s.trees, db, s.outbox, tally)
        stop = asyncio.Event()
        ops = {"unary": load.unary, "stream": load.stream, "byok": load.byok}
        ops["webhook"] = load.webhook
        callers = [
            asyncio.create_task(paced(kind, i, ops[kind.name], stop))
            for kind in KINDS
            for i in range(kind.callers)
        ]
        end = sampler.started + seconds
        next_sample = sampler.started + every
        while (now := time.monotonic()) < end:
            await asyncio.sleep(min(next_sample, end) - now)
            if time.monotonic() >= next_sample - 0.01:
                await sampler.take()
                next_sample += every
        stop.set()
        drain_end = time.monotonic() + DRAIN_SECONDS
        _, running = await asyncio.wait(callers, timeout=DRAIN_SECONDS)
        if running:
            failures.append(f"{len(running)} call(s) still running {DRAIN_SECONDS:.0f}s after")
            for task in running:
                task.cancel()
            await asyncio.gather(*running, return_exceptions=True)
        await load.close()
        # What the gateway still owes the ledger lands within a moment: poll, with a deadline.
        while time.monotonic() < drain_end:
            if await sampler.open_holds() == 0 and outbox_depth(s.outbox) == (0, 0):
                break
            await asyncio.sleep(0.5)
        await asyncio.sleep(2.0)  # the closed connections leave the servers' tables
        await sampler.take("end")
        failures += checks(sampler.samples, s.trees, tally)
        money = await books(s.url, tally)
    finally:
        await db.close()
        if not load.session.closed:
            await load.close()
    failures += money
    print(summary(sampler.samples, tally, seeded, (seconds, every), s.logs, failures, money))
    return 1 if failures else 0


def checks(samples: list[Sample], trees: list[Tree], tally: Tally) -> list[str]:
    failures: list[str] = []
    if tally.errors:
        failures.append(
            f"{sum(tally.errors.values())} call(s) failed ({dict(tally.errors)}); first: "
            + "; ".join(tally.error_samples)
        )
    if len(samples) < 2:
        failures.append("fewer than two samples: SOAK_SECONDS must exceed SOAK_SAMPLE_SECONDS")
        return failures
    first, final = samples[0], samples[-1]
    for tree in trees:
        base = first.usage[tree.name]
        for sample in samples[1:]:
            now = sample.usage[tree.name]
            if grew(base.memory, now.memory, RSS_GROWTH_PERCENT, RSS_GROWTH_MIB * 2**20):
                failures.append(
                    f"{tree.name} {'private memory' if base.private else 'RSS'} grew"
                    f" {base.memory / 2**20:.0f} -> {now.memory / 2**20:.0f} MiB at"
                    f" {sample.label} (bound: +{RSS_GROWTH_PERCENT}% + {RSS_GROWTH_MIB} MiB)"
                )
            extra = FD_GROWTH_AFTER_DRAIN if sample is final else FD_GROWTH_UNDER_LOAD
            counts = [("connections", base.conns, now.conns)]
            if tree.name in FD_BOUND_SERVICES:
                counts.append(("descriptors", base.fds, now.fds))
            for what, a, b in counts:
                if grew(a, b, FD_GROWTH_PERCENT, extra):
                    failures.append(
                        f"{tree.name} {what} grew {a} -> {b} at {sample.label}"
                        f" (bound: +{FD_GROWTH_PERCENT}% + {extra})"
                    )
        if tree.name != "postgres":  # backends come and go with connections; the root stays
            workers = frozenset(final.usage[tree.name].pids) - {tree.pid}
            if tree.workers and workers != tree.workers:
                failures.append(f"{tree.name}: worker processes replaced (a crash?)")
    if final.holds:
        failures.append(f"{final.holds} hold(s) still open after the drain")
    if final.outbox != (0, 0):
        failures.append(
            f"the outbox is not empty: {final.outbox[0]} pending, {final.outbox[1]} refused"
        )
    repeats = sum(tally.deliveries.values()) - len(tally.orders)
    not_once = [o for o in tally.orders if tally.applied[o] != 1]
    if not_once:
        failures.append(f"{len(not_once)} order(s) not applied exactly once, e.g. {not_once[:5]}")
    if tally.outcomes["duplicate"] != repeats:
        failures.append(
            f"{tally.outcomes['duplicate']} deliveries answered duplicate, {repeats} repeated"
        )
    return failures


def summary(
    samples: list[Sample],
    tally: Tally,
    seeded: int,
    timing: tuple[float, float],
    logs: Path,
    failures: list[str],
    money: list[str],
) -> str:
    seconds, every = timing
    first, final = samples[0], samples[-1]
    under_load = samples[:-1] or samples
    rows = []
    limit = f"<= {{:.0f}} MiB (+{RSS_GROWTH_PERCENT}% + {RSS_GROWTH_MIB})"
    for name, base in first.usage.items():
        rss = [s.usage[name].rss / 2**20 for s in samples]
        bound = base.memory / 2**20 * (1 + RSS_GROWTH_PERCENT / 100) + RSS_GROWTH_MIB
        rows.append(
            [
                name,
                " ".join(f"{v:.0f}" for v in rss),
                "reported" if base.private else limit.format(bound),
                f"{base.fds}->{max(s.usage[name].fds for s in samples)}->{final.usage[name].fds}",
                f"{base.conns}->{max(s.usage[name].conns for s in samples)}"
                f"->{final.usage[name].conns}",
            ]
        )
        if base.private:
            private = [s.usage[name].private / 2**20 for s in samples]
            rows.append(
                [
                    f"{name} private",
                    " ".join(f"{v:.0f}" for v in private),
                    limit.format(bound),
                    "",
                    "",
                ]
            )
    total = sum(tally.calls.values()) + sum(tally.errors.values())
    cpu = sum(s.loadgen_cpu for s in under_load) / len(under_load)
    orders = len(tally.orders)
    repeats = sum(tally.deliveries.values()) - orders
    credited = sum(tally.expected_credit().values())
    logged = {p.stem: log_digest(p) for p in sorted(logs.glob("*.log"))}
    holds = max(s.holds for s in under_load)
    lines = [
        "",
        "==== soak summary ====",
        f"rpcai soak: {seconds:.0f}s of steady mixed load, {os.cpu_count()} cores,"
        f" Python {platform.python_version()}; gateway x2 (HTTP edge, rate limits in Redis),"
        " ledger x2, embedded Postgres, provider stand-in; samples every"
        f" {every:.0f}s",
        "calls: "
        + ", ".join(f"{k.name} {tally.calls[k.name]} (~{k.rate:g}/s)" for k in KINDS)
        + f"; {total / seconds:.0f} calls/s in all, errors"
        f" {sum(tally.errors.values())}; load generator CPU {cpu:.0%} of a core",
        f"webhooks: {orders} orders ({seeded} seed purchases), {repeats} repeated deliveries"
        f" (answered duplicate: {tally.outcomes['duplicate']}), {credited} tokens credited as"
        " bought",
        table(
            [
                "service",
                "MiB per sample (RSS; last: after drain)",
                "memory bound",
                "fds first->max->end",
                "conns first->max->end",
            ],
            rows,
        ),
        f"open holds: at most {holds} under load, {final.holds} after the drain; outbox:"
        f" {final.outbox[0]} pending, {final.outbox[1]} refused",
        f"books: {sum(tally.served.values())} metered calls served, {tally.calls['byok']} BYOK"
        + (
            f" calls served: every one charged {CHARGED_PER_CALL} (BYOK 0), the"
            f" {len(METERED_USERS)} balances exact, audit clean"
            if not money
            else ": NOT EXACT (below)"
        ),
        f"bounds over the first sample: RSS +{RSS_GROWTH_PERCENT}% + {RSS_GROWTH_MIB} MiB;"
        f" descriptors and connections +{FD_GROWTH_PERCENT}% + {FD_GROWTH_UNDER_LOAD} under"
        f" load, + {FD_GROWTH_AFTER_DRAIN} after the drain (Postgres: connections = client"
        " backends; its private memory (USS) is bound, its RSS and files reported)",
        f"service log lines at WARNING and above ({logs}): "
        + "; ".join(f"{name} {digest}" for name, digest in logged.items()),
    ]
    if failures:
        lines.append("SOAK FAILED:")
        lines += [f"  - {f}" for f in failures]
    else:
        lines.append("SOAK PASSED")
    return "\n".join(line.rstrip() for line in "\n".join(lines).splitlines())


def log_digest(path: Path) -> str:
    """How many lines a service logged (LOG_LEVEL=WARNING) and its most frequent messages."""
    messages: Counter[str] = Counter()
    for line in path.read_text(errors="replace").splitlines():
        if not line.strip() or "listening on" in line:
            continue
        try:
            record = json.loads(line)
            message = f"{record.get('level', '')} {record.get('message', '')}".strip()
        except (ValueError, AttributeError):
            message = line.strip()
        messages[message[:120]] += 1
    if not messages:
        return "0"
    top = ", ".join(f"{n}x {m!r}" for m, n in messages.most_common(3))
    return f"{messages.total()} ({top})"


def main() -> int:
    seconds = float(os.environ.get("SOAK_SECONDS", "600"))
    every = float(os.environ.get("SOAK_SAMPLE_SECONDS", "60"))
    if seconds < 2 * every:
        print("SOAK_SECONDS must be at least twice SOAK_SAMPLE_SECONDS", file=sys.stderr)
        return 2
    print(f"rpcai soak: {seconds:.0f}s, a sample every {every:.0f}s", flush=True)
    with stack() as s:
        return eventloop.run(soak(s, seconds, every))


if __name__ == "__main__":
    sys.exit(main())
