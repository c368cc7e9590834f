"""operator analytics: what each purchase was paid, public BYOK usage, and a daily rollup of usage
kept by a job, so that platform-wide figures stay fast as the journal grows

- purchases carry the payment as the provider reported it: currency (ISO 4217), amount in the
  currency's minor unit, and its US-dollar value in cents (each NULL when unknown).
  ledger_apply_credit takes them as three trailing arguments, NULL by default. The payment is not
  part of a credit's request hash (the domain leaves it out): a delivery credited before this
  revision, redelivered now with its amount, is still the same request and replays.
- usage_records keep the usage fee a settle booked (usage_fee_tokens; backfilled from the
  journal's usage-fee entries), and accept user_type 'public_byok': a BYOK call by a caller with
  no account, recorded with an empty user_id (and only that type has one).
- usage_daily: usage per UTC day, user, user type, provider and model; usage_monthly: the same
  per calendar month, summed from usage_daily once every day of the month is in it. Written only
  by ledger_rollup_usage (a job, never the hot path: no row of either is touched per call).
  analytics_rollups.rolled_until says which days (months) each holds; a reader takes whole
  months, then whole days, from them and everything later from usage_records, so a figure does
  not depend on whether the job has run. Months keep a year of monthly figures to a few rows per
  active user and model, whatever the number of calls or days.
- Indexes for the cross-user reads: usage_records by time (BRIN: rows arrive in time order, and
  it costs the hot path's inserts next to nothing), purchases by time (covering), the few journal
  entries that book refunds, shortfalls and unbilled usage (partial), and accounts that owe.

Revision ID: 0010
Revises: 0009
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

from ledger_service.store.sql_history import restored

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SCHEMA_UP = r"""
ALTER TABLE purchases
  ADD COLUMN currency text,
  ADD COLUMN amount_minor bigint,
  ADD COLUMN amount_usd_cents bigint,
  ADD CONSTRAINT ck_purchases_payment_currency_iso CHECK (currency ~ '^[A-Z]{3}$'),
  ADD CONSTRAINT ck_purchases_payment_amount_with_currency
    CHECK ((currency IS NULL) = (amount_minor IS NULL)),
  ADD CONSTRAINT ck_purchases_payment_amounts_nonnegative
    CHECK (amount_minor >= 0 AND amount_usd_cents >= 0),
  -- A US-dollar payment's USD value is its amount.
  ADD CONSTRAINT ck_purchases_payment_usd_is_amount
    CHECK (currency IS DISTINCT FROM 'USD' OR amount_usd_cents IS NOT DISTINCT FROM amount_minor);
CREATE INDEX ix_purchases_created_at ON purchases (created_at)
  INCLUDE (source, currency, tokens_purchased, tokens_credited, platform_fee_tokens,
           amount_minor, amount_usd_cents);

ALTER TABLE usage_records
  ADD COLUMN usage_fee_tokens bigint NOT NULL DEFAULT 0,
  ADD CONSTRAINT ck_usage_records_fee_nonnegative CHECK (usage_fee_tokens >= 0),
  DROP CONSTRAINT ck_usage_records_type_known,
  ADD CONSTRAINT ck_usage_records_type_known
    CHECK (user_type IN ('subscription', 'byok', 'unknown', 'public_byok'));
-- No account, no user: an empty user_id is a public BYOK call, and only that. (Before this
-- revision no row had an empty user_id; one that went down and up again was public.)
UPDATE usage_records SET user_type = 'public_byok' WHERE user_id = '';
ALTER TABLE usage_records ADD CONSTRAINT ck_usage_records_public_byok_anonymous
  CHECK ((user_type = 'public_byok') = (user_id = ''));
-- The fee each settle booked, from its journal transaction (a settle of nothing booked none).
UPDATE usage_records u SET usage_fee_tokens = e.amount
  FROM journal_transactions t
  JOIN journal_entries e ON e.user_id = t.user_id AND e.transaction_id = t.id AND e.account_id = 4
 WHERE t.kind = 'usage' AND t.user_id = u.user_id AND t.hold_id = u.hold_id;
CREATE INDEX ix_usage_records_created_at ON usage_records USING brin (created_at)
  WITH (autosummarize = on);

-- Refunds credit payments clearing (1), shortfalls debit the refund receivable (5), late or
-- overrun settles debit unbilled usage (6): rare entries among millions, indexed alone.
CREATE INDEX ix_journal_entries_exceptions ON journal_entries (created_at)
  INCLUDE (account_id, amount)
  WHERE (account_id = 1 AND amount > 0) OR (account_id = 5 AND amount < 0) OR account_id = 6;

CREATE INDEX ix_accounts_owing ON accounts (id) INCLUDE (owed) WHERE owed > 0;

CREATE TABLE usage_daily (
  user_id text NOT NULL,
  day date NOT NULL,
  user_type text NOT NULL,
  provider text NOT NULL,
  model text NOT NULL,
  requests bigint NOT NULL,
  tokens_used bigint NOT NULL,
  tokens_charged bigint NOT NULL,
  usage_fee_tokens bigint NOT NULL,
  cost_micro_usd bigint NOT NULL,
  unknown_cost_requests bigint NOT NULL,
  CONSTRAINT pk_usage_daily PRIMARY KEY (user_id, day, user_type, provider, model),
  CONSTRAINT ck_usage_daily_counts_nonnegative CHECK (
    requests > 0 AND tokens_used >= 0 AND tokens_charged >= 0 AND usage_fee_tokens >= 0
    AND cost_micro_usd >= 0 AND unknown_cost_requests >= 0)
);
CREATE INDEX ix_usage_daily_day ON usage_daily (day);

CREATE TABLE usage_monthly (
  user_id text NOT NULL,
  month date NOT NULL,
  user_type text NOT NULL,
  provider text NOT NULL,
  model text NOT NULL,
  requests bigint NOT NULL,
  tokens_used bigint NOT NULL,
  tokens_charged bigint NOT NULL,
  usage_fee_tokens bigint NOT NULL,
  cost_micro_usd bigint NOT NULL,
  unknown_cost_requests bigint NOT NULL,
  CONSTRAINT pk_usage_monthly PRIMARY KEY (user_id, month, user_type, provider, model),
  CONSTRAINT ck_usage_monthly_counts_nonnegative CHECK (
    requests > 0 AND tokens_used >= 0 AND tokens_charged >= 0 AND usage_fee_tokens >= 0
    AND cost_micro_usd >= 0 AND unknown_cost_requests >= 0),
  CONSTRAINT ck_usage_monthly_month_starts CHECK (extract(day FROM month) = 1)
);
CREATE INDEX ix_usage_monthly_month ON usage_monthly (month);

CREATE TABLE analytics_rollups (
  name text NOT NULL,
  rolled_until date,
  updated_at timestamptz NOT NULL DEFAULT now(),
  CONSTRAINT pk_analytics_rollups PRIMARY KEY (name),
  CONSTRAINT ck_analytics_rollups_name_known CHECK (name IN ('usage_daily', 'usage_monthly'))
);
INSERT INTO analytics_rollups (name) VALUES ('usage_daily'), ('usage_monthly');
"""

SCHEMA_DOWN = """
DROP TABLE analytics_rollups;
DROP TABLE usage_monthly;
DROP TABLE usage_daily;
DROP INDEX ix_accounts_owing;
DROP INDEX ix_journal_entries_exceptions;
DROP INDEX ix_usage_records_created_at;
-- The older schema has no public BYOK type: those rows become 'unknown' (still no user).
ALTER TABLE usage_records DROP CONSTRAINT ck_usage_records_public_byok_anonymous,
  DROP CONSTRAINT ck_usage_records_type_known;
UPDATE usage_records SET user_type = 'unknown' WHERE user_type = 'public_byok';
ALTER TABLE usage_records
  ADD CONSTRAINT ck_usage_records_type_known
    CHECK (user_type IN ('subscription', 'byok', 'unknown')),
  DROP CONSTRAINT ck_usage_records_fee_nonnegative,
  DROP COLUMN usage_fee_tokens;
DROP INDEX ix_purchases_created_at;
ALTER TABLE purchases
  DROP CONSTRAINT ck_purchases_payment_usd_is_amount,
  DROP CONSTRAINT ck_purchases_payment_amounts_nonnegative,
  DROP CONSTRAINT ck_purchases_payment_amount_with_currency,
  DROP CONSTRAINT ck_purchases_payment_currency_iso,
  DROP COLUMN amount_usd_cents,
  DROP COLUMN amount_minor,
  DROP COLUMN currency;
"""

OLD_SIGNATURES = (
    "ledger_apply_credit(text, bytea, text, text, bigint, bigint, bigint, int, text, text)",
)
NEW_SIGNATURES = (
    "ledger_apply_credit(text, bytea, text, text, bigint, bigint, bigint, int, text, text, text,"
    " bigint, bigint)",
    "ledger_rollup_usage(int)",
)
# Restored by the downgrade from 0009, which last defined them (ledger_settle in place).
RESTORED = ("ledger_apply_credit", "ledger_settle")

FUNCTIONS = r"""
-- Credits a purchase the domain sized (0009), recording what the buyer paid when the provider
-- said (analytics only: the payment is not part of the request hash, so the dedupe below and the
-- replay of an earlier identical request ignore it, and the payment first recorded stays).
CREATE FUNCTION ledger_apply_credit(
  p_key text, p_hash bytea, p_user_id text, p_type text, p_tokens bigint, p_credit bigint,
  p_fee bigint, p_share_percent int, p_source text, p_external_id text,
  p_currency text DEFAULT NULL, p_amount_minor bigint DEFAULT NULL,
  p_amount_usd_cents bigint DEFAULT NULL
) RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
  v_account bigint;
  v_purchase record;
  v_id uuid := gen_random_uuid();
  v_tx bigint;
  v_bal record;
  v_collected bigint := 0;
BEGIN
  INSERT INTO accounts (user_id) VALUES (p_user_id) ON CONFLICT (user_id) DO NOTHING;
  INSERT INTO purchases (id, user_id, account_id, purchase_type, tokens_purchased,
                         tokens_credited, platform_fee_tokens, source, external_id,
                         request_hash, user_share_percent, currency, amount_minor,
                         amount_usd_cents)
    SELECT v_id, p_user_id, a.id, p_type, p_tokens, p_credit, p_fee, p_source, p_external_id,
           p_hash, p_share_percent, p_currency, p_amount_minor, p_amount_usd_cents
      FROM accounts a WHERE a.user_id = p_user_id
    ON CONFLICT (source, external_id) DO NOTHING;
  IF NOT FOUND THEN
    SELECT * INTO v_purchase
      FROM purchases /* global: a payment is credited once, whoever it names */
     WHERE source = p_source AND external_id = p_external_id;
    IF v_purchase.request_hash <> p_hash THEN
      RETURN ledger_store_answer('credit_purchase', p_key,
        jsonb_build_object('error', 'IDEMPOTENCY_KEY_REUSED',
                           'detail', 'this payment was already credited with another request'));
    END IF;
    SELECT available, reserved, owed INTO v_bal
      FROM accounts /* global: the replay answers with the balance of the user it credited */
     WHERE user_id = v_purchase.user_id AND id = v_purchase.account_id;
    RETURN ledger_store_answer('credit_purchase', p_key, jsonb_build_object(
      'purchase_id', v_purchase.id, 'tokens_credited', v_purchase.tokens_credited,
      'platform_fee_tokens', v_purchase.platform_fee_tokens, 'owed_collected', 0,
      'balance', ledger_balance_json(v_bal.available, v_bal.reserved, v_bal.owed)))
      || '{"replayed": true}';
  END IF;
  UPDATE accounts SET available = available + p_credit WHERE user_id = p_user_id
    RETURNING id, owed INTO v_bal;
  v_account := v_bal.id;
  INSERT INTO journal_transactions (kind, user_id, purchase_id, user_share_percent)
    VALUES ('purchase', p_user_id, v_id, p_share_percent) RETURNING id INTO v_tx;
  INSERT INTO journal_entries (user_id, transaction_id, account_id, amount)
    SELECT p_user_id, v_tx, e.account, e.amount
      FROM (VALUES (1::bigint, -p_tokens), (v_account, p_credit), (2::bigint, p_fee))
           AS e(account, amount)
     WHERE e.amount <> 0;
  IF v_bal.owed > 0 THEN
    v_collected := ledger_collect(p_user_id, v_account);
  END IF;
  SELECT available, reserved, owed INTO v_bal FROM accounts
   WHERE user_id = p_user_id AND id = v_account;
  RETURN ledger_store_answer('credit_purchase', p_key, jsonb_build_object(
    'purchase_id', v_id, 'tokens_credited', p_credit, 'platform_fee_tokens', p_fee,
    'owed_collected', v_collected,
    'balance', ledger_balance_json(v_bal.available, v_bal.reserved, v_bal.owed)))
    || '{"created": true}';
END $$;

-- Two-phase step two (0009), now keeping the usage fee it booked on the usage record, so that
-- analytics read fees per model without the journal.
CREATE OR REPLACE FUNCTION ledger_settle(
  p_user_id text, p_hold uuid, p_hash bytea, p_used bigint, p_fee bigint, p_fee_percent int,
  p_provider text, p_model text, p_input bigint, p_output bigint, p_cost bigint, p_answer bytea
) RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
  v_hold record;
  v_charge bigint := p_used + p_fee;
  v_from_hold bigint;
  v_extra bigint := 0;
  v_released bigint;
  v_charged bigint;
  v_unbilled bigint;
  v_overrun bigint;
  v_collected bigint := 0;
  v_available bigint;
  v_bal record;
  v_tx bigint;
  v_answer jsonb;
BEGIN
  UPDATE holds SET status = 'settled', resolved_at = now(), settle_hash = p_hash
   WHERE user_id = p_user_id AND id = p_hold AND status = 'held'
   RETURNING account_id, amount, amount AS original INTO v_hold;
  IF NOT FOUND THEN
    UPDATE holds SET status = 'settled_after_expiry', settle_hash = p_hash
     WHERE user_id = p_user_id AND id = p_hold AND status = 'expired'
     RETURNING account_id, 0::bigint AS amount, amount AS original INTO v_hold;
    IF NOT FOUND THEN
      SELECT status, settle_hash, settle_response INTO v_hold FROM holds
       WHERE user_id = p_user_id AND id = p_hold;
      IF NOT FOUND THEN
        RETURN jsonb_build_object('error', 'RESERVATION_NOT_FOUND');
      ELSIF v_hold.status IN ('settled', 'settled_after_expiry') THEN
        IF v_hold.settle_hash = p_hash THEN
          RETURN v_hold.settle_response || '{"replayed": true}';
        END IF;
        RETURN jsonb_build_object('error', 'IDEMPOTENCY_KEY_REUSED',
                                  'detail', 'the reservation was settled with other usage');
      END IF;
      RETURN jsonb_build_object('error', 'RESERVATION_NOT_HELD', 'status', v_hold.status);
    END IF;
  END IF;

  v_overrun := greatest(0, v_charge - v_hold.original);
  v_from_hold := least(v_charge, v_hold.amount);
  v_released := v_hold.amount - v_from_hold;
  IF v_charge > v_from_hold THEN
    SELECT available INTO v_available FROM accounts
     WHERE user_id = p_user_id AND id = v_hold.account_id FOR NO KEY UPDATE;
    v_extra := least(v_charge - v_from_hold, v_available);
  END IF;
  v_charged := v_from_hold + v_extra;
  v_unbilled := v_charge - v_charged;

  UPDATE accounts
     SET reserved = reserved - v_hold.amount, available = available + v_released - v_extra
   WHERE user_id = p_user_id AND id = v_hold.account_id
   RETURNING available, reserved, owed INTO v_bal;

  IF v_charge > 0 THEN
    INSERT INTO journal_transactions (kind, user_id, hold_id, usage_fee_percent)
      VALUES ('usage', p_user_id, p_hold, p_fee_percent) RETURNING id INTO v_tx;
    INSERT INTO journal_entries (user_id, transaction_id, account_id, amount)
      SELECT p_user_id, v_tx, e.account, e.amount
        FROM (VALUES (v_hold.account_id, -v_charged), (3::bigint, p_used), (4::bigint, p_fee),
                     (6::bigint, -v_unbilled)) AS e(account, amount)
       WHERE e.amount <> 0;
  END IF;
  IF v_bal.owed > 0 THEN
    v_collected := ledger_collect(p_user_id, v_hold.account_id);
    SELECT available, reserved, owed INTO v_bal FROM accounts
     WHERE user_id = p_user_id AND id = v_hold.account_id;
  END IF;
  INSERT INTO usage_records (id, user_id, user_type, provider, model, input_tokens,
                             output_tokens, tokens_charged, usage_fee_tokens,
                             estimated_cost_micro_usd, hold_id)
    VALUES (gen_random_uuid(), p_user_id, 'subscription', p_provider, p_model, p_input,
            p_output, v_charged, p_fee, p_cost, p_hold);
  IF p_answer IS NOT NULL THEN
    INSERT INTO hold_answers (user_id, hold_id, answer) VALUES (p_user_id, p_hold, p_answer);
  END IF;

  v_answer := jsonb_build_object(
    'tokens_used', p_used, 'fee_tokens', p_fee, 'tokens_charged', v_charged,
    'released_tokens', v_released, 'unbilled_tokens', v_unbilled, 'overrun_tokens', v_overrun,
    'owed_collected', v_collected, 'answer_stored', p_answer IS NOT NULL,
    'balance', ledger_balance_json(v_bal.available, v_bal.reserved, v_bal.owed));
  UPDATE holds SET settle_response = v_answer, overrun = v_overrun
   WHERE user_id = p_user_id AND id = p_hold;
  RETURN v_answer;
END $$;

-- Rolls complete UTC days of usage_records into usage_daily, oldest first, then every month whose
-- days are all there into usage_monthly; at most p_max days and p_max months per call (one
-- transaction). Returns how many days and months it rolled. A cross-user job, run by any
-- replica: one at a time (the others skip their turn); a day or a month is rolled whole or not at
-- all, together with the watermark that tells readers it is there. A day is complete once
-- nothing can still add rows to it: a row's created_at is the start of its transaction, so every
-- row older than the oldest transaction still running (and than a margin, for one that began but
-- has not shown itself in pg_stat_activity yet) is committed. Records are never updated or
-- deleted, so a rolled day stays exact (one rolled again is replaced, not added to).
CREATE FUNCTION ledger_rollup_usage(p_max int) RETURNS int LANGUAGE plpgsql AS $$
DECLARE
  v_next date;
  v_month date;
  v_complete timestamptz;
  v_days int := 0;
  v_months int := 0;
BEGIN
  IF NOT pg_try_advisory_xact_lock(hashtextextended('ledger_rollup_usage', 8270010)) THEN
    RETURN 0;
  END IF;
  SELECT rolled_until INTO v_next FROM analytics_rollups WHERE name = 'usage_daily' FOR UPDATE;
  IF v_next IS NULL THEN
    v_next := (SELECT (min(created_at) AT TIME ZONE 'UTC')::date
                 FROM usage_records /* global: the oldest day of any user */);
  END IF;
  SELECT least(now() - interval '10 minutes', min(xact_start)) INTO v_complete
    FROM pg_stat_activity
   WHERE datname = current_database() AND backend_type = 'client backend'
     AND xact_start IS NOT NULL AND pid <> pg_backend_pid();
  WHILE v_next IS NOT NULL AND v_days < p_max
        AND (v_next + 1)::timestamp AT TIME ZONE 'UTC' <= v_complete LOOP
    DELETE FROM usage_daily /* global: a whole day of every user */ WHERE day = v_next;
    INSERT INTO usage_daily (user_id, day, user_type, provider, model, requests, tokens_used,
                             tokens_charged, usage_fee_tokens, cost_micro_usd,
                             unknown_cost_requests)
      SELECT user_id, v_next, user_type, provider, model, count(*),
             sum(input_tokens + output_tokens), sum(tokens_charged), sum(usage_fee_tokens),
             coalesce(sum(estimated_cost_micro_usd), 0),
             count(*) FILTER (WHERE estimated_cost_micro_usd IS NULL)
        FROM usage_records /* global: a whole day of every user */
       WHERE created_at >= v_next::timestamp AT TIME ZONE 'UTC'
         AND created_at < (v_next + 1)::timestamp AT TIME ZONE 'UTC'
       GROUP BY user_id, user_type, provider, model;
    v_next := v_next + 1;
    v_days := v_days + 1;
  END LOOP;
  IF v_days > 0 THEN
    UPDATE analytics_rollups SET rolled_until = v_next, updated_at = now()
     WHERE name = 'usage_daily';
  END IF;

  SELECT rolled_until INTO v_month FROM analytics_rollups WHERE name = 'usage_monthly' FOR UPDATE;
  IF v_month IS NULL THEN
    v_month := (SELECT date_trunc('month', min(day))::date
                  FROM usage_daily /* global: the oldest day rolled */);
  END IF;
  WHILE v_month IS NOT NULL AND v_next IS NOT NULL AND v_months < p_max
        AND (v_month + interval '1 month')::date <= v_next LOOP
    DELETE FROM usage_monthly /* global: a whole month of every user */ WHERE month = v_month;
    INSERT INTO usage_monthly (user_id, month, user_type, provider, model, requests, tokens_used,
                               tokens_charged, usage_fee_tokens, cost_micro_usd,
                               unknown_cost_requests)
      SELECT user_id, v_month, user_type, provider, model, sum(requests), sum(tokens_used),
             sum(tokens_charged), sum(usage_fee_tokens), sum(cost_micro_usd),
             sum(unknown_cost_requests)
        FROM usage_daily /* global: a whole month of every user */
       WHERE day >= v_month AND day < (v_month + interval '1 month')::date
       GROUP BY user_id, user_type, provider, model;
    v_month := (v_month + interval '1 month')::date;
    v_months := v_months + 1;
  END LOOP;
  IF v_months > 0 THEN
    UPDATE analytics_rollups SET rolled_until = v_month, updated_at = now()
     WHERE name = 'usage_monthly';
  END IF;
  RETURN v_days + v_months;
END $$;
"""


def upgrade() -> None:
    op.execute(SCHEMA_UP)
    op.execute("\n".join(f"DROP FUNCTION {signature};" for signature in OLD_SIGNATURES))
    op.execute(FUNCTIONS)


def downgrade() -> None:
    op.execute("\n".join(f"DROP FUNCTION {signature};" for signature in NEW_SIGNATURES))
    op.execute(restored({"0009": RESTORED}))
    op.execute(SCHEMA_DOWN)
