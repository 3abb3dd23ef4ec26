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
        self._depth = 0  # only the thread holding the mutex reads or writes it
        self._fd, self._fd_pid = None, None

    def __enter__(self):
        self._mutex.acquire()
        try:
            if self._depth == 0 and self.path is not None:
                fcntl.flock(self._file(), fcntl.LOCK_EX)
        except BaseException:
            self._mutex.release()
            raise
        self._depth += 1
        return self

    def __exit__(self, *exc):
        self._depth -= 1
        try:
            if self._depth == 0 and self.path is not None:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            self._mutex.release()

    def _file(self):
        # flock belongs to the open file description: a forked child must open its own, or it would share the
        # parent's lock instead of waiting for it. Read-only is enough for flock, and lets a lock file created
        # by another user (an operator's CLI run) still be used.
        if self._fd_pid != os.getpid():
            self._fd = os.open(self.path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
            self._fd_pid = os.getpid()
        return self._fd
