"""Shared fixtures: a fresh database, the simulator, and the real web/worker processes on free ports."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from bridge import db, migrations
from bridge.config import load_settings
from bridge.sim import (CWS_CLIENT_ID, CWS_CLIENT_SECRET, CWS_CLIENT_SIGNATURE, DEMO_PRODUCTS,
                              G2A_API_KEY, G2A_API_SECRET, Simulator)

ROOT = Path(__file__).resolve().parent.parent
OUR_ID, OUR_SECRET = "g2a-test-client", "g2a-test-secret-0123456789abcdef"
SECRET_KEY = "q3Tq1Xqz8b0Yw5H2cXc3mR3J0uQnQ9yD2mVd3v4o1cE="
DEMO = [{"cws_product_id": cws_id, "g2a_product_id": int(g2a_id)} for cws_id, g2a_id, *_ in DEMO_PRODUCTS]
SWITCH, SKYLINES = DEMO[0]["g2a_product_id"], DEMO[1]["g2a_product_id"]


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_products(path, products, defaults=None):
    data = {"products": products} if defaults is None else {"defaults": defaults, "products": products}
    Path(path).write_text(json.dumps(data))


@pytest.fixture
def sim():
    with Simulator() as simulator:
        simulator.seed_demo()
        yield simulator


@pytest.fixture
def bridge_env(tmp_path, sim, database_url):
    """The environment of a bridge process pointed at the simulator, with its own database (see database_url)."""
    (tmp_path / "empty.env").write_text("")
    write_products(tmp_path / "products.json", DEMO)
    return {
        "ENV_FILE": str(tmp_path / "empty.env"),
        "OUR_API_CLIENT_ID": OUR_ID, "OUR_API_CLIENT_SECRET": OUR_SECRET,
        "CWS_CLIENT_ID": CWS_CLIENT_ID, "CWS_CLIENT_SECRET": CWS_CLIENT_SECRET,
        "CWS_CLIENT_SIGNATURE": CWS_CLIENT_SIGNATURE, "CWS_API_BASE_URL": sim.cws_url,
        "G2A_API_KEY": G2A_API_KEY, "G2A_API_SECRET": G2A_API_SECRET, "G2A_API_BASE_URL": sim.g2a_url,
        "DATABASE_URL": database_url, "PRODUCTS_FILE": str(tmp_path / "products.json"),
        "BRIDGE_SECRET_KEY": SECRET_KEY, "PORT": str(free_port()), "HOST": "127.0.0.1",
        "CWS_TIMEOUT_MS": "2000", "G2A_TIMEOUT_MS": "2000", "SYNC_INTERVAL_SECONDS": "1",
        "LOG_LEVEL": "INFO",
    }


@pytest.fixture
def settings(bridge_env):
    return load_settings(bridge_env)


@pytest.fixture
def database(tmp_path):
    """A fresh migrated SQLite database for in-process tests."""
    database = migrations.open_database(f"sqlite:///{tmp_path}/unit.db")
    yield database
    database.close()


def sqlite_steps(call):
    """SQLite virtual-machine steps (in thousands) `call()` costs on this thread's connection and the process's
    writing one: what a query reads grows with it, so a periodic query that must not grow with history is checked
    against it."""
    steps = [0]

    def count():
        steps[0] += 1
    database = db.database.obj
    database.connection()
    with db.write_transaction():  # opens the writing connection
        pass
    connections = database.connections()
    for connection in connections:
        connection.set_progress_handler(count, 1000)
    try:
        call()
    finally:
        for connection in connections:
            connection.set_progress_handler(None, 1000)
    return steps[0]


class BridgeProcess:
    """A real `python -m bridge COMMAND` process with its output captured to a file."""

    def __init__(self, command, env, log_path):
        self.command, self.env, self.log_path = command, env, Path(log_path)
        self.proc = None

    def start(self):
        env = {**{k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG")}, **self.env}
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "bridge", *self.command], cwd=ROOT, env=env,
                                     stdout=self.log, stderr=subprocess.STDOUT)
        return self

    def wait_http(self, url, timeout=20.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.command[0]} exited {self.proc.returncode}:\n{self.logs()}")
            try:
                if requests.get(url, timeout=1).status_code == 200:
                    return self
            except requests.ConnectionError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"{self.command[0]} not ready after {timeout}s:\n{self.logs()}")

    def stop(self, timeout=10.0):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode

    def kill(self):
        self.proc.kill()
        self.proc.wait()
        self.log.close()

    def logs(self):
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


class G2A:
    """Calls the bridge the way G2A's servers do."""

    def __init__(self, base_url):
        self.base_url = base_url
        self.http = requests.Session()
        self._token = None

    def token(self):
        if self._token is None:
            answer = self.http.get(f"{self.base_url}/oauth/token", params={
                "grant_type": "client_credentials", "client_id": OUR_ID, "client_secret": OUR_SECRET}, timeout=10)
            assert answer.status_code == 200, answer.text
            self._token = answer.json()["access_token"]
        return self._token

    def call(self, method, path, body=None, raw=None, auth=True, headers=None, **options):
        headers = dict(headers or {})
        if auth:
            headers.setdefault("Authorization", f"Bearer {self.token()}")
        if body is not None:
            raw, headers["Content-Type"] = json.dumps(body), "application/json"
        return self.http.request(method, self.base_url + path, data=raw, headers=headers, timeout=15, **options)

    def reserve(self, *lines):
        return self.call("POST", "/reservation", [{"product_id": pid, "quantity": qty} for pid, qty in lines])


@pytest.fixture
def start_bridge(bridge_env, tmp_path):
    """Start `web` / `worker` processes (env overrides allowed); all are stopped at the end of the test."""
    started = []

    def start(command, **overrides):
        env = {**bridge_env, **overrides}
        process = BridgeProcess([command], env, tmp_path / f"{command}-{len(started)}.log").start()
        started.append(process)
        if command == "web":
            process.wait_http(f"http://127.0.0.1:{env['PORT']}/health")
            process.g2a = G2A(f"http://127.0.0.1:{env['PORT']}")
        return process

    yield start
    for process in started:
        if process.proc.poll() is None:
            process.stop()


@pytest.fixture
def web(start_bridge):
    """The real web server against the simulator; yields a G2A-like client."""
    return start_bridge("web").g2a


@pytest.fixture
def fresh_db(bridge_env):
    """Open the same database the bridge processes use, from the test."""
    database = migrations.open_database(bridge_env["DATABASE_URL"])
    yield db
    database.close()


# --- Backends: a module that sets BACKENDS = ("sqlite", "postgresql") runs each test that reaches
# bridge_env once per backend (ids end in [sqlite] / [postgresql]); other tests stay on SQLite. -------

def pytest_generate_tests(metafunc):
    backends = getattr(metafunc.module, "BACKENDS", None)
    if backends and "backend" in metafunc.fixturenames:
        metafunc.parametrize("backend", backends, indirect=True)


@pytest.fixture
def backend(request):
    return getattr(request, "param", "sqlite")


@pytest.fixture
def database_url(backend, tmp_path, request):
    """The DATABASE_URL the bridge processes get: a SQLite file in tmp_path, or a fresh PostgreSQL database."""
    if backend == "postgresql":
        return request.getfixturevalue("pg_url")
    return f"sqlite:///{tmp_path}/bridge.db"


# --- PostgreSQL (tests/pg_server.py): one throwaway server per session, a fresh database per test ------

import pg_server  # noqa: E402  (beside the only fixtures that use it)


@pytest.fixture(scope="session")
def postgres():
    """A PostgreSQL server started for this test session, or a visible skip when none is installed."""
    bin_dir = pg_server.find_bin_dir()
    if bin_dir is None:
        pytest.skip(pg_server.MISSING)
    server = pg_server.PgServer(bin_dir)
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.fixture
def pg_url(postgres):
    """DATABASE_URL of a new, empty PostgreSQL database, dropped after the test."""
    url = postgres.create_database()
    yield url
    postgres.drop_database(url)
