"""The full sweep's reading: the mapped set read from CWS by catalogue pages or by productIds batches (whichever
costs fewer requests), one CWS answer at a time, each stored before the next request; and the sweep's progress.

The pace is the CWS client's: it waits for its request budget, so the sweep spreads itself over minutes.
"""
import json
import math
import time
from datetime import datetime

from . import db
from .catalogue import BATCH_SIZE, store_answer, unlist
from .errors import UpstreamError

LISTING_KEY = "sync.catalogue"  # what the last complete catalogue listing cost: {"products", "pages", "at"}
PROGRESS_KEY = "sync.sweep"  # the running or last sweep (started, mode, mapped, read, finished, duration) and the
# last complete one (last_started, last_duration)
LIST_UNMEASURED_ABOVE = 5  # productIds batches above which a catalogue never listed is listed (to learn its cost)
PROGRESS_EVERY = 1.0  # seconds between progress writes
REQUESTS_PER_WRITE = 3  # an offer write costs a PATCH and about two job polls
SWEEP_G2A_SHARE = 0.5  # of the G2A request budget a long sweep may keep using


def reading_plan(mapped, listing, batch_size=BATCH_SIZE):
    """("pages" or "batches", requests or None when unknown): the cheaper way to read `mapped` products, given
    the last complete listing ({"pages": n}, None when the catalogue was never listed)."""
    batches = math.ceil(mapped / batch_size)
    if listing is None:
        return ("pages", None) if batches > LIST_UNMEASURED_ABOVE else ("batches", batches)
    pages = int(listing["pages"])
    return ("pages", pages) if pages < batches else ("batches", batches)


def last_listing():
    stored = db.get_setting(LISTING_KEY)
    return None if stored is None else json.loads(stored)


def mapped_cws_ids():
    query = db.Product.select(db.Product.cws_product).where(db.Product.mapped == True).distinct()  # noqa: E712
    return [cws_id for (cws_id,) in query.tuples()]


def unmapped_only(mapped):
    """CWS ids only products removed from products.json still point at: reconciled (deactivated) without a read."""
    query = db.Product.select(db.Product.cws_product).where(db.Product.mapped == False).distinct()  # noqa: E712
    return sorted(cws_id for (cws_id,) in query.tuples() if cws_id not in mapped)



def read(cws, mapped_ids, how, pacer, clock, report):
    """Yield the mapped ids each CWS answer covered, once it is stored; `how` is ("pages", _) or ("batches", size),
    each request after `pacer`. A CWS failure is reported and ends the read."""
    mode, batch_size = how
    try:
        if mode == "pages":
            yield from _pages(paced(cws.product_pages(), pacer), set(mapped_ids), clock)
        else:
            yield from _batches(cws, sorted(mapped_ids), batch_size, pacer, clock)
    except UpstreamError as err:
        report.cws_error(err, "CWS products")


def paced(pages, pacer):
    """The ProductPages of `pages` (each next() sends a request), every request after pacer.wait()."""
    while True:
        pacer.wait()
        page = next(pages, None)
        if page is None:
            return
        yield page
        if not page.more:
            return


def _batches(cws, ids, size, pacer, clock):
    for start in range(0, len(ids), size):
        wanted, now = set(ids[start:start + size]), clock()
        infos = [info for page in paced(cws.product_pages(ids[start:start + size]), pacer) for info in page.items]
        unlist(wanted - store_answer(infos, wanted, now), now)  # a complete answer for these ids
        yield wanted


def _pages(pages, wanted, clock):
    """The whole catalogue; mapped products it did not list are unlisted once the last page is in."""
    seen, listed, requests = set(), 0, 0
    while True:
        now = clock()
        page = next(pages, None)
        if page is None:
            break
        listed, requests = listed + len(page.items), requests + 1
        covered = store_answer(page.items, wanted, now)
        seen |= covered
        yield covered
    gone = wanted - seen
    unlist(gone, clock())
    db.put_setting(LISTING_KEY, json.dumps({"products": listed, "pages": requests, "at": clock().isoformat()}))
    yield gone


class Progress:
    """The running sweep's figures in the setting PROGRESS_KEY, written at most every PROGRESS_EVERY seconds."""

    def __init__(self, started, mode, mapped, clock=time.monotonic):
        self._clock = clock
        last = _last_figures()
        self.figures = {"started": started.isoformat(), "mode": mode, "mapped": mapped, "read": 0,
                        "finished": None, "duration": None, "last_duration": last.get("last_duration"),
                        "last_started": last.get("last_started")}
        self._began = self._written = clock()
        self._save()

    def read(self, count):
        self.figures["read"] += count
        if self._clock() - self._written >= PROGRESS_EVERY:
            self._save()

    def finish(self, finished):
        """The sweep ended; it counts as the last complete one only if it read every mapped product."""
        self.figures.update(finished=finished.isoformat(), duration=round(self._clock() - self._began, 3))
        if self.figures["read"] >= self.figures["mapped"]:
            self.figures.update(last_duration=self.figures["duration"], last_started=self.figures["started"])
        self._save()

    def _save(self):
        self._written = self._clock()
        db.put_setting(PROGRESS_KEY, json.dumps(self.figures))


def _last_figures():
    stored = db.get_setting(PROGRESS_KEY)
    return {} if stored is None else json.loads(stored)


def last_complete_start():
    """When the last complete sweep began (everything it read is at least that fresh), or None."""
    started = _last_figures().get("last_started")
    return None if started is None else datetime.fromisoformat(started)


def write_pace(settings):
    """Offer writes per second a sweep may keep up: SWEEP_G2A_SHARE of the G2A budget (each write costs about
    REQUESTS_PER_WRITE requests)."""
    return settings.g2a_requests_per_minute / 60 * SWEEP_G2A_SHARE / REQUESTS_PER_WRITE
