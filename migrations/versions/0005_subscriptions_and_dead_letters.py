"""subscriptions (payment-provider state) and dead letters (webhook events not applied)

Subscriptions are keyed by the provider's (source, external_id); a state is applied only when its
provider_updated_at is newer than the stored one, so late, replayed or duplicate deliveries change
nothing. Dead letters keep the raw body of an event that could not be applied; (source,
dedupe_key) stores the same event once. Each mutation is one SQL function: one round trip, and the
"changed or not" answer comes from the same transaction as the change.

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

MAX_RAW_BODY_BYTES = 1024 * 1024

FUNCTIONS = r"""
-- Applies a subscription state unless the stored one is as new or newer. ON CONFLICT ... WHERE
-- decides under the row's lock, so concurrent deliveries apply in provider order whatever the
-- order they arrive in; the stored state is read back (a fresh snapshot) when nothing applied.
CREATE FUNCTION ledger_upsert_subscription(
  p_source text, p_external_id text, p_user text, p_variant text, p_status text,
  p_renews_at timestamptz, p_ends_at timestamptz, p_updated_at timestamptz,
  OUT applied boolean, OUT subscription subscriptions
) LANGUAGE plpgsql AS $$
BEGIN
  INSERT INTO subscriptions AS s (source, external_id, user_id, variant_id, status, renews_at,
                                  ends_at, provider_updated_at)
    VALUES (p_source, p_external_id, p_user, p_variant, p_status, p_renews_at, p_ends_at,
            p_updated_at)
  ON CONFLICT (source, external_id) DO UPDATE
    SET user_id = excluded.user_id, variant_id = excluded.variant_id, status = excluded.status,
        renews_at = excluded.renews_at, ends_at = excluded.ends_at,
        provider_updated_at = excluded.provider_updated_at, updated_at = now()
    WHERE s.provider_updated_at < excluded.provider_updated_at
  RETURNING s.* INTO subscription;
  applied := FOUND;
  IF NOT applied THEN
    SELECT s.* INTO subscription FROM subscriptions s
     WHERE s.source = p_source AND s.external_id = p_external_id;
  END IF;
END $$;

-- Parks an event; the same (source, dedupe_key) again answers the stored letter's id.
CREATE FUNCTION ledger_record_dead_letter(
  p_source text, p_event text, p_subject text, p_reason text, p_body bytea, p_dedupe text,
  OUT dead_letter_id uuid, OUT replayed boolean
) LANGUAGE plpgsql AS $$
BEGIN
  INSERT INTO dead_letters (id, source, event_name, subject, reason, raw_body, dedupe_key)
    VALUES (gen_random_uuid(), p_source, p_event, p_subject, p_reason, p_body, p_dedupe)
  ON CONFLICT (source, dedupe_key) DO NOTHING
  RETURNING id INTO dead_letter_id;
  replayed := NOT FOUND;
  IF replayed THEN
    SELECT id INTO dead_letter_id FROM dead_letters
     WHERE source = p_source AND dedupe_key = p_dedupe;
  END IF;
END $$;

-- Resolves a letter exactly once: a second call (even racing the first) answers the stored
-- resolution. No row: no such letter.
CREATE FUNCTION ledger_resolve_dead_letter(p_id uuid, p_resolution text)
RETURNS SETOF dead_letters LANGUAGE plpgsql AS $$
BEGIN
  RETURN QUERY
    UPDATE dead_letters SET resolved_at = now(), resolution = p_resolution
     WHERE id = p_id AND resolved_at IS NULL
    RETURNING *;
  IF NOT FOUND THEN
    RETURN QUERY SELECT * FROM dead_letters WHERE id = p_id;
  END IF;
END $$;
"""

DROP = """
DROP FUNCTION IF EXISTS ledger_resolve_dead_letter(uuid, text);
DROP FUNCTION IF EXISTS ledger_record_dead_letter(text, text, text, text, bytea, text);
DROP FUNCTION IF EXISTS ledger_upsert_subscription(text, text, text, text, text, timestamptz,
  timestamptz, timestamptz);
"""


def _created_at() -> sa.Column[datetime]:
    return sa.Column(
        "created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False
    )


def upgrade() -> None:
    op.create_table(
        "subscriptions",
        sa.Column("source", sa.Text(), nullable=False),
        sa.Column("external_id", sa.Text(), nullable=False),
        sa.Column("user_id", sa.Text(), nullable=False),
        sa.Column("variant_id", sa.Text(), nullable=False),
        sa.Column("status", sa.Text(), nullable=False),
        sa.Column("renews_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("ends_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("provider_updated_at", sa.DateTime(timezone=True), nullable=False),
        _created_at(),
        sa.Column(
            "updated_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.CheckConstraint("status <> ''", name=op.f("ck_subscriptions_status_not_empty")),
        sa.PrimaryKeyConstraint("source", "external_id", name=op.f("pk_subscriptions")),
    )
    op.create_index(op.f("ix_subscriptions_user_id"), "subscriptions", ["user_id"], unique=False)
    op.create_table(
        "dead_letters",
        sa.Column("id", sa.UUID(), nullable=False),
        sa.Column("source", sa.Text(), nullable=False),
        sa.Column("event_name", sa.Text(), nullable=False),
        sa.Column("subject", sa.Text(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("raw_body", sa.LargeBinary(), nullable=False),
        sa.Column("dedupe_key", sa.Text(), nullable=False),
        _created_at(),
        sa.Column("resolved_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("resolution", sa.Text(), nullable=True),
        sa.CheckConstraint(
            f"octet_length(raw_body) <= {MAX_RAW_BODY_BYTES}",
            name=op.f("ck_dead_letters_raw_body_bounded"),
        ),
        sa.CheckConstraint(
            "(resolved_at IS NULL) = (resolution IS NULL)",
            name=op.f("ck_dead_letters_resolved_with_note"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_dead_letters")),
        sa.UniqueConstraint("source", "dedupe_key", name=op.f("uq_dead_letters_source_dedupe_key")),
    )
    op.create_index(
        "ix_dead_letters_source_time",
        "dead_letters",
        ["source", "created_at", "id"],
        unique=False,
    )
    op.create_index(
        "ix_dead_letters_open_subject",
        "dead_letters",
        ["source", "subject", "created_at", "id"],
        unique=False,
        postgresql_where=sa.text("resolved_at IS NULL"),
    )
    op.execute(FUNCTIONS)


def downgrade() -> None:
    # The functions use the tables' row types: they go first.
    op.execute(DROP)
    op.drop_index(
        "ix_dead_letters_open_subject",
        table_name="dead_letters",
        postgresql_where=sa.text("resolved_at IS NULL"),
    )
    op.drop_index("ix_dead_letters_source_time", table_name="dead_letters")
    op.drop_table("dead_letters")
    op.drop_index(op.f("ix_subscriptions_user_id"), table_name="subscriptions")
    op.drop_table("subscriptions")
