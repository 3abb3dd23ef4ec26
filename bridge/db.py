"""The database: connection from DATABASE_URL (SQLite in WAL mode or PostgreSQL), models and invariants.

Both processes share it. Money invariants live here as unique indexes: one order per
reservation, one order per G2A order id, one CWS client order id, one item per CWS code.
"""
import contextlib
import datetime
import json
import threading
from decimal import Decimal
from pathlib import Path
from urllib.parse import unquote, urlsplit

from peewee import (BigIntegerField, BooleanField, CharField, DatabaseProxy, DateTimeField,
                    ForeignKeyField, IntegerField, Model, PostgresqlDatabase, SqliteDatabase,
                    TextField)

from .errors import ConfigError

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
    fetched_at = UtcDateTimeField(null=True)
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
    """An access token we issued to G2A, stored as its SHA-256 only."""
    token_hash = CharField(primary_key=True, max_length=64)
    client_id = CharField(max_length=128)
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


def _sqlite(path):
    # sqlite:///relative.db -> "/relative.db" after the scheme; sqlite:////abs.db -> "//abs.db".
    path = path[1:] if path.startswith("/") else path
    if path != ":memory:":
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    # synchronous=FULL: a committed purchase claim must survive a power cut, not just a crash.
    # cached_statements: each thread has its own connection, and each IN (...) length is a statement of its own;
    # Python's default of 128 prepared statements per connection grew the worker by ~10 MB in a soak.
    return SqliteDatabase(path, timeout=8, check_same_thread=False, cached_statements=STATEMENT_CACHE, pragmas={
        "journal_mode": "wal", "busy_timeout": 8000, "foreign_keys": 1, "synchronous": "full"})


def is_sqlite(db=None):
    return isinstance(db or database.obj, SqliteDatabase)


# SQLite has one writer at a time. Threads of one process queue on this mutex and hand over at once;
# left to SQLite's busy handler they would sleep in steps of up to 100 ms (p99 in bench/).
_sqlite_writer = threading.RLock()


@contextlib.contextmanager
def write_transaction(db=None):
    """A transaction that takes the write lock up front (SQLite IMMEDIATE), so read-then-write can't race."""
    db = db or database.obj
    if not is_sqlite(db):
        with db.atomic():
            yield
        return
    with _sqlite_writer, db.atomic("IMMEDIATE"):
        yield


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


def get_setting(key, default=None):
    row = Setting.get_or_none(Setting.key == key)
    return default if row is None else row.value


def put_setting(key, value):
    Setting.insert(key=key, value=str(value), updated_at=utcnow()).on_conflict(
        conflict_target=[Setting.key], update={Setting.value: str(value), Setting.updated_at: utcnow()}
    ).execute()
