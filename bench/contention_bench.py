"""Contention on one SQLite file: web alone, two webs, each with the worker sweeping 10,000 products, and the
bridge's cheapest routes beside a bare Bottle+Waitress app with the same durability (WAL, synchronous=FULL).

One run, one database, one simulator (its own process; a quarter of the bulk CWS quantities change twice a
second, so the worker's sweep upserts the catalogue and writes offers all the time: at 10,000 products a sweep,
paced by the G2A write budget, takes minutes, so a busy phase starts once the worker is sweeping). The mixed phases use concurrency_bench's
G2A clients (reserve, then order / release / renew / keep) at --connections keep-alive connections, spread over
the web processes; then wrk (or Python clients) on single routes with the worker stopped. Printed: each phase's
throughput, the CWS reads the worker made during it, p50/p99 per call, "database is locked" and 5xx counts, and the same-run ratios against the goals.

Usage: .venv/bin/python bench/contention_bench.py [--products 10000] [--seconds 15] [--connections 16]
"""
import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import requests
from prometheus_client.parser import text_string_to_metric_families

import concurrency_bench as mix
import harness
import load

SWEEPING = 2  # CWS reads after which a freshly started worker counts as sweeping (its first pages)
PHASES = (("one web", 1, False), ("two webs", 2, False), ("one web + busy worker", 1, True),
          ("two webs + busy worker", 2, True))


class Bench:
    """The processes of one run and the figures of each phase."""

    def __init__(self, sim, folder, products, args):
        self.sim, self.folder, self.products, self.args = sim, folder, products, args
        self.ports = [harness.free_port(), harness.free_port()]
        # The webs log at WARNING like reservation_bench (an access line per call is not what is compared here);
        # the worker at INFO, for its sync pass lines.
        self.envs = [{**mix.environment(sim, folder, port, args), "LOG_LEVEL": "WARNING"} for port in self.ports]
        self.worker_env = mix.environment(sim, folder, self.ports[0], args)
        self.procs, self.mixed, self.single = {}, {}, {}

    def base(self, web):
        return f"http://127.0.0.1:{self.ports[web]}"

    def webs(self, count):
        """Exactly `count` web processes running (web0, web1), ready."""
        for web in range(2):
            name = f"web{web}"
            if web < count and name not in self.procs:
                self.procs[name] = harness.start("web", self.envs[web], self.folder, name)
                harness.wait_ready(self.base(web), self.procs[name])
            elif web >= count and name in self.procs:
                harness.stop({name: self.procs.pop(name)})

    def worker(self, running):
        if running and "worker" not in self.procs:
            reads = self.cws_reads()
            self.procs["worker"] = harness.start("worker", self.worker_env, self.folder)
            harness.wait_until(lambda: self.cws_reads() > reads + SWEEPING, 300, "the worker's sweep")
        elif not running and "worker" in self.procs:
            harness.stop({"worker": self.procs.pop("worker")})

    def log(self, name):
        path = self.folder / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def cws_reads(self):
        """CWS product-list and single-product requests so far (the simulator counts them)."""
        requests = self.sim.control("GET", "limits")["requests"]
        return requests.get("list", 0) + requests.get("product", 0)

    def rereads(self, webs):
        """(count, seconds) of the single-product CWS reads the running webs made for reservations so far: a
        reservation of a product whose state is older than STOCK_MAX_AGE_SECONDS waits for one (up to 2 s)."""
        count = seconds = 0.0
        for web in range(webs):
            text = requests.get(f"{self.base(web)}/metrics", timeout=30).text  # direct from loopback: no token
            for family in text_string_to_metric_families(text):
                for sample in family.samples:
                    if sample.labels.get("endpoint") == "/v3/products/{id}" and sample.labels.get("process") == "web":
                        count += sample.value if sample.name.endswith("_duration_seconds_count") else 0
                        seconds += sample.value if sample.name.endswith("_duration_seconds_sum") else 0
        return count, seconds

    def mixed_phase(self, name, webs, worker, token):
        self.webs(webs)
        self.worker(worker)
        before, rereads = self.cws_reads(), self.rereads(webs)
        ledger, elapsed = mix.load(self.ports[:webs], token, self.products, self.args)
        count, seconds = (after - earlier for after, earlier in zip(self.rereads(webs), rereads))
        self.mixed[name] = {**figures(ledger, elapsed, self.cws_reads() - before),
                            "rereads": count, "reread_ms": seconds / count * 1000 if count else 0.0}

    def single_routes(self, token):
        """/healthcheck and POST /reservation on one web (worker stopped) and the same on the bare app."""
        self.worker(False)
        self.webs(1)
        # Spread over the hot products, as G2A's buyers are: every reservation of a product adds to the stock
        # sum its next one reads (until ordered, released or expired), which the bare app has no equivalent of.
        body = [json.dumps([{"product_id": g2a_id, "quantity": 1}]) for g2a_id, _, _ in self.products.hot]
        bearer = {"Authorization": f"Bearer {token}"}
        as_json = {"Content-Type": "application/json"}
        self.single["bridge GET /healthcheck"] = self.hammer(self.ports[0], "GET", "/healthcheck", bearer, None)
        self.single["bridge POST /reservation"] = self.hammer(self.ports[0], "POST", "/reservation",
                                                              {**bearer, **as_json}, body)
        self.webs(0)
        for insert in ("sqlite3", "peewee"):
            port = harness.free_port()
            self.procs["bare"] = harness.start_bare(port, self.folder / f"bare-{insert}.db", insert)
            if insert == "sqlite3":
                self.single["bare GET /health"] = self.hammer(port, "GET", "/health", {}, None)
            self.single[f"bare POST /reservation ({insert})"] = self.hammer(port, "POST", "/reservation", as_json,
                                                                           body)
            harness.stop({"bare": self.procs.pop("bare")})

    def hammer(self, port, method, path, headers, body):
        return load.hammer(port, method, path, headers, body, self.args.single_seconds, self.args.connections,
                           self.folder)

    def locked(self):
        return sum(self.log(name).count("database is locked") for name in ("web0", "web1", "worker"))


def figures(ledger, elapsed, reads):
    by_call = {}
    for endpoint, status, seconds in ledger.calls:
        by_call.setdefault(endpoint, []).append(seconds)
    return {"rate": len(ledger.calls) / elapsed, "reads": reads,
            "5xx": sum(1 for _, status, _ in ledger.calls if status >= 500),
            "p50": {call: mix.ms(seconds, .5) for call, seconds in by_call.items()},
            "p99": {call: mix.ms(seconds, .99) for call, seconds in by_call.items()}}


def report(bench):
    print(f"\n{'mixed phase':26} {'calls/s':>8} {'CWS reads':>9} {'5xx':>4}  {'reserve p50/p99 ms':>19}"
          f"  {'order p50/p99 ms':>17}  {'web re-reads (mean ms)':>22}")
    for name, f in bench.mixed.items():
        print(f"{name:26} {f['rate']:8.0f} {f['reads']:9} {f['5xx']:4}  "
              f"{f['p50']['POST /reservation']:8.1f} /{f['p99']['POST /reservation']:8.1f}  "
              f"{f['p50'].get('POST /order', 0):7.1f} /{f['p99'].get('POST /order', 0):7.1f}  "
              f"{f['rereads']:13.0f} ({f['reread_ms']:5.1f})")
    print(f"\n{'single route (' + load.tool() + ')':38} {'req/s':>8} {'p99 ms':>8} {'non-2xx':>8}")
    for name, (rate, p99, non2xx) in bench.single.items():
        print(f"{name:38} {rate:8.0f} {p99:8.1f} {non2xx:8}")
    checks = goals(bench.mixed, bench.single, bench.locked())
    print()
    for text, ok in checks:
        print(f"{'ok  ' if ok else 'MISS'} {text}")
    return all(ok for _, ok in checks)


def goals(mixed, single, locked):
    """[(line, met)]: the issue's goals as same-run ratios."""
    def p99(phase, call="POST /reservation"):
        return mixed[phase]["p99"].get(call, 0.0)
    busy = p99("one web + busy worker") / p99("one web")
    two = p99("two webs") / p99("one web")
    two_busy = p99("two webs + busy worker") / p99("one web + busy worker")
    health = single["bridge GET /healthcheck"][0] / single["bare GET /health"][0]
    reserve = single["bridge POST /reservation"][0] / single["bare POST /reservation (sqlite3)"][0]
    reserve_peewee = single["bridge POST /reservation"][0] / single["bare POST /reservation (peewee)"][0]
    fives = sum(f["5xx"] for f in mixed.values()) + sum(non2xx for _, _, non2xx in single.values())
    return [
        (f"busy worker: reservation p99 {busy:.2f}x web alone (goal <= 3)", busy <= 3),
        (f"busy worker: order p99 {p99('one web + busy worker', 'POST /order'):.0f} ms (goal <= 250)",
         p99("one web + busy worker", "POST /order") <= 250),
        (f"two webs: reservation p99 {two:.2f}x one web (goal <= 2); with the worker busy {two_busy:.2f}x",
         two <= 2 and two_busy <= 2),
        (f"two webs: throughput {mixed['two webs']['rate'] / mixed['one web']['rate']:.2f}x one web, with the "
         f"worker busy {mixed['two webs + busy worker']['rate'] / mixed['one web + busy worker']['rate']:.2f}x "
         f"(goal >= 1)", mixed["two webs"]["rate"] >= mixed["one web"]["rate"]
         and mixed["two webs + busy worker"]["rate"] >= mixed["one web + busy worker"]["rate"]),
        (f"/healthcheck {health:.2f}x bare /health (goal >= 0.8)", health >= 0.8),
        (f"POST /reservation {reserve_peewee:.2f}x the bare app's peewee insert, the yardstick issue 14 names "
         f"(goal >= 0.85); {reserve:.2f}x its sqlite3 insert", reserve_peewee >= 0.85),
        (f'"database is locked" {locked}, 5xx or non-2xx on single routes {fives} (goal 0)', not locked and not fives),
    ]


def run(products, sim, folder, args):
    bench = Bench(sim, folder, products, args)
    try:
        bench.worker(True)  # the catalogue and G2A's offers are discovered before any phase
        bench.worker(False)
        bench.webs(1)
        token = harness.access_token(bench.base(0))
        for name, webs, worker in PHASES:
            started = time.monotonic()
            bench.mixed_phase(name, webs, worker, token)
            print(f"{name}: done in {time.monotonic() - started:.0f} s", flush=True)
        bench.single_routes(token)
    finally:
        harness.stop(bench.procs)
    return 0 if report(bench) else 1


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--products", type=int, default=10_000, help="bulk products the sync churns (default 10000)")
    parser.add_argument("--seconds", type=int, default=15, help="length of each mixed phase (default 15)")
    parser.add_argument("--single-seconds", type=int, default=8, help="length of each single-route run (default 8)")
    parser.add_argument("--connections", type=int, default=16, help="keep-alive connections (default 16)")
    args = parser.parse_args(argv)
    # What concurrency_bench's clients and environment read, at its defaults.
    args.clients, args.hot, args.scarce, args.scarce_stock = args.connections, 50, 5, 20
    args.churn, args.sync_interval, args.writes_per_pass = 0.25, 5, 100
    products = mix.Products(args.products, args.hot, args.scarce, args.scarce_stock)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        spec = products.write(folder, args.churn)
        with harness.RemoteSimulator(mix.seed, spec) as sim:
            return run(products, sim, folder, args)


if __name__ == "__main__":
    sys.exit(main())
