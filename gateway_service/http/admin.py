"""The operator's HTTP API, /v1/admin: platform analytics and a support lookup of one user.

Admins only (JWT_ADMIN_CLAIM / JWT_ADMIN_VALUE): anyone else signed in gets 403 ADMIN_REQUIRED.
Every read, allowed or refused, leaves one audit line (gateway_service.admin). The figures are
the ledger's (GetPlatformAnalytics, its ledger.proto comments define each one), in the API's
camelCase, each micro-dollar amount beside its exact decimal string of dollars.

A range is `periods` whole UTC periods from the one holding `start` (or, without it, the last
`periods` up to now): every value the document allows is a range the ledger answers, so the
document and the handler cannot disagree about a range that is "too long" or "backwards".
"""

from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone
from typing import Annotated, Literal

from aiohttp import web
from annotated_types import Interval
from pydantic import BeforeValidator, StringConstraints
from pydantic_core import PydanticCustomError
from typing_extensions import TypedDict

from gateway_service import admin
from gateway_service.admin import AdminDesk
from gateway_service.auth import Identity
from gateway_service.http import views
from gateway_service.http.api import Routes
from gateway_service.http.handlers import PurchasesQuery, UsageQuery
from gateway_service.http.shapes import (
    FROM_TEXT,
    PRINTABLE,
    PathParams,
    Query,
    Says,
    reply,
)
from gateway_service.http.views import Count, MicroUsd, Timestamp_, Usd, timestamp, usd
from gateway_service.validation import MAX_ID_CHARS
from shared.gen.rpcai.ledger.v1 import ledger_pb2 as lpb

ADMIN = web.AppKey("admin_desk", AdminDesk)
routes = Routes()

MAX_PERIODS = 744  # the ledger's cap: 31 days of hours
MAX_TOP_USERS = 100
ADMIN_ERRORS = {403: "the caller is not an admin (ADMIN_REQUIRED)", 503: "the ledger is down"}

# RFC 3339 `date-time` (section 5.6), exactly: what JSON Schema's "format": "date-time" means.
_RFC3339 = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})[Tt]([0-9]{2}):([0-9]{2}):([0-9]{2})(\.[0-9]+)?"
    r"(?:([Zz])|([+-])([0-9]{2}):([0-9]{2}))"
)
_TIME_PROBLEM = "must be an RFC 3339 date-time, e.g. 2026-12-01T00:00:00Z"


def _rfc3339(value: object) -> object:
    if not isinstance(value, str):
        return value
    found = _RFC3339.fullmatch(value)
    if found is None:
        raise PydanticCustomError("datetime_parsing", _TIME_PROBLEM)
    year, month, day, hour, minute, second = (int(found.group(i)) for i in range(1, 7))
    fraction = (found.group(7) or ".0")[1:7].ljust(6, "0")
    offset = timedelta(0)
    if found.group(9):
        offset_hours, offset_minutes = int(found.group(10)), int(found.group(11))
        if offset_hours > 23 or offset_minutes > 59:
            raise PydanticCustomError("datetime_parsing", _TIME_PROBLEM)
        offset = timedelta(hours=offset_hours, minutes=offset_minutes)
        offset = -offset if found.group(9) == "-" else offset
    try:
        return datetime(
            year, month, day, hour, minute, second, int(fraction), tzinfo=timezone(offset)
        )
    except ValueError:  # a month, day or time that does not exist (a leap second included)
        raise PydanticCustomError("datetime_parsing", _TIME_PROBLEM) from None


Rfc3339 = Annotated[datetime, BeforeValidator(_rfc3339), Says(datetime_parsing=_TIME_PROBLEM)]


class AnalyticsQuery(Query):
    start: Rfc3339 | None = None
    """the first period is the one holding this time (UTC periods); omitted: the last `periods`
    periods up to and including the current one"""
    periods: Annotated[int, Interval(ge=1, le=MAX_PERIODS), FROM_TEXT] = 30
    """how many periods (a range past the year 9999 stops there)"""
    granularity: Literal["hour", "day", "month"] = "day"
    top_users: Annotated[int, Interval(ge=1, le=MAX_TOP_USERS), FROM_TEXT] = 10
    """how many users to rank by tokens charged"""


UserId = Annotated[
    str,
    StringConstraints(min_length=1, max_length=MAX_ID_CHARS, pattern=PRINTABLE),
    Says(string_pattern_mismatch="must be printable", string_too_short="required"),
]


class UserPath(PathParams):
    user_id: UserId
    """the user's id (the JWT `sub` of their calls)"""


# ---- answers ----------------------------------------------------------------------------------


@reply
class CurrencyAmount(TypedDict):
    currency: str
    amount_minor: Count
    """in the currency's minor unit (cents for USD)"""


@reply
class PlatformFigures(TypedDict):
    purchases: Count
    tokens_sold: Count
    tokens_credited: Count
    purchase_fee_tokens: Count
    revenue: list[CurrencyAmount]
    revenue_micro_usd: MicroUsd
    revenue_usd: Usd
    purchases_without_amount: Count
    requests: Count
    provider_tokens_used: Count
    tokens_charged: Count
    usage_fee_tokens: Count
    provider_cost_micro_usd: MicroUsd
    """subscription calls (the platform pays for them); unknown-price calls not included"""
    provider_cost_usd: Usd
    unknown_cost_requests: Count
    byok_cost_micro_usd: MicroUsd
    byok_cost_usd: Usd
    gross_margin_micro_usd: MicroUsd
    gross_margin_usd: Usd
    tokens_refunded: Count
    shortfall_tokens: Count
    unbilled_tokens: Count
    active_users: Count
    subscription_users: Count
    byok_users: Count
    public_byok_requests: Count


@reply
class ModelFigures(TypedDict):
    provider: str
    model: str
    requests: Count
    provider_tokens_used: Count
    tokens_charged: Count
    usage_fee_tokens: Count
    provider_cost_micro_usd: MicroUsd
    provider_cost_usd: Usd
    unknown_cost_requests: Count
    byok_cost_micro_usd: MicroUsd
    byok_cost_usd: Usd
    gross_margin_micro_usd: MicroUsd
    gross_margin_usd: Usd


@reply
class PlatformPeriod(TypedDict):
    start: Timestamp_
    figures: PlatformFigures
    models: list[ModelFigures]
    """the period's calls by provider and model, in the range's order"""


@reply
class TopUser(TypedDict):
    user_id: str
    requests: Count
    tokens_charged: Count
    provider_tokens_used: Count


@reply
class PurchaseSource(TypedDict):
    source: str
    purchases: Count
    tokens_sold: Count
    revenue_micro_usd: MicroUsd
    revenue_usd: Usd


@reply
class PlatformAnalytics(TypedDict):
    """What the platform sold, earned and spent, and who used it, per period (UTC)."""

    start: Timestamp_
    end: Timestamp_
    """exclusive"""
    granularity: Literal["hour", "day", "month"]
    periods: list[PlatformPeriod]
    totals: PlatformFigures
    models: list[ModelFigures]
    top_users: list[TopUser]
    sources: list[PurchaseSource]
    open_receivable_tokens: Count
    """now: tokens users owe from refunds not yet collected"""
    open_holds: Count
    held_tokens: Count
    revenue_per_token_micro_usd: Count
    """what a credited token sold for over the range, rounded down (for display)"""
    revenue_per_token_usd: Usd


@reply
class Balance(TypedDict):
    available_tokens: Count
    reserved_tokens: Count
    owed_tokens: Count


@reply
class OpenHold(TypedDict):
    hold_id: str
    amount: Count
    created_at: Timestamp_
    expires_at: Timestamp_


@reply
class AdminUser(TypedDict):
    """One user, for support: balance, open holds, and what the ledger knows of them."""

    user_id: str
    known: bool
    """false: the ledger has never seen this user"""
    user_type: views.UserType
    has_subscription: bool
    has_purchases: bool
    balance: Balance
    holds: list[OpenHold]


def _figures(f: lpb.PlatformFigures) -> PlatformFigures:
    return PlatformFigures(
        purchases=f.purchases,
        tokens_sold=f.tokens_sold,
        tokens_credited=f.tokens_credited,
        purchase_fee_tokens=f.purchase_fee_tokens,
        revenue=[
            CurrencyAmount(currency=r.currency, amount_minor=r.amount_minor) for r in f.revenue
        ],
        revenue_micro_usd=f.revenue_micro_usd,
        revenue_usd=usd(f.revenue_micro_usd),
        purchases_without_amount=f.purchases_without_amount,
        requests=f.requests,
        provider_tokens_used=f.provider_tokens_used,
        tokens_charged=f.tokens_charged,
        usage_fee_tokens=f.usage_fee_tokens,
        provider_cost_micro_usd=f.provider_cost_micro_usd,
        provider_cost_usd=usd(f.provider_cost_micro_usd),
        unknown_cost_requests=f.unknown_cost_requests,
        byok_cost_micro_usd=f.byok_cost_micro_usd,
        byok_cost_usd=usd(f.byok_cost_micro_usd),
        gross_margin_micro_usd=f.gross_margin_micro_usd,
        gross_margin_usd=usd(f.gross_margin_micro_usd),
        tokens_refunded=f.tokens_refunded,
        shortfall_tokens=f.shortfall_tokens,
        unbilled_tokens=f.unbilled_tokens,
        active_users=f.active_users,
        subscription_users=f.subscription_users,
        byok_users=f.byok_users,
        public_byok_requests=f.public_byok_requests,
    )


def _model(m: lpb.ModelFigures) -> ModelFigures:
    return ModelFigures(
        provider=m.provider,
        model=m.model,
        requests=m.requests,
        provider_tokens_used=m.provider_tokens_used,
        tokens_charged=m.tokens_charged,
        usage_fee_tokens=m.usage_fee_tokens,
        provider_cost_micro_usd=m.provider_cost_micro_usd,
        provider_cost_usd=usd(m.provider_cost_micro_usd),
        unknown_cost_requests=m.unknown_cost_requests,
        byok_cost_micro_usd=m.byok_cost_micro_usd,
        byok_cost_usd=usd(m.byok_cost_micro_usd),
        gross_margin_micro_usd=m.gross_margin_micro_usd,
        gross_margin_usd=usd(m.gross_margin_micro_usd),
    )


def platform_analytics(
    a: lpb.GetPlatformAnalyticsResponse, request: lpb.GetPlatformAnalyticsRequest, granularity: str
) -> PlatformAnalytics:
    return PlatformAnalytics(
        start=timestamp(request.start),
        end=timestamp(request.end),
        granularity=granularity,  # type: ignore[typeddict-item]  # one of the query's literals
        periods=[
            PlatformPeriod(
                start=timestamp(p.start),
                figures=_figures(p.figures),
                models=[_model(m) for m in p.models],
            )
            for p in a.periods
        ],
        totals=_figures(a.totals),
        models=[_model(m) for m in a.models],
        top_users=[
            TopUser(
                user_id=u.user_id,
                requests=u.requests,
                tokens_charged=u.tokens_charged,
                provider_tokens_used=u.provider_tokens_used,
            )
            for u in a.top_users
        ],
        sources=[
            PurchaseSource(
                source=s.source,
                purchases=s.purchases,
                tokens_sold=s.tokens_sold,
                revenue_micro_usd=s.revenue_micro_usd,
                revenue_usd=usd(s.revenue_micro_usd),
            )
            for s in a.sources
        ],
        open_receivable_tokens=a.open_receivable_tokens,
        open_holds=a.open_holds,
        held_tokens=a.held_tokens,
        revenue_per_token_micro_usd=a.revenue_per_token_micro_usd,
        revenue_per_token_usd=usd(a.revenue_per_token_micro_usd),
    )


def admin_user(
    user_id: str, account: lpb.GetUserAccountResponse, status: lpb.GetUserStatusResponse
) -> AdminUser:
    return AdminUser(
        user_id=user_id,
        known=account.known,
        user_type=views.user_type(status.user_type),
        has_subscription=status.has_subscription,
        has_purchases=status.has_purchases,
        balance=Balance(
            available_tokens=account.balance.available_tokens,
            reserved_tokens=account.balance.reserved_tokens,
            owed_tokens=account.balance.owed_tokens,
        ),
        holds=[
            OpenHold(
                hold_id=h.hold_id,
                amount=h.amount,
                created_at=timestamp(h.created_at),
                expires_at=timestamp(h.expires_at),
            )
            for h in account.holds
        ],
    )


# ---- routes -----------------------------------------------------------------------------------


@routes.get(
    "/v1/admin/analytics",
    summary="Platform analytics across all users (admins)",
    errors=ADMIN_ERRORS,
)
async def analytics(
    request: web.Request, identity: Identity, query: AnalyticsQuery
) -> PlatformAnalytics:
    start, end = admin.period_range(query.start, query.granularity, query.periods)
    asked = admin.analytics_request(start, end, query.granularity, query.top_users)
    answer = await request.app[ADMIN].platform_analytics(identity, asked)
    return platform_analytics(answer, asked, query.granularity)


@routes.get(
    "/v1/admin/users/{userId}",
    summary="One user's balance and open holds (admins)",
    errors=ADMIN_ERRORS,
)
async def user_account(request: web.Request, identity: Identity, path: UserPath) -> AdminUser:
    account, status = await request.app[ADMIN].user_account(identity, path.user_id)
    return admin_user(path.user_id, account, status)


@routes.get(
    "/v1/admin/users/{userId}/usage",
    summary="One user's usage (admins)",
    errors=ADMIN_ERRORS,
)
async def user_usage(
    request: web.Request, identity: Identity, path: UserPath, query: UsageQuery
) -> views.UsageAnalytics:
    desk = request.app[ADMIN]
    usage = await desk.user_usage(identity, path.user_id, query.days, query.include_history)
    return views.usage_analytics(usage)


@routes.get(
    "/v1/admin/users/{userId}/purchases",
    summary="One user's purchases (admins)",
    errors=ADMIN_ERRORS,
)
async def user_purchases(
    request: web.Request, identity: Identity, path: UserPath, query: PurchasesQuery
) -> views.PurchasePage:
    desk = request.app[ADMIN]
    page = await desk.user_purchases(identity, path.user_id, query.page_size, query.page_token)
    return views.purchases(page)
