"""Random ids (reservation, order and item UUIDs, request ids) from a pool of os.urandom bytes.

Each os.urandom call lets go of the GIL, and on a busy web every GIL hand-off is a wait for some thread; one call per
256 UUIDs instead of one per id (docs/decisions.md, round 8). The bytes are the same CSPRNG's; a forked child starts
with an empty pool, so parent and child never hand out the same bytes.
"""
import os
import threading
import uuid

POOL_BYTES = 4096


class _Pool:
    def __init__(self):
        self._lock = threading.Lock()
        self.empty()

    def empty(self):
        self._bytes, self._at = b"", 0

    def take(self, count):
        with self._lock:
            if self._at + count > len(self._bytes):
                self._bytes, self._at = os.urandom(max(POOL_BYTES, count)), 0
            start, self._at = self._at, self._at + count
            return self._bytes[start:self._at]


_pool = _Pool()
os.register_at_fork(after_in_child=_pool.empty)


def new_uuid():
    """A random (version 4) UUID as text, as str(uuid.uuid4()) gives it."""
    return str(uuid.UUID(bytes=_pool.take(16), version=4))


def new_request_id():
    """16 random hex digits: the id an access line and the events of one request share."""
    return _pool.take(8).hex()
