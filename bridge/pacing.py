"""Spreading upstream calls over time: a Pacer spaces one class's requests evenly, an Allowance caps the calls a
long pass may make. CWS meters windows of 5-10 minutes; a sliding window alone would let a sweep spend ten
minutes' budget in one and then stall, which is what freshness cannot afford.
"""
import threading
import time

BURST = 5  # requests a Pacer lets go at once after a quiet spell


class Pacer:
    """Requests at `rate()` per second (None: no pacing), shared by threads, with a burst of `burst` after a quiet
    spell so a small catalogue never waits."""

    def __init__(self, rate, burst=BURST, clock=time.monotonic, sleep=time.sleep):
        self.rate, self.burst, self._clock, self._sleep = rate, burst, clock, sleep
        self._lock = threading.Lock()
        self._tokens, self._at = float(burst), clock()

    def wait(self):
        """Block until the next request may go, and count it."""
        with self._lock:
            rate, now = self.rate(), self._clock()
            if rate is None:
                return
            self._tokens = min(float(self.burst), self._tokens + (now - self._at) * rate)
            self._at = now
            self._tokens -= 1
            delay = -self._tokens / rate if self._tokens < 0 else 0.0
        if delay > 0:
            self._sleep(delay)


class Allowance:
    """G2A calls (offer writes, price-limit look-ups) a pass may make: `capacity` at its start, then refilled at
    `per_second` (up to capacity), so a sweep of many minutes leaves G2A's budget to the priority lane."""

    def __init__(self, capacity, per_second=0.0, clock=time.monotonic):
        self.capacity, self.per_second, self._clock = capacity, per_second, clock
        self._left, self._at = float(capacity), clock()

    def take(self, wanted):
        """How many of `wanted` calls may go now (they are counted)."""
        now = self._clock()
        self._left = min(float(self.capacity), self._left + (now - self._at) * self.per_second)
        self._at = now
        granted = min(wanted, int(self._left))
        self._left -= granted
        return granted
