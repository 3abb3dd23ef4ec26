"""Fulfilment: claim → CWS purchase → keys → polling → crash recovery → returns, for web, worker and CLI.

Unknown is not failed (STYLE 6): a purchase whose answer never came is resolved through CWS's order
history by our client order id, and sent again (with the same id) only when CWS has no trace of it.
"""
import contextlib
import contextvars
import itertools
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import wait as wait_for

from . import claims, db, keys, orders
from .alerts import raise_alert
from .balance import Balance
from .claims import later, resend_grace
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
RECOVERY_RECHECK = 10.0  # history look-ups of one unresolved claim, at most this often
BATCH = 50  # orders per poll_due / recover call, so one call never runs for long


class Fulfilment:
    """One per process. The web calls create_order/inventory/...; the worker poll_due (every ~0.5 s),
    recover (at start, then every ~30 s) and balance.due (every 10 s); the CLI retry/describe/list_orders."""

    def __init__(self, settings, cws, key_box, sleep=time.sleep, clock=time.monotonic, background=None):
        self.settings, self.cws, self.sleep, self.clock = settings, cws, sleep, clock
        self.keys = KeyStore(key_box)
        self.inline_budget = min(settings.order_inline_wait, G2A_BUDGET)
        self.recovery_grace = resend_grace(settings)
        self._purchases = ThreadPoolExecutor(max(2, settings.web_threads), thread_name_prefix="purchase")
        self.balance = Balance(settings, cws, background)

    # ---- G2A: POST /order and the inventory endpoints ------------------------------------------

    def create_order(self, reservation_id, g2a_order_id, now, request_id=None):
        """(200, keys) when CWS delivers within the inline budget, else (202, empty inventory); ContractError
        404/409/410. The purchase runs on its own thread, so a slow CWS never holds G2A past the budget."""
        started = self.clock()
        check_at = later(now, self.inline_budget + CLAIM_MIN_AGE)
        order = claims.claim(reservation_id, g2a_order_id, now, request_id or REQUEST_ID.get(), check_at,
                             clock=lambda: self._now(now, started))
        event(log, "order.claimed", order=order.id, g2a_order=g2a_order_id, reservation=reservation_id,
              client_order=order.cws_client_order_id, state=order.state)
        if order.state == db.CLAIMED:
            purchase = self._purchases.submit(contextvars.copy_context().run, self._purchase, order, now, started)
            wait_for([purchase], timeout=max(0.0, started + self.inline_budget - self.clock()))
        order = claims.get_order(order.id)
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

    # ---- CLI ------------------------------------------------------------------------------------

    def retry(self, order_id, now):
        """Re-drive a FAILED or stuck order without buying twice; one line saying where it is now.

        FAILED: poll its CWS order again, or (none) take pooled keys and look up / send the purchase.
        CLAIMED: look CWS's history up now (adopt; send again only after the grace). Waiting: check CWS now."""
        order = orders.find_order(order_id)
        if order is None:
            raise BridgeError(f"order {order_id} not found")
        if order.state == db.COMPLETED:
            raise BridgeError(f"order {order.id} is {order.state}, not failed or stuck: nothing to retry")
        with _request_id(order.request_id):
            event(log, "order.retry", order=order.id, state=order.state, cws_order=order.cws_order_id or "-")
            if order.state == db.FAILED:
                self._retry_failed(order, now)
            elif order.state == db.CLAIMED and self._recover_one(order, now) is None:
                raise BridgeError(f"order {order.id}: CWS order history is unreachable; nothing was sent. Look for "
                                  f"{order.cws_client_order_id} in the CWS panel; the worker keeps looking")
            elif order.state != db.CLAIMED:
                self._check(order, now)
        return self._status_line(db.Order.get_by_id(order.id))

    def _retry_failed(self, order, now):
        if not order.cws_order_id:
            return self._retry_purchase(order, now)
        try:
            cws_order = self.cws.order(order.cws_order_id)
        except UpstreamError as err:
            raise BridgeError(f"order {order.id}: CWS order {order.cws_order_id} could not be read ({err}); "
                              "nothing changed, try again later") from err
        claims.move(order.id, db.FULFILLING, now, placed_at=now, failure=None, next_check_at=now)
        codes = self._apply(db.Order.get_by_id(order.id), cws_order, now)
        # Only when CWS says it is done and every code it listed has a key: a code still coming is not missing.
        if codes and all(code.value for group in codes.values() for code in group):
            self._buy_missing(db.Order.get_by_id(order.id), now)

    def _buy_missing(self, order, now):
        """CWS completed its order with fewer codes than we bought: buy exactly the units still waiting, under a
        new client order id derived from ours (never the same one: CWS may already hold an order under it)."""
        missing = sum(quantity for _, quantity, _ in claims.cws_lines(order.id))
        if order.state != db.FULFILLING or not missing:
            return
        if not claims.start_top_up(order, now, later(now, self.inline_budget + CLAIM_MIN_AGE)):
            return
        claim = db.Order.get_by_id(order.id)
        event(log, "order.top_up", order=order.id, missing=missing, previous_cws_order=order.cws_order_id,
              client_order=claim.cws_client_order_id)
        self._place(claim, now)

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
        `order` was read: each POST attempt is taken by moving placed_at just before it goes out (after any
        token fetch), and only one mover wins."""
        sent = self.clock()
        turn = _SendTurn(order, lambda: later(now, self.clock() - sent), self.inline_budget + CLAIM_MIN_AGE)
        try:
            placed = self.cws.place_order(order.cws_client_order_id, claims.cws_lines(order.id),
                                          self.settings.cws_allow_preorder, before_send=turn.take)
        except _NotOurTurn:
            event(log, "order.send_skipped", level=logging.DEBUG, order=order.id)
            return
        except OutcomeUnknown as err:
            event(log, "order.outcome_unknown", level=logging.WARNING, order=order.id, error=str(err))
            return
        except UpstreamError as err:
            self._refused(order, err, now)
            return
        self._adopt(order, placed, later(now, self.clock() - sent), name, **fields)  # as of CWS's answer
        self.balance.soon(now)

    def _refused(self, order, err, now):
        if err.retryable:  # never reached CWS, or 429: nothing bought; recovery sends it again after the grace
            event(log, "order.place_deferred", level=logging.WARNING, order=order.id, error=str(err))
            return
        if err.code == BALANCE_TOO_LOW:
            self.balance.spent(now)
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
            self._settle(claims.get_order(order.id), cws_order, codes, now)
        if placed:
            self._check_loss(order, now)

    def _wait_inline(self, order, now, started):
        """Re-read the CWS order until it delivers or the whole inline budget is used (not the steps' sum)."""
        last_check = started + self.inline_budget - INLINE_LAST_CHECK
        for step in itertools.chain(INLINE_STEPS, itertools.repeat(INLINE_STEP_AFTER)):
            current = claims.get_order(order.id)
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
        """Bring our order in line with what CWS says about it now; the codes it gathered."""
        codes = self._ready_codes(order, cws_order)
        with db.write_transaction():
            self._settle(order, cws_order, codes, now)
        return codes

    def _settle(self, order, cws_order, codes, now):
        """Inside a write transaction: store the ready codes and move the order to where CWS says it is."""
        outcome = cws_order.outcome(self._quantities(order))
        if outcome == "failed":
            return self._fail(order, f"CWS order {cws_order.order_id} is {cws_order.status}", now)
        ids = [product.product_id for product in cws_order.products]
        names = dict(db.run_sql(f"SELECT id, name FROM cws_product WHERE id IN ({', '.join(['{p}'] * len(ids))})",
                                *ids).fetchall()) if ids else {}
        if self.keys.store(order.id, codes, names, now):
            return self._complete(order, now)
        self._pending(order, db.PREORDER if outcome == "preorder" else db.FULFILLING, now)

    def _ready_codes(self, order, cws_order):
        """{cws_product_id: every code, in CWS's order}, the ones CWS did not send inline fetched (once each).
        Only from a completed CWS order: while it is fulfilling its code list may still grow, and bundles are
        decided from the complete list (G2A sees keys only once all are there anyway)."""
        if cws_order.status.lower() != "completed":
            return {}
        stored = {code_id for (code_id,) in db.run_sql(
            "SELECT cws_code_id FROM order_item WHERE order_id = {p} AND cws_code_id IS NOT NULL", order.id)}
        codes = {}
        for product in cws_order.products:
            codes.setdefault(product.product_id, []).extend(
                self._fetched(code) if code.needs_fetch and code.code_id not in stored else code
                for code in product.codes)
        return codes

    def _fetched(self, code):
        """The code with its value, or as it was (no value: its unit keeps waiting) when CWS cannot say."""
        try:
            return self.cws.code(code.code_id)
        except UpstreamError as err:
            event(log, "order.code_unavailable", level=logging.WARNING, code=code.code_id, error=str(err))
            return code

    def _pending(self, order, state, now):
        age = (now - order.placed_at).total_seconds() if order.placed_at else 0.0
        overdue = age > self.settings.cws_poll_max
        if state == db.FULFILLING and overdue:
            return self._fail(order, f"CWS did not deliver within {self.settings.cws_poll_max:g} s", now)
        # A pre-order we did not ask for (allowPreOrder=false) is polled like a fulfilling order until the poll
        # deadline: its key may come in seconds. Past it, or when pre-orders are welcome, every 5 min (a PREORDER
        # postback makes it sooner); it is never failed, since CWS has charged and the key will come.
        slow = state == db.PREORDER and (self.settings.cws_allow_preorder or overdue)
        wait = PREORDER_POLL if slow else min(MAX_POLL, max(MIN_POLL, age / 10))
        moved = claims.move(order.id, state, now, next_check_at=later(now, wait), check_count=db.Order.check_count + 1)
        if moved and state == db.PREORDER and order.state != db.PREORDER:
            event(log, "order.preorder", order=order.id, cws_order=order.cws_order_id)

    def _complete(self, order, now):
        if claims.move(order.id, db.COMPLETED, now, completed_at=now, next_check_at=None, failure=None):
            event(log, "order.completed", order=order.id, cws_order=order.cws_order_id or "-")

    def _fail(self, order, reason, now):
        with db.write_transaction():
            failed = claims.move(order.id, db.FAILED, now, failure=reason, next_check_at=None)
            # Nothing bought from CWS: the returned keys it took go back to the pool at once, so they keep
            # counting in stock and the next order uses them (G2A may refund this buyer). With a CWS order they
            # stay: a retry that polls it delivers them with its codes.
            released = failed and not order.cws_order_id and self.keys.release_pool_keys(order.id)
        if failed:
            event(log, "order.failed", level=logging.ERROR, order=order.id, reason=reason, pooled_released=released)
            raise_alert("order_failed", order.id, f"order {order.id} (G2A order {order.g2a_order_id}) failed: "
                                                  f"{reason}. Fix the cause, then run: g2a-bridge retry {order.id}", now)

    def _check_loss(self, order, now):
        """The buyer paid, so we deliver even when CWS now costs more than the sale earns; the seller hears of it."""
        # A list, read whole before raise_alert writes: writing while this connection's SELECT is still open
        # fails at once with "database is locked" if the other process committed meanwhile (test_concurrency.py).
        for item in keys.order_items(order.id):
            if item.source != "cws" or item.unit_cost is None or item.sale_price is None:
                continue
            product = next(iter(db.raw_rows(db.Product, "SELECT * FROM product WHERE g2a_id = {p}",
                                            item.g2a_product_id)), None)
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
        """Adopt what CWS's history holds for the claim, or send it again once the grace is over; what history
        showed (None: unreadable)."""
        found = self._lookup(order)
        age = (now - order.placed_at).total_seconds()
        if found is None or (not found and age < self.recovery_grace):
            if found == []:
                event(log, "order.not_at_cws_yet", order=order.id, client_order=order.cws_client_order_id,
                      seconds=round(age), grace=self.recovery_grace)
            claims.reschedule(order.id, later(now, RECOVERY_RECHECK))
            return found
        self._adopt_or_place(order, found, now)
        return found

    def _retry_purchase(self, order, now):
        if self._fill_from_pool(order, now):
            return
        found = self._lookup(order)
        claims.move(order.id, db.CLAIMED, now, failure=None, next_check_at=later(now, self.recovery_grace))
        if found is None:
            raise BridgeError(f"order {order.id}: CWS order history is unreachable; the worker will look again "
                              "and buy only if CWS has no order for it")
        self._adopt_or_place(order, found, now)

    def _fill_from_pool(self, order, now):
        """Retry: returned keys of the order's products cover its waiting items first; True when they cover all."""
        with db.write_transaction():
            waiting = [item for item in orders.items_of(order) if item.state == keys.PENDING]
            if KeyStore.fill_from_pool(waiting, now) < len(waiting):
                return False
            self._complete(order, now)
        return True

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

    def _now(self, now, started):
        return later(now, self.clock() - started)

    @staticmethod
    def _status_line(order):
        where = f"CWS order {order.cws_order_id}" if order.cws_order_id else "no CWS order yet"
        why = f" ({order.failure})" if order.failure else ""
        return f"order {order.id}: {order.state}{why}; {where}"


class _NotOurTurn(Exception):
    """Another sender moved placed_at first: this POST must not go out."""


class _SendTurn:
    """Takes the turn for each POST attempt of one purchase by moving placed_at from the value last seen."""

    def __init__(self, order, moment, check_in):
        self.order_id, self.expected, self.moment, self.check_in = order.id, order.placed_at, moment, check_in

    def take(self):
        at = self.moment()
        if not claims.begin_send(self.order_id, self.expected, at, later(at, self.check_in)):
            raise _NotOurTurn()
        self.expected = at


@contextlib.contextmanager
def _request_id(request_id):
    """The request id of the G2A call that created the order, on every log line about it."""
    token = REQUEST_ID.set(request_id)
    try:
        yield
    finally:
        REQUEST_ID.reset(token)
