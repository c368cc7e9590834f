"""Operator reads across all users: platform analytics and a support lookup of one user.

The same use cases for both transports (GatewayAdmin over gRPC, /v1/admin over HTTP): each
checks the caller is an admin (the JWT's JWT_ADMIN_CLAIM holds JWT_ADMIN_VALUE), writes one
audit line (who, what, when: logger `rpcai.audit`, always on, whatever ACCESS_LOG says), then
asks the ledger, which owns the figures. A refused caller is audited too: an operator wants to
see who tried.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from gateway_service.auth import Identity
from gateway_service.errors import Failure, GatewayError
from gateway_service.ledger_client import LedgerClient
from gateway_service.validation import is_storable_id
from shared import observe
from shared.gen.rpcai.ledger.v1 import ledger_pb2 as lpb

audit = logging.getLogger("rpcai.audit")


@dataclass(frozen=True, slots=True)
class UserLookup:
    account: lpb.GetUserAccountResponse
    status: lpb.GetUserStatusResponse
    usage: lpb.GetUsageAnalyticsResponse
    purchases: lpb.GetPurchaseHistoryResponse


def _audit(caller: Identity | None, action: str, subject: str, allowed: bool) -> None:
    actor = caller.user_id if caller is not None else ""
    record = observe.current()
    fields: dict[str, object] = {
        "actor": actor,
        "action": action,
        "subject": subject,
        "allowed": allowed,
    }
    if record is not None:
        fields.update(request_id=record.request_id, trace_id=record.trace_id, method=record.method)
    audit.info(
        "admin read %s: actor=%r action=%s subject=%r",
        "allowed" if allowed else "refused",
        actor,
        action,
        subject,
        extra=fields,
    )


def require_admin(caller: Identity | None, action: str, subject: str) -> Identity:
    """The caller, when an admin; otherwise UNAUTHENTICATED (no token) or PERMISSION_DENIED.
    Either way one audit line says who asked for what."""
    allowed = caller is not None and caller.admin
    _audit(caller, action, subject, allowed)
    if caller is None:
        raise GatewayError(
            Failure.UNAUTHENTICATED, "AUTHENTICATION_REQUIRED", "sign in as an admin"
        )
    if not allowed:
        raise GatewayError(Failure.PERMISSION_DENIED, "ADMIN_REQUIRED", "this needs the admin role")
    return caller


def _user_id(user_id: str) -> str:
    if not user_id or not is_storable_id(user_id):
        raise GatewayError(
            Failure.INVALID_ARGUMENT,
            "INVALID_ARGUMENT",
            "user_id: must be a user id (1 to 256 printable characters)",
            {"field": "user_id"},
        )
    return user_id


class AdminDesk:
    def __init__(self, ledger: LedgerClient) -> None:
        self.ledger = ledger

    async def platform_analytics(
        self, caller: Identity | None, request: lpb.GetPlatformAnalyticsRequest
    ) -> lpb.GetPlatformAnalyticsResponse:
        subject = (
            f"{request.start.ToJsonString()}..{request.end.ToJsonString()}"
            f" by {lpb.Granularity.Name(request.granularity)}"
        )
        require_admin(caller, "platform_analytics", subject)
        return await self.ledger.call(self.ledger.stub.GetPlatformAnalytics, request)

    async def lookup_user(
        self,
        caller: Identity | None,
        user_id: str,
        usage_days: int = 0,
        include_history: bool = False,
        page_size: int = 0,
        page_token: str = "",
    ) -> UserLookup:
        """Everything support asks about one user, in one read (one audit line)."""
        require_admin(caller, "lookup_user", user_id[:256])
        _user_id(user_id)
        account, status, usage, purchases = await asyncio.gather(
            self._account(user_id),
            self.ledger.user_status(user_id),
            self.ledger.usage_analytics(user_id, usage_days, include_history),
            self.ledger.purchase_history(user_id, page_size, page_token),
        )
        return UserLookup(account, status, usage, purchases)

    async def user_account(
        self, caller: Identity | None, user_id: str
    ) -> tuple[lpb.GetUserAccountResponse, lpb.GetUserStatusResponse]:
        require_admin(caller, "user_account", user_id[:256])
        _user_id(user_id)
        return await asyncio.gather(self._account(user_id), self.ledger.user_status(user_id))

    async def user_usage(
        self, caller: Identity | None, user_id: str, days: int, include_history: bool
    ) -> lpb.GetUsageAnalyticsResponse:
        require_admin(caller, "user_usage", user_id[:256])
        return await self.ledger.usage_analytics(_user_id(user_id), days, include_history)

    async def user_purchases(
        self, caller: Identity | None, user_id: str, page_size: int, page_token: str
    ) -> lpb.GetPurchaseHistoryResponse:
        require_admin(caller, "user_purchases", user_id[:256])
        return await self.ledger.purchase_history(_user_id(user_id), page_size, page_token)

    async def _account(self, user_id: str) -> lpb.GetUserAccountResponse:
        return await self.ledger.call(
            self.ledger.stub.GetUserAccount, lpb.GetUserAccountRequest(user_id=user_id)
        )


# ---- ranges -----------------------------------------------------------------------------------

GRANULARITIES: dict[str, lpb.Granularity.ValueType] = {
    "hour": lpb.GRANULARITY_HOUR,
    "day": lpb.GRANULARITY_DAY,
    "month": lpb.GRANULARITY_MONTH,
}
_FIRST = datetime.min.replace(tzinfo=UTC)
_LAST = datetime.max.replace(tzinfo=UTC)
_LAST_SECOND = 253_402_300_799  # 9999-12-31T23:59:59Z, the last second a Timestamp holds


def truncate(moment: datetime, granularity: str) -> datetime:
    """The start of the UTC period (hour, day or month) that holds `moment`."""
    if granularity == "hour":
        return moment.replace(minute=0, second=0, microsecond=0)
    day = moment.replace(hour=0, minute=0, second=0, microsecond=0)
    return day if granularity == "day" else day.replace(day=1)


def shift(start: datetime, granularity: str, periods: int) -> datetime:
    """`periods` periods after (or, negative, before) `start`, within years 1..9999."""
    try:
        if granularity == "hour":
            return start + timedelta(hours=periods)
        if granularity == "day":
            return start + timedelta(days=periods)
        months = start.year * 12 + start.month - 1 + periods
        return start.replace(year=months // 12, month=months % 12 + 1)
    except (OverflowError, ValueError):
        return _LAST if periods > 0 else _FIRST


def _utc(moment: datetime) -> datetime:
    """`moment` in UTC; an offset that takes it past year 1 or 9999 stops there."""
    try:
        return moment.astimezone(UTC)
    except OverflowError:
        return _FIRST if moment.year == 1 else _LAST


def period_range(
    start: datetime | None, granularity: str, periods: int, now: datetime | None = None
) -> tuple[datetime, datetime]:
    """[start, end) of `periods` whole UTC periods from the one that holds `start`; without a
    start, the last `periods` periods up to the current one. Past the year 9999 the range
    stops there (fewer periods): a calendar has no later time to ask about."""
    if start is None:
        current = truncate(now or datetime.now(UTC), granularity)
        first = shift(current, granularity, 1 - periods)
    else:
        first = truncate(_utc(start), granularity)
    return first, shift(first, granularity, periods)


def analytics_request(
    start: datetime, end: datetime, granularity: str, top_users: int
) -> lpb.GetPlatformAnalyticsRequest:
    request = lpb.GetPlatformAnalyticsRequest(
        granularity=GRANULARITIES[granularity], top_users=top_users
    )
    request.start.FromDatetime(start)
    if end >= _LAST:
        request.end.FromSeconds(_LAST_SECOND)
        request.end.nanos = 999_999_999
    else:
        request.end.FromDatetime(end)
    return request
