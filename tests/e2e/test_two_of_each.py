"""Two gateways and two ledgers on one Postgres, as real processes, stay exact when a ledger is
SIGKILLed mid-run and restarted.

Each gateway talks to its own ledger; both serve the same users at once. Keyed unary calls are
retried by their client (same Idempotency-Key, either gateway) until answered, so each is served
and charged exactly once, whichever gateway, ledger or outbox carried it. Streams run to the end
or are cancelled by their client after two chunks. The provider stand-in reports fixed usage, a
distinct input count per kind of call, so the ledger's usage rows can be told apart:

- unary (40 in, 60 out): one row per answered call, each charge_for(100), and every answer says so
  (or says its settlement is pending, for usage of 100);
- completed streams (50 in, 20 out): a row for each, charge_for(70);
- cancelled streams (30 in, up to 200 out): at most one row each, never more than its hold;
- each balance = credited - the sum of its user's usage rows, nothing reserved, no hold open once
  the gateways' outboxes drained, nothing left in either outbox, and the ledger's audit is clean.
"""

from __future__ import annotations

import asyncio
import json
import random
import sqlite3
import threading
import time
import uuid
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import asyncpg
import grpc
import pytest

from ledger_service.audit import run_audit
from shared import processes
from shared.gen.rpcai.ledger.v1 import ledger_pb2 as pb
from shared.gen.rpcai.ledger.v1 import ledger_pb2_grpc
from tests.chaos.harness import LedgerProcess, free_port, ledger_env
from tests.conftest import AUTH
from tests.e2e.conftest import (
    NO_LIMITS,
    gateway_process_env,
    mint,
)
from tests.e2e.e2e_support import charge_for, held_for
from tests.ledger_service.helpers import credit

pytestmark = [pytest.mark.timeout(120)]

USERS = 4
UNARY = 120
STREAMS = 30
CANCELLED = 30
CONCURRENCY = 24
KILL_AFTER = 50  # calls answered before the ledger is killed
CREDITED = 8000  # of a 10,000-token purchase
UNARY_CONTENT = "[[usage:40,60]] two of each"
STREAM_CONTENT = "[[usage:50,20]] [[pace:0.01]] a short story"
CANCELLED_CONTENT = "[[usage:30,200]] [[pace:0.02]] a long story"
MAX_TOKENS = 200
ANSWER_WITHIN = 60.0


@dataclass
class Gateway:
    service: processes.Service
    http: str
    data_dir: Path
    tail: deque[str] = field(default_factory=lambda: deque(maxlen=100))

    def drain(self) -> None:
        def pump() -> None:
            assert self.service.proc.stdout is not None
            for line in self.service.proc.stdout:
                self.tail.append(line.rstrip())

        threading.Thread(target=pump, daemon=True).start()


def start_gateway(ledger_addr: str, sim_url: str, data_dir: Path) -> Gateway:
    env = gateway_process_env(
        ledger_addr,
        sim_url,
        str(data_dir),
        WORKERS="1",
        RATE_LIMITS=NO_LIMITS,
        LEDGER_TIMEOUT_SECONDS="2",
        # A hold whose Reserve answer died with the ledger expires soon after the run.
        HOLD_TTL_SECONDS="5",
        STREAM_WRITE_TIMEOUT_SECONDS="2",
        SHUTDOWN_GRACE_SECONDS="10",
        LOG_LEVEL="WARNING",
    )
    service = processes.start("gateway_service", env)
    assert service.proc.stdout is not None
    second = service.proc.stdout.readline()
    assert second.startswith("gateway http listening on "), second
    gateway = Gateway(service, "http://" + second.rsplit(" ", 1)[1].strip(), data_dir)
    gateway.drain()
    return gateway


@dataclass
class Tally:
    answered: Counter[str] = field(default_factory=Counter)  # user -> unary calls answered
    streamed: Counter[str] = field(default_factory=Counter)  # user -> streams completed
    failed_streams: Counter[str] = field(default_factory=Counter)
    cancelled: Counter[str] = field(default_factory=Counter)  # streams the client meant to leave
    left: int = 0  # of those, the ones that got their two chunks before the client left
    retries: int = 0
    in_progress: int = 0  # retries told their first attempt's hold is still open
    pending_settlements: int = 0
    done: int = 0


def charged_in(token_usage: dict[str, int | bool]) -> int:
    """What the answer says the call costs: the charge, or the usage still being settled."""
    if token_usage["settlementPending"]:
        return charge_for(int(token_usage["tokensUsed"]))
    return int(token_usage["tokensCharged"])


async def unary(
    session: aiohttp.ClientSession, gateways: list[Gateway], user: str, tally: Tally
) -> None:
    """One keyed call, retried with its key on either gateway until it is answered."""
    body = {"content": UNARY_CONTENT, "maxTokens": MAX_TOKENS, "idempotencyKey": uuid.uuid4().hex}
    headers = {"Authorization": f"Bearer {mint(user)}"}
    deadline = time.monotonic() + ANSWER_WITHIN
    while True:
        gateway = random.choice(gateways)
        try:
            async with session.post(
                f"{gateway.http}/v1/generate", json=body, headers=headers
            ) as response:
                answer = await response.json()
                if response.status == 200:
                    assert charged_in(answer["tokenUsage"]) == charge_for(100), answer
                    tally.pending_settlements += bool(answer["tokenUsage"]["settlementPending"])
                    tally.answered[user] += 1
                    tally.done += 1
                    return
                # The ledger down, or an attempt whose hold outlived its lost Reserve answer
                # (answered once its gateway releases the hold, or, that gateway killed, once
                # the hold expires): retry. Never refused otherwise.
                in_progress = answer.get("error", {}).get("reason") == "REQUEST_IN_PROGRESS"
                assert response.status >= 500 or in_progress, answer
                tally.in_progress += in_progress
        except (aiohttp.ClientError, json.JSONDecodeError):
            pass
        assert time.monotonic() < deadline, f"no answer within {ANSWER_WITHIN}s"
        tally.retries += 1
        await asyncio.sleep(random.uniform(0.05, 0.2))


async def stream(
    session: aiohttp.ClientSession,
    gateways: list[Gateway],
    user: str,
    tally: Tally,
    *,
    cancel: bool,
) -> None:
    content = CANCELLED_CONTENT if cancel else STREAM_CONTENT
    if cancel:
        tally.cancelled[user] += 1  # however it ends: at most one charge, within its hold
    try:
        async with session.post(
            f"{random.choice(gateways).http}/v1/generate/stream",
            json={"content": content, "maxTokens": MAX_TOKENS},
            headers={"Authorization": f"Bearer {mint(user)}"},
        ) as response:
            if response.status != 200:
                tally.failed_streams[user] += not cancel
                return
            events: list[tuple[str, str]] = []
            event = ""
            async for raw in response.content:
                line = raw.decode().rstrip("\n")
                if line.startswith("event: "):
                    event = line[len("event: ") :]
                elif line.startswith("data: "):
                    events.append((event, line[len("data: ") :]))
                    if cancel and sum(name == "delta" for name, _ in events) == 2:
                        response.close()  # the client leaves mid-stream
                        tally.left += 1
                        return
            usage = [json.loads(data) for name, data in events if name == "usage"]
            if cancel or not usage or events[-1][0] != "done":
                tally.failed_streams[user] += not cancel  # ended early: charged or not
                return
            assert charged_in(usage[0]["tokenUsage"]) == charge_for(70), usage
            tally.streamed[user] += 1
    except aiohttp.ClientError:
        tally.failed_streams[user] += not cancel
    finally:
        tally.done += 1


async def monkey(ledger: LedgerProcess, tally: Tally) -> None:
    while tally.done < KILL_AFTER:
        await asyncio.sleep(0.01)
    ledger.kill()
    await asyncio.sleep(0.5)  # calls through this ledger's gateway fail meanwhile
    ledger.restarting = asyncio.get_running_loop().run_in_executor(None, ledger.start)
    await asyncio.shield(ledger.restarting)


async def run_calls(gateways: list[Gateway], users: list[str], tally: Tally) -> None:
    kinds = ["unary"] * UNARY + ["stream"] * STREAMS + ["cancel"] * CANCELLED
    random.Random(9).shuffle(kinds)
    slots = asyncio.Semaphore(CONCURRENCY)
    connector = aiohttp.TCPConnector(limit=CONCURRENCY * 2)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one(i: int, kind: str) -> None:
            user = users[i % len(users)]
            async with slots:
                if kind == "unary":
                    await unary(session, gateways, user, tally)
                else:
                    await stream(session, gateways, user, tally, cancel=kind == "cancel")

        await asyncio.gather(*(one(i, kind) for i, kind in enumerate(kinds)))


async def wait_no_open_holds(database_url: str, within: float) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        deadline = time.monotonic() + within
        while True:
            held = await conn.fetchval("SELECT count(*) FROM holds WHERE status = 'held'")
            if held == 0:
                return
            assert time.monotonic() < deadline, f"{held} hold(s) still open after {within}s"
            await asyncio.sleep(0.1)
    finally:
        await conn.close()


def outbox_jobs(data_dir: Path) -> int:
    path = data_dir / "gateway-outbox.sqlite3"
    if not path.exists():
        return 0
    db = sqlite3.connect(path)
    try:
        count: int = db.execute("SELECT count(*) FROM jobs").fetchone()[0]
        return count
    finally:
        db.close()


@pytest.mark.slow
async def test_two_gateways_two_ledgers_a_killed_ledger_and_exact_money(
    database_url: str, tmp_path: Path
) -> None:
    sim = processes.start("provider_sim", {"PROVIDER_SIM_ADDR": "127.0.0.1:0"})
    ledgers = [LedgerProcess(ledger_env(database_url, free_port())) for _ in range(2)]
    gateways: list[Gateway] = []
    try:
        await asyncio.gather(*(asyncio.to_thread(ledger.start) for ledger in ledgers))
        gateways = await asyncio.gather(
            *(
                asyncio.to_thread(
                    start_gateway, ledger.address, f"http://{sim.address}", tmp_path / f"gw{i}"
                )
                for i, ledger in enumerate(ledgers)
            )
        )
        users = [f"two-of-each-{i}-{uuid.uuid4().hex[:6]}" for i in range(USERS)]
        async with grpc.aio.insecure_channel(ledgers[1].address) as channel:
            stub = ledger_pb2_grpc.LedgerServiceStub(channel)
            for user in users:
                await credit(stub, user, 10_000)

        tally = Tally()
        await asyncio.gather(run_calls(gateways, users, tally), monkey(ledgers[0], tally))
        await wait_no_open_holds(database_url, within=30)

        codes = [await asyncio.to_thread(g.service.stop, 30) for g in gateways]
        assert codes == [0, 0], f"gateways stopped with {codes}"
        assert [outbox_jobs(g.data_dir) for g in gateways] == [0, 0], "a queued write stranded"
        await check_money(database_url, ledgers[1].address, users, tally)
    except Exception as exc:
        for i, gateway in enumerate(gateways):
            exc.add_note(f"gateway {i}:\n" + "\n".join(list(gateway.tail)[-30:]))
        for i, ledger in enumerate(ledgers):
            exc.add_note(f"ledger {i}:\n{ledger.last_lines(30)}")
        raise
    finally:
        for gateway in gateways:
            gateway.service.stop()
        exits = [await ledger.shutdown() for ledger in ledgers]
        sim.stop()
    assert ledgers[0].starts == 2
    assert exits == [0, 0]
    streams = (
        f"{sum(tally.streamed.values())} streams completed,"
        f" {sum(tally.failed_streams.values())} cut, {tally.left} of {CANCELLED} cancelled"
    )
    print(
        f"two of each: {sum(tally.answered.values())} unary answered after {tally.retries}"
        f" retries ({tally.in_progress} in progress, {tally.pending_settlements} settled later),"
        f" {streams}"
    )


async def check_money(database_url: str, ledger_addr: str, users: list[str], tally: Tally) -> None:
    assert sum(tally.answered.values()) == UNARY
    assert tally.left >= CANCELLED // 3, "too few streams were cancelled mid-stream"
    cancelled_hold = held_for(CANCELLED_CONTENT, MAX_TOKENS)
    conn = await asyncpg.connect(database_url)
    try:
        async with grpc.aio.insecure_channel(ledger_addr) as channel:
            stub = ledger_pb2_grpc.LedgerServiceStub(channel)
            for user in users:
                rows = await conn.fetch(
                    "SELECT input_tokens, output_tokens, tokens_charged FROM usage_records"
                    " WHERE user_id = $1",
                    user,
                )
                by_input: dict[int, list[int]] = {40: [], 50: [], 30: []}
                for row in rows:
                    by_input[row["input_tokens"]].append(row["tokens_charged"])
                # Every answered unary call charged once, none twice, none unanswered.
                assert by_input[40] == [charge_for(100)] * tally.answered[user], user
                completed, cut = tally.streamed[user], tally.failed_streams[user]
                assert completed <= len(by_input[50]) <= completed + cut, user
                assert all(c == charge_for(70) for c in by_input[50]), user
                assert len(by_input[30]) <= tally.cancelled[user], user
                assert all(0 < c <= cancelled_hold for c in by_input[30]), user
                got = await stub.GetBalance(pb.GetBalanceRequest(user_id=user), metadata=AUTH)
                assert got.balance.reserved_tokens == 0, user
                assert got.balance.owed_tokens == 0, user
                spent = sum(sum(charges) for charges in by_input.values())
                assert got.balance.available_tokens == CREDITED - spent, user
    finally:
        await conn.close()
    report = await run_audit(database_url)
    assert report.ok, report.render()
