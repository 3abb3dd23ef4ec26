"""Reservation throughput and p99 at 16 connections, with cached stock, beside a bare Bottle+Waitress+SQLite app.

Usage: .venv/bin/python bench/reservation_bench.py [--seconds 10] [--connections 16]
Uses wrk (Debian package `wrk`) when present; otherwise a Python keep-alive client (slower, same for both).
"""
import argparse
import json
import tempfile
from pathlib import Path

import requests

import harness
import load
from harness import Simulator

CWS_ID, G2A_ID = "466c805b-ead1-4851-bc4f-9eda242550ad", 10000068865001
BODY = json.dumps([{"product_id": G2A_ID, "quantity": 1}])


def start_bridge(sim, folder, port):
    (folder / "products.json").write_text(json.dumps([{"cws_product_id": CWS_ID, "g2a_product_id": G2A_ID}]))
    proc = harness.start("web", harness.bridge_env(sim, folder, port, STOCK_MAX_AGE_SECONDS=3600), folder)
    base = f"http://127.0.0.1:{port}"
    harness.wait_ready(base, proc)
    headers = {"Authorization": f"Bearer {harness.access_token(base)}", "Content-Type": "application/json"}
    warm = requests.post(f"{base}/reservation", data=BODY, headers=headers)
    assert warm.status_code == 200, warm.text
    return proc, headers


def start_bare(folder, port):
    return harness.start_bare(port, folder / "bare.db"), {"Content-Type": "application/json"}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=16)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, Simulator() as sim:
        folder = Path(tmp)
        sim.cws.add_product(CWS_ID, 10**9, [(1, None, "5.30")], name="bench")
        results = {}
        for name, starter in (("bridge POST /reservation", lambda p: start_bridge(sim, folder, p)),
                              ("bare bottle+waitress+1 insert", lambda p: start_bare(folder, p))):
            port = harness.free_port()
            proc, headers = starter(port)
            try:
                results[name] = load.hammer(port, "POST", "/reservation", headers, BODY, args.seconds,
                                            args.connections, folder)
            finally:
                harness.stop({name: proc})
    print(f"load: {load.tool()}, {args.connections} connections, {args.seconds}s each, cached stock")
    for name, (rate, p99, errors) in results.items():
        print(f"{name:32} {rate:8.0f} req/s   p99 {p99:7.1f} ms   non-2xx {errors}")
    bridge, bare = (results[name][0] for name in results)
    print(f"bridge / bare = {bridge / bare:.0%}  (goal >= 60%)")


if __name__ == "__main__":
    main()
