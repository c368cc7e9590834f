"""The ledger's tables as typed SQLAlchemy models: the schema's source of truth for Alembic.

Runtime statements live in the PL/pgSQL functions of the migrations (one round trip per ledger
operation); these models describe the tables those functions work on, and a test checks that
the migrated database matches them.
"""

from __future__ import annotations

import uuid
from datetime import date, datetime

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Date,
    DateTime,
    ForeignKey,
    ForeignKeyConstraint,
    Identity,
    Index,
    LargeBinary,
    MetaData,
    SmallInteger,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB, UUID
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# Platform accounts have fixed ids so the hot path needs no lookup; user accounts start above.
PLATFORM_ACCOUNTS = {
    "payments_clearing": 1,  # where purchased tokens come from (the payment provider's side)
    "purchase_fee": 2,  # the platform's share of every purchase
    "usage": 3,  # tokens consumed by AI calls
    "usage_fee": 4,  # the fee on every AI call
    "refund_receivable": 5,  # refunds of tokens the user had already spent
    "unbilled_usage": 6,  # usage the balance could not cover (late settles, overruns)
}
FIRST_USER_ACCOUNT_ID = 1000
# Journal entries that analytics read by time: a refund credits payments clearing, its shortfall
# debits the refund receivable, a settle the balance could not cover debits unbilled usage.
JOURNAL_EXCEPTIONS = (
    "(account_id = 1 AND amount > 0) OR (account_id = 5 AND amount < 0) OR account_id = 6"
)

HOLD_STATUSES = ("held", "settled", "released", "expired", "settled_after_expiry")
PURCHASE_TYPES = ("subscription", "one_time")
USER_TYPES = ("subscription", "byok", "unknown", "public_byok")


def _now() -> Mapped[datetime]:
    return mapped_column(DateTime(timezone=True), server_default=func.now(), nullable=False)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class Account(Base):
    """One per user (cached balance) plus the platform accounts (balance derived from entries)."""

    __tablename__ = "accounts"
    __table_args__ = (
        CheckConstraint("available >= 0", name="available_nonnegative"),
        CheckConstraint("reserved >= 0", name="reserved_nonnegative"),
        CheckConstraint("(user_id IS NULL) <> (code IS NULL)", name="user_or_platform"),
        CheckConstraint("owed >= 0", name="owed_nonnegative"),
        # The open refund receivable, summed without reading every account (migration 0010).
        Index(
            "ix_accounts_owing",
            "id",
            postgresql_include=["owed"],
            postgresql_where=text("owed > 0"),
        ),
    )

    id: Mapped[int] = mapped_column(
        BigInteger, Identity(start=FIRST_USER_ACCOUNT_ID), primary_key=True
    )
    user_id: Mapped[str | None] = mapped_column(Text, unique=True)
    code: Mapped[str | None] = mapped_column(Text, unique=True)
    available: Mapped[int] = mapped_column(BigInteger, nullable=False, server_default=text("0"))
    reserved: Mapped[int] = mapped_column(BigInteger, nullable=False, server_default=text("0"))
    # Tokens of refunded payments the balance could not give back (spent, or on hold): collected
    # from the next tokens that become available. owed > 0 implies available = 0.
    owed: Mapped[int] = mapped_column(BigInteger, nullable=False, server_default=text("0"))
    created_at: Mapped[datetime] = _now()


class JournalTransaction(Base):
    """One mutation of the ledger; its entries sum to zero. Records the rates it used."""

    __tablename__ = "journal_transactions"

    # Keys lead with user_id, the distribution column on Citus (docs/scaling.md).
    user_id: Mapped[str] = mapped_column(Text, primary_key=True)
    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    kind: Mapped[str] = mapped_column(Text, nullable=False)
    purchase_id: Mapped[uuid.UUID | None] = mapped_column(UUID(as_uuid=True))
    hold_id: Mapped[uuid.UUID | None] = mapped_column(UUID(as_uuid=True))
    user_share_percent: Mapped[int | None] = mapped_column(SmallInteger)
    usage_fee_percent: Mapped[int | None] = mapped_column(SmallInteger)
    created_at: Mapped[datetime] = _now()


class JournalEntry(Base):
    """Append-only (a trigger refuses UPDATE and DELETE). Positive credits the account."""

    __tablename__ = "journal_entries"
    __table_args__ = (
        CheckConstraint("amount <> 0", name="amount_nonzero"),
        Index(None, "account_id"),
        Index(None, "transaction_id"),
        # The rare entries of refunds, shortfalls and unbilled usage, by time (migration 0010).
        Index(
            "ix_journal_entries_exceptions",
            "created_at",
            postgresql_include=["account_id", "amount"],
            postgresql_where=text(JOURNAL_EXCEPTIONS),
        ),
        ForeignKeyConstraint(
            ["user_id", "transaction_id"],
            ["journal_transactions.user_id", "journal_transactions.id"],
            name="fk_journal_entries_user_id_journal_transactions",
        ),
    )

    # The user of the entry's transaction, also on entries to platform accounts.
    user_id: Mapped[str] = mapped_column(Text, primary_key=True)
    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    transaction_id: Mapped[int] = mapped_column(BigInteger, nullable=False)
    account_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("accounts.id"), nullable=False)
    amount: Mapped[int] = mapped_column(BigInteger, nullable=False)
    created_at: Mapped[datetime] = _now()


class Hold(Base):
    """A two-phase reservation: held, then settled, released or expired, exactly once."""

    __tablename__ = "holds"
    __table_args__ = (
        CheckConstraint("amount > 0", name="amount_positive"),
        CheckConstraint(
            "status IN ('held', 'settled', 'released', 'expired', 'settled_after_expiry')",
            name="status_known",
        ),
        Index("ix_holds_due", "expires_at", postgresql_where=text("status = 'held'")),
        Index(None, "account_id"),
        # Callers that do not say whose hold they name are answered by id.
        Index("ix_holds_id", "id"),
    )

    user_id: Mapped[str] = mapped_column(Text, primary_key=True)
    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    account_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("accounts.id"), nullable=False)
    amount: Mapped[int] = mapped_column(BigInteger, nullable=False)
    status: Mapped[str] = mapped_column(Text, nullable=False)
    usage_fee_percent: Mapped[int] = mapped_column(SmallInteger, nullable=False)
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    created_at: Mapped[datetime] = _now()
    resolved_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    settle_hash: Mapped[bytes | None] = mapped_column(LargeBinary)
    settle_response: Mapped[dict[str, object] | None] = mapped_column(JSONB)
    release_response: Mapped[dict[str, object] | None] = mapped_column(JSONB)
    # Charge beyond the hold: a provider anomaly (holds are sized from an upper bound).
    overrun: Mapped[int] = mapped_column(BigInteger, nullable=False, server_default=text("0"))
    # The month whose quota the hold counts in (NULL: the call had no monthly quota).
    quota_month: Mapped[date | None] = mapped_column(Date)


# The table's own bound; the ledger's configured ANSWER_MAX_BYTES is at most this.
HOLD_ANSWER_MAX_BYTES = 16 * 1024 * 1024


class HoldAnswer(Base):
    """The answer a keyed call settled with (opaque to the ledger), for its retries; deleted
    after ANSWER_RETENTION_SECONDS."""

    __tablename__ = "hold_answers"
    __table_args__ = (
        CheckConstraint(f"octet_length(answer) <= {HOLD_ANSWER_MAX_BYTES}", name="answer_bounded"),
        Index("ix_hold_answers_created_at", "created_at"),
        ForeignKeyConstraint(
            ["user_id", "hold_id"],
            ["holds.user_id", "holds.id"],
            name="fk_hold_answers_user_id_holds",
        ),
    )

    user_id: Mapped[str] = mapped_column(Text, primary_key=True)
    hold_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    answer: Mapped[bytes] = mapped_column(LargeBinary, nullable=False)
    created_at: Mapped[datetime] = _now()


class Purchase(Base):
    """A credited payment; (source, external_id) is credited at most once."""

    __tablename__ = "purchases"
    __table_args__ = (
        UniqueConstraint("source", "external_id"),
        CheckConstraint("tokens_purchased > 0", name="tokens_positive"),
        CheckConstraint(
            "tokens_credited + platform_fee_tokens = tokens_purchased", name="legs_add_up"
        ),
        CheckConstraint(
            "tokens_refunded >= 0 AND tokens_refunded <= tokens_purchased", name="refund_bounded"
        ),
        CheckConstraint("purchase_type IN ('subscription', 'one_time')", name="type_known"),
        Index("ix_purchases_user_newest", "user_id", text("created_at DESC"), text("id DESC")),
        # Refunds name a purchase by id (the payment provider knows no user).
        Index("ix_purchases_id", "id"),
        CheckConstraint("currency ~ '^[A-Z]{3}$'", name="payment_currency_iso"),
        CheckConstraint(
            "(currency IS NULL) = (amount_minor IS NULL)", name="payment_amount_with_currency"
        ),
        CheckConstraint(
            "amount_minor >= 0 AND amount_usd_cents >= 0", name="payment_amounts_nonnegative"
        ),
        CheckConstraint(
            "currency IS DISTINCT FROM 'USD' OR amount_usd_cents IS NOT DISTINCT FROM amount_minor",
            name="payment_usd_is_amount",
        ),
        # Platform analytics by time, from the index alone (migration 0010).
        Index(
            "ix_purchases_created_at",
            "created_at",
            postgresql_include=[
                "source",
                "currency",
                "tokens_purchased",
                "tokens_credited",
                "platform_fee_tokens",
                "amount_minor",
                "amount_usd_cents",
            ],
        ),
    )

    user_id: Mapped[str] = mapped_column(Text, primary_key=True)
    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    account_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("accounts.id"), nullable=False)
    purchase_type: Mapped[str] = mapped_column(Text, nullable=False)
    tokens_purchased: Mapped[int] = mapped_column(BigInteger, nullable=False)
    tokens_credited: Mapped[int] = mapped_column(BigInteger, nullable=False)
    platform_fee_tokens: Mapped[int] = mapped_column(BigInteger, nullable=False)
    tokens_refunded: Mapped[int] = mapped_column(
        BigInteger, nullable=False, server_default=text("0")
    )
    source: Mapped[str] = mapped_column(Text, nullable=False)
    external_id: Mapped[str] = mapped_column(Text, nullable=False)
    request_hash: Mapped[bytes] = mapped_column(LargeBinary, nullable=False)
    user_share_percent: Mapped[int] = mapped_column(SmallInteger, nullable=False)
    created_at: Mapped[datetime] = _now()
    # What the buyer paid, as the payment provider reported it (NULL: not reported): ISO 4217
    # currency with the amount in its minor unit, and the US-dollar value in cents.
    currency: Mapped[str | None] = mapped_column(Text)
    amount_minor: Mapped[int | None] = mapped_column(BigInteger)
    amount_usd_cents: Mapped[int | None] = mapped_column(BigInteger)


class UsageRecord(Base):
    """One AI call, for analytics: subscription calls (from Settle) and BYOK calls."""

    __tablename__ = "usage_records"
    __table_args__ = (
        CheckConstraint(
            "user_type IN ('subscription', 'byok', 'unknown', 'public_byok')", name="type_known"
        ),
        CheckConstraint(
            "input_tokens >= 0 AND output_tokens >= 0 AND tokens_charged >= 0",
            name="counts_nonnegative",
        ),
        CheckConstraint("usage_fee_tokens >= 0", name="fee_nonnegative"),
        # A public BYOK call has no user, and it alone.
        CheckConstraint(
            "(user_type = 'public_byok') = (user_id = '')", name="public_byok_anonymous"
        ),
        Index("ix_usage_records_user_time", "user_id", "created_at"),
        # Rows arrive in time order: a BRIN index finds a time range for next to no write cost.
        Index(
            "ix_usage_records_created_at",
            "created_at",
            postgresql_using="brin",
            postgresql_with={"autosummarize": "on"},
        ),
        # A hold has one user: still one usage record per hold.
        UniqueConstraint("user_id", "hold_id"),
        # A server-held prompt is named by both, or the call used none (migration 0011).
        CheckConstraint("(prompt_id IS NULL) = (prompt_version IS NULL)", name="prompt_whole"),
    )

    user_id: Mapped[str] = mapped_column(Text, primary_key=True)
    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    user_type: Mapped[str] = mapped_column(Text, nullable=False)
    provider: Mapped[str] = mapped_column(Text, nullable=False)
    model: Mapped[str] = mapped_column(Text, nullable=False)
    input_tokens: Mapped[int] = mapped_column(BigInteger, nullable=False)
    output_tokens: Mapped[int] = mapped_column(BigInteger, nullable=False)
    tokens_charged: Mapped[int] = mapped_column(
        BigInteger, nullable=False, server_default=text("0")
    )
    # The usage fee the settle booked (part of tokens_charged unless unbilled); 0 for BYOK.
    usage_fee_tokens: Mapped[int] = mapped_column(
        BigInteger, nullable=False, server_default=text("0")
    )
    estimated_cost_micro_usd: Mapped[int | None] = mapped_column(BigInteger)
    hold_id: Mapped[uuid.UUID | None] = mapped_column(UUID(as_uuid=True))
    idempotency_key: Mapped[str | None] = mapped_column(Text, unique=True)
    request_hash: Mapped[bytes | None] = mapped_column(LargeBinary)
    # The server-held prompt the call used (the gateway's prompt library); NULL: none.
    prompt_id: Mapped[str | None] = mapped_column(Text)
    prompt_version: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = _now()


class IdempotencyKey(Base):
    """The stored original answer (success or failure) of a keyed mutating call."""

    __tablename__ = "idempotency_keys"
    __table_args__ = (Index("ix_idempotency_keys_created_at", "created_at"),)

    operation: Mapped[str] = mapped_column(Text, primary_key=True)
    key: Mapped[str] = mapped_column(Text, primary_key=True)
    request_hash: Mapped[bytes] = mapped_column(LargeBinary, nullable=False)
    response: Mapped[dict[str, object] | None] = mapped_column(JSONB)
    # The key only guards transport retries of a keyless call: kept for the short retention.
    transient: Mapped[bool] = mapped_column(Boolean, nullable=False, server_default=text("false"))
    # Who claimed it; NULL for payment keys, claimed before the purchase's user is known.
    user_id: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = _now()


# The ledger refuses larger webhook bodies (domain.ledger.MAX_RAW_BODY_BYTES); so does the table.
DEAD_LETTER_MAX_RAW_BODY_BYTES = 1024 * 1024


class Subscription(Base):
    """A payment provider's subscription as its webhooks last described it. A state older than
    the stored one (by provider_updated_at) is never applied: deliveries come out of order."""

    __tablename__ = "subscriptions"
    __table_args__ = (
        CheckConstraint("status <> ''", name="status_not_empty"),
        CheckConstraint(
            "tokens_per_period IS NULL OR tokens_per_period > 0", name="tokens_per_period_positive"
        ),
        Index(None, "user_id"),
    )

    source: Mapped[str] = mapped_column(Text, primary_key=True)
    external_id: Mapped[str] = mapped_column(Text, primary_key=True)
    user_id: Mapped[str] = mapped_column(Text, nullable=False)
    variant_id: Mapped[str] = mapped_column(Text, nullable=False)
    status: Mapped[str] = mapped_column(Text, nullable=False)
    renews_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    ends_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    provider_updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    created_at: Mapped[datetime] = _now()
    # When the ledger last applied a state (not the provider's clock).
    updated_at: Mapped[datetime] = _now()
    # Tokens each payment buys, from the gateway's catalog when a state was applied; NULL: unknown.
    tokens_per_period: Mapped[int | None] = mapped_column(BigInteger)


class DeadLetter(Base):
    """A webhook event that could not be applied, with its raw body, until someone resolves it.
    The same event parked twice is stored once: (source, dedupe_key) is unique."""

    __tablename__ = "dead_letters"
    __table_args__ = (
        UniqueConstraint("source", "dedupe_key"),
        CheckConstraint(
            f"octet_length(raw_body) <= {DEAD_LETTER_MAX_RAW_BODY_BYTES}", name="raw_body_bounded"
        ),
        CheckConstraint("(resolved_at IS NULL) = (resolution IS NULL)", name="resolved_with_note"),
        Index("ix_dead_letters_source_time", "source", "created_at", "id"),
        Index(
            "ix_dead_letters_open_subject",
            "source",
            "subject",
            "created_at",
            "id",
            postgresql_where=text("resolved_at IS NULL"),
        ),
        Index(
            "ix_dead_letters_resolved_at",
            "resolved_at",
            postgresql_where=text("resolved_at IS NOT NULL"),
        ),
    )

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    source: Mapped[str] = mapped_column(Text, nullable=False)
    event_name: Mapped[str] = mapped_column(Text, nullable=False)
    subject: Mapped[str] = mapped_column(Text, nullable=False)
    reason: Mapped[str] = mapped_column(Text, nullable=False)
    raw_body: Mapped[bytes] = mapped_column(LargeBinary, nullable=False)
    dedupe_key: Mapped[str] = mapped_column(Text, nullable=False)
    created_at: Mapped[datetime] = _now()
    resolved_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    resolution: Mapped[str | None] = mapped_column(Text)


class ParkedOperation(Base):
    """A payment event that arrived before its subject (an invoice before its subscription, a
    refund before its purchase). The transaction that creates the subject applies it."""

    __tablename__ = "parked_operations"
    __table_args__ = (
        UniqueConstraint("operation", "idempotency_key"),
        CheckConstraint(
            "operation IN ('credit_purchase', 'refund_purchase')", name="operation_known"
        ),
        CheckConstraint("(applied_at IS NULL) = (outcome IS NULL)", name="applied_with_outcome"),
        Index(
            "ix_parked_operations_waiting",
            "subject",
            "created_at",
            postgresql_where=text("applied_at IS NULL"),
        ),
    )

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    # "purchase:<source>:<external id>" or "subscription:<source>:<external id>".
    subject: Mapped[str] = mapped_column(Text, nullable=False)
    operation: Mapped[str] = mapped_column(Text, nullable=False)
    idempotency_key: Mapped[str] = mapped_column(Text, nullable=False)
    request: Mapped[dict[str, object]] = mapped_column(JSONB, nullable=False)
    created_at: Mapped[datetime] = _now()
    applied_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    outcome: Mapped[dict[str, object] | None] = mapped_column(JSONB)


class MonthlyUsage(Base):
    """Tokens charged and held in one calendar month for a user with a monthly quota. A new month
    is a new row; a hold's month is its `quota_month`."""

    __tablename__ = "monthly_usage"
    __table_args__ = (CheckConstraint("charged >= 0 AND held >= 0", name="counts_nonnegative"),)

    user_id: Mapped[str] = mapped_column(Text, primary_key=True)
    month: Mapped[date] = mapped_column(Date, primary_key=True)
    charged: Mapped[int] = mapped_column(BigInteger, nullable=False, server_default=text("0"))
    held: Mapped[int] = mapped_column(BigInteger, nullable=False, server_default=text("0"))


class UsageDaily(Base):
    """Usage per UTC day, user, user type, provider and model: a rollup of usage_records written
    only by the analytics job (`ledger_rollup_usage`), never per call. Holds the days before
    `analytics_rollups.rolled_until`; readers take later ones from usage_records."""

    __tablename__ = "usage_daily"
    __table_args__ = (
        CheckConstraint(
            "requests > 0 AND tokens_used >= 0 AND tokens_charged >= 0 AND usage_fee_tokens >= 0"
            " AND cost_micro_usd >= 0 AND unknown_cost_requests >= 0",
            name="counts_nonnegative",
        ),
        Index("ix_usage_daily_day", "day"),
    )

    user_id: Mapped[str] = mapped_column(Text, primary_key=True)
    day: Mapped[date] = mapped_column(Date, primary_key=True)
    user_type: Mapped[str] = mapped_column(Text, primary_key=True)
    provider: Mapped[str] = mapped_column(Text, primary_key=True)
    model: Mapped[str] = mapped_column(Text, primary_key=True)
    requests: Mapped[int] = mapped_column(BigInteger, nullable=False)
    tokens_used: Mapped[int] = mapped_column(BigInteger, nullable=False)
    tokens_charged: Mapped[int] = mapped_column(BigInteger, nullable=False)
    usage_fee_tokens: Mapped[int] = mapped_column(BigInteger, nullable=False)
    # Sum of the known estimates; calls without one are counted in unknown_cost_requests.
    cost_micro_usd: Mapped[int] = mapped_column(BigInteger, nullable=False)
    unknown_cost_requests: Mapped[int] = mapped_column(BigInteger, nullable=False)


class UsageMonthly(Base):
    """usage_daily summed per calendar month, once every day of the month is rolled: a year of
    monthly figures reads a few rows per active user and model. Written by the job only."""

    __tablename__ = "usage_monthly"
    __table_args__ = (
        CheckConstraint(
            "requests > 0 AND tokens_used >= 0 AND tokens_charged >= 0 AND usage_fee_tokens >= 0"
            " AND cost_micro_usd >= 0 AND unknown_cost_requests >= 0",
            name="counts_nonnegative",
        ),
        CheckConstraint("extract(day FROM month) = 1", name="month_starts"),
        Index("ix_usage_monthly_month", "month"),
    )

    user_id: Mapped[str] = mapped_column(Text, primary_key=True)
    month: Mapped[date] = mapped_column(Date, primary_key=True)
    user_type: Mapped[str] = mapped_column(Text, primary_key=True)
    provider: Mapped[str] = mapped_column(Text, primary_key=True)
    model: Mapped[str] = mapped_column(Text, primary_key=True)
    requests: Mapped[int] = mapped_column(BigInteger, nullable=False)
    tokens_used: Mapped[int] = mapped_column(BigInteger, nullable=False)
    tokens_charged: Mapped[int] = mapped_column(BigInteger, nullable=False)
    usage_fee_tokens: Mapped[int] = mapped_column(BigInteger, nullable=False)
    cost_micro_usd: Mapped[int] = mapped_column(BigInteger, nullable=False)
    unknown_cost_requests: Mapped[int] = mapped_column(BigInteger, nullable=False)


class AnalyticsRollup(Base):
    """How far a rollup reaches: every UTC day (usage_daily) or month (usage_monthly) before
    `rolled_until` is in it (NULL: none yet)."""

    __tablename__ = "analytics_rollups"
    __table_args__ = (
        CheckConstraint("name IN ('usage_daily', 'usage_monthly')", name="name_known"),
    )

    name: Mapped[str] = mapped_column(Text, primary_key=True)
    rolled_until: Mapped[date | None] = mapped_column(Date)
    updated_at: Mapped[datetime] = _now()
