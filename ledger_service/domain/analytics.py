"""Operator analytics across all users: the periods of a range, and the figures of each, put
together from what the store read in one snapshot.

Periods are UTC hours, days or calendar months. A range [start, end) is cut into every period it
touches, empty ones included, oldest first: start is truncated down to its period, and the last
period ends at `end` (it may be partial). Sums are additive, so the range's totals are the sums
of its periods; distinct users are not, so the store counts them over the range too.

What counts where:
- Revenue is what buyers paid per currency, and its US-dollar value (the provider's figure) in
  micro-dollars; a purchase without a USD value counts in `purchases_without_amount`.
- The platform's provider cost is that of subscription calls (it pays for them with its own
  keys); BYOK calls, public ones included, cost their callers (`byok_cost`). A call whose model
  has no known price is counted in `unknown_cost_requests`, never as zero cost.
- Gross margin: revenue less the platform's provider cost, per period; per model, the tokens
  charged valued at the range's revenue per credited token (exactly, one floor at the end:
  money.gross_margin) less the model's provider cost.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta

from ledger_service.domain import money
from ledger_service.domain.types import (
    CurrencyAmount,
    Granularity,
    JournalFigures,
    ModelFigures,
    ModelUsage,
    PlatformAnalytics,
    PlatformFigures,
    PlatformPeriod,
    PlatformRows,
    PurchaseGroup,
    PurchaseSource,
    UsageFigures,
    UserCounts,
)

# 31 days of hours: a month by the hour is the finest whole view.
MAX_PERIODS = 744
DEFAULT_TOP_USERS = 10
MAX_TOP_USERS = 100


def truncate(moment: datetime, granularity: Granularity) -> datetime:
    """The start of the UTC period that holds `moment`."""
    utc = moment.astimezone(UTC)
    if granularity is Granularity.HOUR:
        return utc.replace(minute=0, second=0, microsecond=0)
    day = utc.replace(hour=0, minute=0, second=0, microsecond=0)
    return day if granularity is Granularity.DAY else day.replace(day=1)


def next_period(start: datetime, granularity: Granularity) -> datetime:
    """The start of the period after the one starting at `start` (OverflowError past 9999)."""
    if granularity is Granularity.HOUR:
        return start + timedelta(hours=1)
    if granularity is Granularity.DAY:
        return start + timedelta(days=1)
    if start.month == 12:
        if start.year == datetime.max.year:
            raise OverflowError("no month after December 9999")
        return start.replace(year=start.year + 1, month=1)
    return start.replace(month=start.month + 1)


def period_starts(
    start: datetime, end: datetime, granularity: Granularity, limit: int = MAX_PERIODS
) -> list[datetime] | None:
    """The start of every period of [start, end), oldest first; None when there are more than
    `limit` (counted without building them all)."""
    starts: list[datetime] = []
    moment = truncate(start, granularity)
    while moment < end:
        if len(starts) == limit:
            return None
        starts.append(moment)
        try:
            moment = next_period(moment, granularity)
        except OverflowError:
            break
    return starts


def _purchase_totals(
    groups: Iterable[PurchaseGroup],
) -> tuple[dict[str, int], dict[str | None, int], int]:
    """(counts by field, revenue by currency, credited tokens of the purchases with a USD
    value) of some purchase groups."""
    sums: dict[str, int] = defaultdict(int)
    revenue: dict[str | None, int] = defaultdict(int)
    credited_with_usd = 0
    for g in groups:
        sums["purchases"] += g.purchases
        sums["tokens_sold"] += g.tokens_sold
        sums["tokens_credited"] += g.tokens_credited
        sums["purchase_fee_tokens"] += g.purchase_fee_tokens
        sums["usd_cents"] += g.usd_cents
        sums["without_usd"] += g.without_usd
        credited_with_usd += g.credited_with_usd
        if g.currency is not None:
            revenue[g.currency] += g.amount_minor
    return sums, revenue, credited_with_usd


def _figures(
    purchases: Iterable[PurchaseGroup],
    usage: UsageFigures,
    journal: JournalFigures,
    users: UserCounts,
) -> PlatformFigures:
    sums, revenue, _ = _purchase_totals(purchases)
    revenue_micro_usd = sums["usd_cents"] * money.MICRO_USD_PER_CENT
    return PlatformFigures(
        purchases=sums["purchases"],
        tokens_sold=sums["tokens_sold"],
        tokens_credited=sums["tokens_credited"],
        purchase_fee_tokens=sums["purchase_fee_tokens"],
        revenue=[
            CurrencyAmount(currency, amount)
            for currency, amount in sorted(revenue.items())
            if currency is not None
        ],
        revenue_micro_usd=revenue_micro_usd,
        purchases_without_amount=sums["without_usd"],
        usage=usage,
        gross_margin_micro_usd=revenue_micro_usd - usage.provider_cost_micro_usd,
        journal=journal,
        users=users,
    )


def assemble(starts: list[datetime], rows: PlatformRows) -> PlatformAnalytics:
    """The analytics of the range whose periods start at `starts`, from the store's rows."""
    by_period: dict[datetime, list[PurchaseGroup]] = defaultdict(list)
    for group in rows.purchases:
        by_period[group.period].append(group)
    periods = [
        PlatformPeriod(
            start,
            _figures(
                by_period.get(start, []),
                rows.usage.get(start, UsageFigures()),
                rows.journal.get(start, JournalFigures()),
                rows.users.get(start, UserCounts()),
            ),
        )
        for start in starts
    ]
    usage_total = sum(rows.usage.values(), UsageFigures())
    journal_total = sum(rows.journal.values(), JournalFigures())
    totals = _figures(rows.purchases, usage_total, journal_total, rows.users_total)

    sums, _, credited_with_usd = _purchase_totals(rows.purchases)
    revenue_with_usd = sums["usd_cents"] * money.MICRO_USD_PER_CENT
    per_token = money.revenue_per_token(revenue_with_usd, credited_with_usd)

    def figures_of(usages: Iterable[ModelUsage]) -> list[ModelFigures]:
        return sorted(
            (
                ModelFigures(
                    m.provider,
                    m.model,
                    m.usage,
                    money.gross_margin(
                        m.usage.tokens_charged,
                        revenue_with_usd,
                        credited_with_usd,
                        m.usage.provider_cost_micro_usd,
                    ),
                )
                for m in usages
            ),
            key=lambda m: (-m.usage.tokens_charged, -m.usage.requests, m.provider, m.model),
        )

    models = figures_of(rows.models)
    order = {(m.provider, m.model): i for i, m in enumerate(models)}
    for period in periods:
        period.models.extend(
            sorted(
                figures_of(rows.period_models.get(period.start, [])),
                key=lambda m: order[m.provider, m.model],
            )
        )
    by_source: dict[str, list[PurchaseGroup]] = defaultdict(list)
    for group in rows.purchases:
        by_source[group.source].append(group)
    sources = []
    for source, groups in by_source.items():
        source_sums, _, _ = _purchase_totals(groups)
        sources.append(
            PurchaseSource(
                source,
                source_sums["purchases"],
                source_sums["tokens_sold"],
                source_sums["usd_cents"] * money.MICRO_USD_PER_CENT,
            )
        )
    sources.sort(key=lambda s: (-s.revenue_micro_usd, -s.tokens_sold, s.source))
    return PlatformAnalytics(
        periods=periods,
        totals=totals,
        models=models,
        top_users=rows.top_users,
        sources=sources,
        open_receivable_tokens=rows.open_receivable_tokens,
        open_holds=rows.open_holds,
        held_tokens=rows.held_tokens,
        revenue_per_token_micro_usd=per_token,
    )
