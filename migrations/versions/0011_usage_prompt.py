"""usage records say which server-held prompt a call used: nullable prompt_id and prompt_version
on usage_records (both or neither), so analytics can break usage down by prompt

- The gateway renders a prompt of its library (gateway_service/prompts.py) and sends its id and
  version with the usage (ledger.proto `Usage.prompt`); the domain checks them as ids (printable,
  at most 256 characters). Calls that name no prompt, and every row before this revision, have
  NULL in both.
- ledger_settle and ledger_record_usage take the two as trailing arguments and store them; the
  hot-path item (ledger_hot_item) carries them to both through ledger_hot_apply.
- The downgrade drops the columns and restores the functions of 0010 (ledger_settle) and 0009
  (ledger_record_usage, ledger_hot_apply).

Revision ID: 0011
Revises: 0010
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

from ledger_service.store.sql_history import restored

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SCHEMA_UP = r"""
ALTER TABLE usage_records
  ADD COLUMN prompt_id text,
  ADD COLUMN prompt_version text,
  -- A prompt is named by both, or the call used none.
  ADD CONSTRAINT ck_usage_records_prompt_whole
    CHECK ((prompt_id IS NULL) = (prompt_version IS NULL));
ALTER TYPE ledger_hot_item ADD ATTRIBUTE prompt_id text, ADD ATTRIBUTE prompt_version text;
"""

SCHEMA_DOWN = r"""
ALTER TYPE ledger_hot_item DROP ATTRIBUTE prompt_version, DROP ATTRIBUTE prompt_id;
ALTER TABLE usage_records
  DROP CONSTRAINT ck_usage_records_prompt_whole,
  DROP COLUMN prompt_version,
  DROP COLUMN prompt_id;
"""

OLD_SIGNATURES = (
    "ledger_settle(text, uuid, bytea, bigint, bigint, int, text, text, bigint, bigint, bigint,"
    " bytea)",
    "ledger_record_usage(text, bytea, text, text, text, text, bigint, bigint, bigint)",
)
NEW_SIGNATURES = (
    "ledger_settle(text, uuid, bytea, bigint, bigint, int, text, text, bigint, bigint, bigint,"
    " bytea, text, text)",
    "ledger_record_usage(text, bytea, text, text, text, text, bigint, bigint, bigint, text, text)",
)
# Restored by the downgrade, from the revision that last defined each.
RESTORED = {"0010": ("ledger_settle",), "0009": ("ledger_record_usage", "ledger_hot_apply")}

FUNCTIONS = r"""
-- Two-phase step two (0010), now storing the server-held prompt the call used (NULLs: none).
CREATE FUNCTION ledger_settle(
  p_user_id text, p_hold uuid, p_hash bytea, p_used bigint, p_fee bigint, p_fee_percent int,
  p_provider text, p_model text, p_input bigint, p_output bigint, p_cost bigint, p_answer bytea,
  p_prompt_id text, p_prompt_version text
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
                             estimated_cost_micro_usd, hold_id, prompt_id, prompt_version)
    VALUES (gen_random_uuid(), p_user_id, 'subscription', p_provider, p_model, p_input,
            p_output, v_charged, p_fee, p_cost, p_hold, p_prompt_id, p_prompt_version);
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

-- Analytics only (0009): one row per keyed call, no balance touched, now with the call's prompt.
-- Its key is unique across users, so the replay lookup is global.
CREATE FUNCTION ledger_record_usage(
  p_key text, p_hash bytea, p_user_id text, p_type text, p_provider text, p_model text,
  p_input bigint, p_output bigint, p_cost bigint, p_prompt_id text, p_prompt_version text
) RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
  v_id uuid;
  v_prev record;
BEGIN
  INSERT INTO usage_records (id, user_id, user_type, provider, model, input_tokens,
                             output_tokens, estimated_cost_micro_usd, idempotency_key,
                             request_hash, prompt_id, prompt_version)
    VALUES (gen_random_uuid(), p_user_id, p_type, p_provider, p_model, p_input, p_output,
            p_cost, p_key, p_hash, p_prompt_id, p_prompt_version)
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

-- One hot-path call (0009), passing the item's prompt to the settle and the usage record.
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
                         p.provider, p.model, p.input_tokens, p.output_tokens, p.cost, p.answer,
                         p.prompt_id, p.prompt_version);
  ELSIF p.op = 'release' THEN
    RETURN ledger_release(p.user_id, p.hold_id);
  ELSIF p.op = 'extend' THEN
    RETURN ledger_extend_hold(p.user_id, p.hold_id, p.ttl_seconds);
  ELSIF p.op = 'usage' THEN
    RETURN ledger_record_usage(p.key, p.hash, p.user_id, p.user_type, p.provider, p.model,
                               p.input_tokens, p.output_tokens, p.cost,
                               p.prompt_id, p.prompt_version);
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
