"""Group commit for the hot path: concurrent Reserve, Settle, Release, ExtendHold and RecordUsage
calls applied together in one statement, one transaction (`ledger_hot_batch`, migration 0008).

One transaction per call costs Postgres a commit (a WAL flush) and the ledger a round trip each;
for a batch they are paid once. The rules this module keeps:

- Natural batching, no fixed delay: with no batch in flight an item goes at once, on the next
  turn of the event loop (a lone call waits for nothing; the writes of one ApplyBatch go
  together). Items that arrive while batches are in flight wait for the next one, which leaves
  as soon as a batch finishes, when the oldest waiting item has waited `max_wait`, or when
  `max_items` are waiting; at most `max_in_flight` batches run at once (one connection each).
- An item is answered only after its batch committed: the statement is its own transaction, so a
  crash before the commit applied nothing and the client's retry (same key) starts afresh.
- Each item gets its own answer; a refusal is an answer, so it never fails the others. If the
  batch raises (an unexpected error, a deadlock or serialization failure: nothing was applied),
  its items run again one by one, a batch of one each, so only a faulty item gets an error. A
  lost connection fails every item of the batch with it: whether it committed is unknown, and
  the caller's retry with the same key is what resolves that.
- Answers do not depend on batching: every item runs through the same per-item SQL function a
  lone call uses; items of one account run in arrival order (a repeated key or hold replays).
- A migration may change `ledger_hot_item` under a running ledger (ledgers migrate as they
  start, so in a rolling upgrade the first new replica does it while the old ones still serve).
  Postgres then refuses a batch whose items have the type's old shape, and asyncpg's cached
  codec refuses the new one, until the connection reloads it: such a batch (refused as it was
  bound, so nothing ran) is sent again once, its items laid out attribute by attribute by name
  as the database now has them (`ItemLayout`). An attribute this code does not know goes as NULL
  and one the database lacks is left out: the rule for this type is that an attribute added to it
  means, when NULL, what the ledger did before it (0011's prompt, 0012's attempt).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import asyncpg

from ledger_service import metrics

log = logging.getLogger(__name__)

Answer = Mapping[str, Any]

# Defaults, until the ledger's settings carry them (BATCH_MAX_ITEMS, BATCH_MAX_WAIT_MS).
MAX_ITEMS = 64
MAX_WAIT_SECONDS = 0.002
# A failed batch's items are run alone; one that Postgres rolls back to break a conflict (a
# deadlock with a transaction outside the batches, e.g. the sweeper) is tried this many times.
SOLO_ATTEMPTS = 3
STATS_LOG_SECONDS = 60.0

_SQL = "SELECT item, answer FROM ledger_hot_batch($1::ledger_hot_item[])"
# The type's attributes as the database has them now (dropped ones are not sent in a record).
_ATTRIBUTES_SQL = """
SELECT a.attname FROM pg_attribute a JOIN pg_type t ON t.typrelid = a.attrelid
WHERE t.oid = 'ledger_hot_item'::regtype AND a.attnum > 0 AND NOT a.attisdropped
ORDER BY a.attnum
"""

# Failures of the connection, not of the batch's content: running its items again one by one
# would only fail them again (and whether the batch committed is unknown).
CONNECTION_LOST = (
    OSError,  # refused, reset, unreachable
    TimeoutError,
    asyncpg.exceptions.PostgresConnectionError,  # SQLSTATE class 08
    asyncpg.exceptions.InterfaceError,  # the connection closed under us
    asyncpg.exceptions.OperatorInterventionError,  # 57: shutdown, restart, cannot connect now
    asyncpg.exceptions.InsufficientResourcesError,  # 53: too many connections, disk full
)


class HotItem(NamedTuple):
    """One call, field for field the `ledger_hot_item` composite type (asyncpg sends a tuple).
    A migration may add an attribute to the type (NULL meaning what the ledger did before it) or
    drop one; never rename one or swap one for another of the same type in one step: Postgres
    would not refuse the old shape, so a running ledger would go on sending it by position
    (tests/ledger_service/test_migrations.py fails a migration that does)."""

    op: str
    user_id: str | None = None
    hold_id: uuid.UUID | None = None
    key: str | None = None
    hash: bytes | None = None
    amount: int | None = None
    fee: int | None = None
    ttl_seconds: int | None = None
    fee_percent: int | None = None
    transient: bool | None = None
    quota: int | None = None
    tz: str | None = None
    at: object = None  # datetime | None; `object` keeps the tuple cheap to build
    user_type: str | None = None
    provider: str | None = None
    model: str | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None
    cost: int | None = None
    answer: bytes | None = None
    prompt_id: str | None = None  # settle and usage: the call's server-held prompt (0011)
    prompt_version: str | None = None
    attempt_id: str | None = None  # reserve: the caller's attempt, kept in its answer (0012)


def connection_lost(exc: BaseException) -> bool:
    """A failure of the connection (CONNECTION_LOST), not of the statement: asyncpg's
    client-side DataError is an InterfaceError but says nothing about the connection."""
    return isinstance(exc, CONNECTION_LOST) and not isinstance(
        exc, asyncpg.exceptions._base.DataError
    )


def shape_changed(exc: BaseException) -> bool:
    """A batch bound against a stale shape of ledger_hot_item, refused before it ran: Postgres's
    record input ("wrong number of columns" / "wrong data type", 42804) for items of the old
    shape, or asyncpg's encoding of the argument while its cached codec is the old one."""
    message = str(exc)
    if isinstance(exc, asyncpg.exceptions.DatatypeMismatchError):
        return message.startswith(("wrong number of columns", "wrong data type"))
    if isinstance(exc, asyncpg.exceptions.DataError | asyncpg.exceptions._base.DataError):
        return message.startswith("invalid input for query argument $1")
    return False


class ItemLayout:
    """HotItems as records of the database's `ledger_hot_item`, attribute by name."""

    def __init__(self, attributes: tuple[str, ...]) -> None:
        self.attributes = attributes
        known = {name: i for i, name in enumerate(HotItem._fields)}
        blank = len(HotItem._fields)  # the index of the NULL appended to each item
        self._picks = [known.get(name, blank) for name in attributes]
        self.unknown = [name for name in attributes if name not in known]
        self.missing = [name for name in HotItem._fields if name not in attributes]

    @property
    def same(self) -> bool:
        """The database's type is HotItem field for field: items go as they are."""
        return self.attributes == HotItem._fields

    def records(self, items: list[HotItem]) -> Sequence[tuple[object, ...]]:
        if self.same:
            return items
        return [tuple((*item, None)[i] for i in self._picks) for item in items]


async def read_layout(conn: asyncpg.Connection) -> ItemLayout:
    return ItemLayout(tuple(row[0] for row in await conn.fetch(_ATTRIBUTES_SQL)))


# Batch sizes are counted in power-of-two buckets: a batch of n lands in the first bound >= n.
SIZE_BOUNDS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


@dataclass
class GroupCommitStats:
    """Counters of the batching, cumulative since start (what a Prometheus exporter reads)."""

    batches: int = 0
    items: int = 0
    # Batches per size bucket, SIZE_BOUNDS[i] the bucket's upper bound (a histogram).
    size_buckets: list[int] = field(default_factory=lambda: [0] * len(SIZE_BOUNDS))
    # How long items waited from their call to their batch's start (sum and largest).
    wait_seconds_sum: float = 0.0
    wait_seconds_max: float = 0.0
    # Batches that raised and whose items were run again one by one; items that failed alone.
    batches_split: int = 0
    items_failed: int = 0
    in_flight_max: int = 0

    def observe(self, size: int, waited_sum: float, waited_max: float) -> None:
        metrics.BATCH_ITEMS.observe(size)
        metrics.BATCH_WAIT.observe(waited_max)
        self.batches += 1
        self.items += size
        for i, bound in enumerate(SIZE_BOUNDS):
            if size <= bound:
                self.size_buckets[i] += 1
                break
        else:
            self.size_buckets[-1] += 1
        self.wait_seconds_sum += waited_sum
        self.wait_seconds_max = max(self.wait_seconds_max, waited_max)

    def summary(self) -> str:
        mean = self.items / self.batches if self.batches else 0.0
        wait_ms = 1000 * self.wait_seconds_sum / self.items if self.items else 0.0
        sizes = " ".join(
            f"<={bound}:{n}" for bound, n in zip(SIZE_BOUNDS, self.size_buckets, strict=True) if n
        )
        return (
            f"group commit: {self.batches} batches, {self.items} items ({mean:.1f} per batch;"
            f" {sizes or 'none'}), wait mean {wait_ms:.2f} ms max"
            f" {1000 * self.wait_seconds_max:.2f} ms, {self.in_flight_max} in flight at most,"
            f" {self.batches_split} batches split, {self.items_failed} items failed"
        )


class _Waiting(NamedTuple):
    item: HotItem
    future: asyncio.Future[Answer]
    since: float


class GroupCommit:
    def __init__(
        self,
        pool: asyncpg.Pool,
        max_in_flight: int,
        max_items: int = MAX_ITEMS,
        max_wait: float = MAX_WAIT_SECONDS,
        stats: GroupCommitStats | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_in_flight < 1 or max_items < 1 or max_wait < 0:
            raise ValueError("group commit needs max_in_flight >= 1, max_items >= 1, max_wait >= 0")
        self.pool = pool
        self.max_in_flight = max_in_flight
        self.max_items = max_items
        self.max_wait = max_wait
        self.stats = stats or GroupCommitStats()
        self._clock = clock
        self._waiting: list[_Waiting] = []
        self._in_flight = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._flush_due = False
        self._logged_at = clock()
        self._logged_items = 0
        self._layout = ItemLayout(HotItem._fields)

    async def submit(self, item: HotItem) -> Answer:
        """The item's answer, once the batch that carried it committed."""
        future: asyncio.Future[Answer] = asyncio.get_running_loop().create_future()
        self._waiting.append(_Waiting(item, future, self._clock()))
        self._schedule()
        return await future

    def _schedule(self) -> None:
        if not self._waiting or self._in_flight >= self.max_in_flight:
            return
        if self._in_flight == 0 or len(self._waiting) >= self.max_items:
            # On the next turn of the loop, not now: the items of one ApplyBatch (and any other
            # calls of this turn) arrive in one turn and so leave together.
            if not self._flush_due:
                self._flush_due = True
                asyncio.get_running_loop().call_soon(self._flush_now)
        elif self._timer is None:
            due = self._waiting[0].since + self.max_wait
            loop = asyncio.get_running_loop()
            self._timer = loop.call_at(loop.time() + max(0.0, due - self._clock()), self._expire)

    def _flush_now(self) -> None:
        self._flush_due = False
        if self._waiting and self._in_flight < self.max_in_flight:
            self._flush()

    def _expire(self) -> None:
        self._timer = None
        if self._waiting and self._in_flight < self.max_in_flight:
            self._flush()

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        # A caller that gave up (cancelled) before its batch left is not applied.
        batch: list[_Waiting] = []
        taken = 0
        for waiting in self._waiting:
            taken += 1
            if not waiting.future.done():
                batch.append(waiting)
                if len(batch) == self.max_items:
                    break
        del self._waiting[:taken]
        if batch:
            self._in_flight += 1
            self.stats.in_flight_max = max(self.stats.in_flight_max, self._in_flight)
            task = asyncio.create_task(self._run(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        if self._waiting:
            self._schedule()

    async def _run(self, batch: list[_Waiting]) -> None:
        now = self._clock()
        waits = [now - w.since for w in batch]
        self.stats.observe(len(batch), sum(waits), max(waits))
        try:
            await self._apply(batch)
        finally:
            self._in_flight -= 1
            self._maybe_log(now)
            self._schedule()

    async def _apply(self, batch: list[_Waiting]) -> None:
        try:
            async with self.pool.acquire() as conn:
                rows = await self._fetch(conn, [w.item for w in batch])
        except Exception as exc:
            if len(batch) == 1 or connection_lost(exc):
                self._fail(batch, exc)
                return
            self.stats.batches_split += 1
            log.warning(
                "a batch of %d failed (%s); running its items one by one",
                len(batch),
                type(exc).__name__,
            )
            for waiting in batch:
                await self._apply_alone(waiting)
            return
        for row in rows:
            waiting = batch[row["item"] - 1]
            if not waiting.future.done():
                waiting.future.set_result(row["answer"])
        # Every item answers one row; should one not, its caller must not wait forever.
        unanswered = [w for w in batch if not w.future.done()]
        if unanswered:
            self._fail(unanswered, RuntimeError("ledger_hot_batch gave this item no answer"))

    async def _apply_alone(self, waiting: _Waiting) -> None:
        for attempt in range(1, SOLO_ATTEMPTS + 1):
            try:
                async with self.pool.acquire() as conn:
                    rows = await self._fetch(conn, [waiting.item])
            except asyncpg.exceptions.TransactionRollbackError as exc:
                if attempt < SOLO_ATTEMPTS:
                    continue
                self._fail([waiting], exc)
            except Exception as exc:
                self._fail([waiting], exc)
            else:
                if not waiting.future.done():
                    waiting.future.set_result(rows[0]["answer"])
            return

    async def _fetch(self, conn: asyncpg.Connection, items: list[HotItem]) -> list[asyncpg.Record]:
        rows: list[asyncpg.Record]
        try:
            rows = await conn.fetch(_SQL, self._layout.records(items))
            return rows
        except Exception as exc:
            if not shape_changed(exc):
                raise
            # Refused as it was bound: nothing ran. Once more, with the pool's codecs reloaded
            # and the items in the type's shape now; a second refusal is the batch's.
            await conn.reload_schema_state()
            layout = await read_layout(conn)
            if layout.attributes != self._layout.attributes:
                self._layout = layout
                log.warning(
                    "ledger_hot_item changed under this ledger (a migration): %d attributes,"
                    " sent by name from now on; unknown to this code (sent as NULL): %s;"
                    " not in the database (left out): %s",
                    len(layout.attributes),
                    ", ".join(layout.unknown) or "none",
                    ", ".join(layout.missing) or "none",
                )
            rows = await conn.fetch(_SQL, self._layout.records(items))
            return rows

    def _fail(self, batch: list[_Waiting], exc: Exception) -> None:
        for waiting in batch:
            self.stats.items_failed += 1
            if not waiting.future.done():
                waiting.future.set_exception(exc)

    def _maybe_log(self, now: float) -> None:
        if now - self._logged_at >= STATS_LOG_SECONDS and self.stats.items > self._logged_items:
            self._logged_at = now
            self._logged_items = self.stats.items
            log.info("%s", self.stats.summary())

    async def aclose(self) -> None:
        """Applies what is waiting, waits for the batches in flight, logs the summary."""
        while self._waiting or self._tasks:
            if self._waiting and self._in_flight < self.max_in_flight:
                self._flush()
            if self._tasks:
                await asyncio.wait(list(self._tasks))
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.stats.batches:
            log.info("%s", self.stats.summary())
