"""The key that encrypts stored game keys: a generated key file is written whole and private, an empty or broken one
is refused, and a database remembers which key it was set up with (a keyed fingerprint, never the key), so a process
with another key refuses to start instead of writing keys nobody else can read."""
import base64
import os
import stat
import subprocess
import sys
import threading

import pytest
from conftest import ROOT, SECRET_KEY

from bridge import db, migrations
from bridge.config import Settings
from bridge.crypto import KEY_FILE_NAME, KeyBox, load_key_box, open_key_box
from bridge.errors import ConfigError
from concurrently import run_together

OTHER_KEY = base64.urlsafe_b64encode(b"another key, 32 bytes long......").decode()


# ---- the generated key file ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("content", ["", "\n", "short", "bm90IGEga2V5"])
def test_an_empty_or_short_key_file_is_refused(tmp_path, content):
    (tmp_path / KEY_FILE_NAME).write_text(content)
    with pytest.raises(ConfigError) as refused:
        load_key_box("", tmp_path)
    assert str(tmp_path / KEY_FILE_NAME) in refused.value.problems[0]


def test_a_generated_key_file_is_a_private_fernet_key_and_nothing_else_is_left_behind(tmp_path):
    box = load_key_box("", tmp_path / "data")
    path = tmp_path / "data" / KEY_FILE_NAME
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(base64.urlsafe_b64decode(path.read_text().strip())) == 32
    assert os.listdir(tmp_path / "data") == [KEY_FILE_NAME]
    assert load_key_box("", tmp_path / "data").decrypt(box.encrypt("key")) == b"key"


def test_processes_generating_the_key_at_the_same_moment_all_get_the_same_one(tmp_path):
    boxes, start = [], threading.Barrier(8)

    def generate():
        start.wait()
        boxes.append(load_key_box("", tmp_path))
    run_together(*[generate] * 8)
    token = boxes[0].encrypt("key")
    assert [box.decrypt(token) for box in boxes] == [b"key"] * 8
    assert os.listdir(tmp_path) == [KEY_FILE_NAME]


# ---- the database remembers its key (SQLite and PostgreSQL) --------------------------------------------------------

@pytest.fixture(params=["sqlite", "postgresql"])
def any_database(request, tmp_path):
    url = request.getfixturevalue("pg_url") if request.param == "postgresql" else f"sqlite:///{tmp_path}/bridge.db"
    database = migrations.open_database(url)
    yield url
    database.close()


def test_a_process_with_another_key_is_refused_on_a_database_set_up_with_one(any_database):
    settings = Settings(database_url=any_database, bridge_secret_key=SECRET_KEY)
    open_key_box(settings)
    open_key_box(settings)  # the same key again: fine
    with pytest.raises(ConfigError) as refused:
        open_key_box(settings.replace(bridge_secret_key=OTHER_KEY))
    (problem,) = refused.value.problems
    assert problem.startswith("BRIDGE_SECRET_KEY: ") and "\n" not in problem


def test_the_database_holds_a_keyed_fingerprint_never_the_key(any_database):
    open_key_box(Settings(database_url=any_database, bridge_secret_key=SECRET_KEY))
    stored = " ".join(value for (value,) in db.Setting.select(db.Setting.value).tuples())
    raw = base64.urlsafe_b64decode(SECRET_KEY)
    assert SECRET_KEY not in stored and raw.hex() not in stored
    assert KeyBox(SECRET_KEY).key_check() in stored


def test_an_older_database_with_keys_but_no_fingerprint_refuses_a_key_that_cannot_read_them(tmp_path):
    url = f"sqlite:///{tmp_path}/bridge.db"
    database = migrations.open_database(url)
    secret = KeyBox(SECRET_KEY).encrypt("SIM-AAAA-BBBB-CCCC")
    reservation = db.Reservation.create(id="r1", expires_at=db.utcnow(), state="ordered")
    order = db.Order.create(id="o1", reservation=reservation, g2a_order_id=1, cws_client_order_id="g2a-1",
                            state="completed")
    db.OrderItem.create(id="i1", order=order, position=0, cws_product_id="p", g2a_product_id=1, secret=secret)
    with pytest.raises(ConfigError):
        open_key_box(Settings(database_url=url, bridge_secret_key=OTHER_KEY))
    open_key_box(Settings(database_url=url, bridge_secret_key=SECRET_KEY))
    database.close()


def test_the_web_server_with_another_key_exits_2_with_one_line_naming_bridge_secret_key(bridge_env, start_bridge):
    start_bridge("web").stop()  # sets the database up with SECRET_KEY
    result = subprocess.run([sys.executable, "-m", "bridge", "web"], cwd=ROOT, capture_output=True, text=True,
                            env={"PATH": os.environ["PATH"], **bridge_env, "BRIDGE_SECRET_KEY": OTHER_KEY},
                            timeout=60)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: BRIDGE_SECRET_KEY: "), result.stderr
    assert "Traceback" not in result.stderr
    assert OTHER_KEY not in result.stderr and SECRET_KEY not in result.stderr
