"""Smaller hardening points: ids end where they end, the loopback exemption of /metrics is exactly what it says, a
development run keeps its data private, and the README's backup command leaves a private copy."""
import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from bridge import migrations
from bridge.contract import check_id, parse_order
from bridge.crypto import load_key_box
from bridge.errors import ContractError
from bridge.web import direct_from_loopback

README = Path(__file__).resolve().parent.parent / "README.md"


@pytest.mark.parametrize("value", ["abc\n", "abc\r\n", "\nabc", "a" * 64 + "\n"])
def test_an_id_with_a_trailing_newline_is_unknown(value):
    with pytest.raises(ContractError) as refused:
        check_id(value, "order")
    assert refused.value.status == 404
    with pytest.raises(ContractError):
        parse_order(f'{{"reservation_id": "{value.encode("unicode_escape").decode()}", "g2a_order_id": 1}}')


@pytest.mark.parametrize("environ, direct", [
    ({"REMOTE_ADDR": "127.0.0.1"}, True),
    ({"REMOTE_ADDR": "127.0.0.1", "HTTP_X_FORWARDED_FOR": "203.0.113.5"}, False),
    # Waitress trusts only 127.0.0.1 as the proxy and strips X-Forwarded-For from any other peer, so a proxy
    # reaching us over ::1 (or IPv4-mapped) would look direct: only 127.0.0.1 itself is exempt.
    ({"REMOTE_ADDR": "::1"}, False),
    ({"REMOTE_ADDR": "::ffff:127.0.0.1"}, False),
    ({"REMOTE_ADDR": "127.0.0.2"}, False),
    ({"REMOTE_ADDR": "203.0.113.5"}, False),
    ({"REMOTE_ADDR": ""}, False),
])
def test_only_a_call_from_127_0_0_1_without_x_forwarded_for_counts_as_direct(environ, direct):
    assert direct_from_loopback(environ) is direct


@pytest.fixture
def umask_022():
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def mode(path):
    return stat.S_IMODE(path.stat().st_mode)


def test_a_development_run_makes_its_data_folder_0700_and_its_database_files_0600(tmp_path, umask_022):
    database = migrations.open_database(f"sqlite:///{tmp_path}/data/bridge.db")
    database.execute_sql("SELECT 1")
    load_key_box("", tmp_path / "data")
    files = {path.name: mode(path) for path in (tmp_path / "data").iterdir()}
    database.close()
    assert mode(tmp_path / "data") == 0o700
    assert files == {name: 0o600 for name in files} and {"bridge.db", "secret.key"} <= set(files)
    assert "bridge.db-wal" in files


def backup_commands(original, copy):
    """The README's backup commands, run against a test database instead of the installed one, without sudo."""
    section = README.read_text().split("## Backing up", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```sh\n(.*?)```", section, re.S).group(1)
    commands = block.replace("\\\n", " ").replace("sudo ", "").splitlines()
    commands = [line.split("#", 1)[0].strip() for line in commands]
    return [line.replace("/var/lib/g2a-bridge/bridge.db", str(original)).replace("/var/backups", str(copy))
            for line in commands if line]


def test_the_readme_backup_commands_leave_a_private_copy(tmp_path, umask_022):
    original, backups = tmp_path / "bridge.db", tmp_path / "backups"
    migrations.open_database(f"sqlite:///{original}").close()
    setup, *alternatives = backup_commands(original, backups)
    assert run(setup) and alternatives
    for command in alternatives:
        if re.search(r"\bsqlite3 /", command) and not shutil.which("sqlite3"):
            continue  # the sqlite3 tool is optional; the README gives a Python line too
        assert run(command)
        copies = [path for path in backups.rglob("*") if path.is_file()]
        assert copies and {path: mode(path) for path in copies} == {path: 0o600 for path in copies}, command
        for path in copies:
            path.unlink()
    assert {mode(folder) for folder in backups.rglob("*")} == {0o700}


def run(command):
    result = subprocess.run(["sh", "-c", command], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, (command, result.stderr)
    return True
