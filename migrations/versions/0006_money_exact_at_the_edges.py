"""money exact at the edges: owed tokens, hold extension and overruns, parked payment events,
replays that answer like the original, retention

- accounts.owed: tokens of a refunded payment the balance could not give back (spent, or on hold
  when the refund came). Collected, in its own journal transaction, from the next tokens that
  become available (a released hold, the unused part of a settled one, a new purchase), so a
  refunded payment can never be spent. Invariant: owed > 0 implies available = 0.
- holds.overrun: charge beyond the hold (a provider anomaly once holds are sized from an upper
  bound); ExtendHold keeps a hold alive while its call runs.
- hold_answers: the answer a keyed call settled with, so a retry on any gateway replica gets it.
- A refusal that changed nothing (Reserve for lack of balance) burns no idempotency key.
- parked_operations: a payment event that arrived before its subject (an invoice before its
  subscription, a refund before its purchase) waits in the ledger and is applied in the
  transaction that creates the subject. Both sides take the subject's advisory lock, so parking
  and waking cannot miss each other.
- subscriptions.tokens_per_period (from the gateway's catalog) credits a parked invoice; at an
  equal provider_updated_at a terminal status (expired) wins.
- Retention: transient idempotency keys (keyless calls), keyed ones, stored answers, resolved dead
  letters and applied parked operations are deleted by the sweeper after their configured age.

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

from ledger_service.store.sql_history import definitions

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Largest answer the table accepts; the ledger's configured bound is at most this.
MAX_ANSWER_BYTES = 16 * 1024 * 1024

# Account rows are locked FOR NO KEY UPDATE, never FOR UPDATE: inserting a row that references
# an account (a purchase, a hold, an entry) takes FOR KEY SHARE on it, which FOR UPDATE waits for
# while the inserting transaction may be waiting for ours (a deadlock the webhook interleaving
# tests found). Our updates never change an account's key, so NO KEY UPDATE is the right lock.
FUNCTIONS = r"""
CREATE FUNCTION ledger_balance_json(p_available bigint, p_reserved bigint, p_owed bigint DEFAULT 0)
RETURNS jsonb LANGUAGE sql IMMUTABLE AS $$
  SELECT jsonb_build_object('available', p_available, 'reserved', p_reserved, 'owed', p_owed)
$$;

-- Claims an idempotency key. NULL: the key is new and now ours (its row is locked until commit,
-- so a concurrent copy waits here and then sees our answer, or claims the key itself if we gave
-- it back). Otherwise the stored answer, or IDEMPOTENCY_KEY_REUSED for a different request. A
-- replayed Reserve also reports what became of its hold and the answer its Settle stored.
CREATE FUNCTION ledger_claim_key(
  p_operation text, p_key text, p_hash bytea, p_transient boolean DEFAULT false
) RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
  v_prev record;
  v_hold record;
BEGIN
  INSERT INTO idempotency_keys (operation, key, request_hash, transient)
    VALUES (p_operation, p_key, p_hash, p_transient)
    ON CONFLICT DO NOTHING;
  IF FOUND THEN
    RETURN NULL;
  END IF;
  SELECT request_hash, response INTO v_prev
    FROM idempotency_keys WHERE operation = p_operation AND key = p_key;
  IF NOT FOUND THEN
    -- The holder gave the key back (a refusal that changed nothing) after we waited: claim it.
    RETURN ledger_claim_key(p_operation, p_key, p_hash, p_transient);
  END IF;
  IF v_prev.request_hash <> p_hash THEN
    RETURN jsonb_build_object('error', 'IDEMPOTENCY_KEY_REUSED');
  END IF;
  IF p_operation = 'reserve' AND v_prev.response ? 'reservation_id' THEN
    SELECT h.status, h.settle_response, encode(a.answer, 'base64') AS answer INTO v_hold
      FROM holds h LEFT JOIN hold_answers a ON a.hold_id = h.id
     WHERE h.id = (v_prev.response->>'reservation_id')::uuid;
    RETURN v_prev.response || jsonb_build_object('replayed', true, 'status', v_hold.status)
      || CASE WHEN v_hold.settle_response IS NULL THEN '{}'::jsonb
              ELSE jsonb_build_object('settlement', v_hold.settle_response) END
      || CASE WHEN v_hold.answer IS NULL THEN '{}'::jsonb
              ELSE jsonb_build_object('answer', v_hold.answer) END;
  END IF;
  RETURN v_prev.response || jsonb_build_object('replayed', true);
END $$;

-- Serialises everything that creates a subject (a purchase, a subscription) with everything that
-- waits for it, for the rest of the transaction.
CREATE FUNCTION ledger_lock_subject(p_subject text) RETURNS void LANGUAGE sql AS $$
  SELECT pg_advisory_xact_lock(hashtextextended(p_subject, 7270002))
$$;

-- Pays what the user owes from what is available now: one 'collect' transaction moves it from
-- the user's account to the receivable. Called whenever tokens become available.
CREATE FUNCTION ledger_collect(p_account bigint) RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
  v_row record;
  v_take bigint;
  v_tx bigint;
BEGIN
  SELECT user_id, available, owed INTO v_row FROM accounts WHERE id = p_account
    FOR NO KEY UPDATE;
  v_take := least(v_row.owed, v_row.available);
  IF v_take <= 0 THEN
    RETURN 0;
  END IF;
  UPDATE accounts SET available = available - v_take, owed = owed - v_take WHERE id = p_account;
  INSERT INTO journal_transactions (kind, user_id) VALUES ('collect', v_row.user_id)
    RETURNING id INTO v_tx;
  INSERT INTO journal_entries (transaction_id, account_id, amount)
    VALUES (v_tx, p_account, -v_take), (v_tx, 5, v_take);
  RETURN v_take;
END $$;

-- Credits a purchase the domain sized (the caller claimed the key, locked the purchase's
-- subject and, for a subscription payment, found its subscription). The same payment under
-- another key answers the same; a different request for it is refused. What the user owes is
-- collected from the credit. 'created' tells the caller to apply refunds that waited for it.
CREATE FUNCTION ledger_apply_credit(
  p_key text, p_hash bytea, p_user text, p_type text, p_tokens bigint, p_credit bigint,
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
  INSERT INTO accounts (user_id) VALUES (p_user) ON CONFLICT (user_id) DO NOTHING;
  INSERT INTO purchases (id, user_id, account_id, purchase_type, tokens_purchased,
                         tokens_credited, platform_fee_tokens, source, external_id,
                         request_hash, user_share_percent)
    SELECT v_id, p_user, a.id, p_type, p_tokens, p_credit, p_fee, p_source, p_external_id,
           p_hash, p_share_percent
      FROM accounts a WHERE a.user_id = p_user
    ON CONFLICT (source, external_id) DO NOTHING;
  IF NOT FOUND THEN
    SELECT * INTO v_purchase FROM purchases WHERE source = p_source AND external_id = p_external_id;
    IF v_purchase.request_hash <> p_hash THEN
      RETURN ledger_store_answer('credit_purchase', p_key,
        jsonb_build_object('error', 'IDEMPOTENCY_KEY_REUSED',
                           'detail', 'this payment was already credited with another request'));
    END IF;
    SELECT available, reserved, owed INTO v_bal FROM accounts WHERE id = v_purchase.account_id;
    RETURN ledger_store_answer('credit_purchase', p_key, jsonb_build_object(
      'purchase_id', v_purchase.id, 'tokens_credited', v_purchase.tokens_credited,
      'platform_fee_tokens', v_purchase.platform_fee_tokens, 'owed_collected', 0,
      'balance', ledger_balance_json(v_bal.available, v_bal.reserved, v_bal.owed)))
      || '{"replayed": true}';
  END IF;
  UPDATE accounts SET available = available + p_credit WHERE user_id = p_user
    RETURNING id, owed INTO v_bal;
  v_account := v_bal.id;
  INSERT INTO journal_transactions (kind, user_id, purchase_id, user_share_percent)
    VALUES ('purchase', p_user, v_id, p_share_percent) RETURNING id INTO v_tx;
  INSERT INTO journal_entries (transaction_id, account_id, amount)
    SELECT v_tx, e.account, e.amount
      FROM (VALUES (1::bigint, -p_tokens), (v_account, p_credit), (2::bigint, p_fee))
           AS e(account, amount)
     WHERE e.amount <> 0;
  IF v_bal.owed > 0 THEN
    v_collected := ledger_collect(v_account);
  END IF;
  SELECT available, reserved, owed INTO v_bal FROM accounts WHERE id = v_account;
  RETURN ledger_store_answer('credit_purchase', p_key, jsonb_build_object(
    'purchase_id', v_id, 'tokens_credited', p_credit, 'platform_fee_tokens', p_fee,
    'owed_collected', v_collected,
    'balance', ledger_balance_json(v_bal.available, v_bal.reserved, v_bal.owed)))
    || '{"created": true}';
END $$;

-- Two-phase step one: one conditional UPDATE holds the tokens or refuses; never overspends. A
-- refusal changes nothing, so it gives the key back: the same call may succeed after a top-up.
CREATE FUNCTION ledger_reserve(
  p_key text, p_hash bytea, p_user text, p_amount bigint, p_ttl_seconds int, p_fee_percent int,
  p_transient boolean
) RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
  v_prior jsonb;
  v_bal record;
  v_id uuid;
  v_expires timestamptz := now() + make_interval(secs => p_ttl_seconds);
BEGIN
  v_prior := ledger_claim_key('reserve', p_key, p_hash, p_transient);
  IF v_prior IS NOT NULL THEN
    RETURN v_prior;
  END IF;
  UPDATE accounts SET available = available - p_amount, reserved = reserved + p_amount
   WHERE user_id = p_user AND available >= p_amount
   RETURNING id, available, reserved, owed INTO v_bal;
  IF NOT FOUND THEN
    DELETE FROM idempotency_keys WHERE operation = 'reserve' AND key = p_key;
    SELECT available, reserved, owed INTO v_bal FROM accounts WHERE user_id = p_user;
    RETURN jsonb_build_object('error', 'INSUFFICIENT_BALANCE', 'required', p_amount,
      'balance', ledger_balance_json(coalesce(v_bal.available, 0), coalesce(v_bal.reserved, 0),
                                     coalesce(v_bal.owed, 0)));
  END IF;
  INSERT INTO holds (id, account_id, user_id, amount, status, usage_fee_percent, expires_at)
    VALUES (gen_random_uuid(), v_bal.id, p_user, p_amount, 'held', p_fee_percent, v_expires)
    RETURNING id INTO v_id;
  RETURN ledger_store_answer('reserve', p_key, jsonb_build_object(
    'reservation_id', v_id, 'reserved_tokens', p_amount,
    'expires_at_us', (extract(epoch FROM v_expires) * 1000000)::bigint,
    'balance', ledger_balance_json(v_bal.available, v_bal.reserved, v_bal.owed)));
END $$;

-- Keeps a hold alive while its call runs (the database clock decides, as for the sweeper).
CREATE FUNCTION ledger_extend_hold(p_hold uuid, p_ttl_seconds int) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
  v_expires timestamptz;
  v_status text;
BEGIN
  UPDATE holds SET expires_at = greatest(expires_at, now() + make_interval(secs => p_ttl_seconds))
   WHERE id = p_hold AND status = 'held'
   RETURNING expires_at INTO v_expires;
  IF NOT FOUND THEN
    SELECT status INTO v_status FROM holds WHERE id = p_hold;
    IF NOT FOUND THEN
      RETURN jsonb_build_object('error', 'RESERVATION_NOT_FOUND');
    END IF;
    RETURN jsonb_build_object('error', 'RESERVATION_NOT_HELD', 'status', v_status);
  END IF;
  RETURN jsonb_build_object('expires_at_us', (extract(epoch FROM v_expires) * 1000000)::bigint);
END $$;

-- Two-phase step two: post used + fee from the hold, release the rest (paying what the user
-- owes first). The hold's status flips exactly once (settle, release and the sweeper all race on
-- `status = 'held'`). A charge beyond the hold (overrun: a provider anomaly) or a settle after the
-- sweeper expired the hold takes what the available balance allows; the rest is unbilled and
-- booked to the unbilled_usage account.
CREATE FUNCTION ledger_settle(
  p_hold uuid, p_hash bytea, p_used bigint, p_fee bigint, p_fee_percent int, p_provider text,
  p_model text, p_input bigint, p_output bigint, p_cost bigint, p_answer bytea
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
   WHERE id = p_hold AND status = 'held'
   RETURNING account_id, user_id, amount, amount AS original INTO v_hold;
  IF NOT FOUND THEN
    UPDATE holds SET status = 'settled_after_expiry', settle_hash = p_hash
     WHERE id = p_hold AND status = 'expired'
     RETURNING account_id, user_id, 0::bigint AS amount, amount AS original INTO v_hold;
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

  v_overrun := greatest(0, v_charge - v_hold.original);
  v_from_hold := least(v_charge, v_hold.amount);
  v_released := v_hold.amount - v_from_hold;
  IF v_charge > v_from_hold THEN
    SELECT available INTO v_available FROM accounts WHERE id = v_hold.account_id
      FOR NO KEY UPDATE;
    v_extra := least(v_charge - v_from_hold, v_available);
  END IF;
  v_charged := v_from_hold + v_extra;
  v_unbilled := v_charge - v_charged;

  UPDATE accounts
     SET reserved = reserved - v_hold.amount, available = available + v_released - v_extra
   WHERE id = v_hold.account_id
   RETURNING available, reserved, owed INTO v_bal;

  IF v_charge > 0 THEN
    INSERT INTO journal_transactions (kind, user_id, hold_id, usage_fee_percent)
      VALUES ('usage', v_hold.user_id, p_hold, p_fee_percent) RETURNING id INTO v_tx;
    INSERT INTO journal_entries (transaction_id, account_id, amount)
      SELECT v_tx, e.account, e.amount
        FROM (VALUES (v_hold.account_id, -v_charged), (3::bigint, p_used), (4::bigint, p_fee),
                     (6::bigint, -v_unbilled)) AS e(account, amount)
       WHERE e.amount <> 0;
  END IF;
  IF v_bal.owed > 0 THEN
    v_collected := ledger_collect(v_hold.account_id);
    SELECT available, reserved, owed INTO v_bal FROM accounts WHERE id = v_hold.account_id;
  END IF;
  INSERT INTO usage_records (id, user_id, user_type, provider, model, input_tokens,
                             output_tokens, tokens_charged, estimated_cost_micro_usd, hold_id)
    VALUES (gen_random_uuid(), v_hold.user_id, 'subscription', p_provider, p_model, p_input,
            p_output, v_charged, p_cost, p_hold);
  IF p_answer IS NOT NULL THEN
    INSERT INTO hold_answers (hold_id, answer) VALUES (p_hold, p_answer);
  END IF;

  v_answer := jsonb_build_object(
    'tokens_used', p_used, 'fee_tokens', p_fee, 'tokens_charged', v_charged,
    'released_tokens', v_released, 'unbilled_tokens', v_unbilled, 'overrun_tokens', v_overrun,
    'owed_collected', v_collected, 'answer_stored', p_answer IS NOT NULL,
    'balance', ledger_balance_json(v_bal.available, v_bal.reserved, v_bal.owed));
  UPDATE holds SET settle_response = v_answer, overrun = v_overrun WHERE id = p_hold;
  RETURN v_answer;
END $$;

-- Voids a hold, paying what the user owes first. Releasing twice answers the same; a hold the
-- sweeper already expired releases nothing more; a settled hold cannot be released.
CREATE FUNCTION ledger_release(p_hold uuid) RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
  v_hold record;
  v_bal record;
  v_collected bigint := 0;
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
      SELECT available, reserved, owed INTO v_bal FROM accounts WHERE id = v_hold.account_id;
      RETURN jsonb_build_object('released_tokens', 0, 'status', 'expired', 'owed_collected', 0,
        'balance', ledger_balance_json(v_bal.available, v_bal.reserved, v_bal.owed));
    END IF;
    RETURN jsonb_build_object('error', 'RESERVATION_NOT_HELD', 'status', v_hold.status);
  END IF;
  UPDATE accounts SET available = available + v_hold.amount, reserved = reserved - v_hold.amount
   WHERE id = v_hold.account_id
   RETURNING available, reserved, owed INTO v_bal;
  IF v_bal.owed > 0 THEN
    v_collected := ledger_collect(v_hold.account_id);
    SELECT available, reserved, owed INTO v_bal FROM accounts WHERE id = v_hold.account_id;
  END IF;
  v_answer := jsonb_build_object('released_tokens', v_hold.amount, 'owed_collected', v_collected,
    'balance', ledger_balance_json(v_bal.available, v_bal.reserved, v_bal.owed));
  UPDATE holds SET release_response = v_answer WHERE id = p_hold;
  RETURN v_answer;
END $$;

-- Expires due holds by the database clock, paying what their users owe first. SKIP LOCKED: a hold
-- being settled or released right now is left to that call, and several sweepers never block
-- each other. Accounts are locked in id order so that two sweepers cannot deadlock.
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
  PERFORM 1 FROM accounts WHERE id = ANY (v_accounts) ORDER BY id FOR NO KEY UPDATE;
  UPDATE accounts a SET available = a.available + s.total, reserved = a.reserved - s.total
    FROM unnest(v_accounts, v_totals) AS s(account_id, total)
   WHERE a.id = s.account_id;
  PERFORM ledger_collect(id) FROM accounts WHERE id = ANY (v_accounts) AND owed > 0 ORDER BY id;
  RETURN v_count;
END $$;

-- Applies a refund the domain sized from the purchase row the caller locked. The user's part
-- comes out of the available balance; what it cannot cover (already spent, or on hold now) is
-- owed and booked to refund_receivable, and collected as soon as tokens become available.
CREATE FUNCTION ledger_apply_refund(
  p_key text, p_purchase uuid, p_tokens bigint, p_user_part bigint, p_fee_part bigint
) RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
  v_purchase record;
  v_available bigint;
  v_debit bigint;
  v_shortfall bigint;
  v_bal record;
  v_tx bigint;
BEGIN
  UPDATE purchases SET tokens_refunded = tokens_refunded + p_tokens WHERE id = p_purchase
   RETURNING user_id, account_id INTO v_purchase;
  SELECT available INTO v_available FROM accounts WHERE id = v_purchase.account_id
    FOR NO KEY UPDATE;
  v_debit := least(p_user_part, v_available);
  v_shortfall := p_user_part - v_debit;
  UPDATE accounts SET available = available - v_debit, owed = owed + v_shortfall
   WHERE id = v_purchase.account_id
   RETURNING available, reserved, owed INTO v_bal;
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
    'balance', ledger_balance_json(v_bal.available, v_bal.reserved, v_bal.owed)));
END $$;

CREATE FUNCTION ledger_status_rank(p_status text) RETURNS int LANGUAGE sql IMMUTABLE AS $$
  SELECT CASE WHEN p_status = 'expired' THEN 1 ELSE 0 END
$$;

-- Applies a subscription state unless the stored one is newer, or as new and not outranked (a
-- terminal status wins a tie). ON CONFLICT ... WHERE decides under the row's lock, so concurrent
-- deliveries apply in provider order whatever the order they arrive in (the caller holds the
-- subscription's subject lock, so parked payments cannot slip past it). A state that does not
-- apply may still fill in tokens_per_period the stored one lacks (the catalog was fixed).
CREATE FUNCTION ledger_upsert_subscription(
  p_source text, p_external_id text, p_user text, p_variant text, p_status text,
  p_renews_at timestamptz, p_ends_at timestamptz, p_updated_at timestamptz, p_tokens bigint,
  OUT applied boolean, OUT subscription subscriptions
) LANGUAGE plpgsql AS $$
BEGIN
  INSERT INTO subscriptions AS s (source, external_id, user_id, variant_id, status, renews_at,
                                  ends_at, provider_updated_at, tokens_per_period)
    VALUES (p_source, p_external_id, p_user, p_variant, p_status, p_renews_at, p_ends_at,
            p_updated_at, p_tokens)
  ON CONFLICT (source, external_id) DO UPDATE
    SET user_id = excluded.user_id, variant_id = excluded.variant_id, status = excluded.status,
        renews_at = excluded.renews_at, ends_at = excluded.ends_at,
        provider_updated_at = excluded.provider_updated_at, updated_at = now(),
        tokens_per_period = CASE WHEN excluded.variant_id = s.variant_id
                                 THEN coalesce(excluded.tokens_per_period, s.tokens_per_period)
                                 ELSE excluded.tokens_per_period END
    WHERE s.provider_updated_at < excluded.provider_updated_at
       OR (s.provider_updated_at = excluded.provider_updated_at
           AND ledger_status_rank(excluded.status) > ledger_status_rank(s.status))
  RETURNING s.* INTO subscription;
  applied := FOUND;
  IF NOT applied THEN
    UPDATE subscriptions s SET tokens_per_period = p_tokens
     WHERE s.source = p_source AND s.external_id = p_external_id
       AND s.tokens_per_period IS NULL AND p_tokens IS NOT NULL AND s.variant_id = p_variant;
    SELECT s.* INTO subscription FROM subscriptions s
     WHERE s.source = p_source AND s.external_id = p_external_id;
  END IF;
END $$;

-- Deletes what has outlived its retention, a batch at a time (0 seconds: keep forever).
CREATE FUNCTION ledger_retention(
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
    DELETE FROM hold_answers WHERE hold_id = ANY (ARRAY(
      SELECT hold_id FROM hold_answers
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
"""

# Functions 0006 replaces or adds; the downgrade drops them and restores the 0005 versions.
NEW_SIGNATURES = (
    "ledger_retention(int, int, int, int, int)",
    "ledger_upsert_subscription(text, text, text, text, text, timestamptz, timestamptz,"
    " timestamptz, bigint)",
    "ledger_status_rank(text)",
    "ledger_apply_refund(text, uuid, bigint, bigint, bigint)",
    "ledger_sweep(int)",
    "ledger_release(uuid)",
    "ledger_settle(uuid, bytea, bigint, bigint, int, text, text, bigint, bigint, bigint, bytea)",
    "ledger_extend_hold(uuid, int)",
    "ledger_reserve(text, bytea, text, bigint, int, int, boolean)",
    "ledger_apply_credit(text, bytea, text, text, bigint, bigint, bigint, int, text, text)",
    "ledger_collect(bigint)",
    "ledger_lock_subject(text)",
    "ledger_claim_key(text, text, bytea, boolean)",
    "ledger_balance_json(bigint, bigint, bigint)",
)
OLD_SIGNATURES = (
    "ledger_upsert_subscription(text, text, text, text, text, timestamptz, timestamptz,"
    " timestamptz)",
    "ledger_refund_purchase(text, bytea, uuid, bigint, bigint, bigint, bigint)",
    "ledger_sweep(int)",
    "ledger_release(uuid)",
    "ledger_settle(uuid, bytea, bigint, bigint, int, text, text, bigint, bigint, bigint)",
    "ledger_reserve(text, bytea, text, bigint, int, int)",
    "ledger_credit_purchase(text, bytea, text, text, bigint, bigint, bigint, int, text, text)",
    "ledger_claim_key(text, text, bytea)",
    "ledger_balance_json(bigint, bigint)",
)
# 0005's versions of the functions above, by the revision that last defined each.
RESTORED = {
    "0002": (
        "ledger_balance_json",
        "ledger_credit_purchase",
        "ledger_reserve",
        "ledger_settle",
        "ledger_release",
        "ledger_sweep",
        "ledger_refund_purchase",
    ),
    "0004": ("ledger_claim_key",),
    "0005": ("ledger_upsert_subscription",),
}


def _created_at() -> sa.Column[object]:
    return sa.Column(
        "created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False
    )


def upgrade() -> None:
    op.add_column(
        "accounts", sa.Column("owed", sa.BigInteger(), server_default=sa.text("0"), nullable=False)
    )
    op.create_check_constraint(op.f("ck_accounts_owed_nonnegative"), "accounts", "owed >= 0")
    op.add_column(
        "holds", sa.Column("overrun", sa.BigInteger(), server_default=sa.text("0"), nullable=False)
    )
    op.add_column(
        "idempotency_keys",
        sa.Column("transient", sa.Boolean(), server_default=sa.text("false"), nullable=False),
    )
    op.create_index(
        "ix_idempotency_keys_created_at", "idempotency_keys", ["created_at"], unique=False
    )
    op.add_column("subscriptions", sa.Column("tokens_per_period", sa.BigInteger(), nullable=True))
    op.create_check_constraint(
        op.f("ck_subscriptions_tokens_per_period_positive"),
        "subscriptions",
        "tokens_per_period IS NULL OR tokens_per_period > 0",
    )
    op.create_index(
        "ix_dead_letters_resolved_at",
        "dead_letters",
        ["resolved_at"],
        unique=False,
        postgresql_where=sa.text("resolved_at IS NOT NULL"),
    )
    op.create_table(
        "hold_answers",
        sa.Column("hold_id", sa.UUID(), nullable=False),
        sa.Column("answer", sa.LargeBinary(), nullable=False),
        _created_at(),
        sa.CheckConstraint(
            f"octet_length(answer) <= {MAX_ANSWER_BYTES}",
            name=op.f("ck_hold_answers_answer_bounded"),
        ),
        sa.ForeignKeyConstraint(
            ["hold_id"], ["holds.id"], name=op.f("fk_hold_answers_hold_id_holds")
        ),
        sa.PrimaryKeyConstraint("hold_id", name=op.f("pk_hold_answers")),
    )
    op.create_index("ix_hold_answers_created_at", "hold_answers", ["created_at"], unique=False)
    op.create_table(
        "parked_operations",
        sa.Column("id", sa.UUID(), nullable=False),
        sa.Column("subject", sa.Text(), nullable=False),
        sa.Column("operation", sa.Text(), nullable=False),
        sa.Column("idempotency_key", sa.Text(), nullable=False),
        sa.Column("request", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        _created_at(),
        sa.Column("applied_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("outcome", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
        sa.CheckConstraint(
            "operation IN ('credit_purchase', 'refund_purchase')",
            name=op.f("ck_parked_operations_operation_known"),
        ),
        sa.CheckConstraint(
            "(applied_at IS NULL) = (outcome IS NULL)",
            name=op.f("ck_parked_operations_applied_with_outcome"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_parked_operations")),
        sa.UniqueConstraint(
            "operation",
            "idempotency_key",
            name=op.f("uq_parked_operations_operation_idempotency_key"),
        ),
    )
    op.create_index(
        "ix_parked_operations_waiting",
        "parked_operations",
        ["subject", "created_at"],
        unique=False,
        postgresql_where=sa.text("applied_at IS NULL"),
    )
    op.execute("\n".join(f"DROP FUNCTION {signature};" for signature in OLD_SIGNATURES))
    op.execute(FUNCTIONS)
    # Refunds booked before this revision left their shortfall on the receivable only: make it
    # owed by its user, and collect it from what the user has now (the rule from here on).
    op.execute(
        """
        UPDATE accounts a SET owed = s.total
          FROM (SELECT t.user_id, -sum(e.amount)::bigint AS total
                  FROM journal_entries e JOIN journal_transactions t ON t.id = e.transaction_id
                 WHERE e.account_id = 5 AND t.user_id IS NOT NULL
                 GROUP BY t.user_id HAVING sum(e.amount) < 0) s
         WHERE a.user_id = s.user_id
        """
    )
    op.execute("SELECT ledger_collect(id) FROM accounts WHERE owed > 0 ORDER BY id")


def downgrade() -> None:
    op.execute("\n".join(f"DROP FUNCTION {signature};" for signature in NEW_SIGNATURES))
    for rev, names in RESTORED.items():
        defined = definitions(rev, ("FUNCTIONS", "CLAIM"))
        op.execute("\n".join(defined[name] for name in names))
    op.drop_index(
        "ix_parked_operations_waiting",
        table_name="parked_operations",
        postgresql_where=sa.text("applied_at IS NULL"),
    )
    op.drop_table("parked_operations")
    op.drop_index("ix_hold_answers_created_at", table_name="hold_answers")
    op.drop_table("hold_answers")
    op.drop_index(
        "ix_dead_letters_resolved_at",
        table_name="dead_letters",
        postgresql_where=sa.text("resolved_at IS NOT NULL"),
    )
    op.drop_constraint(
        op.f("ck_subscriptions_tokens_per_period_positive"), "subscriptions", type_="check"
    )
    op.drop_column("subscriptions", "tokens_per_period")
    op.drop_index("ix_idempotency_keys_created_at", table_name="idempotency_keys")
    op.drop_column("idempotency_keys", "transient")
    op.drop_column("holds", "overrun")
    op.drop_constraint(op.f("ck_accounts_owed_nonnegative"), "accounts", type_="check")
    op.drop_column("accounts", "owed")
