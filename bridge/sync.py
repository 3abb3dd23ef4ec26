"""Offer sync: SyncEngine reads CWS (the paced sweep, delta reads, the priority lane), sends the changes plan.py
finds as G2A jobs and records what G2A confirmed. An unchanged catalogue costs zero writes.
"""
import itertools
import json
import logging
import time
from collections import namedtuple
from concurrent.futures import ThreadPoolExecutor, as_completed, wait
from dataclasses import dataclass, field, replace
from datetime import timedelta

from . import db, delta, lane, sweep
from .catalogue import BATCH_SIZE, Catalogue, clear_marks
from .errors import UpstreamError
from .log import event
from .offers import Outcome, load_states, prune_price_changes, store_outcomes
from .pacing import Allowance, Pacer
from .plan import MISSING_OFFER, inactive_reason, plan
from .sweep import REQUESTS_PER_WRITE

log = logging.getLogger(__name__)

WRITERS = 8  # PATCHes in flight at once; the g2a request budget (budget.py) still caps the rate
JOB_TIMEOUT = 60.0
FLUSH_EVERY = 200  # confirmed writes per database transaction
LIMIT_LOOKUPS = 20  # G2A priceLimit look-ups a pass may start with, only for products about to get a price
LANE_BACKOFF = 5.0  # seconds without lane passes after CWS failed to answer one
QUIET = 60.0  # seconds without optional reads (hot products, delta reads) after a CWS read failed (not a 429)
BACKOFF_CAP = 60.0  # seconds, and at most 8 intervals: the longest wait between sweeps while CWS cannot be read
MARKS_PER_PASS = 50  # postback marks the lane takes per run, oldest first
LAST_PASS_KEY = "sync.last_pass"
LAST_SUCCESS_KEY = "sync.last_success"  # written by each full pass that succeeded


def writes_per_pass(settings):
    """Writes one pass may send: a third of the G2A budget of one sync interval (each costs a PATCH and job polls)."""
    return max(1, int(settings.g2a_requests_per_minute * settings.sync_interval / 60 / REQUESTS_PER_WRITE))


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
    cws_failed: bool = False  # a CWS read failed other than with a 429
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

    def cws_error(self, err, what):
        """A CWS read failed: reported; cws_failed unless it was a 429 (the budget's hold deals with those)."""
        self.cws_failed = self.cws_failed or err.status != 429
        self.error(f"{what}: {err}")

    def as_json(self):
        return json.dumps({"kind": self.kind, "started": self.started.isoformat(),
                           "finished": self.finished.isoformat() if self.finished else None,
                           "duration": round(self.duration, 3), "paused": self.paused, "products": self.products,
                           "planned": len(self.changes), "writes": self.writes, "failed": self.failed,
                           "deferred": self.deferred, "postponed": self.postponed, "errors": self.errors})


def _idle_offers(states, changes, paused):
    changed = {change.g2a_id for change in changes}
    return [f"{state.g2a_id} stays inactive: {why}" for state in states
            if state.mapped and state.g2a_id not in changed and not state.offer_active
            and (why := inactive_reason(state, paused))]


Allowances = namedtuple("Allowances", "writes lookups")


class SyncEngine:
    """Reconciles G2A offers with CWS: the paced full sweep (page by page) and the priority lane."""

    def __init__(self, settings, cws, g2a, pause_switch, clock=db.utcnow, writers=WRITERS, job_timeout=JOB_TIMEOUT,
                 list_pacer=None):
        self.settings, self.cws, self.g2a, self.pause, self.clock = settings, cws, g2a, pause_switch, clock
        self.catalogue = Catalogue(cws, g2a)
        self.writers, self.job_timeout = writers, job_timeout
        self.max_writes = writes_per_pass(settings)
        self.batch_size = BATCH_SIZE
        self.inflight = lane.InFlight()
        self.list_pacer = list_pacer or Pacer(lambda: self._pace("cws_list"))
        self.hot = lane.HotReads(settings, lambda: self._pace("cws_product"))
        self.delta = delta.DeltaReads()
        self._lane_resume_at = self._quiet_until = 0.0
        self._failed_sweeps, self._sweep_resume_at = 0, None
        self._pools = {}  # "full" or "urgent" -> writer threads, kept between passes

    def full_pass(self, now=None, dry_run=False):
        """One sweep: every mapped product read from CWS at the budget's pace, each answer reconciled as it
        arrives; with dry_run the changes are planned (CWS and offers read) but not sent."""
        report = PassReport("full", now or self.clock(), paused=self.pause.is_paused())
        if self._sweep_resume_at is not None and report.started < self._sweep_resume_at:
            return self._skipped(report)
        stamp = self.clock if now is None else (lambda: now)
        started = time.monotonic()
        mapped = set(sweep.mapped_cws_ids())
        allowance = self._allowances(sweep.write_pace(self.settings))
        mode, _ = sweep.reading_plan(len(mapped), sweep.last_listing(), self.batch_size)
        progress = None if dry_run else sweep.Progress(report.started, mode, len(mapped))
        parts = sweep.read(self.cws, mapped, (mode, self.batch_size), self.list_pacer, stamp, report)
        first = next(parts, None)  # CWS first, as passes always did: its token is in hand before G2A is listed
        self.catalogue.discover_if_needed(report)
        self._sweep_part(sweep.unmapped_only(mapped), stamp(), report, dry_run, allowance)
        for cws_ids in itertools.chain(() if first is None else [first], parts):
            self._sweep_part(cws_ids, stamp(), report, dry_run, allowance)
            if progress:
                progress.read(len(cws_ids))
        self._finish(report, started)
        return self._dry_run_listed(report) if dry_run else self._recorded(report, progress)

    def _optional_reads_allowed(self):
        """Hot products and delta reads only add to what CWS is asked; after a CWS failure they wait QUIET seconds
        (each failed call also spends a token request), while sweeps and postback marks carry on."""
        return time.monotonic() >= self._quiet_until

    @staticmethod
    def _dry_run_listed(report):
        """The planned changes most urgent first, and the idle offers by G2A id, as `sync --dry-run` prints them."""
        report.changes.sort(key=lambda change: change.priority)
        report.inactive.sort(key=lambda line: int(line.split()[0]))
        return report

    def _skipped(self, report):
        """A sweep not tried while backing off: failed, so the sync_failing streak goes on, without a CWS call."""
        report.cws_failed = True
        report.error(f"CWS products: unreachable at the last {self._failed_sweeps} sweeps; next try at "
                     f"{self._sweep_resume_at.isoformat()}")
        return self._finish(report, time.monotonic())

    def _back_off(self, report):
        """After a sweep that could not read CWS the next waits 1, 2, 4 ... intervals (at most BACKOFF_CAP): each
        try also spends a token request, and an outage must not use up that budget before CWS is back."""
        self._failed_sweeps = self._failed_sweeps + 1 if report.cws_failed else 0
        if not report.cws_failed:
            self._sweep_resume_at = None
            return
        interval = self.settings.sync_interval
        wait = min(BACKOFF_CAP, 8 * interval, interval * 2 ** (self._failed_sweeps - 1))
        self._sweep_resume_at = report.started + timedelta(seconds=wait)

    def _recorded(self, report, progress):
        self._back_off(report)
        progress.finish(report.finished)
        prune_price_changes(report.started)
        db.put_setting(LAST_PASS_KEY, report.as_json())
        if report.succeeded:
            db.put_setting(LAST_SUCCESS_KEY, report.finished.isoformat())
        return report

    def _sweep_part(self, cws_ids, now, report, dry_run, allowance):
        report.paused = report.paused or self.pause.is_paused()
        with self.inflight.claim(cws_ids) as mine:
            self._reconcile(mine, now, report, dry_run, allowance)

    def delta_pass(self, now=None):
        """Read what CWS changed since the last read (updatedSince) and reconcile it; None when deltas are off
        (no sweep finished yet, or CWS ignored the parameter lately)."""
        now = now or self.clock()
        since = self.delta.since(now) if self._optional_reads_allowed() else None
        if since is None:
            return None
        report = PassReport("delta", now, paused=self.pause.is_paused())
        started = time.monotonic()
        covered = self.delta.read(self.cws, set(sweep.mapped_cws_ids()), since, self.list_pacer, self.clock, report)
        self._sweep_part(sorted(covered or ()), now, report, False, self._allowances())
        return self._finish(report, started)

    def lane_pass(self, now=None):
        """Re-read (single GETs) and reconcile the products postbacks marked and the hot products due; None when
        there was nothing to do."""
        if time.monotonic() < self._lane_resume_at:
            return None
        now = now or self.clock()
        marks = lane.marks(MARKS_PER_PASS)
        hot = self.hot.due(now) if self._optional_reads_allowed() else []
        wanted = list(marks) + [cws_id for cws_id in hot if cws_id not in marks]
        if not wanted:
            return None
        with self.inflight.claim(wanted) as mine:
            if not mine:
                return None
            report = PassReport("lane", now, paused=self.pause.is_paused())
            started = time.monotonic()
            if self.catalogue.read_products(mine, now, report):
                clear_marks({cws_id: marks[cws_id] for cws_id in mine if cws_id in marks})
            else:
                self._lane_resume_at = time.monotonic() + LANE_BACKOFF
            # Reconciled even when CWS failed: stock may have moved here meanwhile (reservations, purchases).
            self._reconcile(mine, now, report, False, self._allowances())
        return self._finish(report, started)

    def _pace(self, budget):
        """Requests per second this process may keep up in a budget class (None: the client is not metered)."""
        budgets = self.cws.budgets
        return None if budgets is None else budgets[budget].per_second

    def _allowances(self, per_second=0.0):
        """Writes and price-limit look-ups one pass may send: a full allowance now, refilled at `per_second`."""
        return Allowances(Allowance(self.max_writes, per_second), Allowance(LIMIT_LOOKUPS, per_second))

    def _reconcile(self, cws_ids, now, report, dry_run, allowance):
        if not cws_ids:
            return
        states = load_states(cws_ids, now, self.settings)
        report.products += len(states)
        changes = self._plan(states, now, report.paused)
        changes = self._with_price_limits(changes, states, now, report, allowance)
        report.changes.extend(changes)
        report.deferred += sum(1 for change in changes if change.deferred_price is not None)
        if dry_run:
            report.inactive.extend(_idle_offers(states, changes, report.paused))
        else:
            self._settle(states, changes)
            self._apply(changes, now, report, allowance)

    def _plan(self, states, now, paused):
        return plan(states, now, paused, self.settings.price_changes_per_hour, self.settings.g2a_create_offers)

    def _with_price_limits(self, changes, states, now, report, allowance):
        """Look up G2A's priceLimit for products about to get a price we never checked, and re-plan them."""
        unchecked = [c.g2a_id for c in changes if c.price is not None and not self.catalogue.limit_known(c.g2a_id)]
        unchecked = unchecked[:allowance.lookups.take(len(unchecked))]
        learned = self.catalogue.look_up_limits(unchecked, report)
        if not learned:
            return changes
        by_id = {state.g2a_id: state for state in states}
        redo = [replace(by_id[g2a_id], limit_min=low, limit_max=high) for g2a_id, (low, high) in learned.items()]
        return sorted([c for c in changes if c.g2a_id not in learned] + self._plan(redo, now, report.paused),
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

    def _apply(self, changes, now, report, allowance):
        for change in changes:
            if change.action == "missing":
                self._warn_missing(change)
        held = [Outcome(change) for change in changes if change.deferred_price is not None and not change.sends]
        store_outcomes(held, now)
        writes = [change for change in changes if change.sends]
        # Most urgent first; the rest stay planned for the next sweep, so G2A's budget is never spent by sync alone.
        granted = allowance.writes.take(len(writes))
        writes, report.postponed = writes[:granted], report.postponed + len(writes) - granted
        if not writes:
            return
        futures = [self._pool(report.kind).submit(self._write, change) for change in writes]
        try:
            done = []
            for future in as_completed(futures):
                done.append(self._count(future.result(), report))
                if len(done) >= FLUSH_EVERY:
                    self._record(done)
                    done = []
            self._record(done)
        finally:
            wait(futures)  # a pass never ends with its writes still in flight

    def _pool(self, kind):
        """The writer threads of a pass kind, started once: the lane passes every 0.5 s, and threads started and
        ended per pass spread the worker's memory over glibc's per-thread arenas, where freed memory piled up. The
        lane and delta passes share one pool, as each writes a few urgent changes; a full pass, which may queue
        hundreds, has its own, so it never holds them up (docs/decisions.md)."""
        name = "full" if kind == "full" else "urgent"
        if name not in self._pools:
            self._pools[name] = ThreadPoolExecutor(self.writers, thread_name_prefix=f"g2a-write-{name}")
        return self._pools[name]

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
        if report.cws_failed:
            self._quiet_until = time.monotonic() + QUIET
        report.finished = self.clock()
        report.duration = time.monotonic() - started
        level = logging.WARNING if report.failed or report.errors else logging.INFO
        if report.kind == "full" or report.writes:
            event(log, f"sync.{report.kind}_pass", level=level, products=report.products, writes=report.writes,
                  failed=report.failed, deferred=report.deferred, postponed=report.postponed,
                  seconds=round(report.duration, 3))
        return report

