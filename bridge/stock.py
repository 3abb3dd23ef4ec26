"""How many keys of a CWS product we can still promise: the one formula sync and reservations share.

available = CWS quantity (0 once delisted) + returned keys in the pool − live reservations
            − claimed order items not bought yet; never below 0.
Reservations and sync also cap it by what the known CWS balance can pay for (pricing.units_affordable).
"""
from decimal import Decimal, InvalidOperation

from peewee import Case, fn

from . import db

BALANCE_KEY = "cws.balance"  # the CWS spending power at its last reading (0 after CWS refused a purchase for it)

CHUNK = 500  # ids per IN (...) clause; above SMALL we group over the whole table instead
SMALL = 2000
FEW = 20  # up to this many ids one hand-written statement answers
# The formula for CWS product `c` in SQL, before the floor at 0, with its four values (`now` and PROMISED) given as
# SQL: parameters (AVAILABLE_SQL, which takes available_params(now)) or expressions (a trigger's, quickhold.py).
# Hand-written: a reservation (with its products, reservations.py) or an order asks for one or two products, and
# peewee spent longer building four queries than SQLite spent running them (bench/reservation_bench.py). Each sum
# must stay bounded by what is live, never by history: `l.active = TRUE` lets the covering index skip inactive
# lines, and the claimed items are found from the few claimed orders (CROSS JOIN fixes SQLite's loop order), not
# from every item ever sold of the product (20,000 past orders of a product made this 12 ms instead of 0.1 ms).
AVAILABLE_FORMULA = """CASE WHEN c.listed THEN c.quantity ELSE 0 END
  + (SELECT COUNT(*) FROM pooled_key k WHERE k.cws_product_id = c.id AND k.taken_by_id IS NULL)
  - (SELECT COALESCE(SUM(l.quantity), 0) FROM reservation_line l
     WHERE l.cws_product_id = c.id AND l.active = TRUE AND l.expires_at > {now})
  - (SELECT COUNT(*) FROM "order" o CROSS JOIN order_item i
     WHERE o.state = {order_state} AND i.order_id = o.id AND i.cws_product_id = c.id AND i.source = {source}
       AND i.state = {item_state})"""
PROMISED = (db.CLAIMED, "cws", "pending")  # claimed orders' CWS items not bought yet: their keys are promised
AVAILABLE_SQL = AVAILABLE_FORMULA.format(now="{p}", order_state="{p}", source="{p}", item_state="{p}")
FEW_SQL = "SELECT c.id, " + AVAILABLE_SQL + " FROM cws_product c WHERE c.id IN ({ids})"


def known_balance():
    """The CWS balance as last read (None when never read): keys it cannot pay for are not offered."""
    return parse_balance(db.get_setting(BALANCE_KEY))


def parse_balance(value):
    """The stored balance setting as a Decimal; None when never read (or unreadable)."""
    try:
        return None if value is None else Decimal(value)
    except InvalidOperation:
        return None


def available_stock(cws_product_ids, now):
    """{cws_product_id: available keys} for the given ids (None: every known CWS product; unknown ids: 0)."""
    ids = None if cws_product_ids is None else list(dict.fromkeys(cws_product_ids))
    if ids is not None and len(ids) <= FEW:
        return _few(ids, now)
    base = _grouped(_quantities(), ids)
    if ids is not None:
        base = {cws_id: base.get(cws_id, 0) for cws_id in ids}
    held = _grouped(_reserved(now), ids)
    pooled = _grouped(_pooled(), ids)
    claimed = _grouped(_claimed(), ids)
    return {cws_id: max(0, quantity + pooled.get(cws_id, 0) - held.get(cws_id, 0) - claimed.get(cws_id, 0))
            for cws_id, quantity in base.items()}


def available_params(now):
    """The parameters of AVAILABLE_SQL, in order."""
    return [db.ReservationLine.expires_at.db_value(now), *PROMISED]


def _few(ids, now):
    database = db.database.obj
    sql = FEW_SQL.format(p=database.param, ids=", ".join([database.param] * len(ids)))
    found = {cws_id: max(0, int(total)) for cws_id, total in database.execute_sql(sql, available_params(now) + ids)}
    return {cws_id: found.get(cws_id, 0) for cws_id in ids}


def _quantities():
    product = db.CwsProduct
    listed_quantity = Case(None, [(product.listed == True, product.quantity)], 0)  # noqa: E712
    return product.select(product.id, listed_quantity), product.id


def _reserved(now):
    line = db.ReservationLine
    return (line.select(line.cws_product_id, fn.SUM(line.quantity))
            .where(line.active == True, line.expires_at > now)  # noqa: E712 (peewee expression)
            .group_by(line.cws_product_id), line.cws_product_id)


def _pooled():
    key = db.PooledKey
    return (key.select(key.cws_product_id, fn.COUNT(key.id))
            .where(key.taken_by.is_null())
            .group_by(key.cws_product_id), key.cws_product_id)


def _claimed():
    item, order = db.OrderItem, db.Order
    return (item.select(item.cws_product_id, fn.COUNT(item.id)).join(order)
            .where(order.state == db.CLAIMED, item.source == "cws", item.state == "pending")
            .group_by(item.cws_product_id), item.cws_product_id)


def _grouped(query_and_column, ids):
    """{cws_id: total}; small id lists filter in SQL, big ones read the whole (grouped) table once."""
    query, column = query_and_column
    if ids is None or len(ids) > SMALL:
        wanted = None if ids is None else set(ids)
        return {cws_id: int(total) for cws_id, total in query.tuples() if wanted is None or cws_id in wanted}
    return {cws_id: int(total) for cws_id, total in _in_chunks(query, column, ids)}


def _in_chunks(query, column, ids):
    for start in range(0, len(ids), CHUNK):
        yield from query.where(column.in_(ids[start:start + CHUNK])).tuples()
