"""Upstream request budgets: a sliding-window limiter per endpoint class, each process holding a fixed slice of
UPSTREAM_BUDGET_SHARE x the limit, except the catalogue reads, whose window the worker and the CLI share through the
database; after a 429 a class halves its own pace and wins it back slowly (AIMD), and a class answered 429 for
minutes raises one alert. Why: docs/decisions.md, "Upstream budgets" and "one catalogue window in the database".
Lock order: a budget's lock, then the database writer lock (a shared window writes while holding the first), so
nothing may read a budget inside a write transaction.
"""
import collections
import logging
import math
import threading
import time
from dataclasses import dataclass

from . import alerts, db
from .log import event
from .sharedwindow import SharedWindow

log = logging.getLogger(__name__)

ROLES = ("web", "worker", "cli")
UNMETERED = "cws_order"  # the purchase and its polling: counted, never held back by a read budget
CWS_OTHER_PER_5_MIN = 300  # history and account reads: CWS publishes no limit; one a second is plenty for us
# Each process's slice of share x limit. Rows sum to 1, so web + worker + cli never exceed the share together.
# The web only re-reads single products (the reservation freshness check) and never lists or calls G2A; the
# CLI keeps a small slice of its own so `doctor` and `retry` never eat the daemons' budget.
SPLIT = {
    "cws_token": {"web": 0.4, "worker": 0.4, "cli": 0.2},
    "cws_product": {"web": 0.45, "worker": 0.45, "cli": 0.1},
    "cws_other": {"web": 0.3, "worker": 0.6, "cli": 0.1},
    "g2a": {"web": 0.0, "worker": 0.9, "cli": 0.1},
}
# Classes not split but shared: the roles named draw on one window of the whole share, kept in the database
# (sharedwindow.py). The catalogue reads set how long a sweep takes; only the worker's sweep and `g2a-bridge sync`
# make them, so whichever reads gets all of the share, and both together never more.
SHARED = {"cws_list": ("worker", "cli")}
MIN_PACE = 0.1  # AIMD never slows a class below a tenth of its slice
DECREASE = 0.5  # pace multiplier after each 429
RECOVERY_PER_WINDOW = 1.0  # pace regained per window without a 429 (+0.1 every tenth of the window)
BACKOFF_FIRST, BACKOFF_CAP = 0.25, 60.0  # hold after 429s in a row without Retry-After: 0.25, 0.5, 1 ... 60 s
RETRY_AFTER_MAX = 600.0  # a longer (or negative) Retry-After is taken for a server bug and ignored
PERSISTENT = 300.0  # seconds of 429s on one class before it alerts
# A slot counts from when it is taken, the upstream's meter from when the request arrives, and that delay varies
# (thread scheduling, a busy machine): each slot is held this much longer than the window, or at full pace the
# upstream sees one request more than the cap in its own window (bench/staleness_bench.py: 361 of 360).
IN_FLIGHT = 1.0


@dataclass(frozen=True)
class Limit:
    """One endpoint class as CWS or G2A meters it: `per_window` requests per `window` seconds, all processes."""
    name: str
    label: str
    per_window: int
    window: float
    variable: str | None  # the setting that changes it (None: ours, not a published limit)


def limits(settings):
    """Every metered class, from the configured limits."""
    return {limit.name: limit for limit in (
        Limit("cws_token", "CWS POST /oauth/token", settings.cws_token_per_5_min, 300.0,
              "CWS_TOKEN_REQUESTS_PER_5_MIN"),
        Limit("cws_list", "CWS GET /v3/products", settings.cws_list_per_10_min, 600.0,
              "CWS_LIST_REQUESTS_PER_10_MIN"),
        Limit("cws_product", "CWS GET /v3/products/{id}", settings.cws_product_per_5_min, 300.0,
              "CWS_PRODUCT_REQUESTS_PER_5_MIN"),
        Limit("cws_other", "CWS history and account reads", CWS_OTHER_PER_5_MIN, 300.0, None),
        Limit("g2a", "G2A Sales API", settings.g2a_requests_per_minute, 60.0, "G2A_REQUESTS_PER_MINUTE"),
    )}


def allot(total, fractions):
    """Whole requests per role from `total` (largest remainder, so they add up to at most floor(total)); a role with
    a slice gets at least one, so a tiny limit cannot lock it out (the only case where the sum may pass total)."""
    exact = {role: total * fraction for role, fraction in fractions.items()}
    counts = {role: math.floor(value) for role, value in exact.items()}
    spare = math.floor(total) - sum(counts.values())
    for role in sorted(exact, key=lambda r: counts[r] - exact[r])[:max(0, spare)]:
        counts[role] += 1
    return {role: max(count, 1) if fractions[role] > 0 else 0 for role, count in counts.items()}


class Budget:
    """This process's slice of one class: at most `limit` requests in any `window` seconds (thread-safe), fewer for a
    while after a 429. `limit` None counts without ever holding back (the purchase and its polling)."""

    def __init__(self, name, limit=None, window=60.0, clock=time.monotonic, sleep=time.sleep, alarm=None,
                 label=None, remedy="", shared=None):
        self.name, self.limit, self.window, self._shared = name, limit, window, shared
        self._held = window + IN_FLIGHT  # how long a slot stays in this process's window
        self._clock, self._sleep, self._alarm = clock, sleep, alarm
        self.label, self._remedy = label or name, remedy
        self._lock = threading.Lock()
        self._sent = collections.deque()
        self._slowed_to, self._slowed_at = 1.0, None  # AIMD: the pace right after the last 429, and when
        self._hold_until = 0.0
        self._streak_since, self._streak, self._alerted = None, 0, False
        self.requests = self.throttles = 0

    # ---- taking a slot ---------------------------------------------------------------------

    def acquire(self, timeout=None):
        """Wait for a slot and take it; False (at once) when none frees up within `timeout` seconds."""
        deadline = None if timeout is None else self._clock() + timeout
        while True:
            wait = self._take()
            if wait <= 0:
                return True
            if deadline is not None and self._clock() + wait > deadline:
                return False
            self._sleep(wait)

    def try_acquire(self):
        """Take a slot if one is free now; never waits."""
        return self.acquire(timeout=0)

    def _take(self):
        """0 when a request may go now (it is counted), else the seconds until one may."""
        with self._lock:
            now = self._clock()
            self._prune(now)
            if self.limit is not None:
                if now < self._hold_until:
                    return self._hold_until - now
                wait = self._wait(now, self._cap(now))
                if wait > 0:
                    return wait
            self._sent.append(now)
            self.requests += 1
            return 0

    def _wait(self, now, cap):
        """0 when the window (this process's, or the one shared through the database) has a slot free, which the
        shared window records at once; else the seconds until one frees up."""
        if self._shared is not None:
            return self._shared.take(cap, self._held)
        return 0 if len(self._sent) < cap else self._sent[len(self._sent) - cap] + self._held - now

    def give_back(self):
        """Return the newest slot: its attempt got no answer at all (refused, dropped, timed out), so the upstream's
        meter most likely never counted it, and an outage must not leave the class spent once the upstream is back."""
        with self._lock:
            if self._sent:
                self._sent.pop()
                if self._shared is not None:
                    self._shared.give_back()

    def _prune(self, now):
        while self._sent and self._sent[0] <= now - self._held:
            self._sent.popleft()

    def _pace(self, now):
        """The share of the slice in use: 1 normally; after a 429 halved, then regained linearly."""
        if self._slowed_at is None:
            return 1.0
        regained = RECOVERY_PER_WINDOW * (now - self._slowed_at) / self.window
        return min(1.0, self._slowed_to + regained)

    def _cap(self, now):
        # Never 0: a process without a slice of a class (the web's catalogue reads) never calls it, and one that
        # did by mistake gets one request per window instead of hanging.
        return max(1, math.floor(self.limit * self._pace(now)))

    # ---- what callers and metrics read ------------------------------------------------------

    @property
    def per_second(self):
        """The pace this process may keep now (requests per second); None for an unmetered class."""
        if self.limit is None:
            return None
        with self._lock:
            return self._cap(self._clock()) / self.window

    def window_use(self):
        """(requests in the current window, this process's limit or None)."""
        with self._lock:
            self._prune(self._clock())
            return len(self._sent), self.limit

    @property
    def throttling(self):
        """True while the last answer of this class was a 429."""
        return self._streak_since is not None

    # ---- what the upstream tells us ----------------------------------------------------------

    def throttled(self, retry_after=None):
        """A 429: halve the pace, hold every request of this class for Retry-After seconds (when sane) or an
        exponential backoff, and alert once when the class has been throttled for PERSISTENT seconds. Returns the
        hold in seconds."""
        with self._lock:
            now = self._clock()
            self.throttles += 1
            if now >= self._hold_until:  # 429s during a hold answer requests sent before it: one slow-down for all
                self._slowed_to, self._slowed_at = max(MIN_PACE, self._pace(now) * DECREASE), now
            self._streak += 1
            if self._streak_since is None:
                self._streak_since = now
            hold = self._hold(retry_after)
            self._hold_until = max(self._hold_until, now + hold)
            lasted = now - self._streak_since
            alert = lasted >= PERSISTENT and not self._alerted
            self._alerted = self._alerted or alert
        event(log, "upstream.throttled", level=logging.WARNING, budget=self.name, hold=round(hold, 3),
              pace=round(self._slowed_to, 3), streak_seconds=round(lasted, 1))
        if alert:
            self._raise(lasted)
        return hold

    def _hold(self, retry_after):
        """Retry-After when it is sane, else an exponential backoff over the 429s in a row."""
        sane = retry_after is not None and 0 <= retry_after <= RETRY_AFTER_MAX
        return float(retry_after) if sane else min(BACKOFF_CAP, BACKOFF_FIRST * 2 ** (self._streak - 1))

    def answered(self):
        """An answer other than 429: the throttle streak (if any) is over."""
        if self._streak_since is not None:
            with self._lock:
                self._streak_since, self._streak, self._alerted = None, 0, False

    def _raise(self, lasted):
        text = f"{self.label} answered 429 for {lasted / 60:.0f} min" + (f"; {self._remedy}" if self._remedy else "")
        try:
            if self._alarm is not None:
                self._alarm(self.name, text)
        except Exception as err:  # the database may be what is failing; the warning above stands
            event(log, "upstream.throttle_alert_failed", level=logging.ERROR, budget=self.name, error=str(err))


class Budgets:
    """One process's budgets, indexable by class name (the five metered classes and UNMETERED)."""

    def __init__(self, role, budgets):
        self.role, self._budgets = role, budgets

    def __getitem__(self, name):
        return self._budgets[name]

    def items(self):
        return self._budgets.items()

    def throttling(self):
        """The classes whose last answer was a 429."""
        return [name for name, budget in self._budgets.items() if budget.throttling]


def budgets_for(settings, role, clock=time.monotonic, sleep=time.sleep, alarm=None, wall=time.time):
    """The budgets of a `role` process ("web", "worker" or "cli"); `alarm(class, text)` defaults to an alert. The
    SHARED windows live in the database and run on `wall` (None: kept in this process, for tests without one)."""
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; one of {ROLES}")
    alarm = alarm or raise_throttle_alert
    budgets = {UNMETERED: Budget(UNMETERED, None, clock=clock, sleep=sleep)}
    for name, limit in limits(settings).items():
        combined = settings.upstream_budget_share * limit.per_window
        count, shared = _slice(name, role, combined, wall)
        budgets[name] = Budget(name, count, limit.window, clock=clock, sleep=sleep, alarm=alarm, label=limit.label,
                               remedy=_remedy(limit, combined), shared=shared)
    return Budgets(role, budgets)


def _slice(name, role, combined, wall):
    """(requests per window this role may send, the SharedWindow they are counted in or None)."""
    if name not in SHARED:
        return allot(combined, SPLIT[name])[role], None
    if role not in SHARED[name]:
        return 0, None
    return max(1, math.floor(combined)), None if wall is None else SharedWindow(name, wall)


def _remedy(limit, combined):
    what = f"lower {limit.variable}" if limit.variable else "CWS publishes no limit for these: ask CWS support"
    return f"budget {math.floor(combined)}/{limit.window:g} s \N{EM DASH} {what}"


def raise_throttle_alert(name, text):
    alerts.raise_alert("upstream_throttled", name, text, db.utcnow())
