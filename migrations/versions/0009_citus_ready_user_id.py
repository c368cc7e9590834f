"""ready for Citus, sharded by user_id: every per-user row carries its user, every per-user
function takes it and touches no other user's rows

- journal_entries, hold_answers and idempotency_keys carry user_id (backfilled): an entry has the
  user of its transaction (also an entry to a platform account, so platform balances stay derived
  from entries spread over every user's shard), an answer the user of its hold, a key the user
  of the call that claimed it (NULL only for payment keys, claimed before the user is known).
- Primary keys and the foreign keys between per-user tables lead with user_id, where that keeps
  the guarantee (ids are random UUIDs or sequence values, unique on their own; a hold has one
  user, so one usage record per hold stays one). Kept global on one node, on purpose: payment
  dedupe (purchases (source, external_id)) and idempotency keys (see docs/scaling.md).
- ledger_settle, ledger_release, ledger_extend_hold and ledger_apply_refund take p_user_id and
  filter every statement by it: another user's hold is RESERVATION_NOT_FOUND. The other
  per-user functions name their user argument p_user_id, the distribution argument that
  `create_distributed_function` routes by. A read that is global by design (payment dedupe,
  an idempotency key's first owner) says so in a /* global: ... */ comment; the layout test
  (tests/ledger_service/test_citus_layout.py) refuses any other statement without a user filter.

Revision ID: 0009
Revises: 0008
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

from ledger_service.store.sql_history import restored

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SCHEMA_UP = """
ALTER TABLE journal_transactions ALTER COLUMN user_id SET NOT NULL;
ALTER TABLE journal_entries ADD COLUMN user_id text;
-- The journal is append-only (0002): the backfill is the one update it ever takes.
ALTER TABLE journal_entries DISABLE TRIGGER journal_entries_append_only;
UPDATE journal_entries e SET user_id = t.user_id
  FROM journal_transactions t WHERE t.id = e.transaction_id;
ALTER TABLE journal_entries ENABLE TRIGGER journal_entries_append_only;
ALTER TABLE journal_entries ALTER COLUMN user_id SET NOT NULL;
ALTER TABLE journal_entries
  DROP CONSTRAINT fk_journal_entries_transaction_id_journal_transactions;
ALTER TABLE journal_transactions DROP CONSTRAINT pk_journal_transactions,
  ADD CONSTRAINT pk_journal_transactions PRIMARY KEY (user_id, id);
ALTER TABLE journal_entries DROP CONSTRAINT pk_journal_entries,
  ADD CONSTRAINT pk_journal_entries PRIMARY KEY (user_id, id),
  ADD CONSTRAINT fk_journal_entries_user_id_journal_transactions
    FOREIGN KEY (user_id, transaction_id) REFERENCES journal_transactions (user_id, id);

ALTER TABLE hold_answers ADD COLUMN user_id text;
UPDATE hold_answers a SET user_id = h.user_id FROM holds h WHERE h.id = a.hold_id;
ALTER TABLE hold_answers ALTER COLUMN user_id SET NOT NULL;
ALTER TABLE hold_answers DROP CONSTRAINT fk_hold_answers_hold_id_holds;
ALTER TABLE holds DROP CONSTRAINT pk_holds, ADD CONSTRAINT pk_holds PRIMARY KEY (user_id, id);
-- A caller that does not say whose hold it names (older gateways) is answered by id.
CREATE INDEX ix_holds_id ON holds (id);
ALTER TABLE hold_answers DROP CONSTRAINT pk_hold_answers,
  ADD CONSTRAINT pk_hold_answers PRIMARY KEY (user_id, hold_id),
  ADD CONSTRAINT fk_hold_answers_user_id_holds
    FOREIGN KEY (user_id, hold_id) REFERENCES holds (user_id, id);

ALTER TABLE usage_records DROP CONSTRAINT pk_usage_records,
  ADD CONSTRAINT pk_usage_records PRIMARY KEY (user_id, id),
  DROP CONSTRAINT uq_usage_records_hold_id,
  ADD CONSTRAINT uq_usage_records_user_id_hold_id UNIQUE (user_id, hold_id);

ALTER TABLE purchases DROP CONSTRAINT pk_purchases,
  ADD CONSTRAINT pk_purchases PRIMARY KEY (user_id, id);
-- Refunds name a purchase by id (the payment provider knows no user).
CREATE INDEX ix_purchases_id ON purchases (id);

ALTER TABLE idempotency_keys ADD COLUMN user_id text;
UPDATE idempotency_keys k SET user_id = h.user_id
  FROM holds h WHERE k.operation = 'reserve' AND h.id = (k.response->>'reservation_id')::uuid;
UPDATE idempotency_keys k SET user_id = p.user_id
  FROM purchases p
 WHERE k.operation IN ('credit_purchase', 'refund_purchase')
   AND p.id = (k.response->>'purchase_id')::uuid;
"""

SCHEMA_DOWN = """
ALTER TABLE idempotency_keys DROP COLUMN user_id;

DROP INDEX ix_purchases_id;
ALTER TABLE purchases DROP CONSTRAINT pk_purchases,
  ADD CONSTRAINT pk_purchases PRIMARY KEY (id);

ALTER TABLE usage_records DROP CONSTRAINT uq_usage_records_user_id_hold_id,
  ADD CONSTRAINT uq_usage_records_hold_id UNIQUE (hold_id),
  DROP CONSTRAINT pk_usage_records,
  ADD CONSTRAINT pk_usage_records PRIMARY KEY (id);

ALTER TABLE hold_answers DROP CONSTRAINT fk_hold_answers_user_id_holds,
  DROP CONSTRAINT pk_hold_answers,
  ADD CONSTRAINT pk_hold_answers PRIMARY KEY (hold_id);
DROP INDEX ix_holds_id;
ALTER TABLE holds DROP CONSTRAINT pk_holds, ADD CONSTRAINT pk_holds PRIMARY KEY (id);
ALTER TABLE hold_answers DROP COLUMN user_id,
  ADD CONSTRAINT fk_hold_answers_hold_id_holds FOREIGN KEY (hold_id) REFERENCES holds (id);

ALTER TABLE journal_entries DROP CONSTRAINT fk_journal_entries_user_id_journal_transactions,
  DROP CONSTRAINT pk_journal_entries,
  ADD CONSTRAINT pk_journal_entries PRIMARY KEY (id);
ALTER TABLE journal_transactions DROP CONSTRAINT pk_journal_transactions,
  ADD CONSTRAINT pk_journal_transactions PRIMARY KEY (id);
ALTER TABLE journal_entries DROP COLUMN user_id,
  ADD CONSTRAINT fk_journal_entries_transaction_id_journal_transactions
    FOREIGN KEY (transaction_id) REFERENCES journal_transactions (id);
ALTER TABLE journal_transactions ALTER COLUMN user_id DROP NOT NULL;
"""

# Signatures this revision replaces (the same argument types under a new name count: a
# parameter cannot be renamed in place).
OLD_SIGNATURES = (
    "ledger_claim_key(text, text, bytea, boolean)",
    "ledger_collect(bigint)",
    "ledger_apply_credit(text, bytea, text, text, bigint, bigint, bigint, int, text, text)",
    "ledger_reserve(text, bytea, text, bigint, int, int, boolean, bigint, text, timestamptz)",
    "ledger_extend_hold(uuid, int)",
    "ledger_settle(uuid, bytea, bigint, bigint, int, text, text, bigint, bigint, bigint, bytea)",
    "ledger_release(uuid)",
    "ledger_apply_refund(text, uuid, bigint, bigint, bigint)",
    "ledger_record_usage(text, bytea, text, text, text, text, bigint, bigint, bigint)",
)
NEW_SIGNATURES = (
    "ledger_claim_key(text, text, bytea, boolean, text)",
    "ledger_collect(text, bigint)",
    "ledger_apply_credit(text, bytea, text, text, bigint, bigint, bigint, int, text, text)",
    "ledger_reserve(text, bytea, text, bigint, int, int, boolean, bigint, text, timestamptz)",
    "ledger_extend_hold(text, uuid, int)",
    "ledger_settle(text, uuid, bytea, bigint, bigint, int, text, text, bigint, bigint, bigint,"
    " bytea)",
    "ledger_release(text, uuid)",
    "ledger_apply_refund(text, text, uuid, bigint, bigint, bigint)",
    "ledger_record_usage(text, bytea, text, text, text, text, bigint, bigint, bigint)",
)
# The definitions the downgrade restores, by the revision that last defined each. The ones this
# revision replaced in place (same signature) are restored with CREATE OR REPLACE.
RESTORED = {
    "0002": ("ledger_record_usage",),
    "0006": (
        "ledger_claim_key",
        "ledger_collect",
        "ledger_apply_credit",
        "ledger_extend_hold",
        "ledger_settle",
        "ledger_release",
        "ledger_sweep",
        "ledger_apply_refund",
        "ledger_retention",
    ),
    "0007": ("ledger_reserve", "ledger_quota_charged"),
    "0008": ("ledger_hot_apply",),
}

FUNCTIONS = r"""
-- Claims an idempotency key (0006), now recording whose call claimed it. Keys stay unique per
-- operation across users (the payment path claims one before it knows the user), so the
-- lookup of an existing key is global; a replayed Reserve reads its hold on its own user's rows.
CREATE FUNCTION ledger_claim_key(
  p_operation text, p_key text, p_hash bytea, p_transient boolean DEFAULT false,
  p_user_id text DEFAULT NULL
) RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
  v_prev record;
  v_hold record;
BEGIN
  INSERT INTO idempotency_keys (operation, key, request_hash, transient, user_id)
    VALUES (p_operation, p_key, p_hash, p_transient, p_user_id)
    ON CONFLICT DO NOTHING;
  IF FOUND THEN
    RETURN NULL;
  END IF;
  SELECT request_hash, response INTO v_prev
    FROM idempotency_keys /* global: a key is unique per operation across users */
   WHERE operation = p_operation AND key = p_key;
  IF NOT FOUND THEN
    -- The holder gave the key back (a refusal that changed nothing) after we waited: claim it.
    RETURN ledger_claim_key(p_operation, p_key, p_hash, p_transient, p_user_id);
  END IF;
  IF v_prev.request_hash <> p_hash THEN
    RETURN jsonb_build_object('error', 'IDEMPOTENCY_KEY_REUSED');
  END IF;
  IF p_operation = 'reserve' AND v_prev.response ? 'reservation_id' THEN
    SELECT h.status, h.settle_response, encode(a.answer, 'base64') AS answer INTO v_hold
      FROM holds h LEFT JOIN hold_answers a ON a.user_id = h.user_id AND a.hold_id = h.id
     WHERE h.user_id = p_user_id AND h.id = (v_prev.response->>'reservation_id')::uuid;
    RETURN v_prev.response || jsonb_build_object('replayed', true, 'status', v_hold.status)
      || CASE WHEN v_hold.settle_response IS NULL THEN '{}'::jsonb
              ELSE jsonb_build_object('settlement', v_hold.settle_response) END
      || CASE WHEN v_hold.answer IS NULL THEN '{}'::jsonb
              ELSE jsonb_build_object('answer', v_hold.answer) END;
  END IF;
  RETURN v_prev.response || jsonb_build_object('replayed', true);
END $$;

-- Pays what the user owes from what is available now (0006), on the user's own rows.
CREATE FUNCTION ledger_collect(p_user_id text, p_account bigint) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
  v_row record;
  v_take bigint;
  v_tx bigint;
BEGIN
  SELECT available, owed INTO v_row FROM accounts
   WHERE user_id = p_user_id AND id = p_account FOR NO KEY UPDATE;
  v_take := least(v_row.owed, v_row.available);
  IF v_take IS NULL OR v_take <= 0 THEN
    RETURN 0;
  END IF;
  UPDATE accounts SET available = available - v_take, owed = owed - v_take
   WHERE user_id = p_user_id AND id = p_account;
  INSERT INTO journal_transactions (kind, user_id) VALUES ('collect', p_user_id)
    RETURNING id INTO v_tx;
  INSERT INTO journal_entries (user_id, transaction_id, account_id, amount)
    VALUES (p_user_id, v_tx, p_account, -v_take), (p_user_id, v_tx, 5, v_take);
  RETURN v_take;
END $$;

-- Credits a purchase the domain sized (0006). A payment is credited once whoever it names: the
-- dedupe by (source, external_id) is global, and so is the replay of its answer.
CREATE FUNCTION ledger_apply_credit(
  p_key text, p_hash bytea, p_user_id text, p_type text, p_tokens bigint, p_credit bigint,
  p_fee bigint, p_share_percent int, p_source text, p_external_id text
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
                         request_hash, user_share_percent)
    SELECT v_id, p_user_id, a.id, p_type, p_tokens, p_credit, p_fee, p_source, p_external_id,
           p_hash, p_share_percent
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

-- Two-phase step one, with the month's quota (0007); the key records its user.
CREATE FUNCTION ledger_reserve(
  p_key text, p_hash bytea, p_user_id text, p_amount bigint, p_ttl_seconds int,
  p_fee_percent int, p_transient boolean, p_quota bigint, p_tz text, p_at timestamptz
) RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
  v_prior jsonb;
  v_bal record;
  v_id uuid;
  v_month date;
  v_used bigint;
  v_expires timestamptz := now() + make_interval(secs => p_ttl_seconds);
BEGIN
  v_prior := ledger_claim_key('reserve', p_key, p_hash, p_transient, p_user_id);
  IF v_prior IS NOT NULL THEN
    RETURN v_prior;
  END IF;
  IF p_quota > 0 THEN
    v_month := ledger_quota_month(coalesce(p_at, now()), p_tz);
    INSERT INTO monthly_usage (user_id, month) VALUES (p_user_id, v_month)
      ON CONFLICT DO NOTHING;
    UPDATE monthly_usage SET held = held + p_amount
     WHERE user_id = p_user_id AND month = v_month AND charged + held + p_amount <= p_quota;
    IF NOT FOUND THEN
      DELETE FROM idempotency_keys
       WHERE user_id = p_user_id AND operation = 'reserve' AND key = p_key;
      SELECT charged + held INTO v_used FROM monthly_usage
       WHERE user_id = p_user_id AND month = v_month;
      RETURN jsonb_build_object('error', 'MONTHLY_QUOTA_EXCEEDED', 'required', p_amount,
        'quota', p_quota, 'used', v_used,
        'resets_at_us',
        (extract(epoch FROM ledger_quota_resets_at(v_month, p_tz)) * 1000000)::bigint);
    END IF;
  END IF;
  UPDATE accounts SET available = available - p_amount, reserved = reserved + p_amount
   WHERE user_id = p_user_id AND available >= p_amount
   RETURNING id, available, reserved, owed INTO v_bal;
  IF NOT FOUND THEN
    IF v_month IS NOT NULL THEN
      UPDATE monthly_usage SET held = held - p_amount
       WHERE user_id = p_user_id AND month = v_month;
    END IF;
    DELETE FROM idempotency_keys
     WHERE user_id = p_user_id AND operation = 'reserve' AND key = p_key;
    SELECT available, reserved, owed INTO v_bal FROM accounts WHERE user_id = p_user_id;
    RETURN jsonb_build_object('error', 'INSUFFICIENT_BALANCE', 'required', p_amount,
      'balance', ledger_balance_json(coalesce(v_bal.available, 0), coalesce(v_bal.reserved, 0),
                                     coalesce(v_bal.owed, 0)));
  END IF;
  INSERT INTO holds (id, account_id, user_id, amount, status, usage_fee_percent, expires_at,
                     quota_month)
    VALUES (gen_random_uuid(), v_bal.id, p_user_id, p_amount, 'held', p_fee_percent, v_expires,
            v_month)
    RETURNING id INTO v_id;
  RETURN ledger_store_answer('reserve', p_key, jsonb_build_object(
    'reservation_id', v_id, 'reserved_tokens', p_amount,
    'expires_at_us', (extract(epoch FROM v_expires) * 1000000)::bigint,
    'balance', ledger_balance_json(v_bal.available, v_bal.reserved, v_bal.owed)));
END $$;

-- Keeps a hold of this user alive while its call runs (0006).
CREATE FUNCTION ledger_extend_hold(p_user_id text, p_hold uuid, p_ttl_seconds int)
RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
  v_expires timestamptz;
  v_status text;
BEGIN
  UPDATE holds SET expires_at = greatest(expires_at, now() + make_interval(secs => p_ttl_seconds))
   WHERE user_id = p_user_id AND id = p_hold AND status = 'held'
   RETURNING expires_at INTO v_expires;
  IF NOT FOUND THEN
    SELECT status INTO v_status FROM holds WHERE user_id = p_user_id AND id = p_hold;
    IF NOT FOUND THEN
      RETURN jsonb_build_object('error', 'RESERVATION_NOT_FOUND');
    END IF;
    RETURN jsonb_build_object('error', 'RESERVATION_NOT_HELD', 'status', v_status);
  END IF;
  RETURN jsonb_build_object('expires_at_us', (extract(epoch FROM v_expires) * 1000000)::bigint);
END $$;

-- Two-phase step two (0006), on the named user's hold only: another user's hold is not found.
CREATE FUNCTION ledger_settle(
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
                             output_tokens, tokens_charged, estimated_cost_micro_usd, hold_id)
    VALUES (gen_random_uuid(), p_user_id, 'subscription', p_provider, p_model, p_input,
            p_output, v_charged, p_cost, p_hold);
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

-- Voids a hold of this user (0006): another user's hold is not found.
CREATE FUNCTION ledger_release(p_user_id text, p_hold uuid) RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
  v_hold record;
  v_bal record;
  v_collected bigint := 0;
  v_answer jsonb;
BEGIN
  UPDATE holds SET status = 'released', resolved_at = now()
   WHERE user_id = p_user_id AND id = p_hold AND status = 'held'
   RETURNING account_id, amount INTO v_hold;
  IF NOT FOUND THEN
    SELECT status, account_id, release_response INTO v_hold FROM holds
     WHERE user_id = p_user_id AND id = p_hold;
    IF NOT FOUND THEN
      RETURN jsonb_build_object('error', 'RESERVATION_NOT_FOUND');
    ELSIF v_hold.status = 'released' THEN
      RETURN v_hold.release_response || '{"replayed": true}';
    ELSIF v_hold.status = 'expired' THEN
      SELECT available, reserved, owed INTO v_bal FROM accounts
       WHERE user_id = p_user_id AND id = v_hold.account_id;
      RETURN jsonb_build_object('released_tokens', 0, 'status', 'expired', 'owed_collected', 0,
        'balance', ledger_balance_json(v_bal.available, v_bal.reserved, v_bal.owed));
    END IF;
    RETURN jsonb_build_object('error', 'RESERVATION_NOT_HELD', 'status', v_hold.status);
  END IF;
  UPDATE accounts SET available = available + v_hold.amount, reserved = reserved - v_hold.amount
   WHERE user_id = p_user_id AND id = v_hold.account_id
   RETURNING available, reserved, owed INTO v_bal;
  IF v_bal.owed > 0 THEN
    v_collected := ledger_collect(p_user_id, v_hold.account_id);
    SELECT available, reserved, owed INTO v_bal FROM accounts
     WHERE user_id = p_user_id AND id = v_hold.account_id;
  END IF;
  v_answer := jsonb_build_object('released_tokens', v_hold.amount, 'owed_collected', v_collected,
    'balance', ledger_balance_json(v_bal.available, v_bal.reserved, v_bal.owed));
  UPDATE holds SET release_response = v_answer WHERE user_id = p_user_id AND id = p_hold;
  RETURN v_answer;
END $$;

-- Expires due holds of any user (0006): a cross-user job (per shard on Citus).
CREATE OR REPLACE FUNCTION ledger_sweep(p_limit int) RETURNS int LANGUAGE plpgsql AS $$
DECLARE
  v_accounts bigint[];
  v_totals bigint[];
  v_count int;
BEGIN
  WITH due AS (
    SELECT id FROM holds WHERE status = 'held' AND expires_at < now()
     ORDER BY expires_at LIMIT p_limit FOR UPDATE SKIP LOCKED
  ), expired AS (
    UPDATE holds h SET status = 'expired', resolved_at = now()
      FROM due WHERE h.id = due.id
    RETURNING h.account_id, h.amount
  ), per_account AS (
    SELECT account_id, sum(amount)::bigint AS total, count(*) AS n
      FROM expired GROUP BY account_id
  )
  SELECT array_agg(account_id ORDER BY account_id), array_agg(total ORDER BY account_id),
         coalesce(sum(n), 0)
    INTO v_accounts, v_totals, v_count
    FROM per_account;
  IF v_count = 0 THEN
    RETURN 0;
  END IF;
  PERFORM 1 FROM accounts WHERE id = ANY (v_accounts) ORDER BY id FOR NO KEY UPDATE;
  UPDATE accounts a SET available = a.available + s.total, reserved = a.reserved - s.total
    FROM unnest(v_accounts, v_totals) AS s(account_id, total)
   WHERE a.id = s.account_id;
  PERFORM ledger_collect(user_id, id) FROM accounts
    WHERE id = ANY (v_accounts) AND owed > 0 ORDER BY id;
  RETURN v_count;
END $$;

-- Applies a refund the domain sized (0006) to the purchase of the user the caller found it
-- under (the caller locked the purchase row).
CREATE FUNCTION ledger_apply_refund(
  p_user_id text, p_key text, p_purchase uuid, p_tokens bigint, p_user_part bigint,
  p_fee_part bigint
) RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
  v_purchase record;
  v_available bigint;
  v_debit bigint;
  v_shortfall bigint;
  v_bal record;
  v_tx bigint;
BEGIN
  UPDATE purchases SET tokens_refunded = tokens_refunded + p_tokens
   WHERE user_id = p_user_id AND id = p_purchase
   RETURNING account_id INTO v_purchase;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'purchase % of user % not found', p_purchase, p_user_id;
  END IF;
  SELECT available INTO v_available FROM accounts
   WHERE user_id = p_user_id AND id = v_purchase.account_id FOR NO KEY UPDATE;
  v_debit := least(p_user_part, v_available);
  v_shortfall := p_user_part - v_debit;
  UPDATE accounts SET available = available - v_debit, owed = owed + v_shortfall
   WHERE user_id = p_user_id AND id = v_purchase.account_id
   RETURNING available, reserved, owed INTO v_bal;
  IF p_tokens > 0 THEN
    INSERT INTO journal_transactions (kind, user_id, purchase_id)
      VALUES ('refund', p_user_id, p_purchase) RETURNING id INTO v_tx;
    INSERT INTO journal_entries (user_id, transaction_id, account_id, amount)
      SELECT p_user_id, v_tx, e.account, e.amount
        FROM (VALUES (v_purchase.account_id, -v_debit), (2::bigint, -p_fee_part),
                     (5::bigint, -v_shortfall), (1::bigint, p_tokens)) AS e(account, amount)
       WHERE e.amount <> 0;
  END IF;
  RETURN ledger_store_answer('refund_purchase', p_key, jsonb_build_object(
    'tokens_refunded', p_tokens, 'tokens_debited', v_debit, 'shortfall_tokens', v_shortfall,
    'platform_fee_reversed', p_fee_part,
    'balance', ledger_balance_json(v_bal.available, v_bal.reserved, v_bal.owed)));
END $$;

-- Analytics only (0002): one row per keyed call, no balance touched. Its key is unique across
-- users, so the replay lookup is global.
CREATE FUNCTION ledger_record_usage(
  p_key text, p_hash bytea, p_user_id text, p_type text, p_provider text, p_model text,
  p_input bigint, p_output bigint, p_cost bigint
) RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
  v_id uuid;
  v_prev record;
BEGIN
  INSERT INTO usage_records (id, user_id, user_type, provider, model, input_tokens,
                             output_tokens, estimated_cost_micro_usd, idempotency_key,
                             request_hash)
    VALUES (gen_random_uuid(), p_user_id, p_type, p_provider, p_model, p_input, p_output,
            p_cost, p_key, p_hash)
    ON CONFLICT (idempotency_key) DO NOTHING
    RETURNING id INTO v_id;
  IF FOUND THEN
    RETURN jsonb_build_object('usage_id', v_id);
  END IF;
  SELECT id, request_hash INTO v_prev
    FROM usage_records /* global: a usage key is unique across users */
   WHERE idempotency_key = p_key;
  IF v_prev.request_hash <> p_hash THEN
    RETURN jsonb_build_object('error', 'IDEMPOTENCY_KEY_REUSED');
  END IF;
  RETURN jsonb_build_object('usage_id', v_prev.id, 'replayed', true);
END $$;

-- What a settle charges counts in the month of its hold (0007), found on the record's user.
CREATE OR REPLACE FUNCTION ledger_quota_charged() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  UPDATE monthly_usage m SET charged = m.charged + NEW.tokens_charged
    FROM holds h
   WHERE h.user_id = NEW.user_id AND h.id = NEW.hold_id AND h.quota_month IS NOT NULL
     AND m.user_id = NEW.user_id AND m.month = h.quota_month;
  RETURN NULL;
END $$;

-- Deletes what has outlived its retention (0006); answers by row address, as keys are, since
-- their key now leads with user_id. A cross-user job (per shard on Citus).
CREATE OR REPLACE FUNCTION ledger_retention(
  p_transient_key_seconds int, p_key_seconds int, p_answer_seconds int,
  p_resolved_seconds int, p_limit int
) RETURNS int LANGUAGE plpgsql AS $$
DECLARE
  v_deleted int := 0;
  v_n int;
BEGIN
  IF p_transient_key_seconds > 0 THEN
    DELETE FROM idempotency_keys WHERE ctid = ANY (ARRAY(
      SELECT ctid FROM idempotency_keys
       WHERE transient AND created_at < now() - make_interval(secs => p_transient_key_seconds)
       LIMIT p_limit));
    GET DIAGNOSTICS v_n = ROW_COUNT;
    v_deleted := v_deleted + v_n;
  END IF;
  IF p_key_seconds > 0 THEN
    DELETE FROM idempotency_keys WHERE ctid = ANY (ARRAY(
      SELECT ctid FROM idempotency_keys
       WHERE NOT transient AND created_at < now() - make_interval(secs => p_key_seconds)
       LIMIT p_limit));
    GET DIAGNOSTICS v_n = ROW_COUNT;
    v_deleted := v_deleted + v_n;
  END IF;
  IF p_answer_seconds > 0 THEN
    DELETE FROM hold_answers WHERE ctid = ANY (ARRAY(
      SELECT ctid FROM hold_answers
       WHERE created_at < now() - make_interval(secs => p_answer_seconds) LIMIT p_limit));
    GET DIAGNOSTICS v_n = ROW_COUNT;
    v_deleted := v_deleted + v_n;
  END IF;
  IF p_resolved_seconds > 0 THEN
    DELETE FROM dead_letters WHERE id = ANY (ARRAY(
      SELECT id FROM dead_letters
       WHERE resolved_at < now() - make_interval(secs => p_resolved_seconds) LIMIT p_limit));
    GET DIAGNOSTICS v_n = ROW_COUNT;
    v_deleted := v_deleted + v_n;
    DELETE FROM parked_operations WHERE id = ANY (ARRAY(
      SELECT id FROM parked_operations
       WHERE applied_at < now() - make_interval(secs => p_resolved_seconds) LIMIT p_limit));
    GET DIAGNOSTICS v_n = ROW_COUNT;
    v_deleted := v_deleted + v_n;
  END IF;
  RETURN v_deleted;
END $$;

-- One hot-path call (0008), by the per-item function a lone call of its kind uses. A call on a
-- hold that does not say whose it is (an older gateway) gets the hold's own user, read by the
-- holds (id) index in the batch's transaction (on Citus a lookup on every shard: callers should
-- say); no such hold leaves the user NULL, which no row matches: RESERVATION_NOT_FOUND.
CREATE OR REPLACE FUNCTION ledger_hot_apply(p ledger_hot_item) RETURNS jsonb
LANGUAGE plpgsql AS $$
BEGIN
  IF p.user_id IS NULL AND p.hold_id IS NOT NULL THEN
    p.user_id := (SELECT h.user_id FROM holds h WHERE h.id = p.hold_id);
  END IF;
  IF p.op = 'reserve' THEN
    RETURN ledger_reserve(p.key, p.hash, p.user_id, p.amount, p.ttl_seconds, p.fee_percent,
                          p.transient, p.quota, p.tz, p.at);
  ELSIF p.op = 'settle' THEN
    RETURN ledger_settle(p.user_id, p.hold_id, p.hash, p.amount, p.fee, p.fee_percent,
                         p.provider, p.model, p.input_tokens, p.output_tokens, p.cost, p.answer);
  ELSIF p.op = 'release' THEN
    RETURN ledger_release(p.user_id, p.hold_id);
  ELSIF p.op = 'extend' THEN
    RETURN ledger_extend_hold(p.user_id, p.hold_id, p.ttl_seconds);
  ELSIF p.op = 'usage' THEN
    RETURN ledger_record_usage(p.key, p.hash, p.user_id, p.user_type, p.provider, p.model,
                               p.input_tokens, p.output_tokens, p.cost);
  END IF;
  RAISE EXCEPTION 'unknown hot-path operation %', p.op;
END $$;
"""


def upgrade() -> None:
    op.execute(SCHEMA_UP)
    op.execute("\n".join(f"DROP FUNCTION {signature};" for signature in OLD_SIGNATURES))
    op.execute(FUNCTIONS)


def downgrade() -> None:
    op.execute("\n".join(f"DROP FUNCTION {signature};" for signature in NEW_SIGNATURES))
    op.execute(restored(RESTORED))
    op.execute(SCHEMA_DOWN)
