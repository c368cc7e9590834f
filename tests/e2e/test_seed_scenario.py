"""The seed scenario through both services: buy, a metered call, the same streamed, BYOK."""

from __future__ import annotations

from shared.gen.rpcai.gateway.v1 import gateway_pb2 as gpb
from tests.e2e.conftest import Stack
from tests.ledger_service.helpers import balance, credit

HUNDRED_TOKENS = "[[usage:40,60]] say something"


async def test_purchase_then_metered_call_then_stream(stack: Stack) -> None:
    user, auth = stack.user()
    await credit(stack.ledger.stub, user, 1000)
    status = await stack.stub.GetUserStatus(gpb.GetUserStatusRequest(), metadata=auth)
    assert status.available_tokens == 800
    assert status.user_type == gpb.USER_TYPE_SUBSCRIPTION

    reply = await stack.stub.GenerateText(
        gpb.GenerateTextRequest(content=HUNDRED_TOKENS, model="claude-haiku-4-5", max_tokens=100),
        metadata=auth,
    )
    assert (reply.usage.input_tokens, reply.usage.output_tokens) == (40, 60)
    assert reply.token_usage.tokens_charged == 125
    assert reply.token_usage.remaining_balance == 675
    assert reply.text
    assert not reply.HasField("usage_info")

    deltas: list[str] = []
    last = None
    async for message in stack.stub.StreamText(
        gpb.GenerateTextRequest(content=HUNDRED_TOKENS, model="gpt-4o", max_tokens=100),
        metadata=auth,
    ):
        if message.done:
            last = message
        else:
            deltas.append(message.delta)
    assert last is not None
    assert len(deltas) == 60
    assert last.token_usage.tokens_charged == 125
    assert last.token_usage.remaining_balance == 550
    b = await balance(stack.ledger.stub, user)
    assert (b.available_tokens, b.reserved_tokens) == (550, 0)


async def test_byok_call_touches_no_balance_and_shows_in_analytics(stack: Stack) -> None:
    user, auth = stack.user()
    await credit(stack.ledger.stub, user, 1000)
    reply = await stack.stub.GenerateText(
        gpb.GenerateTextRequest(
            content="[[usage:1000,500]] hi", model="gpt-4o", api_key="sk-caller-own-key"
        ),
        metadata=auth,
    )
    assert not reply.HasField("token_usage")
    assert reply.usage_info.tokens_used == 1500
    # gpt-4o: $2.50 / MTok in, $10 / MTok out -> 2500 + 5000 micro-USD
    assert reply.usage_info.estimated_cost_micro_usd == 7500
    assert (await balance(stack.ledger.stub, user)).available_tokens == 800
    analytics = await stack.stub.GetUsageAnalytics(
        gpb.GetUsageAnalyticsRequest(days=1, include_history=True), metadata=auth
    )
    assert analytics.summary.total_requests == 1
    assert analytics.summary.estimated_total_cost_micro_usd == 7500
    assert analytics.history[0].user_type == gpb.USER_TYPE_BYOK
    assert analytics.breakdown[0].model == "gpt-4o"
