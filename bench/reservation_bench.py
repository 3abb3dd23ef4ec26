"""Reservation throughput and p99 at 16 connections, with cached stock, beside a bare Bottle+Waitress+SQLite app.

Usage: .venv/bin/python bench/reservation_bench.py [--seconds 10] [--connections 16]
Uses wrk (Debian package `wrk`) when present; otherwise a Python keep-alive client (slower, same for both).
"""
import argparse
import http.client
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bridge.sim import (CWS_CLIENT_ID, CWS_CLIENT_SECRET, G2A_API_KEY, G2A_API_SECRET,  # noqa: E402
                              Simulator)

CWS_ID, G2A_ID = "466c805b-ead1-4851-bc4f-9eda242550ad", 10000068865001
CLIENT_ID, CLIENT_SECRET = "bench-client", "bench-secret-0123456789abcdef0123"
BODY = json.dumps([{"product_id": G2A_ID, "quantity": 1}])


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_ready(url, proc):
    for _ in range(400):
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            if requests.get(url, timeout=1).status_code == 200:
                return
        except requests.ConnectionError:
            time.sleep(0.05)
    raise SystemExit(f"server at {url} never became ready")


def start_bridge(sim, folder, port):
    (folder / "empty.env").write_text("")
    (folder / "products.json").write_text(json.dumps([{"cws_product_id": CWS_ID, "g2a_product_id": G2A_ID}]))
    env = {"PATH": os.environ["PATH"], "ENV_FILE": str(folder / "empty.env"), "OUR_API_CLIENT_ID": CLIENT_ID,
           "OUR_API_CLIENT_SECRET": CLIENT_SECRET, "CWS_CLIENT_ID": CWS_CLIENT_ID,
           "CWS_CLIENT_SECRET": CWS_CLIENT_SECRET, "CWS_API_BASE_URL": sim.cws_url, "G2A_API_KEY": G2A_API_KEY,
           "G2A_API_SECRET": G2A_API_SECRET, "G2A_API_BASE_URL": sim.g2a_url,
           "DATABASE_URL": f"sqlite:///{folder}/bridge.db", "PRODUCTS_FILE": str(folder / "products.json"),
           "PORT": str(port), "STOCK_MAX_AGE_SECONDS": "3600", "LOG_LEVEL": "WARNING", "WEB_THREADS": "8"}
    proc = subprocess.Popen([sys.executable, "-m", "bridge", "web"], cwd=ROOT, env=env)
    wait_ready(f"http://127.0.0.1:{port}/health", proc)
    token = requests.get(f"http://127.0.0.1:{port}/oauth/token", params={
        "grant_type": "client_credentials", "client_id": CLIENT_ID, "client_secret": CLIENT_SECRET}).json()
    headers = {"Authorization": f"Bearer {token['access_token']}", "Content-Type": "application/json"}
    warm = requests.post(f"http://127.0.0.1:{port}/reservation", data=BODY, headers=headers)
    assert warm.status_code == 200, warm.text
    return proc, headers


def start_bare(folder, port):
    proc = subprocess.Popen([sys.executable, str(ROOT / "bench" / "bare_app.py"), str(port), str(folder / "bare.db")])
    wait_ready(f"http://127.0.0.1:{port}/health", proc)
    return proc, {"Content-Type": "application/json"}


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
            port = free_port()
            proc, headers = starter(port)
            try:
                results[name] = load(port, headers, args.seconds, args.connections, folder)
            finally:
                proc.terminate()
                proc.wait()
    print(f"load: {load.__name__[4:]}, {args.connections} connections, {args.seconds}s each, cached stock")
    for name, (rate, p99, errors) in results.items():
        print(f"{name:32} {rate:8.0f} req/s   p99 {p99:7.1f} ms   non-2xx {errors}")
    bridge, bare = (results[name][0] for name in results)
    print(f"bridge / bare = {bridge / bare:.0%}  (goal >= 60%)")


if __name__ == "__main__":
    main()
