"""hot path group commit: concurrent Reserve, Settle, Release, ExtendHold and RecordUsage calls
applied together, in one statement and one transaction

`ledger_hot_batch` takes the calls the ledger collected (an array of `ledger_hot_item`) and applies
each with the same per-item function a lone call uses, in one transaction: one commit (one WAL
flush) and one round trip for the whole group. Each item answers exactly as it would alone: a
refusal (insufficient balance, no such hold, a reused key) is an answer, not an error, so it never
fails the others. An unexpected error or a deadlock aborts the whole statement, nothing applied;
the ledger then runs the items one at a time (a batch of one each), so only the faulty one fails.

Lock order, the same in every batch so that concurrent batches cannot deadlock each other: first
the idempotency keys the batch claims (an advisory lock each, in key order), then every hold it
names (by id), then account by account in id order (the order the sweeper locks accounts in),
each account's month row before its account row as on every path (0007).
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

-- One item, by the per-item function a lone call of its kind uses.
CREATE FUNCTION ledger_hot_apply(p ledger_hot_item) RETURNS jsonb LANGUAGE plpgsql AS $$
BEGIN
  IF p.op = 'reserve' THEN
    RETURN ledger_reserve(p.key, p.hash, p.user_id, p.amount, p.ttl_seconds, p.fee_percent,
                          p.transient, p.quota, p.tz, p.at);
  ELSIF p.op = 'settle' THEN
    RETURN ledger_settle(p.hold_id, p.hash, p.amount, p.fee, p.fee_percent, p.provider, p.model,
                         p.input_tokens, p.output_tokens, p.cost, p.answer);
  ELSIF p.op = 'release' THEN
    RETURN ledger_release(p.hold_id);
  ELSIF p.op = 'extend' THEN
    RETURN ledger_extend_hold(p.hold_id, p.ttl_seconds);
  ELSIF p.op = 'usage' THEN
    RETURN ledger_record_usage(p.key, p.hash, p.user_id, p.user_type, p.provider, p.model,
                               p.input_tokens, p.output_tokens, p.cost);
  END IF;
  RAISE EXCEPTION 'unknown hot-path operation %', p.op;
END $$;

-- An idempotency key a hot-path call claims, locked for the rest of the transaction before the
-- call takes any row lock: a copy of the call in another transaction (a client's retry, a
-- duplicate) then waits here holding nothing it could need, instead of holding an account row
-- while it waits for the key row (two batches would deadlock).
CREATE FUNCTION ledger_lock_hot_key(p_op text, p_key text) RETURNS void LANGUAGE sql AS $$
  SELECT pg_advisory_xact_lock(hashtextextended(p_op || ':' || p_key, 8270008))
$$;

-- Group commit: applies the items in one transaction in the lock order above; answers each
-- item's 1-based position with its answer. A batch of one (a quiet moment, or an item run alone
-- after its batch failed) needs no ordering.
CREATE FUNCTION ledger_hot_batch(p_items ledger_hot_item[])
RETURNS TABLE (item int, answer jsonb) LANGUAGE plpgsql AS $$
DECLARE
  v record;
BEGIN
  IF cardinality(p_items) = 1 THEN
    IF p_items[1].key IS NOT NULL THEN
      PERFORM ledger_lock_hot_key(p_items[1].op, p_items[1].key);
    END IF;
    item := 1;
    answer := ledger_hot_apply(p_items[1]);
    RETURN NEXT;
    RETURN;
  END IF;
  FOR v IN
    SELECT DISTINCT i.op, i.key FROM unnest(p_items) AS i WHERE i.key IS NOT NULL
     ORDER BY i.op, i.key
  LOOP
    PERFORM ledger_lock_hot_key(v.op, v.key);
  END LOOP;
  -- Index lookups item by item (= ANY, scalar subqueries): a join would let a generic plan
  -- scan whole tables.
  PERFORM 1 FROM holds
   WHERE id = ANY (ARRAY(SELECT i.hold_id FROM unnest(p_items) AS i WHERE i.hold_id IS NOT NULL))
   ORDER BY id FOR NO KEY UPDATE;
  FOR v IN
    SELECT g.n
      FROM generate_subscripts(p_items, 1) AS g(n)
     ORDER BY coalesce(
                (SELECT h.account_id FROM holds h WHERE h.id = (p_items[g.n]).hold_id),
                (SELECT a.id FROM accounts a WHERE a.user_id = (p_items[g.n]).user_id)),
              g.n
  LOOP
    item := v.n;
    answer := ledger_hot_apply(p_items[v.n]);
    RETURN NEXT;
  END LOOP;
END $$;
"""

DROP = """
DROP FUNCTION IF EXISTS ledger_hot_batch(ledger_hot_item[]);
DROP FUNCTION IF EXISTS ledger_hot_apply(ledger_hot_item);
DROP FUNCTION IF EXISTS ledger_lock_hot_key(text, text);
DROP TYPE IF EXISTS ledger_hot_item;
"""


def upgrade() -> None:
    op.execute(FUNCTIONS)


def downgrade() -> None:
    op.execute(DROP)
