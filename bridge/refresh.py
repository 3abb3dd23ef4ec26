"""Fresh-enough CWS state for G2A's calls: re-fetch stale products within a time budget, else use the cache.

G2A gives us about 9 s; a slow CWS must never eat that. One fetch per product is in flight at a
time (concurrent reservations share it), and a fetch that misses the budget still lands later.
"""
import logging
from concurrent.futures import ThreadPoolExecutor, wait

from . import db
from .errors import UpstreamError
from .log import event

log = logging.getLogger(__name__)


def record_cws_products(infos, requested_ids, now):
    """Store what CWS said about `requested_ids`; ids it did not return are no longer listed."""
    seen = {info.id: info for info in infos}
    with db.database.atomic():
        for info in seen.values():
            db.CwsProduct.update(
                name=info.name, quantity=max(0, info.quantity), cost=info.unit_price(1), listed=True,
                prices=[{"from": t.low, "to": t.high, "value": str(t.value)} for t in info.tiers],
                fetched_at=now,
            ).where(db.CwsProduct.id == info.id).execute()
        missing = [pid for pid in requested_ids if pid not in seen]
        if missing:
            db.CwsProduct.update(quantity=0, listed=False, fetched_at=now).where(
                db.CwsProduct.id.in_(missing)).execute()
    return seen


class StockRefresher:
    def __init__(self, cws, max_age, budget=2.0, threads=4):
        self.cws, self.max_age, self.budget = cws, max_age, budget
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="cws-refresh")
        self._inflight = {}  # product id -> Future; dict ops are atomic under the GIL

    def ensure_fresh(self, cws_ids, now):
        """Make sure the cached state of `cws_ids` is at most max_age old, waiting at most `budget` seconds."""
        stale = self._stale(cws_ids, now)
        if not stale:
            return
        futures = {self._fetch_once(pid, now) for pid in stale}
        _, late = wait(futures, timeout=self.budget)
        if late:
            event(log, "stock.cache_fallback", level=logging.WARNING, products=",".join(stale),
                  reason=f"CWS slower than {self.budget}s")
        for future in futures - late:
            if future.exception() is not None:
                event(log, "stock.cache_fallback", level=logging.WARNING, products=",".join(stale),
                      reason=str(future.exception()))

    def _stale(self, cws_ids, now):
        rows = db.CwsProduct.select(db.CwsProduct.id, db.CwsProduct.fetched_at).where(
            db.CwsProduct.id.in_(list(cws_ids)))
        return sorted(r.id for r in rows
                      if r.fetched_at is None or (now - r.fetched_at).total_seconds() > self.max_age)

    def _fetch_once(self, product_id, now):
        future = self._inflight.get(product_id)
        if future is None or future.done():
            future = self._pool.submit(self._fetch, product_id, now)
            self._inflight[product_id] = future
        return future

    def _fetch(self, product_id, now):
        try:
            info = self.cws.product(product_id)
            record_cws_products([info] if info else [], [product_id], now)
        finally:
            self._inflight.pop(product_id, None)

    def close(self):
        self._pool.shutdown(wait=False, cancel_futures=True)
