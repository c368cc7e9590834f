"""platform accounts, append-only journal, and the ledger's operations as SQL functions

Each mutating ledger operation is one PL/pgSQL function: one round trip, one transaction, the
idempotency claim and the balance change together. The domain layer computes every amount
(fees, splits) and passes it in; these functions only apply amounts atomically, never letting a
balance go below zero. They return jsonb: the answer, or {"error": REASON, ...}.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

PLATFORM_ACCOUNTS = {
    "payments_clearing": 1,
    "purchase_fee": 2,
    "usage": 3,
    "usage_fee": 4,
    "refund_receivable": 5,
    "unbilled_usage": 6,
}

FUNCTIONS = r"""
-- Journal entries are history: never changed, never removed.
CREATE FUNCTION ledger_refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  RAISE EXCEPTION 'journal entries are append-only' USING ERRCODE = 'restrict_violation';
END $$;
CREATE TRIGGER journal_entries_append_only BEFORE UPDATE OR DELETE ON journal_entries
  FOR EACH ROW EXECUTE FUNCTION ledger_refuse_change();
CREATE TRIGGER journal_transactions_append_only BEFORE UPDATE OR DELETE ON journal_transactions
  FOR EACH ROW EXECUTE FUNCTION ledger_refuse_change();

CREATE FUNCTION ledger_balance_json(p_available bigint, p_reserved bigint) RETURNS jsonb
LANGUAGE sql IMMUTABLE AS $$
  SELECT jsonb_build_object('available', p_available, 'reserved', p_reserved)
$$;

-- Claims an idempotency key. NULL: the key is new and now ours (its row is locked until commit,
-- so a concurrent copy waits here and then sees our answer). Otherwise the stored answer, or
-- IDEMPOTENCY_KEY_REUSED when the key came with a different request.
CREATE FUNCTION ledger_claim_key(p_operation text, p_key text, p_hash bytea) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
  v_prev record;
BEGIN
  INSERT INTO idempotency_keys (operation, key, request_hash) VALUES (p_operation, p_key, p_hash)
    ON CONFLICT DO NOTHING;
  IF FOUND THEN
    RETURN NULL;
  END IF;
  SELECT request_hash, response INTO v_prev
    FROM idempotency_keys WHERE operation = p_operation AND key = p_key;
  IF v_prev.request_hash <> p_hash THEN
    RETURN jsonb_build_object('error', 'IDEMPOTENCY_KEY_REUSED');
  END IF;
  RETURN v_prev.response || jsonb_build_object('replayed', true);
END $$;

CREATE FUNCTION ledger_store_answer(p_operation text, p_key text, p_answer jsonb) RETURNS jsonb
LANGUAGE sql AS $$
  UPDATE idempotency_keys SET response = p_answer WHERE operation = p_operation AND key = p_key;
  SELECT p_answer;
$$;

CREATE FUNCTION ledger_credit_purchase(
  p_key text, p_hash bytea, p_user text, p_type text, p_tokens bigint, p_credit bigint,
  p_fee bigint, p_share_percent int, p_source text, p_external_id text
) RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
  v_prior jsonb;
  v_account bigint;
  v_purchase record;
  v_id uuid := gen_random_uuid();
  v_tx bigint;
  v_bal record;
  v_answer jsonb;
BEGIN
  v_prior := ledger_claim_key('credit_purchase', p_key, p_hash);
  IF v_prior IS NOT NULL THEN
    RETURN v_prior;
  END IF;
  INSERT INTO accounts (user_id) VALUES (p_user) ON CONFLICT (user_id) DO NOTHING;
  INSERT INTO purchases (id, user_id, account_id, purchase_type, tokens_purchased,
                         tokens_credited, platform_fee_tokens, source, external_id,
                         request_hash, user_share_percent)
    SELECT v_id, p_user, a.id, p_type, p_tokens, p_credit, p_fee, p_source, p_external_id,
           p_hash, p_share_percent
      FROM accounts a WHERE a.user_id = p_user
    ON CONFLICT (source, external_id) DO NOTHING;
  IF NOT FOUND THEN
    -- The payment was credited before under another key: the same payment answers the same,
    -- a different request for it is refused.
    SELECT * INTO v_purchase FROM purchases WHERE source = p_source AND external_id = p_external_id;
    IF v_purchase.request_hash <> p_hash THEN
      RETURN ledger_store_answer('credit_purchase', p_key,
        jsonb_build_object('error', 'IDEMPOTENCY_KEY_REUSED',
                           'detail', 'this payment was already credited with another request'));
    END IF;
    SELECT available, reserved INTO v_bal FROM accounts WHERE id = v_purchase.account_id;
    RETURN ledger_store_answer('credit_purchase', p_key, jsonb_build_object(
      'purchase_id', v_purchase.id, 'tokens_credited', v_purchase.tokens_credited,
      'platform_fee_tokens', v_purchase.platform_fee_tokens,
      'balance', ledger_balance_json(v_bal.available, v_bal.reserved))) || '{"replayed": true}';
  END IF;
  UPDATE accounts SET available = available + p_credit WHERE user_id = p_user
    RETURNING id, available, reserved INTO v_bal;
  INSERT INTO journal_transactions (kind, user_id, purchase_id, user_share_percent)
    VALUES ('purchase', p_user, v_id, p_share_percent) RETURNING id INTO v_tx;
  INSERT INTO journal_entries (transaction_id, account_id, amount)
    SELECT v_tx, e.account, e.amount
      FROM (VALUES (1::bigint, -p_tokens), (v_bal.id, p_credit), (2::bigint, p_fee))
           AS e(account, amount)
     WHERE e.amount <> 0;
  v_answer := jsonb_build_object(
    'purchase_id', v_id, 'tokens_credited', p_credit, 'platform_fee_tokens', p_fee,
    'balance', ledger_balance_json(v_bal.available, v_bal.reserved));
  RETURN ledger_store_answer('credit_purchase', p_key, v_answer);
END $$;

-- Two-phase step one: one conditional UPDATE holds the tokens or refuses; never overspends.
CREATE FUNCTION ledger_reserve(
  p_key text, p_hash bytea, p_user text, p_amount bigint, p_ttl_seconds int, p_fee_percent int
) RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
  v_prior jsonb;
  v_bal record;
  v_id uuid;
  v_expires timestamptz := now() + make_interval(secs => p_ttl_seconds);
  v_answer jsonb;
BEGIN
  v_prior := ledger_claim_key('reserve', p_key, p_hash);
  IF v_prior IS NOT NULL THEN
    RETURN v_prior;
  END IF;
  UPDATE accounts SET available = available - p_amount, reserved = reserved + p_amount
   WHERE user_id = p_user AND available >= p_amount
   RETURNING id, available, reserved INTO v_bal;
  IF NOT FOUND THEN
    SELECT available, reserved INTO v_bal FROM accounts WHERE user_id = p_user;
    v_answer := jsonb_build_object('error', 'INSUFFICIENT_BALANCE', 'required', p_amount,
      'balance', ledger_balance_json(coalesce(v_bal.available, 0), coalesce(v_bal.reserved, 0)));
  ELSE
    INSERT INTO holds (id, account_id, user_id, amount, status, usage_fee_percent, expires_at)
      VALUES (gen_random_uuid(), v_bal.id, p_user, p_amount, 'held', p_fee_percent, v_expires)
      RETURNING id INTO v_id;
    v_answer := jsonb_build_object(
      'reservation_id', v_id, 'reserved_tokens', p_amount,
      'expires_at_us', (extract(epoch FROM v_expires) * 1000000)::bigint,
      'balance', ledger_balance_json(v_bal.available, v_bal.reserved));
  END IF;
  RETURN ledger_store_answer('reserve', p_key, v_answer);
END $$;

-- Two-phase step two: post used + fee from the hold, release the rest. The hold's status flips
-- exactly once (settle, release and the sweeper all race on `status = 'held'`). Usage beyond the
-- hold, or a settle after the sweeper expired the hold, takes what the available balance allows;
-- the rest is unbilled and booked to the unbilled_usage account.
CREATE FUNCTION ledger_settle(
  p_hold uuid, p_hash bytea, p_used bigint, p_fee bigint, p_fee_percent int, p_provider text,
  p_model text, p_input bigint, p_output bigint, p_cost bigint
) RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
  v_hold record;
  v_charge bigint := p_used + p_fee;
  v_from_hold bigint;
  v_extra bigint := 0;
  v_released bigint;
  v_charged bigint;
  v_unbilled bigint;
  v_available bigint;
  v_bal record;
  v_tx bigint;
  v_answer jsonb;
BEGIN
  UPDATE holds SET status = 'settled', resolved_at = now(), settle_hash = p_hash
   WHERE id = p_hold AND status = 'held'
   RETURNING account_id, user_id, amount INTO v_hold;
  IF NOT FOUND THEN
    UPDATE holds SET status = 'settled_after_expiry', settle_hash = p_hash
     WHERE id = p_hold AND status = 'expired'
     RETURNING account_id, user_id, 0::bigint AS amount INTO v_hold;
    IF NOT FOUND THEN
      SELECT status, settle_hash, settle_response INTO v_hold FROM holds WHERE id = p_hold;
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

  v_from_hold := least(v_charge, v_hold.amount);
  v_released := v_hold.amount - v_from_hold;
  IF v_charge > v_from_hold THEN
    SELECT available INTO v_available FROM accounts WHERE id = v_hold.account_id FOR UPDATE;
    v_extra := least(v_charge - v_from_hold, v_available);
  END IF;
  v_charged := v_from_hold + v_extra;
  v_unbilled := v_charge - v_charged;

  UPDATE accounts
     SET reserved = reserved - v_hold.amount, available = available + v_released - v_extra
   WHERE id = v_hold.account_id
   RETURNING available, reserved INTO v_bal;

  IF v_charge > 0 THEN
    INSERT INTO journal_transactions (kind, user_id, hold_id, usage_fee_percent)
      VALUES ('usage', v_hold.user_id, p_hold, p_fee_percent) RETURNING id INTO v_tx;
    INSERT INTO journal_entries (transaction_id, account_id, amount)
      SELECT v_tx, e.account, e.amount
        FROM (VALUES (v_hold.account_id, -v_charged), (3::bigint, p_used), (4::bigint, p_fee),
                     (6::bigint, -v_unbilled)) AS e(account, amount)
       WHERE e.amount <> 0;
  END IF;
  INSERT INTO usage_records (id, user_id, user_type, provider, model, input_tokens,
                             output_tokens, tokens_charged, estimated_cost_micro_usd, hold_id)
    VALUES (gen_random_uuid(), v_hold.user_id, 'subscription', p_provider, p_model, p_input,
            p_output, v_charged, p_cost, p_hold);

  v_answer := jsonb_build_object(
    'tokens_used', p_used, 'fee_tokens', p_fee, 'tokens_charged', v_charged,
    'released_tokens', v_released, 'unbilled_tokens', v_unbilled,
    'balance', ledger_balance_json(v_bal.available, v_bal.reserved));
  UPDATE holds SET settle_response = v_answer WHERE id = p_hold;
  RETURN v_answer;
END $$;

-- Voids a hold. Releasing twice answers the same; a hold the sweeper already expired releases
-- nothing more; a settled hold cannot be released.
CREATE FUNCTION ledger_release(p_hold uuid) RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
  v_hold record;
  v_bal record;
  v_answer jsonb;
BEGIN
  UPDATE holds SET status = 'released', resolved_at = now()
   WHERE id = p_hold AND status = 'held'
   RETURNING account_id, amount INTO v_hold;
  IF NOT FOUND THEN
    SELECT status, account_id, release_response INTO v_hold FROM holds WHERE id = p_hold;
    IF NOT FOUND THEN
      RETURN jsonb_build_object('error', 'RESERVATION_NOT_FOUND');
    ELSIF v_hold.status = 'released' THEN
      RETURN v_hold.release_response || '{"replayed": true}';
    ELSIF v_hold.status = 'expired' THEN
      SELECT available, reserved INTO v_bal FROM accounts WHERE id = v_hold.account_id;
      RETURN jsonb_build_object('released_tokens', 0, 'status', 'expired',
                                'balance', ledger_balance_json(v_bal.available, v_bal.reserved));
    END IF;
    RETURN jsonb_build_object('error', 'RESERVATION_NOT_HELD', 'status', v_hold.status);
  END IF;
  UPDATE accounts SET available = available + v_hold.amount, reserved = reserved - v_hold.amount
   WHERE id = v_hold.account_id
   RETURNING available, reserved INTO v_bal;
  v_answer := jsonb_build_object('released_tokens', v_hold.amount,
                                 'balance', ledger_balance_json(v_bal.available, v_bal.reserved));
  UPDATE holds SET release_response = v_answer WHERE id = p_hold;
  RETURN v_answer;
END $$;

-- Expires due holds by the database clock. SKIP LOCKED: a hold being settled or released right
-- now is left to that call, and several sweepers never block each other. Accounts are locked in
-- id order so that two sweepers cannot deadlock.
CREATE FUNCTION ledger_sweep(p_limit int) RETURNS int LANGUAGE plpgsql AS $$
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
  PERFORM 1 FROM accounts WHERE id = ANY (v_accounts) ORDER BY id FOR UPDATE;
  UPDATE accounts a SET available = a.available + s.total, reserved = a.reserved - s.total
    FROM unnest(v_accounts, v_totals) AS s(account_id, total)
   WHERE a.id = s.account_id;
  RETURN v_count;
END $$;

-- Reverses a purchase in part or whole. The domain computes the user's and the fee's share of
-- this refund from the purchase as it read it (p_refunded_before); if another refund got there
-- first the function answers CONFLICT and the domain recomputes. The user's balance stops at
-- zero; what it cannot cover is booked to refund_receivable.
CREATE FUNCTION ledger_refund_purchase(
  p_key text, p_hash bytea, p_purchase uuid, p_refunded_before bigint, p_tokens bigint,
  p_user_part bigint, p_fee_part bigint
) RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
  v_prior jsonb;
  v_purchase record;
  v_available bigint;
  v_debit bigint;
  v_shortfall bigint;
  v_bal record;
  v_tx bigint;
BEGIN
  v_prior := ledger_claim_key('refund_purchase', p_key, p_hash);
  IF v_prior IS NOT NULL THEN
    RETURN v_prior;
  END IF;
  UPDATE purchases SET tokens_refunded = tokens_refunded + p_tokens
   WHERE id = p_purchase AND tokens_refunded = p_refunded_before
   RETURNING user_id, account_id INTO v_purchase;
  IF NOT FOUND THEN
    -- Raising rolls the key claim back too, so the retry can claim it again.
    RAISE EXCEPTION 'refund raced another refund' USING ERRCODE = 'serialization_failure';
  END IF;
  SELECT available INTO v_available FROM accounts WHERE id = v_purchase.account_id FOR UPDATE;
  v_debit := least(p_user_part, v_available);
  v_shortfall := p_user_part - v_debit;
  UPDATE accounts SET available = available - v_debit WHERE id = v_purchase.account_id
    RETURNING available, reserved INTO v_bal;
  IF p_tokens > 0 THEN
    INSERT INTO journal_transactions (kind, user_id, purchase_id)
      VALUES ('refund', v_purchase.user_id, p_purchase) RETURNING id INTO v_tx;
    INSERT INTO journal_entries (transaction_id, account_id, amount)
      SELECT v_tx, e.account, e.amount
        FROM (VALUES (v_purchase.account_id, -v_debit), (2::bigint, -p_fee_part),
                     (5::bigint, -v_shortfall), (1::bigint, p_tokens)) AS e(account, amount)
       WHERE e.amount <> 0;
  END IF;
  RETURN ledger_store_answer('refund_purchase', p_key, jsonb_build_object(
    'tokens_refunded', p_tokens, 'tokens_debited', v_debit, 'shortfall_tokens', v_shortfall,
    'platform_fee_reversed', p_fee_part,
    'balance', ledger_balance_json(v_bal.available, v_bal.reserved)));
END $$;

-- Analytics only: one row per keyed call, no balance touched.
CREATE FUNCTION ledger_record_usage(
  p_key text, p_hash bytea, p_user text, p_type text, p_provider text, p_model text,
  p_input bigint, p_output bigint, p_cost bigint
) RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
  v_id uuid;
  v_prev record;
BEGIN
  INSERT INTO usage_records (id, user_id, user_type, provider, model, input_tokens,
                             output_tokens, estimated_cost_micro_usd, idempotency_key,
                             request_hash)
    VALUES (gen_random_uuid(), p_user, p_type, p_provider, p_model, p_input, p_output, p_cost,
            p_key, p_hash)
    ON CONFLICT (idempotency_key) DO NOTHING
    RETURNING id INTO v_id;
  IF FOUND THEN
    RETURN jsonb_build_object('usage_id', v_id);
  END IF;
  SELECT id, request_hash INTO v_prev FROM usage_records WHERE idempotency_key = p_key;
  IF v_prev.request_hash <> p_hash THEN
    RETURN jsonb_build_object('error', 'IDEMPOTENCY_KEY_REUSED');
  END IF;
  RETURN jsonb_build_object('usage_id', v_prev.id, 'replayed', true);
END $$;
"""

DROP = """
DROP FUNCTION IF EXISTS ledger_record_usage(text, bytea, text, text, text, text, bigint, bigint,
  bigint);
DROP FUNCTION IF EXISTS ledger_refund_purchase(text, bytea, uuid, bigint, bigint, bigint, bigint);
DROP FUNCTION IF EXISTS ledger_sweep(int);
DROP FUNCTION IF EXISTS ledger_release(uuid);
DROP FUNCTION IF EXISTS ledger_settle(uuid, bytea, bigint, bigint, int, text, text, bigint, bigint,
  bigint);
DROP FUNCTION IF EXISTS ledger_reserve(text, bytea, text, bigint, int, int);
DROP FUNCTION IF EXISTS ledger_credit_purchase(text, bytea, text, text, bigint, bigint, bigint, int,
  text, text);
DROP FUNCTION IF EXISTS ledger_store_answer(text, text, jsonb);
DROP FUNCTION IF EXISTS ledger_claim_key(text, text, bytea);
DROP FUNCTION IF EXISTS ledger_balance_json(bigint, bigint);
DROP TRIGGER IF EXISTS journal_transactions_append_only ON journal_transactions;
DROP TRIGGER IF EXISTS journal_entries_append_only ON journal_entries;
DROP FUNCTION IF EXISTS ledger_refuse_change();
"""


def upgrade() -> None:
    values = ", ".join(f"({i}, '{code}')" for code, i in PLATFORM_ACCOUNTS.items())
    op.execute(f"INSERT INTO accounts (id, code) VALUES {values}")
    op.execute(FUNCTIONS)


def downgrade() -> None:
    op.execute(DROP)
    op.execute("DELETE FROM accounts WHERE code IS NOT NULL")
