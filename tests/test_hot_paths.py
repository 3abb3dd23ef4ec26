"""The hot statements stay bounded by what is live, never by history: the stock read of every reservation uses
the indexes that skip inactive reservation lines and finished orders (SQLite's plan, read with EXPLAIN)."""
from bridge import db, stock


def plan(sql, params):
    return " | ".join(row[3] for row in db.database.execute_sql("EXPLAIN QUERY PLAN " + sql, params).fetchall())


def test_the_reservation_stock_read_skips_inactive_lines_and_finished_orders(database):
    sql = stock.FEW_SQL.format(p="?", ids="?")
    now = db.ReservationLine.expires_at.db_value(db.utcnow())
    found = plan(sql, [now, db.CLAIMED, "cws", "pending", "some-product"])
    assert "(cws_product_id=? AND active=? AND expires_at>?)" in found, found
    assert "SEARCH o USING INDEX order_state (state=?)" in found, found  # claimed orders first, then their items
    assert "order_item_cws_product_id" not in found, found  # never every item ever sold of the product
