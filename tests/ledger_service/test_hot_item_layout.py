"""A migration that changes `ledger_hot_item` under a running ledger (group_commit.ItemLayout):
the ledger keeps serving the hot path, on every pooled connection, without a restart. In a
rolling upgrade the first new replica migrates as it starts while the old ones still serve; before
this, each old replica failed every Reserve, Settle and Release until it was restarted."""

from __future__ import annotations

import asyncio
import logging
import uuid

import asyncpg
import pytest

from ledger_service.audit import run_audit
from ledger_service.store.database import downgrade, migrate
from ledger_service.store.group_commit import HotItem, ItemLayout, connection_lost, shape_changed
from shared.gen.rpcai.ledger.v1 import ledger_pb2 as pb
from tests.conftest import AUTH, LedgerHarness
from tests.ledger_service.helpers import balance, credit, settle

CREDITED = 800  # usable of the 1,000 tokens each user buys


def charged(input_tokens: int, output_tokens: int) -> int:
    used = input_tokens + output_tokens
    return used + (used * 25 + 99) // 100  # the 25% fee, rounded up


async def reserve_and_settle(
    ledger: LedgerHarness, user: str, attempt: str = ""
) -> pb.ReserveResponse:
    """One call that spends charged(3, 5) = 10 tokens."""
    hold: pb.ReserveResponse = await ledger.stub.Reserve(
        pb.ReserveRequest(
            idempotency_key=f"call-{uuid.uuid4()}",
            user_id=user,
            estimated_tokens=20,
            attempt_id=attempt,
        ),
        metadata=AUTH,
    )
    await settle(ledger.stub, hold.reservation_id, 3, 5)
    return hold


async def spend_at_once(ledger: LedgerHarness, users: list[str], rounds: int) -> None:
    """Every user at once, `rounds` times over: several batches in flight, so several of the
    pool's connections carry them."""
    for _ in range(rounds):
        await asyncio.gather(*(reserve_and_settle(ledger, user) for user in users))


async def assert_books(ledger: LedgerHarness, users: list[str], calls_each: int) -> None:
    for user in users:
        b = await balance(ledger.stub, user)
        assert (b.available_tokens, b.reserved_tokens) == (
            CREDITED - calls_each * charged(3, 5),
            0,
        )
    assert (await run_audit(ledger.database_url)).ok


async def test_an_attribute_added_by_a_later_migration_leaves_the_hot_path_serving(
    ledger: LedgerHarness, caplog: pytest.LogCaptureFixture
) -> None:
    users = [f"user-{i}" for i in range(12)]
    for user in users:
        await credit(ledger.stub, user, 1000)
    await spend_at_once(ledger, users, 2)  # the pool's connections know the type as it was

    conn = await ledger.db()
    try:
        # What a later migration does (the attribute means the old behaviour when NULL).
        await conn.execute("ALTER TYPE ledger_hot_item ADD ATTRIBUTE later_field text")
    finally:
        await conn.close()

    with caplog.at_level(logging.WARNING, logger="ledger_service.store.group_commit"):
        await spend_at_once(ledger, users, 3)
    await assert_books(ledger, users, 5)
    changed = [r.getMessage() for r in caplog.records if "ledger_hot_item changed" in r.message]
    assert len(changed) == 1, changed  # learned once, then every connection catches up quietly
    assert "unknown to this code (sent as NULL): later_field" in changed[0]
    assert "not in the database (left out): none" in changed[0]


async def test_a_schema_stepped_back_and_forth_under_a_running_ledger(
    ledger: LedgerHarness,
) -> None:
    """0012 stepped back (its attempt_id dropped from the type) while this code runs, then up
    again: every call is served and charged once; the answers name an attempt only while the
    schema keeps them."""
    users = [f"user-{i}" for i in range(6)]
    for user in users:
        await credit(ledger.stub, user, 1000)
    await spend_at_once(ledger, users, 1)

    await asyncio.to_thread(downgrade, ledger.database_url, "0011")
    await spend_at_once(ledger, users, 2)
    hold = await reserve_and_settle(ledger, users[0], attempt="attempt-1")
    assert (hold.replayed, hold.attempt_id) == (False, "")  # 0011 keeps no attempt

    await asyncio.to_thread(migrate, ledger.database_url)
    await spend_at_once(ledger, users, 2)
    hold = await reserve_and_settle(ledger, users[0], attempt="attempt-2")
    assert (hold.replayed, hold.attempt_id) == (False, "attempt-2")
    await assert_books(ledger, users[1:], 5)
    b = await balance(ledger.stub, users[0])
    assert b.available_tokens == CREDITED - 7 * charged(3, 5)


def test_items_are_laid_out_by_attribute_name() -> None:
    item = HotItem(op="reserve", user_id="ann", amount=12, attempt_id="a-1")
    assert ItemLayout(HotItem._fields).same
    assert ItemLayout(HotItem._fields).records([item]) == [item]

    # Reordered, one attribute this code does not know, one it has that the database lacks.
    names = ("user_id", "op", "later_field", *HotItem._fields[2:-1])
    layout = ItemLayout(names)
    assert not layout.same
    assert (layout.unknown, layout.missing) == (["later_field"], ["attempt_id"])
    (record,) = layout.records([item])
    assert len(record) == len(names)
    assert dict(zip(names, record, strict=True)) == {
        **{name: getattr(item, name) for name in names if name in HotItem._fields},
        "later_field": None,
    }


def test_only_a_stale_shape_is_sent_again_and_only_a_lost_connection_is_unavailable() -> None:
    """A data error raised while the batch ran (division by zero, a value out of range) is the
    batch's own: not sent again. asyncpg's client-side DataError is not a lost connection."""
    exceptions = asyncpg.exceptions
    stale = [
        exceptions.DatatypeMismatchError("wrong number of columns: 23, expected 24"),
        exceptions.DatatypeMismatchError("wrong data type: 25, expected 23"),
        exceptions.DataError("invalid input for query argument $1: [('reserve', ...)]"),
    ]
    own = [
        exceptions.DivisionByZeroError("division by zero"),
        exceptions.NumericValueOutOfRangeError("bigint out of range"),
        exceptions.DatatypeMismatchError('column "x" is of type integer but expression is text'),
        exceptions.UniqueViolationError("duplicate key value"),
    ]
    assert [shape_changed(e) for e in stale] == [True] * len(stale)
    assert [shape_changed(e) for e in own] == [False] * len(own)
    client_side = exceptions._base.DataError("invalid input for query argument $1")
    assert isinstance(client_side, exceptions.InterfaceError)
    assert shape_changed(client_side)
    assert not connection_lost(client_side)
    assert connection_lost(exceptions.ConnectionDoesNotExistError("closed"))
    assert connection_lost(exceptions.InterfaceError("the connection is closed"))
