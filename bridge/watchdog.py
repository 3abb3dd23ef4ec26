"""systemd's service watchdog: `WATCHDOG=1` on $NOTIFY_SOCKET while the process is healthy, so that systemd kills
and restarts a worker whose jobs froze (a deadlock, a hung call) instead of leaving it running and doing nothing.

Speaks the sd_notify datagram protocol itself (one line on a Unix socket; no library). Does nothing when the
service manager asked for no watchdog ($WATCHDOG_USEC unset or meant for another process): a foreground run,
a container without systemd, the tests.
"""
import os
import socket
import time


class Watchdog:
    def __init__(self, environ=None, clock=time.monotonic):
        environ = os.environ if environ is None else environ
        self._address = _address(environ.get("NOTIFY_SOCKET", ""))
        self.interval = _interval(environ)
        self._clock, self._last = clock, None

    @property
    def enabled(self):
        return self._address is not None and self.interval is not None

    def ping(self):
        """Tell systemd this process is alive, at most twice per watchdog period (systemd's advice)."""
        if not self.enabled:
            return
        now = self._clock()
        if self._last is not None and now - self._last < self.interval / 2:
            return
        self._last = now
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            try:
                sock.sendto(b"WATCHDOG=1", self._address)
            except OSError:  # systemd gone or restarting: the next ping tries again
                self._last = None


def _address(path):
    if not path:
        return None
    return "\0" + path[1:] if path.startswith("@") else path  # "@name": Linux's abstract namespace


def _interval(environ):
    """The watchdog period in seconds, when it is meant for this process; else None."""
    pid = environ.get("WATCHDOG_PID")
    if pid and pid != str(os.getpid()):
        return None
    try:
        usec = int(environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    return usec / 1e6 if usec > 0 else None
