"""Operator analytics on a year of history: how long GetPlatformAnalytics and GetUserAccount take
through the ledger's own gRPC server once the journal holds 1,000,000 calls.

A fresh database gets, by SQL `generate_series` (a minute or two, not a million calls), a year
of history shaped like a live platform's: 1,000,000 usage rows (about 2,700 calls a day by 300
users of a monthly 2,000, out of 20,000 accounts; 5% of the calls public BYOK, one model in six
unpriced, a user sticking mostly to one model), a purchase per 20
calls (three currencies, one in ten without a payment), a journal entry for every leg of those
(refunds with shortfalls, a few unbilled settles), a hold per metered call, 100 of them open.
Each query is timed before the rollup job ran (every call read from usage_records) and after
(whole months from usage_monthly, whole days from usage_daily); the job itself is timed too.

`BENCH_ONLY=analytics python -m bench`, or `python -m bench.analytics_bench`;
BENCH_ANALYTICS_ROWS (default 1,000,000) scales the history.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path

import asyncpg
import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from bench.ledger_bench import table
from ledger_service.app import create_app
from ledger_service.store.database import migrate, plain_url, recreate_database, start_embedded
from ledger_service.store.database import with_database as database_url_of
from shared.config import Settings
from shared.gen.rpcai.ledger.v1 import ledger_pb2 as pb
from shared.gen.rpcai.ledger.v1 import ledger_pb2_grpc

TOKEN = "bench-service-token"
DATABASE = "rpcai_analytics_bench"
ROWS = 1_000_000
DAYS = 365
USERS = 20_000
# Users with calls on a given day, drawn from a monthly pool (DAU/MAU 15%) that shifts by a third
# from one month to the next: about 2,000 users a month, 8,500 over the year.
ACTIVE_PER_DAY = 300
MONTHLY_POOL = 2_000
POOL_SHIFT = 613
CALLS_PER_PURCHASE = 20
REPEATS = 5
# The figures this bench is held to (the "well under a second").
TARGET_MS = 1000.0


def history_sql(rows: int) -> list[str]:
    """The statements that write the history (ints only are spliced in)."""
    purchases = rows // CALLS_PER_PURCHASE
    span = f"interval '{DAYS} days'"
    # Call g happens at t0 + g/rows of the year, by one of its day's active users.
    day = f"(g::bigint * {DAYS} / {rows})"
    user = (
        f"(({day} / 30) * {POOL_SHIFT}"
        f" + ({day} * 7919 + (g % {ACTIVE_PER_DAY}) * 4729) % {MONTHLY_POOL}) % {USERS}"
    )
    call = f"""
      SELECT g, now() - {span} + (g::float8 / {rows}) * {span} AS at,
             'user-' || {user} AS user_id, {user} AS u,
             200 + (g * 37) % 1800 AS input, 50 + (g * 53) % 700 AS output
        FROM generate_series(0, {rows - 1}) AS g"""
    return [
        "SET session_replication_role = replica",  # a restore: no triggers, no FK checks
        f"""INSERT INTO accounts (user_id, available)
            SELECT 'user-' || u, 1000000 FROM generate_series(0, {USERS - 1}) AS u""",
        f"""CREATE UNLOGGED TABLE bench_calls AS
            SELECT c.*, a.id AS account_id,
                   CASE WHEN g % 20 = 0 THEN 'public_byok'
                        WHEN u % 100 < 15 THEN 'byok' ELSE 'subscription' END AS user_type,
                   (u + CASE WHEN g % 5 = 0 THEN 1 ELSE 0 END) % 6 AS model_index,
                   CASE WHEN g % 1000 = 7 THEN 10 ELSE 0 END AS unbilled,
                   md5(g::text)::uuid AS hold_id
              FROM ({call}) AS c JOIN accounts a ON a.user_id = c.user_id""",
        """INSERT INTO usage_records (id, user_id, user_type, provider, model, input_tokens,
                                      output_tokens, tokens_charged, usage_fee_tokens,
                                      estimated_cost_micro_usd, hold_id, created_at)
            SELECT gen_random_uuid(),
                   CASE WHEN user_type = 'public_byok' THEN '' ELSE user_id END, user_type,
                   CASE WHEN model_index < 3 THEN 'anthropic' ELSE 'openai' END,
                   'model-' || model_index, input, output,
                   CASE WHEN user_type = 'subscription'
                        THEN input + output + (input + output + 3) / 4 - unbilled ELSE 0 END,
                   CASE WHEN user_type = 'subscription' THEN (input + output + 3) / 4 ELSE 0 END,
                   CASE WHEN model_index = 5 THEN NULL
                        ELSE (input + output) * (1 + model_index) END,
                   CASE WHEN user_type = 'subscription' THEN hold_id END, at
              FROM bench_calls ORDER BY g""",
        """INSERT INTO holds (user_id, id, account_id, amount, status, usage_fee_percent,
                              expires_at, created_at, resolved_at)
           SELECT user_id, hold_id, account_id, 3000, 'settled', 25, at + interval '2 minutes',
                  at, at
             FROM bench_calls WHERE user_type = 'subscription' ORDER BY g""",
        """INSERT INTO journal_transactions (user_id, id, kind, hold_id, usage_fee_percent,
                                             created_at)
           SELECT user_id, g + 1, 'usage', hold_id, 25, at
             FROM bench_calls WHERE user_type = 'subscription' ORDER BY g""",
        """INSERT INTO journal_entries (user_id, transaction_id, account_id, amount, created_at)
           SELECT user_id, g + 1, e.account, e.amount, at
             FROM bench_calls,
                  LATERAL (VALUES (account_id, -(input + output + (input + output + 3) / 4
                                                 - unbilled)),
                                  (3::bigint, input + output),
                                  (4::bigint, (input + output + 3) / 4),
                                  (6::bigint, -unbilled)) AS e(account, amount)
            WHERE user_type = 'subscription' AND e.amount <> 0
            ORDER BY g""",
        f"""CREATE UNLOGGED TABLE bench_buys AS
            SELECT p, {rows} + p + 1 AS tx, a.user_id, a.id AS account_id,
                   now() - {span} + (p::float8 / {purchases}) * {span} AS at,
                   CASE WHEN p % 10 < 6 THEN 'USD' WHEN p % 10 < 8 THEN 'EUR'
                        WHEN p % 10 < 9 THEN 'GBP' END AS currency,
                   CASE WHEN p % 10 = 9 THEN 'test' ELSE 'lemonsqueezy' END AS source,
                   CASE WHEN p % 100 = 3 THEN 10000 ELSE 0 END AS refunded,
                   CASE WHEN p % 200 = 3 THEN 1000 ELSE 0 END AS shortfall
              FROM generate_series(0, {purchases - 1}) AS p
              JOIN accounts a ON a.user_id = 'user-' || (p::bigint * 7919 % {USERS})""",
        """INSERT INTO purchases (user_id, id, account_id, purchase_type, tokens_purchased,
                                  tokens_credited, platform_fee_tokens, tokens_refunded, source,
                                  external_id, request_hash, user_share_percent, created_at,
                                  currency, amount_minor, amount_usd_cents)
           SELECT user_id, md5('buy' || p)::uuid, account_id, 'one_time', 10000, 8000, 2000,
                  refunded, source, 'bench-' || p, '\\x00', 80, at, currency,
                  CASE currency WHEN 'USD' THEN 999 WHEN 'EUR' THEN 900 WHEN 'GBP' THEN 800 END,
                  CASE currency WHEN 'USD' THEN 999 WHEN 'EUR' THEN 1010 WHEN 'GBP' THEN 1020
                  END
             FROM bench_buys ORDER BY p""",
        """INSERT INTO journal_transactions (user_id, id, kind, purchase_id, user_share_percent,
                                             created_at)
           SELECT user_id, tx, 'purchase', md5('buy' || p)::uuid, 80, at
             FROM bench_buys ORDER BY p""",
        """INSERT INTO journal_entries (user_id, transaction_id, account_id, amount, created_at)
           SELECT user_id, tx, e.account, e.amount, at
             FROM bench_buys,
                  LATERAL (VALUES (1::bigint, -10000), (account_id, 8000), (2::bigint, 2000))
                    AS e(account, amount)
            ORDER BY p""",
        # A refund a day after its purchase; some of it already spent (a shortfall).
        """INSERT INTO journal_transactions (user_id, id, kind, purchase_id, created_at)
           SELECT user_id, tx + 1000000000, 'refund', md5('buy' || p)::uuid,
                  at + interval '1 day'
             FROM bench_buys WHERE refunded > 0""",
        """INSERT INTO journal_entries (user_id, transaction_id, account_id, amount, created_at)
           SELECT user_id, tx + 1000000000, e.account, e.amount, at + interval '1 day'
             FROM bench_buys,
                  LATERAL (VALUES (account_id, -(8000 - shortfall)), (2::bigint, -2000),
                                  (5::bigint, -shortfall), (1::bigint, 10000))
                    AS e(account, amount)
            WHERE refunded > 0 AND e.amount <> 0""",
        """UPDATE accounts a SET owed = s.owed, available = 0
             FROM (SELECT account_id, sum(shortfall) AS owed FROM bench_buys
                    WHERE shortfall > 0 GROUP BY account_id) s
            WHERE a.id = s.account_id""",
        f"""INSERT INTO holds (user_id, id, account_id, amount, status, usage_fee_percent,
                               expires_at)
            SELECT a.user_id, gen_random_uuid(), a.id, 1250, 'held', 25,
                   now() + interval '2 minutes'
              FROM generate_series(1, 100) AS h
              JOIN accounts a ON a.user_id = 'user-' || (h * 191 % {USERS})""",
        """UPDATE accounts a SET reserved = h.total, available = a.available - h.total
             FROM (SELECT account_id, sum(amount) AS total FROM holds WHERE status = 'held'
                    GROUP BY account_id) h
            WHERE a.id = h.account_id AND a.available >= h.total""",
        "SELECT setval(pg_get_serial_sequence('journal_transactions', 'id'),"
        " (SELECT max(id) FROM journal_transactions))",
        "DROP TABLE bench_calls",
        "DROP TABLE bench_buys",
        "SET session_replication_role = origin",
    ]


async def load(url: str, rows: int) -> float:
    started = time.perf_counter()
    conn: asyncpg.Connection = await asyncpg.connect(url)
    try:
        for statement in history_sql(rows):
            await conn.execute(statement)
        # What autovacuum does for an insert-only table: statistics and the visibility map.
        for relation in ("usage_records", "purchases", "journal_entries", "holds", "accounts"):
            await conn.execute(f"VACUUM (ANALYZE) {relation}")
    finally:
        await conn.close()
    return time.perf_counter() - started


def _ts(moment: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(moment)
    return stamp


async def _timed(call: Callable[[], Awaitable[object]]) -> list[float]:
    """Milliseconds of REPEATS calls (the first one included: it is the operator's)."""
    spent = []
    for _ in range(REPEATS):
        started = time.perf_counter()
        await call()
        spent.append((time.perf_counter() - started) * 1000)
    return spent


async def measure(url: str, rows: int) -> str:
    settings = Settings(
        ledger_service_token=TOKEN,
        ledger_addr="127.0.0.1:0",
        db_pool_min=1,
        db_pool_max=4,
        log_level="WARNING",
    )
    app = await create_app(settings, url, run_sweeper=False)
    port = await app.start("127.0.0.1:0")
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    stub = ledger_pb2_grpc.LedgerServiceStub(channel)
    auth = (("authorization", f"Bearer {TOKEN}"),)
    now = datetime.now(UTC)
    queries: dict[str, tuple[datetime, pb.Granularity.ValueType]] = {
        "30 days by day": (now - timedelta(days=30), pb.GRANULARITY_DAY),
        "24 hours by hour": (now - timedelta(hours=24), pb.GRANULARITY_HOUR),
        "12 months by month": (now - timedelta(days=365), pb.GRANULARITY_MONTH),
    }
    figures: dict[str, dict[str, list[float]]] = {name: {} for name in [*queries, "user lookup"]}
    answers: dict[str, pb.GetPlatformAnalyticsResponse] = {}
    rolled = 0
    rollup_seconds = 0.0
    try:
        for phase in ("records only", "with the rollup"):
            if phase == "with the rollup":
                started = time.perf_counter()
                while days := await app.ledger.rollup_usage():
                    rolled += days
                rollup_seconds = time.perf_counter() - started
            for name, (start, granularity) in queries.items():
                request = pb.GetPlatformAnalyticsRequest(
                    start=_ts(start), end=_ts(now), granularity=granularity, top_users=10
                )
                figures[name][phase] = await _timed(
                    partial(stub.GetPlatformAnalytics, request, metadata=auth)
                )
                answers[name] = await stub.GetPlatformAnalytics(request, metadata=auth)
            # The busiest user of the year: the most holds and records to look through.
            heavy = answers["12 months by month"].top_users[0].user_id
            lookup = pb.GetUserAccountRequest(user_id=heavy)
            figures["user lookup"][phase] = await _timed(
                partial(stub.GetUserAccount, lookup, metadata=auth)
            )
        totals = answers["12 months by month"].totals
        conn: asyncpg.Connection = await asyncpg.connect(url)
        try:
            counts = {
                t: await conn.fetchval(f"SELECT count(*) FROM {t}")
                for t in ("usage_records", "usage_daily", "purchases", "journal_entries", "holds")
            }
        finally:
            await conn.close()
    finally:
        await channel.close()
        await app.close()

    def cell(values: list[float]) -> str:
        return f"{statistics.median(values):.0f} (first {values[0]:.0f})"

    rows_out = [
        [name, cell(by_phase["records only"]), cell(by_phase["with the rollup"])]
        for name, by_phase in figures.items()
    ]
    worst = max(max(v["with the rollup"]) for v in figures.values())
    sizes = ", ".join(f"{t} {n:,}" for t, n in counts.items())
    return "\n".join(
        [
            f"Operator analytics: ms through the ledger's gRPC server (median of {REPEATS},"
            " and the first call)",
            table(["query", "records only", "with the rollup"], rows_out),
            f"rows: {sizes}",
            f"rollup job: {rolled} days and months in {rollup_seconds:.1f}s;"
            f" 12 months: {totals.requests:,} calls, {totals.active_users:,} users,"
            f" {totals.purchases:,} purchases",
            f"slowest call with the rollup: {worst:.0f} ms"
            f" ({'within' if worst < TARGET_MS else 'OVER'} the {TARGET_MS:.0f} ms target)",
        ]
    )


def run(admin_url: str, rows: int | None = None) -> str:
    """Loads a fresh database next to `admin_url`'s and measures; returns the report."""
    rows = rows or int(os.environ.get("BENCH_ANALYTICS_ROWS", str(ROWS)))
    url = recreate_database(admin_url, DATABASE)
    migrate(url)
    seconds = asyncio.run(load(url, rows))
    print(f"  analytics: {rows:,} calls of history loaded in {seconds:.0f}s", flush=True)
    return asyncio.run(measure(url, rows))


def main() -> int:
    given = os.environ.get("BENCH_DATABASE_URL")
    admin_url = (
        plain_url(given)
        if given
        else database_url_of(start_embedded(Path(".data/bench")), "postgres")
    )
    print(run(admin_url))
    return 0


if __name__ == "__main__":
    sys.exit(main())
