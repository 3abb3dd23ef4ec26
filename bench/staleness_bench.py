"""Staleness bench: how fast CWS news reaches G2A within CWS's request limits, at 10,000 or 50,000 products.

Run: python bench/staleness_bench.py [--products 10000] [--minutes 10] [--page-size 500] [--every 4]
The simulator runs in its own process with the cws.md 5.3 limits (when it can enforce them) and pages of 500;
the real web and worker run against it on a throwaway SQLite file. After the first sweep, a random product runs out
of stock every `--every` seconds (every other one announced by a signed STOCK postback) and another one changes
price; 0.5 s after each silent stock-out a reservation asks for it. Printed: requests per minute per CWS endpoint
class against its limit and the most in any window of the limit (what CWS meters, and what the goal checks),
429s, stock-out -> G2A (offer inactive or stock 0) p50/p95/max silent and with a postback,
and whether the reservations after a silent stock-out were refused.
Goals (issue 11): 0 x 429 and every class <= 90 % of its limit; silent p95 <= 60 s at 10k, <= 3 min at 50k;
postback p95 <= 2 s; every reservation after a silent stock-out refused.
"""
import argparse
import json
import random
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
import uuid
from datetime import timedelta
from decimal import Decimal
from pathlib import Path

import requests

import harness
from bridge.pricing import decide_price
from bridge.sim import CWS_CLIENT_SIGNATURE

PROFIT, FEE = Decimal("0.50"), Decimal("0.15")
# (the simulator's rate class, limit, window in minutes): cws.md 5.3, the defaults of the CWS_*_REQUESTS_* variables.
CLASSES = [("token", 50, 5), ("list", 400, 10), ("product", 600, 5)]
SHARE = 0.9  # UPSTREAM_BUDGET_SHARE
POLL = 0.1  # seconds between looks at the fake G2A's write log
RESERVE_AFTER = 0.5  # seconds after a silent stock-out


def entry(i):
    """(cws id, g2a id, cost, quantity) of product i, the same in both processes."""
    return str(uuid.UUID(int=i + 1)), 10**13 + i, Decimal(100 + i % 900) / 100, 5 + i % 20


# ---- the simulator process ---------------------------------------------------------------------------------------

def seed(sim, size, page_size, honour_updated_since):
    """Every product in CWS and its G2A offer already right (the first sweep sends nothing); the commands below."""
    sim.cws.page_size, sim.cws.honour_updated_since, sim.g2a.job_polls = page_size, honour_updated_since, 0
    sim.cws.limits.enforce()  # cws.md 5.3: 429 beyond
    clock, offers = sim.cws.now, {}
    sim.cws.now = lambda: clock() - timedelta(days=1)  # the catalogue is old news to updatedSince
    for i in range(size):
        cws_id, g2a_id, cost, quantity = entry(i)
        sim.cws.add_product(cws_id, quantity, [(1, None, str(cost))])
        offers[g2a_id] = sim.g2a.add_offer(g2a_id, decide_price(cost, PROFIT, FEE).price, quantity, active=True)
    sim.cws.now = clock
    return {
        "set_quantity": sim.cws.set_quantity,
        "set_prices": sim.cws.set_prices,
        "stock_postback": lambda cws_id: sim.cws.postback("STOCK", products=[sim.cws.stock_entry(cws_id)]),
        "offer_id": offers.get,
        "patch_count": lambda: len(sim.g2a.patches),
        "stopped_at": lambda wanted: stopped_at(sim.g2a.patches, wanted),
        "counts": sim.cws.limits.counts,
    }


def stopped_at(patches, wanted):
    """{offer id: monotonic time of the first PATCH from index `since` on that stops it} for wanted {id: since}."""
    found = {}
    for offer_id, since in wanted.items():
        for patch in patches[since:]:
            variant = patch["body"].get("variant", {}) if isinstance(patch["body"], dict) else {}
            if patch["offer_id"] == offer_id and (variant.get("active") is False
                                                  or variant.get("inventory", {}).get("size") == 0):
                found[offer_id] = patch["at"]
                break
    return found


# ---- the run -------------------------------------------------------------------------------------------------------

class Run:
    """The bridge against the remote simulator, the events, and what was measured."""

    def __init__(self, remote, base, args):
        self.remote, self.base, self.args = remote, base, args
        self.rng = random.Random(11)
        self.unused = list(range(args.products))
        self.rng.shuffle(self.unused)
        self.pending = {}  # offer id -> (changed at, "silent" | "postback", patch index)
        self.latency = {"silent": [], "postback": []}
        self.reservations = []  # True when refused
        self.lock = threading.Lock()
        self.http = requests.Session()
        self.token = harness.access_token(base)

    def events(self, seconds):
        deadline, number = time.monotonic() + seconds, 0
        while time.monotonic() < deadline:
            number += 1
            self.stock_out("postback" if number % 2 == 0 else "silent")
            self.price_change()
            time.sleep(max(0.0, self.args.every - RESERVE_AFTER))

    def stock_out(self, how):
        cws_id, g2a_id, _, _ = entry(self.unused.pop())
        offer_id, since = self.remote.offer_id(g2a_id), self.remote.patch_count()
        self.remote.set_quantity(cws_id, 0)
        changed = time.monotonic()
        with self.lock:
            self.pending[offer_id] = (changed, how, since)
        if how == "postback":
            body = self.remote.stock_postback(cws_id)
            self.http.post(f"{self.base}/cws/postback", data=json.dumps(body), timeout=10,
                           headers={"Content-Type": "application/json"})
        else:
            time.sleep(max(0.0, changed + RESERVE_AFTER - time.monotonic()))
            self.reservations.append(self.reserve(g2a_id))

    def reserve(self, g2a_id):
        answer = self.http.post(f"{self.base}/reservation", json=[{"product_id": g2a_id, "quantity": 1}],
                                headers={"Authorization": f"Bearer {self.token}"}, timeout=15)
        return answer.status_code != 200

    def price_change(self):
        cws_id, _, cost, _ = entry(self.unused.pop())
        self.remote.set_prices(cws_id, [(1, None, str(cost + Decimal("0.37")))])

    def watch(self, stop):
        while not stop.wait(POLL):
            self.collect()

    def collect(self):
        with self.lock:
            wanted = {offer_id: since for offer_id, (_, _, since) in self.pending.items()}
        if not wanted:
            return
        for offer_id, at in self.remote.stopped_at(wanted).items():
            with self.lock:
                changed, how, _ = self.pending.pop(offer_id)
            self.latency[how].append(max(0.0, at - changed))


def measure(args, remote, folder):
    port = harness.free_port()
    products = [{"cws_product_id": entry(i)[0], "g2a_product_id": entry(i)[1]} for i in range(args.products)]
    (folder / "products.json").write_text(json.dumps({"products": products}))
    env = harness.bridge_env(remote, folder, port, CWS_CLIENT_SIGNATURE=CWS_CLIENT_SIGNATURE, LOG_LEVEL="INFO",
                             SYNC_INTERVAL_SECONDS=args.interval)
    procs = {"web": harness.start("web", env, folder), "worker": harness.start("worker", env, folder)}
    base = f"http://127.0.0.1:{port}"
    try:
        harness.wait_ready(base, procs["web"])
        started = time.monotonic()
        harness.wait_until(lambda: first_sweep_done(folder), args.minutes * 60 + 600, "the first sweep")
        figures = {"first_sweep_s": time.monotonic() - started}
        run, stop = Run(remote, base, args), threading.Event()
        watcher = threading.Thread(target=run.watch, args=(stop,), daemon=True)
        before, began = remote.counts()["requests"], time.monotonic()
        watcher.start()
        run.events(args.minutes * 60)
        elapsed = time.monotonic() - began
        counts = remote.counts()
        after, throttled = counts["requests"], counts["throttled"]
        deadline = time.monotonic() + args.drain
        while run.pending and time.monotonic() < deadline:
            time.sleep(0.5)
        stop.set()
        watcher.join()
        run.collect()
        figures.update(minutes=elapsed / 60, rates=rates(before, after, elapsed), throttled=throttled,
                       peaks=counts["peaks"],
                       latency=run.latency, unresolved=len(run.pending), reservations=run.reservations,
                       last_sweep=last_sweep(folder))
        return figures
    finally:
        harness.stop(procs)


def first_sweep_done(folder):
    return (last_sweep(folder) or {}).get("last_duration") is not None


def last_sweep(folder):
    """The worker's sweep progress, read from its SQLite file (read-only, no migration)."""
    try:
        with sqlite3.connect(f"file:{folder}/bridge.db?mode=ro", uri=True, timeout=5) as conn:
            row = conn.execute("SELECT value FROM setting WHERE key = 'sync.sweep'").fetchone()
    except sqlite3.Error:
        return None
    return json.loads(row[0]) if row else None


def rates(before, after, seconds):
    """{rate class: requests per minute} over the measured window (web and worker together)."""
    return {name: (after.get(name, 0) - before.get(name, 0)) * 60 / seconds for name in ("token", "list", "product",
                                                                                       "other")}


# ---- report --------------------------------------------------------------------------------------------------------

def quantiles(samples):
    if not samples:
        return "no samples"
    ordered = sorted(samples)
    p95 = ordered[max(0, -(-95 * len(ordered) // 100) - 1)]
    return (f"p50 {statistics.median(ordered):.2f} s, p95 {p95:.2f} s, max {ordered[-1]:.2f} s "
            f"({len(ordered)} samples)")


def report(args, f):
    lines = [f"== {args.products:,} products, page size {args.page_size}, {f['minutes']:.1f} min measured "
             f"(first sweep took {f['first_sweep_s']:.0f} s) ==",
             "CWS requests per minute (web + worker) against the limit, and the most in any window of the limit:"]
    shares = []
    for name, limit, window in CLASSES:
        per_minute, peak = limit / window, f["peaks"].get(name, 0)
        shares.append(peak / limit)
        lines.append(f"  {name:<8} {f['rates'][name]:7.1f}/min of {per_minute:5.1f}/min  "
                     f"({f['rates'][name] / per_minute:.1%}); peak {peak} in {window} min of {limit} "
                     f"({peak / limit:.0%})")
    lines.append(f"  other    {f['rates']['other']:7.1f}/min (no published limit)")
    throttled = sum(f["throttled"].values())
    lines.append(f"429 answers: {throttled} {f['throttled'] or ''}")
    silent, postback = f["latency"]["silent"], f["latency"]["postback"]
    lines += [f"stock-out -> G2A, silent:        {quantiles(silent)}",
              f"stock-out -> G2A, with postback: {quantiles(postback)}",
              f"not reached G2A by the end:      {f['unresolved']}",
              f"reservations 0.5 s after a silent stock-out refused: {sum(f['reservations'])} of "
              f"{len(f['reservations'])}"]
    sweep = f["last_sweep"] or {}
    lines.append(f"last complete sweep: {sweep.get('last_duration')} s by {sweep.get('mode')}")
    lines += [f"goal {name:<44} {'ok' if met else 'MISSED'}" for name, met in goals(args, f, shares, throttled)]
    return "\n".join(lines)


def goals(args, f, shares, throttled):
    silent_goal = 60 if args.products <= 10_000 else 180
    silent, postback = sorted(f["latency"]["silent"]), sorted(f["latency"]["postback"])
    p95 = lambda xs: xs[max(0, -(-95 * len(xs) // 100) - 1)] if xs else float("inf")  # noqa: E731
    return [("0 x 429", throttled == 0), (f"every class <= {SHARE:.0%} of its limit per window", max(shares) <= SHARE),
            (f"silent stock-out p95 <= {silent_goal} s", p95(silent) <= silent_goal and not f["unresolved"]),
            ("postback stock-out p95 <= 2 s", p95(postback) <= 2.0),
            ("reservations after a silent stock-out refused", all(f["reservations"]))]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--products", type=int, default=10_000, help="mapped products (10000 or 50000)")
    parser.add_argument("--minutes", type=float, default=10.0, help="measured minutes after the first sweep")
    parser.add_argument("--page-size", type=int, default=500, help="the simulator's GET /v3/products page size")
    parser.add_argument("--every", type=float, default=4.0, help="seconds between stock-outs")
    parser.add_argument("--interval", type=float, default=15.0, help="SYNC_INTERVAL_SECONDS")
    parser.add_argument("--drain", type=float, default=240.0, help="seconds to wait for the last stock-outs")
    parser.add_argument("--ignore-updated-since", action="store_true", help="the fake CWS ignores updatedSince")
    args = parser.parse_args(argv)
    with harness.RemoteSimulator(seed, args.products, args.page_size, not args.ignore_updated_since) as remote, \
            tempfile.TemporaryDirectory() as tmp:
        figures = measure(args, remote, Path(tmp))
    print(report(args, figures), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
