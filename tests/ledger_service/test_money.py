"""The money rules of ledger_service.domain.money as properties, against a Fraction reference.

Every rule is restated here with exact rational arithmetic (fractions.Fraction, math.floor and
math.ceil of a Fraction are exact), so an integer shortcut in the code that is off by one for some
input, or that uses a float anywhere, fails here.
"""

from __future__ import annotations

import itertools
import math
from fractions import Fraction

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from ledger_service.domain import money
from ledger_service.domain.ledger import MAX_TOKENS_PER_CALL, MAX_TOKENS_PER_PURCHASE

purchases = st.integers(min_value=1, max_value=MAX_TOKENS_PER_PURCHASE)
shares = st.integers(min_value=0, max_value=100)
fee_percents = st.integers(min_value=0, max_value=1000)
# One call's usage is input + output, each up to MAX_TOKENS_PER_CALL.
usages = st.integers(min_value=0, max_value=2 * MAX_TOKENS_PER_CALL)
estimates = st.integers(min_value=1, max_value=MAX_TOKENS_PER_CALL)


def ref_credited(tokens: int, share: int) -> int:
    return math.floor(Fraction(tokens * share, 100))


def ref_fee(tokens_used: int, percent: int) -> int:
    return math.ceil(Fraction(tokens_used * percent, 100))


# --- purchases ---------------------------------------------------------------------------------


@given(tokens=purchases, share=shares)
@example(tokens=1000, share=80)
@example(tokens=1, share=80)
@example(tokens=MAX_TOKENS_PER_PURCHASE, share=99)
def test_purchase_legs_add_up_and_the_user_gets_the_floor(tokens: int, share: int) -> None:
    credited, fee = money.split_purchase(tokens, share)
    assert credited + fee == tokens
    assert credited == ref_credited(tokens, share)
    assert credited >= 0
    assert fee >= 0
    assert isinstance(credited, int)
    assert isinstance(fee, int)


def test_purchase_examples_from_the_design() -> None:
    assert money.split_purchase(1000, 80) == (800, 200)
    assert money.split_purchase(999, 80) == (799, 200)  # 799.2 -> 799: the rounding is the fee's
    assert money.split_purchase(1, 80) == (0, 1)
    assert money.split_purchase(5, 100) == (5, 0)
    assert money.split_purchase(5, 0) == (0, 5)


# --- usage charges -----------------------------------------------------------------------------


@given(used=usages)
@example(used=0)
@example(used=1)
@example(used=100)
@example(used=1000)
@example(used=2 * MAX_TOKENS_PER_CALL)
def test_charge_is_u_plus_ceil_u_over_4_at_default_rates(used: int) -> None:
    rates = money.Rates()
    assert rates.usage_fee_percent == 25
    tokens, fee = money.usage_charge(used, rates.usage_fee_percent)
    assert tokens == used
    assert tokens + fee == used + ref_fee(used, 25)
    assert tokens + fee == used + math.ceil(Fraction(used, 4))
    assert isinstance(fee, int)


def test_charge_examples_from_the_design() -> None:
    assert money.usage_charge(100, 25) == (100, 25)
    assert money.usage_charge(1000, 25) == (1000, 250)
    assert money.usage_charge(1, 25) == (1, 1)  # 0.25 rounds up: no free tokens
    assert money.usage_charge(4, 25) == (4, 1)
    assert money.usage_charge(5, 25) == (5, 2)
    assert money.usage_charge(0, 25) == (0, 0)


@given(used=usages, percent=fee_percents)
@example(used=1, percent=1)
@example(used=99, percent=1)
@example(used=101, percent=1)
def test_charge_is_u_plus_ceil_u_times_p_over_100(used: int, percent: int) -> None:
    tokens, fee = money.usage_charge(used, percent)
    assert tokens == used
    assert fee == ref_fee(used, percent)
    assert money.usage_fee(used, percent) == fee
    assert money.ceil_percent(used, percent) == fee
    # ceil: the platform never undercharges, and never by a whole token too much.
    assert Fraction(used * percent, 100) <= fee < Fraction(used * percent, 100) + 1


@given(a=usages, b=usages, percent=fee_percents)
def test_fee_is_monotonic(a: int, b: int, percent: int) -> None:
    low, high = sorted((a, b))
    assert money.usage_fee(low, percent) <= money.usage_fee(high, percent)


# --- holds -------------------------------------------------------------------------------------


@given(estimate=estimates, percent=fee_percents)
@example(estimate=100, percent=25)
@example(estimate=1, percent=25)
def test_hold_is_the_estimate_plus_its_fee(estimate: int, percent: int) -> None:
    assert money.hold_amount(estimate, percent) == estimate + ref_fee(estimate, percent)


@given(data=st.data(), estimate=estimates, percent=fee_percents)
def test_any_usage_within_the_estimate_fits_in_the_hold(
    data: st.DataObject, estimate: int, percent: int
) -> None:
    used = data.draw(st.integers(min_value=0, max_value=estimate), label="used")
    tokens, fee = money.usage_charge(used, percent)
    assert tokens + fee <= money.hold_amount(estimate, percent)


def test_hold_examples_from_the_design() -> None:
    assert money.hold_amount(100, 25) == 125
    assert money.hold_amount(1000, 25) == 1250
    assert money.hold_amount(1, 25) == 2


# --- refunds -----------------------------------------------------------------------------------


@st.composite
def refund_plans(draw: st.DrawFn) -> tuple[int, int, list[int]]:
    """(tokens purchased, share, partial refunds summing to the whole purchase; zeros allowed)."""
    tokens = draw(st.one_of(st.integers(1, 50), st.integers(1, MAX_TOKENS_PER_PURCHASE)))
    share = draw(shares)
    cuts = draw(st.lists(st.integers(0, tokens), max_size=12))
    points = sorted({0, tokens, *cuts})
    steps = [b - a for a, b in itertools.pairwise(points)]
    # A few zero-token steps in between: they must move nothing.
    zeros = draw(st.integers(0, 2))
    positions = draw(st.lists(st.integers(0, len(steps)), min_size=zeros, max_size=zeros))
    for p in positions:
        steps.insert(p, 0)
    return tokens, share, steps


@given(plan=refund_plans())
@example(plan=(1000, 80, [1000]))
@example(plan=(1000, 80, [1] * 7 + [993]))
@example(plan=(3, 80, [1, 1, 1]))
@example(plan=(7, 33, [1, 2, 1, 3]))
def test_partial_refunds_reverse_exactly_the_credit_and_the_fee(
    plan: tuple[int, int, list[int]],
) -> None:
    tokens, share, steps = plan
    credited, fee = money.split_purchase(tokens, share)
    assert sum(steps) == tokens
    refunded = 0
    user_total = fee_total = 0
    for step in steps:
        user_part, fee_part = money.refund_split(tokens, credited, refunded, step)
        assert user_part >= 0
        assert fee_part >= 0
        assert user_part + fee_part == step
        # In proportion: within one token of the exact share of this step.
        exact = Fraction(step * credited, tokens)
        assert abs(user_part - exact) < 1
        refunded += step
        user_total += user_part
        fee_total += fee_part
        # After every step the cumulative user part is the floor of the exact cumulative share.
        assert user_total == math.floor(Fraction(refunded * credited, tokens))
    assert user_total == credited
    assert fee_total == fee


@given(tokens=purchases, share=shares)
def test_a_whole_refund_at_once_is_the_purchase_reversed(tokens: int, share: int) -> None:
    credited, fee = money.split_purchase(tokens, share)
    assert money.refund_split(tokens, credited, 0, tokens) == (credited, fee)


# --- configuration -----------------------------------------------------------------------------


@pytest.mark.parametrize(("share", "fee"), [(-1, 25), (101, 25), (80, -1), (80, 1001)], ids=str)
def test_rates_out_of_range_are_refused(share: int, fee: int) -> None:
    with pytest.raises(ValueError, match="percent"):
        money.Rates(user_share_percent=share, usage_fee_percent=fee)


@pytest.mark.parametrize(("share", "fee"), [(0, 0), (100, 1000), (80, 25)])
def test_rates_in_range_are_accepted(share: int, fee: int) -> None:
    rates = money.Rates(user_share_percent=share, usage_fee_percent=fee)
    assert (rates.user_share_percent, rates.usage_fee_percent) == (share, fee)
