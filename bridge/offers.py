"""Offer state in the database: what plan() reads (one ProductState per G2A product) and what G2A confirmed."""
from dataclasses import dataclass
from datetime import timedelta
from decimal import Decimal

from . import db
from .errors import UpstreamError
from .stock import available_stock, known_balance

HOUR = timedelta(hours=1)
IN_LIMIT = 500  # more ids than this are filtered in Python (SQLite caps bound values per statement)
OUTCOMES_PER_TRANSACTION = 10


@dataclass(frozen=True, slots=True)
class ProductState:
    """Everything plan() needs about one G2A product: the mapping, its CWS side and its offer as last confirmed."""
    g2a_id: int
    offer_id: str | None
    cost: Decimal | None
    available: int
    fixed_profit: Decimal
    fee: Decimal
    mapped: bool = True
    enabled: bool = True
    listed: bool = True
    min_price: Decimal | None = None
    max_price: Decimal | None = None
    max_stock: int | None = None
    limit_min: Decimal | None = None
    limit_max: Decimal | None = None
    offer_price: Decimal | None = None
    offer_stock: int | None = None
    offer_active: bool | None = None
    missing_offer_warned: bool = False
    sync_state: str = "pending"
    price_changes: tuple = ()  # when this product's recent price writes were sent
    balance: Decimal | None = None  # the CWS balance as last read: keys it cannot pay for are not offered


@dataclass(frozen=True)
class Outcome:
    """How one planned change ended: confirmed (resource_id: the offer a creation made) or refused."""
    change: object
    resource_id: str | None = None
    error: UpstreamError | None = None


def load_states(cws_ids, now, settings):
    """ProductState for every product (cws_ids None) or those sold from `cws_ids`, in a few set queries.

    Raw column values (no per-field converters): at 50,000 products the converters cost more than the query.
    """
    product, cws = db.Product._meta.table, db.CwsProduct._meta.table
    query = (product.select(product.g2a_id, product.offer_id, cws.cost, cws.id, product.fixed_profit, product.fee,
                            product.mapped, product.enabled, cws.listed, product.min_price, product.max_price,
                            product.max_stock, product.price_limit_min, product.price_limit_max,
                            product.offer_price, product.offer_stock, product.offer_active,
                            product.missing_offer_warned, product.sync_state)
             .join(cws, on=(product.cws_product_id == cws.id)))
    wanted = None if cws_ids is None else set(cws_ids)
    if wanted is not None and len(wanted) <= IN_LIMIT:
        query = query.where(product.cws_product_id.in_(list(wanted)))
    available = available_stock(cws_ids, now)
    changes = _recent_price_changes(now)
    defaults = (settings.default_fixed_profit, settings.default_fee)
    balance = known_balance()
    return [_state(row, available, changes, defaults, balance) for row in query.tuples().iterator()
            if wanted is None or row[3] in wanted]


def _state(row, available, changes, defaults, balance):
    (g2a_id, offer_id, cost, cws_id, profit, fee, mapped, enabled, listed, min_price, max_price, max_stock,
     limit_min, limit_max, offer_price, offer_stock, offer_active, warned, sync_state) = row
    return ProductState(
        g2a_id, offer_id, _money(cost), available.get(cws_id, 0), _money(profit, defaults[0]),
        _money(fee, defaults[1]), bool(mapped), bool(enabled), bool(listed), _money(min_price), _money(max_price),
        max_stock, _money(limit_min), _money(limit_max), _money(offer_price), offer_stock,
        None if offer_active is None else bool(offer_active), bool(warned), sync_state, changes.get(g2a_id, ()),
        balance)


def _money(text, default=None):
    return default if text is None else Decimal(text)


def _recent_price_changes(now):
    found = {}
    for g2a_id, at in (db.PriceChange.select(db.PriceChange.g2a_product_id, db.PriceChange.at)
                       .where(db.PriceChange.at > now - HOUR).tuples()):
        found[g2a_id] = found.get(g2a_id, ()) + (at,)
    return found


def store_outcomes(outcomes, now):
    """Record what G2A confirmed (or refused), a few outcomes per transaction (the web's reservations wait for
    each); a failed product is retried next pass."""
    for start in range(0, len(outcomes), OUTCOMES_PER_TRANSACTION):
        with db.write_transaction():
            for outcome in outcomes[start:start + OUTCOMES_PER_TRANSACTION]:
                if outcome.error is not None:
                    _store_failure(outcome.change, outcome.error)
                else:
                    _store_success(outcome.change, outcome.resource_id, now)


def _store_success(change, resource_id, now):
    fields = {"sync_state": "pending" if change.deferred_price is not None else "in_sync", "sync_error": None}
    if change.sends:
        fields.update(_confirmed(change, resource_id), synced_at=now)
    if change.price is not None:
        db.PriceChange.create(g2a_product_id=change.g2a_id, at=now)
    db.Product.update(**fields).where(db.Product.g2a_id == change.g2a_id).execute()


def _confirmed(change, resource_id):
    fields = {}
    if change.action == "create":
        fields.update(offer_id=resource_id, missing_offer_warned=False)
    if change.price is not None:
        fields["offer_price"] = change.price
    if change.stock is not None:
        fields["offer_stock"] = change.stock
    if change.active is not None:
        fields["offer_active"] = change.active
    return fields


def _store_failure(change, error):
    fields = {"sync_state": "failed", "sync_error": str(error)[:500]}
    if error.retryable:
        # No answer (a timeout, a lost job poll, a job still pending): G2A may have applied the write, so what we
        # last confirmed is unknown now and the next plan sends these parts again, even where they look unchanged.
        # Kept, a stock-25 offer G2A had activated stayed active after CWS sold out (test_faults.py).
        fields.update({name: None for name, sent in (("offer_price", change.price), ("offer_stock", change.stock),
                                                     ("offer_active", change.active)) if sent is not None})
    if error.status == 404:
        fields["offer_id"] = None  # the offer is gone on G2A
    db.Product.update(**fields).where(db.Product.g2a_id == change.g2a_id).execute()


def prune_price_changes(now):
    """Price writes older than the hourly window no longer count."""
    db.PriceChange.delete().where(db.PriceChange.at <= now - HOUR).execute()
