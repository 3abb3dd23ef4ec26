"""Price rules: cost + profit survives G2A's fee, caps never turn into a loss."""
from decimal import Decimal as D

from hypothesis import given
from hypothesis import strategies as st

from bridge.pricing import break_even_price, decide_price, gross_up, round_up_cents

money = st.decimals(min_value=D("0"), max_value=D("5000"), places=2, allow_nan=False, allow_infinity=False)
fees = st.decimals(min_value=D("0"), max_value=D("0.95"), places=4, allow_nan=False, allow_infinity=False)


def test_round_up_cents_always_rounds_towards_the_higher_cent():
    assert round_up_cents(D("5.301")) == D("5.31")
    assert round_up_cents(D("5.30")) == D("5.30")
    assert round_up_cents(D("5")) == D("5.00")


def test_gross_up_adds_back_the_fee():
    assert gross_up(D("5.80"), D("0.15")) == D("6.83")  # 5.80 / 0.85 = 6.8235...
    assert gross_up(D("8.50"), D("0.15")) == D("10.00")
    assert gross_up(D("3"), D("0")) == D("3.00")


def test_break_even_is_the_lowest_price_that_covers_the_cost():
    price = break_even_price(D("6.32"), D("0.15"))
    assert price * (1 - D("0.15")) >= D("6.32")
    assert (price - D("0.01")) * (1 - D("0.15")) < D("6.32")


def test_the_price_is_cost_plus_profit_grossed_up_by_the_fee():
    decision = decide_price(D("6.32"), D("0.50"), D("0.15"))
    assert decision == decision.__class__(D("8.03"), True, "cost + profit + fee")


def test_a_price_below_min_price_is_raised_to_it():
    decision = decide_price(D("1.00"), D("0.50"), D("0.15"), min_price=D("3.50"))
    assert (decision.price, decision.sellable) == (D("3.50"), True)


def test_a_price_above_max_price_is_not_sellable_instead_of_sold_at_a_loss():
    decision = decide_price(D("50.00"), D("0.50"), D("0.15"), max_price=D("40.00"))
    assert not decision.sellable
    assert "max_price" in decision.reason


def test_a_price_above_the_g2a_limit_is_not_sellable():
    decision = decide_price(D("10.00"), D("0.50"), D("0.15"), limit_max=D("12.00"))
    assert not decision.sellable
    assert "priceLimit.max" in decision.reason


def test_a_price_below_the_g2a_limit_is_raised_to_it():
    decision = decide_price(D("1.00"), D("0.50"), D("0.15"), limit_min=D("4.99"))
    assert (decision.price, decision.sellable) == (D("4.99"), True)


def test_min_price_above_the_g2a_limit_max_is_not_sellable():
    decision = decide_price(D("1.00"), D("0.50"), D("0.15"), min_price=D("30"), limit_max=D("20"))
    assert not decision.sellable


def test_without_a_cws_price_nothing_is_sellable():
    decision = decide_price(None, D("0.50"), D("0.15"))
    assert (decision.price, decision.sellable) == (None, False)


@given(money, money, fees)
def test_the_price_always_keeps_cost_and_profit_after_the_fee(cost, profit, fee):
    decision = decide_price(cost, profit, fee)
    assert decision.price * (1 - fee) >= cost + profit
    assert decision.price.as_tuple().exponent == -2


@given(money, money, fees)
def test_the_price_is_at_most_one_cent_above_the_exact_gross_up(cost, profit, fee):
    price = decide_price(cost, profit, fee).price
    assert (price - D("0.01")) * (1 - fee) < cost + profit


@given(money, money, money, fees)
def test_the_price_never_falls_when_the_cost_rises(cost, more, profit, fee):
    assert decide_price(cost + more, profit, fee).price >= decide_price(cost, profit, fee).price


@given(money, money, fees, money, money)
def test_a_sellable_price_respects_min_and_max(cost, profit, fee, low, high):
    decision = decide_price(cost, profit, fee, min_price=min(low, high), max_price=max(low, high))
    if decision.sellable:
        assert min(low, high) <= decision.price <= max(low, high)
        assert decision.price * (1 - fee) >= cost + profit
