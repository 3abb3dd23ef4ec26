"""PostgreSQL (a server this run starts itself, tests/pg_server.py): migrations, and the sync tests once more.

The end-to-end modules run on PostgreSQL through their BACKENDS line (see conftest.py). test_sync builds its own
SQLite `database` fixture, so its database tests are collected a second time here, where `database` is PostgreSQL.
"""
import inspect
import subprocess
import sys

import pytest

import test_sync
from bridge import db, migrations
from conftest import ROOT, SWITCH

BACKENDS = ("postgresql",)  # the processes started here (start_bridge) use PostgreSQL too

# test_sync's database tests, collected again: here `world` and the tests get this file's `database`.
world = test_sync.world
globals().update({name: test for name, test in vars(test_sync).items() if name.startswith("test_")
                  and {"database", "world"} & set(inspect.signature(test).parameters)})


@pytest.fixture
def database(pg_url):
    database = migrations.open_database(pg_url)
    yield database
    database.close()


def _schema(database):
    steps = migrations.SchemaStep.select().order_by(migrations.SchemaStep.number).tuples()
    return set(database.get_tables()), list(steps)


def test_migrating_an_up_to_date_database_again_changes_nothing(pg_url):
    first = migrations.open_database(pg_url)
    tables, steps = _schema(first)
    first.close()
    second = migrations.open_database(pg_url)
    assert _schema(second) == (tables, steps)
    second.close()
    assert tables == {model._meta.table_name for model in db.MODELS} | {"schema_step"}
    assert steps == [(number, name) for number, name, _ in migrations.STEPS]


# Each child connects, says "ready" and migrates only when told to, so all of them race for the same moment.
MIGRATE_ON_GO = """
import sys
from bridge import db, migrations
database = db.connect(sys.argv[1])
database.connect()
print("ready", flush=True)
sys.stdin.readline()
migrations.migrate(database)
"""


def test_processes_migrating_a_new_database_at_the_same_moment_do_not_collide(pg_url):
    children = [subprocess.Popen([sys.executable, "-c", MIGRATE_ON_GO, pg_url], cwd=ROOT, text=True,
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
                for _ in range(6)]
    for child in children:
        assert child.stdout.readline() == "ready\n"
    for child in children:
        child.stdin.write("go\n")
        child.stdin.flush()
    outputs = [child.communicate(timeout=60)[0] for child in children]
    assert [child.returncode for child in children] == [0] * 6, "\n".join(outputs)
    database = db.connect(pg_url)
    assert _schema(database)[1] == [(number, name) for number, name, _ in migrations.STEPS]
    database.close()


# --- a server restart ---------------------------------------------------------------------------------

def test_the_web_server_recovers_when_postgresql_restarts(start_bridge, postgres):
    g2a = start_bridge("web", WEB_THREADS="2").g2a
    assert g2a.reserve((SWITCH, 1)).status_code == 200
    postgres.restart()
    statuses = [g2a.reserve((SWITCH, 1)).status_code for _ in range(12)]
    # Each of the two threads may fail once on its cut connection; after that every call works.
    assert statuses.count(200) >= 10 and statuses[-6:] == [200] * 6, statuses
