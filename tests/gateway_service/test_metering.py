"""The rules of `gateway_service.metering`, alone: the hold bound against the worst tokenizer,
what is made storable, and the lease that keeps a hold alive and bounds its call."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway_service.errors import Failure, GatewayError
from gateway_service.metering import (
    CallCut,
    HoldLease,
    hold_estimate,
    input_token_bound,
    storable_count,
    storable_model,
)
from gateway_service.providers.base import CompletionRequest
from provider_sim.script import count_bytes_tokens

any_text = st.text(st.characters(codec="utf-8") | st.characters(categories=["Cs"]), max_size=400)


@given(content=any_text.filter(str.strip), system=any_text, max_tokens=st.integers(1, 128_000))
def test_the_bound_covers_a_tokenizer_that_spends_a_token_per_byte(
    content: str, system: str, max_tokens: int
) -> None:
    request = CompletionRequest(content, "m", max_tokens, system_prompt=system)
    sent = [system, content] if system else [content]
    assert input_token_bound(request) >= count_bytes_tokens(sent)
    assert hold_estimate(request) == input_token_bound(request) + max_tokens


def test_the_bound_of_a_japanese_prompt_is_its_bytes_not_its_characters() -> None:
    request = CompletionRequest("日本語" * 100, "m", 10)
    assert input_token_bound(request) >= 900  # 300 characters, 900 bytes


@pytest.mark.parametrize(
    ("echoed", "requested", "stored"),
    [
        ("claude-haiku-4-5", "x", "claude-haiku-4-5"),
        ("claude-\x00haiku", "x", "claude-haiku"),
        ("a" * 300, "x", "a" * 256),
        ("\n\t ", "gpt-4o", "gpt-4o"),
        ("", "\x07", "unknown"),
        ("\ud800", "gpt-4o", "gpt-4o"),
    ],
)
def test_echoed_model_names_are_made_storable(echoed: str, requested: str, stored: str) -> None:
    assert storable_model(echoed, requested) == stored


def test_counts_past_the_ledgers_bound_are_clamped() -> None:
    assert storable_count(10**12) == 10**9
    assert storable_count(-3) == 0
    assert storable_count(42) == 42


async def test_the_lease_extends_the_hold_and_moves_the_deadline() -> None:
    loop = asyncio.get_running_loop()
    extended: list[int] = []

    async def extend(ttl: int) -> None:
        extended.append(ttl)

    lease = HoldLease(extend, ttl=0.3, margin=0.1, started=loop.time(), max_seconds=10)
    lease.start()
    first = lease.cut_at
    # Runs well past the first deadline: each extension pushes it on.
    assert await lease.run(asyncio.sleep(0.8, "done")) == "done"
    lease.stop()
    assert len(extended) >= 3
    assert lease.cut_at > first + 0.5


async def test_a_lease_that_cannot_extend_cuts_the_call_before_the_hold_expires() -> None:
    loop = asyncio.get_running_loop()

    async def unavailable(ttl: int) -> None:
        raise GatewayError(Failure.UNAVAILABLE, "LEDGER_UNAVAILABLE", "down")

    started = loop.time()
    lease = HoldLease(unavailable, ttl=0.4, margin=0.1, started=started, max_seconds=10)
    lease.start()
    with pytest.raises(CallCut):
        await lease.run(asyncio.sleep(5))
    lease.stop()
    elapsed = loop.time() - started
    assert 0.25 <= elapsed < 0.4  # cut at expiry minus the margin, not after


async def test_a_hold_lost_meanwhile_cuts_the_call_at_once() -> None:
    loop = asyncio.get_running_loop()

    async def not_held(ttl: int) -> None:
        raise GatewayError(Failure.CONFLICT, "RESERVATION_NOT_HELD", "expired")

    started = loop.time()
    lease = HoldLease(not_held, ttl=0.9, margin=0.1, started=started, max_seconds=10)
    lease.start()
    with pytest.raises(CallCut):
        await lease.run(asyncio.sleep(5))
    lease.stop()
    assert loop.time() - started < 0.5  # at the first extension (a third of the TTL), not later


async def test_a_call_without_a_hold_is_bounded_by_its_length_only() -> None:
    loop = asyncio.get_running_loop()
    lease = HoldLease(None, ttl=0.1, margin=0.05, started=loop.time(), max_seconds=0.3)
    lease.start()
    assert await lease.run(asyncio.sleep(0.2, "ok")) == "ok"
    with pytest.raises(CallCut):
        await lease.run(asyncio.sleep(1))
    lease.stop()
