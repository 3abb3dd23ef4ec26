"""The yardstick: bare Bottle + Waitress doing one SQLite insert per request, with the bridge's server settings
and SQLite pragmas (WAL, synchronous=FULL), so a ratio measures the bridge's own work.

`python bench/bare_app.py PORT DB [sqlite3|peewee]`: the insert through the sqlite3 module (default), or as
one peewee `Model.insert()` (the yardstick issue 14 states its reservation goal against).
"""
import json
import sqlite3
import sys
import threading
import uuid

import bottle
import peewee
import waitress

PRAGMAS = {"journal_mode": "wal", "busy_timeout": 8000, "synchronous": "full"}
local = threading.local()


def sqlite3_insert(path):
    def connection():
        if not hasattr(local, "db"):
            local.db = sqlite3.connect(path, timeout=8, isolation_level=None)
            for name, value in PRAGMAS.items():
                local.db.execute(f"PRAGMA {name}={value}")
        return local.db
    connection().execute("CREATE TABLE IF NOT EXISTS hold (id TEXT PRIMARY KEY, product INTEGER, quantity INTEGER)")
    return lambda *row: connection().execute("INSERT INTO hold VALUES (?, ?, ?)", row)


def peewee_insert(path):
    database = peewee.SqliteDatabase(path, timeout=8, check_same_thread=False, pragmas=PRAGMAS)

    class Hold(peewee.Model):
        id = peewee.CharField(primary_key=True)
        product = peewee.BigIntegerField()
        quantity = peewee.IntegerField()

        class Meta:
            table_name = "hold"
    database.bind([Hold])
    database.create_tables([Hold], safe=True)
    return lambda *row: Hold.insert(id=row[0], product=row[1], quantity=row[2]).execute()


def make_app(path, how="sqlite3"):
    """The bare Bottle app, its insert made `how`."""
    insert = {"sqlite3": sqlite3_insert, "peewee": peewee_insert}[how](path)
    app = bottle.Bottle()

    @app.post("/reservation")
    def reserve():
        line = json.loads(bottle.request.body.read())[0]
        reservation_id = str(uuid.uuid4())
        insert(reservation_id, line["product_id"], line["quantity"])
        bottle.response.content_type = "application/json"
        return json.dumps({"reservation_id": reservation_id, "stock": [{"product_id": line["product_id"], "inventory_size": 1}]})

    @app.get("/health")
    def health():
        return "OK"
    return app


def main(port, path, how="sqlite3"):
    waitress.serve(make_app(path, how), host="127.0.0.1", port=port, threads=8, _quiet=True)


if __name__ == "__main__":
    main(int(sys.argv[1]), *sys.argv[2:])
