"""The seed flow over HTTP: buy 1000 (800 usable), a metered call charging 125 of them, the same
call streamed as SSE, then the caller's status, usage and purchases; and a BYOK call. Every
answer is checked against the OpenAPI document by the Edge client."""

from __future__ import annotations

from tests.e2e.e2e_support import wait_no_open_holds
from tests.http.conftest import Edge, SseEvent
from tests.ledger_service.helpers import balance, credit

HUNDRED_TOKENS = "[[usage:40,60]] hi"  # 40 in + 60 out = 100 used -> 125 charged


async def test_purchase_then_metered_call_then_stream(edge: Edge) -> None:
    user, auth = edge.user()
    await credit(edge.stack.ledger.stub, user, 1000)

    reply = await edge.call(
        "POST",
        "/v1/generate",
        json_body={"content": HUNDRED_TOKENS, "model": "claude-haiku-4-5", "maxTokens": 100},
        headers=auth,
    )
    assert reply.status == 200, reply.body
    assert reply.body["text"]
    assert reply.body["provider"] == "anthropic"
    assert reply.body["usage"] == {"inputTokens": 40, "outputTokens": 60}
    assert reply.body["tokenUsage"] == {
        "tokensCharged": 125,
        "remainingBalance": 675,
        "tokensUsed": 100,
        "feeTokens": 25,
        "settlementPending": False,
    }
    assert reply.body["usageInfo"] is None

    status, events = await edge.stream(
        {"content": HUNDRED_TOKENS, "model": "claude-haiku-4-5", "maxTokens": 100}, auth
    )
    assert status == 200
    assert isinstance(events, list)
    names = [e.event for e in events]
    assert names == ["delta"] * 60 + ["usage", "done"]
    text = "".join(e.data["text"] for e in events if e.event == "delta")
    assert text == reply.body["text"]  # the same words, streamed
    usage = events[-2].data
    assert usage["tokenUsage"]["tokensCharged"] == 125
    assert usage["tokenUsage"]["remainingBalance"] == 550
    assert usage["usage"] == {"inputTokens": 40, "outputTokens": 60}
    assert events[-1] == SseEvent("done", {})

    b = await balance(edge.stack.ledger.stub, user)
    assert (b.available_tokens, b.reserved_tokens) == (550, 0)
    await wait_no_open_holds(edge.stack.ledger)

    me = await edge.call("GET", "/v1/me/status", headers=auth)
    assert me.status == 200
    assert me.body == {
        "userType": "subscription",
        "hasSubscription": False,
        "hasPurchases": True,
        "availableTokens": 550,
        "reservedTokens": 0,
        "subscriptionTier": None,
        "quota": None,
        # The test stack runs without limits (tests.e2e.conftest.NO_LIMITS) and no quota.
        "limits": {
            "requestsPerMinute": 0,
            "tokensPerMinute": 0,
            "callsInFlight": 0,
            "requestsRemaining": 0,
            "tokensRemaining": 0,
            "callsInFlightNow": 0,
        },
        "month": {"quotaTokens": 0, "usedTokens": 0, "resetsAt": me.body["month"]["resetsAt"]},
    }

    usage_reply = await edge.call(
        "GET", "/v1/me/usage", headers=auth, params={"days": "30", "include_history": "true"}
    )
    assert usage_reply.status == 200
    summary = usage_reply.body["summary"]
    assert (summary["totalRequests"], summary["totalTokens"], summary["tokensCharged"]) == (
        2,
        200,
        250,
    )
    assert len(usage_reply.body["history"]) == 2
    assert {r["tokensCharged"] for r in usage_reply.body["history"]} == {125}
    assert {r["userType"] for r in usage_reply.body["history"]} == {"subscription"}
    without = await edge.call("GET", "/v1/me/usage", headers=auth)
    assert without.body["history"] == []
    assert without.body["summary"] == summary

    purchases = await edge.call("GET", "/v1/me/purchases", headers=auth)
    assert purchases.status == 200
    assert purchases.body["nextPageToken"] is None
    [bought] = purchases.body["purchases"]
    assert bought["purchaseType"] == "one_time"
    assert (bought["tokensPurchased"], bought["tokensCredited"]) == (1000, 800)
    assert bought["platformFeeTokens"] == 200


async def test_purchase_history_pages(edge: Edge) -> None:
    user, auth = edge.user()
    for tokens in (100, 200, 300):
        await credit(edge.stack.ledger.stub, user, tokens)
    first = await edge.call("GET", "/v1/me/purchases", headers=auth, params={"page_size": "2"})
    assert [p["tokensPurchased"] for p in first.body["purchases"]] == [300, 200]
    token = first.body["nextPageToken"]
    assert token
    second = await edge.call(
        "GET", "/v1/me/purchases", headers=auth, params={"page_size": "2", "page_token": token}
    )
    assert [p["tokensPurchased"] for p in second.body["purchases"]] == [100]
    assert second.body["nextPageToken"] is None


async def test_byok_call_is_tracked_with_a_usd_estimate(edge: Edge) -> None:
    user, auth = edge.user()
    await credit(edge.stack.ledger.stub, user, 1000)
    call = {"content": "[[usage:1000,500]] hi", "model": "gpt-4o", "apiKey": "sk-caller-own"}
    reply = await edge.call("POST", "/v1/generate", json_body=call, headers=auth)
    assert reply.status == 200, reply.body
    assert reply.body["tokenUsage"] is None
    # gpt-4o: $2.50 / MTok in, $10 / MTok out -> 2500 + 5000 micro-USD
    assert reply.body["usageInfo"] == {
        "tokensUsed": 1500,
        "estimatedCostMicroUsd": 7500,
        "estimatedCostUsd": "0.007500",
    }
    assert (await balance(edge.stack.ledger.stub, user)).available_tokens == 800

    usage = await edge.call(
        "GET", "/v1/me/usage", headers=auth, params={"days": "1", "include_history": "1"}
    )
    assert usage.body["summary"]["estimatedTotalCostUsd"] == "0.007500"
    [record] = usage.body["history"]
    assert record["userType"] == "byok"
    assert record["estimatedCostUsd"] == "0.007500"
    assert usage.body["breakdown"][0]["model"] == "gpt-4o"


async def test_public_caller_with_a_key_unknown_price_and_a_stream(edge: Edge) -> None:
    # No JWT at all: a BYOK call is served, nothing recorded; an unpriced model costs null.
    call = {"content": "[[usage:10,5]] hi", "model": "gpt-unpriced-test", "provider": "openai"}
    reply = await edge.call("POST", "/v1/generate", json_body={**call, "apiKey": "sk-own"})
    assert reply.status == 200, reply.body
    assert reply.body["usageInfo"] == {
        "tokensUsed": 15,
        "estimatedCostMicroUsd": None,
        "estimatedCostUsd": None,
    }
    status, events = await edge.stream({**call, "apiKey": "sk-own"})
    assert status == 200
    assert isinstance(events, list)
    assert [e.event for e in events[-2:]] == ["usage", "done"]
    assert events[-2].data["usageInfo"]["tokensUsed"] == 15


async def test_eligibility_for_every_kind_of_caller(edge: Edge) -> None:
    user, auth = edge.user()
    await credit(edge.stack.ledger.stub, user, 1000)
    ok = await edge.call(
        "POST", "/v1/eligibility", json_body={"estimatedTokens": 100}, headers=auth
    )
    assert ok.body == {
        "canMakeRequest": True,
        "reason": "",
        "userType": "subscription",
        "requiredTokens": 125,
        "availableTokens": 800,
    }
    too_big = await edge.call(
        "POST", "/v1/eligibility", json_body={"estimatedTokens": 700}, headers=auth
    )
    assert too_big.body["canMakeRequest"] is False
    assert too_big.body["reason"] == "insufficient balance"
    assert too_big.body["requiredTokens"] == 875

    public = await edge.call("POST", "/v1/eligibility", json_body={"estimatedTokens": 10})
    assert public.body["canMakeRequest"] is False
    assert public.body["userType"] == "unknown"
    byok = await edge.call("POST", "/v1/eligibility", json_body={"hasApiKey": True})
    assert byok.body["canMakeRequest"] is True
    assert byok.body["userType"] == "byok"


async def test_eligibility_of_the_call_itself_is_the_hold_it_takes(edge: Edge) -> None:
    user, auth = edge.user()
    await credit(edge.stack.ledger.stub, user, 1000)  # 800
    call = {"content": "[[usage:40,60]] héllo", "systemPrompt": "be brief", "maxTokens": 100}
    eligible = await edge.call("POST", "/v1/eligibility", json_body=call, headers=auth)
    assert eligible.status == 200
    # 22 + 8 bytes sent, 16 framing + 16 per message, 100 out: 178, plus 45 fee.
    assert eligible.body["requiredTokens"] == 223
    generated = await edge.call("POST", "/v1/generate", json_body=call, headers=auth)
    assert generated.status == 200
    conn = await edge.stack.ledger.db()
    try:
        held = await conn.fetchval("SELECT amount FROM holds WHERE user_id = $1", user)
    finally:
        await conn.close()
    assert held == 223


async def test_tier_and_quota_claims_reach_the_status(edge: Edge) -> None:
    _, auth = edge.user(tier="pro", quota=5000)
    me = await edge.call("GET", "/v1/me/status", headers=auth)
    assert me.status == 200
    assert (me.body["subscriptionTier"], me.body["quota"]) == ("pro", 5000)
    assert me.body["userType"] == "unknown"
    assert me.body["availableTokens"] == 0
