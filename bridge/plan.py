"""The offer plan (pure, no I/O): from each product's state, the few G2A offer changes needed, most urgent first,
within the hourly price-change budget."""
from dataclasses import dataclass
from decimal import Decimal

from .offers import HOUR
from .pricing import decide_price, units_affordable

MISSING_OFFER = "no G2A offer for this product: create it in the G2A panel, or set G2A_CREATE_OFFERS=true"


@dataclass(frozen=True)
class Change:
    """One offer write (only the parts that differ), a creation, a held-back decrease or a missing-offer warning."""
    g2a_id: int
    offer_id: str | None
    action: str = "update"  # update / create / missing
    price: Decimal | None = None
    stock: int | None = None
    active: bool | None = None
    old_price: Decimal | None = None
    old_stock: int | None = None
    old_active: bool | None = None
    deferred_price: Decimal | None = None
    reason: str = ""

    @property
    def sends(self):
        return self.action == "create" or (self.action == "update" and
                                            (self.price, self.stock, self.active) != (None, None, None))

    @property
    def priority(self):
        """0: stops a loss (deactivation, price rise); 1: stock and activation; 2: price cuts."""
        if self.active is False or (self.price is not None and not self._is_decrease()):
            return 0
        return 1 if (self.stock, self.active) != (None, None) or self.action != "update" else 2

    def _is_decrease(self):
        return self.old_price is not None and self.price < self.old_price

    def __str__(self):
        if self.action == "create":
            return f"{self.g2a_id} create offer: price {self.price}, stock {self.stock}"
        if self.action == "missing":
            return f"{self.g2a_id} {MISSING_OFFER}"
        parts = []
        if self.price is not None:
            parts.append(f"price {_show(self.old_price)} -> {self.price} "
                         f"({'decrease' if self._is_decrease() else 'increase'})")
        if self.deferred_price is not None:
            parts.append(f"price {self.old_price} -> {self.deferred_price} (decrease deferred: {self.reason})")
        if self.stock is not None:
            parts.append(f"stock {_show(self.old_stock)} -> {self.stock}")
        if self.active is not None:
            parts.append(("activate" if self.active else f"deactivate ({self.reason})"))
        return f"{self.g2a_id} " + ", ".join(parts)


def _show(value):
    return "unknown" if value is None else value


def plan(states, now, paused, price_changes_per_hour, create_offers=False):
    """The changes that bring each offer to its desired state, most urgent first (pure: no I/O)."""
    changes = [change for state in states
               if (change := plan_product(state, now, paused, price_changes_per_hour, create_offers)) is not None]
    return sorted(changes, key=lambda change: change.priority)


def plan_product(state, now, paused, price_changes_per_hour, create_offers=False):
    decision, stock, why_not = _desired(state)
    if state.offer_id is None:
        return _missing(state, decision.price, stock, bool(why_not) or paused, create_offers)
    if why_not:
        return _deactivate(state, why_not)
    if paused:
        if not state.offer_active:
            return None
        stock = min(stock, state.offer_stock or 0)
    return _update(state, decision.price, stock, now, price_changes_per_hour)


def inactive_reason(state, paused):
    """Why this product's offer does not sell ("" when it does or should): what a dry run shows for idle offers."""
    why_not = _desired(state)[2]
    if state.offer_id is None and state.mapped:
        return MISSING_OFFER
    if why_not:
        return why_not
    return "paused" if paused and not state.offer_active else ""


def _desired(state):
    """(price decision, stock to show, why it must not sell or "")."""
    decision = decide_price(state.cost, state.fixed_profit, state.fee, state.min_price, state.max_price,
                            state.limit_min, state.limit_max)
    stock = state.available if state.max_stock is None else min(state.available, state.max_stock)
    affordable = units_affordable(state.balance, state.cost)
    stock = stock if affordable is None else min(stock, affordable)
    return decision, stock, _why_not_sold(state, decision, stock, affordable)


def _why_not_sold(state, decision, stock, affordable):
    """Why the offer must not sell now, or "" when it should be active."""
    reasons = ((not state.mapped, "removed from products.json"), (not state.enabled, "disabled in products.json"),
               (not state.listed, "not listed by CWS"), (not decision.sellable, decision.reason),
               (affordable == 0, f"CWS balance {state.balance} cannot pay for one key: top up the CWS account"),
               (stock <= 0, "out of stock"))
    return next((why for failed, why in reasons if failed), "")


def _missing(state, price, stock, not_now, create_offers):
    if not state.mapped:
        return None
    if create_offers:
        return None if not_now else Change(state.g2a_id, None, "create", price=price, stock=stock, active=True)
    if state.missing_offer_warned:
        return None
    return Change(state.g2a_id, None, "missing", reason=MISSING_OFFER)


def _deactivate(state, why):
    stock = 0 if state.offer_stock != 0 else None
    active = False if state.offer_active is not False else None
    if stock is None and active is None:
        return None
    return Change(state.g2a_id, state.offer_id, stock=stock, active=active, old_price=state.offer_price,
                  old_stock=state.offer_stock, old_active=state.offer_active, reason=why)


def _update(state, price, stock, now, per_hour):
    send_price = price if state.offer_price != price else None
    deferred, reason = None, ""
    if send_price is not None and state.offer_price is not None and price < state.offer_price:
        recent = sum(1 for at in state.price_changes if at > now - HOUR)
        if recent >= decrease_allowance(per_hour):
            deferred, send_price = price, None
            reason = f"{recent} price changes in the last hour"
    send_stock = stock if state.offer_stock != stock else None
    send_active = True if state.offer_active is not True else None
    if (send_price, send_stock, send_active, deferred) == (None, None, None, None):
        return None
    return Change(state.g2a_id, state.offer_id, price=send_price, stock=send_stock, active=send_active,
                  old_price=state.offer_price, old_stock=state.offer_stock, old_active=state.offer_active,
                  deferred_price=deferred, reason=reason)


def decrease_allowance(per_hour):
    """Price cuts allowed per product per hour: one change stays in reserve for a rise that prevents a loss."""
    return per_hour - 1 if per_hour > 1 else per_hour
