"""Rate limits for a fake API: sliding windows per rate class (429 beyond them), a timed throttle per class, and
request and 429 counts per class (and the most let through in any window) for tests and benches. Off until limits
are set."""
import collections
import threading
from time import monotonic


class RateLimits:
    """`limits` {class: (requests, window seconds)}; `defaults` are what enforce() applies when given none."""

    def __init__(self, limits=None, retry_after=True, defaults=None):
        self.limits = dict(limits or {})  # empty: nothing enforced
        self.retry_after = retry_after  # whether a 429 carries a Retry-After header
        self.defaults = dict(defaults or {})
        self.clock = monotonic  # tests may replace it
        self._lock = threading.Lock()
        self._throttled_until = {}  # class -> clock time until which every request of it is refused
        self._accepted = collections.defaultdict(collections.deque)  # class -> times of the requests let through
        self.requests, self.refused = collections.Counter(), collections.Counter()
        self.peaks = collections.Counter()  # class -> most requests let through in any window of its limit

    def enforce(self, limits=None, retry_after=True):
        """Refuse requests beyond `limits` (None: the defaults; {}: none) in any sliding window."""
        with self._lock:
            self.limits = dict(self.defaults if limits is None else limits)
            self.retry_after = retry_after

    def throttle(self, rate_class, seconds):
        """Refuse every request of `rate_class` for the next `seconds`."""
        with self._lock:
            self._throttled_until[rate_class] = self.clock() + seconds

    def counts(self):
        """Requests and 429s per class since the start, the most let through in any window (enforced classes), and
        the limits in force."""
        with self._lock:
            return {"requests": dict(self.requests), "throttled": dict(self.refused), "peaks": dict(self.peaks),
                    "limits": {name: list(limit) for name, limit in self.limits.items()},
                    "retry_after": self.retry_after}

    def admit(self, rate_class):
        """Count a request: 0 when it may be answered, else the seconds until one of its class may."""
        with self._lock:
            self.requests[rate_class] += 1
            wait = self._wait(rate_class, self.clock())
            if wait > 0:
                self.refused[rate_class] += 1
            return wait

    def _wait(self, rate_class, now):
        throttled = self._throttled_until.get(rate_class, 0.0) - now
        if throttled > 0:
            return throttled
        if rate_class not in self.limits:
            return 0
        limit, window = self.limits[rate_class]
        accepted = self._accepted[rate_class]
        while accepted and accepted[0] <= now - window:
            accepted.popleft()
        if len(accepted) >= limit:
            return accepted[0] + window - now
        accepted.append(now)
        self.peaks[rate_class] = max(self.peaks[rate_class], len(accepted))
        return 0

    def control(self, body):
        """A /_sim/limits body: {"enforce": true (defaults) | false | {class: [requests, seconds]},
        "retry_after": bool, "throttle": {class: seconds}}; answers counts()."""
        enforce = body.get("enforce")
        if enforce is not None:
            limits = None if enforce is True else {name: tuple(limit) for name, limit in (enforce or {}).items()}
            self.enforce(limits, body.get("retry_after", True))
        for rate_class, seconds in body.get("throttle", {}).items():
            self.throttle(rate_class, float(seconds))
        return self.counts()
