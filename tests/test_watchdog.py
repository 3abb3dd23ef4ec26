"""systemd's watchdog: WATCHDOG=1 datagrams on $NOTIFY_SOCKET while the worker's heartbeat keeps finishing, none
once it froze (systemd then restarts the worker), and nothing at all where no watchdog was asked for."""
import os
import socket
import threading
import time

import pytest
from fakes import FakeClock

from bridge import worker as worker_module
from bridge.lease import Lease
from bridge.watchdog import Watchdog
from bridge.worker import Worker


@pytest.fixture
def notify_socket(tmp_path):
    """A datagram socket standing for systemd's, and the environment pointing at it (a 2 s watchdog)."""
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        sock.settimeout(5)
        yield sock, {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid())}


def test_a_ping_is_sent_at_most_twice_per_period(notify_socket):
    sock, environ = notify_socket
    clock = FakeClock()
    watchdog = Watchdog(environ, clock)
    watchdog.ping()
    assert sock.recv(64) == b"WATCHDOG=1"
    clock.now += 0.9
    watchdog.ping()  # within half the 2 s period: not sent
    clock.now += 0.2
    watchdog.ping()
    assert sock.recv(64) == b"WATCHDOG=1"
    sock.settimeout(0.1)
    with pytest.raises(TimeoutError):
        sock.recv(64)


@pytest.mark.parametrize("environ", [
    {},  # a foreground run or a container without systemd
    {"NOTIFY_SOCKET": "/nonexistent/notify"},  # a notify socket but no watchdog asked for
    {"NOTIFY_SOCKET": "/nonexistent/notify", "WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "1"},  # another process's
    {"NOTIFY_SOCKET": "/nonexistent/notify", "WATCHDOG_USEC": "soon"},
])
def test_without_a_watchdog_meant_for_this_process_nothing_is_sent(environ):
    watchdog = Watchdog(environ)
    assert not watchdog.enabled
    watchdog.ping()  # would raise on the missing socket if it tried


def test_a_vanished_socket_is_not_an_error(tmp_path):
    watchdog = Watchdog({"NOTIFY_SOCKET": str(tmp_path / "gone"), "WATCHDOG_USEC": "1000000"})
    assert watchdog.enabled
    watchdog.ping()
    watchdog.ping()  # tried again at once: the failed one did not count


class FreezableLease(Lease):
    """A lease whose renewal blocks while `frozen` is set: the heartbeat hangs as it did in the round-4 deadlock."""

    def __init__(self):
        super().__init__()
        self.frozen, self.thawed = threading.Event(), threading.Event()

    def acquire(self, now):
        if self.frozen.is_set():
            self.thawed.wait(30)
        return super().acquire(now)


class Pings:
    def __init__(self):
        self.times = []

    def ping(self):
        self.times.append(time.monotonic())

    def since(self, moment):
        return [t for t in self.times if t > moment]


class Running:
    def is_paused(self):
        return False


def test_the_worker_stops_telling_the_watchdog_once_its_heartbeat_froze_and_says_so(database, monkeypatch, caplog):
    monkeypatch.setattr(worker_module, "HEARTBEAT", 0.1)
    monkeypatch.setattr(worker_module, "STALLED_AFTER", 0.5)
    lease, pings, stop = FreezableLease(), Pings(), threading.Event()
    worker = Worker([], lease, Running(), watchdog=pings)
    runner = threading.Thread(target=worker.run, args=(stop,))
    runner.start()
    try:
        time.sleep(0.5)
        assert pings.times, "no ping while the heartbeat beats"
        lease.frozen.set()
        time.sleep(1.2)  # the beat in flight, then STALLED_AFTER without one
        quiet_since = time.monotonic() - 0.4
        assert not pings.since(quiet_since), "pinged with a frozen heartbeat"
        stalled = [r for r in caplog.records if r.getMessage() == "worker.stalled"]
        assert len(stalled) == 1 and stalled[0].levelname == "ERROR"
        lease.frozen.clear()
        lease.thawed.set()
        thawed_at = time.monotonic()
        time.sleep(0.5)
        assert pings.since(thawed_at), "no ping once the heartbeat beat again"
    finally:
        lease.thawed.set()
        stop.set()
        runner.join(15)


def test_the_worker_process_pings_the_watchdog_systemd_gives_it(start_bridge, notify_socket):
    sock, environ = notify_socket
    del environ["WATCHDOG_PID"]  # systemd sets it to the service's main pid, unknown until started
    start_bridge("worker", **environ)
    assert sock.recv(64) == b"WATCHDOG=1"
