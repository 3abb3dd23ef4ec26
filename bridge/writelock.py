"""One SQLite writer at a time, across the threads of a process and across processes (web, worker, CLI).

Threads queue on a mutex; the thread holding it queues on an advisory `flock` of a file beside the database.
Both wake the next waiter the moment the holder lets go, where SQLite's own busy handler sleeps and polls.
A free file lock is taken, and always let go, without letting go of the GIL: only waiting for another process does.
"""
import ctypes
import errno
import fcntl
import os
import threading
import weakref

# fcntl.flock lets go of the GIL on every call; a holder that then waits to get it back keeps every other writer
# waiting too (docs/decisions.md, round 8). A call through PyDLL keeps it: only for calls that cannot block.
_LIBC = ctypes.PyDLL(None, use_errno=True)
_LIBC.flock.argtypes, _LIBC.flock.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int


class WriterLock:
    """Re-entrant in one thread. `path` None: this process only (an in-memory database)."""

    def __init__(self, path=None):
        self.path = path
        self._mutex = threading.RLock()
        self._depth = 0  # only the thread holding the mutex reads or writes these
        self._owner = None  # the holder's thread id (any thread reads it: only the holder finds its own id there)
        self._fd, self._pid = None, None

    def __enter__(self):
        self._mutex.acquire()
        try:
            if self._depth == 0 and self.path is not None:
                fd = self._file()
                if not _flock_at_once(fd, fcntl.LOCK_EX | fcntl.LOCK_NB):
                    fcntl.flock(fd, fcntl.LOCK_EX)  # another process holds it: wait, without the GIL
        except BaseException:
            self._mutex.release()
            raise
        self._depth += 1
        self._owner = threading.get_ident()
        return self

    def __exit__(self, *exc):
        self._depth -= 1
        if self._depth == 0:
            self._owner = None
        try:
            if self._depth == 0 and self.path is not None:
                _flock_at_once(self._fd, fcntl.LOCK_UN)
        finally:
            self._mutex.release()

    def held(self):
        """Whether the calling thread holds the lock."""
        return self._owner == threading.get_ident()

    def _file(self):
        # Opened once per process and kept (two system calls fewer per write than opening it per hold), and closed
        # when this lock is dropped. A forked child opens its own: flock belongs to the open file, so one inherited
        # from the parent would share the parent's lock instead of waiting for it. Read-only is enough for flock.
        # Private (0600) like the database beside it; a lock file a root CLI run created is handed back to the
        # service user with the data folder by the installed wrapper.
        if self._pid != os.getpid():
            self._fd, self._pid = os.open(self.path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o600), os.getpid()
            weakref.finalize(self, os.close, self._fd)
        return self._fd


def _flock_at_once(fd, operation):
    """flock(2) with an `operation` that cannot block (LOCK_NB, LOCK_UN), keeping the GIL; False when another open
    file holds the lock."""
    if _LIBC.flock(fd, operation) == 0:
        return True
    code = ctypes.get_errno()
    if code == errno.EWOULDBLOCK:
        return False
    raise OSError(code, os.strerror(code))
