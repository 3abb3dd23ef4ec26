"""The seller's pause switch: persisted in the database, so web, worker and restarts all obey it."""
import logging
import time

from . import db
from .log import event

log = logging.getLogger(__name__)
KEY = "paused"
REMEDY = 'run "g2a-bridge resume" to resume'
# What pausing does, said as it is (docs/decisions.md, issue 13): G2A's offers keep their stock.
EFFECT = ("within 2 s every reservation is refused as out of stock, so nothing new is sold; G2A offers keep "
          "their price and stock (sync only lowers stock and activates nothing)")


class PauseSwitch:
    """Reads the flag at most once per `max_age` seconds (the operator promise is "obeyed within 2 s")."""

    def __init__(self, service_enabled=True, max_age=1.0, clock=time.monotonic):
        self.default = not service_enabled
        self.max_age, self.clock = max_age, clock
        self._value, self._read_at = None, None

    def is_paused(self):
        now = self.clock()
        if self._read_at is None or now - self._read_at >= self.max_age:
            self._value = read_paused(self.default)
            self._read_at = now
        return self._value


def read_paused(default=False):
    value = db.get_setting(KEY)
    return default if value is None else value == "1"


def set_paused(paused):
    db.put_setting(KEY, "1" if paused else "0")
    if paused:
        event(log, "service.paused", level=logging.WARNING, remedy=REMEDY)
    else:
        event(log, "service.resumed")
