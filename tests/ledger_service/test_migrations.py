"""Alembic is the only way the schema changes: the migrations go down to nothing and back up on a
fresh database, the migrated schema is exactly the SQLAlchemy models, and the journal they create
refuses to be rewritten."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import asyncpg
import grpc
import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, pool

from ledger_service.app import create_app
from ledger_service.domain.ledger import request_hash
from ledger_service.store.database import alembic_config, downgrade, migrate, sqlalchemy_url
from ledger_service.store.models import PLATFORM_ACCOUNTS, Base
from shared.gen.rpcai.ledger.v1 import ledger_pb2 as pb
from shared.gen.rpcai.ledger.v1 import ledger_pb2_grpc
from tests import pg
from tests.conftest import AUTH, ledger_settings

LEDGER_TABLES = {
    "accounts",
    "journal_transactions",
    "journal_entries",
    "holds",
    "purchases",
    "usage_records",
    "idempotency_keys",
    "subscriptions",
    "dead_letters",
    "hold_answers",
    "parked_operations",
    "monthly_usage",
    "usage_daily",
    "usage_monthly",
    "analytics_rollups",
}
LEDGER_FUNCTIONS = {
    "ledger_refuse_change",
    "ledger_balance_json",
    "ledger_claim_key",
    "ledger_store_answer",
    "ledger_lock_subject",
    "ledger_collect",
    "ledger_apply_credit",
    "ledger_reserve",
    "ledger_extend_hold",
    "ledger_settle",
    "ledger_release",
    "ledger_sweep",
    "ledger_apply_refund",
    "ledger_status_rank",
    "ledger_retention",
    "ledger_quota_month",
    "ledger_quota_resets_at",
    "ledger_quota_hold_resolved",
    "ledger_quota_charged",
    "ledger_record_usage",
    "ledger_hot_batch",
    "ledger_hot_apply",
    "ledger_lock_hot_key",
    "ledger_upsert_subscription",
    "ledger_record_dead_letter",
    "ledger_resolve_dead_letter",
    "ledger_rollup_usage",
}


@pytest.fixture
def empty_database(pg_admin_url: str) -> Iterator[str]:
    url = pg.create_database(pg_admin_url, migrated=False)
    yield url
    pg.drop_database(pg_admin_url, url)


@dataclass
class SchemaState:
    tables: set[str]
    functions: set[str]
    triggers: set[str]
    version: str | None
    platform: dict[str, int]


async def schema_state(url: str) -> SchemaState:
    conn = await asyncpg.connect(url)
    try:
        tables = {
            r["tablename"]
            for r in await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
        }
        functions = {
            r["proname"]
            for r in await conn.fetch(
                "SELECT p.proname FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace"
                " WHERE n.nspname = 'public'"
            )
        }
        triggers = {
            r["tgname"]
            for r in await conn.fetch("SELECT tgname FROM pg_trigger WHERE NOT tgisinternal")
        }
        version = None
        if "alembic_version" in tables:
            version = await conn.fetchval("SELECT version_num FROM alembic_version")
        platform: dict[str, int] = {}
        if "accounts" in tables:
            platform = {
                r["code"]: r["id"]
                for r in await conn.fetch("SELECT id, code FROM accounts WHERE code IS NOT NULL")
            }
        return SchemaState(tables, functions, triggers, version, platform)
    finally:
        await conn.close()


_DEFINITIONS = {
    "function": "SELECT p.oid::regprocedure::text AS name, pg_get_functiondef(p.oid) AS def"
    " FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname = 'public'",
    "constraint": "SELECT conrelid::regclass::text || '.' || conname AS name,"
    " pg_get_constraintdef(c.oid) AS def FROM pg_constraint c"
    " JOIN pg_namespace n ON n.oid = c.connamespace WHERE n.nspname = 'public'",
    "index": "SELECT indexname AS name, indexdef AS def FROM pg_indexes"
    " WHERE schemaname = 'public'",
    "trigger": "SELECT tgname AS name, pg_get_triggerdef(oid) AS def FROM pg_trigger"
    " WHERE NOT tgisinternal",
    "column": "SELECT table_name || '.' || column_name AS name,"
    " concat_ws(' ', data_type, is_nullable, column_default) AS def"
    " FROM information_schema.columns WHERE table_schema = 'public'",
    "type": "SELECT t.typname || '.' || a.attname AS name, format_type(a.atttypid, a.atttypmod)"
    " AS def FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace"
    " JOIN pg_attribute a ON a.attrelid = t.typrelid AND a.attnum > 0 AND NOT a.attisdropped"
    " WHERE n.nspname = 'public' AND t.typtype = 'c'"
    " AND NOT EXISTS (SELECT 1 FROM pg_class r WHERE r.oid = t.typrelid AND r.relkind <> 'c')",
}


async def definitions(url: str) -> dict[str, dict[str, str]]:
    """Every function body, constraint, index, trigger, column and composite type of the
    schema, by kind and name: what a downgrade must give back exactly."""
    conn = await asyncpg.connect(url)
    try:
        return {
            kind: {
                r["name"]: r["def"]
                for r in await conn.fetch(sql)
                if "alembic_version" not in r["name"]  # Alembic's own, kept at base
            }
            for kind, sql in _DEFINITIONS.items()
        }
    finally:
        await conn.close()


def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config("postgresql://unused/x")).get_current_head()
    assert head is not None
    return head


def schema_differences(url: str) -> list[Any]:
    engine = create_engine(sqlalchemy_url(url), poolclass=pool.NullPool)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": True})
            return list(compare_metadata(context, Base.metadata))
    finally:
        engine.dispose()


async def test_migrations_go_down_to_base_and_back_up(empty_database: str) -> None:
    assert (await schema_state(empty_database)).tables == set()

    migrate(empty_database)
    up = await schema_state(empty_database)
    assert up.version == head_revision()
    assert up.tables == {*LEDGER_TABLES, "alembic_version"}
    assert up.functions == LEDGER_FUNCTIONS
    assert up.triggers == {
        "journal_entries_append_only",
        "journal_transactions_append_only",
        "journal_entries_no_truncate",
        "journal_transactions_no_truncate",
        "holds_quota_resolved",
        "usage_records_quota_charged",
    }
    assert up.platform == PLATFORM_ACCOUNTS

    downgrade(empty_database, "base")
    down = await schema_state(empty_database)
    assert down.tables <= {"alembic_version"}
    assert down.functions == set()
    assert down.triggers == set()
    assert down.version is None

    migrate(empty_database)
    assert await schema_state(empty_database) == up
    assert schema_differences(empty_database) == []


async def test_each_revision_steps_down_and_up(empty_database: str) -> None:
    script = ScriptDirectory.from_config(alembic_config(empty_database))
    revisions = [r.revision for r in reversed(list(script.walk_revisions()))]
    assert revisions[0] == "0001"
    seen: dict[str, dict[str, dict[str, str]]] = {"base": await definitions(empty_database)}
    for revision in revisions:
        migrate(empty_database, revision)
        assert (await schema_state(empty_database)).version == revision
        seen[revision] = await definitions(empty_database)
    for previous in [*reversed(revisions[:-1]), "base"]:
        downgrade(empty_database, previous)
        expected = None if previous == "base" else previous
        assert (await schema_state(empty_database)).version == expected
        # Each step down gives back exactly what its step up replaced: bodies included.
        now = await definitions(empty_database)
        for kind, named in seen[previous].items():
            assert now[kind] == named, (previous, kind, set(now[kind]) ^ set(named))
    migrate(empty_database)
    assert schema_differences(empty_database) == []


# ---- ledger_hot_item: attributes are only added or dropped -----------------------------------
# A running ledger sends its batch items as records by position (group_commit.HotItem). Postgres
# refuses a record whose shape changed (a count or a type), and the ledger then lays its items
# out again by name; a rename, or a drop and add of the same type in one step, it would not
# refuse, and an older ledger would put a value in the wrong attribute.

HotItemShape = tuple[int, dict[int, tuple[str, str]]]  # the type's oid, attnum -> (name, type)


async def hot_item_shape(url: str) -> HotItemShape | None:
    conn = await asyncpg.connect(url)
    try:
        oid = await conn.fetchval("SELECT to_regtype('ledger_hot_item')::oid")
        if oid is None:
            return None
        rows = await conn.fetch(
            """SELECT a.attnum, a.attname, format_type(a.atttypid, a.atttypmod) AS type
                 FROM pg_attribute a JOIN pg_type t ON t.typrelid = a.attrelid
                WHERE t.oid = $1 AND a.attnum > 0 AND NOT a.attisdropped""",
            oid,
        )
    finally:
        await conn.close()
    return oid, {r["attnum"]: (r["attname"], r["type"]) for r in rows}


def shape_changes(before: HotItemShape, after: HotItemShape) -> list[str]:
    """What an older ledger would not be refused for: the type made anew, an attribute renamed
    or retyped in place, a new attribute taking a dropped one's name."""
    if before[0] != after[0]:
        return ["the type was dropped and made again: attributes must be added or dropped"]
    old, new = before[1], after[1]
    changes = [
        f"attribute {old[n][0]} ({old[n][1]}) is now {new[n][0]} ({new[n][1]})"
        for n in old.keys() & new.keys()
        if old[n] != new[n]
    ]
    dropped = {old[n][0] for n in old.keys() - new.keys()}
    changes += [
        f"attribute {new[n][0]} was dropped and added again in one step"
        for n in new.keys() - old.keys()
        if new[n][0] in dropped
    ]
    return changes


async def test_migrations_only_add_or_drop_hot_item_attributes(empty_database: str) -> None:
    script = ScriptDirectory.from_config(alembic_config(empty_database))
    revisions = [r.revision for r in reversed(list(script.walk_revisions()))]
    before: HotItemShape | None = None
    steps = 0
    for revision in revisions:
        migrate(empty_database, revision)
        after = await hot_item_shape(empty_database)
        if before is not None:
            assert after is not None, f"{revision} dropped ledger_hot_item"
            assert shape_changes(before, after) == [], revision
            steps += 1
        before = after
    assert steps >= 4  # 0008 made the type; 0009-0012 came after it


@pytest.mark.parametrize(
    ("change", "found"),
    [
        ("ALTER TYPE ledger_hot_item RENAME ATTRIBUTE attempt_id TO attempt", "is now attempt"),
        (
            "ALTER TYPE ledger_hot_item DROP ATTRIBUTE prompt_id, ADD ATTRIBUTE prompt_id text",
            "prompt_id was dropped and added again",
        ),
        (
            "ALTER TYPE ledger_hot_item ALTER ATTRIBUTE attempt_id TYPE varchar(64) CASCADE",
            "is now attempt_id (character varying(64))",
        ),
        (
            "DROP TYPE ledger_hot_item CASCADE; CREATE TYPE ledger_hot_item AS (op text)",
            "dropped and made again",
        ),
    ],
)
async def test_the_hot_item_check_sees_what_an_older_ledger_would_not(
    empty_database: str, change: str, found: str
) -> None:
    migrate(empty_database)
    before = await hot_item_shape(empty_database)
    conn = await asyncpg.connect(empty_database)
    try:
        await conn.execute(change)
    finally:
        await conn.close()
    after = await hot_item_shape(empty_database)
    assert before is not None
    assert after is not None
    assert any(found in c for c in shape_changes(before, after)), shape_changes(before, after)


def test_migrated_schema_matches_the_models(database_url: str) -> None:
    # The test template was migrated at the start of the session, exactly as production is.
    differences = schema_differences(database_url)
    assert differences == [], differences


def test_schema_comparison_sees_a_drift(database_url: str) -> None:
    """The comparison above can fail: a column the models do not know is reported."""
    engine = create_engine(sqlalchemy_url(database_url), poolclass=pool.NullPool)
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql("ALTER TABLE holds ADD COLUMN stray integer")
            conn.exec_driver_sql("CREATE INDEX ix_stray ON purchases (source)")
    finally:
        engine.dispose()
    differences = schema_differences(database_url)
    kinds = sorted((d[0], d[2] if d[0] == "remove_column" else d[1].name) for d in differences)
    assert kinds == [("remove_column", "holds"), ("remove_index", "ix_stray")], differences


# --- the journal is append-only ----------------------------------------------------------------


async def _journal_one_purchase(url: str) -> asyncpg.Connection:
    conn: asyncpg.Connection = await asyncpg.connect(url)
    await conn.execute(
        "SELECT ledger_apply_credit('k', '\\x00', 'u', 'one_time', 1000, 800, 200, 80, 'test', $1)",
        f"order-{uuid.uuid4()}",
    )
    assert await conn.fetchval("SELECT count(*) FROM journal_entries") == 3
    return conn


@pytest.fixture(scope="module")
async def journaled(pg_admin_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A migrated database with one purchase journaled (shared: the tests must not change it)."""
    url = pg.create_database(pg_admin_url)
    conn = await _journal_one_purchase(url)
    try:
        yield conn
    finally:
        await conn.close()
        pg.drop_database(pg_admin_url, url)


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE journal_entries SET amount = amount + 1",
        "UPDATE journal_entries SET account_id = 1",
        "DELETE FROM journal_entries",
        "DELETE FROM journal_entries WHERE amount < 0",
        "UPDATE journal_transactions SET kind = 'gift'",
        "DELETE FROM journal_transactions",
    ],
)
async def test_journal_refuses_update_and_delete(
    journaled: asyncpg.Connection, statement: str
) -> None:
    before = await journaled.fetch("SELECT * FROM journal_entries ORDER BY id")
    with pytest.raises(asyncpg.exceptions.RestrictViolationError, match="append-only"):
        await journaled.execute(statement)
    assert await journaled.fetch("SELECT * FROM journal_entries ORDER BY id") == before


async def test_journal_accepts_appends(journaled: asyncpg.Connection) -> None:
    count = await journaled.fetchval("SELECT count(*) FROM journal_entries")
    tx = await journaled.fetchval(
        "INSERT INTO journal_transactions (kind, user_id) VALUES ('test', 'tester') RETURNING id"
    )
    await journaled.execute(
        "INSERT INTO journal_entries (user_id, transaction_id, account_id, amount)"
        " VALUES ('tester', $1, 2, -5), ('tester', $1, 4, 5)",
        tx,
    )
    assert await journaled.fetchval("SELECT count(*) FROM journal_entries") == count + 2


async def test_journal_refuses_truncate(database_url: str) -> None:
    conn = await _journal_one_purchase(database_url)
    try:
        with pytest.raises(asyncpg.exceptions.PostgresError):
            await conn.execute("TRUNCATE journal_entries")
        assert await conn.fetchval("SELECT count(*) FROM journal_entries") == 3
    finally:
        await conn.close()


async def test_the_new_tables_carry_their_named_constraints_and_indexes(database_url: str) -> None:
    """compare_metadata does not compare CHECK constraints: these are checked by name here."""
    conn: asyncpg.Connection = await asyncpg.connect(database_url)
    try:
        constraints = {
            (r["table"], r["conname"])
            for r in await conn.fetch(
                "SELECT conrelid::regclass::text AS table, conname FROM pg_constraint"
                " WHERE conrelid IN ('subscriptions'::regclass, 'dead_letters'::regclass,"
                " 'hold_answers'::regclass, 'parked_operations'::regclass)"
                " AND contype <> 'n'"
            )
        }
        indexes = {
            r["indexname"]
            for r in await conn.fetch(
                "SELECT indexname FROM pg_indexes"
                " WHERE tablename IN ('subscriptions', 'dead_letters', 'hold_answers',"
                " 'parked_operations')"
            )
        }
    finally:
        await conn.close()
    assert constraints == {
        ("subscriptions", "pk_subscriptions"),
        ("subscriptions", "ck_subscriptions_status_not_empty"),
        ("subscriptions", "ck_subscriptions_tokens_per_period_positive"),
        ("dead_letters", "pk_dead_letters"),
        ("dead_letters", "uq_dead_letters_source_dedupe_key"),
        ("dead_letters", "ck_dead_letters_raw_body_bounded"),
        ("dead_letters", "ck_dead_letters_resolved_with_note"),
        ("hold_answers", "pk_hold_answers"),
        ("hold_answers", "fk_hold_answers_user_id_holds"),
        ("hold_answers", "ck_hold_answers_answer_bounded"),
        ("parked_operations", "pk_parked_operations"),
        ("parked_operations", "uq_parked_operations_operation_idempotency_key"),
        ("parked_operations", "ck_parked_operations_operation_known"),
        ("parked_operations", "ck_parked_operations_applied_with_outcome"),
    }
    assert indexes == {
        "pk_subscriptions",
        "ix_subscriptions_user_id",
        "pk_dead_letters",
        "uq_dead_letters_source_dedupe_key",
        "ix_dead_letters_source_time",
        "ix_dead_letters_open_subject",
        "ix_dead_letters_resolved_at",
        "pk_hold_answers",
        "ix_hold_answers_created_at",
        "pk_parked_operations",
        "uq_parked_operations_operation_idempotency_key",
        "ix_parked_operations_waiting",
    }


async def test_0009_gives_every_existing_row_its_user_and_steps_back(empty_database: str) -> None:
    """Rows booked before 0009 (by 0008's functions) get their user: entries (platform ones
    too) from their transaction, answers from their hold, keys from the hold they answered."""
    migrate(empty_database, "0008")
    conn: asyncpg.Connection = await asyncpg.connect(empty_database)
    try:
        for user in ("ann", "ben"):
            await conn.execute(
                "SELECT ledger_apply_credit($1, '\\x01', $2, 'one_time', 1000, 800, 200, 80,"
                " 'test', $1)",
                f"buy-{user}",
                user,
            )
            hold = await conn.fetchval(
                "SELECT ledger_reserve($1, '\\x02', $2, 125, 300, 25, false, 0, 'UTC', NULL)"
                " ->> 'reservation_id'",
                f"hold-{user}",
                user,
            )
            await conn.execute(
                "SELECT ledger_settle($1, '\\x03', 40, 10, 25, 'anthropic', 'm', 30, 10, NULL,"
                " 'the answer')",
                uuid.UUID(hold),
            )
        entries = await conn.fetch("SELECT id, account_id, amount FROM journal_entries ORDER BY id")
    finally:
        await conn.close()

    migrate(empty_database)
    conn = await asyncpg.connect(empty_database)
    try:
        rows = await conn.fetch(
            "SELECT e.id, e.account_id, e.amount, e.user_id, t.user_id AS tx_user"
            " FROM journal_entries e JOIN journal_transactions t ON t.id = e.transaction_id"
            " ORDER BY e.id"
        )
        assert [(r["id"], r["account_id"], r["amount"]) for r in rows] == [
            tuple(e) for e in entries
        ]
        assert all(r["user_id"] == r["tx_user"] for r in rows)
        assert {r["user_id"] for r in rows if r["account_id"] < 1000} == {"ann", "ben"}
        assert await conn.fetch(
            "SELECT a.user_id FROM hold_answers a JOIN holds h ON h.id = a.hold_id"
            " WHERE h.user_id = a.user_id ORDER BY 1"
        ) == [("ann",), ("ben",)]
        keys = await conn.fetch(
            "SELECT operation, key, user_id FROM idempotency_keys ORDER BY operation, key"
        )
        assert [tuple(k) for k in keys] == [
            ("reserve", "hold-ann", "ann"),
            ("reserve", "hold-ben", "ben"),
        ]
    finally:
        await conn.close()

    downgrade(empty_database, "0008")
    conn = await asyncpg.connect(empty_database)
    try:
        back = await conn.fetch("SELECT id, account_id, amount FROM journal_entries ORDER BY id")
        assert back == entries
    finally:
        await conn.close()
    migrate(empty_database)
    assert schema_differences(empty_database) == []


async def test_0010_carries_its_named_constraints_and_indexes(database_url: str) -> None:
    conn: asyncpg.Connection = await asyncpg.connect(database_url)
    try:
        constraints = {
            r["conname"]
            for r in await conn.fetch(
                "SELECT conname FROM pg_constraint WHERE contype = 'c' AND conrelid IN"
                " ('purchases'::regclass, 'usage_records'::regclass, 'usage_daily'::regclass,"
                " 'usage_monthly'::regclass, 'analytics_rollups'::regclass)"
            )
        }
        indexes = {
            r["indexname"]: r["indexdef"]
            for r in await conn.fetch(
                "SELECT indexname, indexdef FROM pg_indexes WHERE indexname IN ("
                "'ix_purchases_created_at', 'ix_usage_records_created_at', 'ix_usage_daily_day',"
                " 'ix_journal_entries_exceptions', 'ix_accounts_owing')"
            )
        }
    finally:
        await conn.close()
    assert constraints >= {
        "ck_purchases_payment_currency_iso",
        "ck_purchases_payment_amount_with_currency",
        "ck_purchases_payment_amounts_nonnegative",
        "ck_purchases_payment_usd_is_amount",
        "ck_usage_records_fee_nonnegative",
        "ck_usage_records_public_byok_anonymous",
        "ck_usage_daily_counts_nonnegative",
        "ck_usage_monthly_counts_nonnegative",
        "ck_usage_monthly_month_starts",
        "ck_analytics_rollups_name_known",
    }
    assert "USING brin" in indexes["ix_usage_records_created_at"]
    assert "INCLUDE" in indexes["ix_purchases_created_at"]
    assert "WHERE" in indexes["ix_journal_entries_exceptions"]
    assert "WHERE (owed > 0)" in indexes["ix_accounts_owing"]


@pytest.mark.parametrize(
    ("statement", "constraint"),
    [
        (
            "UPDATE purchases SET currency = 'usd', amount_minor = 1",
            "ck_purchases_payment_currency_iso",
        ),
        ("UPDATE purchases SET currency = 'EUR'", "ck_purchases_payment_amount_with_currency"),
        (
            "UPDATE purchases SET currency = 'USD', amount_minor = 100, amount_usd_cents = 99",
            "ck_purchases_payment_usd_is_amount",
        ),
        (
            "UPDATE purchases SET currency = 'EUR', amount_minor = -1",
            "ck_purchases_payment_amounts_nonnegative",
        ),
        (
            "INSERT INTO usage_records (id, user_id, user_type, provider, model, input_tokens,"
            " output_tokens) VALUES (gen_random_uuid(), '', 'byok', 'p', 'm', 1, 1)",
            "ck_usage_records_public_byok_anonymous",
        ),
        (
            "INSERT INTO usage_records (id, user_id, user_type, provider, model, input_tokens,"
            " output_tokens) VALUES (gen_random_uuid(), 'u', 'public_byok', 'p', 'm', 1, 1)",
            "ck_usage_records_public_byok_anonymous",
        ),
    ],
)
async def test_0010_constraints_refuse_what_they_name(
    journaled: asyncpg.Connection, statement: str, constraint: str
) -> None:
    with pytest.raises(asyncpg.exceptions.CheckViolationError) as refused:
        await journaled.execute(statement)
    assert refused.value.constraint_name == constraint


async def test_0010_backfills_fees_and_a_credit_from_before_still_replays(
    empty_database: str,
) -> None:
    """Rows from before 0010 get the fee their settle booked; a credit delivered before it,
    sent again with its payment, replays (the payment is not part of the request hash) and
    keeps none. Down again, a public BYOK row and a payment step back; up again, they return."""
    migrate(empty_database, "0009")
    digest = request_hash(
        "credit_purchase",
        user="ann",
        tokens=1000,
        type="one_time",
        source="lemonsqueezy",
        external_id="order:1",
    )
    conn: asyncpg.Connection = await asyncpg.connect(empty_database)
    try:
        await conn.execute(
            "SELECT ledger_claim_key('credit_purchase', 'lemonsqueezy:order:1', $1)", digest
        )
        await conn.execute(
            "SELECT ledger_apply_credit('lemonsqueezy:order:1', $1, 'ann', 'one_time', 1000, 800,"
            " 200, 80, 'lemonsqueezy', 'order:1')",
            digest,
        )
        hold = await conn.fetchval(
            "SELECT ledger_reserve('h', '\\x02', 'ann', 125, 300, 25, false, 0, 'UTC', NULL)"
            " ->> 'reservation_id'"
        )
        await conn.execute(
            "SELECT ledger_settle('ann', $1, '\\x03', 40, 10, 25, 'anthropic', 'm', 30, 10, NULL,"
            " NULL)",
            uuid.UUID(hold),
        )
    finally:
        await conn.close()

    migrate(empty_database)
    conn = await asyncpg.connect(empty_database)
    try:
        assert await conn.fetchval("SELECT usage_fee_tokens FROM usage_records") == 10
    finally:
        await conn.close()
    app = await create_app(ledger_settings(), empty_database, run_sweeper=False)
    port = await app.start("127.0.0.1:0")
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        stub = ledger_pb2_grpc.LedgerServiceStub(channel)
        again = await stub.CreditPurchase(
            pb.CreditPurchaseRequest(
                idempotency_key="lemonsqueezy:order:1",
                user_id="ann",
                tokens_purchased=1000,
                purchase_type=pb.PURCHASE_TYPE_ONE_TIME,
                external_id="order:1",
                source="lemonsqueezy",
                payment=pb.Payment(currency="USD", amount_minor=999),
            ),
            metadata=AUTH,
        )
        assert (again.replayed, again.tokens_credited) == (True, 800)
        history = await stub.GetPurchaseHistory(
            pb.GetPurchaseHistoryRequest(user_id="ann"), metadata=AUTH
        )
        assert not history.purchases[0].HasField("payment")
        await stub.CreditPurchase(
            pb.CreditPurchaseRequest(
                idempotency_key="lemonsqueezy:order:2",
                user_id="ann",
                tokens_purchased=1000,
                purchase_type=pb.PURCHASE_TYPE_ONE_TIME,
                external_id="order:2",
                source="lemonsqueezy",
                payment=pb.Payment(currency="USD", amount_minor=999),
            ),
            metadata=AUTH,
        )
        history = await stub.GetPurchaseHistory(
            pb.GetPurchaseHistoryRequest(user_id="ann"), metadata=AUTH
        )
        # The USD value of a US-dollar payment is filled in.
        assert history.purchases[0].payment == pb.Payment(
            currency="USD", amount_minor=999, amount_usd_cents=999
        )
        await stub.RecordUsage(
            pb.RecordUsageRequest(
                idempotency_key="public-1",
                user_type=pb.USER_TYPE_PUBLIC_BYOK,
                usage=pb.Usage(provider="openai", model="m", input_tokens=1, output_tokens=2),
            ),
            metadata=AUTH,
        )
    finally:
        await channel.close()
        await app.close()

    downgrade(empty_database, "0009")
    conn = await asyncpg.connect(empty_database)
    try:
        assert await conn.fetchval("SELECT user_type FROM usage_records WHERE user_id = ''") == (
            "unknown"
        )
    finally:
        await conn.close()
    migrate(empty_database)
    conn = await asyncpg.connect(empty_database)
    try:
        assert await conn.fetchval("SELECT user_type FROM usage_records WHERE user_id = ''") == (
            "public_byok"
        )
    finally:
        await conn.close()
    assert schema_differences(empty_database) == []


async def test_0012_replays_holds_from_before_it_and_steps_back(empty_database: str) -> None:
    """A hold reserved before 0012 replays under it naming no attempt; one reserved under it
    names its attempt, and still replays once 0012 is stepped back (the older function ignores
    what it does not know)."""
    reserve = "SELECT ledger_reserve($1, '\\x02', 'ann', 125, 300, 25, false, 0, 'UTC', NULL{})"
    migrate(empty_database, "0011")
    conn: asyncpg.Connection = await asyncpg.connect(empty_database)
    try:
        await conn.execute(
            "SELECT ledger_apply_credit('buy', '\\x01', 'ann', 'one_time', 1000, 800, 200, 80,"
            " 'test', 'buy')"
        )
        before = json.loads(await conn.fetchval(reserve.format(""), "hold-1"))
    finally:
        await conn.close()

    migrate(empty_database)
    conn = await asyncpg.connect(empty_database)
    try:
        replay = json.loads(await conn.fetchval(reserve.format(", 'attempt-2'"), "hold-1"))
        assert replay["reservation_id"] == before["reservation_id"]
        assert (replay["replayed"], replay.get("attempt_id")) == (True, None)
        made = json.loads(await conn.fetchval(reserve.format(", 'attempt-3'"), "hold-2"))
        assert made["attempt_id"] == "attempt-3"
        unnamed = json.loads(await conn.fetchval(reserve.format(""), "hold-3"))
        assert unnamed["attempt_id"] == ""
    finally:
        await conn.close()

    downgrade(empty_database, "0011")
    conn = await asyncpg.connect(empty_database)
    try:
        replay = json.loads(await conn.fetchval(reserve.format(""), "hold-2"))
        assert (replay["reservation_id"], replay["replayed"]) == (made["reservation_id"], True)
        attributes = await conn.fetchval(
            "SELECT count(*) FROM pg_attribute WHERE attrelid = 'ledger_hot_item'::regclass"
            " AND attname = 'attempt_id'"
        )
        assert attributes == 0
    finally:
        await conn.close()
    migrate(empty_database)
    assert schema_differences(empty_database) == []
