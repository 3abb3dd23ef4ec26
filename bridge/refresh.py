"""Fresh-enough CWS state for G2A's calls: re-fetch products not read alone lately within a time budget, else use
the cache.

G2A gives us about 9 s; a slow CWS must never eat that. One fetch per product is in flight at a
time (concurrent reservations share it), and a fetch that misses the budget still lands later.
Once CWS has failed or missed the budget, callers stop waiting for it until a fetch succeeds again. A fetch never
waits for the request budget (budget.py): when the web's share of single-product reads is spent, the cache answers.
Those cache answers are logged at most once per FALLBACK_LOG_EVERY seconds, with a count (each one at DEBUG); a
cache answer because CWS failed is logged each time (rare, and each is a sale on stock nobody could check).
"""
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor, wait

from .catalogue import store_checked
from .errors import BudgetSpent
from .log import event

log = logging.getLogger(__name__)
FALLBACK_LOG_EVERY = 60.0  # seconds between WARNING lines about cache answers because the budget was spent


class StockRefresher:
    def __init__(self, cws, max_age, budget=2.0, threads=4, clock=time.monotonic):
        self.cws, self.max_age, self.budget = cws, max_age, budget
        self._budget_spent = BudgetFallbacks(clock)
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="cws-refresh")
        self._inflight = {}  # product id -> Future; dict ops are atomic under the GIL
        # Set by a fallback, cleared by the next fetch CWS answers. While CWS hangs, every caller waiting out the
        # whole budget would hold a web thread each: at 4x the threads in flight G2A waited 8 s (test_faults.py).
        self._failing = False

    def stale(self, checked_at, now):
        """The products to re-fetch, sorted: `checked_at` maps CWS product id -> when a read of that product alone
        (this refresher or the worker's priority lane) last answered; a sweep page's read does not count, however
        recent."""
        return sorted(pid for pid, when in checked_at.items()
                      if when is None or (now - when).total_seconds() > self.max_age)

    def refresh(self, stale, now):
        """Re-fetch the `stale` products, waiting at most `budget` seconds; what misses it is answered from the
        cache (and still lands later)."""
        futures = {self._fetch_once(pid, now) for pid in stale}
        patience = 0.0 if self._failing else self.budget
        done, late = wait(futures, timeout=patience)
        failed = [f.exception() for f in done if f.exception() is not None]
        if failed and not late and all(isinstance(err, BudgetSpent) for err in failed):
            # CWS is fine: this process used its share of the single-product limit. Not a reason to stop waiting.
            self._budget_spent.note(stale)
        elif late or failed:
            self._failing = True
            reason = str(failed[0]) if failed else (
                f"CWS slower than {self.budget}s" if patience else "CWS failing: not waiting until it answers again")
            event(log, "stock.cache_fallback", level=logging.WARNING, products=",".join(stale), reason=reason)

    def _fetch_once(self, product_id, now):
        future = self._inflight.get(product_id)
        if future is None or future.done():
            future = self._pool.submit(self._fetch, product_id, now)
            self._inflight[product_id] = future
        return future

    def _fetch(self, product_id, now):
        try:
            info = self.cws.product(product_id, wait=False)
            store_checked([info] if info else [], [product_id], now)
            self._failing = False
        finally:
            self._inflight.pop(product_id, None)

    def close(self):
        self._pool.shutdown(wait=False, cancel_futures=True)


class BudgetFallbacks:
    """Cache answers because the budget was spent: the first logged at once (WARNING), the next ones counted and
    logged with their count once FALLBACK_LOG_EVERY seconds have passed. At hundreds of reservations a second on a
    spent budget a line each would be noise and CPU; each one is still logged at DEBUG."""

    def __init__(self, clock=time.monotonic):
        self._clock = clock
        self._lock = threading.Lock()
        self._last, self._unlogged = None, 0  # when the last WARNING went out; cache answers since

    def note(self, products):
        """One cache answer for `products`; `answers` on a WARNING line counts it and those not logged before it."""
        with self._lock:
            now, count = self._clock(), self._unlogged + 1
            due = self._last is None or now - self._last >= FALLBACK_LOG_EVERY
            self._unlogged = 0 if due else count
            if due:
                self._last = now
        level, fields = (logging.WARNING, {"answers": count}) if due else (logging.DEBUG, {})
        event(log, "stock.cache_fallback", level=level, products=",".join(products), reason="budget", **fields)
