"""a Reserve names the caller's attempt, and its replay says which attempt made the hold

- A caller whose Reserve answer was lost (the ledger applied it, the answer never came back)
  cannot tell, from a replay under its key, its own hold from one its end caller's retry made
  under the same key, and the retry may be serving on that one. So ledger_reserve takes the
  attempt's id as a trailing argument (not part of the request hash: every attempt of a call
  sends the same key and request) and stores it in the answer it keeps with the key; a replay
  returns that answer, so it names the attempt that made the hold.
- The argument defaults to NULL (stored as ""), so a call written for 0009 still works.
- ledger_hot_item carries the id (attempt_id) to ledger_reserve through ledger_hot_apply.
- Both functions are 0009's (ledger_reserve) and 0011's (ledger_hot_apply) with only that
  change, derived from those revisions' text (checked to apply exactly once each).
- The downgrade restores those two revisions' functions and drops the attribute. Answers stored
  meanwhile keep their attempt_id, which the older code ignores.

Revision ID: 0012
Revises: 0011
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

from ledger_service.store.sql_history import definitions, replaceable

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SCHEMA_UP = "ALTER TYPE ledger_hot_item ADD ATTRIBUTE attempt_id text;"
SCHEMA_DOWN = "ALTER TYPE ledger_hot_item DROP ATTRIBUTE attempt_id;"

OLD_SIGNATURE = (
    "ledger_reserve(text, bytea, text, bigint, int, int, boolean, bigint, text, timestamptz)"
)
NEW_SIGNATURE = (
    "ledger_reserve(text, bytea, text, bigint, int, int, boolean, bigint, text, timestamptz, text)"
)
# Where each function was last defined, and what this revision changes in it: (old, new) pairs.
CHANGES = {
    ("0009", "ledger_reserve"): (
        (
            "p_tz text, p_at timestamptz\n)",
            "p_tz text, p_at timestamptz,\n  p_attempt text DEFAULT NULL\n)",
        ),
        (
            "'reservation_id', v_id, 'reserved_tokens', p_amount,",
            "'reservation_id', v_id, 'reserved_tokens', p_amount,\n"
            "    'attempt_id', coalesce(p_attempt, ''),",
        ),
    ),
    ("0011", "ledger_hot_apply"): (
        (
            "p.transient, p.quota, p.tz, p.at);",
            "p.transient, p.quota, p.tz, p.at, p.attempt_id);",
        ),
    ),
}


def functions(changed: bool) -> str:
    """The two functions as this revision defines them (changed) or as it found them."""
    statements = []
    for (rev, name), edits in CHANGES.items():
        definition = definitions(rev)[name]
        for old, new in edits if changed else ():
            if definition.count(old) != 1:
                raise RuntimeError(f"0012: {name} of {rev} does not read as expected: {old!r}")
            definition = definition.replace(old, new)
        statements.append(replaceable(definition))
    return "\n".join(statements)


def upgrade() -> None:
    op.execute(SCHEMA_UP)
    op.execute(f"DROP FUNCTION {OLD_SIGNATURE};")
    op.execute(functions(changed=True))


def downgrade() -> None:
    op.execute(f"DROP FUNCTION {NEW_SIGNATURE};")
    op.execute(functions(changed=False))
    op.execute(SCHEMA_DOWN)
