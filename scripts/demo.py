"""`make demo`: the product in one run, on its own throwaway stack (embedded Postgres under
.data/demo, the local provider, ledger and gateway as real processes):

buy 1000 tokens -> 800 usable; a metered call of 100 tokens -> 125 charged, 675 left; the same
call streamed; a BYOK call (balance untouched, cost estimated); the caller's analytics.
"""

from __future__ import annotations

import asyncio
import secrets
import sys
import time
import uuid
from pathlib import Path

import grpc
import jwt

from ledger_service.store.database import recreate_database, start_embedded, with_database
from shared import processes
from shared.gen.rpcai.gateway.v1 import gateway_pb2 as gpb
from shared.gen.rpcai.gateway.v1 import gateway_pb2_grpc
from shared.gen.rpcai.ledger.v1 import ledger_pb2 as lpb
from shared.gen.rpcai.ledger.v1 import ledger_pb2_grpc

PROMPT = "[[usage:40,60]] Tell me about the sea."  # the local provider reports 40 in + 60 out


async def walk_through(ledger_addr: str, gateway_addr: str, token: str, jwt_secret: str) -> None:
    user = f"demo-{uuid.uuid4().hex[:6]}"
    now = int(time.time())
    auth = (("authorization", f"Bearer {jwt.encode({'sub': user, 'exp': now + 600}, jwt_secret)}"),)
    async with (
        grpc.aio.insecure_channel(ledger_addr) as lch,
        grpc.aio.insecure_channel(gateway_addr) as gch,
    ):
        ledger = ledger_pb2_grpc.LedgerServiceStub(lch)
        gateway = gateway_pb2_grpc.AiGatewayStub(gch)
        bought = await ledger.CreditPurchase(
            lpb.CreditPurchaseRequest(
                idempotency_key=f"demo-{user}",
                user_id=user,
                tokens_purchased=1000,
                purchase_type=lpb.PURCHASE_TYPE_ONE_TIME,
                external_id=f"order-{user}",
                source="demo",
            ),
            metadata=(("authorization", f"Bearer {token}"),),
        )
        print(
            f"1. {user} buys 1000 tokens: {bought.tokens_credited} usable, "
            f"{bought.platform_fee_tokens} platform fee"
        )
        reply = await gateway.GenerateText(
            gpb.GenerateTextRequest(content=PROMPT, max_tokens=100), metadata=auth
        )
        u = reply.usage
        print(
            f"2. GenerateText ({reply.model}): {u.input_tokens}+{u.output_tokens} tokens used, "
            f"{reply.token_usage.tokens_charged} charged, "
            f"{reply.token_usage.remaining_balance} left"
        )
        print(f"   text: {reply.text[:60]}...")
        last = None
        deltas = 0
        async for message in gateway.StreamText(
            gpb.GenerateTextRequest(content=PROMPT, model="gpt-4o", max_tokens=100), metadata=auth
        ):
            deltas += 0 if message.done else 1
            last = message if message.done else last
        assert last is not None
        print(
            f"3. StreamText ({last.model}): {deltas} deltas, "
            f"{last.token_usage.tokens_charged} charged, "
            f"{last.token_usage.remaining_balance} left"
        )
        byok = await gateway.GenerateText(
            gpb.GenerateTextRequest(content=PROMPT, model="gpt-4o", api_key="sk-your-own-key"),
            metadata=auth,
        )
        print(
            f"4. BYOK call: {byok.usage_info.tokens_used} tokens, estimated cost "
            f"{byok.usage_info.estimated_cost_micro_usd} micro-USD; balance untouched"
        )
        stats = await gateway.GetUsageAnalytics(
            gpb.GetUsageAnalyticsRequest(days=30, include_history=True), metadata=auth
        )
        s = stats.summary
        print(
            f"5. analytics: {s.total_requests} calls, {s.total_tokens} tokens, "
            f"{s.tokens_charged} charged, {s.estimated_total_cost_micro_usd} micro-USD"
        )
        for b in stats.breakdown:
            print(
                f"   {b.provider}/{b.model}: {b.summary.total_requests} calls, "
                f"{b.summary.tokens_charged} charged"
            )
        status = await gateway.GetUserStatus(gpb.GetUserStatusRequest(), metadata=auth)
        print(
            f"6. status: {gpb.UserType.Name(status.user_type)}, "
            f"{status.available_tokens} tokens available"
        )


def main() -> int:
    admin = with_database(start_embedded(Path(".data/demo")), "postgres")
    url = recreate_database(admin, "rpcai_demo")
    token, jwt_secret = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
    started: list[processes.Service] = []
    try:
        ledger = processes.start(
            "ledger_service",
            {"DATABASE_URL": url, "LEDGER_ADDR": "127.0.0.1:0", "LEDGER_SERVICE_TOKEN": token,
             "LOG_LEVEL": "WARNING"},
        )  # fmt: skip
        started.append(ledger)
        sim = processes.start("provider_sim", {"PROVIDER_SIM_ADDR": "127.0.0.1:0"})
        started.append(sim)
        gateway = processes.start(
            "gateway_service",
            {
                "GATEWAY_ADDR": "127.0.0.1:0",
                "HTTP_ADDR": "127.0.0.1:0",
                "LEDGER_ADDR": ledger.address,
                "LEDGER_SERVICE_TOKEN": token,
                "JWT_SECRET": jwt_secret,
                "ANTHROPIC_BASE_URL": f"http://{sim.address}",
                "ANTHROPIC_API_KEY": "sim-platform-key",
                "OPENAI_BASE_URL": f"http://{sim.address}/v1",
                "OPENAI_API_KEY": "sim-platform-key",
                "DATA_DIR": ".data/demo",
                "LOG_LEVEL": "WARNING",
            },
        )
        started.append(gateway)
        asyncio.run(walk_through(ledger.address, gateway.address, token, jwt_secret))
    finally:
        for service in reversed(started):
            service.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
