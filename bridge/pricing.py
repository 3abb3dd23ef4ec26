"""Price rules, pure and Decimal-only: the G2A offer price that keeps our profit after G2A's fee.

Every rounding goes up (ROUND_CEILING), so a rounded price never eats into cost or profit.
"""
from dataclasses import dataclass
from decimal import ROUND_CEILING, Decimal, localcontext

CENT = Decimal("0.01")


def round_up_cents(amount):
    return Decimal(amount).quantize(CENT, rounding=ROUND_CEILING)


def gross_up(amount, fee):
    """The price that leaves `amount` after G2A keeps `fee` (a fraction in [0, 1))."""
    with localcontext() as ctx:
        # A non-terminating quotient must be rounded up too, or ceiling to cents could land below it.
        ctx.rounding = ROUND_CEILING
        return round_up_cents(Decimal(amount) / (1 - Decimal(fee)))


def break_even_price(cost, fee):
    """The lowest price that still covers `cost` after the fee: selling below it is a loss."""
    return gross_up(cost, fee)


def units_affordable(balance, cost):
    """Keys of `cost` the CWS balance can still pay for (None when either is unknown: nothing to limit by)."""
    if balance is None or cost is None or cost <= 0:
        return None
    return max(0, int(Decimal(balance) // Decimal(cost)))


@dataclass(frozen=True)
class PriceDecision:
    price: Decimal | None
    sellable: bool
    reason: str


def decide_price(cost, profit, fee, min_price=None, max_price=None, limit_min=None, limit_max=None):
    """What to ask on G2A for one key costing `cost`; caps we cannot meet make the offer unsellable, never a loss."""
    if cost is None:
        return PriceDecision(None, False, "no CWS price for one key")
    price = gross_up(Decimal(cost) + Decimal(profit), fee)
    reason = "cost + profit + fee"
    if min_price is not None and price < min_price:
        price, reason = round_up_cents(min_price), "raised to min_price"
    if limit_min is not None and price < limit_min:
        price, reason = round_up_cents(limit_min), "raised to G2A priceLimit.min"
    if max_price is not None and price > max_price:
        return PriceDecision(price, False, f"price {price} above max_price {max_price}: not selling at a loss")
    if limit_max is not None and price > limit_max:
        return PriceDecision(price, False, f"price {price} above G2A priceLimit.max {limit_max}")
    return PriceDecision(price, True, reason)
