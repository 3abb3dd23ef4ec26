"""Reservation throughput and p99 with cached stock, beside a bare Bottle+Waitress+SQLite app, at one or more
connection counts; with the server process's CPU and context switches per request (from /proc), which show
whether a gap is per-request work (there at 1 connection) or appears only under concurrency.

Usage: .venv/bin/python bench/reservation_bench.py [--seconds 10] [--connections 16] [--products 1]
                                                   [--insert sqlite3|peewee] [--rounds 3] [--ttl-minutes 30]
`--connections 1,4,16` runs each count in turn (same processes); at each count the bridge and the bare app are
measured in turn `--rounds` times and the medians printed, with the ratio of each round (a shared machine's load
drifts by more than the gap measured); `--products 50` spreads the reservations over
50 products (the stock sum each one reads grows with every reservation held of its product). Nothing here
orders or releases, so at the deployed 30-minute lifetime every reservation stays held: at ~1,200/s over 50
products that is ~1,400 live holds per product after a minute, and the bridge's exact stock sum costs ~50 µs more
per 1,000 of them. `--ttl-minutes 0.05` lets them expire after 3 s, which keeps ~70 live holds per product, about
what a busy store's abandoned checkouts hold over 30 minutes.
Uses wrk (Debian package `wrk`) when present; otherwise a Python keep-alive client (slower, same for both).
"""
import argparse
import json
import statistics
import tempfile
import uuid
from collections import defaultdict
from pathlib import Path

import requests

import harness
import load
from harness import Simulator

FIRST_G2A_ID = 10000068865001


def start_bridge(sim, folder, port, bodies, ttl_minutes):
    proc = harness.start("web", harness.bridge_env(sim, folder, port, STOCK_MAX_AGE_SECONDS=3600,
                                                   RESERVATION_TTL_MINUTES=ttl_minutes), folder)
    base = f"http://127.0.0.1:{port}"
    harness.wait_ready(base, proc)
    headers = {"Authorization": f"Bearer {harness.access_token(base)}", "Content-Type": "application/json"}
    for body in bodies:  # every product's CWS state read once: the runs find it cached
        warm = requests.post(f"{base}/reservation", data=body, headers=headers)
        assert warm.status_code == 200, warm.text
    return proc, headers


def start_bare(folder, port, insert):
    return harness.start_bare(port, folder / "bare.db", insert), {"Content-Type": "application/json"}


def products(sim, folder, count):
    """`count` mapped products with plenty of CWS stock; a one-line reservation body for each."""
    ids = {FIRST_G2A_ID + n: str(uuid.uuid4()) for n in range(count)}
    for cws_id in ids.values():
        sim.cws.add_product(cws_id, 10**9, [(1, None, "5.30")], name="bench")
    (folder / "products.json").write_text(json.dumps([{"cws_product_id": cws, "g2a_product_id": g2a}
                                                      for g2a, cws in ids.items()]))
    return [json.dumps([{"product_id": g2a_id, "quantity": 1}]) for g2a_id in ids]


def measured(proc, port, headers, bodies, args, connections, folder):
    """(req/s, p99 ms, non-2xx, CPU µs, voluntary and involuntary context switches per request of `proc`)."""
    before = harness.usage(proc.pid)
    rate, p99, errors = load.hammer(port, "POST", "/reservation", headers, bodies, args.seconds, connections, folder)
    after = harness.usage(proc.pid)
    done = max(1.0, rate * args.seconds)
    cpu, voluntary, involuntary = ((later - earlier) / done for later, earlier in zip(after, before))
    return rate, p99, errors, cpu * 1e6, voluntary, involuntary


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=10, help="per measurement")
    parser.add_argument("--connections", default="16", help="one count, or several: 1,4,16")
    parser.add_argument("--products", type=int, default=1)
    parser.add_argument("--insert", choices=("sqlite3", "peewee"), default="sqlite3", help="the bare app's insert")
    parser.add_argument("--ttl-minutes", type=float, default=30.0,
                        help="the bridge's RESERVATION_TTL_MINUTES (default 30, as deployed)")
    parser.add_argument("--rounds", type=int, default=3, help="bridge and bare app measured in turn, this many times")
    args = parser.parse_args()
    counts = [int(count) for count in args.connections.split(",")]
    results = defaultdict(list)
    with tempfile.TemporaryDirectory() as tmp, Simulator() as sim:
        folder = Path(tmp)
        (folder / "empty.env").write_text("")
        bodies = products(sim, folder, args.products)
        servers = {}
        try:
            starters = (("bridge POST /reservation", lambda p: start_bridge(sim, folder, p, bodies, args.ttl_minutes)),
                        (f"bare app, 1 {args.insert} insert", lambda p: start_bare(folder, p, args.insert)))
            for name, starter in starters:
                port = harness.free_port()
                proc, headers = starter(port)
                servers[name] = proc, port, headers
                # every Waitress thread opens its database connection before anything is measured
                load.hammer(port, "POST", "/reservation", headers, bodies, 1, max(counts), folder)
            for count in counts:
                for _ in range(args.rounds):  # in turn, so that a machine getting busier or quieter hits both
                    for name, (proc, port, headers) in servers.items():
                        results[name, count].append(measured(proc, port, headers, bodies, args, count, folder))
        finally:
            harness.stop({name: proc for name, (proc, _, _) in servers.items()})
    report(results, counts, args)


def report(results, counts, args):
    print(f"load: {load.tool()}, {args.rounds} rounds of {args.seconds}s each, cached stock, {args.products} "
          f"product(s); medians of the rounds")
    for (name, count), rounds in results.items():
        rate, p99, errors, cpu, voluntary, involuntary = (statistics.median(column) for column in zip(*rounds))
        print(f"{name:30} {count:3} conn {rate:7.0f} req/s  p99 {p99:7.1f} ms  non-2xx {errors:.0f}  CPU {cpu:4.0f} "
              f"µs/req  switches/req {voluntary:5.1f} voluntary {involuntary:4.1f} involuntary")
    for count in counts:
        bridge, bare = ([measurement[0] for measurement in rounds]
                        for (name, at), rounds in results.items() if at == count)
        ratios = [ours / theirs for ours, theirs in zip(bridge, bare)]
        print(f"{count:3} connections: bridge / bare = {statistics.median(ratios):.0%} "
              f"(rounds in order: {', '.join(f'{ratio:.0%}' for ratio in ratios)})")


if __name__ == "__main__":
    main()
