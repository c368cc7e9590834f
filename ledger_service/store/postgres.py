"""The ledger's store on Postgres, through asyncpg.

Every mutation is one call of a SQL function (see migrations/versions/0002 and 0005): one round
trip, one transaction. Reads are single statements. This module turns their answers (jsonb, or
rows) into domain results and domain errors; it holds no money rule of its own.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from functools import wraps
from typing import Any, TypeVar, cast

import asyncpg

from ledger_service.domain.errors import (
    DeadLetterNotFound,
    IdempotencyKeyReused,
    InsufficientBalance,
    LedgerError,
    PurchaseNotFound,
    ReservationNotFound,
    ReservationNotHeld,
    SubscriptionNotFound,
    Unavailable,
)
from ledger_service.domain.ledger import RefundRaced
from ledger_service.domain.types import (
    Balance,
    DeadLetter,
    DeadLetterRecorded,
    PurchaseCredited,
    PurchasePage,
    PurchaseRecord,
    PurchaseRef,
    PurchaseSnapshot,
    PurchaseType,
    Refund,
    Release,
    Reservation,
    Settlement,
    Subscription,
    SubscriptionUpsert,
    Usage,
    UsageAnalytics,
    UsageBreakdown,
    UsageEntry,
    UsageRecorded,
    UsageSummary,
    UserStatus,
    UserType,
)

HISTORY_LIMIT = 1000
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
    return Balance(available=int(bal["available"]), reserved=int(bal["reserved"]))


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
    if reason == "RESERVATION_NOT_HELD":
        status = str(answer.get("status", ""))
        raise ReservationNotHeld(f"the reservation is {status}, not held", {"status": status})
    error = _ERRORS.get(str(reason))
    if error is None:
        raise LedgerError(f"unexpected ledger answer: {reason}")
    if error is IdempotencyKeyReused:
        raise error(str(answer.get("detail", "the key was used before with a different request")))
    raise error("no such reservation")


# Failures of the connection, not of the request: the caller may retry with the same key.
_UNAVAILABLE = (
    OSError,  # refused, reset, unreachable
    TimeoutError,
    asyncpg.exceptions.PostgresConnectionError,  # SQLSTATE class 08
    asyncpg.exceptions.InterfaceError,  # the connection closed under us
    asyncpg.exceptions.OperatorInterventionError,  # 57: shutdown, restart, cannot connect now
    asyncpg.exceptions.InsufficientResourcesError,  # 53: too many connections, disk full
)

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


def _guarded(method: F) -> F:
    @wraps(method)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return await method(*args, **kwargs)
        except _UNAVAILABLE as exc:
            raise Unavailable(f"database unavailable ({type(exc).__name__})") from exc

    return cast(F, wrapper)


class PostgresStore:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def _call(self, sql: str, *args: object) -> Answer:
        answer: Answer = await self.pool.fetchval(sql, *args)
        _raise_if_error(answer)
        return answer

    @_guarded
    async def credit_purchase(
        self,
        key: str,
        request_hash: bytes,
        user_id: str,
        purchase_type: PurchaseType,
        tokens: int,
        credited: int,
        fee: int,
        user_share_percent: int,
        source: str,
        external_id: str,
    ) -> PurchaseCredited:
        a = await self._call(
            "SELECT ledger_credit_purchase($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
            key, request_hash, user_id, purchase_type.value, tokens, credited, fee,
            user_share_percent, source, external_id,
        )  # fmt: skip
        return PurchaseCredited(
            purchase_id=str(a["purchase_id"]),
            tokens_credited=int(a["tokens_credited"]),
            platform_fee_tokens=int(a["platform_fee_tokens"]),
            balance=_balance(a),
            replayed=bool(a.get("replayed", False)),
        )

    @_guarded
    async def reserve(
        self,
        key: str,
        request_hash: bytes,
        user_id: str,
        amount: int,
        ttl_seconds: int,
        usage_fee_percent: int,
    ) -> Reservation:
        a = await self._call(
            "SELECT ledger_reserve($1, $2, $3, $4, $5, $6)",
            key, request_hash, user_id, amount, ttl_seconds, usage_fee_percent,
        )  # fmt: skip
        return Reservation(
            reservation_id=str(a["reservation_id"]),
            reserved_tokens=int(a["reserved_tokens"]),
            expires_at=datetime.fromtimestamp(int(a["expires_at_us"]) / 1_000_000, UTC),
            balance=_balance(a),
            replayed=bool(a.get("replayed", False)),
            status=str(a.get("status", "held")),
        )

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
    ) -> Settlement:
        a = await self._call(
            "SELECT ledger_settle($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
            reservation_id, request_hash, tokens_used, fee, usage_fee_percent, usage.provider,
            usage.model, usage.input_tokens, usage.output_tokens, cost_micro_usd,
        )  # fmt: skip
        return Settlement(
            tokens_used=int(a["tokens_used"]),
            fee_tokens=int(a["fee_tokens"]),
            tokens_charged=int(a["tokens_charged"]),
            released_tokens=int(a["released_tokens"]),
            unbilled_tokens=int(a["unbilled_tokens"]),
            balance=_balance(a),
            replayed=bool(a.get("replayed", False)),
        )

    @_guarded
    async def release(self, reservation_id: uuid.UUID) -> Release:
        a = await self._call("SELECT ledger_release($1)", reservation_id)
        return Release(
            released_tokens=int(a["released_tokens"]),
            balance=_balance(a),
            replayed=bool(a.get("replayed", False)),
        )

    @_guarded
    async def find_purchase(self, ref: PurchaseRef) -> PurchaseSnapshot:
        if ref.purchase_id:
            row = await self.pool.fetchrow(
                "SELECT id, tokens_purchased, tokens_credited, tokens_refunded"
                " FROM purchases WHERE id = $1",
                uuid.UUID(ref.purchase_id),
            )
        else:
            row = await self.pool.fetchrow(
                "SELECT id, tokens_purchased, tokens_credited, tokens_refunded"
                " FROM purchases WHERE source = $1 AND external_id = $2",
                ref.source,
                ref.external_id,
            )
        if row is None:
            raise PurchaseNotFound("no such purchase")
        return PurchaseSnapshot(
            purchase_id=str(row["id"]),
            tokens_purchased=row["tokens_purchased"],
            tokens_credited=row["tokens_credited"],
            tokens_refunded=row["tokens_refunded"],
        )

    @_guarded
    async def replayed_refund(self, key: str, request_hash: bytes) -> Refund | None:
        row = await self.pool.fetchrow(
            "SELECT request_hash, response FROM idempotency_keys"
            " WHERE operation = 'refund_purchase' AND key = $1",
            key,
        )
        if row is None or row["response"] is None:
            return None
        if bytes(row["request_hash"]) != request_hash:
            raise IdempotencyKeyReused("the key was used before with a different request")
        return _refund({**row["response"], "replayed": True})

    @_guarded
    async def refund_purchase(
        self,
        key: str,
        request_hash: bytes,
        purchase: PurchaseSnapshot,
        tokens: int,
        user_part: int,
        fee_part: int,
    ) -> Refund:
        try:
            a = await self._call(
                "SELECT ledger_refund_purchase($1, $2, $3, $4, $5, $6, $7)",
                key, request_hash, uuid.UUID(purchase.purchase_id), purchase.tokens_refunded,
                tokens, user_part, fee_part,
            )  # fmt: skip
        except asyncpg.exceptions.SerializationError as exc:
            raise RefundRaced(str(exc)) from exc
        return _refund(a)

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
        a = await self._call(
            "SELECT ledger_record_usage($1, $2, $3, $4, $5, $6, $7, $8, $9)",
            key, request_hash, user_id, user_type.value, usage.provider, usage.model,
            usage.input_tokens, usage.output_tokens, cost_micro_usd,
        )  # fmt: skip
        return UsageRecorded(usage_id=str(a["usage_id"]), replayed=bool(a.get("replayed", False)))

    @_guarded
    async def balance(self, user_id: str) -> Balance:
        row = await self.pool.fetchrow(
            "SELECT available, reserved FROM accounts WHERE user_id = $1", user_id
        )
        return Balance(row["available"], row["reserved"]) if row else Balance(0, 0)

    @_guarded
    async def user_status(self, user_id: str) -> UserStatus:
        row = await self.pool.fetchrow(
            """
            SELECT a.available, a.reserved,
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
              FROM (SELECT 1) AS one LEFT JOIN accounts a ON a.user_id = $1
            """,
            user_id,
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
            balance=Balance(row["available"] or 0, row["reserved"] or 0),
        )

    @_guarded
    async def usage_analytics(
        self, user_id: str, since: datetime, include_history: bool
    ) -> UsageAnalytics:
        rows = await self.pool.fetch(
            """
            SELECT provider, model, GROUPING(provider, model) AS is_total,
                   count(*) AS requests,
                   coalesce(sum(input_tokens + output_tokens), 0)::bigint AS tokens,
                   coalesce(sum(tokens_charged), 0)::bigint AS charged,
                   coalesce(sum(estimated_cost_micro_usd), 0)::bigint AS cost,
                   count(*) FILTER (WHERE estimated_cost_micro_usd IS NULL) AS unknown_cost
              FROM usage_records
             WHERE user_id = $1 AND created_at >= $2
             GROUP BY ROLLUP ((provider, model))
             ORDER BY is_total DESC, requests DESC, provider, model
            """,
            user_id,
            since,
        )
        summary = UsageSummary(0, 0, 0, 0, 0)
        breakdown: list[UsageBreakdown] = []
        for row in rows:
            item = UsageSummary(
                total_requests=row["requests"],
                total_tokens=row["tokens"],
                tokens_charged=row["charged"],
                estimated_total_cost_micro_usd=row["cost"],
                unknown_cost_requests=row["unknown_cost"],
            )
            if row["is_total"]:
                summary = item
            else:
                breakdown.append(UsageBreakdown(row["provider"], row["model"], item))
        history: list[UsageEntry] = []
        if include_history:
            for row in await self.pool.fetch(
                """
                SELECT id, user_type, provider, model, input_tokens, output_tokens,
                       tokens_charged, estimated_cost_micro_usd, created_at
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
                        ),
                        tokens_charged=row["tokens_charged"],
                        estimated_cost_micro_usd=row["estimated_cost_micro_usd"],
                        created_at=row["created_at"],
                    )
                )
        return UsageAnalytics(summary=summary, breakdown=breakdown, history=history)

    @_guarded
    async def purchase_history(
        self, user_id: str, limit: int, after: tuple[datetime, str] | None
    ) -> PurchasePage:
        # Keyset pagination, newest first: stable while new purchases arrive.
        after_time, after_id = after if after else (None, None)
        rows = await self.pool.fetch(
            """
            SELECT id, purchase_type, tokens_purchased, tokens_credited, platform_fee_tokens,
                   tokens_refunded, source, external_id, created_at
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
            )
            for r in rows[:limit]
        ]
        more = len(rows) > limit
        cursor = (records[-1].created_at, records[-1].purchase_id) if more else None
        return PurchasePage(purchases=records, next_cursor=cursor)

    @_guarded
    async def sweep_expired(self, limit: int) -> int:
        count: int = await self.pool.fetchval("SELECT ledger_sweep($1)", limit)
        return count

    @_guarded
    async def now(self) -> datetime:
        # The database clock: the one clock every replica agrees on (holds expire by it too).
        value: datetime = await self.pool.fetchval("SELECT now()")
        return value

    @_guarded
    async def upsert_subscription(self, subscription: Subscription) -> SubscriptionUpsert:
        s = subscription
        row = await self.pool.fetchrow(
            "SELECT r.applied, (r.subscription).*"
            " FROM ledger_upsert_subscription($1, $2, $3, $4, $5, $6, $7, $8) AS r",
            s.source, s.external_id, s.user_id, s.variant_id, s.status, s.renews_at, s.ends_at,
            s.provider_updated_at,
        )  # fmt: skip
        assert row is not None
        return SubscriptionUpsert(applied=row["applied"], subscription=_subscription(row))

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
        self, source: str, subject: str, include_resolved: bool, limit: int, max_body_bytes: int
    ) -> list[DeadLetter]:
        # Fixed fragments only (no input in the text), so each variant can use its index: the
        # partial index of open letters needs `resolved_at IS NULL` spelled out in the query.
        where = "source = $1"
        args: list[object] = [source, limit, max_body_bytes]
        if subject:
            where += " AND subject = $4"
            args.append(subject)
        if not include_resolved:
            where += " AND resolved_at IS NULL"
        rows = await self.pool.fetch(
            f"""
            SELECT * FROM (
              SELECT page.*, row_number() OVER w AS n, sum(size) OVER w AS running
                FROM (SELECT *, octet_length(raw_body) AS size FROM dead_letters
                       WHERE {where} ORDER BY created_at, id LIMIT $2) AS page
              WINDOW w AS (ORDER BY created_at, id ROWS UNBOUNDED PRECEDING)
            ) AS sized
             WHERE n = 1 OR running <= $3
             ORDER BY created_at, id
            """,
            *args,
        )
        return [_dead_letter(r) for r in rows]

    @_guarded
    async def resolve_dead_letter(self, dead_letter_id: uuid.UUID, resolution: str) -> DeadLetter:
        row = await self.pool.fetchrow(
            "SELECT * FROM ledger_resolve_dead_letter($1, $2)", dead_letter_id, resolution
        )
        if row is None:
            raise DeadLetterNotFound("no such dead letter")
        return _dead_letter(row)


def _refund(a: Answer) -> Refund:
    return Refund(
        tokens_refunded=int(a["tokens_refunded"]),
        tokens_debited=int(a["tokens_debited"]),
        shortfall_tokens=int(a["shortfall_tokens"]),
        platform_fee_reversed=int(a["platform_fee_reversed"]),
        balance=_balance(a),
        replayed=bool(a.get("replayed", False)),
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
