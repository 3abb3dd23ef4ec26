"""The priority lane's choice of hot products: reserved or sold lately, low stock, or priced near a bound. They
are re-read one by one within a share of the worker's single-product CWS budget, the stalest first.

Definitions and figures: docs/decisions.md, "Upstream budgets: sweep and priority lane".
"""
import threading
import time
from contextlib import contextmanager
from datetime import timedelta
from decimal import Decimal

from . import db

HOT_WINDOW = timedelta(minutes=10)  # reserved or sold this recently
LOW_STOCK = 3  # listed with 1..LOW_STOCK keys: the next sale may be the last
NEAR_BOUND = Decimal("0.05")  # offer price within 5 % of max_price / G2A's maximum, or of a floor
HOT_MAX_AGE = 30.0  # seconds: a hot product is re-read once its state is older than this
HOT_REFRESH = 30.0  # seconds between recomputing which products are hot
HOT_SHARE = 0.5  # of the worker's single-product pace; the rest stays free for postbacks
CREDIT_CAP = 3.0  # hot reads that may go at once after a quiet spell
CHUNK = 500  # ids per IN (...) clause


def configured_product_pace(settings):
    """Single-product GETs per second of the budget share of CWS's limit (web and worker together): the pace of a
    client that carries no budgets."""
    return settings.cws_product_per_5_min * settings.upstream_budget_share / 300


def hot_products(now):
    """CWS ids of the mapped products worth re-reading between sweeps."""
    return _recently_reserved(now) | _recently_sold(now) | _low_stock() | _near_a_bound()


# Both read only the window's rows, whatever the history: a scan of every reservation or order every HOT_REFRESH
# grew with the tables, and with it the worker's memory (SQLite's page cache per connection; bench/soak.py).

def _recently_reserved(now):
    line, reservation = db.ReservationLine, db.Reservation
    since = now - HOT_WINDOW
    first = _first_line_reserved_after(since)
    if first is None:
        return set()
    query = line.select(line.cws_product_id).join(reservation).where(line.id >= first, reservation.created_at > since)
    return {cws_id for (cws_id,) in query.tuples()}


def _first_line_reserved_after(since):
    """The id of the first reservation line made after `since`, or None. Reservations have no created_at index
    (each index is one more page per reservation commit), but lines are numbered in the order they are made: a
    bisection over the ids costs a few lookups."""
    line = db.ReservationLine
    low, high = (line.select(line.id).order_by(ordering).limit(1).scalar() for ordering in (line.id, line.id.desc()))
    if high is None or _reserved_at_or_after(high) <= since:
        return None
    while low < high:
        middle = (low + high) // 2
        if _reserved_at_or_after(middle) > since:
            high = middle
        else:
            low = middle + 1
    return low


def _reserved_at_or_after(line_id):
    """When the reservation of the first line numbered `line_id` or later was made."""
    line, reservation = db.ReservationLine, db.Reservation
    query = reservation.select(reservation.created_at).join(line).where(line.id >= line_id).order_by(line.id).limit(1)
    return next(iter(query.tuples()))[0]


def _recently_sold(now):
    item, order = db.OrderItem, db.Order
    query = order.select(item.cws_product_id).join(item).where(order.created_at > now - HOT_WINDOW)
    return {cws_id for (cws_id,) in query.tuples()}


def _low_stock():
    cws, product = db.CwsProduct, db.Product
    query = (cws.select(cws.id).join(product, on=(product.cws_product == cws.id))
             .where(product.mapped == True, cws.listed == True, cws.quantity.between(1, LOW_STOCK))  # noqa: E712
             .distinct())
    return {cws_id for (cws_id,) in query.tuples()}


def _near_a_bound():
    product = db.Product
    bounded = (product.max_price.is_null(False) | product.price_limit_max.is_null(False)
               | product.min_price.is_null(False) | product.price_limit_min.is_null(False))
    query = (product.select(product.cws_product, product.offer_price, product.min_price, product.max_price,
                            product.price_limit_min, product.price_limit_max)
             .where(product.mapped == True, product.offer_active == True, bounded))  # noqa: E712
    return {row.cws_product_id for row in query if near_a_bound(row.offer_price, row.min_price, row.max_price,
                                                                 row.price_limit_min, row.price_limit_max)}


def near_a_bound(price, *bounds):
    """True when `price` is within NEAR_BOUND of any of the bounds (floors and ceilings alike): a small cost change
    then deactivates the offer, or leaves it at a floor below cost."""
    if price is None:
        return False
    return any(bound is not None and abs(price - bound) <= bound * NEAR_BOUND for bound in bounds)


class HotReads:
    """Which hot products to re-read now: those whose state is older than HOT_MAX_AGE, stalest first, at most
    HOT_SHARE of this process's single-product pace (`pace()`, None when unmetered: the configured share)."""

    def __init__(self, settings, pace, clock=time.monotonic):
        self._pace = lambda: HOT_SHARE * (pace() or configured_product_pace(settings))
        self._clock = clock
        self._credit, self._at = 1.0, clock()
        self._hot, self._hot_at = set(), None

    def due(self, now):
        """CWS ids to re-read now (each counted against the pace)."""
        self._refill()
        if self._credit < 1:
            return []
        hot = self._current(now)
        if not hot:
            return []
        chosen = _stalest(hot, now - timedelta(seconds=HOT_MAX_AGE), int(self._credit))
        self._credit -= len(chosen)
        return chosen

    def _refill(self):
        at = self._clock()
        self._credit = min(CREDIT_CAP, self._credit + (at - self._at) * self._pace())
        self._at = at

    def _current(self, now):
        if self._hot_at is None or self._clock() - self._hot_at >= HOT_REFRESH:
            self._hot, self._hot_at = hot_products(now), self._clock()
        return self._hot


def _stalest(cws_ids, older_than, limit):
    """Up to `limit` of `cws_ids` last read before `older_than` (or never), stalest first."""
    cws, ids, found = db.CwsProduct, sorted(cws_ids), []
    for start in range(0, len(ids), CHUNK):
        query = (cws.select(cws.id, cws.fetched_at)
                 .where(cws.id.in_(ids[start:start + CHUNK]), cws.fetched_at.is_null() | (cws.fetched_at < older_than))
                 .order_by(cws.fetched_at).limit(limit))
        found.extend(query.tuples())
    found.sort(key=lambda row: (row[1] is not None, row[1]))
    return [cws_id for cws_id, _ in found[:limit]]


def marks(limit):
    """{cws id: dirty_since} of the products postbacks marked, oldest marks first."""
    query = (db.CwsProduct.select(db.CwsProduct.id, db.CwsProduct.dirty_since)
             .where(db.CwsProduct.dirty_since.is_null(False)).order_by(db.CwsProduct.dirty_since)
             .limit(limit))
    return dict(query.tuples())


class InFlight:
    """CWS product ids being reconciled now. The sweep and the priority lane share no lock: each claims the
    products it is about to plan and skips what the other holds (the lane retries its marks on its next run)."""

    def __init__(self):
        self._ids = set()
        self._lock = threading.Lock()

    @contextmanager
    def claim(self, cws_ids):
        with self._lock:
            mine = [cws_id for cws_id in cws_ids if cws_id not in self._ids]
            self._ids.update(mine)
        try:
            yield mine
        finally:
            with self._lock:
                self._ids.difference_update(mine)
