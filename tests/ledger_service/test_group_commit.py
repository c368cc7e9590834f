"""Group commit (ledger_service/store/group_commit.py, migration 0008): concurrent hot-path calls
applied together answer exactly as the same calls one at a time; a refused item never fails its
batch, a poisoned one fails alone; a key or hold named twice in one batch replays its first use;
concurrency never overspends. Expected amounts come from the money rules restated here with
integer arithmetic, not from the ledger's own code."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass

import asyncpg
import grpc
import pytest

from ledger_service.audit import run_audit
from ledger_service.domain.errors import (
    IdempotencyKeyReused,
    InsufficientBalance,
    ReservationNotFound,
    ReservationNotHeld,
)
from ledger_service.domain.ledger import MonthlyQuota, request_hash
from ledger_service.domain.types import Reservation, Settlement, Usage
from ledger_service.store.group_commit import GroupCommit
from ledger_service.store.postgres import PostgresStore, create_pool
from shared.gen.rpcai.ledger.v1 import ledger_pb2 as pb
from tests.conftest import AUTH, LedgerHarness
from tests.ledger_service.helpers import balance, credit, failure, new_key, release, settle

FEE = 25  # usage fee percent (the default configuration)


def with_fee(tokens: int) -> int:
    return tokens + (tokens * FEE + 99) // 100


@dataclass(frozen=True)
class Call:
    """One client call: Reserve `estimate` (sent twice at once when `duplicate`), then Settle
    with `used` = (input, output) tokens, or Release when `used` is None."""

    user: str
    key: str
    estimate: int
    used: tuple[int, int] | None
    duplicate: bool


def script(users: list[str], calls_per_user: int) -> list[Call]:
    calls = []
    for u, user in enumerate(users):
        for i in range(calls_per_user):
            estimate = 40 + 7 * i + u
            used = None if i % 3 == 2 else (i % 5 + 1, estimate - i % 5 - 1 - i % 4)
            calls.append(Call(user, f"{user}-call-{i}", estimate, used, duplicate=i % 4 == 1))
    return calls


async def run_call(ledger: LedgerHarness, call: Call, prefix: str) -> tuple[object, ...]:
    """The call's order-independent answers (what a balance snapshot is not)."""
    request = pb.ReserveRequest(
        idempotency_key=prefix + call.key,
        user_id=prefix + call.user,
        estimated_tokens=call.estimate,
    )
    copies = 2 if call.duplicate else 1
    holds: list[pb.ReserveResponse] = await asyncio.gather(
        *(ledger.stub.Reserve(request, metadata=AUTH) for _ in range(copies))
    )
    assert len({h.reservation_id for h in holds}) == 1
    assert [h.replayed for h in holds].count(False) == 1  # the copy is a replay
    hold = holds[0]
    if call.used is None:
        r = await release(ledger.stub, hold.reservation_id)
        return (hold.reserved_tokens, "released", r.released_tokens, r.replayed)
    s = await settle(ledger.stub, hold.reservation_id, *call.used)
    return (
        hold.reserved_tokens,
        "settled",
        s.tokens_used,
        s.fee_tokens,
        s.tokens_charged,
        s.released_tokens,
        s.unbilled_tokens,
        s.replayed,
    )


def expected_answer(call: Call) -> tuple[object, ...]:
    hold = with_fee(call.estimate)
    if call.used is None:
        return (hold, "released", hold, False)
    used = sum(call.used)
    charge = with_fee(used)
    return (hold, "settled", used, charge - used, charge, hold - charge, 0, False)


@pytest.mark.parametrize("users", [1, 12], ids=["one hot user", "12 users"])
async def test_concurrent_calls_answer_as_sequential_ones(
    ledger: LedgerHarness, users: int
) -> None:
    names = [f"user-{u}" for u in range(users)]
    calls = script(names, 96 // users)
    for prefix in ("seq-", "con-"):
        for name in names:
            await credit(ledger.stub, prefix + name, 100_000)  # 80,000 usable
    stats = ledger.app.store.batch_stats

    sequential = [await run_call(ledger, call, "seq-") for call in calls]
    batches_before, items_before = stats.batches, stats.items
    concurrent = await asyncio.gather(*(run_call(ledger, call, "con-") for call in calls))

    assert concurrent == sequential == [expected_answer(c) for c in calls]
    for name in names:
        charged = sum(with_fee(sum(c.used)) for c in calls if c.user == name and c.used)
        seq = await balance(ledger.stub, "seq-" + name)
        con = await balance(ledger.stub, "con-" + name)
        assert (con.available_tokens, con.reserved_tokens, con.owed_tokens) == (
            seq.available_tokens,
            seq.reserved_tokens,
            seq.owed_tokens,
        )
        assert (con.available_tokens, con.reserved_tokens) == (80_000 - charged, 0)
    # The concurrent run was batched: fewer transactions than calls.
    items = stats.items - items_before
    assert items == sum(3 if c.duplicate else 2 for c in calls)
    assert stats.batches - batches_before < items / 2
    assert stats.batches_split == 0
    assert (await run_audit(ledger.database_url)).ok


async def test_no_overspend_with_100_concurrent_reserves_over_a_balance_for_30(
    ledger: LedgerHarness,
) -> None:
    bought = await credit(ledger.stub, "thirty", 4688)
    hold = with_fee(100)
    assert bought.tokens_credited == 30 * hold == 3750
    results = await asyncio.gather(
        *(
            ledger.stub.Reserve(
                pb.ReserveRequest(
                    idempotency_key=new_key(), user_id="thirty", estimated_tokens=100
                ),
                metadata=AUTH,
            )
            for _ in range(100)
        ),
        return_exceptions=True,
    )
    won = [r for r in results if isinstance(r, pb.ReserveResponse)]
    lost = [r for r in results if not isinstance(r, pb.ReserveResponse)]
    assert len(won) == 30
    assert {failure(e) for e in lost} == {
        (grpc.StatusCode.FAILED_PRECONDITION, "INSUFFICIENT_BALANCE")
    }
    assert sorted(r.balance.available_tokens for r in won) == [hold * i for i in range(30)]
    final = await balance(ledger.stub, "thirty")
    assert (final.available_tokens, final.reserved_tokens) == (0, 3750)
    assert ledger.app.store.batch_stats.items >= 100 > ledger.app.store.batch_stats.batches
    assert (await run_audit(ledger.database_url)).ok


# ---- batches composed on purpose: the store with a committer that lets one batch fly at a time
# and holds the rest until it lands (no timer fires within a test).


@pytest.fixture
async def held_batches(ledger: LedgerHarness) -> AsyncIterator[PostgresStore]:
    pool = await create_pool(ledger.database_url, 1, 4)
    store = PostgresStore(pool, GroupCommit(pool, max_in_flight=1, max_wait=600))
    try:
        yield store
    finally:
        await store.aclose()
        await pool.close()


def reserve(
    store: PostgresStore, user: str, key: str, estimate: int, quota: MonthlyQuota | None = None
) -> Coroutine[object, object, Reservation]:
    return store.reserve(
        key,
        request_hash("reserve", user=user, estimated=estimate),
        user,
        with_fee(estimate),
        300,
        FEE,
        False,
        quota,
    )


def settle_hold(
    store: PostgresStore, hold: str, input_tokens: int, output_tokens: int
) -> Coroutine[object, object, Settlement]:
    used = input_tokens + output_tokens
    return store.settle(
        uuid.UUID(hold),
        request_hash("settle", input=input_tokens, output=output_tokens),
        Usage("anthropic", "claude-test", input_tokens, output_tokens),
        used,
        with_fee(used) - used,
        FEE,
        None,
        None,
    )


async def one_batch(
    store: PostgresStore, *calls: Coroutine[object, object, object]
) -> list[object]:
    """Runs `calls` as one batch: calls made in one turn of the event loop leave together."""
    before = store.batch_stats.batches
    results = await asyncio.gather(*calls, return_exceptions=True)
    assert store.batch_stats.batches - before == 1
    return list(results)


async def test_a_refused_and_a_poisoned_item_fail_alone(
    ledger: LedgerHarness, held_batches: PostgresStore
) -> None:
    store = held_batches
    await credit(ledger.stub, "rich", 10_000)  # 8000
    earlier = await reserve(store, "rich", new_key(), 200)  # holds 250

    # A refusal is an answer: the batch commits, nothing is run again.
    ok, refused = await one_batch(
        store,
        reserve(store, "rich", new_key(), 100),
        reserve(store, "poor", new_key(), 100),
    )
    assert isinstance(ok, Reservation)
    assert isinstance(refused, InsufficientBalance)
    assert store.batch_stats.batches_split == 0

    # A time zone Postgres does not know makes its Reserve raise: the batch is rolled back and
    # its items run one by one, so only that one fails and the others apply exactly once.
    poison_key = new_key("poison")
    good_key = new_key("good")
    results = await one_batch(
        store,
        reserve(store, "rich", good_key, 100),
        reserve(store, "poor", new_key(), 100),
        reserve(store, "rich", poison_key, 100, MonthlyQuota(10**6, "No/Such_Zone")),
        settle_hold(store, earlier.reservation_id, 30, 50),
    )
    good, poor, poisoned, settled = results
    assert store.batch_stats.batches_split == 1
    assert isinstance(poor, InsufficientBalance)
    assert isinstance(poisoned, asyncpg.exceptions.InvalidParameterValueError)
    assert isinstance(good, Reservation)
    assert not good.replayed
    assert isinstance(settled, Settlement)
    assert (settled.tokens_charged, settled.released_tokens) == (100, 150)
    # 8000 - 125 (ok) - 125 (good) - 100 charged; the poisoned Reserve left nothing, key included.
    final = await balance(ledger.stub, "rich")
    assert (final.available_tokens, final.reserved_tokens) == (8000 - 125 - 125 - 100, 250)
    conn = await ledger.db()
    try:
        assert not await conn.fetchval(
            "SELECT count(*) FROM idempotency_keys WHERE key = $1", poison_key
        )
        assert await conn.fetchval("SELECT count(*) FROM holds WHERE status = 'held'") == 2
    finally:
        await conn.close()
    assert (await run_audit(ledger.database_url)).ok


async def test_a_key_or_hold_named_twice_in_one_batch_replays_its_first_use(
    ledger: LedgerHarness, held_batches: PostgresStore
) -> None:
    store = held_batches
    await credit(ledger.stub, "twice", 10_000)  # 8000
    first = await reserve(store, "twice", new_key(), 100)
    second = await reserve(store, "twice", new_key(), 100)
    key, other_key = new_key(), new_key()
    a, b, c, d, s1, s2, settled, released = await one_batch(
        store,
        reserve(store, "twice", key, 100),
        reserve(store, "twice", key, 100),
        reserve(store, "twice", other_key, 100),
        reserve(store, "twice", other_key, 200),  # another request, same key
        settle_hold(store, first.reservation_id, 10, 10),
        settle_hold(store, first.reservation_id, 10, 10),
        settle_hold(store, second.reservation_id, 5, 5),
        store.release(uuid.UUID(second.reservation_id)),
    )
    assert isinstance(a, Reservation)
    assert isinstance(b, Reservation)
    assert (a.reservation_id, a.replayed, b.replayed) == (b.reservation_id, False, True)
    assert isinstance(c, Reservation)
    assert not c.replayed
    assert isinstance(d, IdempotencyKeyReused)
    assert isinstance(s1, Settlement)
    assert isinstance(s2, Settlement)
    assert (s1.tokens_charged, s1.replayed) == (25, False)
    assert (s2.tokens_charged, s2.replayed) == (25, True)
    assert isinstance(settled, Settlement)
    assert settled.tokens_charged == 13
    assert isinstance(released, ReservationNotHeld)
    assert store.batch_stats.batches_split == 0
    final = await balance(ledger.stub, "twice")
    # Two new holds of 125 (the replay holds nothing more); 25 + 13 charged, the rest released.
    assert (final.available_tokens, final.reserved_tokens) == (8000 - 250 - 25 - 13, 250)
    assert (await run_audit(ledger.database_url)).ok


async def test_a_lone_call_goes_at_once_and_shutdown_applies_what_waits(
    ledger: LedgerHarness, held_batches: PostgresStore
) -> None:
    store = held_batches
    await credit(ledger.stub, "quiet", 10_000)
    # The committer's timer is 600 s: a lone call that waited for it would time out here.
    await asyncio.wait_for(reserve(store, "quiet", new_key(), 100), 10)
    # One batch in flight, one call waiting behind it: closing applies both before it returns.
    flying = asyncio.ensure_future(store.extend_hold(uuid.uuid4(), 60))
    while store.batch_stats.batches < 2:  # its batch has left
        await asyncio.sleep(0)
    waiting = asyncio.ensure_future(reserve(store, "quiet", new_key(), 100))
    await asyncio.sleep(0)
    await asyncio.wait_for(store.aclose(), 10)
    assert flying.done()
    assert waiting.done()
    assert isinstance(flying.exception(), ReservationNotFound)
    assert not waiting.result().replayed
    final = await balance(ledger.stub, "quiet")
    assert (final.available_tokens, final.reserved_tokens) == (8000 - 250, 250)
    assert "3 batches, 3 items" in store.batch_stats.summary()


async def test_batch_counters_are_logged_once_a_minute_while_busy(
    ledger: LedgerHarness, caplog: pytest.LogCaptureFixture
) -> None:
    now = [0.0]
    pool = await create_pool(ledger.database_url, 1, 2)
    store = PostgresStore(pool, GroupCommit(pool, max_in_flight=1, clock=lambda: now[0]))
    await credit(ledger.stub, "logged", 10_000)
    caplog.set_level(logging.INFO, logger="ledger_service.store.group_commit")
    try:
        await reserve(store, "logged", new_key(), 100)
        now[0] = 59.0
        await reserve(store, "logged", new_key(), 100)
        assert not caplog.records  # not a minute yet
        now[0] = 60.5
        await reserve(store, "logged", new_key(), 100)
        [line] = [r.getMessage() for r in caplog.records]
        assert line.startswith("group commit: 3 batches, 3 items (1.0 per batch; <=1:3)")
        caplog.clear()
        now[0] = 200.0
        await store.aclose()  # and once more at shutdown
        [line] = [r.getMessage() for r in caplog.records]
        assert line.startswith("group commit: 3 batches, 3 items")
    finally:
        await pool.close()
