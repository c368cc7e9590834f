"""The ledger's store on Postgres, through asyncpg.

Hot-path mutations (Reserve, Settle, Release, ExtendHold) and analytics records are one call of
a SQL function each (see migrations/versions/0002, 0005, 0006), and concurrent ones are applied
together, one transaction per group (`group_commit.py`, migration 0008).
Payment operations run in a `PgPaymentsTx`, one transaction the domain drives step by step. Reads
are single statements. This module turns answers (jsonb, or rows) into domain results and domain
errors; it holds no money rule of its own.
"""

from __future__ import annotations

import base64
import json
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from datetime import UTC, date, datetime, time
from functools import wraps
from typing import Any, NamedTuple, TypeVar, cast

import asyncpg

from ledger_service.domain.errors import (
    DeadLetterNotFound,
    IdempotencyKeyReused,
    InsufficientBalance,
    InvalidArgument,
    LedgerError,
    MonthlyQuotaExceeded,
    ReservationNotFound,
    ReservationNotHeld,
    SubscriptionNotFound,
    TransactionConflict,
    Unavailable,
)
from ledger_service.domain.ledger import MonthlyQuota
from ledger_service.domain.types import (
    Balance,
    CreditCommand,
    DeadLetter,
    DeadLetterPage,
    DeadLetterRecorded,
    Granularity,
    HoldExtension,
    JournalFigures,
    ModelUsage,
    MonthlyUsage,
    OpenHold,
    ParkedOperation,
    Payment,
    PlatformRows,
    PromptBreakdown,
    PurchaseCredited,
    PurchaseGroup,
    PurchasePage,
    PurchaseRecord,
    PurchaseRef,
    PurchaseSnapshot,
    PurchaseType,
    Refund,
    RefundPlan,
    Release,
    Reservation,
    RetentionPolicy,
    Settlement,
    Subscription,
    SubscriptionUpsert,
    TopUser,
    Usage,
    UsageAnalytics,
    UsageBreakdown,
    UsageEntry,
    UsageFigures,
    UsageRecorded,
    UsageSummary,
    UserAccount,
    UserCounts,
    UserStatus,
    UserType,
)
from ledger_service.store.group_commit import (
    GroupCommit,
    GroupCommitStats,
    HotItem,
    connection_lost,
)
from ledger_service.store.models import JOURNAL_EXCEPTIONS

HISTORY_LIMIT = 1000
# Hot-path batches in flight at once (one connection each). More only makes batches smaller:
# measured at 32 callers on 2 cores, 4 beat 2 and 16 (bench/ledger_bench.py).
IN_FLIGHT = 4
Answer = Mapping[str, Any]


async def _init_connection(conn: asyncpg.Connection) -> None:
    await conn.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")


async def _keep_session(conn: asyncpg.Connection) -> None:
    """No reset query on release: our sessions carry no state (no SET, LISTEN or advisory locks),
    and asyncpg's default reset costs a round trip per operation. An open transaction is still
    rolled back by asyncpg before this runs."""


async def create_pool(url: str, min_size: int, max_size: int) -> asyncpg.Pool:
    return await asyncpg.create_pool(
        url,
        min_size=min_size,
        max_size=max_size,
        init=_init_connection,
        reset=_keep_session,
        command_timeout=30,
    )


def _balance(answer: Answer) -> Balance:
    bal = answer["balance"]
    return Balance(
        available=int(bal["available"]),
        reserved=int(bal["reserved"]),
        owed=int(bal.get("owed", 0)),
    )


def _moment_us(value: object) -> datetime:
    return datetime.fromtimestamp(int(cast(int, value)) / 1_000_000, UTC)


_ERRORS: dict[str, type[LedgerError]] = {
    "IDEMPOTENCY_KEY_REUSED": IdempotencyKeyReused,
    "RESERVATION_NOT_FOUND": ReservationNotFound,
    "RESERVATION_NOT_HELD": ReservationNotHeld,
}


def _raise_if_error(answer: Answer) -> None:
    reason = answer.get("error")
    if reason is None:
        return
    if reason == "INSUFFICIENT_BALANCE":
        bal = _balance(answer)
        raise InsufficientBalance(
            f"needs {answer['required']} tokens, {bal.available} available",
            {"required_tokens": str(answer["required"]), "available_tokens": str(bal.available)},
        )
    if reason == "MONTHLY_QUOTA_EXCEEDED":
        resets_at = _moment_us(answer["resets_at_us"])
        raise MonthlyQuotaExceeded(
            f"the month's quota of {answer['quota']} tokens would be exceeded",
            {
                "quota": str(answer["quota"]),
                "used": str(answer["used"]),
                "required": str(answer["required"]),
                "resets_at": resets_at.isoformat(),
            },
        )
    if reason == "RESERVATION_NOT_HELD":
        status = str(answer.get("status", ""))
        raise ReservationNotHeld(f"the reservation is {status}, not held", {"status": status})
    error = _ERRORS.get(str(reason))
    if error is None:
        raise LedgerError(f"unexpected ledger answer: {reason}")
    if error is IdempotencyKeyReused:
        raise error(str(answer.get("detail", "the key was used before with a different request")))
    raise error("no such reservation")


def _raise_stored_refusal(answer: Answer) -> None:
    """A parked operation the rules refused when its subject arrived: its key answers that."""
    reason = answer.get("error")
    if reason is None:
        return
    if reason == InvalidArgument.reason:
        raise InvalidArgument(str(answer.get("field", "")), str(answer.get("problem", "")))
    error = next((e for e in _ERRORS.values() if e.reason == reason), LedgerError)
    raise error(str(answer.get("detail", reason)))


F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


def _translated(exc: Exception) -> LedgerError | None:
    """The domain error for a database failure that is not about the request, if it is one: a
    lost connection (the caller may retry with the same key), a rolled-back transaction."""
    if connection_lost(exc):
        return Unavailable(f"database unavailable ({type(exc).__name__})")
    if isinstance(exc, asyncpg.exceptions.TransactionRollbackError):  # SQLSTATE class 40
        return TransactionConflict(f"rolled back by the database ({type(exc).__name__})")
    return None


def _guarded(method: F) -> F:
    @wraps(method)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return await method(*args, **kwargs)
        except Exception as exc:
            error = _translated(exc)
            if error is None:
                raise
            raise error from exc

    return cast(F, wrapper)


_PURCHASE_SNAPSHOT = "SELECT id, tokens_purchased, tokens_credited, tokens_refunded FROM purchases"


class PgPaymentsTx:
    """The domain's unit of work for payments: one connection, one open transaction."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn

    async def _claim(self, operation: str, key: str, request_hash: bytes) -> Answer | None:
        answer: Answer | None = await self.conn.fetchval(
            "SELECT ledger_claim_key($1, $2, $3)", operation, key, request_hash
        )
        if answer is not None:
            _raise_if_error(answer)
            _raise_stored_refusal(answer)
        return answer

    async def claim_credit(self, key: str, request_hash: bytes) -> PurchaseCredited | None:
        answer = await self._claim("credit_purchase", key, request_hash)
        return None if answer is None else _credited(answer)

    async def claim_refund(self, key: str, request_hash: bytes) -> Refund | None:
        answer = await self._claim("refund_purchase", key, request_hash)
        return None if answer is None else _refund(answer)

    async def lock_subject(self, subject: str) -> None:
        await self.conn.execute("SELECT ledger_lock_subject($1)", subject)

    async def subscription(self, source: str, external_id: str) -> Subscription | None:
        row = await self.conn.fetchrow(
            "SELECT * FROM subscriptions WHERE source = $1 AND external_id = $2",
            source,
            external_id,
        )
        return None if row is None else _subscription(row)

    async def purchase_for_update(self, ref: PurchaseRef) -> PurchaseSnapshot | None:
        if ref.purchase_id:
            row = await self.conn.fetchrow(
                f"{_PURCHASE_SNAPSHOT} WHERE id = $1 FOR UPDATE", uuid.UUID(ref.purchase_id)
            )
        else:
            row = await self.conn.fetchrow(
                f"{_PURCHASE_SNAPSHOT} WHERE source = $1 AND external_id = $2 FOR UPDATE",
                ref.source,
                ref.external_id,
            )
        if row is None:
            return None
        return PurchaseSnapshot(
            purchase_id=str(row["id"]),
            tokens_purchased=row["tokens_purchased"],
            tokens_credited=row["tokens_credited"],
            tokens_refunded=row["tokens_refunded"],
        )

    async def apply_credit(
        self,
        command: CreditCommand,
        user_id: str,
        tokens: int,
        credited: int,
        fee: int,
        user_share_percent: int,
    ) -> tuple[PurchaseCredited, bool]:
        paid = command.payment
        answer: Answer = await self.conn.fetchval(
            "SELECT ledger_apply_credit($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)",
            command.key,
            command.request_hash,
            user_id,
            command.purchase_type.value,
            tokens,
            credited,
            fee,
            user_share_percent,
            command.source,
            command.external_id,
            (paid.currency or None) if paid else None,
            paid.amount_minor if paid and paid.currency else None,
            paid.amount_usd_cents if paid else None,
        )
        _raise_if_error(answer)
        return _credited(answer), bool(answer.get("created", False))

    async def apply_refund(self, key: str, purchase_id: str, plan: RefundPlan) -> Refund:
        purchase = uuid.UUID(purchase_id)
        # The purchase row is ours (purchase_for_update locked it): its user routes the refund.
        user_id: str = await self.conn.fetchval(
            "SELECT user_id FROM purchases WHERE id = $1", purchase
        )
        answer: Answer = await self.conn.fetchval(
            "SELECT ledger_apply_refund($1, $2, $3, $4, $5, $6)",
            user_id,
            key,
            purchase,
            plan.tokens,
            plan.user_part,
            plan.fee_part,
        )
        return _refund(answer)

    async def park(
        self, subject: str, operation: str, key: str, request: dict[str, object]
    ) -> None:
        await self.conn.execute(
            "INSERT INTO parked_operations (id, subject, operation, idempotency_key, request)"
            " VALUES (gen_random_uuid(), $1, $2, $3, $4)"
            " ON CONFLICT (operation, idempotency_key) DO NOTHING",
            subject,
            operation,
            key,
            request,
        )
        await self.conn.execute(
            "SELECT ledger_store_answer($1, $2, $3)", operation, key, {"parked": True}
        )

    async def waiting(self, subject: str) -> list[ParkedOperation]:
        rows = await self.conn.fetch(
            "SELECT id, operation, request FROM parked_operations"
            " WHERE subject = $1 AND applied_at IS NULL ORDER BY created_at, id FOR UPDATE",
            subject,
        )
        return [ParkedOperation(str(r["id"]), r["operation"], r["request"]) for r in rows]

    async def settle_parked(self, parked: ParkedOperation, outcome: dict[str, object]) -> None:
        await self.conn.execute(
            "UPDATE parked_operations SET applied_at = now(), outcome = $2 WHERE id = $1",
            uuid.UUID(parked.parked_id),
            outcome,
        )
        if "error" in outcome:
            # The key answered "parked" so far; from now on it answers the refusal.
            key = parked.request["key"]
            await self.conn.execute(
                "SELECT ledger_store_answer($1, $2, $3)", parked.operation, key, outcome
            )

    @asynccontextmanager
    async def savepoint(self) -> AsyncIterator[None]:
        async with self.conn.transaction():
            yield

    async def upsert_subscription(self, subscription: Subscription) -> SubscriptionUpsert:
        s = subscription
        row = await self.conn.fetchrow(
            "SELECT r.applied, (r.subscription).*"
            " FROM ledger_upsert_subscription($1, $2, $3, $4, $5, $6, $7, $8, $9) AS r",
            s.source, s.external_id, s.user_id, s.variant_id, s.status, s.renews_at, s.ends_at,
            s.provider_updated_at, s.tokens_per_period,
        )  # fmt: skip
        assert row is not None
        return SubscriptionUpsert(applied=row["applied"], subscription=_subscription(row))


class PostgresStore:
    def __init__(self, pool: asyncpg.Pool, batches: GroupCommit | None = None) -> None:
        self.pool = pool
        self.batches = batches or GroupCommit(
            pool, max_in_flight=min(IN_FLIGHT, pool.get_max_size())
        )

    @property
    def batch_stats(self) -> GroupCommitStats:
        return self.batches.stats

    async def aclose(self) -> None:
        """Applies the hot-path calls still waiting; call before closing the pool."""
        await self.batches.aclose()

    async def _hot(self, item: HotItem) -> Answer:
        answer = await self.batches.submit(item)
        _raise_if_error(answer)
        return answer

    @asynccontextmanager
    async def payments(self) -> AsyncIterator[PgPaymentsTx]:
        try:
            async with self.pool.acquire() as conn, conn.transaction():
                yield PgPaymentsTx(conn)
        except Exception as exc:
            error = _translated(exc)
            if error is None:
                raise
            raise error from exc

    @_guarded
    async def reserve(
        self,
        key: str,
        request_hash: bytes,
        user_id: str,
        amount: int,
        ttl_seconds: int,
        usage_fee_percent: int,
        transient_key: bool,
        quota: MonthlyQuota | None,
        attempt_id: str = "",
    ) -> Reservation:
        a = await self._hot(
            HotItem(
                "reserve",
                user_id=user_id,
                key=key,
                hash=request_hash,
                amount=amount,
                ttl_seconds=ttl_seconds,
                fee_percent=usage_fee_percent,
                transient=transient_key,
                quota=quota.tokens if quota else 0,
                tz=quota.timezone if quota else "UTC",
                at=quota.at if quota else None,
                attempt_id=attempt_id,
            )
        )
        answer = a.get("answer")
        settled = a.get("settlement")
        return Reservation(
            reservation_id=str(a["reservation_id"]),
            reserved_tokens=int(a["reserved_tokens"]),
            expires_at=_moment_us(a["expires_at_us"]),
            balance=_balance(a),
            replayed=bool(a.get("replayed", False)),
            status=str(a.get("status", "held")),
            answer=None if answer is None else base64.b64decode(answer),
            settlement=None if settled is None else _settlement(settled),
            attempt_id=str(a.get("attempt_id") or ""),  # none in answers from before 0012
        )

    @_guarded
    async def extend_hold(
        self, reservation_id: uuid.UUID, ttl_seconds: int, user_id: str | None = None
    ) -> HoldExtension:
        a = await self._hot(
            HotItem(
                "extend",
                # None: the batch reads the hold's own user (migration 0009).
                user_id=user_id,
                hold_id=reservation_id,
                ttl_seconds=ttl_seconds,
            )
        )
        return HoldExtension(expires_at=_moment_us(a["expires_at_us"]))

    @_guarded
    async def settle(
        self,
        reservation_id: uuid.UUID,
        request_hash: bytes,
        usage: Usage,
        tokens_used: int,
        fee: int,
        usage_fee_percent: int,
        cost_micro_usd: int | None,
        answer: bytes | None,
        user_id: str | None = None,
    ) -> Settlement:
        a = await self._hot(
            HotItem(
                "settle",
                # None: the batch reads the hold's own user (migration 0009).
                user_id=user_id,
                hold_id=reservation_id,
                hash=request_hash,
                amount=tokens_used,
                fee=fee,
                fee_percent=usage_fee_percent,
                provider=usage.provider,
                model=usage.model,
                input_tokens=usage.input_tokens,
                output_tokens=usage.output_tokens,
                cost=cost_micro_usd,
                answer=answer,
                prompt_id=usage.prompt_id,
                prompt_version=usage.prompt_version,
            )
        )
        return _settlement(a)

    @_guarded
    async def release(self, reservation_id: uuid.UUID, user_id: str | None = None) -> Release:
        a = await self._hot(
            HotItem(
                "release",
                # None: the batch reads the hold's own user (migration 0009).
                user_id=user_id,
                hold_id=reservation_id,
            )
        )
        return Release(
            released_tokens=int(a["released_tokens"]),
            balance=_balance(a),
            replayed=bool(a.get("replayed", False)),
            owed_collected=int(a.get("owed_collected", 0)),
        )

    @_guarded
    async def record_usage(
        self,
        key: str,
        request_hash: bytes,
        user_id: str,
        user_type: UserType,
        usage: Usage,
        cost_micro_usd: int | None,
    ) -> UsageRecorded:
        a = await self._hot(
            HotItem(
                "usage",
                user_id=user_id,
                key=key,
                hash=request_hash,
                user_type=user_type.value,
                provider=usage.provider,
                model=usage.model,
                input_tokens=usage.input_tokens,
                output_tokens=usage.output_tokens,
                cost=cost_micro_usd,
                prompt_id=usage.prompt_id,
                prompt_version=usage.prompt_version,
            )
        )
        return UsageRecorded(usage_id=str(a["usage_id"]), replayed=bool(a.get("replayed", False)))

    @_guarded
    async def monthly_usage(self, user_id: str, timezone: str) -> MonthlyUsage:
        row = await self.pool.fetchrow(
            f"{_MONTH} FROM (SELECT ledger_quota_month(now(), $2) AS month) AS this"
            " LEFT JOIN monthly_usage m ON m.user_id = $1 AND m.month = this.month",
            user_id,
            timezone,
        )
        assert row is not None
        return _monthly_usage(row)

    @_guarded
    async def balance(self, user_id: str) -> Balance:
        row = await self.pool.fetchrow(
            "SELECT available, reserved, owed FROM accounts WHERE user_id = $1", user_id
        )
        return Balance(row["available"], row["reserved"], row["owed"]) if row else Balance(0, 0)

    @_guarded
    async def user_status(self, user_id: str, quota_timezone: str) -> UserStatus:
        row = await self.pool.fetchrow(
            """
            SELECT a.available, a.reserved, a.owed, this.month,
                   (this.month::timestamp AT TIME ZONE $2) AS month_starts_at,
                   ledger_quota_resets_at(this.month, $2) AS month_resets_at,
                   coalesce(m.charged, 0) AS month_charged, coalesce(m.held, 0) AS month_held,
                   EXISTS (SELECT 1 FROM purchases p WHERE p.user_id = $1) AS has_purchases,
                   EXISTS (SELECT 1 FROM subscriptions s
                            WHERE s.user_id = $1
                              AND (s.status IN ('active', 'on_trial', 'past_due')
                                   OR (s.status = 'cancelled' AND s.ends_at > now())))
                     AS has_subscription,
                   EXISTS (SELECT 1 FROM subscriptions s WHERE s.user_id = $1)
                     AS had_subscription,
                   EXISTS (SELECT 1 FROM usage_records u
                            WHERE u.user_id = $1 AND u.user_type = 'byok') AS has_byok
              FROM (SELECT ledger_quota_month(now(), $2) AS month) AS this
              LEFT JOIN accounts a ON a.user_id = $1
              LEFT JOIN monthly_usage m ON m.user_id = $1 AND m.month = this.month
            """,
            user_id,
            quota_timezone,
        )
        assert row is not None
        if row["has_purchases"] or row["had_subscription"]:
            user_type = UserType.SUBSCRIPTION
        elif row["has_byok"]:
            user_type = UserType.BYOK
        else:
            user_type = UserType.UNKNOWN
        return UserStatus(
            user_type=user_type,
            has_subscription=row["has_subscription"],
            has_purchases=row["has_purchases"],
            balance=Balance(row["available"] or 0, row["reserved"] or 0, row["owed"] or 0),
            month=_monthly_usage(row),
        )

    @_guarded
    async def usage_analytics(
        self, user_id: str, since: datetime, include_history: bool
    ) -> UsageAnalytics:
        rows = await self.pool.fetch(
            """
            SELECT provider, model, prompt_id, prompt_version,
                   GROUPING(provider, model) AS not_by_model,
                   GROUPING(prompt_id, prompt_version) AS not_by_prompt,
                   count(*) AS requests,
                   coalesce(sum(input_tokens + output_tokens), 0)::bigint AS tokens,
                   coalesce(sum(tokens_charged), 0)::bigint AS charged,
                   coalesce(sum(estimated_cost_micro_usd), 0)::bigint AS cost,
                   count(*) FILTER (WHERE estimated_cost_micro_usd IS NULL) AS unknown_cost
              FROM usage_records
             WHERE user_id = $1 AND created_at >= $2
             GROUP BY GROUPING SETS ((), (provider, model), (prompt_id, prompt_version))
             ORDER BY not_by_model DESC, requests DESC, provider, model, prompt_id, prompt_version
            """,
            user_id,
            since,
        )
        summary = UsageSummary(0, 0, 0, 0, 0)
        breakdown: list[UsageBreakdown] = []
        by_prompt: list[PromptBreakdown] = []
        for row in rows:
            item = UsageSummary(
                total_requests=row["requests"],
                total_tokens=row["tokens"],
                tokens_charged=row["charged"],
                estimated_total_cost_micro_usd=row["cost"],
                unknown_cost_requests=row["unknown_cost"],
            )
            if not row["not_by_model"]:
                breakdown.append(UsageBreakdown(row["provider"], row["model"], item))
            elif not row["not_by_prompt"]:
                if row["prompt_id"] is not None:  # the calls that used none: not a prompt's
                    by_prompt.append(PromptBreakdown(row["prompt_id"], row["prompt_version"], item))
            else:
                summary = item
        history: list[UsageEntry] = []
        if include_history:
            for row in await self.pool.fetch(
                """
                SELECT id, user_type, provider, model, input_tokens, output_tokens,
                       tokens_charged, estimated_cost_micro_usd, created_at,
                       prompt_id, prompt_version
                  FROM usage_records WHERE user_id = $1 AND created_at >= $2
                 ORDER BY created_at DESC, id DESC LIMIT $3
                """,
                user_id,
                since,
                HISTORY_LIMIT,
            ):
                history.append(
                    UsageEntry(
                        usage_id=str(row["id"]),
                        user_type=UserType(row["user_type"]),
                        usage=Usage(
                            row["provider"],
                            row["model"],
                            row["input_tokens"],
                            row["output_tokens"],
                            row["prompt_id"],
                            row["prompt_version"],
                        ),
                        tokens_charged=row["tokens_charged"],
                        estimated_cost_micro_usd=row["estimated_cost_micro_usd"],
                        created_at=row["created_at"],
                    )
                )
        return UsageAnalytics(summary, breakdown, history, by_prompt)

    @_guarded
    async def purchase_history(
        self, user_id: str, limit: int, after: tuple[datetime, str] | None
    ) -> PurchasePage:
        # Keyset pagination, newest first: stable while new purchases arrive.
        after_time, after_id = after if after else (None, None)
        rows = await self.pool.fetch(
            """
            SELECT id, purchase_type, tokens_purchased, tokens_credited, platform_fee_tokens,
                   tokens_refunded, source, external_id, created_at, currency, amount_minor,
                   amount_usd_cents
              FROM purchases
             WHERE user_id = $1
               AND ($2::timestamptz IS NULL OR (created_at, id) < ($2, $3::uuid))
             ORDER BY created_at DESC, id DESC
             LIMIT $4
            """,
            user_id,
            after_time,
            uuid.UUID(after_id) if after_id else None,
            limit + 1,
        )
        records = [
            PurchaseRecord(
                purchase_id=str(r["id"]),
                purchase_type=PurchaseType(r["purchase_type"]),
                tokens_purchased=r["tokens_purchased"],
                tokens_credited=r["tokens_credited"],
                platform_fee_tokens=r["platform_fee_tokens"],
                tokens_refunded=r["tokens_refunded"],
                source=r["source"],
                external_id=r["external_id"],
                created_at=r["created_at"],
                payment=_payment(r),
            )
            for r in rows[:limit]
        ]
        more = len(rows) > limit
        cursor = (records[-1].created_at, records[-1].purchase_id) if more else None
        return PurchasePage(purchases=records, next_cursor=cursor)

    @_guarded
    async def platform_rows(
        self, granularity: Granularity, start: datetime, end: datetime, top_users: int
    ) -> PlatformRows:
        # One snapshot for every figure, and for the rollup's watermark with the rollup.
        async with (
            self.pool.acquire() as conn,
            conn.transaction(isolation="repeatable_read", readonly=True),
        ):
            await conn.execute(f"SET LOCAL work_mem = '{ANALYTICS_WORK_MEM}'")
            rolled = {
                r["name"]: r["rolled_until"]
                for r in await conn.fetch("SELECT name, rolled_until FROM analytics_rollups")
            }
            split = _rollup_split(
                granularity, start, end, rolled.get("usage_daily"), rolled.get("usage_monthly")
            )
            usage = await conn.fetch(
                _PLATFORM_USAGE,
                granularity.value,
                end,
                *split.months,
                *split.days,
                split.raw_from,
                top_users,
            )
            purchases = await conn.fetch(_PLATFORM_PURCHASES, granularity.value, start, end)
            journal = await conn.fetch(_PLATFORM_JOURNAL, granularity.value, start, end)
            now = await conn.fetchrow(_PLATFORM_NOW)
        assert now is not None
        return _platform_rows(usage, purchases, journal, now)

    @_guarded
    async def user_account(self, user_id: str, max_holds: int) -> UserAccount:
        async with (
            self.pool.acquire() as conn,
            conn.transaction(isolation="repeatable_read", readonly=True),
        ):
            row = await conn.fetchrow(
                """
                SELECT a.available, a.reserved, a.owed,
                       a.id IS NOT NULL
                       OR EXISTS (SELECT 1 FROM usage_records u WHERE u.user_id = $1)
                       OR EXISTS (SELECT 1 FROM subscriptions s WHERE s.user_id = $1) AS known
                  FROM (SELECT 1) AS one LEFT JOIN accounts a ON a.user_id = $1
                """,
                user_id,
            )
            holds = await conn.fetch(
                "SELECT id, amount, created_at, expires_at FROM holds"
                " WHERE user_id = $1 AND status = 'held' ORDER BY created_at, id LIMIT $2",
                user_id,
                max_holds,
            )
        assert row is not None
        return UserAccount(
            balance=Balance(row["available"] or 0, row["reserved"] or 0, row["owed"] or 0),
            holds=[
                OpenHold(str(h["id"]), h["amount"], h["created_at"], h["expires_at"]) for h in holds
            ],
            known=row["known"],
        )

    @_guarded
    async def rollup_usage(self, batch: int) -> int:
        rolled: int = await self.pool.fetchval("SELECT ledger_rollup_usage($1)", batch)
        return rolled

    @_guarded
    async def sweep_expired(self, limit: int) -> int:
        count: int = await self.pool.fetchval("SELECT ledger_sweep($1)", limit)
        return count

    @_guarded
    async def apply_retention(self, policy: RetentionPolicy, limit: int) -> int:
        deleted: int = await self.pool.fetchval(
            "SELECT ledger_retention($1, $2, $3, $4, $5)",
            policy.transient_key_seconds,
            policy.key_seconds,
            policy.answer_seconds,
            policy.resolved_seconds,
            limit,
        )
        return deleted

    @_guarded
    async def now(self) -> datetime:
        # The database clock: the one clock every replica agrees on (holds expire by it too).
        value: datetime = await self.pool.fetchval("SELECT now()")
        return value

    @_guarded
    async def get_subscription(self, source: str, external_id: str) -> Subscription:
        row = await self.pool.fetchrow(
            "SELECT * FROM subscriptions WHERE source = $1 AND external_id = $2",
            source,
            external_id,
        )
        if row is None:
            raise SubscriptionNotFound("no such subscription")
        return _subscription(row)

    @_guarded
    async def record_dead_letter(
        self,
        source: str,
        event_name: str,
        subject: str,
        reason: str,
        raw_body: bytes,
        dedupe_key: str,
    ) -> DeadLetterRecorded:
        row = await self.pool.fetchrow(
            "SELECT dead_letter_id, replayed"
            " FROM ledger_record_dead_letter($1, $2, $3, $4, $5, $6)",
            source, event_name, subject, reason, raw_body, dedupe_key,
        )  # fmt: skip
        assert row is not None
        return DeadLetterRecorded(str(row["dead_letter_id"]), replayed=row["replayed"])

    @_guarded
    async def list_dead_letters(
        self,
        source: str,
        subject: str,
        include_resolved: bool,
        limit: int,
        max_body_bytes: int,
        after: tuple[datetime, str] | None,
    ) -> DeadLetterPage:
        # Fixed fragments only (no input in the text), so each variant can use its index: the
        # partial index of open letters needs `resolved_at IS NULL` spelled out in the query.
        where = "source = $1 AND ($3::timestamptz IS NULL OR (created_at, id) > ($3, $4::uuid))"
        after_time, after_id = after if after else (None, None)
        args: list[object] = [
            source,
            limit + 1,
            after_time,
            uuid.UUID(after_id) if after_id else None,
        ]
        if subject:
            where += " AND subject = $5"
            args.append(subject)
        if not include_resolved:
            where += " AND resolved_at IS NULL"
        rows = await self.pool.fetch(
            f"""
            SELECT page.*, row_number() OVER w AS n, sum(size) OVER w AS running
              FROM (SELECT *, octet_length(raw_body) AS size FROM dead_letters
                     WHERE {where} ORDER BY created_at, id LIMIT $2) AS page
            WINDOW w AS (ORDER BY created_at, id ROWS UNBOUNDED PRECEDING)
             ORDER BY created_at, id
            """,
            *args,
        )
        # At most `limit` letters, and no more raw bytes than the page may carry (but one).
        kept = [r for r in rows[:limit] if r["n"] == 1 or r["running"] <= max_body_bytes]
        letters = [_dead_letter(r) for r in kept]
        more = len(kept) < len(rows)
        cursor = (letters[-1].created_at, letters[-1].dead_letter_id) if more else None
        return DeadLetterPage(letters=letters, next_cursor=cursor)

    @_guarded
    async def resolve_dead_letter(self, dead_letter_id: uuid.UUID, resolution: str) -> DeadLetter:
        row = await self.pool.fetchrow(
            "SELECT * FROM ledger_resolve_dead_letter($1, $2)", dead_letter_id, resolution
        )
        if row is None:
            raise DeadLetterNotFound("no such dead letter")
        return _dead_letter(row)


def _payment(row: asyncpg.Record) -> Payment | None:
    if row["currency"] is None and row["amount_usd_cents"] is None:
        return None
    return Payment(row["currency"] or "", row["amount_minor"] or 0, row["amount_usd_cents"])


# ---- operator analytics (cross-user reads; see migration 0010 and docs/scaling.md) ----------

# Hash aggregates over a year of the rollup need more than Postgres's default 4 MB.
ANALYTICS_WORK_MEM = "64MB"


class RollupSplit(NamedTuple):
    """Where a range's usage is read from: [first, last) months from usage_monthly, then
    [first, last) days from usage_daily, then usage_records from `raw_from` on."""

    months: tuple[date, date]
    days: tuple[date, date]
    raw_from: datetime


def _rollup_split(
    granularity: Granularity,
    start: datetime,
    end: datetime,
    daily_until: date | None,
    monthly_until: date | None,
) -> RollupSplit:
    """Only what the rollups hold whole: no day (month) that `end` cuts, none for hourly periods
    (the rollups know no hours), none a monthly period does not cover whole. `start` starts a
    period (so a day, or a month for monthly periods, unless hourly)."""
    first = start.astimezone(UTC).date()
    if granularity is Granularity.HOUR:
        return RollupSplit((first, first), (first, first), start)
    end_day = end.astimezone(UTC).date()
    months_to = first
    if granularity is Granularity.MONTH and monthly_until is not None:
        months_to = max(first, min(monthly_until, end_day.replace(day=1)))
    days_to = max(months_to, min(daily_until or first, end_day))
    raw_from = datetime.combine(days_to, time(), UTC) if days_to > first else start
    return RollupSplit((first, months_to), (months_to, days_to), raw_from)


_USAGE_SUMS = """
       sum(requests)::bigint AS requests,
       sum(tokens_used)::bigint AS tokens_used,
       sum(tokens_charged)::bigint AS tokens_charged,
       sum(usage_fee_tokens)::bigint AS usage_fee_tokens,
       coalesce(sum(cost_micro_usd) FILTER (WHERE user_type = 'subscription'), 0)::bigint
         AS provider_cost,
       coalesce(sum(cost_micro_usd) FILTER (WHERE user_type IN ('byok', 'public_byok')), 0)::bigint
         AS byok_cost,
       sum(unknown_cost_requests)::bigint AS unknown_cost,
       coalesce(sum(requests) FILTER (WHERE user_type = 'public_byok'), 0)::bigint
         AS public_byok_requests"""
_NO_SUMS = "NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL"
_NO_USERS = "NULL::bigint, NULL::bigint, NULL::bigint"

# $1 granularity, $2 end, [$3, $4) the months read from usage_monthly, [$5, $6) the days read
# from usage_daily, $7 where usage_records take over, $8 how many top users. Calls are first
# reduced to one row per period, user, type and model ("units": the rollups' months and days and
# the raw rows after them), read once; every figure is a grouping of those. Periods are UTC wall
# times (timestamp) until the end: cheaper to truncate than a timestamptz in a zone. Rows come
# back by kind, NULL in the columns a kind has not.
_PLATFORM_USAGE = f"""
WITH units AS MATERIALIZED (
  SELECT date_trunc($1, m.month::timestamp) AS period, m.user_id, m.user_type, m.provider,
         m.model, m.requests, m.tokens_used, m.tokens_charged, m.usage_fee_tokens,
         m.cost_micro_usd, m.unknown_cost_requests
    FROM usage_monthly m
   WHERE m.month >= $3 AND m.month < $4
  UNION ALL
  SELECT date_trunc($1, d.day::timestamp), d.user_id, d.user_type, d.provider, d.model,
         d.requests, d.tokens_used, d.tokens_charged, d.usage_fee_tokens, d.cost_micro_usd,
         d.unknown_cost_requests
    FROM usage_daily d
   WHERE d.day >= $5 AND d.day < $6
  UNION ALL
  SELECT date_trunc($1, u.created_at AT TIME ZONE 'UTC'), u.user_id, u.user_type, u.provider,
         u.model, count(*), sum(u.input_tokens + u.output_tokens), sum(u.tokens_charged),
         sum(u.usage_fee_tokens), coalesce(sum(u.estimated_cost_micro_usd), 0),
         count(*) FILTER (WHERE u.estimated_cost_micro_usd IS NULL)
    FROM usage_records u
   WHERE u.created_at >= $7 AND u.created_at < $2
   GROUP BY 1, 2, 3, 4, 5
), people AS MATERIALIZED (
  -- Signed-in callers by period (a public BYOK call has no user).
  SELECT period, user_id, sum(requests) AS requests, sum(tokens_used) AS tokens_used,
         sum(tokens_charged) AS tokens_charged,
         bool_or(user_type = 'subscription') AS subscription, bool_or(user_type = 'byok') AS byok
    FROM units WHERE user_id <> '' GROUP BY period, user_id
), range_people AS MATERIALIZED (
  SELECT user_id, sum(requests)::bigint AS requests, sum(tokens_used)::bigint AS tokens_used,
         sum(tokens_charged)::bigint AS tokens_charged,
         bool_or(subscription) AS subscription, bool_or(byok) AS byok
    FROM people GROUP BY user_id
)
SELECT 'usage' AS kind, period AT TIME ZONE 'UTC' AS period, NULL AS provider, NULL AS model,
       NULL AS user_id, {_USAGE_SUMS},
       NULL::bigint AS users, NULL::bigint AS subscription_users, NULL::bigint AS byok_users
  FROM units GROUP BY period
UNION ALL
SELECT 'model', NULL, provider, model, NULL, {_USAGE_SUMS}, {_NO_USERS}
  FROM units GROUP BY provider, model
UNION ALL
SELECT 'period_model', period AT TIME ZONE 'UTC', provider, model, NULL, {_USAGE_SUMS},
       {_NO_USERS}
  FROM units GROUP BY period, provider, model
UNION ALL
SELECT 'users', period AT TIME ZONE 'UTC', NULL, NULL, NULL, {_NO_SUMS},
       count(*), count(*) FILTER (WHERE subscription), count(*) FILTER (WHERE byok)
  FROM people GROUP BY period
UNION ALL
SELECT 'range_users', NULL, NULL, NULL, NULL, {_NO_SUMS},
       count(*), count(*) FILTER (WHERE subscription), count(*) FILTER (WHERE byok)
  FROM range_people
UNION ALL
(SELECT 'top', NULL, NULL, NULL, user_id, requests, tokens_used, tokens_charged,
        NULL, NULL, NULL, NULL, NULL, {_NO_USERS}
   FROM range_people ORDER BY tokens_charged DESC, requests DESC, user_id LIMIT $8)
"""

# $1 granularity, [$2, $3) the range: purchases by period, source and currency.
_PLATFORM_PURCHASES = """
SELECT date_trunc($1, created_at AT TIME ZONE 'UTC') AT TIME ZONE 'UTC' AS period, source,
       currency,
       count(*) AS purchases,
       sum(tokens_purchased)::bigint AS tokens_sold,
       sum(tokens_credited)::bigint AS tokens_credited,
       sum(platform_fee_tokens)::bigint AS purchase_fee_tokens,
       coalesce(sum(amount_minor), 0)::bigint AS amount_minor,
       coalesce(sum(amount_usd_cents), 0)::bigint AS usd_cents,
       count(*) FILTER (WHERE amount_usd_cents IS NULL) AS without_usd,
       coalesce(sum(tokens_credited) FILTER (WHERE amount_usd_cents IS NOT NULL), 0)::bigint
         AS credited_with_usd
  FROM purchases
 WHERE created_at >= $2 AND created_at < $3
 GROUP BY 1, 2, 3
"""

# $1 granularity, [$2, $3) the range. Refunds credit payments clearing (1) with the purchased
# tokens they cover, their shortfall debits the refund receivable (5), a settle the balance could
# not cover debits unbilled usage (6) (ledger_apply_refund, ledger_settle). The predicate is the
# partial index's, spelled out so that the planner can use it.
_PLATFORM_JOURNAL = f"""
SELECT date_trunc($1, created_at AT TIME ZONE 'UTC') AT TIME ZONE 'UTC' AS period,
       coalesce(sum(amount) FILTER (WHERE account_id = 1), 0)::bigint AS tokens_refunded,
       coalesce(-sum(amount) FILTER (WHERE account_id = 5), 0)::bigint AS shortfall_tokens,
       coalesce(-sum(amount) FILTER (WHERE account_id = 6), 0)::bigint AS unbilled_tokens
  FROM journal_entries
 WHERE created_at >= $2 AND created_at < $3 AND ({JOURNAL_EXCEPTIONS})
 GROUP BY 1
"""

# Now, not in the range: what users owe for refunds, and the holds of calls in flight.
_PLATFORM_NOW = """
SELECT (SELECT coalesce(sum(owed), 0) FROM accounts WHERE owed > 0)::bigint AS receivable,
       (SELECT count(*) FROM holds WHERE status = 'held') AS open_holds,
       (SELECT coalesce(sum(amount), 0) FROM holds WHERE status = 'held')::bigint AS held_tokens
"""


def _usage_figures(row: asyncpg.Record) -> UsageFigures:
    return UsageFigures(
        requests=row["requests"],
        provider_tokens_used=row["tokens_used"],
        tokens_charged=row["tokens_charged"],
        usage_fee_tokens=row["usage_fee_tokens"],
        provider_cost_micro_usd=row["provider_cost"],
        byok_cost_micro_usd=row["byok_cost"],
        unknown_cost_requests=row["unknown_cost"],
        public_byok_requests=row["public_byok_requests"],
    )


def _user_counts(row: asyncpg.Record) -> UserCounts:
    return UserCounts(row["users"], row["subscription_users"], row["byok_users"])


def _platform_rows(
    usage: list[asyncpg.Record],
    purchases: list[asyncpg.Record],
    journal: list[asyncpg.Record],
    now: asyncpg.Record,
) -> PlatformRows:
    by_period: dict[datetime, UsageFigures] = {}
    users: dict[datetime, UserCounts] = {}
    users_total = UserCounts()
    models: list[ModelUsage] = []
    period_models: defaultdict[datetime, list[ModelUsage]] = defaultdict(list)
    top: list[TopUser] = []
    for row in usage:
        kind = row["kind"]
        if kind == "usage":
            by_period[row["period"]] = _usage_figures(row)
        elif kind == "model":
            models.append(ModelUsage(row["provider"], row["model"], _usage_figures(row)))
        elif kind == "period_model":
            period_models[row["period"]].append(
                ModelUsage(row["provider"], row["model"], _usage_figures(row))
            )
        elif kind == "users":
            users[row["period"]] = _user_counts(row)
        elif kind == "range_users":
            users_total = _user_counts(row)
        else:
            top.append(
                TopUser(row["user_id"], row["requests"], row["tokens_charged"], row["tokens_used"])
            )
    # UNION ALL keeps no order across its branches: the ranking is restated here.
    top.sort(key=lambda t: (-t.tokens_charged, -t.requests, t.user_id))
    return PlatformRows(
        usage=by_period,
        users=users,
        users_total=users_total,
        models=models,
        period_models=dict(period_models),
        top_users=top,
        purchases=[
            PurchaseGroup(
                period=r["period"],
                source=r["source"],
                currency=r["currency"],
                purchases=r["purchases"],
                tokens_sold=r["tokens_sold"],
                tokens_credited=r["tokens_credited"],
                purchase_fee_tokens=r["purchase_fee_tokens"],
                amount_minor=r["amount_minor"],
                usd_cents=r["usd_cents"],
                without_usd=r["without_usd"],
                credited_with_usd=r["credited_with_usd"],
            )
            for r in purchases
        ],
        journal={
            r["period"]: JournalFigures(
                r["tokens_refunded"], r["shortfall_tokens"], r["unbilled_tokens"]
            )
            for r in journal
        },
        open_receivable_tokens=now["receivable"],
        open_holds=now["open_holds"],
        held_tokens=now["held_tokens"],
    )


def _refund(a: Answer) -> Refund:
    if a.get("parked"):
        return Refund(0, 0, 0, 0, Balance(0, 0), replayed=bool(a.get("replayed")), parked=True)
    return Refund(
        tokens_refunded=int(a["tokens_refunded"]),
        tokens_debited=int(a["tokens_debited"]),
        shortfall_tokens=int(a["shortfall_tokens"]),
        platform_fee_reversed=int(a["platform_fee_reversed"]),
        balance=_balance(a),
        replayed=bool(a.get("replayed", False)),
    )


_MONTH = (
    "SELECT (this.month::timestamp AT TIME ZONE $2) AS month_starts_at,"
    " ledger_quota_resets_at(this.month, $2) AS month_resets_at,"
    " coalesce(m.charged, 0) AS month_charged, coalesce(m.held, 0) AS month_held"
)


def _monthly_usage(row: asyncpg.Record) -> MonthlyUsage:
    return MonthlyUsage(
        starts_at=row["month_starts_at"],
        resets_at=row["month_resets_at"],
        charged=row["month_charged"],
        held=row["month_held"],
    )


def _settlement(a: Answer) -> Settlement:
    return Settlement(
        tokens_used=int(a["tokens_used"]),
        fee_tokens=int(a["fee_tokens"]),
        tokens_charged=int(a["tokens_charged"]),
        released_tokens=int(a["released_tokens"]),
        unbilled_tokens=int(a["unbilled_tokens"]),
        balance=_balance(a),
        replayed=bool(a.get("replayed", False)),
        overrun_tokens=int(a.get("overrun_tokens", 0)),
        owed_collected=int(a.get("owed_collected", 0)),
        answer_stored=bool(a.get("answer_stored", False)),
    )


def _credited(a: Answer) -> PurchaseCredited:
    if a.get("parked"):
        return PurchaseCredited(
            "", 0, 0, Balance(0, 0), replayed=bool(a.get("replayed")), parked=True
        )
    return PurchaseCredited(
        purchase_id=str(a["purchase_id"]),
        tokens_credited=int(a["tokens_credited"]),
        platform_fee_tokens=int(a["platform_fee_tokens"]),
        balance=_balance(a),
        replayed=bool(a.get("replayed", False)),
        owed_collected=int(a.get("owed_collected", 0)),
    )


def _subscription(row: asyncpg.Record) -> Subscription:
    return Subscription(
        source=row["source"],
        external_id=row["external_id"],
        user_id=row["user_id"],
        variant_id=row["variant_id"],
        status=row["status"],
        renews_at=row["renews_at"],
        ends_at=row["ends_at"],
        provider_updated_at=row["provider_updated_at"],
        tokens_per_period=row["tokens_per_period"],
    )


def _dead_letter(row: asyncpg.Record) -> DeadLetter:
    return DeadLetter(
        dead_letter_id=str(row["id"]),
        source=row["source"],
        event_name=row["event_name"],
        subject=row["subject"],
        reason=row["reason"],
        raw_body=bytes(row["raw_body"]),
        created_at=row["created_at"],
        resolved_at=row["resolved_at"],
        resolution=row["resolution"],
    )
