"""POST /order latency (instant CWS fulfilment, sequential and 8 concurrent) and the delay from CWS completing
a delayed order to its keys being served by GET /order/{id}/inventory, with a real worker polling.

The simulator, web and worker each run in their own process (driven through the simulator's /_sim/ routes),
so the benchmark's client threads do not share a GIL with the fake CWS.
Usage: .venv/bin/python bench/order_bench.py [--orders 200] [--delayed 8]
"""
import argparse
import json
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from pathlib import Path

import requests

import harness
from bridge.sim import DEMO_PRODUCTS

(INSTANT_CWS, INSTANT_G2A, *_), (DELAYED_CWS, DELAYED_G2A, *_) = DEMO_PRODUCTS


def seed(sim):
    sim.seed_demo()
    sim.cws.balance = Decimal("1000000")  # no control route for it


def environment(sim, folder, port):
    (folder / "products.json").write_text(json.dumps([{"cws_product_id": cws, "g2a_product_id": int(g2a)}
                                                      for cws, g2a, *_ in DEMO_PRODUCTS]))
    return harness.bridge_env(sim, folder, port, STOCK_MAX_AGE_SECONDS=3600)


class G2A:
    """G2A's side: one keep-alive session per thread."""

    def __init__(self, base):
        self.base, self.local = base, threading.local()
        self.headers = {"Authorization": f"Bearer {harness.access_token(base)}"}
        self.next_id = iter(range(80201000000000, 80209000000000))
        self.lock = threading.Lock()

    def session(self):
        if not hasattr(self.local, "session"):
            self.local.session = requests.Session()
            self.local.session.headers.update(self.headers)
        return self.local.session

    def order(self, g2a_product):
        """(seconds POST /order took, status, body, g2a_order_id) for a fresh reservation of one key."""
        http = self.session()
        reservation = http.post(f"{self.base}/reservation", json=[{"product_id": int(g2a_product), "quantity": 1}])
        assert reservation.status_code == 200, reservation.text
        with self.lock:
            g2a_order_id = next(self.next_id)
        started = time.perf_counter()
        answer = http.post(f"{self.base}/order", json={"reservation_id": reservation.json()["reservation_id"],
                                                      "g2a_order_id": g2a_order_id})
        return time.perf_counter() - started, answer.status_code, answer.json(), g2a_order_id

    def keys(self, order_id):
        answer = self.session().get(f"{self.base}/order/{order_id}/inventory")
        return [line for entry in answer.json() for line in entry["inventory"]]


def percentiles(seconds):
    ms = sorted(s * 1000 for s in seconds)
    p95 = ms[min(len(ms) - 1, int(len(ms) * 0.95))]
    return f"n={len(ms)} p50={statistics.median(ms):.1f} ms p95={p95:.1f} ms max={ms[-1]:.1f} ms"


def instant(g2a, count, threads):
    with ThreadPoolExecutor(threads) as pool:
        results = list(pool.map(lambda _: g2a.order(INSTANT_G2A), range(count)))
    assert all(result[1] == 200 for result in results), {result[1] for result in results}
    return [result[0] for result in results]


def delivery_delays(g2a, sim, count):
    """Place `count` delayed orders (answered 202), then complete each at CWS and time until G2A sees its keys."""
    with ThreadPoolExecutor(count) as pool:
        placed = list(pool.map(lambda _: g2a.order(DELAYED_G2A), range(count)))
    assert all(result[1] == 202 for result in placed), {result[1] for result in placed}
    by_client = {o["clientOrderId"]: o["orderId"] for o in sim.control("GET", "orders")["items"]}
    delays = []
    for _, _, body, g2a_order_id in placed:
        cws_order = by_client[f"g2a-{g2a_order_id}"]
        time.sleep(0.37)  # complete at an arbitrary moment relative to the worker's ticks
        sim.control("POST", f"orders/{cws_order}/complete")
        completed = time.perf_counter()
        while not g2a.keys(body["order_id"]):
            time.sleep(0.01)
        delays.append(time.perf_counter() - completed)
    return delays


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--orders", type=int, default=200, help="instant orders per run (default 200)")
    parser.add_argument("--delayed", type=int, default=8, help="delayed orders to time (default 8)")
    args = parser.parse_args(argv)
    with harness.RemoteSimulator(seed) as sim, tempfile.TemporaryDirectory() as tmp:
        sim.control("POST", f"products/{INSTANT_CWS}", {"quantity": 10 * args.orders + 100})
        sim.control("POST", f"products/{DELAYED_CWS}", {"quantity": args.delayed + 10})
        sim.control("POST", f"fulfilment/{DELAYED_CWS}", {"mode": "delayed", "polls": 10**9})
        folder, port = Path(tmp), harness.free_port()
        env = environment(sim, folder, port)
        procs = {"web": harness.start("web", env, folder), "worker": harness.start("worker", env, folder)}
        try:
            base = f"http://127.0.0.1:{port}"
            harness.wait_ready(base, procs["web"])
            g2a = G2A(base)
            instant(g2a, 10, 1)  # warm-up: tokens, connections, caches
            print(f"POST /order, instant, sequential:    {percentiles(instant(g2a, args.orders, 1))}")
            print(f"POST /order, instant, 8 concurrent:  {percentiles(instant(g2a, args.orders, 8))}")
            print(f"CWS completes -> keys in inventory:  {percentiles(delivery_delays(g2a, sim, args.delayed))}")
        finally:
            harness.stop(procs)


if __name__ == "__main__":
    main()
