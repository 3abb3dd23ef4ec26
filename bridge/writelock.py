"""One SQLite writer at a time, across the threads of a process and across processes (web, worker, CLI).

Threads queue on a mutex; the thread holding it queues on an advisory `flock` of a file beside the database.
Both wake the next waiter the moment the holder lets go, where SQLite's own busy handler sleeps and polls.
"""
import fcntl
import os
import threading


class WriterLock:
    """Re-entrant in one thread. `path` None: this process only (an in-memory database)."""

    def __init__(self, path=None):
        self.path = path
        self._mutex = threading.RLock()
        self._depth = 0  # only the thread holding the mutex reads or writes these two
        self._fd = None

    def __enter__(self):
        self._mutex.acquire()
        try:
            if self._depth == 0 and self.path is not None:
                self._fd = self._locked_file()
        except BaseException:
            self._mutex.release()
            raise
        self._depth += 1
        return self

    def __exit__(self, *exc):
        self._depth -= 1
        try:
            if self._depth == 0 and self._fd is not None:
                fd, self._fd = self._fd, None
                os.close(fd)  # closing the file releases its flock
        finally:
            self._mutex.release()

    def _locked_file(self):
        # Opened per hold (a few microseconds beside a commit): nothing stays open, and a forked child never
        # shares its parent's open file, which would share the lock instead of waiting for it. Read-only is
        # enough for flock. Private (0600) like the database beside it; a lock file a root CLI run created is
        # handed back to the service user with the data folder by the installed wrapper.
        fd = os.open(self.path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except BaseException:
            os.close(fd)
            raise
        return fd
