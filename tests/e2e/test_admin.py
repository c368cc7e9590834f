"""Operator reads over gRPC (GatewayAdmin): who may read, what they get, and the audit line each
read leaves. The HTTP face (/v1/admin) is tested in tests/http/test_admin_http.py."""

from __future__ import annotations

import logging
import time
from typing import Any

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from shared.gen.rpcai.gateway.v1 import admin_pb2 as apb
from shared.gen.rpcai.gateway.v1 import admin_pb2_grpc
from shared.gen.rpcai.gateway.v1 import gateway_pb2 as gpb
from shared.gen.rpcai.ledger.v1 import ledger_pb2 as lpb
from shared.rich_errors import error_reason
from tests.conftest import LedgerHarness
from tests.e2e.conftest import Stack, bearer, mint
from tests.e2e.e2e_support import gateway_on
from tests.ledger_service.helpers import credit


@pytest.fixture
async def admin_stack(stack: Stack) -> Stack:
    return stack  # every test stack has the role (tests/e2e/conftest.py: "role": "admin")


def admin_stub(stack: Stack) -> admin_pb2_grpc.GatewayAdminAsyncStub:
    return admin_pb2_grpc.GatewayAdminStub(stack.channel)


def today_range() -> lpb.GetPlatformAnalyticsRequest:
    start, end = Timestamp(), Timestamp()
    now = int(time.time())
    start.FromSeconds(now - now % 86400)
    end.FromSeconds(now - now % 86400 + 86400)
    return lpb.GetPlatformAnalyticsRequest(start=start, end=end, granularity=lpb.GRANULARITY_DAY)


def audit_lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "rpcai.audit"]


async def test_an_admin_reads_a_user_and_the_platform_each_read_audited(
    admin_stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    stub = admin_stub(admin_stack)
    user, auth = admin_stack.user()
    await credit(admin_stack.ledger.stub, user, 10_000)
    reply = await admin_stack.stub.GenerateText(
        gpb.GenerateTextRequest(content="hello", max_tokens=20), metadata=auth
    )
    admin_token = mint("ops-1", role="admin")
    caplog.set_level(logging.INFO, logger="rpcai.audit")

    found = await stub.LookupUser(
        apb.LookupUserRequest(user_id=user, include_history=True), metadata=bearer(admin_token)
    )
    assert found.account.known
    assert found.account.balance.available_tokens == reply.token_usage.remaining_balance
    assert found.account.balance.available_tokens == 8_000 - reply.token_usage.tokens_charged
    assert list(found.account.holds) == []
    assert found.status.has_purchases
    assert found.usage.summary.total_requests == 1
    assert found.usage.summary.tokens_charged == reply.token_usage.tokens_charged
    assert [p.tokens_purchased for p in found.purchases.purchases] == [10_000]

    figures = await stub.GetPlatformAnalytics(today_range(), metadata=bearer(admin_token))
    assert figures.totals.requests >= 1
    assert figures.totals.tokens_charged >= reply.token_usage.tokens_charged

    lines = audit_lines(caplog)
    assert [(r.__dict__["action"], r.__dict__["actor"], r.__dict__["allowed"]) for r in lines] == [
        ("lookup_user", "ops-1", True),
        ("platform_analytics", "ops-1", True),
    ]
    assert lines[0].__dict__["subject"] == user
    assert all(admin_token not in r.getMessage() for r in lines)


async def test_an_admin_role_in_a_list_claim_is_an_admin(admin_stack: Stack) -> None:
    token = mint("ops-2", role=["reader", "admin"])
    found = await admin_stub(admin_stack).LookupUser(
        apb.LookupUserRequest(user_id="nobody-yet"), metadata=bearer(token)
    )
    assert not found.account.known
    assert found.account.balance.available_tokens == 0


@pytest.mark.parametrize(
    ("token", "code", "reason"),
    [
        (lambda: mint("u-1"), grpc.StatusCode.PERMISSION_DENIED, "ADMIN_REQUIRED"),
        (lambda: mint("u-2", role="Admin"), grpc.StatusCode.PERMISSION_DENIED, "ADMIN_REQUIRED"),
        (lambda: mint("u-3", role="admins"), grpc.StatusCode.PERMISSION_DENIED, "ADMIN_REQUIRED"),
        (lambda: mint("u-4", role=True), grpc.StatusCode.PERMISSION_DENIED, "ADMIN_REQUIRED"),
        (
            lambda: mint("u-5", role="admin", exp=int(time.time()) - 3600),
            grpc.StatusCode.UNAUTHENTICATED,
            "TOKEN_EXPIRED",
        ),
        (
            lambda: mint("u-6", secret="another-secret-that-is-long-enough-for-hs", role="admin"),
            grpc.StatusCode.UNAUTHENTICATED,
            "INVALID_TOKEN",
        ),
        (lambda: None, grpc.StatusCode.UNAUTHENTICATED, "AUTHENTICATION_REQUIRED"),
    ],
    ids=["user", "case-variant", "longer-value", "boolean", "expired", "forged", "public"],
)
async def test_everyone_else_is_refused(
    admin_stack: Stack,
    caplog: pytest.LogCaptureFixture,
    token: Any,
    code: grpc.StatusCode,
    reason: str,
) -> None:
    stub = admin_stub(admin_stack)
    value = token()
    metadata = bearer(value) if value else ()
    caplog.set_level(logging.INFO, logger="rpcai.audit")
    for call in (
        stub.LookupUser(apb.LookupUserRequest(user_id="someone"), metadata=metadata),
        stub.GetPlatformAnalytics(today_range(), metadata=metadata),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await call
        assert refused.value.code() == code
        assert error_reason(refused.value) == reason
    # A caller who is refused is audited; a token that is not valid never reaches the desk.
    audited = reason in ("ADMIN_REQUIRED", "AUTHENTICATION_REQUIRED")
    allowed = [r.__dict__["allowed"] for r in audit_lines(caplog)]
    assert allowed == ([False, False] if audited else [])


async def test_without_the_admin_settings_nobody_is_an_admin(
    ledger: LedgerHarness, sim_url: str
) -> None:
    unset = {"jwt_admin_claim": None, "jwt_admin_value": None}
    async with gateway_on(ledger, sim_url, **unset) as stack:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await admin_stub(stack).LookupUser(
                apb.LookupUserRequest(user_id="someone"),
                metadata=bearer(mint("ops", role="admin")),
            )
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_a_lookup_needs_a_user_id(admin_stack: Stack) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await admin_stub(admin_stack).LookupUser(
            apb.LookupUserRequest(user_id=""), metadata=bearer(mint("ops", role="admin"))
        )
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
