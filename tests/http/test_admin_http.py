"""The operator's HTTP API (/v1/admin): who may read, what the figures are after real purchases
and calls, and the audit line each read leaves. Every JSON answer is checked against
/openapi.json by `Edge.call`."""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime
from typing import Any

import pytest

from shared.gen.rpcai.ledger.v1 import ledger_pb2 as lpb
from tests.conftest import AUTH
from tests.e2e.conftest import mint
from tests.http.conftest import Edge
from tests.ledger_service.helpers import new_key

ANALYTICS = "/v1/admin/analytics"


def admin(edge: Edge) -> dict[str, str]:
    return edge.user("ops-1", role="admin")[1]


async def buy(edge: Edge, user: str, tokens: int, cents: int | None) -> None:
    request = lpb.CreditPurchaseRequest(
        idempotency_key=new_key("buy"),
        user_id=user,
        tokens_purchased=tokens,
        purchase_type=lpb.PURCHASE_TYPE_ONE_TIME,
        external_id=new_key("order"),
        source="lemonsqueezy",
    )
    if cents is not None:
        request.payment.CopyFrom(lpb.Payment(currency="USD", amount_minor=cents))
    await edge.stack.ledger.stub.CreditPurchase(request, metadata=AUTH)


def audit_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [r.__dict__ for r in caplog.records if r.name == "rpcai.audit"]


async def test_the_figures_after_purchases_and_calls(
    edge: Edge, caplog: pytest.LogCaptureFixture
) -> None:
    alice, alice_auth = edge.user()
    bob, bob_auth = edge.user()
    await buy(edge, alice, 10_000, 1_999)
    await buy(edge, bob, 5_000, None)
    charged = 0
    for auth, content in ((alice_auth, "one"), (alice_auth, "two"), (bob_auth, "three")):
        reply = await edge.call(
            "POST", "/v1/generate", json_body={"content": content, "maxTokens": 20}, headers=auth
        )
        assert reply.status == 200, reply.body
        charged += reply.body["tokenUsage"]["tokensCharged"]
    caplog.set_level(logging.INFO, logger="rpcai.audit")

    reply = await edge.call(
        "GET", ANALYTICS, params={"periods": "1", "granularity": "day"}, headers=admin(edge)
    )
    assert reply.status == 200, reply.body
    today = datetime.now(UTC).strftime("%Y-%m-%dT00:00:00Z")
    assert reply.body["start"] == today
    assert [p["start"] for p in reply.body["periods"]] == [today]
    totals = reply.body["totals"]
    assert totals == reply.body["periods"][0]["figures"]
    assert totals["purchases"] == 2
    assert totals["tokensSold"] == 15_000
    assert totals["tokensCredited"] == 12_000
    assert totals["purchaseFeeTokens"] == 3_000
    assert totals["revenue"] == [{"currency": "USD", "amountMinor": 1_999}]
    assert (totals["revenueMicroUsd"], totals["revenueUsd"]) == (19_990_000, "19.990000")
    assert totals["purchasesWithoutAmount"] == 1
    assert totals["requests"] == 3
    assert totals["tokensCharged"] == charged
    assert totals["activeUsers"] == totals["subscriptionUsers"] == 2
    assert {u["userId"]: u["requests"] for u in reply.body["topUsers"]} == {alice: 2, bob: 1}
    assert reply.body["sources"] == [
        {
            "source": "lemonsqueezy",
            "purchases": 2,
            "tokensSold": 15_000,
            "revenueMicroUsd": 19_990_000,
            "revenueUsd": "19.990000",
        }
    ]
    assert reply.body["openHolds"] == 0

    # The support lookup agrees with what each user sees of themselves.
    for user, auth in ((alice, alice_auth), (bob, bob_auth)):
        mine = await edge.call("GET", "/v1/me/status", headers=auth)
        theirs = await edge.call("GET", f"/v1/admin/users/{user}", headers=admin(edge))
        assert theirs.status == 200, theirs.body
        assert theirs.body["known"] is True
        assert theirs.body["balance"]["availableTokens"] == mine.body["availableTokens"]
        assert theirs.body["holds"] == []
        for path, params in (("usage", {"include_history": "true"}), ("purchases", {})):
            own = await edge.call("GET", f"/v1/me/{path}", params=params, headers=auth)
            seen = await edge.call(
                "GET",
                f"/v1/admin/users/{user}/{path}",
                params=params,
                headers=admin(edge),
                documented=f"/v1/admin/users/{{userId}}/{path}",
            )
            assert seen.status == 200
            assert seen.body == own.body

    lines = audit_lines(caplog)
    assert [line["action"] for line in lines] == ["platform_analytics"] + [
        "user_account",
        "user_usage",
        "user_purchases",
    ] * 2
    assert all(line["actor"] == "ops-1" and line["allowed"] for line in lines)
    assert all(line["request_id"] for line in lines)


async def test_a_range_is_whole_utc_periods(edge: Edge) -> None:
    reply = await edge.call(
        "GET",
        ANALYTICS,
        params={"start": "2026-03-01T01:30:00+05:00", "periods": "3", "granularity": "hour"},
        headers=admin(edge),
    )
    assert reply.status == 200, reply.body
    assert (reply.body["start"], reply.body["end"]) == (
        "2026-02-28T20:00:00Z",
        "2026-02-28T23:00:00Z",
    )
    assert len(reply.body["periods"]) == 3
    # Past the end of the calendar the range stops there, with fewer periods.
    reply = await edge.call(
        "GET",
        ANALYTICS,
        params={"start": "9999-11-15T00:00:00Z", "periods": "744", "granularity": "month"},
        headers=admin(edge),
    )
    assert reply.status == 200, reply.body
    assert [p["start"] for p in reply.body["periods"]] == [
        "9999-11-01T00:00:00Z",
        "9999-12-01T00:00:00Z",
    ]


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"periods": "0"}, "periods"),
        ({"periods": "745"}, "periods"),
        ({"granularity": "week"}, "granularity"),
        ({"top_users": "101"}, "top_users"),
        ({"start": "2026-02-30T00:00:00Z"}, "start"),
        ({"start": "2026-12-01 00:00:00Z"}, "start"),
        ({"start": "2026-12-01T00:00:60Z"}, "start"),
        ({"start": "yesterday"}, "start"),
        ({"since": "2026-12-01T00:00:00Z"}, "since"),
    ],
)
async def test_a_bad_range_is_refused_naming_its_field(
    edge: Edge, params: dict[str, str], field: str
) -> None:
    reply = await edge.call("GET", ANALYTICS, params=params, headers=admin(edge))
    assert reply.status == 400
    assert reply.error["field"] == field


@pytest.mark.parametrize(
    ("claims", "status", "reason"),
    [
        ({}, 403, "ADMIN_REQUIRED"),
        ({"role": "administrator"}, 403, "ADMIN_REQUIRED"),
        ({"role": "admin", "exp": int(time.time()) - 3600}, 401, "TOKEN_EXPIRED"),
        (None, 401, "AUTHENTICATION_REQUIRED"),
    ],
    ids=["user", "another-role", "expired", "public"],
)
@pytest.mark.parametrize("path", [ANALYTICS, "/v1/admin/users/u-1", "/v1/admin/users/u-1/usage"])
async def test_everyone_else_is_refused(
    edge: Edge,
    caplog: pytest.LogCaptureFixture,
    claims: dict[str, Any] | None,
    status: int,
    reason: str,
    path: str,
) -> None:
    headers = {} if claims is None else {"Authorization": f"Bearer {mint('u-9', **claims)}"}
    caplog.set_level(logging.INFO, logger="rpcai.audit")
    reply = await edge.call(
        "GET", path, headers=headers, documented=path.replace("u-1", "{userId}")
    )
    assert (reply.status, reply.error["reason"]) == (status, reason)
    # A signed-in caller who is refused is audited; an invalid token never reaches the desk.
    assert [line["allowed"] for line in audit_lines(caplog)] == ([False] if status == 403 else [])


async def test_a_forged_admin_token_is_refused(edge: Edge) -> None:
    forged = mint("ops-1", secret="a-different-secret-that-is-long-enough!!", role="admin")
    reply = await edge.call("GET", ANALYTICS, headers={"Authorization": f"Bearer {forged}"})
    assert (reply.status, reply.error["reason"]) == (401, "INVALID_TOKEN")
