"""Ledgers as real processes (several on one database) that can be SIGKILLed and restarted on
the same port, and a client that spreads its calls over all of them and retries every call with
the identical request, on any of them, until the answer is definitive."""

from __future__ import annotations

import asyncio
import random
import socket
import threading
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import grpc
from google.protobuf.message import Message

from shared import processes
from shared.gen.rpcai.ledger.v1 import ledger_pb2_grpc
from shared.rich_errors import error_reason
from tests.chaos.model import Outcome
from tests.conftest import AUTH, SERVICE_TOKEN

# A crash or a restart in progress: the same request again (same key) is safe.
RETRYABLE = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    }
)
DEFINITIVE = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.ALREADY_EXISTS,
    }
)
ATTEMPT_TIMEOUT = 10.0
# Long enough for several restarts in a row; past it the test fails instead of hanging.
DEFINITIVE_WITHIN = 180.0
# The channel must find a restarted ledger fast (gRPC's default backoff grows to minutes).
CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 50),
    ("grpc.min_reconnect_backoff_ms", 50),
    ("grpc.max_reconnect_backoff_ms", 300),
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class LedgerProcess:
    """`python -m ledger_service` on a fixed address, so that a restart is found by the same
    channel. Its output is drained (a full pipe would block the ledger) and its tail kept for
    failure messages."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.address = env["LEDGER_ADDR"]
        self.database_url = env["DATABASE_URL"]
        self.service: processes.Service | None = None
        self.tail: deque[str] = deque(maxlen=200)
        self.starts = 0
        # A restart under way in a thread (starting blocks until the ledger listens).
        self.restarting: asyncio.Future[None] | None = None

    def start(self) -> None:
        self.service = processes.start("ledger_service", self.env)
        self.starts += 1
        threading.Thread(target=self._drain, args=(self.service,), daemon=True).start()

    def _drain(self, service: processes.Service) -> None:
        assert service.proc.stdout is not None
        for line in service.proc.stdout:
            self.tail.append(line.rstrip())

    def kill(self) -> None:
        assert self.service is not None
        self.service.kill()

    async def shutdown(self) -> int | None:
        """SIGTERM (a graceful stop), once any restart under way has finished; its exit code."""
        if self.restarting is not None:
            await asyncio.wait([self.restarting])
        return None if self.service is None else self.service.stop()

    def last_lines(self, n: int = 40) -> str:
        return "\n".join(list(self.tail)[-n:])


def ledger_env(database_url: str, port: int) -> dict[str, str]:
    return {
        "DATABASE_URL": database_url,
        "LEDGER_SERVICE_TOKEN": SERVICE_TOKEN,
        "LEDGER_ADDR": f"127.0.0.1:{port}",
        "SWEEP_INTERVAL_SECONDS": "0.2",
        "RESERVE_DEFAULT_TTL_SECONDS": "3600",
        "LOG_LEVEL": "WARNING",
        # One process per ledger: a SIGKILL is then a real crash, not a supervisor's drain.
        "WORKERS": "1",
        # The model assumes the default rates, whatever the caller's environment says.
        "PURCHASE_USER_SHARE_PERCENT": "80",
        "USAGE_FEE_PERCENT": "25",
    }


@dataclass
class Stats:
    ops: Counter[str] = field(default_factory=Counter)
    outcomes: Counter[str] = field(default_factory=Counter)
    retries: Counter[str] = field(default_factory=Counter)
    kills: int = 0
    duplicates: int = 0  # operations sent as 2-3 concurrent copies
    replays: int = 0  # earlier operations sent again with their key

    @property
    def total(self) -> int:
        """Operations of the workload (the replays after it are counted apart)."""
        return sum(n for op, n in self.ops.items() if op != "final_replay")

    def render(self, seed: int, seconds: float) -> str:
        retries = ", ".join(f"{code} {n}" for code, n in self.retries.most_common())
        outcomes = ", ".join(f"{name} {n}" for name, n in sorted(self.outcomes.items()))
        ops = ", ".join(f"{name} {n}" for name, n in sorted(self.ops.items()))
        refunds = self.ops["refund"] + self.ops["refund_on_hold"]
        return (
            f"ledger chaos: CHAOS_SEED={seed} ops={self.total} kills={self.kills}"
            f" retries={sum(self.retries.values())} duplicates={self.duplicates}"
            f" replays={self.replays} expiries={self.outcomes['expired']}"
            f" overruns={self.outcomes['overrun']} refunds={refunds}"
            f" wall={seconds:.1f}s\n  retries by code: {retries or '-'}"
            f"\n  operations: {ops}\n  outcomes: {outcomes}"
        )


class Client:
    """One grpc.aio channel per ledger, each reconnecting by itself after a restart. Every
    attempt goes to a ledger picked at random: a call and its retries land on either."""

    def __init__(self, addresses: list[str], stats: Stats) -> None:
        self.channels = [
            grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS) for address in addresses
        ]
        self.stubs = [ledger_pb2_grpc.LedgerServiceStub(channel) for channel in self.channels]
        self.stats = stats
        self.jitter = random.Random()  # timing and routing only: the operations come from the seed

    async def close(self) -> None:
        await asyncio.gather(*(channel.close() for channel in self.channels))

    async def call(self, rpc: str, request: Message) -> Outcome:
        """The definitive answer: a response or a (code, reason) refusal. Anything transient is
        retried with the identical request; an unexpected code fails the test."""
        deadline = time.monotonic() + DEFINITIVE_WITHIN
        backoff = 0.02
        while True:
            method: Callable[..., Awaitable[Message]] = getattr(self.jitter.choice(self.stubs), rpc)
            try:
                return await method(request, metadata=AUTH, timeout=ATTEMPT_TIMEOUT)
            except grpc.aio.AioRpcError as exc:
                code, details = exc.code(), exc.details()
                if code in DEFINITIVE:
                    return (code, error_reason(exc) or "")
            if code not in RETRYABLE:
                raise AssertionError(f"{rpc}: unexpected {code.name}: {details}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{rpc}: no definitive answer, last {code.name}: {details}")
            self.stats.retries[code.name] += 1
            await asyncio.sleep(backoff * (0.5 + self.jitter.random()))
            backoff = min(backoff * 2, 0.4)
