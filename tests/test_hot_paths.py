"""The hot statements stay bounded by what is live, never by history: the stock reads of reservations and orders use
the indexes that skip inactive reservation lines and finished orders (SQLite's plan, read with EXPLAIN)."""
from datetime import timedelta
from decimal import Decimal

from bridge import db, reservations, stock


def plan(sql, params):
    return " | ".join(row[3] for row in db.database.execute_sql("EXPLAIN QUERY PLAN " + sql, params).fetchall())


def test_the_stock_reads_skip_inactive_lines_and_finished_orders(database):
    for sql, params in ((stock.FEW_SQL.format(p="?", ids="?"), [*stock.available_params(db.utcnow()), "product"]),
                        (reservations.SELLABLE_SQL.format(p="?", ids="?"),
                         [*stock.available_params(db.utcnow()), stock.BALANCE_KEY, 10**13])):
        found = plan(sql, params)
        assert "(cws_product_id=? AND active=? AND expires_at>?)" in found, found
        assert "SEARCH o USING INDEX order_state (state=?)" in found, found  # claimed orders first, then their items
        assert "order_item_cws_product_id" not in found, found  # never every item ever sold of the product


def test_the_reservation_read_gives_the_stock_and_balance_the_separate_reads_give(database):
    now = db.utcnow()
    ids = [f"product-{n}" for n in range(stock.FEW + 5)]
    for n, cws_id in enumerate(ids):
        db.CwsProduct.create(id=cws_id, quantity=n, listed=n % 7 != 0)
        db.Product.create(g2a_id=10**13 + n, cws_product=cws_id, mapped=n % 5 != 0)
    db.Reservation.create(id="r", state="active", created_at=now, expires_at=now + timedelta(minutes=5))
    db.ReservationLine.insert(reservation_id="r", g2a_product_id=10**13 + 3, cws_product_id="product-3", quantity=2,
                              active=True, expires_at=now + timedelta(minutes=5)).execute()
    g2a_ids = [10**13 + n for n in range(len(ids))] + [1]
    with db.write_transaction():
        sellable = reservations._read_sellable(g2a_ids, now)
    mapped = [cws_id for n, cws_id in enumerate(ids) if n % 5 != 0]
    assert sorted(p.cws_product_id for p in sellable.products.values()) == sorted(mapped)
    assert sellable.available == stock.available_stock(mapped, now) and sellable.available["product-3"] == 1
    assert sellable.balance is None
    db.put_setting(stock.BALANCE_KEY, "12.50")
    with db.write_transaction():
        assert reservations._read_sellable(g2a_ids, now).balance == stock.known_balance() == Decimal("12.50")
