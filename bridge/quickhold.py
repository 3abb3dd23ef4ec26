"""POST /reservation's quick path on SQLite: reservations and their lines written by one guarded statement, which
commits only if the product facts each was decided on are still what the database holds and the stock still covers
every line.

One statement is one C call, and one statement serves every reservation waiting for it: while one thread writes,
the threads that arrive queue their rows, and the first of them then writes them all at once (one commit, one
fsync and one hand-off of the writer lock for the lot). When the guard refuses or anything fails in such a batch,
each of its reservations runs again alone, so each gets the answer it would have had alone (docs/decisions.md,
rounds 7 and 9).
"""
import functools
import threading
from collections import deque

import peewee
from peewee import __exception_wrapper__

from . import db
from .stock import AVAILABLE_FORMULA, BALANCE_KEY, PROMISED

VIEW = "reservation_claim"
SEEN = f"{VIEW}_seen"  # TEMP: the stock each row of the last statement found, by its position in the statement
CHANGED = "reservation_claim: the product or its stock changed since it was read"
# One row per line: the reservation and the line, then the product's columns as the decision read them (raw).
COLUMNS = ("reservation_id", "state", "created_at", "expires_at", "request_id", "g2a_product_id", "cws_product_id",
           "quantity", "unit_price", "offer_price", "enabled", "max_stock", "fee", "cost", "checked_at", "balance")
MAX_ROWS = 32  # rows in one statement: 17 parameters each stays under SQLite's old limit of 999
_AVAILABLE = AVAILABLE_FORMULA.format(now="NEW.created_at", **dict(zip(
    ("order_state", "source", "item_state"), (f"'{value}'" for value in PROMISED))))
# TEMP, made per connection (_install()): the database file holds none of it. `position` is added by _statement().
VIEW_DDL = (f"CREATE TEMP VIEW IF NOT EXISTS {VIEW} AS SELECT "
            + ", ".join(f"NULL AS {column}" for column in (*COLUMNS, "position")) + " WHERE 0")
SEEN_DDL = f"CREATE TEMP TABLE IF NOT EXISTS {SEEN} (position INTEGER PRIMARY KEY, available INTEGER)"
# Per row, in the rows' order, under SQLite's write lock: the stock with the statement's earlier lines already
# counted (NULL when a fact changed), the guard on it, then the reservation once and the line. RAISE undoes the
# whole statement, SEEN's rows included.
TRIGGER_DDL = f"""CREATE TEMP TRIGGER IF NOT EXISTS {VIEW}_insert INSTEAD OF INSERT ON {VIEW} BEGIN
  INSERT OR REPLACE INTO {SEEN} (position, available) VALUES (NEW.position, (
    SELECT {_AVAILABLE} FROM product p JOIN cws_product c ON c.id = p.cws_product_id
    WHERE p.g2a_id = NEW.g2a_product_id AND p.mapped AND p.cws_product_id = NEW.cws_product_id
      AND p.enabled IS NEW.enabled AND p.max_stock IS NEW.max_stock AND p.fee IS NEW.fee
      AND p.offer_price IS NEW.offer_price AND c.cost IS NEW.cost AND c.checked_at IS NEW.checked_at
      AND ({db.SETTING_SQL.format(p=f"'{BALANCE_KEY}'")}) IS NEW.balance));
  SELECT RAISE(ABORT, '{CHANGED}') WHERE NOT EXISTS (
    SELECT 1 FROM {SEEN} WHERE position = NEW.position AND available >= NEW.quantity);
  INSERT INTO reservation (id, state, created_at, expires_at, request_id)
    SELECT NEW.reservation_id, NEW.state, NEW.created_at, NEW.expires_at, NEW.request_id
    WHERE NOT EXISTS (SELECT 1 FROM reservation WHERE id = NEW.reservation_id);
  INSERT INTO reservation_line (reservation_id, g2a_product_id, cws_product_id, quantity, unit_price, offer_price,
                                active, expires_at)
    VALUES (NEW.reservation_id, NEW.g2a_product_id, NEW.cws_product_id, NEW.quantity, NEW.unit_price,
            NEW.offer_price, 1, NEW.expires_at);
END"""
FOUND_SQL = f"SELECT available FROM temp.{SEEN} WHERE position < ? ORDER BY position"


def hold(rows):
    """Write the reservation of `rows` (tuples in COLUMNS order, one per line); the stock each line found before it
    was counted, in order, or None when the guard refused (nothing written: the exact path must decide)."""
    database = db.database.obj
    # Alone: when this thread holds the writer lock (a queued reservation would wait for a leader that waits for
    # this thread, or be written into this thread's transaction with other threads' rows), or in memory (one
    # database per connection: no other thread's rows to write there).
    if database.writer.held() or database.database == ":memory:":
        waiting = _Waiting(rows)
        with database.writing():
            _write(database.connection(), [waiting])
        return waiting.answer()
    return _queue.hold(rows)


class _Waiting:
    """One reservation's rows waiting to be written, and then what became of them."""
    __slots__ = ("rows", "woken", "done", "found", "error")

    def __init__(self, rows):
        self.rows, self.woken = rows, threading.Event()
        self.done, self.found, self.error = False, None, None

    def answer(self):
        if self.error is not None:
            raise self.error
        return self.found


class _Queue:
    """Reservations waiting for the writer lock. The first to come leads: it takes the lock and writes the queue's
    rows (its own first) in one statement; once the lock is let go, the next in the queue leads the next batch."""

    def __init__(self):
        self._lock, self._waiting, self._leading = threading.Lock(), deque(), False

    def hold(self, rows):
        me = _Waiting(rows)
        with self._lock:
            self._waiting.append(me)
            lead, self._leading = not self._leading, True
        if not lead:
            me.woken.wait()  # written by a leader, or first in the queue now: then it leads
            if me.done:
                return me.answer()
        self._lead(me)
        return me.answer()

    def _lead(self, me):
        database, batch = db.database.obj, []
        try:
            with database.writing():
                batch = self._take()
                _write(database.connection(), batch)
        except BaseException as err:  # before its rows were taken (the lock failed), or a write was cut short
            with self._lock:
                if me in self._waiting:
                    self._waiting.remove(me)
            for waiting in batch or [me]:
                if not waiting.done:
                    waiting.done, waiting.error = True, err
        finally:
            with self._lock:
                if self._waiting:
                    self._waiting[0].woken.set()  # not done: it leads next
                else:
                    self._leading = False
            for waiting in batch:
                if waiting is not me:
                    waiting.woken.set()

    def _take(self):
        """The queue's first reservations (the leader's first), up to MAX_ROWS rows unless the first has more."""
        with self._lock:
            batch = [self._waiting.popleft()]
            rows = len(batch[0].rows)
            while self._waiting and rows + len(self._waiting[0].rows) <= MAX_ROWS:
                batch.append(self._waiting.popleft())
                rows += len(batch[-1].rows)
        return batch


_queue = _Queue()


def _write(connection, batch):
    """Each waiting reservation's figures (or None: refused), or its error: in one statement when every guard passes,
    else each alone, so that one reservation's refusal or error is never another's."""
    if len(batch) > 1:
        try:
            found = _statement(connection, [row for waiting in batch for row in waiting.rows])
        except Exception:
            found = None
        if found is not None:
            for waiting in batch:
                waiting.found, found = found[:len(waiting.rows)], found[len(waiting.rows):]
                waiting.done = True
            return
    for waiting in batch:
        try:
            waiting.found = _statement(connection, waiting.rows)
        except Exception as err:
            waiting.error = err
        waiting.done = True


def _statement(connection, rows):
    """One guarded statement for `rows` on the writing `connection` (its own commit, unless the thread holding the
    lock is inside a transaction); the stock each found, or None when a guard refused (nothing written). The caller holds the writer lock, so SEEN
    holds this statement's figures. Straight on the sqlite3 connection, errors as peewee's: peewee's cursor and the
    writer lock taken again per statement cost 10-15 µs of CPU per reservation, with the lock held."""
    sql = _insert_sql(len(rows))
    params = [value for position, row in enumerate(rows) for value in (*row, position)]
    for attempt in (1, 2):
        try:
            with __exception_wrapper__:
                connection.execute(sql, params)
                return [available for available, in connection.execute(FOUND_SQL, (len(rows),))]
        except peewee.IntegrityError as err:
            if CHANGED in str(err):
                return None
            raise
        except peewee.OperationalError as err:
            if attempt == 2 or VIEW not in str(err):
                raise
            _install(connection)


@functools.lru_cache(maxsize=MAX_ROWS)
def _insert_sql(count):
    return f"INSERT INTO {VIEW} VALUES " + ", ".join(["(" + ", ".join(["?"] * (len(COLUMNS) + 1)) + ")"] * count)


def _install(connection):
    """The view, SEEN and the trigger on the writing `connection` (a new one has none of them)."""
    for ddl in (VIEW_DDL, SEEN_DDL, TRIGGER_DDL):
        connection.execute(ddl)
