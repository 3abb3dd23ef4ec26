"""The yardstick for bench/reservation_bench.py: bare Bottle + Waitress doing one SQLite insert per request.

Same server settings and SQLite pragmas as the bridge, so the ratio measures the bridge's own work.
"""
import json
import sqlite3
import sys
import threading
import uuid

import bottle
import waitress

local = threading.local()


def connection(path):
    if not hasattr(local, "db"):
        local.db = sqlite3.connect(path, timeout=8, isolation_level=None)
        for pragma in ("journal_mode=wal", "busy_timeout=8000", "synchronous=full"):
            local.db.execute(f"PRAGMA {pragma}")
    return local.db


def main(port, path):
    connection(path).execute("CREATE TABLE IF NOT EXISTS hold (id TEXT PRIMARY KEY, product INTEGER, quantity INTEGER)")
    app = bottle.Bottle()

    @app.post("/reservation")
    def reserve():
        line = json.loads(bottle.request.body.read())[0]
        reservation_id = str(uuid.uuid4())
        connection(path).execute("INSERT INTO hold VALUES (?, ?, ?)", (reservation_id, line["product_id"], line["quantity"]))
        bottle.response.content_type = "application/json"
        return json.dumps({"reservation_id": reservation_id, "stock": [{"product_id": line["product_id"], "inventory_size": 1}]})

    @app.get("/health")
    def health():
        return "OK"

    waitress.serve(app, host="127.0.0.1", port=port, threads=8, _quiet=True)


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2])
