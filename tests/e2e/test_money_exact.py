"""A served call is always paid in full, through the whole stack on real sockets.

The provider stand-in is told to count the worst a real tokenizer can (one token per UTF-8 byte,
plus framing: `[[tokenizer:bytes]]`). Holds must still cover every call: for prompts of any
Unicode, the hold covers the usage the provider reports; on a tight balance, sequential and
concurrent calls serve at most what the balance covers, each charged exactly, nothing unbilled.
What a provider echoes back that the ledger would not store is made storable, not left free.
"""

from __future__ import annotations

import asyncio
import uuid

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared.gen.rpcai.gateway.v1 import gateway_pb2 as gpb
from tests.conftest import LedgerHarness
from tests.e2e.conftest import Stack, bearer, mint
from tests.e2e.e2e_support import (
    MODELS,
    Sim,
    assert_audit_ok,
    charge_for,
    fetchval,
    held_for,
    own_sim,
    purchase_for,
    rpc_error,
    sim_stack,
    usage_rows,
)
from tests.ledger_service.helpers import balance, credit

__all__ = ["own_sim", "sim_stack"]  # fixtures used by this module

BYTES = "[[tokenizer:bytes]] "
# Text the way people write it: CJK, emoji (some of several code points), combining marks,
# right-to-left scripts, and plain ASCII. Surrogates cannot travel in a protobuf string.
unicode_text = st.text(
    alphabet=st.one_of(
        st.characters(min_codepoint=0x4E00, max_codepoint=0x9FFF),  # CJK
        st.characters(min_codepoint=0x1F300, max_codepoint=0x1FAFF),  # emoji
        st.characters(min_codepoint=0x0300, max_codepoint=0x036F),  # combining marks
        st.characters(min_codepoint=0x0590, max_codepoint=0x06FF),  # Hebrew, Arabic
        st.sampled_from(["\u200d", "\ufe0f", "é", "ß", " "]),
        st.characters(codec="utf-8", exclude_categories=["Cs"]),
    ),
    min_size=1,
    max_size=300,
)


async def _unbilled(ledger: LedgerHarness) -> int:
    total: int = await fetchval(
        ledger, "SELECT coalesce(-sum(amount), 0) FROM journal_entries WHERE account_id = 6"
    )
    return total


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(content=unicode_text, system=st.one_of(st.just(""), unicode_text))
async def test_the_hold_covers_what_a_byte_counting_provider_reports(
    sim_stack: Stack, content: str, system: str
) -> None:
    user = f"uni-{uuid.uuid4().hex[:8]}"
    await credit(sim_stack.ledger.stub, user, 10**7)
    auth = bearer(mint(user))
    for model in MODELS.values():
        reply = await sim_stack.stub.GenerateText(
            gpb.GenerateTextRequest(
                content=BYTES + content, system_prompt=system, model=model, max_tokens=8
            ),
            metadata=auth,
        )
        used = reply.usage.input_tokens + reply.usage.output_tokens
        assert reply.token_usage.tokens_charged == charge_for(used)
    conn = await sim_stack.ledger.db()
    try:
        rows = await conn.fetch(
            "SELECT h.amount, h.overrun, u.tokens_charged FROM holds h"
            " JOIN usage_records u ON u.hold_id = h.id WHERE h.user_id = $1",
            user,
        )
    finally:
        await conn.close()
    assert len(rows) == len(MODELS)
    for row in rows:
        assert row["tokens_charged"] <= row["amount"], (content, system)
        assert row["overrun"] == 0
    assert await _unbilled(sim_stack.ledger) == 0


# A Japanese prompt: 3 bytes a character, where characters / 4 would guess a quarter token.
JAPANESE = BYTES + "日本語で丁寧に答えてください。東京の天気はどうですか。" * 3
MAX_TOKENS = 20


async def _one_call_charge(stack: Stack) -> int:
    """What one such call is charged (the stand-in's usage is fixed by the prompt)."""
    user, auth = stack.user()
    await credit(stack.ledger.stub, user, 10**6)
    reply = await stack.stub.GenerateText(
        gpb.GenerateTextRequest(content=JAPANESE, max_tokens=MAX_TOKENS), metadata=auth
    )
    used = reply.usage.input_tokens + reply.usage.output_tokens
    assert used > len(JAPANESE)  # far more tokens than characters: chars/4 would be far off
    return charge_for(used)


async def test_a_tight_balance_serves_at_most_what_it_covers_sequentially(
    sim_stack: Stack,
) -> None:
    charge = await _one_call_charge(sim_stack)
    assert charge <= held_for(JAPANESE, MAX_TOKENS)
    calls = 3
    credited = purchase_for(calls * charge)
    user, auth = sim_stack.user()
    await credit(sim_stack.ledger.stub, user, credited)
    served = 0
    for _ in range(calls + 2):
        [outcome] = await asyncio.gather(
            sim_stack.stub.GenerateText(
                gpb.GenerateTextRequest(content=JAPANESE, max_tokens=MAX_TOKENS), metadata=auth
            ),
            return_exceptions=True,
        )
        if isinstance(outcome, gpb.GenerateTextResponse):
            assert outcome.token_usage.tokens_charged == charge
            served += 1
        else:
            assert rpc_error(outcome) == (
                grpc.StatusCode.FAILED_PRECONDITION,
                "INSUFFICIENT_BALANCE",
            )
    assert 1 <= served <= calls
    b = await balance(sim_stack.ledger.stub, user)
    assert calls * charge - b.available_tokens == served * charge
    assert b.reserved_tokens == 0
    assert await _unbilled(sim_stack.ledger) == 0
    await assert_audit_ok(sim_stack.ledger)


async def test_a_tight_balance_serves_at_most_what_it_covers_concurrently(
    sim_stack: Stack, own_sim: Sim
) -> None:
    charge = await _one_call_charge(sim_stack)
    calls = 30
    user, auth = sim_stack.user()
    await credit(sim_stack.ledger.stub, user, purchase_for(calls * charge))
    before = own_sim.stats.requests
    outcomes = await asyncio.gather(
        *(
            sim_stack.stub.GenerateText(
                gpb.GenerateTextRequest(content=JAPANESE, max_tokens=MAX_TOKENS), metadata=auth
            )
            for _ in range(100)
        ),
        return_exceptions=True,
    )
    answered = [o for o in outcomes if isinstance(o, gpb.GenerateTextResponse)]
    for refused in (o for o in outcomes if not isinstance(o, gpb.GenerateTextResponse)):
        assert rpc_error(refused) == (grpc.StatusCode.FAILED_PRECONDITION, "INSUFFICIENT_BALANCE")
    assert 1 <= len(answered) <= calls
    assert all(a.token_usage.tokens_charged == charge for a in answered)
    assert own_sim.stats.requests == before + len(answered)  # no refused call reached it
    b = await balance(sim_stack.ledger.stub, user)
    assert calls * charge - b.available_tokens == len(answered) * charge
    assert b.reserved_tokens == 0
    assert await _unbilled(sim_stack.ledger) == 0
    await assert_audit_ok(sim_stack.ledger)


async def test_a_model_name_the_ledger_would_refuse_is_made_storable_and_charged(
    sim_stack: Stack,
) -> None:
    """The stand-in echoes the model it was asked for: longer than the ledger stores. (Control
    characters in an echo are made printable the same way: see test_metering; a request that
    sends them is refused before any call.)"""
    user, auth = sim_stack.user()
    await credit(sim_stack.ledger.stub, user, 1000)
    weird = "claude-" + "x" * 400
    reply = await sim_stack.stub.GenerateText(
        gpb.GenerateTextRequest(
            content="[[usage:40,60]] hi", provider="anthropic", model=weird, max_tokens=100
        ),
        metadata=auth,
    )
    assert not reply.token_usage.settlement_pending
    assert reply.token_usage.tokens_charged == 125
    [row] = await usage_rows(sim_stack.ledger, user)
    assert row.tokens_charged == 125
    model = await fetchval(
        sim_stack.ledger, "SELECT model FROM usage_records WHERE user_id = $1", user
    )
    assert model.startswith("claude-x")
    assert len(model) == 256
    assert (
        await fetchval(
            sim_stack.ledger,
            "SELECT count(*) FROM holds WHERE user_id = $1 AND status = 'held'",
            user,
        )
        == 0
    )
    await assert_audit_ok(sim_stack.ledger)


async def test_a_key_refused_for_its_balance_is_served_after_a_top_up(sim_stack: Stack) -> None:
    user, auth = sim_stack.user()
    request = gpb.GenerateTextRequest(
        content="[[usage:40,60]] hi", max_tokens=100, idempotency_key="after-top-up"
    )
    await credit(sim_stack.ledger.stub, user, 100)  # 80: not enough
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await sim_stack.stub.GenerateText(request, metadata=auth)
    assert rpc_error(err.value) == (grpc.StatusCode.FAILED_PRECONDITION, "INSUFFICIENT_BALANCE")
    await credit(sim_stack.ledger.stub, user, 1000)
    reply = await sim_stack.stub.GenerateText(request, metadata=auth)
    assert reply.token_usage.tokens_charged == 125
    again = await sim_stack.stub.GenerateText(request, metadata=auth)
    assert again == reply
    assert (await balance(sim_stack.ledger.stub, user)).available_tokens == 80 + 800 - 125


async def test_eligibility_reports_the_hold_the_same_call_takes(sim_stack: Stack) -> None:
    user, auth = sim_stack.user()
    await credit(sim_stack.ledger.stub, user, 10_000)
    system = "Réponds brièvement 🙂"
    eligible = await sim_stack.stub.CheckRequestEligibility(
        gpb.CheckRequestEligibilityRequest(content=JAPANESE, system_prompt=system, max_tokens=50),
        metadata=auth,
    )
    assert eligible.can_make_request
    assert eligible.required_tokens == held_for(JAPANESE, 50, system)
    await sim_stack.stub.GenerateText(
        gpb.GenerateTextRequest(content=JAPANESE, system_prompt=system, max_tokens=50),
        metadata=auth,
    )
    held = await fetchval(sim_stack.ledger, "SELECT amount FROM holds WHERE user_id = $1", user)
    assert held == eligible.required_tokens
