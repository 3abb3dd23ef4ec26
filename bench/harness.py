"""What every bench shares: free ports, the simulator in its own process (seeded by the bench, driven remotely),
the real `web` and `worker` processes on a throwaway folder, waiting until they answer, and stopping them.

Benches run as scripts (`python bench/x.py`), so this folder is on sys.path and they `import harness`.
"""
import multiprocessing
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bridge.sim import (CWS_CLIENT_ID, CWS_CLIENT_SECRET, G2A_API_KEY, G2A_API_SECRET,  # noqa: E402
                        Simulator)

CLIENT_ID, CLIENT_SECRET = "bench-client", "bench-secret-0123456789abcdef0123"


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---- the simulator in its own process ------------------------------------------------------------------------

def _serve(conn, setup, args):
    sim = Simulator().start()
    commands = setup(sim, *args) or {}
    conn.send((sim.cws_url, sim.g2a_url))
    while True:
        name, call_args = conn.recv()
        if name == "stop":
            sim.stop()
            conn.send(None)
            return
        conn.send(commands[name](*call_args))


class RemoteSimulator:
    """The simulator in a spawned process, so the bench's clients don't share its GIL.

    `setup(sim, *args)` (a module-level function of the bench) seeds it there and returns the commands the bench
    may call as methods (`remote.set_quantity(...)`); `control()` uses the simulator's own /_sim/ HTTP routes."""

    def __init__(self, setup, *args):
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_serve, args=(child, setup, args), daemon=True)
        self.process.start()
        self.cws_url, self.g2a_url = self._conn.recv()
        self._lock = threading.Lock()

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)

        def call(*args):
            with self._lock:
                self._conn.send((name, args))
                return self._conn.recv()
        return call

    def control(self, method, path, body=None, timeout=60):
        answer = requests.request(method, f"{self.cws_url}/_sim/{path}", json=body, timeout=timeout)
        assert answer.status_code == 200, answer.text
        return answer.json()

    def stop(self):
        with self._lock:
            self._conn.send(("stop", ()))
            self._conn.recv()
        self.process.join(10)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


# ---- web and worker --------------------------------------------------------------------------------------------

def bridge_env(sim, folder, port, **extra):
    """The environment of `python -m bridge web|worker` against `sim` on folder/bridge.db with
    folder/products.json (the bench writes it); `extra` adds or overrides variables."""
    (folder / "empty.env").write_text("")
    env = {"PATH": os.environ["PATH"], "ENV_FILE": str(folder / "empty.env"), "OUR_API_CLIENT_ID": CLIENT_ID,
           "OUR_API_CLIENT_SECRET": CLIENT_SECRET, "CWS_CLIENT_ID": CWS_CLIENT_ID,
           "CWS_CLIENT_SECRET": CWS_CLIENT_SECRET, "CWS_API_BASE_URL": sim.cws_url, "G2A_API_KEY": G2A_API_KEY,
           "G2A_API_SECRET": G2A_API_SECRET, "G2A_API_BASE_URL": sim.g2a_url,
           "DATABASE_URL": f"sqlite:///{folder}/bridge.db", "PRODUCTS_FILE": str(folder / "products.json"),
           "PORT": str(port), "LOG_LEVEL": "WARNING", "WEB_THREADS": "8"}
    env.update({key: str(value) for key, value in extra.items()})
    return env


def start(command, env, folder, log_name=None):
    """`python -m bridge <command>` with its output in folder/<log_name or command>.log, in the environment its
    systemd unit sets (the allocator settings, among others) under `env`."""
    log = open(folder / f"{log_name or command}.log", "ab")
    return subprocess.Popen([sys.executable, "-m", "bridge", command], cwd=ROOT,
                            env={**unit_environment(command), **env}, stdout=log, stderr=subprocess.STDOUT)


def unit_environment(command):
    """The Environment= lines of systemd/g2a-bridge-<command>.service, but ENV_FILE (a bench names its own)."""
    unit = (ROOT / "systemd" / f"g2a-bridge-{command}.service").read_text()
    pairs = (line.partition("=")[2].partition("=") for line in unit.splitlines() if line.startswith("Environment="))
    return {key: value for key, _, value in pairs if key != "ENV_FILE"}


def start_bare(port, database, insert="sqlite3"):
    """bench/bare_app.py (Bottle + Waitress + one SQLite insert per request through `insert`: "sqlite3" or
    "peewee"), the yardstick, ready to serve."""
    log = open(Path(database).with_suffix(".log"), "ab")  # Waitress's "Task queue depth" warnings go there
    proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("bare_app.py")), str(port), str(database),
                             insert], stdout=log, stderr=subprocess.STDOUT)
    wait_ready(f"http://127.0.0.1:{port}", proc)
    return proc


def wait_ready(base, proc=None, timeout=60):
    """Until GET base/health answers 200; SystemExit if `proc` exits first or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"server at {base} exited with {proc.returncode}")
        try:
            if requests.get(f"{base}/health", timeout=1).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.05)
    raise SystemExit(f"server at {base} never became ready")


def wait_until(check, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.2)
    raise SystemExit(f"{what} not within {timeout}s")


def access_token(base):
    """A Bearer token from the bridge at `base`, as G2A gets one."""
    answer = requests.get(f"{base}/oauth/token", params={
        "grant_type": "client_credentials", "client_id": CLIENT_ID, "client_secret": CLIENT_SECRET}, timeout=10)
    answer.raise_for_status()
    return answer.json()["access_token"]


def usage(pid):
    """(CPU seconds, voluntary, involuntary context switches) of process `pid` so far, all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    switches = [0, 0]
    for task in Path(f"/proc/{pid}/task").iterdir():
        for line in (task / "status").read_text().splitlines():
            name, _, value = line.partition(":")
            if name in ("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches"):
                switches[name.startswith("non")] += int(value)
    return cpu, switches[0], switches[1]


def stop(procs, timeout=15):
    """SIGTERM every process of {name: Popen} at once, then wait; {name: (exit code or "killed after N s",
    seconds from the signal to the exit)}."""
    signalled, stopped = time.monotonic(), {}
    for proc in procs.values():
        proc.terminate()
    for name, proc in procs.items():
        try:
            code = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            code = f"killed after {timeout} s"
        stopped[name] = (code, time.monotonic() - signalled)
    return stopped
