"""How old our knowledge of CWS is: the age of the mapped products' last CWS state (oldest, median, p95, never
read) and the sweep's progress, read from the database for `status` and /metrics."""
import json
import math
from datetime import datetime

from . import db
from .sweep import PROGRESS_KEY


def staleness(now):
    """{"mapped", "never_read", "oldest_seconds", "p50_seconds", "p95_seconds"} over the mapped products."""
    cws, product = db.CwsProduct, db.Product
    mapped = product.select(product.cws_product).where(product.mapped == True)  # noqa: E712
    known = cws.select(cws.fetched_at).where(cws.id.in_(mapped), cws.fetched_at.is_null(False))
    read, never = known.count(), cws.select().where(cws.id.in_(mapped), cws.fetched_at.is_null()).count()
    figures = {"mapped": read + never, "never_read": never}
    for name, share in (("oldest_seconds", 1.0), ("p50_seconds", 0.5), ("p95_seconds", 0.95)):
        figures[name] = _age_at(known, read, share, now)
    return figures


def _age_at(known, count, share, now):
    """The age (seconds) that `share` of the read products do not exceed (nearest rank)."""
    if not count:
        return None
    rank = count - math.ceil(share * count)  # in the oldest-first order
    row = next(iter(known.order_by(db.CwsProduct.fetched_at).offset(rank).limit(1)))
    return round(max(0.0, (now - row.fetched_at).total_seconds()), 1)


def sweep_progress(now):
    """The running (or last) sweep: mode, mapped, read, ratio, running, started_age_seconds, last_duration_seconds;
    None before the first sweep."""
    stored = db.get_setting(PROGRESS_KEY)
    if stored is None:
        return None
    figures = json.loads(stored)
    started = datetime.fromisoformat(figures["started"])
    mapped, read = figures["mapped"], figures["read"]
    return {"mode": figures["mode"], "mapped": mapped, "read": read,
            "ratio": 1.0 if figures["finished"] or not mapped else round(min(1.0, read / mapped), 4),
            "running": figures["finished"] is None,
            "started_age_seconds": round((now - started).total_seconds(), 1),
            "last_duration_seconds": figures["last_duration"]}
