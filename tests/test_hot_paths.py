"""The hot statements stay bounded by what is live, never by history: the stock read of every reservation uses
the indexes that skip inactive reservation lines and finished orders (SQLite's plan, read with EXPLAIN)."""
from decimal import Decimal

from bridge import db, stock


def plan(sql, params):
    return " | ".join(row[3] for row in db.database.execute_sql("EXPLAIN QUERY PLAN " + sql, params).fetchall())


def test_the_reservation_stock_read_skips_inactive_lines_and_finished_orders(database):
    sql = stock.FEW_SQL.format(p="?", ids="?")
    now = db.ReservationLine.expires_at.db_value(db.utcnow())
    found = plan(sql, [now, db.CLAIMED, "cws", "pending", stock.BALANCE_KEY, "some-product"])
    assert "(cws_product_id=? AND active=? AND expires_at>?)" in found, found
    assert "SEARCH o USING INDEX order_state (state=?)" in found, found  # claimed orders first, then their items
    assert "order_item_cws_product_id" not in found, found  # never every item ever sold of the product


def test_the_reservation_read_gives_the_stock_and_balance_the_separate_reads_give(database):
    now = db.utcnow()
    ids = [f"product-{n}" for n in range(stock.FEW + 5)]
    for n, cws_id in enumerate(ids):
        db.CwsProduct.create(id=cws_id, quantity=n, listed=n % 7 != 0)
    few, many = ids[:3] + ["never-heard-of"], ids + ["never-heard-of"]
    assert stock.available_with_balance(few, now) == (stock.available_stock(few, now), None)
    db.put_setting(stock.BALANCE_KEY, "12.50")
    for wanted in (few, many, ["never-heard-of"]):
        available, balance = stock.available_with_balance(wanted, now)
        assert available == stock.available_stock(wanted, now) and balance == stock.known_balance() == Decimal("12.50")
