"""The worker daemon: named periodic jobs on a schedule.Scheduler, each behind one guard and on its own thread
(so a slow sync never delays order polling, and a job never overlaps itself); a lease so only one worker runs
the money jobs; a warm stop on SIGTERM/SIGINT.
"""
import logging
import os
import signal
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import requests
import schedule

from . import alerts, db, memory, pause, stuck
from .auth import delete_expired_tokens
from .budget import budgets_for
from .crypto import open_key_box
from .delta import EVERY as DELTA_EVERY
from .cws import CwsClient
from .errors import BridgeError, UpstreamError
from .fulfillment import Fulfilment
from .g2a import G2aClient
from .lease import Lease
from .log import event
from .metrics import Metrics
from .products import MappingWatcher
from .reservations import expire_reservations
from .sync import SyncEngine
from .watchdog import Watchdog

log = logging.getLogger(__name__)
TICK = 0.5  # the loop's longest wait; the fastest jobs run every 0.5 s
STOP_GRACE = 8.0  # seconds running jobs get to finish after SIGTERM (the promise is "gone within 10 s")
HEARTBEAT = 5.0
# Seconds without a finished heartbeat after which the worker stops telling systemd's watchdog it is alive. The
# heartbeat takes the database's writer lock like every job that writes, so a frozen heartbeat is a frozen worker
# (the round-4 deadlock froze them all); the unit's WatchdogSec then has systemd restart it.
STALLED_AFTER = 60.0
TRIM_EVERY = 30.0  # seconds between giving the C heap's free pages back (memory.py)
CLOCK_JUMP = 5.0  # seconds of wall-clock step (NTP, DST) after which the schedule is rebuilt
SYNC_FAILURES_ALERT = 3


@dataclass(frozen=True)
class Job:
    """`run(now)` every `every` seconds; an exclusive job runs only while this worker holds the lease."""
    name: str
    every: float
    run: Callable
    exclusive: bool = True
    at_start: bool = False  # also run as soon as this worker becomes the active one


class Lane:
    """One daemon thread per job: kick() asks for a run, kicks during a run merge into one, so no overlap."""

    def __init__(self, job, runner):
        self.job, self._runner = job, runner
        self.idle = threading.Event()
        self.idle.set()
        self.finished = time.monotonic()  # when the last run ended (or the lane started)
        self._kicked = threading.Event()
        self._closed = False
        threading.Thread(target=self._loop, name=f"job-{job.name}", daemon=True).start()

    def kick(self):
        self._kicked.set()

    def close(self):
        self._closed = True
        self._kicked.set()

    def _loop(self):
        while True:
            self._kicked.wait()
            self._kicked.clear()
            if self._closed:
                return
            self.idle.clear()
            try:
                self._runner(self.job)
            finally:
                self.finished = time.monotonic()
                self.idle.set()


class Worker:
    """Runs `jobs` until stopped; the heartbeat (lease renewal, and publishing `metrics` if given) and the pause
    watch are added here."""

    def __init__(self, jobs, lease, pause_switch, clock=db.utcnow, metrics=None, watchdog=None):
        self.lease, self.pause, self.clock, self.metrics = lease, pause_switch, clock, metrics
        self.watchdog, self._stalled = watchdog, False
        own = [Job("heartbeat", HEARTBEAT, self.heartbeat, exclusive=False),
               Job("pause.watch", 1.0, self.watch_pause, exclusive=False)]
        self.jobs = {job.name: job for job in own + list(jobs)}
        self.failures = {name: 0 for name in self.jobs}
        self.scheduler = schedule.Scheduler()
        self.stopping = threading.Event()
        self._lanes = {}
        self._standing_by = False
        self._paused = None

    # ---- the loop --------------------------------------------------------------------------

    def run(self, stop):
        """Run until `stop` is set, then stop warm; returns the exit code."""
        self.start()
        last = (time.time(), time.monotonic())
        while not stop.is_set():
            self.scheduler.run_pending()
            last = self._check_clock(last)
            self._tell_watchdog()
            stop.wait(min(max(self.scheduler.idle_seconds or 0, 0.05), TICK))
        return self.shutdown()

    def start(self):
        event(log, "worker.started", holder=self.lease.holder, jobs=",".join(self.jobs))
        self._lanes = {name: Lane(job, self.run_job) for name, job in self.jobs.items()}
        self._schedule()
        self.run_job(self.jobs["heartbeat"])  # here, so the first runs already know who holds the lease
        self.kick("pause.watch")

    def _schedule(self):
        self.scheduler.clear()
        for name, job in self.jobs.items():
            self.scheduler.every(job.every).seconds.do(self.kick, name)

    def _check_clock(self, last):
        """schedule runs on the wall clock; after a step (NTP, a DST change) rebuild the schedule so no job stalls."""
        wall, mono = time.time(), time.monotonic()
        if abs((wall - last[0]) - (mono - last[1])) > CLOCK_JUMP:
            jump = round((wall - last[0]) - (mono - last[1]))
            event(log, "worker.clock_jumped", level=logging.WARNING, seconds=jump)
            self._schedule()
        return wall, mono

    def kick(self, name):
        self._lanes[name].kick()

    def _tell_watchdog(self):
        """Alive while the heartbeat keeps finishing; once it has not for STALLED_AFTER seconds, one ERROR line
        and silence, so systemd restarts the worker."""
        if self.watchdog is None:
            return
        since = time.monotonic() - self._lanes["heartbeat"].finished
        if since < STALLED_AFTER:
            self._stalled = False
            self.watchdog.ping()
        elif not self._stalled:
            self._stalled = True
            event(log, "worker.stalled", level=logging.ERROR, seconds=round(since),
                  remedy="the heartbeat is stuck; systemd's watchdog restarts the worker (WatchdogSec in its unit)")

    def shutdown(self):
        """Let running jobs finish (up to STOP_GRACE), give the lease back, and return 0."""
        self.stopping.set()
        event(log, "worker.stopping", grace_seconds=STOP_GRACE)
        deadline = time.monotonic() + STOP_GRACE
        late = [name for name, lane in self._lanes.items()
                if not lane.idle.wait(max(0.0, deadline - time.monotonic()))]
        if late:
            event(log, "worker.stop_abandoned", level=logging.WARNING, jobs=",".join(late))
        for lane in self._lanes.values():
            lane.close()
        self._release()
        event(log, "worker.stopped")
        return 0

    def _release(self):
        if not self.lease.held:
            return
        try:
            self.lease.release()
        except Exception as err:  # the lease then simply expires in 30 s
            event(log, "worker.lease_release_failed", level=logging.WARNING, error=describe(err))

    # ---- the guard -------------------------------------------------------------------------

    def run_job(self, job):
        """Run one job now unless stopping or not ours to run; an exception is logged, never raised. True if it ran."""
        now = self.clock()
        if self.stopping.is_set() or (job.exclusive and not self.lease.holds(now)):
            return False
        try:
            job.run(now)
        except Exception as err:
            self._failed(job, err, now)
            return True
        self.failures[job.name] = 0
        return True

    def _failed(self, job, err, now):
        self.failures[job.name] += 1
        count = self.failures[job.name]
        event(log, "job.failed", level=logging.ERROR, job=job.name, failures=count, error=describe(err))
        try:
            alert_for_failure(job.name, err, count, now)
        except Exception as alert_err:  # the database may be what is failing; the log line above stands
            event(log, "alert.not_queued", level=logging.ERROR, job=job.name, error=describe(alert_err))

    # ---- built-in jobs ---------------------------------------------------------------------

    def heartbeat(self, now):
        """Take or renew the lease; becoming the active worker runs the at-start jobs at once. The active worker
        also publishes its metrics for the web's /metrics."""
        was_held = self.lease.holds(now)
        if self.lease.acquire(now):
            if not was_held:
                self._standing_by = False
                event(log, "worker.active", holder=self.lease.holder)
                for name, job in self.jobs.items():
                    if job.at_start:
                        self.kick(name)
            if self.metrics is not None:
                self.metrics.publish()
            return
        if not self._standing_by:
            self._standing_by = True
            other = self.lease.other
            event(log, "worker.standby", level=logging.WARNING, holder=other.holder, until=other.expires_at,
                  remedy="another worker holds the lease on this database; this one takes over when it stops")

    def watch_pause(self, now):
        """Log once per change: paused (with the remedy) or resumed. The jobs obey the switch themselves."""
        paused = self.pause.is_paused()
        if paused == self._paused:
            return
        if paused:
            event(log, "worker.paused", level=logging.WARNING, remedy=pause.REMEDY)
        elif self._paused is not None:
            event(log, "worker.resumed")
        self._paused = paused


def alert_for_failure(name, err, count, now):
    """Rejected credentials alert at once; a sync that keeps failing alerts after SYNC_FAILURES_ALERT in a row."""
    if isinstance(err, UpstreamError) and err.status == 401:
        alerts.raise_alert("auth_failed", err.service,
                           f"{err.service.upper()} rejected our credentials ({err}); "
                           f"check the {err.service.upper()}_* credentials in bridge.env, then g2a-bridge doctor", now)
    if name.startswith("sync.") and count >= SYNC_FAILURES_ALERT:
        alerts.raise_alert("sync_failing", "sync", f"{name} failed {count} times in a row: {describe(err)}", now)


def describe(err):
    """One line: type and message, plus where it happened when it is a bug rather than an expected failure."""
    text = f"{type(err).__name__}: {err}"
    frames = traceback.extract_tb(err.__traceback__)
    if isinstance(err, BridgeError) or not frames:
        return text
    return f"{text} at {Path(frames[-1].filename).name}:{frames[-1].lineno}"


# ---- the real jobs -----------------------------------------------------------------------------


class SyncFailed(BridgeError):
    """A pass that reported errors and got no write through (CWS or G2A unreachable, every write refused)."""


def checked(sync_pass, metrics, throttling=tuple):
    """A sync pass as a job, counted in `metrics`, that fails (and so counts towards the sync_failing alert) when
    nothing worked. A pass that failed while CWS or G2A answer 429 (`throttling()` names the classes) is not a
    failure: the budget slows down and catches up, and alerts by itself if the throttle lasts (budget.py)."""
    def run(now):
        report = sync_pass(now)
        if report is None:  # a lane pass with nothing to do
            return
        metrics.sync_pass(report)
        if report.succeeded:
            return
        throttled = list(throttling())
        if throttled:
            event(log, "sync.throttled", level=logging.WARNING, kind=report.kind, budgets=",".join(throttled),
                  errors=len(report.errors), first=report.errors[0])
            return
        raise SyncFailed(f"{report.kind} pass: {len(report.errors)} errors, first: {report.errors[0]}")
    return run


def cleanup(now):
    expire_reservations(now)
    delete_expired_tokens(now)


def upstream_clients(settings, metrics=None, role="worker"):
    """The CWS and G2A clients of one process, spending the budgets of its `role` (budget.py), reporting to
    `metrics`."""
    metrics = metrics or Metrics("worker")
    budgets = budgets_for(settings, role)
    cws = CwsClient(settings, budgets=budgets, observer=metrics.upstream)
    g2a = G2aClient(settings, budgets=budgets, observer=metrics.upstream)
    metrics.watch_tokens(cws=cws, g2a=g2a)
    metrics.watch_budgets(budgets)
    return cws, g2a


def fulfilment_for(settings, cws):
    return Fulfilment(settings, cws, open_key_box(settings))


def build_jobs(settings, cws, g2a, pause_switch, watcher, metrics=None):
    """The production jobs and their cadence."""
    metrics = metrics or Metrics("worker")
    engine = SyncEngine(settings, cws, g2a, pause_switch)
    fulfilment = fulfilment_for(settings, cws)
    webhook = requests.Session()
    budgets = getattr(cws, "budgets", None)
    throttling = budgets.throttling if budgets is not None else tuple
    return [
        Job("products.watch", 2.0, lambda now: watcher.poll()),
        Job("sync.lane", 0.5, checked(engine.lane_pass, metrics, throttling)),
        Job("sync.full", settings.sync_interval, checked(engine.full_pass, metrics, throttling), at_start=True),
        Job("sync.delta", DELTA_EVERY, checked(engine.delta_pass, metrics, throttling)),
        Job("fulfilment.poll", 0.5, fulfilment.poll_due),
        Job("fulfilment.recover", 30.0, fulfilment.recover, at_start=True),
        Job("orders.stuck", 5.0, lambda now: stuck.alert_new(settings, now)),
        Job("cleanup", 60.0, cleanup, at_start=True),
        Job("cws.balance", 10.0, fulfilment.balance.due, at_start=True),
        Job("g2a.auth", 300.0, lambda now: next(g2a.offers(), None), at_start=True),
        Job("alerts.dispatch", 5.0, lambda now: alerts.dispatch_pending(settings, now, webhook)),
        Job("memory.trim", TRIM_EVERY, lambda now: memory.give_back(), exclusive=False),  # this process's own
    ]


def install_signal_handlers(stop):
    """First SIGTERM/SIGINT: set the flag, the loop stops warm. Second: exit now."""
    def handle(signum, frame):
        if stop.is_set():
            os._exit(1)
        stop.set()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, handle)


def main(settings):
    """`g2a-bridge worker`: the database is open; run until SIGTERM/SIGINT, then exit the process."""
    stop = threading.Event()
    install_signal_handlers(stop)
    switch = pause.PauseSwitch(settings.service_enabled)
    metrics = Metrics("worker")
    cws, g2a = upstream_clients(settings, metrics)
    watcher = MappingWatcher(settings.products_file, settings.default_fixed_profit, settings.default_fee)
    watcher.poll()  # the mapping is in the database before the first sync pass reads it
    jobs = build_jobs(settings, cws, g2a, switch, watcher, metrics)
    code = Worker(jobs, Lease(), switch, metrics=metrics, watchdog=Watchdog()).run(stop)
    logging.shutdown()
    # Threads past the grace (an HTTP call in a sync writer pool) would hold the interpreter's exit beyond
    # the 10 s promise; everything worth keeping is committed, so leave without joining them.
    os._exit(code)
