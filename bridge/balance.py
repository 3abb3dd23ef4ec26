"""The CWS balance: read it, keep it in the setting "cws.balance" (its updated_at says when), alert when low,
and mark it spent when CWS refuses a purchase for it. Reservations and sync offer no key it cannot pay for."""
import logging
import threading
from concurrent.futures import ThreadPoolExecutor

from . import db
from .alerts import raise_alert
from .log import event
from .stock import BALANCE_KEY, known_balance

log = logging.getLogger(__name__)
CHECK, LOW_CHECK = 300.0, 30.0  # seconds between readings: normally, and while below CWS_LOW_BALANCE


class Balance:
    """One per process; `background(work, *args)` runs a reading off the caller's thread (a thread of its own)."""

    def __init__(self, settings, cws, background=None):
        self.settings, self.cws = settings, cws
        self._background = background or ThreadPoolExecutor(1, thread_name_prefix="cws-balance").submit
        self._lock = threading.Lock()
        self._queued = False

    def due(self, now):
        """Worker job: read the balance every CHECK s, or every LOW_CHECK s while it is low (so selling resumes
        soon after a top-up); the new balance, or None when no reading was due."""
        row, balance = db.Setting.get_or_none(db.Setting.key == BALANCE_KEY), known_balance()
        wait = LOW_CHECK if balance is None or balance < self.settings.cws_low_balance else CHECK
        if row is not None and (now - row.updated_at).total_seconds() < wait:
            return None
        return self.check(now)

    def check(self, now):
        """Read the CWS balance, store it, alert when low; the balance."""
        balance = self.cws.account().total_to_use
        with db.write_transaction():
            db.put_setting(BALANCE_KEY, balance)
        if balance < self.settings.cws_low_balance:
            raise_alert("low_balance", "cws", f"CWS balance {balance:.2f} {self.settings.currency} is below "
                                              f"CWS_LOW_BALANCE {self.settings.cws_low_balance}: top up", now)
        return balance

    def spent(self, now):
        """CWS refused a purchase for balance (10002): known too low now, whatever the last reading said, so
        nothing more is offered until a reading (queued now, then every LOW_CHECK s) shows the top-up."""
        with db.write_transaction():
            db.put_setting(BALANCE_KEY, 0)
        self.soon(now)

    def soon(self, now):
        """Read the balance on the background thread (at most one queued): POST /order never waits for it."""
        with self._lock:
            if self._queued:
                return
            self._queued = True
        self._background(self._in_background, now)

    def _in_background(self, now):
        with self._lock:
            self._queued = False
        try:
            self.check(now)
        except Exception as err:  # noqa: BLE001 (a failed balance read must never touch the purchase)
            event(log, "cws.balance_unavailable", level=logging.WARNING, error=str(err))
