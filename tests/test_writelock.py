"""SQLite writers in different processes queue on the writer lock: the next one starts the moment the holder
commits, and a short busy_timeout is never reached (no "database is locked")."""
import errno
import fcntl
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from bridge import db
from bridge.writelock import WriterLock, _flock_at_once

ROOT = Path(__file__).resolve().parent.parent

HOLDER = """
import sys, time
from bridge import db
db.connect(sys.argv[1])
with db.write_transaction():
    db.put_setting("holder", "1")
    print("holding", flush=True)
    sys.stdin.readline()
print(time.monotonic(), flush=True)
"""

STORM = """
import sys, threading
from bridge import db
db.connect(sys.argv[1])
rounds, name = int(sys.argv[2]), sys.argv[3]

failures = []

def writer(key):
    try:
        db.database.execute_sql("PRAGMA busy_timeout = 10")  # this thread's connection: SQLite alone gives up
        with db.write_transaction():
            db.database.execute_sql("PRAGMA busy_timeout = 10")  # and the writing connection
        for n in range(rounds):
            with db.write_transaction():
                db.put_setting(key, int(db.get_setting(key, "0")) + 1)
            db.put_setting(f"{key}-autocommit", n)
    except Exception as err:
        failures.append(repr(err))
threads = [threading.Thread(target=writer, args=(f"{name}-{i}",)) for i in range(2)]
[t.start() for t in threads]
[t.join() for t in threads]
sys.exit("; ".join(failures) or None)
"""


def python(script, *args, **kwargs):
    return subprocess.Popen([sys.executable, "-c", script, *map(str, args)], cwd=ROOT, text=True, **kwargs)


def wake_delay(url):
    """Seconds from another process committing to a write transaction here (waiting meanwhile) starting."""
    holder = python(HOLDER, url, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert holder.stdout.readline().strip() == "holding"
    started = []

    def wait_and_write():
        with db.write_transaction():
            started.append(time.monotonic())
            db.put_setting("waiter", "1")
    waiter = threading.Thread(target=wait_and_write)
    waiter.start()
    time.sleep(0.6)  # long enough for SQLite's busy handler to be sleeping 100 ms at a time
    assert not started, "the waiter wrote while the other process held the lock"
    holder.stdin.write("commit\n")
    holder.stdin.flush()
    released = float(holder.stdout.readline())
    waiter.join(10)
    assert holder.wait(10) == 0
    return started[0] - released


def test_a_writer_waiting_for_another_process_starts_as_soon_as_it_commits(database, tmp_path):
    url = f"sqlite:///{tmp_path}/unit.db"
    delays = sorted(wake_delay(url) for _ in range(5))
    # Measured: ~1 ms with the lock; 20-40 ms when SQLite's busy handler is what wakes the waiter.
    assert delays[2] < 0.010, delays


def test_a_write_storm_from_several_processes_never_meets_a_locked_database(database, tmp_path):
    url, rounds = f"sqlite:///{tmp_path}/unit.db", 60
    storms = [python(STORM, url, rounds, f"p{i}", stderr=subprocess.PIPE) for i in range(3)]
    for storm in storms:
        _, errors = storm.communicate(timeout=120)
        assert storm.returncode == 0, errors
    counts = dict(db.Setting.select(db.Setting.key, db.Setting.value).where(
        db.Setting.key.startswith("p"), ~db.Setting.key.endswith("-autocommit")).tuples())
    assert counts == {f"p{p}-{t}": str(rounds) for p in range(3) for t in range(2)}


def test_the_lock_is_reentrant_in_one_thread_and_excludes_other_threads(tmp_path):
    lock, inside = WriterLock(str(tmp_path / "x.lock")), threading.Event()

    def enter():
        with lock:
            inside.set()
    with lock:
        with lock:
            other = threading.Thread(target=enter)
            other.start()
            assert not inside.wait(0.2)
        assert not inside.wait(0.1) and lock.held()
    assert inside.wait(5)
    other.join()
    assert not lock.held()


def test_only_the_thread_holding_the_lock_is_told_it_holds_it(tmp_path):
    lock, seen = WriterLock(str(tmp_path / "x.lock")), []
    with lock:
        other = threading.Thread(target=lambda: seen.append(lock.held()))
        other.start()
        other.join()
        assert lock.held() and seen == [False]
    assert not lock.held()


def test_threads_write_through_one_connection_and_read_through_their_own(database):
    """A thread's own connection would start each write transaction with a cold page cache: every commit by another
    thread drops it. So writes go through the process's one writing connection, reads stay on the thread's."""
    seen = {}

    def write_and_read(name):
        with db.write_transaction():
            db.put_setting(name, "1")
            seen[name, "writing"] = db.database.obj.connection()
        db.put_setting(f"{name}-autocommit", "1")  # an autocommit write takes the same connection
        seen[name, "reading"] = db.database.obj.connection()
        seen[name, "read"] = db.get_setting(name)
    threads = [threading.Thread(target=write_and_read, args=(f"t{n}",)) for n in range(2)]
    [thread.start() for thread in threads]
    [thread.join(10) for thread in threads]
    assert seen["t0", "writing"] is seen["t1", "writing"]
    assert seen["t0", "reading"] is not seen["t1", "reading"]
    assert seen["t0", "writing"] not in (seen["t0", "reading"], seen["t1", "reading"])
    assert seen["t0", "read"] == seen["t1", "read"] == "1" and db.get_setting("t1-autocommit") == "1"


def test_a_failed_write_transaction_rolls_back_and_leaves_the_writing_connection_usable(database):
    try:
        with db.write_transaction():
            db.put_setting("doomed", "1")
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    with db.write_transaction():
        db.put_setting("kept", "1")
    assert db.get_setting("doomed") is None and db.get_setting("kept") == "1"
    assert not db.database.obj.in_transaction()


def test_a_forked_child_waits_for_its_parents_lock_instead_of_sharing_it(tmp_path):
    lock = WriterLock(str(tmp_path / "x.lock"))
    with lock:  # the lock file is open in this process now, and held
        child = os.fork()
        if child == 0:  # flock on the inherited open file would succeed: the child must open its own and wait
            os._exit(1 if _try_lock(lock) else 0)
        _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def _try_lock(lock):
    """Whether `lock`'s file lock can be taken right now (without waiting)."""
    fd = lock._file()
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    fcntl.flock(fd, fcntl.LOCK_UN)
    return True


def test_a_free_file_lock_is_taken_and_let_go_without_the_call_that_lets_go_of_the_gil(tmp_path, monkeypatch):
    lock, calls = WriterLock(str(tmp_path / "x.lock")), []
    monkeypatch.setattr(fcntl, "flock", lambda fd, operation: calls.append(operation))
    with lock:
        held = _held_by_another_file(tmp_path / "x.lock")
    assert held and calls == []
    assert not _held_by_another_file(tmp_path / "x.lock")


def test_a_file_lock_held_by_another_open_file_is_waited_for(tmp_path):
    lock, inside = WriterLock(str(tmp_path / "x.lock")), threading.Event()
    other = os.open(tmp_path / "x.lock", os.O_RDONLY | os.O_CREAT)  # as another process would hold it
    fcntl.flock(other, fcntl.LOCK_EX)

    def enter():
        with lock:
            inside.set()
    waiter = threading.Thread(target=enter)
    waiter.start()
    assert not inside.wait(0.2)
    fcntl.flock(other, fcntl.LOCK_UN)
    assert inside.wait(5)
    waiter.join(5)
    os.close(other)
    assert not _held_by_another_file(tmp_path / "x.lock")


def test_a_failing_flock_is_an_oserror_not_a_silent_hold(tmp_path):
    try:
        _flock_at_once(-1, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        assert err.errno == errno.EBADF
    else:
        raise AssertionError("flock on a bad descriptor succeeded")


def _held_by_another_file(path):
    """Whether some open file holds the lock of `path` (asked through a new one, with the GIL-keeping call)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        taken = _flock_at_once(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return not taken
    finally:
        os.close(fd)  # closing the file lets go of a lock it took
