"""Reservation throughput and p99 at 16 connections, with cached stock, beside a bare Bottle+Waitress+SQLite app.

Usage: .venv/bin/python bench/reservation_bench.py [--seconds 10] [--connections 16]
Uses wrk (Debian package `wrk`) when present; otherwise a Python keep-alive client (slower, same for both).
"""
import argparse
import http.client
import json
import re
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import requests

import harness
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


def run_wrk(port, headers, seconds, connections, folder):
    script = folder / "post.lua"
    lines = ['wrk.method = "POST"', f"wrk.body = {json.dumps(BODY)}"]
    lines += [f'wrk.headers["{k}"] = "{v}"' for k, v in headers.items()]
    script.write_text("\n".join(lines) + "\n")
    out = subprocess.run(["wrk", "-t", str(min(2, connections)), "-c", str(connections), "-d", f"{seconds}s", "--latency", "-s",
                          str(script), f"http://127.0.0.1:{port}/reservation"], capture_output=True, text=True).stdout
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    p99 = _ms(re.search(r"99%\s+([\d.]+\w+)", out).group(1))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return rate, p99, int(non2xx.group(1)) if non2xx else 0


def _ms(text):
    value, unit = re.match(r"([\d.]+)(\w+)", text).groups()
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}[unit]


def run_python(port, headers, seconds, connections, folder):
    latencies, errors, stop_at = [], [0], time.monotonic() + seconds

    def client():
        conn = http.client.HTTPConnection("127.0.0.1", port)
        while time.monotonic() < stop_at:
            started = time.perf_counter()
            conn.request("POST", "/reservation", BODY, headers)
            answer = conn.getresponse()
            answer.read()
            latencies.append(time.perf_counter() - started)
            errors[0] += answer.status != 200
    threads = [threading.Thread(target=client) for _ in range(connections)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    p99 = statistics.quantiles(latencies, n=100)[98] * 1000
    return len(latencies) / seconds, p99, errors[0]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=16)
    args = parser.parse_args()
    load = run_wrk if shutil.which("wrk") else run_python
    with tempfile.TemporaryDirectory() as tmp, Simulator() as sim:
        folder = Path(tmp)
        sim.cws.add_product(CWS_ID, 10**9, [(1, None, "5.30")], name="bench")
        results = {}
        for name, starter in (("bridge POST /reservation", lambda p: start_bridge(sim, folder, p)),
                              ("bare bottle+waitress+1 insert", lambda p: start_bare(folder, p))):
            port = harness.free_port()
            proc, headers = starter(port)
            try:
                results[name] = load(port, headers, args.seconds, args.connections, folder)
            finally:
                harness.stop({name: proc})
    print(f"load: {load.__name__[4:]}, {args.connections} connections, {args.seconds}s each, cached stock")
    for name, (rate, p99, errors) in results.items():
        print(f"{name:32} {rate:8.0f} req/s   p99 {p99:7.1f} ms   non-2xx {errors}")
    bridge, bare = (results[name][0] for name in results)
    print(f"bridge / bare = {bridge / bare:.0%}  (goal >= 60%)")


if __name__ == "__main__":
    main()
