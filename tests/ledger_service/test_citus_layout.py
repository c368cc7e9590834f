"""The invariants the Citus layout (docs/scaling.md) relies on, checked on the migrated schema:
every per-user table carries user_id and leads its unique keys with it, every per-user function
takes p_user_id and filters every statement on a per-user table by it, and a call naming another
user's hold finds nothing and changes nothing. Cross-user reads are the operator's analytics and
the jobs (sweep, retention, the usage rollup), listed below with their reason."""

from __future__ import annotations

import re
import uuid

import asyncpg
import grpc
import pytest

from shared.gen.rpcai.ledger.v1 import ledger_pb2 as pb
from tests.conftest import AUTH, LedgerHarness
from tests.ledger_service.helpers import credit, failure, reserve, table_counts, usage

# Tables with no user: neither distributed nor routed by user_id.
NOT_PER_USER = {
    "alembic_version": "migration bookkeeping",
    # Webhook plumbing keyed by the provider's subject, often before the user is known: local
    # to the coordinator on Citus.
    "dead_letters": "keyed by the payment provider's subject",
    "parked_operations": "keyed by the payment provider's subject",
    # One row per rollup, written by the analytics job only (never per call).
    "analytics_rollups": "the analytics job's watermark",
}

# Per-user tables whose user_id may be NULL, and why.
NULLABLE_USER = {
    "accounts": "platform accounts have no user (a reference table on Citus, see 'left')",
    "idempotency_keys": "payment keys are claimed before the purchase's user is known",
}

# Unique constraints of per-user tables without user_id, each on purpose.
UNIQUE_WITHOUT_USER = {
    # Platform accounts live in accounts until the split into a reference table.
    ("accounts", "pk_accounts"): "platform rows share the id space; entries reference it",
    ("accounts", "uq_accounts_code"): "platform account codes",
    # A payment is credited once whoever it names (Citus needs a coordinator dedupe table).
    ("purchases", "uq_purchases_source_external_id"): "global payment dedupe",
    # Keys are refused when reused by another request, another user's included.
    ("usage_records", "uq_usage_records_idempotency_key"): "usage keys unique across users",
    ("idempotency_keys", "pk_idempotency_keys"): "keys unique per operation across users",
    # A subscription is the provider's, and an upsert may move it to another user.
    ("subscriptions", "pk_subscriptions"): "identified by the provider",
}

# Functions that touch per-user tables of many users, or none in particular, by design.
CROSS_USER_FUNCTIONS = {
    "ledger_sweep": "expires due holds of any user: a multi-shard job",
    "ledger_retention": "deletes old rows of any user: a multi-shard job",
    "ledger_hot_batch": "group commit across users (per shard on Citus)",
    "ledger_hot_apply": "reads the user of a hold an older caller did not name",
    "ledger_store_answer": "keys are unique per operation across users",
    "ledger_upsert_subscription": "subscriptions are keyed by the provider",
    "ledger_rollup_usage": "rolls a day of every user's usage up: a multi-shard job",
    # Trigger functions run on the row that fired them and filter by its user_id (scanned).
    "ledger_quota_hold_resolved": "trigger on holds",
    "ledger_quota_charged": "trigger on usage_records",
}
TRIGGER_FUNCTIONS = {"ledger_quota_hold_resolved", "ledger_quota_charged"}

# A statement that reads a per-user table globally on purpose says so with this marker.
GLOBAL_MARKER = "/* global:"


async def per_user_tables(conn: asyncpg.Connection) -> set[str]:
    rows = await conn.fetch(
        "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
        " AND tablename NOT LIKE 'planted%'"
    )
    return {r["tablename"] for r in rows} - set(NOT_PER_USER)


async def table_problems(conn: asyncpg.Connection, tables: set[str]) -> list[str]:
    """What keeps each per-user table from being distributed by user_id."""
    problems = []
    for table in sorted(tables):
        not_null = await conn.fetchval(
            "SELECT attnotnull FROM pg_attribute"
            " WHERE attrelid = $1::regclass AND attname = 'user_id' AND NOT attisdropped",
            table,
        )
        if not_null is None:
            problems.append(f"{table}: no user_id column")
        elif not not_null and table not in NULLABLE_USER:
            problems.append(f"{table}: user_id may be NULL")
        uniques = await conn.fetch(
            "SELECT i.indexrelid::regclass::text AS name,"
            " EXISTS (SELECT 1 FROM unnest(i.indkey) AS k(attnum)"
            "   JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum"
            "   WHERE a.attname = 'user_id') AS has_user"
            " FROM pg_index i WHERE i.indrelid = $1::regclass AND i.indisunique",
            table,
        )
        for unique in uniques:
            if not unique["has_user"] and (table, unique["name"]) not in UNIQUE_WITHOUT_USER:
                problems.append(f"{table}: unique {unique['name']} lacks user_id")
    return problems


async def test_every_per_user_table_carries_user_id_in_every_unique_key(
    database_url: str,
) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        tables = await per_user_tables(conn)
        assert tables >= {"accounts", "holds", "journal_entries", "hold_answers", "purchases"}
        assert await table_problems(conn, tables) == []
        # The exceptions are real (a stale entry would hide a new constraint of that name).
        for table, name in UNIQUE_WITHOUT_USER:
            assert await conn.fetchval(
                "SELECT count(*) FROM pg_index"
                " WHERE indrelid = $1::regclass AND indexrelid::regclass::text = $2",
                table,
                name,
            ), (table, name)
        # A new per-user table without a user-scoped key is caught.
        await conn.execute("CREATE TABLE gift_cards (id uuid PRIMARY KEY, user_id text)")
        assert await table_problems(conn, {"gift_cards"}) == [
            "gift_cards: user_id may be NULL",
            "gift_cards: unique gift_cards_pkey lacks user_id",
        ]
    finally:
        await conn.close()


async def ledger_functions(conn: asyncpg.Connection) -> dict[str, tuple[list[str], str]]:
    """Every ledger_* function: its argument names and its definition."""
    rows = await conn.fetch(
        "SELECT p.proname, coalesce(p.proargnames, '{}') AS args,"
        " pg_get_functiondef(p.oid) AS body"
        " FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace"
        " WHERE n.nspname = 'public' AND p.proname LIKE 'ledger\\_%'"
    )
    found: dict[str, tuple[list[str], str]] = {}
    for r in rows:
        assert r["proname"] not in found, f"{r['proname']} is overloaded"
        found[r["proname"]] = (list(r["args"]), r["body"])
    return found


def touched_tables(statement: str, tables: set[str]) -> set[str]:
    names = "|".join(sorted(tables))
    return {
        m.group(2).lower()
        for m in re.finditer(rf"\b(FROM|INTO|UPDATE|JOIN)\s+({names})\b", statement, re.IGNORECASE)
    }


def statements(definition: str) -> list[str]:
    """The body's statements, `--` comments removed (block comments kept: the marker)."""
    body = definition.split("$function$")[1] if "$function$" in definition else definition
    body = re.sub(r"--[^\n]*", "", body)
    return [s.strip() for s in body.split(";") if s.strip()]


_FILTER = re.compile(r"\b(\w+\.)?user_id\s*=\s*(p_user_id|NEW\.user_id)\b", re.IGNORECASE)
_INSERT = re.compile(r"\bINSERT\s+INTO\s+\w+\s*\(([^)]*)\)", re.IGNORECASE)


def unfiltered(definition: str, tables: set[str]) -> list[str]:
    """Statements on a per-user table that neither filter by the call's user, nor insert rows
    carrying it, nor say why they are global."""
    found = []
    for statement in statements(definition):
        if not touched_tables(statement, tables) or GLOBAL_MARKER in statement:
            continue
        if _FILTER.search(statement):
            continue
        insert = _INSERT.search(statement)
        if (
            insert
            and re.search(r"\buser_id\b", insert.group(1))
            and re.search(r"\bp_user_id\b", statement[insert.end() :])
        ):
            continue
        found.append(statement)
    return found


async def test_every_per_user_function_takes_the_user_and_filters_by_it(
    database_url: str,
) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        tables = await per_user_tables(conn)
        functions = await ledger_functions(conn)
        touching = {
            name
            for name, (_, body) in functions.items()
            if any(touched_tables(s, tables) for s in statements(body))
        }
        assert set(CROSS_USER_FUNCTIONS) <= touching  # no stale exception
        per_user = touching - set(CROSS_USER_FUNCTIONS)
        assert per_user >= {
            "ledger_reserve",
            "ledger_settle",
            "ledger_release",
            "ledger_extend_hold",
            "ledger_apply_refund",
            "ledger_apply_credit",
            "ledger_record_usage",
            "ledger_collect",
        }
        assert {n for n in per_user if "p_user_id" not in functions[n][0]} == set()
        problems = {
            name: bad
            for name in sorted(per_user | TRIGGER_FUNCTIONS)
            if (bad := unfiltered(functions[name][1], tables))
        }
        assert problems == {}
        # The markers are few and each names its reason.
        marked = [
            s for name in per_user for s in statements(functions[name][1]) if GLOBAL_MARKER in s
        ]
        assert 1 <= len(marked) <= 5
        assert all(re.search(r"/\* global: \w+", s) for s in marked)
    finally:
        await conn.close()


async def test_the_scan_catches_a_statement_without_the_user(database_url: str) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        tables = await per_user_tables(conn)
        await conn.execute(
            """
            CREATE FUNCTION ledger_planted(p_user_id text, p_hold uuid) RETURNS void
            LANGUAGE plpgsql AS $$
            BEGIN
              UPDATE holds SET status = 'released' WHERE user_id = p_user_id AND id = p_hold;
              -- user_id = p_user_id in a comment does not count
              UPDATE holds SET resolved_at = now() WHERE id = p_hold;
              INSERT INTO hold_answers (hold_id, answer) VALUES (p_hold, '');
            END $$
            """
        )
        planted = (await ledger_functions(conn))["ledger_planted"][1]
    finally:
        await conn.close()
    assert [s.split()[0] for s in unfiltered(planted, tables)] == ["UPDATE", "INSERT"]
    assert "resolved_at" in unfiltered(planted, tables)[0]


async def hold_row(conn: asyncpg.Connection, hold: str) -> asyncpg.Record:
    row = await conn.fetchrow(
        "SELECT status, expires_at, settle_response, release_response FROM holds WHERE id = $1",
        uuid.UUID(hold),
    )
    assert row is not None
    return row


@pytest.mark.parametrize("call", ["settle", "release", "extend"])
async def test_a_call_naming_another_users_hold_is_not_found_and_changes_nothing(
    ledger: LedgerHarness, call: str
) -> None:
    stub = ledger.stub
    await credit(stub, "alice", 1000)
    await credit(stub, "bob", 1000)
    hold = (await reserve(stub, "alice", 100)).reservation_id
    conn = await ledger.db()
    try:
        before = (await table_counts(conn), await hold_row(conn, hold))
        accounts = await conn.fetch("SELECT * FROM accounts ORDER BY id")

        async def as_user(user: str) -> None:
            if call == "settle":
                await stub.Settle(
                    pb.SettleRequest(reservation_id=hold, usage=usage(30, 20), user_id=user),
                    metadata=AUTH,
                )
            elif call == "release":
                await stub.Release(
                    pb.ReleaseRequest(reservation_id=hold, user_id=user), metadata=AUTH
                )
            else:
                await stub.ExtendHold(
                    pb.ExtendHoldRequest(reservation_id=hold, ttl_seconds=600, user_id=user),
                    metadata=AUTH,
                )

        for stranger in ("bob", "nobody"):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await as_user(stranger)
            assert failure(refused.value) == (grpc.StatusCode.NOT_FOUND, "RESERVATION_NOT_FOUND")
        assert (await table_counts(conn), await hold_row(conn, hold)) == before
        assert await conn.fetch("SELECT * FROM accounts ORDER BY id") == accounts
        # Its own user's call goes through.
        await as_user("alice")
        status = (await hold_row(conn, hold))["status"]
        assert status == {"settle": "settled", "release": "released", "extend": "held"}[call]
    finally:
        await conn.close()


async def test_a_call_without_the_user_finds_the_hold_by_id(ledger: LedgerHarness) -> None:
    stub = ledger.stub
    await credit(stub, "carol", 1000)
    hold = (await reserve(stub, "carol", 100)).reservation_id
    settled = await stub.Settle(
        pb.SettleRequest(reservation_id=hold, usage=usage(30, 20)), metadata=AUTH
    )
    assert settled.tokens_charged == 50 + 13  # 50 used + ceil(50 * 25 / 100) fee
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await stub.Release(pb.ReleaseRequest(reservation_id=str(uuid.uuid4())), metadata=AUTH)
    assert failure(missing.value) == (grpc.StatusCode.NOT_FOUND, "RESERVATION_NOT_FOUND")
    conn = await ledger.db()
    try:
        # Every row the calls wrote carries the user, platform entries included.
        assert (
            await conn.fetchval(
                "SELECT count(*) FROM journal_entries WHERE user_id = 'carol' AND account_id < 1000"
            )
            >= 3
        )
        assert (
            await conn.fetchval("SELECT user_id FROM idempotency_keys WHERE operation = 'reserve'")
            == "carol"
        )
    finally:
        await conn.close()
