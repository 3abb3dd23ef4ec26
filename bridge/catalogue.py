"""What sync reads from outside: CWS products refreshed in bulk, our G2A offers found by listing, G2A price limits.

Each is stored in the database only where it differs from what is already there.
"""
import logging

from . import db
from .errors import UpstreamError
from .g2a import OFFER_TYPE
from .log import event

log = logging.getLogger(__name__)

SINGLE_GETS = 3  # the priority lane reads up to this many products one by one, more in productIds batches
BATCH_SIZE = 50  # productIds per request (CWS's maximum is unknown; C1 sends 5)
CHUNK = 500  # ids per IN (...) clause
UPSERT_ROWS = 100  # rows per INSERT ... ON CONFLICT statement (7 bound values each), one transaction each
WRITE_ROWS = 100  # per-row updates per write transaction


class Catalogue:
    """Reads CWS and G2A for sync; remembers which offers and price limits it already looked for."""

    def __init__(self, cws, g2a):
        self.cws, self.g2a = cws, g2a
        self._checked = None  # G2A product ids the last offer discovery looked for (None: not run yet)
        self._limits = set()  # G2A product ids whose priceLimit this process looked up
        self._other_types = set()  # ids of offers of another type, warned about once per process

    # ---- CWS -------------------------------------------------------------------------------

    def read_products(self, cws_ids, now, report):
        """Re-read these products and store what changed; True when CWS answered for all of them.

        A few are read one by one: that endpoint has its own, larger CWS limit, so the priority lane is not
        queued behind the sweep's catalogue reads."""
        wanted = set(cws_ids)
        try:
            if len(wanted) <= SINGLE_GETS:
                infos = [info for info in map(self.cws.product, sorted(wanted)) if info is not None]
            else:
                infos = list(self.cws.products(sorted(wanted), batch_size=BATCH_SIZE))
        except UpstreamError as err:
            report.cws_error(err, "CWS products")
            return False
        store_checked(infos, wanted, now)
        return True

    # ---- G2A offers ------------------------------------------------------------------------

    def discover_if_needed(self, report):
        """List our G2A offers once per process, and again when a mapped product's offer is unknown."""
        unknown = db.Product.select(db.Product.g2a_id).where(
            db.Product.mapped == True, db.Product.offer_id.is_null())  # noqa: E712 (peewee expression)
        if self._checked is not None and all(g2a_id in self._checked for (g2a_id,) in unknown.tuples()):
            return
        self.discover(report)

    def discover(self, report):
        """Match offers to products by G2A product id and take G2A's view of each as the confirmed state."""
        try:
            offers = _offers_by_product(self._dropshipping(self.g2a.offers()))
        except UpstreamError as err:
            report.error(f"G2A offers: {err}")
            return
        rows = list(db.Product.select(db.Product.g2a_id, db.Product.offer_id, db.Product.offer_price,
                                      db.Product.offer_stock, db.Product.offer_active).tuples().iterator())
        # An offer absent from the listing keeps its id: only a 404 on a write proves it gone.
        changed = [(g2a_id, offer) for g2a_id, *stored in rows if (offer := offers.get(g2a_id)) is not None
                   and [offer.id, offer.price, offer.stock, offer.active] != stored]
        for start in range(0, len(changed), WRITE_ROWS):
            with db.write_transaction():  # short ones: the web's reservations wait for each
                for g2a_id, offer in changed[start:start + WRITE_ROWS]:
                    db.Product.update(offer_id=offer.id, offer_price=offer.price, offer_stock=offer.stock,
                                      offer_active=offer.active, missing_offer_warned=False).where(
                        db.Product.g2a_id == g2a_id).execute()
        self._checked = {g2a_id for g2a_id, *_ in rows}
        event(log, "sync.offers_discovered", offers=len(offers), products=len(rows))

    def _dropshipping(self, offers):
        """Only dropshipping offers are ours to match and write (we PATCH as dropshipping); warn once about others."""
        for offer in offers:
            if offer.type == OFFER_TYPE:
                yield offer
            elif offer.id not in self._other_types:
                self._other_types.add(offer.id)
                event(log, "sync.offer_other_type", level=logging.WARNING, offer=offer.id,
                      product=offer.product_id, type=offer.type)

    def forget_offer(self, g2a_id):
        """Look for this product's offer again at the next discovery (a 404, or a creation that may have happened)."""
        if self._checked is not None:
            self._checked.discard(g2a_id)

    # ---- G2A price limits ------------------------------------------------------------------

    def limit_known(self, g2a_id):
        return g2a_id in self._limits

    def forget_limit(self, g2a_id):
        self._limits.discard(g2a_id)

    def look_up_limits(self, g2a_ids, report):
        """Store G2A's priceLimit for each product; returns {g2a_id: (min, max)} for those that have one."""
        found = {}
        for g2a_id in g2a_ids:
            try:
                limit = self.g2a.price_limit(g2a_id)
            except UpstreamError as err:
                report.error(f"G2A priceLimit of {g2a_id}: {err}")
                continue
            self._limits.add(g2a_id)
            low, high = limit or (None, None)
            db.Product.update(price_limit_min=low, price_limit_max=high).where(
                db.Product.g2a_id == g2a_id).execute()
            if limit is not None:
                found[g2a_id] = limit
        return found


def clear_marks(dirty):
    """Clear the marks read as {id: dirty_since}; a postback that came in since keeps its product dirty."""
    if not dirty:
        return
    ids, newest = sorted(dirty), max(dirty.values())
    for start in range(0, len(ids), CHUNK):
        with db.write_transaction():
            db.CwsProduct.update(dirty_since=None).where(
                db.CwsProduct.id.in_(ids[start:start + CHUNK]), db.CwsProduct.dirty_since <= newest).execute()


def _offers_by_product(offers):
    """{G2A product id: offer}; should G2A list two offers for a product, the active one wins."""
    found = {}
    for offer in offers:
        known = found.get(offer.product_id)
        if known is None or (offer.active and not known.active):
            found[offer.product_id] = offer
    return found


def store_checked(infos, wanted, now):
    """Store CWS's answers to a read of just the `wanted` ids (the web's freshness check, the priority lane); ids it
    left out are unlisted. These, unlike sweep pages, set checked_at: what a reservation may trust without a re-read."""
    wanted = {product_id.lower() for product_id in wanted}
    unlist(wanted - store_answer(infos, wanted, now), now)
    ids = sorted(wanted)
    for start in range(0, len(ids), CHUNK):
        with db.write_transaction():
            db.CwsProduct.update(checked_at=now).where(
                db.CwsProduct.id.in_(ids[start:start + CHUNK]),
                db.CwsProduct.checked_at.is_null() | (db.CwsProduct.checked_at < now)).execute()


def store_answer(infos, wanted, now):
    """Store what CWS answered (`infos`, read at `now`) about the `wanted` ids; returns the wanted ids it covered."""
    fresh = {}
    for info in infos:
        product_id = info.id.lower()
        if product_id in wanted:
            fresh.setdefault(product_id, info)
    _record(list(fresh.values()), _current_cws(set(fresh)), now)
    return set(fresh)


def _current_cws(ids):
    """{id: (name, quantity, cost, prices, listed)} as stored (raw column values: cheap to read and compare)."""
    table = db.CwsProduct._meta.table
    query = table.select(table.id, table.name, table.quantity, table.cost, table.prices, table.listed)
    if len(ids) > CHUNK * 4:
        rows = query.tuples().iterator()
    else:
        ordered = sorted(ids)
        rows = (row for start in range(0, len(ordered), CHUNK)
                for row in query.where(table.id.in_(ordered[start:start + CHUNK])).tuples())
    return {product_id: (name, quantity, cost, prices, bool(listed))
            for product_id, name, quantity, cost, prices, listed in rows if product_id in ids}


def _fresh(info):
    """(row to store, the same in raw column values like _current_cws)."""
    prices = [{"from": tier.low, "to": tier.high, "value": str(tier.value)} for tier in info.tiers]
    row = (info.name, max(0, info.quantity), info.unit_price(1), prices, True)
    return row, (*row[:2], db.CwsProduct.cost.db_value(row[2]), db.CwsProduct.prices.db_value(prices), True)


def _record(infos, current, now):
    """Upsert the products whose CWS state changed; the rest only get a new fetched_at."""
    changed, unchanged = [], []
    for info in infos:
        product_id = info.id.lower()
        row, raw = _fresh(info)
        if current.get(product_id) == raw:
            unchanged.append(product_id)
        else:
            changed.append(dict(zip(_COLUMNS, (product_id, *row, now))))
    if not infos:
        return
    changed.sort(key=lambda row: row["id"])  # lock rows in id order, as reservations do: no deadlock on PostgreSQL
    for start in range(0, len(changed), UPSERT_ROWS):
        # One short transaction per statement: the web's reservations wait for each. Rows exist already
        # (products.py creates them); the upsert just updates many per statement.
        with db.write_transaction():
            db.CwsProduct.insert_many(changed[start:start + UPSERT_ROWS]).on_conflict(
                conflict_target=[db.CwsProduct.id], preserve=_COLUMNS[1:], where=_older(now)).execute()
    _touch(unchanged, now)


_COLUMNS = ["id", "name", "quantity", "cost", "prices", "listed", "fetched_at"]


def unlist(ids, now):
    """CWS no longer lists these: no stock from them (the offers are deactivated by the plan)."""
    if not ids:
        return
    ids = sorted(ids)
    for start in range(0, len(ids), CHUNK):
        with db.write_transaction():
            db.CwsProduct.update(quantity=0, listed=False, fetched_at=now).where(
                db.CwsProduct.id.in_(ids[start:start + CHUNK]), _older(now)).execute()


def _touch(ids, now):
    """A new fetched_at for rows CWS confirmed unchanged. Raw SQL: building 50,000 bound values through the
    query builder costs seconds per pass, this costs milliseconds."""
    mark, stamp = db.database.param, db.CwsProduct.fetched_at.db_value(now)
    table = db.CwsProduct._meta.table_name
    for start in range(0, len(ids), CHUNK):
        chunk = ids[start:start + CHUNK]
        db.database.execute_sql(
            f"UPDATE {table} SET fetched_at = {mark} WHERE (fetched_at IS NULL OR fetched_at <= {mark}) "
            f"AND id IN ({', '.join([mark] * len(chunk))})", [stamp, stamp, *chunk])


def _older(now):
    """Rows last fetched before this read began: a fresher fetch (a dirty pass, the web) is never overwritten."""
    return db.CwsProduct.fetched_at.is_null() | (db.CwsProduct.fetched_at <= now)
