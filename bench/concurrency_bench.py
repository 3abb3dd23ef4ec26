"""Web (8 threads) and worker on one SQLite file under a G2A load mix while a 10,000-product sync writes.

G2A-like keep-alive clients reserve (80 % plentiful products, 20 % scarce ones), then order (50 %), release (25 %),
renew (10 %) or keep (15 %) the reservation, and read a third of the orders' inventory again. Meanwhile the
simulator changes a quarter of the bulk CWS quantities twice a second, so every sync pass upserts the catalogue
and writes offers. Printed: throughput, answers by status, p50/p95/p99/max latency per call, the sync passes
that ran during the load, "database is locked" occurrences, then the invariants (no 5xx, nothing lost, no
oversell, every order with its keys and exactly one CWS order). Exit status 1 when an invariant fails.

The simulator runs in its own process (harness.RemoteSimulator), so the clients here don't share its GIL.
Usage: .venv/bin/python bench/concurrency_bench.py [--products 10000] [--seconds 45] [--clients 24]
"""
import argparse
import http.client
import itertools
import json
import os
import random
import re
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter, defaultdict
from decimal import Decimal
from pathlib import Path

from peewee import fn

import harness
from bridge import db

FIRST_G2A_ID = 10000070000000
UNMETERED = 10**6  # requests per window: a CWS budget that never holds a call back


def seed(sim, spec):
    """Every product in CWS and its offer on G2A, in sync; a thread changes bulk quantities twice a second."""
    sim.cws.balance = Decimal("1000000000")
    for cws_id, g2a_id, quantity in spec["products"]:
        sim.cws.add_product(cws_id, quantity, [(1, None, "5.00")])
        sim.g2a.add_offer(g2a_id, price="6.48", stock=quantity, active=True)  # in sync: (5.00 + 0.50) / 0.85
    rng, never = random.Random(7), threading.Event()

    def churn():
        while not never.wait(0.5):
            for cws_id in rng.sample(spec["bulk"], int(len(spec["bulk"]) * spec["churn"])):
                sim.cws.set_quantity(cws_id, rng.randint(0, 100))
    threading.Thread(target=churn, daemon=True).start()
    return {}


class Products:
    """bulk (churned by the sync), hot (plentiful, reserved and bought) and scarce (fought over) products."""

    def __init__(self, bulk, hot, scarce, scarce_stock):
        self.scarce_stock = scarce_stock
        ids = (FIRST_G2A_ID + n for n in itertools.count())
        self.bulk = [(next(ids), str(uuid.uuid4()), 50) for _ in range(bulk)]
        self.hot = [(next(ids), str(uuid.uuid4()), 10**7) for _ in range(hot)]
        self.scarce = [(next(ids), str(uuid.uuid4()), scarce_stock) for _ in range(scarce)]

    def everything(self):
        return self.bulk + self.hot + self.scarce

    def write(self, folder, churn):
        """products.json in `folder`; the simulator's seed spec returned."""
        (folder / "products.json").write_text(json.dumps(
            {"products": [{"cws_product_id": cws, "g2a_product_id": g2a} for g2a, cws, _ in self.everything()]}))
        return {"products": [[cws, str(g2a), qty] for g2a, cws, qty in self.everything()],
                "bulk": [cws for _, cws, _ in self.bulk], "churn": churn}


def orders(sim):
    return sim.control("GET", "orders")["items"]


def quantity(sim, cws_id):
    return sim.control("POST", f"products/{cws_id}", {})["quantity"]


def environment(sim, folder, port, args):
    # writes per pass = requests per minute x interval / 60 / 3 (sync.writes_per_pass)
    per_minute = args.writes_per_pass * 3 * 60 // args.sync_interval
    # The simulator enforces no CWS limits here, and the load measured is the database's: the CWS budgets
    # (budget.py) are lifted, or a 10,000-product sweep paced at the default list budget would take minutes.
    return harness.bridge_env(sim, folder, port, LOG_LEVEL="INFO", SYNC_INTERVAL_SECONDS=args.sync_interval,
                              G2A_REQUESTS_PER_MINUTE=per_minute, CWS_LIST_REQUESTS_PER_10_MIN=UNMETERED,
                              CWS_PRODUCT_REQUESTS_PER_5_MIN=UNMETERED)


def cpu_seconds(pid):
    """User + system CPU seconds a process has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def full_passes(log_text):
    """(products, writes, seconds) of each full sync pass in a worker log."""
    found = re.findall(r"sync\.full_pass products=(\d+) writes=(\d+) .*?seconds=([\d.]+)", log_text)
    return [(int(products), int(writes), float(seconds)) for products, writes, seconds in found]


class Ledger:
    """Every call (endpoint, status, seconds) and what G2A was told, for the checks afterwards."""

    def __init__(self):
        self.lock = threading.Lock()
        self.calls = []
        self.held, self.sold, self.short = Counter(), Counter(), Counter()
        self.orders = {}  # order id -> (g2a order id, quantity, keys in the answer)
        self.kept = self.released = 0


class Buyer:
    """One keep-alive connection looping reserve -> order / release / renew / keep until the deadline."""

    g2a_order_ids = itertools.count(80300000000000)

    def __init__(self, port, token, ledger, products, seed):
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        self.headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        self.ledger, self.products, self.rng = ledger, products, random.Random(seed)

    def call(self, method, path, endpoint, body=None):
        started = time.perf_counter()
        self.conn.request(method, path, None if body is None else json.dumps(body), self.headers)
        answer = self.conn.getresponse()
        data = answer.read()
        seconds = time.perf_counter() - started
        with self.ledger.lock:
            self.ledger.calls.append((endpoint, answer.status, seconds))
        return answer.status, (json.loads(data) if data else None)

    def run(self, deadline):
        while time.monotonic() < deadline:
            scarce = self.rng.random() < 0.2
            g2a_id, _, _ = self.rng.choice(self.products.scarce if scarce else self.products.hot)
            quantity = 1 if scarce else self.rng.choice((1, 1, 2))
            status, body = self.call("POST", "/reservation", "POST /reservation",
                                     [{"product_id": g2a_id, "quantity": quantity}])
            if status == 400 and scarce:
                with self.ledger.lock:
                    self.ledger.short[g2a_id] += 1
            elif status == 200:
                self.settle(body["reservation_id"], g2a_id, quantity)

    def settle(self, reservation_id, g2a_id, quantity):
        roll = self.rng.random()
        if roll < 0.5:
            return self.order(reservation_id, g2a_id, quantity)
        if roll < 0.75 and self.call("DELETE", f"/reservation/{reservation_id}", "DELETE /reservation")[0] == 204:
            with self.ledger.lock:
                self.ledger.released += 1
            return
        if 0.75 <= roll < 0.85:  # renewed (a refused renewal keeps the reservation as it was: still held)
            self.call("PUT", f"/reservation/{reservation_id}", "PUT /reservation",
                      [{"product_id": g2a_id, "quantity": quantity}])
        with self.ledger.lock:
            self.ledger.held[g2a_id] += quantity
            self.ledger.kept += 1

    def order(self, reservation_id, g2a_id, quantity):
        g2a_order_id = next(self.g2a_order_ids)
        status, body = self.call("POST", "/order", "POST /order",
                                 {"reservation_id": reservation_id, "g2a_order_id": g2a_order_id})
        if status not in (200, 202):
            return
        keys = [line["value"] for entry in body["stock"] for line in entry["inventory"]]
        with self.ledger.lock:
            self.ledger.sold[g2a_id] += quantity
            self.ledger.orders[body["order_id"]] = (g2a_order_id, quantity, keys)
        if self.rng.random() < 0.3:
            self.call("GET", f"/order/{body['order_id']}/inventory", "GET /order/{id}/inventory")


def load(ports, token, products, args):
    """args.clients buyers for args.seconds, spread over the web processes at `ports`."""
    ledger, deadline = Ledger(), time.monotonic() + args.seconds
    buyers = [Buyer(ports[seed % len(ports)], token, ledger, products, seed) for seed in range(args.clients)]
    threads = [threading.Thread(target=buyer.run, args=(deadline,)) for buyer in buyers]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return ledger, time.monotonic() - started


def ms(values, share):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * share))] * 1000


def report_load(ledger, elapsed, passes, locked, cpu):
    by_endpoint = defaultdict(list)
    for endpoint, _, seconds in ledger.calls:
        by_endpoint[endpoint].append(seconds)
    by_endpoint["all calls"] = [seconds for _, _, seconds in ledger.calls]
    print(f"\nthroughput: {len(ledger.calls) / elapsed:.0f} calls/s ({len(ledger.calls)} in {elapsed:.1f} s)")
    print("answers:    " + ", ".join(f"{endpoint} {status}: {count}" for (endpoint, status), count
                                     in sorted(Counter((e, s) for e, s, _ in ledger.calls).items())))
    print(f"{'latency ms':28} {'n':>6} {'p50':>7} {'p95':>7} {'p99':>7} {'max':>7}")
    for endpoint, seconds in by_endpoint.items():
        print(f"{endpoint:28} {len(seconds):6} {ms(seconds, .5):7.1f} {ms(seconds, .95):7.1f} "
              f"{ms(seconds, .99):7.1f} {max(seconds) * 1000:7.1f}")
    print(f"sync full passes during the load (products, writes, seconds): {passes}")
    print(f'"database is locked" in the logs: {locked}')
    print("CPU during the load: " + ", ".join(f"{name} {seconds / elapsed:.0%}" for name, seconds in cpu.items())
          + f" (of {os.cpu_count()} cores)")


def check(ledger, products, sim, database, logs):
    """The invariants, one line each; True when all hold."""
    db.connect(database)  # opened only after the load, as an operator's `status` would
    lines, items = db.ReservationLine, db.OrderItem
    held = dict(lines.select(lines.product, fn.SUM(lines.quantity)).where(lines.active == True)  # noqa: E712
                .group_by(lines.product).tuples())
    sold = Counter(g2a_id for (g2a_id,) in items.select(items.g2a_product_id).tuples())
    states = Counter(state for (state,) in db.Reservation.select(db.Reservation.state).tuples())
    cws_orders = defaultdict(list)
    for cws_order in orders(sim):
        cws_orders[cws_order["clientOrderId"]].append(cws_order)
    delivered = Counter(order_id for (order_id,) in
                        items.select(items.order).where(items.state == "delivered").tuples())
    checks = {
        "no 5xx answer": all(status < 500 for _, status, _ in ledger.calls),
        "every call under G2A's 9 s": max(seconds for _, _, seconds in ledger.calls) < 9.0,
        'no "database is locked"': "database is locked" not in logs,
        "no unhandled error, no failed order": "web.unhandled" not in logs and "order.failed" not in logs,
        "reservations held = what G2A kept": held == dict(+ledger.held),
        "keys sold = what G2A ordered": sold == +ledger.sold,
        "reservation states add up": states == +Counter(active=ledger.kept, released=ledger.released,
                                                        ordered=len(ledger.orders)),
        "one CWS order per G2A order": all(len(cws_orders[f"g2a-{g2a_order}"]) == 1
                                          for g2a_order, _, _ in ledger.orders.values())
                                      and sum(map(len, cws_orders.values())) == len(ledger.orders),
        "every order has its keys": all(delivered[order_id] == quantity
                                        for order_id, (_, quantity, _) in ledger.orders.items()),
        "no oversell of scarce products": all(
            ledger.held[g2a] + ledger.sold[g2a] <= products.scarce_stock
            and quantity(sim, cws) == products.scarce_stock - ledger.sold[g2a] for g2a, cws, _ in products.scarce),
    }
    for name, ok in checks.items():
        print(f"{'ok  ' if ok else 'FAIL'} {name}")
    print(f"scarce products ran short {sum(ledger.short.values())} times")
    return all(checks.values())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--products", type=int, default=10_000, help="bulk products the sync churns (default 10000)")
    parser.add_argument("--hot", type=int, default=50, help="plentiful products G2A buys (default 50)")
    parser.add_argument("--scarce", type=int, default=5, help="products with few keys (default 5)")
    parser.add_argument("--scarce-stock", type=int, default=20, help="keys of each scarce product (default 20)")
    parser.add_argument("--seconds", type=int, default=45, help="length of the load (default 45)")
    parser.add_argument("--clients", type=int, default=24, help="keep-alive G2A connections (default 24)")
    parser.add_argument("--churn", type=float, default=0.25, help="bulk share changed every 0.5 s (default 0.25)")
    parser.add_argument("--sync-interval", type=int, default=5, help="SYNC_INTERVAL_SECONDS (default 5)")
    parser.add_argument("--writes-per-pass", type=int, default=100, help="offer writes per pass (default 100)")
    args = parser.parse_args(argv)
    products = Products(args.products, args.hot, args.scarce, args.scarce_stock)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        spec = products.write(folder, args.churn)
        with harness.RemoteSimulator(seed, spec) as sim:
            return measure(products, sim, folder, args)


def measure(products, sim, folder, args):
    port = harness.free_port()
    env = environment(sim, folder, port, args)
    procs = {"worker": harness.start("worker", env, folder)}
    try:
        harness.wait_until(lambda: full_passes((folder / "worker.log").read_text()), 300, "the first sync pass")
        procs["web"] = harness.start("web", env, folder)
        base = f"http://127.0.0.1:{port}"
        harness.wait_ready(base, procs["web"])
        token = harness.access_token(base)
        before = len(full_passes((folder / "worker.log").read_text()))
        print(f"first full pass, before the load (products, writes, seconds): "
              f"{full_passes((folder / 'worker.log').read_text())[0]}")
        pids = {"web": procs["web"].pid, "worker": procs["worker"].pid, "simulator": sim.process.pid,
                "clients": os.getpid()}
        cpu = {name: cpu_seconds(pid) for name, pid in pids.items()}
        ledger, elapsed = load([port], token, products, args)
        cpu = {name: cpu_seconds(pid) - cpu[name] for name, pid in pids.items()}
        logs = (folder / "web.log").read_text() + (folder / "worker.log").read_text()
        passes = full_passes((folder / "worker.log").read_text())[before:]
        report_load(ledger, elapsed, passes, logs.count("database is locked"), cpu)
        time.sleep(2)  # orders answered 202 finish in the worker
        ok = check(ledger, products, sim, env["DATABASE_URL"], logs)
    finally:
        harness.stop(procs)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
