"""POST /reservation's quick path on SQLite: a reservation and its lines written by one guarded statement, which
commits only if the product facts it was decided on are still what the database holds and the stock still covers it.

One statement is one C call: the writer lock's holder needs the GIL back once (for the stock figure), not after each
of six statements while other threads run Python (docs/decisions.md, round 7).
"""
import threading

import peewee

from . import db
from .stock import AVAILABLE_FORMULA, BALANCE_KEY, PROMISED

VIEW, FIGURE = "reservation_claim", "reservation_claim_available"
CHANGED = "reservation_claim: the product or its stock changed since it was read"
# One row per line: the reservation and the line, then the product's columns as the decision read them (raw).
COLUMNS = ("reservation_id", "state", "created_at", "expires_at", "request_id", "g2a_product_id", "cws_product_id",
           "quantity", "unit_price", "offer_price", "enabled", "max_stock", "fee", "cost", "checked_at", "balance")
_AVAILABLE = AVAILABLE_FORMULA.format(now="NEW.created_at", **dict(zip(
    ("order_state", "source", "item_state"), (f"'{value}'" for value in PROMISED))))
# TEMP: made per connection (install()), so the database file holds no trigger calling a function only we define.
VIEW_DDL = (f"CREATE TEMP VIEW IF NOT EXISTS {VIEW} AS SELECT "
            + ", ".join(f"NULL AS {column}" for column in COLUMNS) + " WHERE 0")
# Per row, in the rows' order: the guard (under SQLite's write lock, with this statement's earlier lines already
# counted in the stock), then the reservation once and the line. RAISE undoes the whole statement.
TRIGGER_DDL = f"""CREATE TEMP TRIGGER IF NOT EXISTS {VIEW}_insert INSTEAD OF INSERT ON {VIEW} BEGIN
  SELECT RAISE(ABORT, '{CHANGED}') WHERE NOT EXISTS (
    SELECT 1 FROM product p JOIN cws_product c ON c.id = p.cws_product_id
    WHERE p.g2a_id = NEW.g2a_product_id AND p.mapped AND p.cws_product_id = NEW.cws_product_id
      AND p.enabled IS NEW.enabled AND p.max_stock IS NEW.max_stock AND p.fee IS NEW.fee
      AND p.offer_price IS NEW.offer_price AND c.cost IS NEW.cost AND c.checked_at IS NEW.checked_at
      AND ({db.SETTING_SQL.format(p=f"'{BALANCE_KEY}'")}) IS NEW.balance
      AND {FIGURE}({_AVAILABLE}) >= NEW.quantity);
  INSERT INTO reservation (id, state, created_at, expires_at, request_id)
    SELECT NEW.reservation_id, NEW.state, NEW.created_at, NEW.expires_at, NEW.request_id
    WHERE NOT EXISTS (SELECT 1 FROM reservation WHERE id = NEW.reservation_id);
  INSERT INTO reservation_line (reservation_id, g2a_product_id, cws_product_id, quantity, unit_price, offer_price,
                                active, expires_at)
    VALUES (NEW.reservation_id, NEW.g2a_product_id, NEW.cws_product_id, NEW.quantity, NEW.unit_price,
            NEW.offer_price, 1, NEW.expires_at);
END"""
_figures = threading.local()  # what FIGURE saw, for the thread running the statement


def hold(rows):
    """Write the reservation of `rows` (tuples in COLUMNS order, one per line); the stock each line found before it
    was counted, in order, or None when the guard refused (nothing written: the exact path must decide)."""
    database = db.database.obj
    sql = f"INSERT INTO {VIEW} VALUES " + ", ".join(["(" + ", ".join(["?"] * len(COLUMNS)) + ")"] * len(rows))
    params = [value for row in rows for value in row]
    for attempt in (1, 2):
        _figures.seen = []
        try:
            database.execute_sql(sql, params)  # outside any transaction: one statement, its own commit
            return _figures.seen
        except peewee.IntegrityError as err:
            if CHANGED in str(err):
                return None
            raise
        except peewee.OperationalError as err:
            if attempt == 2 or (VIEW not in str(err) and FIGURE not in str(err)):
                raise
            install(database)


def install(database):
    """The view, its trigger and FIGURE on the connection that writes (a new one has none of them)."""
    with database.writing():
        connection = database.connection()
        connection.create_function(FIGURE, 1, _seen)
        connection.execute(VIEW_DDL)
        connection.execute(TRIGGER_DDL)


def _seen(available):
    _figures.seen.append(available)
    return available
