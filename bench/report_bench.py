"""How long `g2a-bridge report` and the money part of a /metrics scrape take over a large order history.

Seeds N orders (default 100,000; one key each, a tenth with two) over 1,000 products and 60 days into a
throwaway SQLite file, then times report.build for each period and grouping, and metrics.money_families.

    .venv/bin/python bench/report_bench.py [--orders 100000] [--database-url postgresql://...]
"""
import argparse
import datetime
import random
import sys
import tempfile
import time
import uuid
from decimal import Decimal

import harness  # noqa: F401  (puts the repository on sys.path)

from bridge import db, metrics, migrations, report
from bridge.config import Settings

PRODUCTS, DAYS, BATCH = 1_000, 60, 5_000


def seed(orders, now, rng):
    cws = [{"id": f"cws-{n}", "quantity": 10} for n in range(PRODUCTS)]
    products = [{"g2a_id": 10**13 + n, "cws_product": f"cws-{n}", "fee": "0.15"} for n in range(PRODUCTS)]
    with db.write_transaction():
        db.CwsProduct.insert_many(cws).execute()
        db.Product.insert_many(products).execute()
    for start in range(0, orders, BATCH):
        reservations, rows, items = [], [], []
        for number in range(start, min(orders, start + BATCH)):
            created = now - datetime.timedelta(seconds=rng.uniform(0, DAYS * 86400))
            reservation, order = str(uuid.uuid4()), str(uuid.uuid4())
            reservations.append({"id": reservation, "state": "ordered", "expires_at": created})
            rows.append({"id": order, "reservation": reservation, "g2a_order_id": 8 * 10**13 + number,
                         "state": "completed", "cws_client_order_id": f"g2a-{number}", "created_at": created})
            product = rng.randrange(PRODUCTS)
            for position in range(2 if number % 10 == 0 else 1):
                state = "returned" if rng.random() < 0.01 else "delivered"
                items.append({"id": str(uuid.uuid4()), "order": order, "position": position,
                              "g2a_product_id": 10**13 + product, "cws_product_id": f"cws-{product}",
                              "state": state, "sale_price": Decimal(rng.randrange(200, 6000)) / 100,
                              "unit_cost": Decimal(rng.randrange(100, 5000)) / 100, "delivered_at": created})
        with db.write_transaction():
            db.Reservation.insert_many(reservations).execute()
            db.Order.insert_many(rows).execute()
            db.OrderItem.insert_many(items).execute()


def timed(what, call, repeat=3):
    best = min(_seconds(call) for _ in range(repeat))
    print(f"{what:<44} {best * 1000:8.0f} ms")


def _seconds(call):
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--orders", type=int, default=100_000)
    parser.add_argument("--database-url", help="default: a SQLite file in a temporary folder")
    args = parser.parse_args(argv)
    folder = tempfile.mkdtemp(prefix="report-bench-")
    migrations.open_database(args.database_url or f"sqlite:///{folder}/bench.db")
    now, settings = db.utcnow(), Settings()
    started = time.perf_counter()
    seed(args.orders, now, random.Random(7))
    print(f"seeded {args.orders:,} orders ({db.OrderItem.select().count():,} keys) in "
          f"{time.perf_counter() - started:.1f} s")
    for since in ("24h", "7d", "30d"):
        for by in ("product", "day"):
            timed(f"report --since {since} --by {by}",
                  lambda: report.build(settings, report.parse_since(since, now), now, by=by))
    timed("report over everything (60 days)", lambda: report.build(settings, report.EPOCH, now))
    timed("/metrics money families (all time)", lambda: metrics.money_families(settings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
