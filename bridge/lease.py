"""The single-instance guard: a Lease row that only one worker holds at a time, renewed by its heartbeat.

A second worker on the same database sees a fresh lease held by someone else and stands by; it takes
over once the holder stops renewing (crash, kill -9) or releases the lease on a clean exit.
"""
import os
import secrets
import socket
from datetime import timedelta

from peewee import IntegrityError

from . import db

WORKER = "worker"
TTL = timedelta(seconds=30)


def new_holder():
    """hostname:pid:random, so a restarted process (same pid in a container) never looks like the old one."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


class Lease:
    """acquire() takes or renews the lease; holds(now) says whether we still may act on it."""

    def __init__(self, name=WORKER, holder=None, ttl=TTL):
        self.name, self.holder, self.ttl = name, holder or new_holder(), ttl
        self.held = False
        self.valid_until = None
        self.other = None  # the row someone else holds, when acquire() failed

    def holds(self, now):
        """True while our last successful renewal has not run out (a failing heartbeat loses it in time)."""
        return self.held and now < self.valid_until

    def acquire(self, now):
        """Renew our lease or take a free/expired one, atomically; True when we hold it afterwards."""
        try:
            other = self._take_or_renew(now)
        except IntegrityError:  # PostgreSQL: another worker inserted the first row at the same moment
            other = db.Lease(name=self.name, holder="?", expires_at=now + self.ttl)
        self.held, self.other = other is None, other
        self.valid_until = now + self.ttl if self.held else None
        return self.held

    def _take_or_renew(self, now):
        """None when the lease is ours now, else the fresh row someone else holds."""
        with db.write_transaction():
            db.lock_rows(db.Lease, [self.name])
            row = db.Lease.get_or_none(db.Lease.name == self.name)
            if row is not None and row.holder != self.holder and row.expires_at > now:
                return row
            self._write(row, now)
        return None

    def _write(self, row, now):
        fields = {"holder": self.holder, "expires_at": now + self.ttl, "heartbeat_at": now}
        if row is None:
            db.Lease.create(name=self.name, **fields)
        else:
            db.Lease.update(**fields).where(db.Lease.name == self.name).execute()

    def release(self):
        """Give the lease up (clean exit), so a standby worker takes over at its next heartbeat."""
        db.Lease.delete().where(db.Lease.name == self.name, db.Lease.holder == self.holder).execute()
        self.held = False
