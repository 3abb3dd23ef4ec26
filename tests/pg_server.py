"""A throwaway PostgreSQL server for one test session: found on PATH or under /usr/lib/postgresql,
started on a free loopback port with trust auth and fsync off, one fresh database per test, gone at the end.
"""
import glob
import itertools
import os
import pwd
import shlex
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import psycopg2

MISSING = "PostgreSQL server binary not found (apt-get install postgresql)"
SUPERUSER = "bridge"
# Speed over durability: the data dir is thrown away with the session.
SERVER_OPTIONS = {"listen_addresses": "127.0.0.1", "fsync": "off", "synchronous_commit": "off",
                  "full_page_writes": "off", "max_connections": "200", "shared_buffers": "32MB"}


def find_bin_dir():
    """The folder holding initdb, pg_ctl and postgres: PATH first, then the newest /usr/lib/postgresql/N/bin."""
    on_path = shutil.which("pg_ctl")
    candidates = [Path(on_path).resolve().parent] if on_path else []
    versions = glob.glob("/usr/lib/postgresql/*/bin")
    candidates += [Path(d) for d in sorted(versions, key=_version, reverse=True)]
    for folder in candidates:
        if all((folder / name).is_file() for name in ("initdb", "pg_ctl", "postgres")):
            return folder
    return None


def _version(path):
    number = Path(path).parent.name
    return int(number) if number.isdigit() else 0


def _server_user():
    """initdb refuses to run as root: then the server runs as `postgres` (Debian's package) or `nobody`."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    raise RuntimeError("running as root and neither a 'postgres' nor a 'nobody' user exists to run PostgreSQL")


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class PgServer:
    """start() once, create_database() per test, stop() at the end."""

    def __init__(self, bin_dir):
        self.bin_dir, self.user = Path(bin_dir), _server_user()
        self.root = Path(tempfile.mkdtemp(prefix="bridge-pg-"))
        self.data, self.sockets, self.log = self.root / "data", self.root / "sockets", self.root / "server.log"
        self.port, self._numbers = None, itertools.count(1)

    def start(self):
        self.sockets.mkdir()
        if self.user is not None:
            os.chmod(self.root, 0o700)
            for path in (self.root, self.sockets):
                os.chown(path, self.user.pw_uid, self.user.pw_gid)
        self._run("initdb", "-D", self.data, "-U", SUPERUSER, "--auth=trust", "-E", "UTF8", "--locale=C.UTF-8")
        self.port = _free_port()
        self._run("pg_ctl", "start", "-w", "-t", "30", "-D", self.data, "-l", self.log, "-o", self._options())
        self._stop_when_gone(os.getpid())
        return self

    def _stop_when_gone(self, pid):
        """A detached watchdog: if pytest dies without stop() (killed, timed out), the server goes with it."""
        stop = shlex.join(self._command("pg_ctl", "stop", "-m", "immediate", "-D", self.data))
        script = (f"while kill -0 {pid} 2>/dev/null; do sleep 2; done; "
                  f"{stop} >/dev/null 2>&1; rm -rf {shlex.quote(str(self.root))}")
        subprocess.Popen(["sh", "-c", script], start_new_session=True, stdin=subprocess.DEVNULL,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def restart(self):
        """What a production server restart or failover does to the bridge: every connection is cut."""
        self._run("pg_ctl", "restart", "-m", "fast", "-w", "-t", "30", "-D", self.data, "-l", self.log,
                  "-o", self._options())

    def _options(self):
        options = {**SERVER_OPTIONS, "port": self.port, "unix_socket_directories": self.sockets}
        return " ".join(f"-c {key}={value}" for key, value in options.items())

    def stop(self):
        if (self.data / "postmaster.pid").exists():
            self._run("pg_ctl", "stop", "-m", "immediate", "-w", "-D", self.data, check=False)
        shutil.rmtree(self.root, ignore_errors=True)

    def url(self, name):
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{name}"

    def create_database(self):
        """A new empty database (test_1, test_2 ...) and its DATABASE_URL."""
        name = f"test_{next(self._numbers)}"
        self._admin(f"CREATE DATABASE {name}")
        return self.url(name)

    def drop_database(self, url):
        """WITH (FORCE): a bridge process that was killed may still hold a connection."""
        self._admin(f"DROP DATABASE IF EXISTS {url.rsplit('/', 1)[1]} WITH (FORCE)")

    def _admin(self, sql):
        connection = psycopg2.connect(self.url("postgres"))
        try:
            connection.autocommit = True
            with connection.cursor() as cursor:
                cursor.execute(sql)
        finally:
            connection.close()

    def _command(self, program, *args):
        command = [str(self.bin_dir / program), *map(str, args)]
        if self.user is not None:
            command = ["runuser", "-u", self.user.pw_name, "--", *command]
        return command

    def _run(self, program, *args, check=True):
        done = subprocess.run(self._command(program, *args), cwd=self.root, capture_output=True, text=True,
                              timeout=60)
        if check and done.returncode != 0:
            raise RuntimeError(f"{program} failed ({done.returncode}):\n{done.stdout}{done.stderr}{self.logs()}")
        return done

    def logs(self):
        return self.log.read_text(errors="replace") if self.log.exists() else ""
