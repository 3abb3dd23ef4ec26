"""Fakes shared by the unit tests."""


class FakeClock:
    """Monotonic time that moves only when the code under test sleeps or the test sets `now`; records each sleep."""

    def __init__(self, now=0.0):
        self.now, self.slept = now, []

    def __call__(self):
        return self.now

    def sleep(self, seconds):
        self.slept.append(seconds)
        self.now += seconds
