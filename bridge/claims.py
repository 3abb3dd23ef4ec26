"""Order rows: the claim transaction of POST /order and every later change of an order's state (database only).

The claim commits before anything is bought (STYLE 15): reservation used, order and items created with
ids that never change, pooled keys taken, all in one transaction.
"""
from datetime import timedelta

from peewee import IntegrityError

from . import db
from .errors import ContractError
from .ids import new_uuid
from .keys import PENDING, TEXT, KeyStore, order_items
from .reservations import ACTIVE, ORDERED

WAITING = (db.FULFILLING, db.PREORDER)  # states that may be re-set to themselves (a new check time)
# Re-sending a purchase CWS shows no trace of waits CWS_RESEND_GRACE_SECONDS after the last POST went out
# (placed_at moves before each attempt, the re-send after a 401 too): the earlier POST must be over, and
# CWS's history gets time to show an order it did take (cws.md 3.5 suggests ~2 min). Never below
# MAX_POST_TIMEOUTS x CWS_TIMEOUT_MS, with room for a POST that outlasts its connect + read timeouts.
MAX_POST_TIMEOUTS = 6


def resend_grace(settings):
    """Seconds after the last POST of a purchase before it may be sent again (CWS showing no trace of it)."""
    return max(settings.cws_resend_grace, MAX_POST_TIMEOUTS * settings.cws_timeout)


def client_order_id(g2a_order_id):
    """Our id for the CWS purchase: stable across retries and restarts, the handle of crash recovery."""
    return f"g2a-{g2a_order_id}"


def claim(reservation_id, g2a_order_id, now, request_id=None, check_at=None, clock=None):
    """Turn an active reservation into an order (CLAIMED, or COMPLETED when returned keys cover it).

    404 unknown reservation, 409 already ordered (this reservation or this G2A order), 410 expired or released.
    Expiry is judged by `clock()` (default: `now`) once the write lock is held, i.e. at commit time: a request
    that arrived in time but waited for the lock past the reservation's end finds it expired (its stock was
    offered again)."""
    try:
        with db.write_transaction():
            _claimable(reservation_id, g2a_order_id, clock() if clock else now)
            lines = db.raw_rows(db.ReservationLine, ACTIVE_LINES_SQL, reservation_id)
            if not lines:
                raise ContractError(410, "BR02", f"reservation {reservation_id} holds no stock any more")
            order_id = new_uuid()
            _insert_order(order_id, reservation_id, g2a_order_id, now, request_id, check_at, _sale_total(lines))
            items = _create_items(order_id, lines)
            if KeyStore.fill_from_pool(items, now) == len(items):
                db.Order.update(state=db.COMPLETED, completed_at=now, placed_at=None, next_check_at=None).where(
                    db.Order.id == order_id).execute()
            db.run_sql("UPDATE reservation SET state = {p} WHERE id = {p}", ORDERED, reservation_id)
            db.run_sql("UPDATE reservation_line SET active = {p} WHERE reservation_id = {p}", False, reservation_id)
    except IntegrityError:  # a concurrent claim won between our check and our insert (PostgreSQL)
        raise _conflict(_existing(reservation_id, g2a_order_id)) from None
    return get_order(order_id)


# Hand-written: these run several times per POST /order, and peewee spent longer building them than the
# database spent running them (bench/contention_bench.py).
ACTIVE_LINES_SQL = "SELECT * FROM reservation_line WHERE reservation_id = {p} AND active = TRUE ORDER BY id"
ORDER_SQL = 'SELECT * FROM "order" WHERE id = {p}'
INSERT_ORDER_SQL = ('INSERT INTO "order" (id, reservation_id, g2a_order_id, state, cws_client_order_id, created_at, '
                    "updated_at, placed_at, next_check_at, check_count, request_id, sale_total) "
                    "VALUES ({p}, {p}, {p}, {p}, {p}, {p}, {p}, {p}, {p}, {p}, {p}, {p})")
INSERT_ITEM_SQL = ("INSERT INTO order_item (id, order_id, position, g2a_product_id, cws_product_id, source, kind, "
                   "state, sale_price) VALUES ({p}, {p}, {p}, {p}, {p}, {p}, {p}, {p}, {p})")


def get_order(order_id):
    return db.raw_rows(db.Order, ORDER_SQL, order_id)[0]


def _insert_order(order_id, reservation_id, g2a_order_id, now, request_id, check_at, sale_total):
    moment, money = db.Order.created_at.db_value, db.Order.sale_total.db_value
    db.run_sql(INSERT_ORDER_SQL, order_id, reservation_id, g2a_order_id, db.CLAIMED, client_order_id(g2a_order_id),
               moment(now), moment(now), moment(now), moment(check_at), 0, request_id, money(sale_total))


def _existing(reservation_id, g2a_order_id):
    return next(iter(db.raw_rows(db.Order, 'SELECT * FROM "order" WHERE reservation_id = {p} OR g2a_order_id = {p} '
                                           "LIMIT 1", reservation_id, g2a_order_id)), None)


def _claimable(reservation_id, g2a_order_id, now):
    db.lock_rows(db.Reservation, [reservation_id])
    reservation = next(iter(db.raw_rows(db.Reservation, "SELECT * FROM reservation WHERE id = {p}", reservation_id)),
                       None)
    if reservation is None:
        raise ContractError(404, "BR02", f"reservation {reservation_id} not found")
    existing = _existing(reservation_id, g2a_order_id)
    if existing is not None:
        raise _conflict(existing)
    if reservation.state != ACTIVE:
        raise ContractError(410, "BR02", f"reservation {reservation_id} was {reservation.state}")
    if reservation.expires_at <= now:
        raise ContractError(410, "BR02", f"reservation {reservation_id} expired at {reservation.expires_at.isoformat()}")
    return reservation


def _conflict(existing):
    """409 naming the order that exists, as a field (`order_id`) and in the message."""
    if existing is None:  # the winner of a race is not visible to this transaction yet
        return ContractError(409, "BR02", "an order already exists for this reservation or G2A order")
    return ContractError(409, "BR02", f"order {existing.id} already exists for reservation {existing.reservation_id} "
                                      f"(G2A order {existing.g2a_order_id}); fetch its keys from "
                                      f"GET /order/{existing.id}/inventory", extra={"order_id": existing.id})


def sale_price(line):
    """What the buyer paid per unit: G2A's unit_price, else the offer price we published when they reserved."""
    return line.unit_price if line.unit_price is not None else line.offer_price


def _sale_total(lines):
    if any(sale_price(line) is None for line in lines):
        return None
    return sum((sale_price(line) * line.quantity for line in lines), start=0)


def _create_items(order_id, lines):
    """One item per key unit, its id assigned now and kept forever (G2A returns and fetches files by it)."""
    money = db.OrderItem.sale_price.db_value
    rows = [(new_uuid(), order_id, position, line.g2a_product_id, line.cws_product_id, "cws", TEXT, PENDING,
             money(sale_price(line)))
            for position, line in enumerate(unit for line in lines for unit in [line] * line.quantity)]
    db.database.obj.cursor().executemany(db.sql(INSERT_ITEM_SQL), rows)
    return order_items(order_id)


def cws_lines(order_id):
    """[(cws_product_id, quantity, None)] still to buy from CWS: the units waiting for a key, in the order of the
    items. No price cap: the buyer has paid, so a price that rose since the reservation is bought anyway (and
    alerted as a loss)."""
    counts = db.run_sql("SELECT cws_product_id, COUNT(*) FROM order_item WHERE order_id = {p} AND source = {p} "
                        "AND state = {p} GROUP BY cws_product_id ORDER BY MIN(position)", order_id, "cws", PENDING)
    return [(product_id, quantity, None) for product_id, quantity in counts.fetchall()]


def top_up_id(order):
    """The client order id of the next purchase for this order's missing units: g2a-<id>-2, -3, ..."""
    base = client_order_id(order.g2a_order_id)
    current = order.cws_client_order_id
    number = int(current[len(base) + 1:]) if current != base else 1
    return f"{base}-{number + 1}"


def start_top_up(order, now, check_at):
    """CWS completed its order with fewer codes than bought: the order becomes a new claim, under a new client
    order id, for exactly its waiting units (cws_lines). True for one caller only (compare-and-set on the CWS
    order it replaces); the codes already stored stay on their items."""
    with db.write_transaction():
        return db.Order.update(state=db.CLAIMED, cws_client_order_id=top_up_id(order), cws_order_id=None,
                               placed_at=now, updated_at=now, next_check_at=check_at, failure=None).where(
            db.Order.id == order.id, db.Order.state == db.FULFILLING,
            db.Order.cws_order_id == order.cws_order_id).execute() == 1


def move(order_id, state, now, **fields):
    """Set the state (and fields) if ORDER_TRANSITIONS allows it from the state the order is in; False if not."""
    sources = [source for source, targets in db.ORDER_TRANSITIONS.items()
               if state in targets or (source == state and state in WAITING)]
    with db.write_transaction():  # queue on the process's writer mutex, not SQLite's busy handler
        return db.Order.update(state=state, updated_at=now, **fields).where(
            db.Order.id == order_id, db.Order.state.in_(sources)).execute() == 1


def reschedule(order_id, at):
    with db.write_transaction():
        db.Order.update(next_check_at=at).where(db.Order.id == order_id).execute()


def record_placement(order_id, cws_order, now, check_at):
    """CWS holds our purchase: remember its id and cost, and lower the cached CWS stock by what we bought.

    `now` must be no earlier than CWS's answer (a read that began after it already saw the purchase).

    False when the order already left CLAIMED (the web process and recovery may both find the same purchase)."""
    costs = {product.product_id: product.unit_price for product in cws_order.products}
    moment, money = db.Order.updated_at.db_value, db.Order.cost_total.db_value
    with db.write_transaction():
        earlier = get_order(order_id).cost_total  # a top-up adds to what earlier purchases cost
        total = cws_order.total_price if earlier is None or cws_order.total_price is None \
            else earlier + cws_order.total_price
        moved = db.run_sql('UPDATE "order" SET state = {p}, cws_order_id = {p}, cost_total = {p}, updated_at = {p}, '
                           "next_check_at = {p} WHERE id = {p} AND state = {p} AND cws_order_id IS NULL",
                           db.FULFILLING, cws_order.order_id, money(total), moment(now), moment(check_at), order_id,
                           db.CLAIMED).rowcount
        if not moved:
            return False
        for product_id, quantity, _ in cws_lines(order_id):
            db.run_sql("UPDATE order_item SET unit_cost = {p} WHERE order_id = {p} AND cws_product_id = {p} "
                       "AND source = {p} AND state = {p}", money(costs.get(product_id)), order_id, product_id, "cws",
                       PENDING)
            # fetched_at moves too: a stock read that began before this purchase and lands after it would put the
            # bought keys back (catalogue._older skips rows fetched since the read began).
            db.run_sql("UPDATE cws_product SET quantity = CASE WHEN quantity > {p} THEN quantity - {p} ELSE 0 END, "
                       "fetched_at = {p} WHERE id = {p}", quantity, quantity, moment(now), product_id)
    return True


def begin_send(order_id, placed_at, now, check_at):
    """Take the turn to send the CWS purchase: True for exactly one caller that read `placed_at`.

    The web's purchase thread, the worker's two recovery paths and `retry` may all reach for the same claim;
    the new placed_at also starts the grace period recovery waits out before it would send again."""
    moment = db.Order.placed_at.db_value
    sent_before = "placed_at IS NULL" if placed_at is None else "placed_at = {p}"
    with db.write_transaction():
        return db.run_sql('UPDATE "order" SET placed_at = {p}, updated_at = {p}, next_check_at = {p} WHERE id = {p} '
                          f"AND state = {{p}} AND cws_order_id IS NULL AND {sent_before}", moment(now), moment(now),
                          moment(check_at), order_id, db.CLAIMED, *([] if placed_at is None else [moment(placed_at)])
                          ).rowcount == 1


def later(now, seconds):
    return now + timedelta(seconds=seconds)
