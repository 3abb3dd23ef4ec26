"""The database: connection from DATABASE_URL (SQLite in WAL mode or PostgreSQL), models and invariants.

Both processes share it. Money invariants live here as unique indexes: one order per
reservation, one order per G2A order id, one CWS client order id, one item per CWS code.
"""
import contextlib
import datetime
import json
import os
from decimal import Decimal
from pathlib import Path
from urllib.parse import unquote, urlsplit

from peewee import (BigIntegerField, BooleanField, CharField, DatabaseProxy, DateTimeField,
                    ForeignKeyField, IntegerField, Model, PostgresqlDatabase, SqliteDatabase,
                    TextField, __exception_wrapper__)

from .errors import ConfigError
from .writelock import WriterLock

database = DatabaseProxy()

# Order states. CLAIMED: intent committed, the CWS outcome is not known yet (maybe never sent,
# maybe bought). FULFILLING: CWS accepted, codes outstanding. PREORDER: CWS holds pre-order
# placeholders. COMPLETED: every key stored. FAILED: given up, an admin may `retry`.
CLAIMED, FULFILLING, PREORDER, COMPLETED, FAILED = "claimed", "fulfilling", "preorder", "completed", "failed"
ORDER_STATES = (CLAIMED, FULFILLING, PREORDER, COMPLETED, FAILED)
ORDER_TRANSITIONS = {
    CLAIMED: {FULFILLING, PREORDER, COMPLETED, FAILED},
    FULFILLING: {PREORDER, COMPLETED, FAILED},
    PREORDER: {FULFILLING, COMPLETED, FAILED},
    FAILED: {CLAIMED, FULFILLING, PREORDER, COMPLETED},
    COMPLETED: set(),
}


def utcnow():
    return datetime.datetime.now(datetime.timezone.utc)


class UtcDateTimeField(DateTimeField):
    """Aware UTC datetimes in Python, naive UTC in the database (same on SQLite and PostgreSQL)."""

    def db_value(self, value):
        if isinstance(value, datetime.datetime) and value.tzinfo is not None:
            value = value.astimezone(datetime.timezone.utc).replace(tzinfo=None)
        return super().db_value(value)

    def python_value(self, value):
        value = super().python_value(value)
        if isinstance(value, datetime.datetime) and value.tzinfo is None:
            value = value.replace(tzinfo=datetime.timezone.utc)
        return value


class MoneyField(TextField):
    """Decimal stored as text, so SQLite never turns a price into a float."""

    def db_value(self, value):
        return None if value is None else str(Decimal(value))

    def python_value(self, value):
        return None if value is None else Decimal(value)


class JsonField(TextField):
    def db_value(self, value):
        return None if value is None else json.dumps(value, separators=(",", ":"), default=str)

    def python_value(self, value):
        return None if value is None else json.loads(value)


class BaseModel(Model):
    class Meta:
        database = database
        legacy_table_names = False


class Setting(BaseModel):
    """Small persisted switches and facts (the pause flag, last sync pass, CWS balance...)."""
    key = CharField(primary_key=True, max_length=64)
    value = TextField()
    updated_at = UtcDateTimeField(default=utcnow)


class CwsProduct(BaseModel):
    """Last known CWS state of a product; `quantity` is lowered locally as soon as we buy."""
    id = CharField(primary_key=True, max_length=64)
    name = TextField(default="")
    quantity = IntegerField(default=0)
    cost = MoneyField(null=True)  # unit price for quantity 1, the cost basis of a G2A sale
    prices = JsonField(default=list)  # tiers [{"from": 1, "to": 9, "value": "6.32"}]
    listed = BooleanField(default=True)  # False once CWS says it is gone (404 / PRODUCT_HIDDEN)
    fetched_at = UtcDateTimeField(null=True)  # the last CWS answer about it: a sweep page, a batch or a single read
    # The last read of this product alone (the web's freshness check, the priority lane): only these spare a
    # reservation its own re-read (docs/decisions.md, "Upstream budgets: one catalogue window ..., what a reservation trusts").
    checked_at = UtcDateTimeField(null=True)
    dirty_since = UtcDateTimeField(null=True, index=True)  # a postback asked for a prompt re-fetch


class Product(BaseModel):
    """One products.json mapping (a G2A product sold from a CWS product) and its G2A offer as last confirmed."""
    g2a_id = BigIntegerField(primary_key=True)
    cws_product = ForeignKeyField(CwsProduct, column_name="cws_product_id", backref="mappings")
    mapped = BooleanField(default=True)  # False once removed from products.json: deactivated, kept
    enabled = BooleanField(default=True)
    fixed_profit = MoneyField(null=True)
    fee = MoneyField(null=True)
    min_price = MoneyField(null=True)
    max_price = MoneyField(null=True)
    max_stock = IntegerField(null=True)
    offer_id = CharField(null=True, max_length=64)
    offer_price = MoneyField(null=True)
    offer_stock = IntegerField(null=True)
    offer_active = BooleanField(null=True)
    price_limit_min = MoneyField(null=True)
    price_limit_max = MoneyField(null=True)
    sync_state = CharField(default="pending", index=True, max_length=16)  # in_sync / pending / failed
    sync_error = TextField(null=True)
    synced_at = UtcDateTimeField(null=True)
    missing_offer_warned = BooleanField(default=False)


class Reservation(BaseModel):
    id = CharField(primary_key=True, max_length=36)
    # No secondary indexes: every read is by id, and each index is one more page per reservation commit.
    state = CharField(default="active", max_length=16)  # active / released / ordered
    created_at = UtcDateTimeField(default=utcnow)
    expires_at = UtcDateTimeField()
    request_id = CharField(null=True, max_length=64)


class ReservationLine(BaseModel):
    """One product line; `active` and `expires_at` are copied from the reservation so stock sums read one table."""
    reservation = ForeignKeyField(Reservation, backref="lines", on_delete="CASCADE")
    product = ForeignKeyField(Product, column_name="g2a_product_id", index=False)
    cws_product_id = CharField(max_length=64)
    quantity = IntegerField()
    unit_price = MoneyField(null=True)  # what the buyer pays per unit (G2A's additional_data.unit_price)
    offer_price = MoneyField(null=True)  # our G2A offer price when reserved: the sale price when G2A sends none
    active = BooleanField(default=True)
    expires_at = UtcDateTimeField()

    class Meta:
        # Covers the stock sum (quantity included): reservations read it without touching the table.
        indexes = ((("cws_product_id", "active", "expires_at", "quantity"), False),)


class Order(BaseModel):
    id = CharField(primary_key=True, max_length=36)
    reservation = ForeignKeyField(Reservation, unique=True, backref="orders")
    g2a_order_id = BigIntegerField(unique=True)
    state = CharField(index=True, max_length=16)
    cws_client_order_id = CharField(unique=True, max_length=64)
    cws_order_id = CharField(null=True, unique=True, max_length=64)
    created_at = UtcDateTimeField(default=utcnow, index=True)  # the report reads orders by period
    updated_at = UtcDateTimeField(default=utcnow)
    placed_at = UtcDateTimeField(null=True)
    completed_at = UtcDateTimeField(null=True)
    next_check_at = UtcDateTimeField(null=True, index=True)
    check_count = IntegerField(default=0)
    failure = TextField(null=True)
    request_id = CharField(null=True, max_length=64)
    sale_total = MoneyField(null=True)  # what buyers pay, before G2A's fee
    cost_total = MoneyField(null=True)  # what CWS charged


class OrderItem(BaseModel):
    """One key of an order. The id is assigned once at claim time and never changes (G2A returns by it)."""
    id = CharField(primary_key=True, max_length=36)
    order = ForeignKeyField(Order, backref="items", on_delete="CASCADE")
    position = IntegerField()
    g2a_product_id = BigIntegerField()
    cws_product_id = CharField(index=True, max_length=64)
    source = CharField(default="cws", max_length=8)  # cws / pool
    kind = CharField(default="text", max_length=8)  # text / file / account
    state = CharField(default="pending", index=True, max_length=16)  # pending / delivered / returned
    cws_code_id = CharField(null=True, unique=True, max_length=64)
    preorder_code_id = CharField(null=True, index=True, max_length=64)  # CWS's placeholder, for PREORDER postbacks
    secret = TextField(null=True)  # encrypted: the key, the file bytes or the account JSON
    file_name = CharField(null=True)
    mime_type = CharField(null=True, max_length=64)
    fingerprint = CharField(null=True, index=True, max_length=64)
    sale_price = MoneyField(null=True)  # what the buyer paid for this unit (the reservation line's unit_price)
    unit_cost = MoneyField(null=True)
    delivered_at = UtcDateTimeField(null=True)
    returned_at = UtcDateTimeField(null=True)

    class Meta:
        indexes = ((("order", "position"), True),)


class PooledKey(BaseModel):
    """A key G2A returned; the next order of that CWS product takes it before buying again."""
    cws_product_id = CharField(index=True, max_length=64)
    returned_item = ForeignKeyField(OrderItem, unique=True, backref="pooled")
    taken_by = ForeignKeyField(OrderItem, null=True, unique=True, backref="from_pool")
    created_at = UtcDateTimeField(default=utcnow)


class ApiToken(BaseModel):
    """An access token we issued, stored as its SHA-256 only, with the pair it was issued to."""
    token_hash = CharField(primary_key=True, max_length=64)
    client_id = CharField(max_length=128)
    scope = CharField(max_length=16, default="contract")  # auth.CONTRACT or auth.METRICS
    created_at = UtcDateTimeField(default=utcnow)
    expires_at = UtcDateTimeField(index=True)


class Notification(BaseModel):
    """What G2A POSTs to /notifications, kept whole."""
    received_at = UtcDateTimeField(default=utcnow, index=True)
    notification_type = CharField(max_length=64)
    offer_id = CharField(null=True, max_length=64)
    auction_id = CharField(null=True, max_length=64)
    message = TextField(null=True)
    payload = JsonField()


class Alert(BaseModel):
    """An alert to deliver (outbox); `dedupe_key` keeps one alert per subject per window."""
    created_at = UtcDateTimeField(default=utcnow, index=True)
    kind = CharField(max_length=64)
    dedupe_key = CharField(index=True, max_length=255)
    text = TextField()
    sent_at = UtcDateTimeField(null=True, index=True)
    attempts = IntegerField(default=0)


class Lease(BaseModel):
    """Single-instance guard: the worker that holds a fresh lease row runs the money jobs."""
    name = CharField(primary_key=True, max_length=64)
    holder = CharField(max_length=128)
    expires_at = UtcDateTimeField()
    heartbeat_at = UtcDateTimeField(default=utcnow)


class PriceChange(BaseModel):
    """Price writes sent to G2A, for the per-product hourly budget."""
    g2a_product_id = BigIntegerField()
    at = UtcDateTimeField(default=utcnow)

    class Meta:
        indexes = ((("g2a_product_id", "at"), False),)


MODELS = [Setting, CwsProduct, Product, Reservation, ReservationLine, Order, OrderItem,
          PooledKey, ApiToken, Notification, Alert, Lease, PriceChange]


def connect(url):
    """A peewee Database for DATABASE_URL, bound to the models' proxy."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme == "sqlite":
        db = _sqlite(url[len("sqlite://"):])
    elif scheme in ("postgres", "postgresql"):
        db = _Postgresql(
            unquote(parts.path.lstrip("/")), host=parts.hostname, port=parts.port,
            user=unquote(parts.username or "") or None, password=unquote(parts.password or "") or None)
    else:
        raise ConfigError([f"DATABASE_URL: unsupported scheme {scheme!r}"])
    database.initialize(db)
    return db


class _Postgresql(PostgresqlDatabase):
    def cursor(self, named_cursor=None):
        # A server restart or failover kills every open connection; psycopg2 marks one closed when a statement
        # fails on it. Each thread keeps its own, so start the next statement on a new one instead of failing forever.
        conn = self._state.conn
        if conn is not None and conn.closed and not self.in_transaction():
            self._state.reset()
        return super().cursor(named_cursor)


STATEMENT_CACHE = 16  # prepared statements kept per SQLite connection (bench/soak.py, docs/decisions.md)
PAGE_CACHE_KB = 256  # database pages kept per SQLite connection (SQLite's default: 2,000 KiB)


def _sqlite(path):
    # sqlite:///relative.db -> "/relative.db" after the scheme; sqlite:////abs.db -> "//abs.db".
    path = path[1:] if path.startswith("/") else path
    if path != ":memory:":
        _create_private(Path(path))
    # synchronous=FULL: a committed purchase claim must survive a power cut, not just a crash.
    # cached_statements: each thread has its own connection, and each IN (...) length is a statement of its own;
    # Python's default of 128 prepared statements per connection grew the worker by ~10 MB in a soak.
    # cache_size: a connection drops its whole page cache whenever another process has written the WAL since its
    # last read, so with a write every few ms a big cache holds nothing for long, but each connection's C heap
    # grows to the largest read it ever did (up to 2 MB each at SQLite's default; the worker has 12).
    return _Sqlite(path, timeout=8, check_same_thread=False, cached_statements=STATEMENT_CACHE, pragmas={
        "journal_mode": "wal", "busy_timeout": 8000, "foreign_keys": 1, "synchronous": "full",
        "cache_size": -PAGE_CACHE_KB})


def _create_private(path):
    """A new database file 0600 in a new folder 0700, whatever the umask (SQLite makes its -wal and -shm files with
    the database file's mode); existing ones are left as the operator set them."""
    if not path.parent.exists():
        path.parent.mkdir(parents=True, mode=0o700, exist_ok=True)
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        pass


class _Sqlite(SqliteDatabase):
    """Every write queues on one WriterLock (threads and processes): write_transaction() holds it for the whole
    transaction, a write statement outside any transaction (autocommit) for that statement. SQLite's busy handler
    would make a writer waiting on another process sleep in growing steps instead (p99 ×10 in bench/).

    While it holds the lock, a thread writes through the process's one writing connection, not its own: a connection
    drops its whole page cache when anyone committed since its last read, so with eight threads each writing on its
    own connection every transaction began cold (bench/reservation_bench.py, 1 connection: 682 -> 588 µs of CPU per
    reservation)."""

    def __init__(self, path, **kwargs):
        super().__init__(path, **kwargs)
        self.writer = WriterLock(None if path == ":memory:" else f"{path}-writer.lock")
        self._writing_connection = None

    def execute_sql(self, sql, params=None):
        if self.in_transaction() or sql.lstrip()[:6].upper() in _READS:
            return super().execute_sql(sql, params)
        with self.writing():
            return super().execute_sql(sql, params)

    @contextlib.contextmanager
    def writing(self):
        """Hold the writer lock, this thread's statements on the writing connection until the outermost hold ends.
        An in-memory database is one database per connection, so there each thread keeps its own."""
        with self.writer:
            state = self._state
            if self.database == ":memory:" or (state.conn is not None and state.conn is self._writing_connection):
                yield
                return
            own = (state.closed, state.conn, state.ctx, state.transactions, state.commit_callbacks)
            state.set_connection(self._writing())
            try:
                yield
            finally:
                state.closed, state.conn, state.ctx, state.transactions, state.commit_callbacks = own

    def _writing(self):
        if self._writing_connection is None:
            with __exception_wrapper__:  # sqlite3's errors as peewee's, as connect() raises them
                connection = self._connect()
                self._initialize_connection(connection)
            self._writing_connection = connection
        return self._writing_connection

    def connections(self):
        """This thread's connection and the writing one (either may be None): what runs this thread's statements."""
        return self._state.conn, self._writing_connection

    def close(self):
        """This thread's connection; the writing one is let go, not closed, as another thread may be writing on it
        (closing a connection in use crashes the interpreter): it closes when its last user is done."""
        self._writing_connection = None
        return super().close()


_READS = ("SELECT", "PRAGMA")


def is_sqlite(db=None):
    return isinstance(db or database.obj, SqliteDatabase)


@contextlib.contextmanager
def write_transaction(db=None):
    """A transaction that holds the writer lock and SQLite's write lock (IMMEDIATE) from the start, so
    read-then-write can't race; on SQLite every transaction must be one of these (a deferred one that
    writes would meet another process's writer mid-way). PostgreSQL: a plain transaction, rows locked
    with lock_rows()."""
    db = db or database.obj
    if not is_sqlite(db):
        with db.atomic():
            yield
        return
    with db.writing(), db.atomic("IMMEDIATE"):
        yield


# ---- hand-written statements for the hot paths (reservations, orders): peewee spent longer building a query than
# SQLite spent running it. `{p}` marks a parameter, in either database's style.

def sql(template):
    return template.format(p=database.obj.param)


def run_sql(template, *params):
    """Run a hand-written statement; its cursor."""
    return database.obj.execute_sql(sql(template), params)


def raw_rows(model, template, *params):
    """Model instances (fields converted as usual) from a hand-written SELECT of the model's columns."""
    return list(model.raw(sql(template), *params))


def lock_rows(model, ids):
    """Row locks (FOR UPDATE, in id order) on PostgreSQL; SQLite's IMMEDIATE transaction already serialises writers."""
    if not is_sqlite():
        list(model.select(model._meta.primary_key).where(model._meta.primary_key.in_(list(ids)))
             .order_by(model._meta.primary_key).for_update())


def data_dir(url):
    """Where the bridge keeps local files (the generated secret key): beside the SQLite file, else ./data."""
    if url.lower().startswith("sqlite:"):
        path = url[len("sqlite://"):]
        path = path[1:] if path.startswith("/") else path
        if path != ":memory:":
            return Path(path).parent
    return Path("data")


SETTING_SQL = 'SELECT value FROM setting WHERE "key" = {p}'  # one setting's value; also a reservation's subquery


def get_setting(key, default=None):
    # Hand-written: peewee took ~0.2 ms to build this query, and it runs on hot paths.
    row = run_sql(SETTING_SQL, key).fetchone()
    return default if row is None else row[0]


def put_setting(key, value):
    Setting.insert(key=key, value=str(value), updated_at=utcnow()).on_conflict(
        conflict_target=[Setting.key], update={Setting.value: str(value), Setting.updated_at: utcnow()}
    ).execute()
