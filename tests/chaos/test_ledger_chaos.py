"""A randomized, model-based chaos test of the ledger over gRPC.

Two ledgers run as real processes on one fresh database. Many workers, each owning its own users,
send random operations (purchases, reserves, settles under and over the hold, releases, expiries
by the ledgers' own sweepers, late settles, refunds by tokens, by running total and by share,
replays, reused keys, concurrent duplicates) while either ledger is SIGKILLed several times and
restarted on the same port. Each attempt of a call goes to either ledger (concurrent duplicates
too, so both ledgers race on one key) and is retried with its key until its answer is definitive,
and every answer must be the one a plain model of the money rules predicts. At the end every
balance, hold and purchase equals the model, the platform accounts equal the model's sums, the
ledger's audit passes and earlier operations still replay like their originals.

Seeded: `CHAOS_SEED` fixes every operation (the kills land at seeded points of the run, their
exact timing is the machine's). `CHAOS_OPS` and `CHAOS_KILLS` size the run: a short one in
`make test`, the full one in `make chaos`.
"""

from __future__ import annotations

import asyncio
import os
import random
import time

import asyncpg
import pytest

from ledger_service.audit import run_audit
from shared.gen.rpcai.ledger.v1 import ledger_pb2 as pb
from tests.chaos.harness import Client, LedgerProcess, Stats, free_port, ledger_env
from tests.chaos.model import PLATFORM
from tests.chaos.report import REPORTS
from tests.chaos.workload import Progress, Worker, one_line

CHAOS_SEED = int(os.environ.get("CHAOS_SEED", "20261125"))
CHAOS_OPS = int(os.environ.get("CHAOS_OPS", "800"))
CHAOS_KILLS = int(os.environ.get("CHAOS_KILLS", "2"))
WORKERS = 8
LEDGERS = 2
USERS_PER_WORKER = 3
FINAL_REPLAYS_PER_USER = 5


def kill_points(rng: random.Random, ops: int, kills: int) -> list[int]:
    """After how many operations each kill comes: within the middle of the run, so that work is
    in flight before and after every one of them."""
    return sorted(rng.sample(range(ops // 10, ops * 9 // 10), kills))


async def chaos_monkey(
    ledgers: list[LedgerProcess],
    points: list[int],
    progress: Progress,
    stats: Stats,
    seed: int,
) -> None:
    rng = random.Random(f"{seed}:monkey")
    loop = asyncio.get_running_loop()
    for point in points:
        while progress.done < point:
            await asyncio.sleep(0.005)
        await asyncio.sleep(rng.uniform(0, 0.02))  # somewhere among the calls in flight
        ledger = rng.choice(ledgers)
        ledger.kill()
        stats.kills += 1
        await asyncio.sleep(rng.uniform(0.05, 0.5))  # the clients retry on the other meanwhile
        # Shielded: a failing run must not leave a ledger starting behind its back.
        ledger.restarting = loop.run_in_executor(None, ledger.start)
        await asyncio.shield(ledger.restarting)


async def run_workload(
    workers: list[Worker], ledgers: list[LedgerProcess], stats: Stats, progress: Progress
) -> None:
    share, extra = divmod(CHAOS_OPS, WORKERS)
    points = kill_points(random.Random(f"{CHAOS_SEED}:kills"), CHAOS_OPS, CHAOS_KILLS)
    tasks = [
        asyncio.create_task(worker.run(share + (i < extra))) for i, worker in enumerate(workers)
    ]
    tasks.append(asyncio.create_task(chaos_monkey(ledgers, points, progress, stats, CHAOS_SEED)))
    try:
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def check_books(
    client: Client, database_url: str, workers: list[Worker], start: dict[str, int]
) -> None:
    models = [model for worker in workers for model in worker.models]
    conn = await asyncpg.connect(database_url)
    try:
        for model in models:
            got = await client.call("GetBalance", pb.GetBalanceRequest(user_id=model.user))
            assert isinstance(got, pb.GetBalanceResponse), f"{model.user}: {one_line(got)}"
            assert got.balance == model.balance(), f"{model.user}: {one_line(got)}, model {model}"
            rows = await conn.fetch(
                "SELECT id, amount, status FROM holds WHERE user_id = $1", model.user
            )
            holds = {str(r["id"]): (r["amount"], r["status"]) for r in rows}
            assert holds == {h.id: (h.amount, h.status) for h in model.holds}, model.user
            rows = await conn.fetch(
                "SELECT id, tokens_purchased, tokens_credited, tokens_refunded FROM purchases"
                " WHERE user_id = $1",
                model.user,
            )
            purchases = {str(r["id"]): tuple(r)[1:] for r in rows}
            expected = {p.id: (p.tokens, p.credited, p.refunded) for p in model.purchases}
            assert purchases == expected, model.user
    finally:
        await conn.close()

    report = await run_audit(database_url)
    assert report.ok, report.render()
    platform = {code: report.platform_balances[code] - start.get(code, 0) for code in PLATFORM}
    assert platform == {code: sum(m.platform[code] for m in models) for code in PLATFORM}, (
        f"platform accounts: ledger {platform}"
    )


def timeout_seconds(ops: int, kills: int) -> float:
    # Generous: a hung run fails here instead of hanging the suite.
    return 120 + ops * 0.05 + kills * 30


@pytest.mark.slow
@pytest.mark.timeout(timeout_seconds(CHAOS_OPS, CHAOS_KILLS))
async def test_ledger_keeps_exact_books_through_sigkills(database_url: str) -> None:
    assert CHAOS_OPS >= 10 * WORKERS * USERS_PER_WORKER, "too few operations to mean anything"
    stats, progress = Stats(), Progress()
    start = (await run_audit(database_url)).platform_balances
    ledgers = [LedgerProcess(ledger_env(database_url, free_port())) for _ in range(LEDGERS)]
    await asyncio.gather(*(asyncio.to_thread(ledger.start) for ledger in ledgers))
    client = Client([ledger.address for ledger in ledgers], stats)
    db = await asyncpg.create_pool(database_url, min_size=1, max_size=WORKERS)
    workers = [
        Worker(i, CHAOS_SEED, USERS_PER_WORKER, client, db, stats, progress) for i in range(WORKERS)
    ]
    began = time.monotonic()
    try:
        await run_workload(workers, ledgers, stats, progress)
        ops = stats.total
        await asyncio.gather(*(w.final_replays(FINAL_REPLAYS_PER_USER) for w in workers))
        await check_books(client, database_url, workers, start)
    except Exception as exc:
        # The seed and the counts with the failure, whether or not output is captured.
        exc.add_note(stats.render(CHAOS_SEED, time.monotonic() - began))
        for i, ledger in enumerate(ledgers):
            exc.add_note(f"last output of ledger {i}:\n{ledger.last_lines()}")
        raise
    finally:
        await client.close()
        await db.close()
        exit_codes = [await ledger.shutdown() for ledger in ledgers]

    report = stats.render(CHAOS_SEED, time.monotonic() - began)
    REPORTS.append(report)
    print(report)
    assert ops >= CHAOS_OPS, report
    restarts = sum(ledger.starts - 1 for ledger in ledgers)
    assert stats.kills == CHAOS_KILLS == restarts, report
    assert exit_codes == [0] * LEDGERS, f"a ledger did not stop gracefully: {exit_codes}"
