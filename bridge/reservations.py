"""Reservations: hold stock for a buyer at checkout, all-or-nothing, never more than CWS can deliver."""
import logging
import threading
from collections import defaultdict, namedtuple
from datetime import timedelta

from . import db, pricing, quickhold
from .contract import Line, stock_entry
from .errors import ContractError
from .ids import new_uuid
from .log import event
from .stock import AVAILABLE_SQL, BALANCE_KEY, available_params, parse_balance

log = logging.getLogger(__name__)
ACTIVE, RELEASED, ORDERED = "active", "released", "ordered"
KNOWN_MAX = 10_000  # products whose last exact read a process keeps for the quick path (~1 kB each)


class Reservations:
    """`observer(outcome)` hears "created" or why a request was refused (metrics)."""

    def __init__(self, settings, refresher, pause_switch, observer=None):
        self.settings, self.refresher, self.pause = settings, refresher, pause_switch
        self.observe = observer or (lambda outcome: None)
        self._known, self._knowing = {}, threading.Lock()  # {g2a id: (SellableProduct, raw row)} of exact reads

    def reserve(self, lines, now, request_id=None):
        """POST /reservation: a new reservation for `lines`, or ContractError (404 unknown, 400 short). On SQLite it is
        first tried in one guarded statement (quickhold.py), from the products' last exact read in this process; the
        exact path decides whenever that is not known, would refuse, or has changed since."""
        reservation_id, expires = new_uuid(), self._expiry(now)

        def hold(sellable):
            stock = self._take(lines, sellable)
            _insert_reservation(reservation_id, now, expires, request_id)
            _insert_lines(reservation_id, lines, sellable.products, expires)
            return stock
        stock = self._quick(lines, now, expires, reservation_id, request_id)
        if stock is None:
            stock = self._in_transaction(lines, now, hold)
        event(log, "reservation.created", reservation=reservation_id,
              products=",".join(str(line.product_id) for line in lines))
        self.observe("created")
        return {"reservation_id": reservation_id, "stock": stock}

    def renew(self, reservation_id, lines, now):
        """PUT /reservation/{id}: re-reserve (even after expiry) with the body's lines, or the old ones if none."""
        reservation = self._get(reservation_id)
        if reservation.state != ACTIVE:
            raise ContractError(400, "BR02", f"reservation {reservation_id} is {reservation.state}")
        lines, expires = lines or self._old_lines(reservation_id), self._expiry(now)

        def hold_again(sellable):
            # Checked again under the write lock: a POST /order that won since the read above would otherwise be
            # left with fresh active lines beside its order, holding stock nobody can buy (test_concurrency.py).
            if not db.Reservation.update(expires_at=expires).where(
                    db.Reservation.id == reservation_id, db.Reservation.state == ACTIVE).execute():
                raise ContractError(400, "BR02", f"reservation {reservation_id} is no longer active")
            # Replaced, not deactivated: an empty-body renewal re-reads "the lines" and must find only today's,
            # or each empty PUT added every line the reservation ever had (issue 12, item 1).
            db.ReservationLine.delete().where(db.ReservationLine.reservation == reservation_id).execute()
            stock = self._take(lines, _read_sellable(list(sellable.products), now))  # without the lines let go
            _insert_lines(reservation_id, lines, sellable.products, expires)
            return stock
        stock = self._in_transaction(lines, now, hold_again)
        event(log, "reservation.renewed", reservation=reservation_id)
        return {"reservation_id": reservation_id, "stock": stock}

    def release(self, reservation_id):
        """DELETE /reservation/{id}: give the stock back. Releasing twice is harmless; an ordered one stays ordered."""
        self._get(reservation_id)
        with db.write_transaction():  # only while still active: a POST /order may have won since (it stays ordered)
            released = db.Reservation.update(state=RELEASED).where(
                db.Reservation.id == reservation_id, db.Reservation.state == ACTIVE).execute()
            if released:
                self._deactivate_lines(reservation_id)
        if released:
            event(log, "reservation.released", reservation=reservation_id)

    def _get(self, reservation_id):
        reservation = db.Reservation.get_or_none(db.Reservation.id == reservation_id)
        if reservation is None:
            raise ContractError(404, "BR02", f"reservation {reservation_id} not found")
        return reservation

    def _in_transaction(self, lines, now, write):
        """`write(sellable)`'s answer, in one write transaction that first reads the lines' products with their
        stock and the CWS balance (one statement, through the process's writing connection, whose page cache
        other threads' commits don't drop). Refused there: products we don't sell (404), a paused store, prices
        below cost. Products whose CWS state was not read alone lately are re-read from CWS first, outside any
        transaction (never while holding the writer lock), and the transaction starts again on what that stored."""
        ids = [line.product_id for line in lines]
        refreshed = False
        while True:
            with db.write_transaction():
                sellable = _read_sellable(ids, now)
                self._remember(sellable)
                self._check_sellable(lines, ids, sellable)
                stale = [] if refreshed else self._stale(sellable.products, now)
                if not stale:
                    for line in lines:
                        self._check_price(line, sellable.products[line.product_id])
                    return write(sellable)
            self.refresher.refresh(stale, now)
            refreshed = True

    def _quick(self, lines, now, expires, reservation_id, request_id):
        """The reservation in one guarded statement, decided on what the last exact read saw of its products; its
        stock answer, or None when the exact path must decide (unknown here, would be refused, or changed since)."""
        known = [self._known.get(line.product_id) for line in lines]
        if not db.is_sqlite() or None in known or self.pause.is_paused():
            return None
        products = {product.g2a_id: product for product, _ in known}
        raw = {product.g2a_id: row for product, row in known}
        balance = parse_balance(known[0][1][9])
        demand = _demand(lines, products)
        unlimited = _payable(dict.fromkeys(demand, float("inf")), products, balance)  # stock: the statement's guard
        if (self._stale(products, now) or _shortfall(lines, products, unlimited, balance, demand)
                or any(self._loss_floor(line, products[line.product_id]) is not None for line in lines)):
            return None
        moment, money = db.Reservation.expires_at.db_value, MONEY.db_value
        found = quickhold.hold([(reservation_id, ACTIVE, moment(now), moment(expires), request_id, line.product_id,
                                 raw[line.product_id][1], line.quantity, money(line.unit_price),
                                 *_product_facts(raw[line.product_id])) for line in lines])
        if found is None:
            return None
        available = {}
        for line, count in zip(lines, found):  # a product's first line saw its stock before this reservation
            available.setdefault(products[line.product_id].cws_product_id, max(0, int(count)))
        return self._stock(lines, _left(_payable(available, products, balance), demand), products)

    def _stale(self, products, now):
        """The CWS products among `products` whose state was not read alone lately (to be re-read first)."""
        return self.refresher.stale({p.cws_product_id: p.checked_at for p in products.values()}, now)

    def _remember(self, sellable):
        """Keep what an exact read saw of its products, for the quick path (SQLite only; the oldest go first)."""
        if not db.is_sqlite():
            return
        with self._knowing:
            for g2a_id, product in sellable.products.items():
                self._known.pop(g2a_id, None)
                self._known[g2a_id] = (product, sellable.rows[g2a_id])
            while len(self._known) > KNOWN_MAX:
                del self._known[next(iter(self._known))]

    def _check_sellable(self, lines, ids, sellable):
        unknown = [str(pid) for pid in ids if pid not in sellable.products]
        if unknown:
            self.observe("unknown_product")
            raise ContractError(404, "BR02", f"product {', '.join(unknown)} is not sold here")
        if self.pause.is_paused():
            raise self._short(lines, {}, sellable.products, "paused", "the seller has paused sales")

    def _check_price(self, line, product):
        """Refuse a sale below what the key costs us plus G2A's fee: that would lose money."""
        floor = self._loss_floor(line, product)
        if floor is not None:
            event(log, "reservation.refused_loss", level=logging.WARNING, product=line.product_id,
                  unit_price=line.unit_price, break_even=floor)
            self.observe("below_cost")
            raise ContractError(400, "BR02", f"product {line.product_id}: unit price {line.unit_price} "
                                             f"is below our cost")

    def _loss_floor(self, line, product):
        """The break-even price `line` sells below, or None when it sells at or above it (or either is unknown)."""
        if line.unit_price is None or product.cost is None:
            return None
        fee = product.fee if product.fee is not None else self.settings.default_fee
        floor = pricing.break_even_price(product.cost, fee)
        return floor if line.unit_price < floor else None

    def _take(self, lines, sellable):
        """Inside the write transaction: check every line fits, or raise with what is available."""
        products, balance = sellable.products, sellable.balance
        available = _payable(sellable.available, products, balance)
        demand = _demand(lines, products)
        why = _shortfall(lines, products, available, balance, demand)
        if why:
            raise self._short(lines, available, products, "out_of_stock", why)
        return self._stock(lines, _left(available, demand), products)

    def _short(self, lines, available, products, reason, why):
        event(log, "reservation.refused", reason=why, products=",".join(str(line.product_id) for line in lines))
        self.observe(reason)
        return ContractError(400, "BR02", why, extra={"stock": self._stock(lines, available, products)})

    @staticmethod
    def _stock(lines, available, products):
        """The `stock` array G2A sees: never negative, zero when disabled, never above max_stock."""
        entries = []
        for line in lines:
            product = products[line.product_id]
            shown = max(0, available.get(product.cws_product_id, 0)) if product.enabled else 0
            if product.max_stock is not None:
                shown = min(shown, product.max_stock)
            entries.append(stock_entry(line.product_id, shown))
        return entries

    @staticmethod
    def _deactivate_lines(reservation_id):
        db.ReservationLine.update(active=False).where(db.ReservationLine.reservation == reservation_id).execute()

    @staticmethod
    def _old_lines(reservation_id):
        return [Line(row.g2a_product_id, row.quantity, row.unit_price) for row in db.ReservationLine.select().where(
            db.ReservationLine.reservation == reservation_id)]

    def _expiry(self, now):
        return now + timedelta(seconds=self.settings.reservation_ttl)


MONEY = db.MoneyField()  # its conversions, without building a field per call
SellableProduct = namedtuple("SellableProduct", "g2a_id cws_product_id enabled max_stock fee cost checked_at offer_price")
# What a reservation reads: {g2a id: SellableProduct}, {cws id: available before the floor}, the known balance, and
# {g2a id: the row as read} (the quick path's guard compares those values with the database's).
Sellable = namedtuple("Sellable", "products available balance rows")
# The statements below are hand-written because they run on every reservation and peewee spent longer
# building them than the database spent running them (bench/reservation_bench.py: 4.7 -> 1.0 ms).
SELLABLE_SQL = ("SELECT p.g2a_id, p.cws_product_id, p.enabled, p.max_stock, p.fee, c.cost, c.checked_at, p.offer_price, "
                + AVAILABLE_SQL + f", ({db.SETTING_SQL}) "
                "FROM product p JOIN cws_product c ON c.id = p.cws_product_id WHERE p.mapped AND p.g2a_id IN ({ids})")
INSERT_RESERVATION_SQL = ("INSERT INTO reservation (id, state, created_at, expires_at, request_id) "
                          "VALUES ({p}, {p}, {p}, {p}, {p})")
INSERT_LINE_SQL = ("INSERT INTO reservation_line (reservation_id, g2a_product_id, cws_product_id, quantity, "
                   "unit_price, offer_price, active, expires_at) VALUES ({p}, {p}, {p}, {p}, {p}, {p}, {p}, {p})")


def _insert_lines(reservation_id, lines, products, expires_at):
    moment, money = db.ReservationLine.expires_at.db_value(expires_at), MONEY.db_value
    rows = [(reservation_id, line.product_id, products[line.product_id].cws_product_id, line.quantity,
             money(line.unit_price), money(products[line.product_id].offer_price), True, moment)
            for line in lines]
    db.database.obj.cursor().executemany(db.sql(INSERT_LINE_SQL), rows)


def _insert_reservation(reservation_id, now, expires_at, request_id):
    moment = db.Reservation.expires_at.db_value
    db.database.obj.execute_sql(db.sql(INSERT_RESERVATION_SQL),
                                (reservation_id, ACTIVE, moment(now), moment(expires_at), request_id))


def _read_sellable(g2a_ids, now):
    """The Sellable of the mapped ones among `g2a_ids`, in one statement; inside a write transaction. On
    PostgreSQL the CWS rows are locked (in id order) and their stock read again under the locks."""
    rows = _sellable_rows(g2a_ids, now)
    if rows and not db.is_sqlite():
        db.lock_rows(db.CwsProduct, sorted({row[1] for row in rows}))
        rows = _sellable_rows(g2a_ids, now)
    money, moment = MONEY.python_value, db.CwsProduct.checked_at.python_value
    products = {row[0]: SellableProduct(row[0], row[1], bool(row[2]), row[3], money(row[4]), money(row[5]),
                                        moment(row[6]), money(row[7])) for row in rows}
    available = {row[1]: max(0, int(row[8])) for row in rows}
    return Sellable(products, available, parse_balance(rows[0][9]) if rows else None, {row[0]: row for row in rows})


def _product_facts(row):
    """What the quick path's guard checks of a product, from its SELLABLE_SQL row, in quickhold.COLUMNS' order:
    offer_price, enabled, max_stock, fee, cost, checked_at, balance."""
    return row[7], row[2], row[3], row[4], row[5], row[6], row[9]


def _sellable_rows(g2a_ids, now):
    database = db.database.obj
    sql = SELLABLE_SQL.format(p=database.param, ids=", ".join([database.param] * len(g2a_ids)))
    return database.execute_sql(sql, available_params(now) + [BALANCE_KEY, *g2a_ids]).fetchall()


def _demand(lines, products):
    """{cws id: keys wanted}: two G2A products may sell one CWS product."""
    demand = defaultdict(int)
    for line in lines:
        demand[products[line.product_id].cws_product_id] += line.quantity
    return demand


def _shortfall(lines, products, available, balance, demand):
    """Why the lines cannot all be held from `available` (payable stock by CWS id), or None when they can."""
    if any(not products[line.product_id].enabled for line in lines) or any(
            wanted > available.get(cws_id, 0) for cws_id, wanted in demand.items()):
        return "not enough stock"
    if not _balance_covers(demand, products, balance):
        return "the CWS balance cannot pay for it"
    return None


def _left(available, demand):
    return {cws_id: available.get(cws_id, 0) - wanted for cws_id, wanted in demand.items()}


def _costs(products):
    return {product.cws_product_id: product.cost for product in products.values()}


def _payable(available, products, balance):
    """Stock we can pay for: none without a CWS price for one key (no band covers 1: no cost, no loss guard),
    and no more than the known CWS balance buys (after CWS refused a purchase for balance, or when the balance
    is below one key, G2A sees 0 rather than keys every sale of which would fail)."""
    costs = _costs(products)
    capped = {}
    for cws_id, count in available.items():
        affordable = 0 if costs.get(cws_id) is None else pricing.units_affordable(balance, costs[cws_id])
        capped[cws_id] = count if affordable is None else min(count, affordable)
    return capped


def _balance_covers(demand, products, balance):
    """Every line together within the balance (each was checked alone by _payable; costs are known there)."""
    costs = _costs(products)
    return balance is None or sum(costs[cws_id] * wanted for cws_id, wanted in demand.items()) <= balance


def expire_reservations(now):
    """Cleanup job: lines of expired reservations stop counting (reads already ignore them; this keeps sums small).
    Looked up per product through the stock index, so the cost follows the catalogue, not the history of lines."""
    line = db.ReservationLine
    return line.update(active=False).where(
        line.cws_product_id.in_(db.CwsProduct.select(db.CwsProduct.id)), line.active == True,  # noqa: E712
        line.expires_at <= now).execute()
