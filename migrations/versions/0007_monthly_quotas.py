"""monthly quotas: tokens charged per calendar month, capped where the money is

A Reserve may carry a monthly quota (from the caller's JWT or its tier). The month's usage
(`monthly_usage`: charged + held) is checked and raised in the same transaction as the hold, with
one conditional UPDATE, so no concurrency can overrun the quota. A hold remembers its month:
when it resolves (settled, released, expired) its held tokens leave the month, and what a settle
charges is added to it, whatever path resolves it (triggers, so that every path is covered by one
rule). A new month is a new row: nothing is ever reset by overwriting.

Locks are taken month row first, then account row, on every path (Reserve below; Settle, Release
and the sweeper reach the month row through the holds trigger before they touch the account), so
the two cannot deadlock.

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

FUNCTIONS = r"""
-- The first day of the calendar month `p_at` falls in, in time zone `p_tz`.
CREATE FUNCTION ledger_quota_month(p_at timestamptz, p_tz text) RETURNS date
LANGUAGE sql STABLE AS $$
  SELECT date_trunc('month', p_at AT TIME ZONE p_tz)::date
$$;

-- When that month ends (the quota resets), as a moment.
CREATE FUNCTION ledger_quota_resets_at(p_month date, p_tz text) RETURNS timestamptz
LANGUAGE sql STABLE AS $$
  SELECT (p_month + interval '1 month')::timestamp AT TIME ZONE p_tz
$$;

-- Two-phase step one, with the month's quota: one conditional UPDATE on the month's row (held +
-- charged + this hold must stay within the quota), then one on the balance; either refusal
-- changes nothing and gives the key back.
CREATE FUNCTION ledger_reserve(
  p_key text, p_hash bytea, p_user text, p_amount bigint, p_ttl_seconds int, p_fee_percent int,
  p_transient boolean, p_quota bigint, p_tz text, p_at timestamptz
) RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
  v_prior jsonb;
  v_bal record;
  v_id uuid;
  v_month date;
  v_used bigint;
  v_expires timestamptz := now() + make_interval(secs => p_ttl_seconds);
BEGIN
  v_prior := ledger_claim_key('reserve', p_key, p_hash, p_transient);
  IF v_prior IS NOT NULL THEN
    RETURN v_prior;
  END IF;
  IF p_quota > 0 THEN
    v_month := ledger_quota_month(coalesce(p_at, now()), p_tz);
    INSERT INTO monthly_usage (user_id, month) VALUES (p_user, v_month) ON CONFLICT DO NOTHING;
    UPDATE monthly_usage SET held = held + p_amount
     WHERE user_id = p_user AND month = v_month AND charged + held + p_amount <= p_quota;
    IF NOT FOUND THEN
      DELETE FROM idempotency_keys WHERE operation = 'reserve' AND key = p_key;
      SELECT charged + held INTO v_used FROM monthly_usage
       WHERE user_id = p_user AND month = v_month;
      RETURN jsonb_build_object('error', 'MONTHLY_QUOTA_EXCEEDED', 'required', p_amount,
        'quota', p_quota, 'used', v_used,
        'resets_at_us',
        (extract(epoch FROM ledger_quota_resets_at(v_month, p_tz)) * 1000000)::bigint);
    END IF;
  END IF;
  UPDATE accounts SET available = available - p_amount, reserved = reserved + p_amount
   WHERE user_id = p_user AND available >= p_amount
   RETURNING id, available, reserved, owed INTO v_bal;
  IF NOT FOUND THEN
    IF v_month IS NOT NULL THEN
      UPDATE monthly_usage SET held = held - p_amount WHERE user_id = p_user AND month = v_month;
    END IF;
    DELETE FROM idempotency_keys WHERE operation = 'reserve' AND key = p_key;
    SELECT available, reserved, owed INTO v_bal FROM accounts WHERE user_id = p_user;
    RETURN jsonb_build_object('error', 'INSUFFICIENT_BALANCE', 'required', p_amount,
      'balance', ledger_balance_json(coalesce(v_bal.available, 0), coalesce(v_bal.reserved, 0),
                                     coalesce(v_bal.owed, 0)));
  END IF;
  INSERT INTO holds (id, account_id, user_id, amount, status, usage_fee_percent, expires_at,
                     quota_month)
    VALUES (gen_random_uuid(), v_bal.id, p_user, p_amount, 'held', p_fee_percent, v_expires,
            v_month)
    RETURNING id INTO v_id;
  RETURN ledger_store_answer('reserve', p_key, jsonb_build_object(
    'reservation_id', v_id, 'reserved_tokens', p_amount,
    'expires_at_us', (extract(epoch FROM v_expires) * 1000000)::bigint,
    'balance', ledger_balance_json(v_bal.available, v_bal.reserved, v_bal.owed)));
END $$;

-- A hold that stops being held (settled, released, expired) leaves its month's held tokens.
CREATE FUNCTION ledger_quota_hold_resolved() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  UPDATE monthly_usage SET held = held - NEW.amount
   WHERE user_id = NEW.user_id AND month = NEW.quota_month;
  RETURN NULL;
END $$;
CREATE TRIGGER holds_quota_resolved AFTER UPDATE OF status ON holds
  FOR EACH ROW WHEN (OLD.status = 'held' AND NEW.status <> 'held' AND NEW.quota_month IS NOT NULL)
  EXECUTE FUNCTION ledger_quota_hold_resolved();

-- What a settle charges counts in the month of its hold (a late settle too).
CREATE FUNCTION ledger_quota_charged() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  UPDATE monthly_usage m SET charged = m.charged + NEW.tokens_charged
    FROM holds h
   WHERE h.id = NEW.hold_id AND h.quota_month IS NOT NULL
     AND m.user_id = h.user_id AND m.month = h.quota_month;
  RETURN NULL;
END $$;
CREATE TRIGGER usage_records_quota_charged AFTER INSERT ON usage_records
  FOR EACH ROW WHEN (NEW.hold_id IS NOT NULL AND NEW.tokens_charged > 0)
  EXECUTE FUNCTION ledger_quota_charged();
"""

DROP = """
DROP TRIGGER IF EXISTS usage_records_quota_charged ON usage_records;
DROP FUNCTION IF EXISTS ledger_quota_charged();
DROP TRIGGER IF EXISTS holds_quota_resolved ON holds;
DROP FUNCTION IF EXISTS ledger_quota_hold_resolved();
DROP FUNCTION IF EXISTS ledger_reserve(text, bytea, text, bigint, int, int, boolean, bigint, text,
  timestamptz);
DROP FUNCTION IF EXISTS ledger_quota_resets_at(date, text);
DROP FUNCTION IF EXISTS ledger_quota_month(timestamptz, text);
"""


def upgrade() -> None:
    op.add_column("holds", sa.Column("quota_month", sa.Date(), nullable=True))
    op.create_table(
        "monthly_usage",
        sa.Column("user_id", sa.Text(), nullable=False),
        sa.Column("month", sa.Date(), nullable=False),
        sa.Column("charged", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.Column("held", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.CheckConstraint(
            "charged >= 0 AND held >= 0", name=op.f("ck_monthly_usage_counts_nonnegative")
        ),
        sa.PrimaryKeyConstraint("user_id", "month", name=op.f("pk_monthly_usage")),
    )
    op.execute("DROP FUNCTION ledger_reserve(text, bytea, text, bigint, int, int, boolean)")
    op.execute(FUNCTIONS)


def downgrade() -> None:
    op.execute(DROP)
    # 0006's definition, recovered from its migration (the same text it created).
    from importlib import util
    from pathlib import Path

    [path] = Path(__file__).parent.glob("0006_*.py")
    spec = util.spec_from_file_location("_rpcai_migration_0006", path)
    assert spec is not None
    assert spec.loader is not None
    module = util.module_from_spec(spec)
    spec.loader.exec_module(module)
    text: str = module.FUNCTIONS
    start = text.index("CREATE FUNCTION ledger_reserve(")
    end = text.index("END $$;", start) + len("END $$;")
    op.execute(text[start:end])
    op.drop_table("monthly_usage")
    op.drop_column("holds", "quota_month")
