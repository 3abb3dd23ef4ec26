"""Delta reads between sweeps: GET /v3/products?updatedSince=… lists only what CWS changed lately, so a silent
stock-out is seen in seconds for one request. CWS does not document the parameter: an answer as large as a full
listing means it was ignored, and deltas stop (sweeps alone carry on) until a later try.
"""
import json
import logging
from datetime import timedelta

from . import db
from .catalogue import store_answer
from .errors import UpstreamError
from .log import event
from .sweep import last_complete_start, last_listing, paced

log = logging.getLogger(__name__)

EVERY = 10.0  # seconds between delta reads (one list request each while little changes)
MAX_PAGES = 3  # a longer answer is taken as "updatedSince ignored" (or too much changed): a sweep does better
IGNORED_SHARE = 0.5  # an answer listing this share of the last full listing was not a delta
OVERLAP = timedelta(seconds=60)  # read a little before the last read began: CWS's clock is not ours
RETRY = timedelta(minutes=5)  # after an ignored delta, sweeps alone until then (a retry costs at most MAX_PAGES)
STATE_KEY = "sync.delta"  # {"state": "honoured" | "ignored", "at": iso}


class DeltaReads:
    """Remembers when the last delta read began and whether CWS honoured the parameter."""

    def __init__(self):
        self._began = None
        self._retry_at = None

    def since(self, now):
        """The updatedSince of the next delta read, or None when there is none to make (no sweep finished yet, or
        deltas are off after an ignored one)."""
        if self._retry_at is not None and now < self._retry_at:
            return None
        starts = [moment for moment in (self._began, last_complete_start()) if moment is not None]
        return max(starts) - OVERLAP if starts else None

    def read(self, cws, mapped, since, pacer, clock, report):
        """Store what changed since `since`; the mapped ids it covered, or None when CWS ignored the parameter
        (or failed: reported)."""
        began, covered, listed = clock(), set(), 0
        try:
            for number, page in enumerate(paced(cws.product_pages(updated_since=since), pacer), start=1):
                listed += len(page.items)
                covered |= store_answer(page.items, mapped, clock())
                if _not_a_delta(number, page.more, listed):
                    self._ignored(began, number, listed)
                    return None
        except UpstreamError as err:
            report.cws_error(err, "CWS products updatedSince")
            return None
        self._began, self._retry_at = began, None
        _remember("honoured", began)
        return covered

    def _ignored(self, now, pages, listed):
        self._retry_at = now + RETRY
        event(log, "sync.delta_ignored", level=logging.WARNING, pages=pages, products=listed,
              retry_minutes=int(RETRY.total_seconds() // 60),
              remedy="CWS seems to ignore updatedSince: full sweeps alone keep the offers in sync meanwhile")
        _remember("ignored", now)


def _not_a_delta(pages, more, listed):
    listing = last_listing()
    too_long = pages >= MAX_PAGES and more
    return too_long or (listing is not None and listed >= max(2, IGNORED_SHARE * listing["products"]))


def _remember(state, now):
    db.put_setting(STATE_KEY, json.dumps({"state": state, "at": now.isoformat()}))
