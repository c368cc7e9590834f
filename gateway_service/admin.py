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
        require_admin(caller, "lookup_user", user_id[:256])
        _user_id(user_id)
        account, status, usage, purchases = await asyncio.gather(
            self.ledger.call(
                self.ledger.stub.GetUserAccount, lpb.GetUserAccountRequest(user_id=user_id)
            ),
            self.ledger.user_status(user_id),
            self.ledger.usage_analytics(user_id, usage_days, include_history),
            self.ledger.purchase_history(user_id, page_size, page_token),
        )
        return UserLookup(account, status, usage, purchases)
