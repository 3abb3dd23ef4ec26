"""Soak: a bounded run of steady G2A traffic and catalogue churn against real web and worker processes, watching
throughput, errors and memory.

The simulator (2,000 CWS products with matching G2A offers, 30 % of them fulfilled late) runs in its own process;
`web` and `worker` are the real `python -m bridge` processes on a throwaway SQLite file. Buyer threads reserve at a
steady rate and then order (instant or delayed), release, renew or abandon; delivered keys are sometimes returned;
a changer moves CWS prices and stock every few seconds and sends signed STOCK postbacks for half of the changes,
so sync runs both from its full passes and from postbacks. Every 30 s a line shows throughput, answers by status
and the RSS of web and worker (VmRSS from /proc); the end shows RSS growth (start -> end and a slope per minute
after the warm-up), open file descriptors, database and log growth per 1,000 orders after the warm-up (logs at
LOG_LEVEL, INFO by default as in production), and the totals. Stops by itself.

Usage: .venv/bin/python bench/soak.py [--minutes 10] [--warm-up 1] [--rate 8] [--products 2000] [--log-level INFO]
"""
import argparse
import itertools
import json
import math
import os
import random
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from datetime import timedelta
from decimal import Decimal
from pathlib import Path

import requests

import harness
from bridge.postbacks import expected_hash
from bridge.pricing import decide_price
from bridge.sim import CWS_CLIENT_ID, CWS_CLIENT_SIGNATURE

PROFIT, FEE = Decimal("0.50"), Decimal("0.15")  # the bridge's defaults: offers start at the price it would set
REPORT_EVERY, SAMPLE_EVERY = 30.0, 5.0
DELAYED_SHARE = 0.3
TOKEN_RENEW_AFTER = 50 * 60  # seconds; the bridge's tokens last an hour
DELAYED_POLLS = 4  # CWS GETs before a delayed order completes (the worker polls every 0.5 s)


def entry(i):
    """(cws id, g2a id, cost, quantity, delayed) of product i."""
    return str(uuid.UUID(int=i + 1)), 10**13 + i, Decimal(100 + i % 900) / 100, 20 + i % 30, i % 10 < 10 * DELAYED_SHARE


# ---- the simulator process ---------------------------------------------------------------------------------------

def seed(sim, size):
    sim.cws.page_size, sim.cws.balance = 1000, Decimal("100000000")
    # Listed as last changed an hour ago, as a real catalogue is: seeded "now", every product was newer than the
    # worker's first delta read, which took CWS for one that ignores updatedSince and left deltas off for the
    # first 5 minutes, so the worker's workload changed (and its memory stepped up) in the middle of the run.
    clock, sim.cws.now = sim.cws.now, lambda: clock() - timedelta(hours=1)
    for i in range(size):
        cws_id, g2a_id, cost, quantity, delayed = entry(i)
        sim.cws.add_product(cws_id, quantity, [(1, None, str(cost))], name=f"Soak game {i}")
        if delayed:
            sim.cws.set_fulfilment(cws_id, "delayed", polls=DELAYED_POLLS)
        sim.g2a.add_offer(g2a_id, decide_price(cost, PROFIT, FEE).price, quantity, active=True)
    sim.cws.now = clock

    def change(cws_id, quantity, price):
        sim.cws.set_quantity(cws_id, quantity)
        sim.cws.set_prices(cws_id, [(1, None, price)])

    def counts():
        return {"g2a_writes": len(sim.g2a.patches), "cws_orders": len(sim.cws.orders)}
    return {"set": change, "counts": counts}


# ---- web and worker ----------------------------------------------------------------------------------------------

def environment(sim, folder, port, size, log_level):
    products = [{"cws_product_id": entry(i)[0], "g2a_product_id": entry(i)[1]} for i in range(size)]
    (folder / "products.json").write_text(json.dumps({"products": products}))
    return harness.bridge_env(sim, folder, port, CWS_CLIENT_SIGNATURE=CWS_CLIENT_SIGNATURE, SYNC_INTERVAL_SECONDS=15,
                              RESERVATION_TTL_MINUTES=1, ORDER_INLINE_WAIT_SECONDS=1, LOG_LEVEL=log_level)


def footprint(folder):
    """Bytes on disk: the database (with its WAL) and each process's log."""
    sizes = {"database": sum(p.stat().st_size for p in folder.glob("bridge.db*"))}
    sizes.update({f"{name} log": (folder / f"{name}.log").stat().st_size for name in ("web", "worker")})
    return sizes


def memory(pid):
    """(RSS in MB, open file descriptors, threads) of a process, or (nan, 0, 0) once it is gone."""
    try:
        status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
        return int(status["VmRSS"].split()[0]) / 1024, len(os.listdir(f"/proc/{pid}/fd")), int(status["Threads"])
    except (OSError, KeyError, ValueError):
        return math.nan, 0, 0


# ---- what G2A does -------------------------------------------------------------------------------------------------

class Stats:
    """Answers by (action, status), latencies per action since the last report, and other counters."""

    def __init__(self):
        self.lock = threading.Lock()
        self.answers, self.counters = Counter(), Counter()
        self.latency = {}
        self.delivery = []

    def record(self, action, status, seconds):
        with self.lock:
            self.answers[(action, status)] += 1
            self.latency.setdefault(action, []).append(seconds)

    def count(self, name, n=1):
        with self.lock:
            self.counters[name] += n

    def take_latency(self):
        with self.lock:
            taken, self.latency = self.latency, {}
        return taken


class G2A:
    """Buyer threads, the delayed-key checker and the catalogue changer."""

    def __init__(self, base, stats, remote, size, rate, seed=7):
        self.base, self.stats, self.remote, self.size, self.rate = base, stats, remote, size, rate
        self.local, self.rng_lock = threading.local(), threading.Lock()
        self.rng = random.Random(seed)
        self.order_ids = itertools.count(80300000000000)
        self.pending = {}  # order_id -> when POST /order answered 202
        self.delivered = []  # (order_id, [item ids]) that may be returned later
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.token, self.token_at = harness.access_token(base), time.monotonic()

    def bearer(self):
        """The token, renewed before its hour is up as G2A does (a 60-minute run ended in 401s with one token)."""
        with self.lock:
            if time.monotonic() - self.token_at > TOKEN_RENEW_AFTER:
                self.token, self.token_at = harness.access_token(self.base), time.monotonic()
            return self.token

    def call(self, action, method, path, body=None):
        if not hasattr(self.local, "session"):
            self.local.session = requests.Session()
        started = time.perf_counter()
        try:
            answer = self.local.session.request(method, self.base + path, json=body, timeout=30,
                                                headers={"Authorization": f"Bearer {self.bearer()}"})
        except requests.RequestException as exc:
            self.stats.record(action, type(exc).__name__, time.perf_counter() - started)
            return None
        self.stats.record(action, answer.status_code, time.perf_counter() - started)
        return answer

    def pick(self, *weights):
        with self.rng_lock:
            return self.rng.random(), self.rng.randrange(self.size), self.rng.choices(range(len(weights)), weights)[0]

    # -- buyers --

    def buyer(self, threads):
        interval, next_at = threads / self.rate, time.monotonic()
        while not self.stop.is_set():
            next_at += interval
            self.one_sale()
            self.stop.wait(max(0.0, next_at - time.monotonic()))

    def one_sale(self):
        _, product, what = self.pick(50, 20, 10, 20)  # order, release, renew then release, abandon
        _, g2a_id, _, _, _ = entry(product)
        answer = self.call("reserve", "POST", "/reservation", [{"product_id": g2a_id, "quantity": 1}])
        if answer is None or answer.status_code != 200:
            return
        reservation_id = answer.json()["reservation_id"]
        if what == 0:
            self.order(reservation_id)
        elif what in (1, 2):
            if what == 2:
                self.call("renew", "PUT", f"/reservation/{reservation_id}")
            self.call("release", "DELETE", f"/reservation/{reservation_id}")
        else:
            self.stats.count("abandoned reservations")

    def order(self, reservation_id):
        with self.lock:
            g2a_order_id = next(self.order_ids)
        answer = self.call("order", "POST", "/order", {"reservation_id": reservation_id, "g2a_order_id": g2a_order_id})
        if answer is None or answer.status_code not in (200, 202):
            return
        body = answer.json()
        if answer.status_code == 202:
            with self.lock:
                self.pending[body["order_id"]] = time.monotonic()
        else:
            self.keep(body["order_id"], [line["id"] for entry in body["stock"] for line in entry["inventory"]])

    def keep(self, order_id, item_ids):
        with self.lock:
            self.delivered.append((order_id, item_ids))
            del self.delivered[:-200]

    # -- late keys and returns --

    def checker(self):
        while not self.stop.wait(1.0):
            with self.lock:
                pending = list(self.pending.items())
            for order_id, since in pending:
                answer = self.call("inventory", "GET", f"/order/{order_id}/inventory")
                keys = [line["id"] for entry in answer.json() for line in entry["inventory"]] \
                    if answer is not None and answer.status_code == 200 else []
                if keys:
                    with self.lock:
                        self.pending.pop(order_id, None)
                        self.stats.delivery.append(time.monotonic() - since)
                    self.keep(order_id, keys)
            self.maybe_return()

    def maybe_return(self):
        """Now and then G2A refunds a buyer: the keys of a delivered order go back to the pool."""
        chance, pick, _ = self.pick(1)
        with self.lock:
            chosen = self.delivered.pop(pick % len(self.delivered)) if self.delivered and chance < 0.2 else None
        if chosen:
            order_id, item_ids = chosen
            query = "&".join(f"id[]={item_id}" for item_id in item_ids)
            self.call("return", "DELETE", f"/order/{order_id}/inventory?{query}")

    # -- catalogue churn --

    def changer(self, every, per_change):
        while not self.stop.wait(every):
            for _ in range(per_change):
                chance, product, _ = self.pick(1)
                cws_id, _, cost, quantity, _ = entry(product)
                new_cost = (cost * Decimal(str(0.9 + chance * 0.2))).quantize(Decimal("0.01"))
                self.remote.set(cws_id, 5 + int(chance * 1000) % 50, str(new_cost))
                self.stats.count("CWS changes")
                if chance < 0.5:
                    body = {"type": "STOCK", "authHash": expected_hash(CWS_CLIENT_ID, CWS_CLIENT_SIGNATURE),
                            "products": [{"productId": cws_id}]}
                    self.call("postback", "POST", "/cws/postback", body)


# ---- reporting -------------------------------------------------------------------------------------------------

def pct(values, share):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * share))] * 1000 if ordered else math.nan


def slope(samples):
    """Least-squares MB per minute over (seconds, MB) samples."""
    points = [(t / 60, mb) for t, mb in samples if not math.isnan(mb)]
    if len(points) < 2:
        return math.nan
    mean_t, mean_mb = statistics.fmean(t for t, _ in points), statistics.fmean(mb for _, mb in points)
    spread = sum((t - mean_t) ** 2 for t, _ in points)
    return sum((t - mean_t) * (mb - mean_mb) for t, mb in points) / spread if spread else math.nan


def interval_line(elapsed, seconds, stats, previous, rss, counts, pending):
    answers = stats.answers.copy()
    new = answers - previous
    seconds = max(seconds, 1.0)
    rate = {action: sum(n for (a, _), n in new.items() if a == action) / seconds
            for action in ("reserve", "order")}
    errors = Counter()
    for (action, status), n in new.items():
        if status not in (200, 202, 204):
            errors[f"{action}:{status}"] += n
    latency = stats.take_latency()
    return (f"[{elapsed / 60:5.1f} min] reserve {rate['reserve']:5.1f}/s "
            f"(p95 {pct(latency.get('reserve', []), .95):4.0f} ms)"
            f"  order {rate['order']:4.1f}/s (p95 {pct(latency.get('order', []), .95):5.0f} ms)"
            f"  late keys waiting {pending:3d}  G2A writes {counts['g2a_writes']:5d}"
            f"  RSS web {rss['web']:5.1f} MB worker {rss['worker']:5.1f} MB"
            f"  non-2xx {dict(errors) if errors else 0}"), answers


def orders_answered(stats):
    with stats.lock:
        return sum(n for (action, status), n in stats.answers.items() if action == "order" and status in (200, 202))


def growth_line(disk, warm_up):
    """Database and log growth per 1,000 orders between the end of the warm-up and the end."""
    first = next((sample for sample in disk if sample[0] >= warm_up), disk[0])
    last = disk[-1]
    orders = last[1] - first[1]
    if orders <= 0:
        return "growth     no orders after the warm-up"
    parts = [f"{name} {(last[2][name] - first[2][name]) * 1000 / orders / 1e6:+.2f} MB" for name in last[2]]
    return f"growth     per 1,000 orders after the warm-up ({orders} orders): " + ", ".join(parts)


def summary(stats, samples, disk, warm_up, started, ended, counts, folder, pending):
    minutes = (ended - started) / 60
    lines = [f"== soak: {minutes:.1f} min, warm-up {warm_up / 60:g} min =="]
    for name in ("web", "worker"):
        series = [(t, s[name][0]) for t, s in samples]
        late = [(t, mb) for t, mb in series if t >= warm_up] or series
        fds = [(t, s[name][1]) for t, s in samples]
        fds_late = [n for t, n in fds if t >= warm_up] or [n for _, n in fds]
        threads = [s[name][2] for t, s in samples if t >= warm_up] or [s[name][2] for _, s in samples]
        lines.append(f"RSS {name:<6} start {series[0][1]:6.1f} MB -> after warm-up {late[0][1]:6.1f} MB -> end "
                     f"{series[-1][1]:6.1f} MB  (peak {max(mb for _, mb in series):6.1f} MB; slope after the "
                     f"warm-up {slope(late):+.3f} MB/min, whole run {slope(series):+.3f} MB/min); open fds "
                     f"{fds[0][1]} -> after warm-up {fds_late[0]} -> end {fds[-1][1]} (max after warm-up "
                     f"{max(fds_late)}); threads after the warm-up {min(threads)}-{max(threads)}")
    lines.append(growth_line(disk, warm_up))
    by_action = Counter()
    for (action, status), n in stats.answers.items():
        by_action[action] += n
    for action in sorted(by_action):
        statuses = sorted(((str(s), n) for (a, s), n in stats.answers.items() if a == action))
        lines.append(f"{action:<10} {by_action[action]:6d}  ({by_action[action] / (ended - started):5.2f}/s)  "
                     + "  ".join(f"{s}x{n}" for s, n in statuses))
    delivery = stats.delivery
    lines.append(f"late keys  {len(delivery)} delivered after 202 (202 -> keys p50 {pct(delivery, .5):.0f} ms, "
                 f"p95 {pct(delivery, .95):.0f} ms), {pending} still waiting at the end")
    lines.append(f"catalogue  {stats.counters['CWS changes']} CWS price/stock changes; {counts['g2a_writes']} G2A "
                 f"offer writes; {counts['cws_orders']} CWS orders; {stats.counters['abandoned reservations']} "
                 f"reservations left to expire")
    logs = {name: (folder / f"{name}.log").read_text(errors="replace") for name in ("web", "worker")}
    for name, text in logs.items():
        errors = [line for line in text.splitlines() if line.startswith(("ERROR", "CRITICAL"))]
        kinds = Counter(line.split()[2] if len(line.split()) > 2 else line for line in errors)
        lines.append(f"{name} log  {len(text.splitlines())} lines, {len(errors)} ERROR"
                     + (f" {dict(kinds.most_common(5))}" if kinds else "")
                     + ("  TRACEBACK PRESENT" if "Traceback" in text else ""))
    database = folder / "bridge.db"
    size = sum(p.stat().st_size for p in folder.glob("bridge.db*"))
    lines.append(f"database   {size / 1e6:.1f} MB ({database.name} + WAL)")
    return "\n".join(lines)


# ---- driver ----------------------------------------------------------------------------------------------------

def run(args, folder):
    with harness.RemoteSimulator(seed, args.products) as remote:
        port = harness.free_port()
        env = environment(remote, folder, port, args.products, args.log_level)
        procs = {"web": harness.start("web", env, folder), "worker": harness.start("worker", env, folder)}
        try:
            base = f"http://127.0.0.1:{port}"
            harness.wait_ready(base, procs["web"])
            print(f"soak: {args.minutes} min, {args.rate} reservations/s, {args.products} products "
                  f"({DELAYED_SHARE:.0%} fulfilled late), {args.change_count} CWS changes every {args.change_every} "
                  f"s; web pid {procs['web'].pid}, worker pid {procs['worker'].pid}, files in {folder}", flush=True)
            drive(args, base, remote, procs, folder)
        finally:
            for name, (code, seconds) in harness.stop(procs).items():
                print(f"{name} stopped: exit {code}, {seconds:.1f} s after SIGTERM")


def drive(args, base, remote, procs, folder):
    stats = Stats()
    g2a = G2A(base, stats, remote, args.products, args.rate)
    threads = [threading.Thread(target=g2a.buyer, args=(args.threads,), daemon=True) for _ in range(args.threads)]
    threads += [threading.Thread(target=g2a.checker, daemon=True),
                threading.Thread(target=g2a.changer, args=(args.change_every, args.change_count), daemon=True)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    samples, disk, previous, last_report = [], [], Counter(), started
    end = started + args.minutes * 60
    while True:
        now = time.monotonic()
        samples.append((now - started, {name: memory(proc.pid) for name, proc in procs.items()}))
        disk.append((now - started, orders_answered(stats), footprint(folder)))
        for name, proc in procs.items():
            if proc.poll() is not None:
                print(f"!! {name} exited with {proc.returncode}", flush=True)
                end = now
        if now >= last_report + REPORT_EVERY or now >= end:
            rss = {name: mb for name, (mb, _, _) in samples[-1][1].items()}
            line, previous = interval_line(now - started, now - last_report, stats, previous, rss, remote.counts(),
                                           len(g2a.pending))
            print(line, flush=True)
            last_report = now
        if now >= end:
            break
        time.sleep(min(SAMPLE_EVERY, max(0.0, end - time.monotonic())))
    g2a.stop.set()
    for thread in threads:
        thread.join(35)
    ended = time.monotonic()
    print(summary(stats, samples, disk, args.warm_up * 60, started, ended, remote.counts(), folder,
                  len(g2a.pending)), flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="how long to run (default 10)")
    parser.add_argument("--rate", type=float, default=8.0, help="reservations per second (default 8)")
    parser.add_argument("--threads", type=int, default=6, help="buyer threads (default 6)")
    parser.add_argument("--products", type=int, default=2000, help="mapped products (default 2000)")
    parser.add_argument("--change-every", type=float, default=2.0, help="seconds between CWS changes (default 2)")
    parser.add_argument("--change-count", type=int, default=3, help="products changed each time (default 3)")
    parser.add_argument("--warm-up", type=float, default=1.0,
                        help="minutes left out of the RSS slope and the growth figures (default 1)")
    parser.add_argument("--log-level", default="INFO", help="LOG_LEVEL of web and worker (default INFO, as deployed)")
    parser.add_argument("--keep", action="store_true", help="keep the data folder (logs, database) afterwards")
    args = parser.parse_args(argv)
    if args.keep:
        run(args, Path(tempfile.mkdtemp(prefix="soak-")))
        return 0
    with tempfile.TemporaryDirectory(prefix="soak-") as folder:
        run(args, Path(folder))
    return 0


if __name__ == "__main__":
    sys.exit(main())
