"""One endpoint class's send times across every process on the database: a sliding window kept in a setting row,
so processes that draw on the same class (the worker's sweep and the CLI's `sync`) share one limit exactly,
through crashes and restarts too. Why: docs/decisions.md, "Upstream budgets: one catalogue window in the database".
"""
import json
import time

from . import db

PREFIX = "budget."  # the setting holding the window of class NAME is "budget.NAME"


class SharedWindow:
    """take(cap, window): send one request of this class now if fewer than `cap` went out, from any process, in the
    last `window` seconds of `clock` (wall time: it is compared across processes and hosts)."""

    def __init__(self, name, clock=time.time):
        self.key, self._clock = PREFIX + name, clock
        self._mine = []  # our own send times still in the window, for give_back()

    def take(self, cap, window):
        """0 when the request may go now (it is recorded), else the seconds until a slot frees up."""
        with db.write_transaction():
            now, times = round(self._clock(), 3), self._locked()
            times = [at for at in times if at > now - window]
            if len(times) >= cap:
                return max(0.001, times[len(times) - cap] + window - now)
            self._mine = [at for at in self._mine if at > now - window] + [now]
            self._store(times + [now])
        return 0.0

    def give_back(self):
        """Forget our newest send (its attempt got no answer, so the upstream most likely never counted it)."""
        if not self._mine:
            return
        sent = self._mine.pop()
        with db.write_transaction():
            times = self._locked()
            if sent in times:
                times.remove(sent)
                self._store(times)

    def _locked(self):
        """The stored send times, oldest first, the row locked until the transaction ends."""
        db.Setting.insert(key=self.key, value="[]", updated_at=db.utcnow()).on_conflict_ignore().execute()
        db.lock_rows(db.Setting, [self.key])
        return sorted(json.loads(db.get_setting(self.key, "[]")))

    def _store(self, times):
        db.put_setting(self.key, json.dumps([round(at, 3) for at in times]))
