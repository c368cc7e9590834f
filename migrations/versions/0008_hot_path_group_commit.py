"""hot path group commit: concurrent Reserve, Settle, Release, ExtendHold and RecordUsage calls
applied together, in one statement and one transaction

`ledger_hot_batch` takes the calls the ledger collected (an array of `ledger_hot_item`) and applies
each with the same per-item function a lone call uses, in one transaction: one commit (one WAL
flush) and one round trip for the whole group. Each item answers exactly as it would alone: a
refusal (insufficient balance, no such hold, a reused key) is an answer, not an error, so it never
fails the others. An unexpected error or a deadlock aborts the whole statement, nothing applied;
the ledger then runs the items one at a time (a batch of one each), so only the faulty one fails.

Lock order, the same in every batch so that concurrent batches cannot deadlock each other: first
every hold the batch names (by id), then account by account in id order (the order the sweeper
locks accounts in), each account's month row before its account row as on every path (0007).
Items of one account run in arrival order, so a key or a hold named twice in one batch replays
its first use exactly as a second transaction would.

The batch spans users, so unlike the per-item functions it cannot be routed by `p_user_id` on a
sharded (Citus) database: there the ledger would group calls per user (or per shard) and call
the per-item functions, which stay as they are.

Revision ID: 0008
Revises: 0007
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

FUNCTIONS = r"""
-- One hot-path call. `op` says which; the other fields are that call's arguments (NULL when the
-- operation has no such argument). amount: the hold (reserve) or the tokens used (settle).
CREATE TYPE ledger_hot_item AS (
  op text, user_id text, hold_id uuid, key text, hash bytea, amount bigint, fee bigint,
  ttl_seconds int, fee_percent int, transient boolean, quota bigint, tz text, at timestamptz,
  user_type text, provider text, model text, input_tokens bigint, output_tokens bigint,
  cost bigint, answer bytea
);

-- Group commit: applies the items in one transaction, each by its own per-item function, in the
-- lock order above; answers each item's 1-based position with its answer.
CREATE FUNCTION ledger_hot_batch(p_items ledger_hot_item[])
RETURNS TABLE (item int, answer jsonb) LANGUAGE plpgsql AS $$
DECLARE
  v record;
BEGIN
  PERFORM 1 FROM holds
   WHERE id IN (SELECT i.hold_id FROM unnest(p_items) AS i WHERE i.hold_id IS NOT NULL)
   ORDER BY id FOR NO KEY UPDATE;
  FOR v IN
    SELECT i.*
      FROM unnest(p_items) WITH ORDINALITY
             AS i(op, user_id, hold_id, key, hash, amount, fee, ttl_seconds, fee_percent,
                  transient, quota, tz, at, user_type, provider, model, input_tokens,
                  output_tokens, cost, answer, n)
      LEFT JOIN holds h ON h.id = i.hold_id
      LEFT JOIN accounts a ON a.user_id = i.user_id
     ORDER BY coalesce(h.account_id, a.id), i.n
  LOOP
    item := v.n;
    IF v.op = 'reserve' THEN
      answer := ledger_reserve(v.key, v.hash, v.user_id, v.amount, v.ttl_seconds, v.fee_percent,
                               v.transient, v.quota, v.tz, v.at);
    ELSIF v.op = 'settle' THEN
      answer := ledger_settle(v.hold_id, v.hash, v.amount, v.fee, v.fee_percent, v.provider,
                              v.model, v.input_tokens, v.output_tokens, v.cost, v.answer);
    ELSIF v.op = 'release' THEN
      answer := ledger_release(v.hold_id);
    ELSIF v.op = 'extend' THEN
      answer := ledger_extend_hold(v.hold_id, v.ttl_seconds);
    ELSIF v.op = 'usage' THEN
      answer := ledger_record_usage(v.key, v.hash, v.user_id, v.user_type, v.provider, v.model,
                                    v.input_tokens, v.output_tokens, v.cost);
    ELSE
      RAISE EXCEPTION 'unknown hot-path operation %', v.op;
    END IF;
    RETURN NEXT;
  END LOOP;
END $$;
"""

DROP = """
DROP FUNCTION IF EXISTS ledger_hot_batch(ledger_hot_item[]);
DROP TYPE IF EXISTS ledger_hot_item;
"""


def upgrade() -> None:
    op.execute(FUNCTIONS)


def downgrade() -> None:
    op.execute(DROP)
