"""a replayed Reserve reports what became of its hold

A caller retrying a keyed call must tell "still running or done" (held / settled) from "failed
and released" (released / expired), to retry only the latter.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

CLAIM = """
CREATE OR REPLACE FUNCTION ledger_claim_key(p_operation text, p_key text, p_hash bytea)
RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
  v_prev record;
  v_status text;
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
  IF p_operation = 'reserve' AND v_prev.response ? 'reservation_id' THEN
    SELECT status INTO v_status FROM holds WHERE id = (v_prev.response->>'reservation_id')::uuid;
    RETURN v_prev.response || jsonb_build_object('replayed', true, 'status', v_status);
  END IF;
  RETURN v_prev.response || jsonb_build_object('replayed', true);
END $$;
"""

PREVIOUS = """
CREATE OR REPLACE FUNCTION ledger_claim_key(p_operation text, p_key text, p_hash bytea)
RETURNS jsonb LANGUAGE plpgsql AS $$
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
"""


def upgrade() -> None:
    op.execute(CLAIM)


def downgrade() -> None:
    op.execute(PREVIOUS)
