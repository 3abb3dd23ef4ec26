"""Sales and money for `g2a-bridge report`: orders, keys, revenue, G2A fee, CWS cost, profit, returns, per product
or per day, read-only, from two aggregate queries. Money is summed exactly (in ten-thousandths) and shown as Decimal.
"""
import csv
import datetime
import io
import re
from dataclasses import dataclass
from decimal import Decimal

from peewee import JOIN, SQL, Case, Value, fn

from . import db, stuck

CENT = Decimal("0.01")
SCALE = 10_000  # money is summed in SQL as whole ten-thousandths: exact for any price with at most 4 decimals
HALF_UP_NUDGE = 1e-6  # in cents; see _fee_cents
RANKED = 5  # best and worst products shown
EPOCH = datetime.datetime(2000, 1, 1, tzinfo=datetime.timezone.utc)
RELATIVE = re.compile(r"(\d+)([hd])\Z")
COLUMNS = ("key", "name", "orders", "keys", "revenue", "fee", "cost", "profit", "margin", "returned", "reused")


def parse_since(text, now):
    """`24h`, `7d`, `30d` (any count of hours or days) or a date `YYYY-MM-DD` (UTC midnight) -> aware datetime."""
    match = RELATIVE.fullmatch(text.strip().lower())
    if match:
        count, unit = int(match.group(1)), match.group(2)
        return now - datetime.timedelta(**{"hours" if unit == "h" else "days": count})
    try:
        day = datetime.date.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"--since must be like 24h, 7d, 30d or YYYY-MM-DD, got {text!r}") from None
    return datetime.datetime.combine(day, datetime.time(), datetime.timezone.utc)


@dataclass
class Line:
    """Money and counts for one product, one day, or the whole period."""
    key: str
    name: str = ""  # the CWS product's name, on product lines
    orders: int = 0
    keys: int = 0
    revenue: Decimal = Decimal("0.00")
    fee: Decimal = Decimal("0.00")
    cost: Decimal = Decimal("0.00")
    returned: int = 0
    reused: int = 0

    @property
    def profit(self):
        return self.revenue - self.fee - self.cost

    @property
    def margin(self):
        """Profit as a share of revenue, in percent (None without revenue)."""
        return None if not self.revenue else (self.profit * 100 / self.revenue).quantize(Decimal("0.1"))

    def add(self, other):
        self.orders += other.orders
        self.keys += other.keys
        self.revenue += other.revenue
        self.fee += other.fee
        self.cost += other.cost
        self.returned += other.returned
        self.reused += other.reused

    def as_dict(self):
        values = {name: getattr(self, name) for name in COLUMNS}
        return {name: (str(value) if isinstance(value, Decimal) else value) for name, value in values.items()}


@dataclass
class Report:
    since: datetime.datetime
    until: datetime.datetime
    by: str
    currency: str
    total: Line
    rows: list  # per product or per day, as asked
    products: list  # per product, always: for the rankings
    failed: int
    stuck: int

    def ranked(self):
        """(best, worst) products by profit; the worst list holds only products that are not among the best."""
        by_profit = sorted(self.products, key=lambda line: line.profit, reverse=True)
        return by_profit[:RANKED], by_profit[RANKED:][::-1][:RANKED]


def build(settings, since, now, by="product"):
    """The report for orders created from `since` to `now`, rows per product or per day."""
    products = _named(_lines(since, settings.default_fee, "product"))
    days = _lines(since, settings.default_fee, "day")
    total = Line("total")
    for line in days:  # an order falls on one day, so the days' order counts add up (the products' may not)
        total.add(line)
    failed, stuck = _failed_and_stuck(settings, since, now)
    return Report(since, now, by, settings.currency, total, products if by == "product" else days, products,
                  failed, stuck)


def all_time(settings):
    """The total line since the first order: one aggregate query without the orders table (what /metrics reads at
    each scrape)."""
    [line] = _lines(None, settings.default_fee, None) or [Line("total")]
    return line


def _lines(since, default_fee, by):
    """One aggregate query over the order items of orders created since `since` (None: all): a Line per product,
    per day, or (by=None) in total."""
    item, order, product = db.OrderItem, db.Order, db.Product
    sold = item.delivered_at.is_null(False) & (item.state != "returned")
    rate = fn.COALESCE(product.fee, str(default_fee)).cast("DOUBLE PRECISION")
    group = {"product": item.g2a_product_id, "day": fn.DATE(order.created_at).coerce(False), None: Value("total")}[by]
    query = (item.select(group, fn.COUNT(item.order.distinct()), _count(item.delivered_at.is_null(False)),
                         _money(Case(None, [(sold, item.sale_price)])), _fee_cents(sold, item.sale_price, rate),
                         _money(Case(None, [(item.source == "cws", item.unit_cost)])),
                         _count(item.state == "returned"), _count(item.source == "pool"))
             .join(product, JOIN.LEFT_OUTER, on=(item.g2a_product_id == product.g2a_id)))
    if since is not None or by == "day":
        query = query.join(order, on=(item.order == order.id)).where(order.created_at >= (since or EPOCH))
    if by is not None:
        query = query.group_by(SQL("1")).order_by(SQL("1"))
    return [Line(str(key), orders=orders, keys=int(keys or 0), revenue=_decimal(revenue),
                 fee=(Decimal(int(fee_cents)) / 100).quantize(CENT), cost=_decimal(cost), returned=int(returned or 0),
                 reused=int(reused or 0))
            for key, orders, keys, revenue, fee_cents, cost, returned, reused in query.tuples().iterator() if orders]


def _named(lines):
    """The product lines with the CWS product's name (a query on the few products that sold)."""
    ids = [int(line.key) for line in lines]
    names = dict(db.Product.select(db.Product.g2a_id, db.CwsProduct.name).join(db.CwsProduct)
                 .where(db.Product.g2a_id.in_(ids)).tuples()) if ids else {}
    for line in lines:
        line.name = names.get(int(line.key)) or ""
    return lines


def _money(column):
    """SUM of a Decimal-as-text column in whole ten-thousandths: exact on SQLite (no decimal type) and PostgreSQL."""
    scaled = fn.ROUND(column.cast("DOUBLE PRECISION") * SCALE).cast("BIGINT")
    return fn.COALESCE(fn.SUM(scaled), 0)


def _fee_cents(sold, sale_price, rate):
    """G2A's fee on each key sold, rounded half up to the cent, summed in cents. The price (2 decimals) times the
    rate (at most 4) is a whole number of 1/10,000 cents, so the nudge turns a float's x.4999... into the half it
    stands for without moving any other value across a rounding boundary."""
    cents = fn.ROUND(sale_price.cast("DOUBLE PRECISION") * rate * 100 + HALF_UP_NUDGE).cast("BIGINT")
    return fn.COALESCE(fn.SUM(Case(None, [(sold, cents)])), 0)


def _count(condition):
    return fn.SUM(Case(None, [(condition, 1)], 0))


def _failed_and_stuck(settings, since, now):
    """Orders of the period that FAILED, and those stuck otherwise (stuck.py: past their deadline, still paid
    and without every key)."""
    failed = db.Order.select().where(db.Order.created_at >= since, db.Order.state == db.FAILED).count()
    stuck_orders = {order.id for orders in stuck.find(settings, now).values() for order in orders
                    if order.created_at >= since and order.state != db.FAILED}
    return failed, len(stuck_orders)


def _decimal(units):
    return (Decimal(int(units)) / SCALE).quantize(CENT)


# ---- rendering -----------------------------------------------------------------------------------------

def as_json(report):
    best, worst = report.ranked()
    return {"since": report.since.isoformat(), "until": report.until.isoformat(), "by": report.by,
            "currency": report.currency, "total": report.total.as_dict(), "failed_orders": report.failed,
            "stuck_orders": report.stuck, "rows": [line.as_dict() for line in report.rows],
            "best": [line.as_dict() for line in best], "worst": [line.as_dict() for line in worst],
            "loss_makers": [line.key for line in report.products if line.profit < 0]}


def as_csv(report):
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow((report.by,) + COLUMNS[1:])
    for line in report.rows + [report.total]:
        writer.writerow([line.as_dict()[name] for name in COLUMNS])
    return out.getvalue()


def as_text(report):
    total, currency = report.total, report.currency
    lines = [f"sales from {report.since:%Y-%m-%d %H:%M} to {report.until:%Y-%m-%d %H:%M} UTC, in {currency}",
             f"orders {total.orders}, keys delivered {total.keys}; failed orders {report.failed}, "
             f"stuck orders {report.stuck}",
             f"revenue {total.revenue}  G2A fee {total.fee}  CWS cost {total.cost}  profit {total.profit}  "
             f"margin {_percent(total.margin)}",
             f"returns: keys returned {total.returned}, keys reused from the pool {total.reused}", ""]
    lines += _table(report.rows, report.by)
    best, worst = report.ranked()
    lines += ["", "best products by profit:"] + [_ranked(line) for line in best]
    if worst:
        lines += ["worst products by profit:"] + [_ranked(line) for line in worst]
    return "\n".join(lines)


def _table(rows, by):
    header = (f"{by:<16} {'orders':>7} {'keys':>6} {'revenue':>11} {'fee':>9} {'cost':>11} {'profit':>10} "
              f"{'margin':>7}  name")
    return [header] + [f"{line.key:<16} {line.orders:>7} {line.keys:>6} {line.revenue:>11} {line.fee:>9} "
                       f"{line.cost:>11} {line.profit:>10} {_percent(line.margin):>7}  {line.name[:40]}"
                       + ("  LOSS" if line.profit < 0 else "") for line in rows]


def _ranked(line):
    return (f"  {line.key:<16} profit {line.profit:>10}  revenue {line.revenue:>10}  keys {line.keys:>5}  "
            f"{line.name[:40]}" + ("  LOSS" if line.profit < 0 else ""))


def _percent(margin):
    return "-" if margin is None else f"{margin}%"
