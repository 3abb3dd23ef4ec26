"""The worker: jobs behind one guard, no overlap, the single-instance lease, failure alerts, warm and cold stop."""
import logging
import signal
import threading
import time
from datetime import datetime, timedelta, timezone

import pytest
from conftest import SECRET_KEY, sqlite_steps
from polling import wait_for

from bridge import db, migrations
from bridge.config import Settings
from bridge.errors import UpstreamError
from bridge.g2a import G2aClient
from bridge.lease import Lease
from bridge.metrics import Metrics
from bridge.sync import PassReport
from bridge.worker import SYNC_FAILURES_ALERT, Job, Worker, build_jobs, checked, cleanup

T0 = datetime(2025, 7, 14, 12, 0, tzinfo=timezone.utc)
BACKENDS = ("sqlite", "postgresql")  # the real-process tests run on both (conftest.py)


class Clock:
    """A settable clock for the lease and the jobs' `now`."""

    def __init__(self, now=T0):
        self.now = now

    def __call__(self):
        return self.now

    def advance(self, seconds):
        self.now += timedelta(seconds=seconds)


class Switch:
    """A pause switch the test flips."""

    def __init__(self):
        self.paused = False

    def is_paused(self):
        return self.paused


class Recorder:
    """A job that counts its runs and how many ran at the same time."""

    def __init__(self, seconds=0.0):
        self.seconds, self.runs, self.running, self.most_at_once = seconds, 0, 0, 0
        self._lock = threading.Lock()

    def __call__(self, now):
        with self._lock:
            self.runs += 1
            self.running += 1
            self.most_at_once = max(self.most_at_once, self.running)
        time.sleep(self.seconds)
        with self._lock:
            self.running -= 1


def boom(now):
    raise RuntimeError("a bug in a job")


def make_worker(*jobs, clock=None):
    return Worker(list(jobs), Lease(), Switch(), clock=clock or Clock())


def events(caplog, name):
    return [record.event_fields for record in caplog.records if record.getMessage() == name]


def run_for(worker, seconds):
    stop = threading.Event()
    thread = threading.Thread(target=lambda: setattr(worker, "exit_code", worker.run(stop)))
    thread.start()
    time.sleep(seconds)
    stop.set()
    thread.join(15)
    assert not thread.is_alive()
    return worker.exit_code


@pytest.fixture(autouse=True)
def info_logs(caplog):
    caplog.set_level(logging.INFO, logger="bridge")


def test_a_failing_job_is_logged_and_the_other_jobs_keep_running(database, caplog):
    counter = Recorder()
    worker = make_worker(Job("boom", 0.1, boom), Job("count", 0.1, counter), clock=db.utcnow)
    assert run_for(worker, 1.5) == 0
    assert counter.runs >= 8
    failures = [fields for fields in events(caplog, "job.failed") if fields["job"] == "boom"]
    assert len(failures) >= 8
    assert failures[0]["error"].startswith("RuntimeError: a bug in a job at test_worker.py:")
    assert failures[-1]["failures"] == len(failures)


def test_a_slow_job_never_overlaps_itself(database):
    slow = Recorder(seconds=0.4)
    worker = make_worker(Job("slow", 0.05, slow), clock=db.utcnow)
    run_for(worker, 1.5)
    assert slow.runs >= 2
    assert slow.most_at_once == 1


def test_a_clean_stop_waits_for_the_running_job_and_releases_the_lease(database, caplog):
    slow = Recorder(seconds=1.0)
    worker = make_worker(Job("slow", 0.05, slow), clock=db.utcnow)
    run_for(worker, 0.3)
    assert slow.runs == 1 and slow.running == 0
    assert db.Lease.select().count() == 0
    assert events(caplog, "worker.stopped")


def test_becoming_the_active_worker_runs_the_at_start_jobs_at_once(database):
    at_start, later = Recorder(), Recorder()
    worker = make_worker(Job("recover", 3600, at_start, at_start=True), Job("other", 3600, later),
                         clock=db.utcnow)
    run_for(worker, 0.5)
    assert (at_start.runs, later.runs) == (1, 0)


def test_a_second_worker_stands_by_while_the_first_holds_the_lease(database, caplog):
    clock = Clock()
    first_money, second_money = Recorder(), Recorder()
    first = make_worker(Job("fulfilment.poll", 0.5, first_money), clock=clock)
    second = make_worker(Job("fulfilment.poll", 0.5, second_money), clock=clock)
    first.heartbeat(clock())
    for _ in range(3):
        clock.advance(5)
        first.heartbeat(clock())
        second.heartbeat(clock())
        assert first.run_job(first.jobs["fulfilment.poll"])
        assert not second.run_job(second.jobs["fulfilment.poll"])
    assert (first_money.runs, second_money.runs) == (3, 0)
    [standby] = events(caplog, "worker.standby")
    assert standby["holder"] == first.lease.holder


def test_the_standby_worker_takes_over_once_the_lease_expires(database):
    clock = Clock()
    first_money, second_money = Recorder(), Recorder()
    first = make_worker(Job("fulfilment.poll", 0.5, first_money), clock=clock)
    second = make_worker(Job("fulfilment.poll", 0.5, second_money), clock=clock)
    first.heartbeat(clock())
    second.heartbeat(clock())
    clock.advance(29)
    second.heartbeat(clock())
    assert not second.lease.held
    clock.advance(2)  # the first worker hung: 31 s without a renewal
    assert not first.run_job(first.jobs["fulfilment.poll"])  # its own lease ran out too
    second.heartbeat(clock())
    assert second.run_job(second.jobs["fulfilment.poll"])
    first.heartbeat(clock())
    assert not first.lease.held
    assert db.Lease.get().holder == second.lease.holder
    assert (first_money.runs, second_money.runs) == (0, 1)


def test_a_released_lease_is_taken_over_at_the_next_heartbeat(database):
    clock = Clock()
    first, second = make_worker(clock=clock), make_worker(clock=clock)
    first.heartbeat(clock())
    first.shutdown()
    clock.advance(1)
    second.heartbeat(clock())
    assert second.lease.held


def test_the_lease_excludes_a_second_holder_on_postgresql_too(pg_url):
    database = migrations.open_database(pg_url)
    try:
        first, second = Lease(), Lease()
        assert first.acquire(T0) and not second.acquire(T0 + timedelta(seconds=1))
        assert second.other.holder == first.holder
        assert second.acquire(T0 + timedelta(seconds=31))
        assert not first.acquire(T0 + timedelta(seconds=32))
    finally:
        database.close()


def test_pause_and_resume_are_logged_once_each_with_the_remedy(database, caplog):
    worker = make_worker()
    for paused in (False, True, True, True, False, False):
        worker.pause.paused = paused
        worker.watch_pause(T0)
    [paused] = events(caplog, "worker.paused")
    assert paused["remedy"] == 'run "g2a-bridge resume" to resume'
    assert len(events(caplog, "worker.resumed")) == 1


def test_a_sync_failing_again_and_again_raises_one_sync_failing_alert(database):
    clock = Clock()
    worker = make_worker(Job("sync.full", 15, boom), clock=clock)
    worker.heartbeat(clock())
    for attempt in range(SYNC_FAILURES_ALERT + 2):
        worker.run_job(worker.jobs["sync.full"])
        kinds = [alert.kind for alert in db.Alert.select()]
        assert kinds == ([] if attempt + 1 < SYNC_FAILURES_ALERT else ["sync_failing"])


def failed_pass(now):
    """A full pass whose CWS read was answered 429 and that got no write through."""
    report = PassReport("full", now)
    report.error("CWS products: cws: Too Many Requests (HTTP 429)")
    return report


def test_a_sync_failing_while_upstream_answers_429_is_not_a_sync_failure(database, caplog):
    worker = make_worker(Job("sync.full", 15, checked(failed_pass, Metrics("worker"), lambda: ["cws_list"])))
    worker.heartbeat(T0)
    for _ in range(SYNC_FAILURES_ALERT + 2):
        worker.run_job(worker.jobs["sync.full"])
    assert worker.failures["sync.full"] == 0
    assert not db.Alert.select().exists()
    assert events(caplog, "sync.throttled")[0]["budgets"] == "cws_list"


def test_the_same_failure_without_a_throttle_counts_towards_sync_failing(database):
    worker = make_worker(Job("sync.full", 15, checked(failed_pass, Metrics("worker"), lambda: [])))
    worker.heartbeat(T0)
    for _ in range(SYNC_FAILURES_ALERT):
        worker.run_job(worker.jobs["sync.full"])
    assert [alert.kind for alert in db.Alert.select()] == ["sync_failing"]


def test_a_success_resets_the_failure_count(database):
    outcomes = iter([RuntimeError("a"), RuntimeError("b"), None, RuntimeError("c"), RuntimeError("d")])

    def flaky(now):
        error = next(outcomes)
        if error:
            raise error
    worker = make_worker(Job("sync.full", 15, flaky))
    worker.heartbeat(T0)
    for _ in range(5):
        worker.run_job(worker.jobs["sync.full"])
    assert worker.failures["sync.full"] == 2
    assert not db.Alert.select().exists()


def test_rejected_g2a_credentials_raise_an_auth_failed_alert(database, settings):
    g2a = G2aClient(settings.replace(g2a_api_secret="not-the-secret"))
    worker = make_worker(Job("g2a.auth", 300, lambda now: next(g2a.offers(), None)))
    worker.heartbeat(T0)
    worker.run_job(worker.jobs["g2a.auth"])
    [alert] = db.Alert.select()
    assert (alert.kind, alert.dedupe_key) == ("auth_failed", "auth_failed:g2a")
    assert "G2A_*" in alert.text


def test_an_upstream_401_from_any_job_is_an_auth_failed_alert(database):
    def rejected(now):
        raise UpstreamError("cws", "authentication failed: Bad client credentials", status=401)
    worker = make_worker(Job("cws.balance", 300, rejected))
    worker.heartbeat(T0)
    worker.run_job(worker.jobs["cws.balance"])
    assert [alert.dedupe_key for alert in db.Alert.select()] == ["auth_failed:cws"]


# ---- the real process ---------------------------------------------------------------------------


def wait_for_log(process, text, timeout=20.0):
    def logged():
        assert process.proc.poll() is None, process.logs()
        return text in process.logs()
    wait_for(logged, timeout, f"{text!r} logged")


def stop_time(process, signum=signal.SIGTERM):
    started = time.monotonic()
    process.proc.send_signal(signum)
    process.proc.wait(15)
    return time.monotonic() - started


def test_the_worker_stops_on_sigterm_within_10_seconds_and_releases_its_lease(start_bridge, fresh_db):
    worker = start_bridge("worker")
    wait_for_log(worker, "worker.active")
    wait_for_log(worker, "sync.full_pass")
    assert stop_time(worker) < 10
    assert worker.proc.returncode == 0
    assert "worker.stopped" in worker.logs()
    assert not fresh_db.Lease.select().exists()


def test_sigint_stops_the_worker_warm_too(start_bridge):
    worker = start_bridge("worker")
    wait_for_log(worker, "worker.active")
    assert stop_time(worker, signal.SIGINT) < 10
    assert worker.proc.returncode == 0


def test_a_worker_stuck_on_a_slow_cws_still_exits_0_within_10_seconds(start_bridge, sim):
    sim.cws.delay = 30
    worker = start_bridge("worker", CWS_TIMEOUT_MS="60000")
    wait_for_log(worker, "worker.active")
    time.sleep(0.5)
    assert stop_time(worker) < 10
    assert worker.proc.returncode == 0
    assert "worker.stop_abandoned" in worker.logs()


def test_a_second_signal_stops_the_worker_at_once(start_bridge, sim):
    sim.cws.delay = 30
    worker = start_bridge("worker", CWS_TIMEOUT_MS="60000")
    wait_for_log(worker, "worker.active")
    worker.proc.send_signal(signal.SIGTERM)
    wait_for_log(worker, "worker.stopping")
    assert worker.proc.poll() is None  # warm: still finishing its jobs
    assert stop_time(worker) < 2
    assert worker.proc.returncode != 0


def test_a_second_worker_process_waits_and_takes_over_when_the_first_stops(start_bridge):
    first = start_bridge("worker")
    wait_for_log(first, "worker.active")
    second = start_bridge("worker")
    wait_for_log(second, "worker.standby")
    time.sleep(1.5)
    assert "sync.full_pass" not in second.logs()
    assert stop_time(first) < 10
    wait_for_log(second, "worker.active", timeout=10)
    wait_for_log(second, "sync.full_pass", timeout=10)


def reservation_lines(count, start, expires_at, active):
    ids = [f"r{start + n}" for n in range(count)]
    db.Reservation.insert_many([{"id": rid, "expires_at": expires_at} for rid in ids]).execute()
    db.ReservationLine.insert_many([{"reservation": rid, "product": 1, "cws_product_id": "c1", "quantity": 1,
                                     "expires_at": expires_at, "active": active} for rid in ids]).execute()


def test_cleanup_retires_expired_reservation_lines_at_a_cost_that_does_not_grow_with_history(database):
    now = db.utcnow()
    db.CwsProduct.create(id="c1")
    db.Product.create(g2a_id=1, cws_product="c1")

    def active():
        return db.ReservationLine.select().where(db.ReservationLine.active == True).count()  # noqa: E712
    reservation_lines(300, 0, now - timedelta(hours=1), active=False)  # history
    reservation_lines(2, 1000, now + timedelta(minutes=10), active=True)  # live
    reservation_lines(3, 2000, now - timedelta(minutes=1), active=True)  # just expired
    steps = sqlite_steps(lambda: cleanup(now))
    assert active() == 2
    reservation_lines(3000, 3000, now - timedelta(hours=1), active=False)  # ten times the history
    reservation_lines(3, 9000, now - timedelta(minutes=1), active=True)
    assert sqlite_steps(lambda: cleanup(now)) <= steps * 1.5 + 2
    assert active() == 2


def test_a_standby_worker_still_gives_its_memory_back(database):
    """memory.trim is the process's own business: it runs whether or not this worker holds the lease."""
    clock = Clock()
    [trim] = [job for job in build_jobs(Settings(bridge_secret_key=SECRET_KEY), None, None, None, None)
              if job.name == "memory.trim"]
    first, second = make_worker(Job("fulfilment.poll", 0.5, Recorder()), clock=clock), make_worker(trim, clock=clock)
    first.heartbeat(clock())
    second.heartbeat(clock())
    assert not second.lease.holds(clock())
    assert second.run_job(second.jobs["memory.trim"])
