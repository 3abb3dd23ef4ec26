"""Offer sync: plan() (pure) turns product state into the few G2A offer changes needed; SyncEngine reads CWS,
sends those changes as G2A jobs and records what G2A confirmed. An unchanged catalogue costs zero writes.
"""
import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field, replace
from decimal import Decimal

from . import db
from .catalogue import Catalogue
from .errors import UpstreamError
from .log import event
from .offers import HOUR, Outcome, load_states, prune_price_changes, store_outcomes
from .pricing import decide_price, units_affordable

log = logging.getLogger(__name__)

WRITERS = 8  # PATCHes in flight at once; the g2a request budget (budget.py) still caps the rate
REQUESTS_PER_WRITE = 3  # a PATCH and about two job polls
JOB_TIMEOUT = 60.0
FLUSH_EVERY = 200  # confirmed writes per database transaction
LIMIT_LOOKUPS = 20  # G2A priceLimit look-ups per pass, only for products about to get a price
DIRTY_BACKOFF = 5.0  # seconds without dirty passes after CWS failed to answer one
LAST_PASS_KEY = "sync.last_pass"
LAST_SUCCESS_KEY = "sync.last_success"  # written by each full pass that succeeded
MISSING_OFFER = "no G2A offer for this product: create it in the G2A panel, or set G2A_CREATE_OFFERS=true"


@dataclass(frozen=True)
class Change:
    """One offer write (only the parts that differ), a creation, a held-back decrease or a missing-offer warning."""
    g2a_id: int
    offer_id: str | None
    action: str = "update"  # update / create / missing
    price: Decimal | None = None
    stock: int | None = None
    active: bool | None = None
    old_price: Decimal | None = None
    old_stock: int | None = None
    old_active: bool | None = None
    deferred_price: Decimal | None = None
    reason: str = ""

    @property
    def sends(self):
        return self.action == "create" or (self.action == "update" and
                                            (self.price, self.stock, self.active) != (None, None, None))

    @property
    def priority(self):
        """0: stops a loss (deactivation, price rise); 1: stock and activation; 2: price cuts."""
        if self.active is False or (self.price is not None and not self._is_decrease()):
            return 0
        return 1 if (self.stock, self.active) != (None, None) or self.action != "update" else 2

    def _is_decrease(self):
        return self.old_price is not None and self.price < self.old_price

    def __str__(self):
        if self.action == "create":
            return f"{self.g2a_id} create offer: price {self.price}, stock {self.stock}"
        if self.action == "missing":
            return f"{self.g2a_id} {MISSING_OFFER}"
        parts = []
        if self.price is not None:
            parts.append(f"price {_show(self.old_price)} -> {self.price} "
                         f"({'decrease' if self._is_decrease() else 'increase'})")
        if self.deferred_price is not None:
            parts.append(f"price {self.old_price} -> {self.deferred_price} (decrease deferred: {self.reason})")
        if self.stock is not None:
            parts.append(f"stock {_show(self.old_stock)} -> {self.stock}")
        if self.active is not None:
            parts.append(("activate" if self.active else f"deactivate ({self.reason})"))
        return f"{self.g2a_id} " + ", ".join(parts)


def _show(value):
    return "unknown" if value is None else value


def plan(states, now, paused, price_changes_per_hour, create_offers=False):
    """The changes that bring each offer to its desired state, most urgent first (pure: no I/O)."""
    changes = [change for state in states
               if (change := plan_product(state, now, paused, price_changes_per_hour, create_offers)) is not None]
    return sorted(changes, key=lambda change: change.priority)


def plan_product(state, now, paused, price_changes_per_hour, create_offers=False):
    decision, stock, why_not = _desired(state)
    if state.offer_id is None:
        return _missing(state, decision.price, stock, bool(why_not) or paused, create_offers)
    if why_not:
        return _deactivate(state, why_not)
    if paused:
        if not state.offer_active:
            return None
        stock = min(stock, state.offer_stock or 0)
    return _update(state, decision.price, stock, now, price_changes_per_hour)


def inactive_reason(state, paused):
    """Why this product's offer does not sell ("" when it does or should): what a dry run shows for idle offers."""
    why_not = _desired(state)[2]
    if state.offer_id is None and state.mapped:
        return MISSING_OFFER
    if why_not:
        return why_not
    return "paused" if paused and not state.offer_active else ""


def _desired(state):
    """(price decision, stock to show, why it must not sell or "")."""
    decision = decide_price(state.cost, state.fixed_profit, state.fee, state.min_price, state.max_price,
                            state.limit_min, state.limit_max)
    stock = state.available if state.max_stock is None else min(state.available, state.max_stock)
    affordable = units_affordable(state.balance, state.cost)
    stock = stock if affordable is None else min(stock, affordable)
    return decision, stock, _why_not_sold(state, decision, stock, affordable)


def _why_not_sold(state, decision, stock, affordable):
    """Why the offer must not sell now, or "" when it should be active."""
    reasons = ((not state.mapped, "removed from products.json"), (not state.enabled, "disabled in products.json"),
               (not state.listed, "not listed by CWS"), (not decision.sellable, decision.reason),
               (affordable == 0, f"CWS balance {state.balance} cannot pay for one key: top up the CWS account"),
               (stock <= 0, "out of stock"))
    return next((why for failed, why in reasons if failed), "")


def _missing(state, price, stock, not_now, create_offers):
    if not state.mapped:
        return None
    if create_offers:
        return None if not_now else Change(state.g2a_id, None, "create", price=price, stock=stock, active=True)
    if state.missing_offer_warned:
        return None
    return Change(state.g2a_id, None, "missing", reason=MISSING_OFFER)


def _deactivate(state, why):
    stock = 0 if state.offer_stock != 0 else None
    active = False if state.offer_active is not False else None
    if stock is None and active is None:
        return None
    return Change(state.g2a_id, state.offer_id, stock=stock, active=active, old_price=state.offer_price,
                  old_stock=state.offer_stock, old_active=state.offer_active, reason=why)


def _update(state, price, stock, now, per_hour):
    send_price = price if state.offer_price != price else None
    deferred, reason = None, ""
    if send_price is not None and state.offer_price is not None and price < state.offer_price:
        recent = sum(1 for at in state.price_changes if at > now - HOUR)
        if recent >= decrease_allowance(per_hour):
            deferred, send_price = price, None
            reason = f"{recent} price changes in the last hour"
    send_stock = stock if state.offer_stock != stock else None
    send_active = True if state.offer_active is not True else None
    if (send_price, send_stock, send_active, deferred) == (None, None, None, None):
        return None
    return Change(state.g2a_id, state.offer_id, price=send_price, stock=send_stock, active=send_active,
                  old_price=state.offer_price, old_stock=state.offer_stock, old_active=state.offer_active,
                  deferred_price=deferred, reason=reason)


def writes_per_pass(settings):
    """Writes one pass may send: a third of the G2A budget of one sync interval (each costs a PATCH and job polls)."""
    return max(1, int(settings.g2a_requests_per_minute * settings.sync_interval / 60 / REQUESTS_PER_WRITE))


def decrease_allowance(per_hour):
    """Price cuts allowed per product per hour: one change stays in reserve for a rise that prevents a loss."""
    return per_hour - 1 if per_hour > 1 else per_hour


@dataclass
class PassReport:
    kind: str
    started: object
    paused: bool = False
    products: int = 0
    changes: list = field(default_factory=list)
    writes: int = 0
    failed: int = 0
    deferred: int = 0
    postponed: int = 0  # writes left for the next pass by the per-pass cap
    errors: list = field(default_factory=list)
    inactive: list = field(default_factory=list)  # dry runs: "<g2a id> stays inactive: <why>" for idle offers
    finished: object = None
    duration: float = 0.0

    @property
    def succeeded(self):
        """False when the pass reported errors and got no write through (CWS or G2A unreachable, all refused)."""
        return not (self.errors and self.writes == self.failed)

    def error(self, message):
        if len(self.errors) < 20:
            self.errors.append(message)

    def as_json(self):
        return json.dumps({"kind": self.kind, "started": self.started.isoformat(),
                           "finished": self.finished.isoformat() if self.finished else None,
                           "duration": round(self.duration, 3), "paused": self.paused, "products": self.products,
                           "planned": len(self.changes), "writes": self.writes, "failed": self.failed,
                           "deferred": self.deferred, "postponed": self.postponed, "errors": self.errors})


def _idle_offers(states, changes, paused):
    changed = {change.g2a_id for change in changes}
    # Sorted: PostgreSQL returns the states in no particular order (SQLite happens to keep insertion order).
    return [f"{state.g2a_id} stays inactive: {why}" for state in sorted(states, key=lambda state: state.g2a_id)
            if state.mapped and state.g2a_id not in changed and not state.offer_active
            and (why := inactive_reason(state, paused))]


class SyncEngine:
    """Reconciles G2A offers with CWS; passes never overlap (a dirty pass skips while a full pass runs)."""

    def __init__(self, settings, cws, g2a, pause_switch, clock=db.utcnow, writers=WRITERS, job_timeout=JOB_TIMEOUT):
        self.settings, self.g2a, self.pause, self.clock = settings, g2a, pause_switch, clock
        self.catalogue = Catalogue(cws, g2a)
        self.writers, self.job_timeout = writers, job_timeout
        self.max_writes = writes_per_pass(settings)
        self._lock = threading.Lock()
        self._dirty_resume_at = 0.0

    def full_pass(self, now=None, dry_run=False):
        """Reconcile every product; with dry_run the changes are planned (CWS and offers read) but not sent."""
        report = PassReport("full", now or self.clock(), paused=self.pause.is_paused())
        started = time.monotonic()
        # The CWS read runs outside the lock, so postbacks keep flowing while a big catalogue is read.
        self.catalogue.refresh(self._cws_ids(), report.started, report)
        with self._lock:
            self.catalogue.discover_if_needed(report)
            self._reconcile(None, report, dry_run)
        self._finish(report, started)
        if not dry_run:
            prune_price_changes(report.started)
            db.put_setting(LAST_PASS_KEY, report.as_json())
            if report.succeeded:
                db.put_setting(LAST_SUCCESS_KEY, report.finished.isoformat())
        return report

    def dirty_pass(self, now=None):
        """Reconcile only the products a CWS postback marked dirty; None when there was nothing to do."""
        if time.monotonic() < self._dirty_resume_at or not self._lock.acquire(blocking=False):
            return None
        try:
            dirty = dict(db.CwsProduct.select(db.CwsProduct.id, db.CwsProduct.dirty_since)
                         .where(db.CwsProduct.dirty_since.is_null(False)).tuples())
            if not dirty:
                return None
            report = PassReport("dirty", now or self.clock(), paused=self.pause.is_paused())
            started = time.monotonic()
            if not self.catalogue.refresh_dirty(dirty, report.started, report):
                self._dirty_resume_at = time.monotonic() + DIRTY_BACKOFF
            self._reconcile(list(dirty), report, dry_run=False)
            return self._finish(report, started)
        finally:
            self._lock.release()

    def _cws_ids(self):
        query = db.Product.select(db.Product.cws_product).where(db.Product.mapped == True).distinct()  # noqa: E712
        return [cws_id for (cws_id,) in query.tuples()]

    def _reconcile(self, cws_ids, report, dry_run):
        states = load_states(cws_ids, report.started, self.settings)
        report.products = len(states)
        changes = self._plan(states, report)
        changes = self._with_price_limits(changes, states, report)
        report.changes = changes
        report.deferred = sum(1 for change in changes if change.deferred_price is not None)
        if dry_run:
            report.inactive = _idle_offers(states, changes, report.paused)
        else:
            self._settle(states, changes)
            self._apply(changes, report)

    def _plan(self, states, report):
        return plan(states, report.started, report.paused, self.settings.price_changes_per_hour,
                    self.settings.g2a_create_offers)

    def _with_price_limits(self, changes, states, report):
        """Look up G2A's priceLimit for products about to get a price we never checked, and re-plan them."""
        unchecked = [c.g2a_id for c in changes if c.price is not None and not self.catalogue.limit_known(c.g2a_id)]
        learned = self.catalogue.look_up_limits(unchecked[:LIMIT_LOOKUPS], report)
        if not learned:
            return changes
        by_id = {state.g2a_id: state for state in states}
        redo = [replace(by_id[g2a_id], limit_min=low, limit_max=high) for g2a_id, (low, high) in learned.items()]
        return sorted([c for c in changes if c.g2a_id not in learned] + self._plan(redo, report),
                      key=lambda change: change.priority)

    def _settle(self, states, changes):
        """Products that need nothing and are not marked in sync yet become in_sync (missing offers stay failed)."""
        touched = {change.g2a_id for change in changes}
        settled = [s.g2a_id for s in states if s.sync_state != "in_sync" and s.g2a_id not in touched
                   and (s.offer_id is not None or not s.mapped)]
        if not settled:
            return
        for start in range(0, len(settled), 500):
            with db.write_transaction():  # one statement each: the web's reservations wait for it
                db.Product.update(sync_state="in_sync", sync_error=None).where(
                    db.Product.g2a_id.in_(settled[start:start + 500])).execute()

    def _apply(self, changes, report):
        for change in changes:
            if change.action == "missing":
                self._warn_missing(change)
        held = [Outcome(change) for change in changes if change.deferred_price is not None and not change.sends]
        store_outcomes(held, report.started)
        writes = [change for change in changes if change.sends]
        # Most urgent first; the rest stay planned for the next pass, so a pass fits its interval.
        writes, report.postponed = writes[:self.max_writes], max(0, len(writes) - self.max_writes)
        if not writes:
            return
        with ThreadPoolExecutor(self.writers, thread_name_prefix="g2a-write") as pool:
            futures = [pool.submit(self._write, change) for change in writes]
            done = []
            for future in as_completed(futures):
                done.append(self._count(future.result(), report))
                if len(done) >= FLUSH_EVERY:
                    self._record(done)
                    done = []
            self._record(done)

    def _record(self, outcomes):
        store_outcomes(outcomes, self.clock())
        for outcome in outcomes:
            if outcome.error is None:
                continue
            if outcome.change.action == "create" or outcome.error.status == 404:
                # The offer may exist after all (unknown outcome) or be gone: look for it before writing again.
                self.catalogue.forget_offer(outcome.change.g2a_id)
            if outcome.change.price is not None:
                self.catalogue.forget_limit(outcome.change.g2a_id)  # a refused price: G2A's limit may have moved

    def _write(self, change):
        """Runs on a writer thread: HTTP only, the database is written by the pass thread."""
        try:
            if change.action == "create":
                job = self.g2a.create_offer(change.g2a_id, change.price, change.stock)
            else:
                job = self.g2a.update_offer(change.offer_id, change.price, change.stock, change.active)
            return Outcome(change, resource_id=self.g2a.wait_job(job, self.job_timeout))
        except UpstreamError as err:
            return Outcome(change, error=err)

    def _count(self, outcome, report):
        report.writes += 1
        if outcome.error is not None:
            report.failed += 1
            report.error(f"{outcome.change.g2a_id}: {outcome.error}")
            event(log, "sync.write_failed", level=logging.WARNING, g2a_product=outcome.change.g2a_id,
                  change=str(outcome.change), error=str(outcome.error))
        return outcome

    def _warn_missing(self, change):
        event(log, "sync.missing_offer", level=logging.WARNING, g2a_product=change.g2a_id, remedy=MISSING_OFFER)
        db.Product.update(missing_offer_warned=True, sync_state="failed", sync_error=MISSING_OFFER).where(
            db.Product.g2a_id == change.g2a_id).execute()

    def _finish(self, report, started):
        report.finished = self.clock()
        report.duration = time.monotonic() - started
        level = logging.WARNING if report.failed or report.errors else logging.INFO
        if report.kind == "full" or report.writes:
            event(log, f"sync.{report.kind}_pass", level=level, products=report.products, writes=report.writes,
                  failed=report.failed, deferred=report.deferred, postponed=report.postponed,
                  seconds=round(report.duration, 3))
        return report
