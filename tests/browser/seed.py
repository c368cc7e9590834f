"""Something for the pages to show, made through the real APIs: purchases credited (and one
refunded) by the ledger with their payments, calls through POST /v1/generate (metered, BYOK and
public BYOK) on two providers.

`Seeded` also holds what the figures must be, computed here from the money rule (a call of U
provider tokens costs U + ceil(U/4)) rather than read back from the stack."""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass
from decimal import Decimal

from shared.gen.rpcai.ledger.v1 import ledger_pb2 as lpb
from tests.browser.conftest import Site
from tests.conftest import AUTH
from tests.e2e.e2e_support import charge_for, wait_no_open_holds

PRICE_CENTS = 999  # every purchase here is paid $9.99


@dataclass(frozen=True)
class Call:
    provider: str
    model: str
    input_tokens: int
    output_tokens: int
    byok: bool = False

    @property
    def used(self) -> int:
        return self.input_tokens + self.output_tokens

    @property
    def charged(self) -> int:
        return 0 if self.byok else charge_for(self.used)


HAIKU = Call("anthropic", "claude-haiku-4-5", 40, 60)
GPT = Call("openai", "gpt-4o", 100, 50)
GPT_BYOK = Call("openai", "gpt-4o", 30, 20, byok=True)

ALICE_CALLS = (HAIKU, HAIKU, HAIKU, GPT, GPT, GPT_BYOK)
BOB_CALLS = (HAIKU,) * 5


@dataclass(frozen=True)
class Seeded:
    alice: str
    alice_token: str
    bob: str
    bob_token: str
    alice_available: int  # computed, not read back
    requests: int  # every call, public BYOK included
    tokens_charged: int
    tokens_sold: int
    purchases: int
    revenue_usd: Decimal


async def credit(site: Site, user: str, tokens: int) -> str:
    answer = await site.ledger.stub.CreditPurchase(
        lpb.CreditPurchaseRequest(
            idempotency_key=f"buy-{uuid.uuid4().hex}",
            user_id=user,
            tokens_purchased=tokens,
            purchase_type=lpb.PURCHASE_TYPE_ONE_TIME,
            external_id=f"order-{uuid.uuid4().hex}",
            source="lemonsqueezy",
            payment=lpb.Payment(
                currency="USD", amount_minor=PRICE_CENTS, amount_usd_cents=PRICE_CENTS
            ),
        ),
        metadata=AUTH,
    )
    purchase_id: str = answer.purchase_id
    return purchase_id


async def refund(site: Site, purchase_id: str, tokens: int) -> lpb.RefundPurchaseResponse:
    answer: lpb.RefundPurchaseResponse = await site.ledger.stub.RefundPurchase(
        lpb.RefundPurchaseRequest(
            idempotency_key=f"refund-{uuid.uuid4().hex}",
            purchase_id=purchase_id,
            tokens_to_refund=tokens,
        ),
        metadata=AUTH,
    )
    return answer


async def call(site: Site, token: str | None, c: Call) -> None:
    body: dict[str, object] = {
        "content": f"[[usage:{c.input_tokens},{c.output_tokens}]] hi",
        "provider": c.provider,
        "model": c.model,
        "maxTokens": 100,
    }
    if c.byok:
        body["apiKey"] = "sk-own-key"
    answer = await site.post_json("/v1/generate", body, token)
    assert answer["usage"] == {"inputTokens": c.input_tokens, "outputTokens": c.output_tokens}


async def wait_usage(site: Site, token: str, requests: int, within: float = 10.0) -> None:
    """Usage records arrive after the answer (settled or recorded through the outbox)."""
    deadline = time.monotonic() + within
    while True:
        usage = await site.get_json("/v1/me/usage", token, days="30")
        if usage["summary"]["totalRequests"] == requests or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.05)
    assert usage["summary"]["totalRequests"] == requests, usage["summary"]


async def seed(site: Site) -> Seeded:
    alice, bob = f"alice-{uuid.uuid4().hex[:6]}", f"bob-{uuid.uuid4().hex[:6]}"
    alice_token, bob_token = site.token(alice), site.token(bob)

    await credit(site, alice, 1000)  # 800 usable
    second = await credit(site, alice, 2000)  # 1600 usable
    for c in ALICE_CALLS:
        await call(site, alice_token, c)
    refunded = await refund(site, second, 500)  # 400 of the credit taken back, no shortfall
    assert refunded.shortfall_tokens == 0

    bobs = await credit(site, bob, 1000)  # 800 usable
    for c in BOB_CALLS:
        await call(site, bob_token, c)
    # Bob spent 625 of his 800: a full refund takes 175 and leaves him owing the rest.
    refunded = await refund(site, bobs, 0)
    assert refunded.shortfall_tokens == sum(c.charged for c in BOB_CALLS)

    await call(site, None, GPT_BYOK)  # a public BYOK call: no account
    await wait_usage(site, alice_token, len(ALICE_CALLS))
    await wait_usage(site, bob_token, len(BOB_CALLS))
    await wait_no_open_holds(site.ledger)

    all_calls = (*ALICE_CALLS, *BOB_CALLS, GPT_BYOK)
    return Seeded(
        alice=alice,
        alice_token=alice_token,
        bob=bob,
        bob_token=bob_token,
        alice_available=800 + 1600 - sum(c.charged for c in ALICE_CALLS) - 400,
        requests=len(all_calls),
        tokens_charged=sum(c.charged for c in all_calls),
        tokens_sold=1000 + 2000 + 1000,
        purchases=3,
        revenue_usd=Decimal(3 * PRICE_CENTS) / 100,
    )
