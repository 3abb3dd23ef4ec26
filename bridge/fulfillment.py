"""Fulfilment: claim → CWS purchase → keys → polling → crash recovery → returns, for web, worker and CLI.

Unknown is not failed (STYLE 6): a purchase whose answer never came is resolved through CWS's order
history by our client order id, and sent again (with the same id) only when CWS has no trace of it.
"""
import contextlib
import contextvars
import itertools
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import wait as wait_for

from . import claims, db, orders
from .alerts import raise_alert
from .claims import later
from .cws import BALANCE_TOO_LOW, DELISTED
from .errors import BridgeError, OutcomeUnknown, UpstreamError
from .keys import KeyStore
from .log import REQUEST_ID, event
from .pricing import break_even_price

log = logging.getLogger(__name__)

G2A_BUDGET = 7.0  # G2A gives POST /order 9 s; the rest is for the claim, rendering and the network
INLINE_STEPS = (0.5, 1.0, 1.0, 1.0)  # re-GETs of the CWS order while G2A waits, then every INLINE_STEP_AFTER
INLINE_STEP_AFTER = 1.5
# The last re-GET starts this long before the inline budget ends, so its answer still makes the 200;
# a gap shorter than INLINE_MIN_STEP before it is not worth another CWS call.
INLINE_LAST_CHECK, INLINE_MIN_STEP = 0.25, 0.1
MIN_POLL, MAX_POLL, PREORDER_POLL = 1.0, 10.0, 300.0  # seconds between worker checks of one order
CLAIM_MIN_AGE = 5.0  # a younger claim is probably still being placed by the web process
# Re-sending a purchase CWS shows no trace of waits this long after the last send: the earlier POST
# must be over, and CWS's history gets time to show an order it did take. cws.md 3.5 suggests ~2 min;
# 60 s keeps buyers waiting less. Never below MAX_POST_TIMEOUTS x CWS_TIMEOUT_MS: a POST is at most
# connect + read timeouts, twice (one resend after a 401), plus the token fetch in between.
RECOVERY_GRACE = 60.0
MAX_POST_TIMEOUTS = 6
RECOVERY_RECHECK = 10.0  # history look-ups of one unresolved claim, at most this often
BATCH = 50  # orders per poll_due / recover call, so one call never runs for long
BALANCE_SETTING = "cws.balance"


class Fulfilment:
    """One per process. The web calls create_order/inventory/...; the worker poll_due (every ~0.5 s),
    recover (at start, then every ~30 s) and check_balance (every ~5 min); the CLI retry/describe/list_orders."""

    def __init__(self, settings, cws, key_box, sleep=time.sleep, clock=time.monotonic, background=None,
                 recovery_grace=RECOVERY_GRACE):
        self.settings, self.cws, self.sleep, self.clock = settings, cws, sleep, clock
        self.keys = KeyStore(key_box)
        self.inline_budget = min(settings.order_inline_wait, G2A_BUDGET)
        self.recovery_grace = max(recovery_grace, MAX_POST_TIMEOUTS * settings.cws_timeout)
        self._purchases = ThreadPoolExecutor(max(2, settings.web_threads), thread_name_prefix="purchase")
        self._background = background or ThreadPoolExecutor(1, thread_name_prefix="cws-balance").submit
        self._balance_lock = threading.Lock()
        self._balance_queued = False

    # ---- G2A: POST /order and the inventory endpoints ------------------------------------------

    def create_order(self, reservation_id, g2a_order_id, now, request_id=None):
        """(200, keys) when CWS delivers within the inline budget, else (202, empty inventory); ContractError
        404/409/410. The purchase runs on its own thread, so a slow CWS never holds G2A past the budget."""
        started = self.clock()
        check_at = later(now, self.inline_budget + CLAIM_MIN_AGE)
        order = claims.claim(reservation_id, g2a_order_id, now, request_id or REQUEST_ID.get(), check_at)
        event(log, "order.claimed", order=order.id, g2a_order=g2a_order_id, reservation=reservation_id,
              client_order=order.cws_client_order_id, state=order.state)
        if order.state == db.CLAIMED:
            purchase = self._purchases.submit(contextvars.copy_context().run, self._purchase, order, now, started)
            wait_for([purchase], timeout=max(0.0, started + self.inline_budget - self.clock()))
        order = db.Order.get_by_id(order.id)
        status = 200 if order.state == db.COMPLETED else 202
        return status, {"order_id": order.id, "stock": orders.stock_lines(order, self.keys, self._now(now, started))}

    def inventory(self, any_id, now=None):
        return orders.inventory(orders.resolve(any_id), self.keys, now or db.utcnow())

    def item_file(self, any_id, item_id):
        return self.keys.file_payload(orders.file_item(orders.resolve(any_id), item_id))

    def item_account(self, any_id, item_id):
        return self.keys.account_payload(orders.account_item(orders.resolve(any_id), item_id))

    def return_items(self, any_id, item_ids, now):
        return self.keys.return_items(orders.resolve(any_id), item_ids, now)

    # ---- worker ---------------------------------------------------------------------------------

    def poll_due(self, now):
        """Check every order whose next_check_at has come (CWS codes, pre-orders, unresolved claims); how many."""
        due = list(db.Order.select().where(db.Order.state.in_((db.CLAIMED,) + claims.WAITING),
                                           db.Order.next_check_at <= now)
                   .order_by(db.Order.next_check_at).limit(BATCH))
        for order in due:
            self._guarded(self._check, order, now)
        return len(due)

    def recover(self, now):
        """Resolve claims whose purchase outcome is unknown (a crash, a timeout) by asking CWS; how many."""
        stale = list(db.Order.select().where(db.Order.state == db.CLAIMED, db.Order.cws_order_id.is_null(),
                                             db.Order.placed_at <= later(now, -CLAIM_MIN_AGE))
                     .order_by(db.Order.created_at).limit(BATCH))
        for order in stale:
            self._guarded(self._recover_one, order, now)
        return len(stale)

    def check_balance(self, now):
        """Read the CWS balance, keep it in Setting "cws.balance" (updated_at = when), alert when low."""
        balance = self.cws.account().total_to_use
        with db.write_transaction():
            db.put_setting(BALANCE_SETTING, balance)
        if balance < self.settings.cws_low_balance:
            raise_alert("low_balance", "cws", f"CWS balance {balance:.2f} {self.settings.currency} is below "
                                              f"CWS_LOW_BALANCE {self.settings.cws_low_balance}: top up", now)
        return balance

    # ---- CLI ------------------------------------------------------------------------------------

    def retry(self, order_id, now):
        """Re-drive a FAILED order without buying twice; one line saying where it is now."""
        order = orders.find_order(order_id)
        if order is None:
            raise BridgeError(f"order {order_id} not found")
        if order.state != db.FAILED:
            raise BridgeError(f"order {order.id} is {order.state}, not failed: nothing to retry")
        with _request_id(order.request_id):
            event(log, "order.retry", order=order.id, cws_order=order.cws_order_id or "-")
            if order.cws_order_id:
                claims.move(order.id, db.FULFILLING, now, placed_at=now, failure=None, next_check_at=now)
                self._check(db.Order.get_by_id(order.id), now)
            else:
                self._retry_purchase(order, now)
        return self._status_line(db.Order.get_by_id(order.id))

    def describe(self, order_id, reveal=False):
        return orders.describe(order_id, self.keys, reveal)

    def list_orders(self, state=None, limit=20):
        return orders.list_orders(state, limit)

    # ---- the purchase ---------------------------------------------------------------------------

    def _purchase(self, order, now, started):
        try:
            self._place(order, self._now(now, started))
            self._wait_inline(order, now, started)
        except Exception:  # the claim is committed: the worker's recovery finishes what this thread could not
            log.exception("order.purchase_crashed order=%s", order.id)

    def _place(self, order, now, name="order.placed", **fields):
        """Send the purchase, unless another thread or process has sent it (or resolved the claim) since
        `order` was read: a send is taken by moving placed_at, and only one mover wins."""
        if not claims.begin_send(order.id, order.placed_at, now, later(now, self.inline_budget + CLAIM_MIN_AGE)):
            event(log, "order.send_skipped", level=logging.DEBUG, order=order.id)
            return
        sent = self.clock()
        try:
            placed = self.cws.place_order(order.cws_client_order_id, claims.cws_lines(order.id),
                                          self.settings.cws_allow_preorder)
        except OutcomeUnknown as err:
            event(log, "order.outcome_unknown", level=logging.WARNING, order=order.id, error=str(err))
            return
        except UpstreamError as err:
            self._refused(order, err, now)
            return
        self._adopt(order, placed, later(now, self.clock() - sent), name, **fields)  # as of CWS's answer
        self._balance_soon(now)

    def _refused(self, order, err, now):
        if err.retryable:  # never reached CWS, or 429: nothing bought; recovery sends it again after the grace
            event(log, "order.place_deferred", level=logging.WARNING, order=order.id, error=str(err))
            return
        if err.code == BALANCE_TOO_LOW:
            raise_alert("low_balance", "cws", f"CWS balance too low to buy order {order.id}: top up, then run "
                                              f"g2a-bridge retry {order.id}", now)
        if err.code == DELISTED:  # the next stock refresh re-lists any product of the order CWS still sells
            products = [product_id for product_id, _, _ in claims.cws_lines(order.id)]
            db.CwsProduct.update(listed=False).where(db.CwsProduct.id.in_(products)).execute()
        self._fail(order, f"CWS refused the purchase: {err}", now)

    def _adopt(self, order, cws_order, now, name, **fields):
        """CWS holds a purchase for this order (just placed, or found by recovery): record and apply it in one
        transaction (SQLite has one writer at a time, so fewer commits means shorter queues under load)."""
        codes = self._ready_codes(order, cws_order)
        with db.write_transaction():
            placed = claims.record_placement(order.id, cws_order, now, later(now, MIN_POLL))
            if placed:
                event(log, name, order=order.id, cws_order=cws_order.order_id, status=cws_order.status, **fields)
            self._settle(db.Order.get_by_id(order.id), cws_order, codes, now)
        if placed:
            self._check_loss(order, now)

    def _wait_inline(self, order, now, started):
        """Re-read the CWS order until it delivers or the whole inline budget is used (not the steps' sum)."""
        last_check = started + self.inline_budget - INLINE_LAST_CHECK
        for step in itertools.chain(INLINE_STEPS, itertools.repeat(INLINE_STEP_AFTER)):
            current = db.Order.get_by_id(order.id)
            left = last_check - self.clock()
            if current.state != db.FULFILLING or left < INLINE_MIN_STEP:
                return
            self.sleep(min(step, left))
            self._check(current, self._now(now, started))

    # ---- following a CWS order ------------------------------------------------------------------

    def _check(self, order, now):
        if order.state == db.CLAIMED:
            return self._recover_one(order, now)
        try:
            cws_order = self.cws.order(order.cws_order_id)
        except UpstreamError as err:
            event(log, "order.poll_failed", level=logging.WARNING, order=order.id, error=str(err))
            return self._pending(order, order.state, now)
        self._apply(order, cws_order, now)

    def _apply(self, order, cws_order, now):
        """Bring our order in line with what CWS says about it now."""
        codes = self._ready_codes(order, cws_order)
        with db.write_transaction():
            self._settle(order, cws_order, codes, now)

    def _settle(self, order, cws_order, codes, now):
        """Inside a write transaction: store the ready codes and move the order to where CWS says it is."""
        outcome = cws_order.outcome(self._quantities(order))
        if outcome == "failed":
            return self._fail(order, f"CWS order {cws_order.order_id} is {cws_order.status}", now)
        names = {p.id: p.name for p in db.CwsProduct.select().where(
            db.CwsProduct.id.in_([product.product_id for product in cws_order.products]))}
        if self.keys.store(order.id, codes, names, now):
            return self._complete(order, now)
        self._pending(order, db.PREORDER if outcome == "preorder" else db.FULFILLING, now)

    def _ready_codes(self, order, cws_order):
        """{cws_product_id: codes with their value}, fetching the ones CWS did not send inline (once each)."""
        stored = {item.cws_code_id for item in db.OrderItem.select(db.OrderItem.cws_code_id).where(
            db.OrderItem.order == order.id, db.OrderItem.cws_code_id.is_null(False))}
        ready = {}
        for product in cws_order.products:
            codes = [self._fetched(code) if code.needs_fetch else code for code in product.codes
                     if code.kind != "preorder" and code.code_id not in stored]
            ready.setdefault(product.product_id, []).extend(code for code in codes if code and code.value)
        return ready

    def _fetched(self, code):
        try:
            return self.cws.code(code.code_id)
        except UpstreamError as err:
            event(log, "order.code_unavailable", level=logging.WARNING, code=code.code_id, error=str(err))
            return None

    def _pending(self, order, state, now):
        age = (now - order.placed_at).total_seconds() if order.placed_at else 0.0
        if state == db.FULFILLING and age > self.settings.cws_poll_max:
            return self._fail(order, f"CWS did not deliver within {self.settings.cws_poll_max:g} s", now)
        wait = PREORDER_POLL if state == db.PREORDER else min(MAX_POLL, max(MIN_POLL, age / 10))
        moved = claims.move(order.id, state, now, next_check_at=later(now, wait), check_count=db.Order.check_count + 1)
        if moved and state == db.PREORDER and order.state != db.PREORDER:
            event(log, "order.preorder", order=order.id, cws_order=order.cws_order_id)

    def _complete(self, order, now):
        if claims.move(order.id, db.COMPLETED, now, completed_at=now, next_check_at=None, failure=None):
            event(log, "order.completed", order=order.id, cws_order=order.cws_order_id or "-")

    def _fail(self, order, reason, now):
        if claims.move(order.id, db.FAILED, now, failure=reason, next_check_at=None):
            event(log, "order.failed", level=logging.ERROR, order=order.id, reason=reason)
            raise_alert("order_failed", order.id, f"order {order.id} (G2A order {order.g2a_order_id}) failed: "
                                                  f"{reason}. Fix the cause, then run: g2a-bridge retry {order.id}", now)

    def _check_loss(self, order, now):
        """The buyer paid, so we deliver even when CWS now costs more than the sale earns; the seller hears of it."""
        # A list, read whole before raise_alert writes: writing while this connection's SELECT is still open
        # fails at once with "database is locked" if the other process committed meanwhile (test_concurrency.py).
        for item in list(db.OrderItem.select().where(db.OrderItem.order == order.id, db.OrderItem.source == "cws",
                                                     db.OrderItem.unit_cost.is_null(False),
                                                     db.OrderItem.sale_price.is_null(False))):
            product = db.Product.get_or_none(db.Product.g2a_id == item.g2a_product_id)
            fee = product.fee if product is not None and product.fee is not None else self.settings.default_fee
            floor = break_even_price(item.unit_cost, fee)
            if item.sale_price < floor:
                raise_alert("loss", order.id, f"order {order.id}: CWS charged {item.unit_cost:.2f} for a key of G2A "
                                              f"product {item.g2a_product_id} sold at {item.sale_price}; "
                                              f"break-even after G2A's fee is {floor}", now)
                return

    @staticmethod
    def _quantities(order):
        return {product_id: quantity for product_id, quantity, _ in claims.cws_lines(order.id)}

    # ---- crash recovery -------------------------------------------------------------------------

    def _recover_one(self, order, now):
        found = self._lookup(order)
        age = (now - order.placed_at).total_seconds()
        if found is None or (not found and age < self.recovery_grace):
            if found == []:
                event(log, "order.not_at_cws_yet", order=order.id, client_order=order.cws_client_order_id,
                      seconds=round(age), grace=self.recovery_grace)
            return claims.reschedule(order.id, later(now, RECOVERY_RECHECK))
        self._adopt_or_place(order, found, now)

    def _retry_purchase(self, order, now):
        found = self._lookup(order)
        claims.move(order.id, db.CLAIMED, now, failure=None, next_check_at=later(now, self.recovery_grace))
        if found is None:
            raise BridgeError(f"order {order.id}: CWS order history is unreachable; the worker will look again "
                              "and buy only if CWS has no order for it")
        self._adopt_or_place(order, found, now)

    def _adopt_or_place(self, order, found, now):
        if found:
            if len(found) > 1:
                raise_alert("duplicate_cws_order", order.id, f"CWS holds {len(found)} orders with client id "
                                                             f"{order.cws_client_order_id}; one is adopted", now)
            self._adopt(order, self.cws.order(found[0].order_id), now, "order.recovered", how="adopted")
        else:
            self._place(order, now, "order.recovered", how="placed_again")

    def _lookup(self, order):
        """CWS orders carrying our client order id (history has no codes), or None when history can't be read."""
        days = {order.created_at.date(): order.created_at, order.placed_at.date(): order.placed_at}
        try:
            found = {cws_order.order_id: cws_order for around in days.values()
                     for cws_order in self.cws.find_orders(order.cws_client_order_id, around)}
            return list(found.values())
        except UpstreamError as err:
            event(log, "order.lookup_failed", level=logging.WARNING, order=order.id, error=str(err))
            return None

    # ---- small helpers --------------------------------------------------------------------------

    def _guarded(self, work, order, now):
        """One order's trouble stays with that order: logged, retried later, never stopping the others."""
        with _request_id(order.request_id):
            try:
                work(order, now)
            except Exception:
                log.exception("order.check_crashed order=%s", order.id)
                claims.reschedule(order.id, later(now, MAX_POLL))

    def _balance_soon(self, now):
        """After a purchase, read the balance on a background thread (at most one queued): POST /order never waits."""
        with self._balance_lock:
            if self._balance_queued:
                return
            self._balance_queued = True
        self._background(self._balance_in_background, now)

    def _balance_in_background(self, now):
        with self._balance_lock:
            self._balance_queued = False
        try:
            self.check_balance(now)
        except Exception as err:  # noqa: BLE001 (a failed balance read must never touch the purchase)
            event(log, "cws.balance_unavailable", level=logging.WARNING, error=str(err))

    def _now(self, now, started):
        return later(now, self.clock() - started)

    @staticmethod
    def _status_line(order):
        where = f"CWS order {order.cws_order_id}" if order.cws_order_id else "no CWS order yet"
        why = f" ({order.failure})" if order.failure else ""
        return f"order {order.id}: {order.state}{why}; {where}"


@contextlib.contextmanager
def _request_id(request_id):
    """The request id of the G2A call that created the order, on every log line about it."""
    token = REQUEST_ID.set(request_id)
    try:
        yield
    finally:
        REQUEST_ID.reset(token)
