"""Recomputes every balance from the journal and checks the ledger's invariants.

Run as `python -m ledger_service audit`; exits non-zero on any violation.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import asyncpg

CHECKS: list[tuple[str, str]] = [
    (
        "every journal transaction sums to zero",
        """SELECT transaction_id::text, sum(amount)::text FROM journal_entries
            GROUP BY transaction_id HAVING sum(amount) <> 0 LIMIT 20""",
    ),
    (
        "every user's cached balance equals the sum of its entries",
        """SELECT a.user_id,
                  (a.available + a.reserved)::text || ' <> ' || coalesce(e.total, 0)::text
             FROM accounts a
             LEFT JOIN (SELECT account_id, sum(amount) AS total FROM journal_entries
                         GROUP BY account_id) e ON e.account_id = a.id
            WHERE a.user_id IS NOT NULL AND a.available + a.reserved <> coalesce(e.total, 0)
            LIMIT 20""",
    ),
    (
        "every user's reserved tokens equal their open holds",
        """SELECT a.user_id, a.reserved::text || ' <> ' || coalesce(h.total, 0)::text
             FROM accounts a
             LEFT JOIN (SELECT account_id, sum(amount) AS total FROM holds
                         WHERE status = 'held' GROUP BY account_id) h ON h.account_id = a.id
            WHERE a.user_id IS NOT NULL AND a.reserved <> coalesce(h.total, 0)
            LIMIT 20""",
    ),
    (
        "no balance is negative",
        """SELECT coalesce(user_id, code), available::text || '/' || reserved::text FROM accounts
            WHERE available < 0 OR reserved < 0 LIMIT 20""",
    ),
    (
        "platform accounts carry no cached balance",
        """SELECT code, available::text || '/' || reserved::text FROM accounts
            WHERE code IS NOT NULL AND (available <> 0 OR reserved <> 0)""",
    ),
    (
        "every purchase's legs add up and its refunds stay within it",
        """SELECT id::text, tokens_purchased::text FROM purchases
            WHERE tokens_credited + platform_fee_tokens <> tokens_purchased
               OR tokens_refunded > tokens_purchased LIMIT 20""",
    ),
    (
        "every purchase is journaled exactly once",
        """SELECT p.id::text, count(t.id)::text FROM purchases p
             LEFT JOIN journal_transactions t ON t.purchase_id = p.id AND t.kind = 'purchase'
            GROUP BY p.id HAVING count(t.id) <> 1 LIMIT 20""",
    ),
    (
        "every hold is settled at most once",
        """SELECT hold_id::text, count(*)::text FROM journal_transactions
            WHERE kind = 'usage' GROUP BY hold_id HAVING count(*) > 1 LIMIT 20""",
    ),
]


@dataclass
class AuditReport:
    violations: dict[str, list[tuple[str, str]]] = field(default_factory=dict)
    platform_balances: dict[str, int] = field(default_factory=dict)
    users: int = 0
    transactions: int = 0

    @property
    def ok(self) -> bool:
        return not self.violations

    def render(self) -> str:
        lines = [
            f"audited {self.users} user accounts and {self.transactions} journal transactions",
            "platform balances (derived from entries):",
            *(f"  {code:<18} {amount:>16}" for code, amount in self.platform_balances.items()),
        ]
        for check, rows in self.violations.items():
            lines.append(f"VIOLATION: {check}")
            lines.extend(f"  {a}: {b}" for a, b in rows)
        lines.append("audit: OK" if self.ok else "audit: FAILED")
        return "\n".join(lines)


async def run_audit(url: str) -> AuditReport:
    conn = await asyncpg.connect(url)
    try:
        report = AuditReport()
        # One snapshot for every check, so a busy ledger cannot produce a false violation.
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            for name, sql in CHECKS:
                rows = await conn.fetch(sql)
                if rows:
                    report.violations[name] = [(str(r[0]), str(r[1])) for r in rows]
            for row in await conn.fetch(
                """SELECT a.code, coalesce(sum(e.amount), 0)::bigint AS total FROM accounts a
                     LEFT JOIN journal_entries e ON e.account_id = a.id
                    WHERE a.code IS NOT NULL GROUP BY a.id, a.code ORDER BY a.id"""
            ):
                report.platform_balances[row["code"]] = row["total"]
            report.users = await conn.fetchval(
                "SELECT count(*) FROM accounts WHERE user_id IS NOT NULL"
            )
            report.transactions = await conn.fetchval("SELECT count(*) FROM journal_transactions")
        return report
    finally:
        await conn.close()
