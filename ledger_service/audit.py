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
    (
        "every user's owed tokens equal their open part of the refund receivable",
        """SELECT a.user_id, a.owed::text || ' <> ' || coalesce(-r.total, 0)::text
             FROM accounts a
             LEFT JOIN (SELECT t.user_id, sum(e.amount) AS total FROM journal_entries e
                          JOIN journal_transactions t ON t.id = e.transaction_id
                         WHERE e.account_id = 5 GROUP BY t.user_id) r ON r.user_id = a.user_id
            WHERE a.user_id IS NOT NULL AND a.owed <> coalesce(-r.total, 0)
            LIMIT 20""",
    ),
    (
        "every month's held tokens equal its open quota holds",
        """SELECT m.user_id || ' ' || m.month::text, m.held::text || ' <> ' || coalesce(h.total, 0)
             FROM monthly_usage m
             LEFT JOIN (SELECT user_id, quota_month, sum(amount)::bigint AS total FROM holds
                         WHERE status = 'held' AND quota_month IS NOT NULL
                         GROUP BY user_id, quota_month) h
               ON h.user_id = m.user_id AND h.quota_month = m.month
            WHERE m.held <> coalesce(h.total, 0) LIMIT 20""",
    ),
    (
        "every month's charged tokens equal what its quota holds were charged",
        """SELECT m.user_id || ' ' || m.month::text,
                  m.charged::text || ' <> ' || coalesce(c.total, 0)
             FROM monthly_usage m
             LEFT JOIN (SELECT h.user_id, h.quota_month, sum(u.tokens_charged)::bigint AS total
                          FROM holds h JOIN usage_records u ON u.hold_id = h.id
                         WHERE h.quota_month IS NOT NULL GROUP BY h.user_id, h.quota_month) c
               ON c.user_id = m.user_id AND c.quota_month = m.month
            WHERE m.charged <> coalesce(c.total, 0) LIMIT 20""",
    ),
    (
        # A call recorded into a day after the job rolled it (its transaction outlived the
        # rollup's margin) would be missing from the analytics: this says where.
        "every rolled day of the analytics rollup holds exactly its usage records",
        """WITH records AS (
             SELECT (created_at AT TIME ZONE 'UTC')::date AS day, count(*) AS requests,
                    sum(tokens_charged) AS charged
               FROM usage_records
              WHERE created_at < (SELECT rolled_until FROM analytics_rollups
                                   WHERE name = 'usage_daily')::timestamp AT TIME ZONE 'UTC'
              GROUP BY 1
           ), rolled AS (
             SELECT day, sum(requests) AS requests, sum(tokens_charged) AS charged
               FROM usage_daily GROUP BY day
           )
           SELECT coalesce(r.day, d.day)::text,
                  coalesce(r.requests, 0)::text || ' calls, ' || coalesce(d.requests, 0)::text
                  || ' rolled'
             FROM records r FULL JOIN rolled d ON d.day = r.day
            WHERE r.requests IS DISTINCT FROM d.requests OR r.charged IS DISTINCT FROM d.charged
            LIMIT 20""",
    ),
    (
        "every rolled month of the analytics rollup holds exactly its days",
        """WITH days AS (
             SELECT date_trunc('month', day)::date AS month, sum(requests) AS requests,
                    sum(tokens_charged) AS charged
               FROM usage_daily
              WHERE day < (SELECT rolled_until FROM analytics_rollups
                            WHERE name = 'usage_monthly')
              GROUP BY 1
           ), rolled AS (
             SELECT month, sum(requests) AS requests, sum(tokens_charged) AS charged
               FROM usage_monthly GROUP BY month
           )
           SELECT coalesce(d.month, m.month)::text,
                  coalesce(d.requests, 0)::text || ' calls, ' || coalesce(m.requests, 0)::text
                  || ' rolled'
             FROM days d FULL JOIN rolled m ON m.month = d.month
            WHERE d.requests IS DISTINCT FROM m.requests OR d.charged IS DISTINCT FROM m.charged
            LIMIT 20""",
    ),
    (
        "a user who owes tokens has none available (owed is collected first)",
        """SELECT user_id, available::text || ' available, ' || owed::text || ' owed'
             FROM accounts WHERE owed > 0 AND available > 0 LIMIT 20""",
    ),
]

# Not violations: what an operator should look at (counts and totals, in one snapshot).
FINDINGS: list[tuple[str, str]] = [
    (
        "open refund receivables (users, tokens owed)",
        "SELECT count(*), coalesce(sum(owed), 0) FROM accounts WHERE owed > 0",
    ),
    (
        "holds settled beyond their hold, a provider anomaly (holds, tokens over)",
        "SELECT count(*), coalesce(sum(overrun), 0) FROM holds WHERE overrun > 0",
    ),
    (
        "usage the balance could not cover (settles, tokens unbilled)",
        """SELECT count(DISTINCT e.transaction_id), coalesce(-sum(e.amount), 0)
             FROM journal_entries e WHERE e.account_id = 6""",
    ),
    (
        "holds settled after they expired (holds, tokens charged)",
        """SELECT count(*), coalesce(sum(u.tokens_charged), 0) FROM holds h
             JOIN usage_records u ON u.hold_id = h.id WHERE h.status = 'settled_after_expiry'""",
    ),
    (
        "payment events waiting for their purchase or subscription (events, oldest)",
        """SELECT count(*), coalesce(min(created_at)::text, '-') FROM parked_operations
            WHERE applied_at IS NULL""",
    ),
    (
        "dead letters waiting for an operator (letters, oldest)",
        """SELECT count(*), coalesce(min(created_at)::text, '-') FROM dead_letters
            WHERE resolved_at IS NULL""",
    ),
]


@dataclass
class AuditReport:
    violations: dict[str, list[tuple[str, str]]] = field(default_factory=dict)
    platform_balances: dict[str, int] = field(default_factory=dict)
    findings: dict[str, tuple[str, str]] = field(default_factory=dict)
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
            "to look at:",
            *(f"  {name}: {a}, {b}" for name, (a, b) in self.findings.items()),
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
            for name, sql in FINDINGS:
                row = await conn.fetchrow(sql)
                report.findings[name] = (str(row[0]), str(row[1]))
            report.users = await conn.fetchval(
                "SELECT count(*) FROM accounts WHERE user_id IS NOT NULL"
            )
            report.transactions = await conn.fetchval("SELECT count(*) FROM journal_transactions")
        return report
    finally:
        await conn.close()
