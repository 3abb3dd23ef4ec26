"""`./scripts/demo`: the whole bridge on loopback against the simulator, playing G2A once, step by step.

Starts the fake CWS + G2A in this process and the real `web` and `worker` as child processes on a
throwaway SQLite file; `--serve` keeps everything up and prints what to try with curl.
"""
import argparse
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

from .sim import (CWS_CLIENT_ID, CWS_CLIENT_SECRET, CWS_CLIENT_SIGNATURE, DEMO_PRODUCTS, G2A_API_KEY,
                        G2A_API_SECRET, Simulator)

ROOT = Path(__file__).resolve().parent.parent
SWITCH_CWS, SWITCH_G2A = DEMO_PRODUCTS[0][0], int(DEMO_PRODUCTS[0][1])
SERVE_ORDER = 80201000000003  # the G2A order id of the curl lines --serve prints (the walkthrough used 1 and 2)
SKYLINES_CWS, SKYLINES_G2A = DEMO_PRODUCTS[1][0], int(DEMO_PRODUCTS[1][1])


class DemoFailed(Exception):
    """A step did not do what the demo promises."""


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def say(step, text):
    print(f"[{step}] {text}", flush=True)


class Bridge:
    """The web and worker processes of a throwaway bridge pointed at the simulator."""

    def __init__(self, sim, folder):
        self.folder, self.port = folder, free_port()
        self.client_id, self.client_secret = "demo-" + secrets.token_hex(4), secrets.token_urlsafe(24)
        (folder / "products.json").write_text(json.dumps({"products": [
            {"cws_product_id": cws_id, "g2a_product_id": int(g2a_id)} for cws_id, g2a_id, *_ in DEMO_PRODUCTS]}))
        (folder / "empty.env").write_text("")
        self.env = {
            "PATH": os.environ.get("PATH", ""), "ENV_FILE": str(folder / "empty.env"),
            "OUR_API_CLIENT_ID": self.client_id, "OUR_API_CLIENT_SECRET": self.client_secret,
            "CWS_CLIENT_ID": CWS_CLIENT_ID, "CWS_CLIENT_SECRET": CWS_CLIENT_SECRET,
            "CWS_CLIENT_SIGNATURE": CWS_CLIENT_SIGNATURE, "CWS_API_BASE_URL": sim.cws_url,
            "G2A_API_KEY": G2A_API_KEY, "G2A_API_SECRET": G2A_API_SECRET, "G2A_API_BASE_URL": sim.g2a_url,
            "DATABASE_URL": f"sqlite:///{folder}/bridge.db", "PRODUCTS_FILE": str(folder / "products.json"),
            "PORT": str(self.port), "SYNC_INTERVAL_SECONDS": "2", "ORDER_INLINE_WAIT_SECONDS": "2",
            "LOG_LEVEL": "WARNING",
        }
        self.base = f"http://127.0.0.1:{self.port}"
        self.processes = []
        self.http = requests.Session()

    def start(self):
        for command in ("web", "worker"):
            log = open(self.folder / f"{command}.log", "ab")
            self.processes.append(subprocess.Popen([sys.executable, "-m", "bridge", command], cwd=ROOT,
                                                   env=self.env, stdout=log, stderr=subprocess.STDOUT))
        wait_until(lambda: self._healthy(), 20, "the web server did not come up (see web.log)")

    def _healthy(self):
        if any(p.poll() is not None for p in self.processes):
            raise DemoFailed(f"a bridge process exited early:\n{self.logs()}")
        try:
            return self.http.get(f"{self.base}/health", timeout=1).status_code == 200
        except requests.ConnectionError:
            return False

    def logs(self):
        return "\n".join((self.folder / f"{c}.log").read_text(errors="replace")[-2000:] for c in ("web", "worker")
                         if (self.folder / f"{c}.log").exists())

    def stop(self):
        for process in self.processes:
            process.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(12)
            except subprocess.TimeoutExpired:
                process.kill()

    def call(self, method, path, body=None, token=None):
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        answer = self.http.request(method, self.base + path, json=body, headers=headers, timeout=15)
        return answer.status_code, (answer.json() if answer.content else None)


def wait_until(check, seconds, failure):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return time.monotonic()
        time.sleep(0.1)
    raise DemoFailed(failure)


def expect(status, wanted, body, what):
    if status not in wanted:
        raise DemoFailed(f"{what}: expected HTTP {'/'.join(map(str, wanted))}, got {status} {body}")


def play(sim, bridge):
    """G2A's side of a sale, twice (instant and delayed CWS fulfilment), plus a price change reaching G2A."""
    status, body = bridge.call("GET", f"/oauth/token?grant_type=client_credentials&client_id={bridge.client_id}"
                                      f"&client_secret={bridge.client_secret}")
    expect(status, (200,), body, "token")
    token = body["access_token"]
    say(1, f"G2A got an access token (expires in {body['expires_in']} s)")

    wait_until(lambda: sim.g2a.offer_for_product(str(SWITCH_G2A))["active"], 20, "sync never activated the offer")
    offer = sim.g2a.offer_for_product(str(SWITCH_G2A))
    say(2, f"sync activated the G2A offer for 1-2-Switch: price {offer['price']} EUR, stock {offer['inventory']['size']}"
           " (CWS 5.30 + 0.50 profit, grossed up for G2A's 15 % fee)")

    status, body = bridge.call("POST", "/reservation", [{"product_id": SWITCH_G2A, "quantity": 1}], token)
    expect(status, (200,), body, "reservation")
    say(3, f"buyer checks out: reservation {body['reservation_id']} holds 1 key, "
           f"{body['stock'][0]['inventory_size']} left")

    status, order = bridge.call("POST", "/order", {"reservation_id": body["reservation_id"],
                                                   "g2a_order_id": 80201000000001}, token)
    expect(status, (200,), order, "instant order")
    key = order["stock"][0]["inventory"][0]
    say(4, f"buyer paid: bridge bought from CWS and answered 200 with key {key['value']} (item {key['id']})")

    status, inventory = bridge.call("GET", f"/order/{order['order_id']}/inventory", token=token)
    expect(status, (200,), inventory, "inventory")
    say(5, f"G2A fetched the inventory again: same key, same id ({inventory[0]['inventory'][0]['id'] == key['id']})")

    sim.cws.set_prices(SWITCH_CWS, [(1, None, "6.10")])
    sim.cws.send_postback(f"{bridge.base}/cws/postback",
                          sim.cws.postback("STOCK", products=[sim.cws.stock_entry(SWITCH_CWS)]))
    started = time.monotonic()
    wait_until(lambda: sim.g2a.offer_for_product(str(SWITCH_G2A))["price"] == "7.77", 20,
               "the CWS price change never reached G2A")
    say(6, f"CWS raised its price to 6.10: G2A's offer followed to 7.77 EUR in {time.monotonic() - started:.1f} s")

    sim.cws.set_fulfilment(SKYLINES_CWS, "delayed", polls=10_000)  # completed by hand below
    status, body = bridge.call("POST", "/reservation", [{"product_id": SKYLINES_G2A, "quantity": 1}], token)
    expect(status, (200,), body, "second reservation")
    status, order = bridge.call("POST", "/order", {"reservation_id": body["reservation_id"],
                                                   "g2a_order_id": 80201000000002}, token)
    expect(status, (202,), order, "delayed order")
    say(7, "a second order hit a slow CWS: the bridge answered 202 and keeps polling CWS")
    [cws_order] = sim.cws.orders_for_client_id("g2a-80201000000002")
    sim.cws.complete_order(cws_order["orderId"])
    started = time.monotonic()

    def delivered():
        code, inventory = bridge.call("GET", f"/order/{order['order_id']}/inventory", token=token)
        return code == 200 and inventory[0]["inventory"]
    wait_until(delivered, 30, "the delayed order's keys never appeared")
    say(8, f"CWS completed the order: its key appeared in G2A's inventory {time.monotonic() - started:.1f} s later")


def serve_forever(bridge, sim):
    print(f"""
Everything is up. Ctrl-C stops it.
  bridge (G2A calls this):   {bridge.base}
  credentials for G2A:       client_id={bridge.client_id} client_secret={bridge.client_secret}
  fake CWS / fake G2A:       {sim.cws_url} / {sim.g2a_url}
Try (G2A's side: a token, a reservation, the order, its inventory; then CWS selling out):
  TOKEN=$(curl -s "{bridge.base}/oauth/token?grant_type=client_credentials&client_id={bridge.client_id}&client_secret={bridge.client_secret}" | python3 -c 'import json,sys; print(json.load(sys.stdin)["access_token"])')
  RESERVATION=$(curl -s -X POST {bridge.base}/reservation -H "Authorization: Bearer $TOKEN" -H 'Content-Type: application/json' -d '[{{"product_id": {SWITCH_G2A}, "quantity": 1}}]' | python3 -c 'import json,sys; print(json.load(sys.stdin)["reservation_id"])')
  curl -s -X POST {bridge.base}/order -H "Authorization: Bearer $TOKEN" -H 'Content-Type: application/json' -d '{{"reservation_id": "'$RESERVATION'", "g2a_order_id": {SERVE_ORDER}}}'
  curl -s {bridge.base}/order/{SERVE_ORDER}/inventory -H "Authorization: Bearer $TOKEN"   # the key again (G2A's order id works)
  curl -s -X POST {sim.cws_url}/_sim/products/{SWITCH_CWS} -d '{{"quantity": 0}}'   # CWS sells out: the offer goes inactive
(each new order needs a new g2a_order_id)
""", flush=True)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    stop.wait()


def main(argv=None):
    parser = argparse.ArgumentParser(prog="./scripts/demo", description="Run the bridge against the simulator "
                                     "and play G2A once.", epilog="example: ./scripts/demo --serve")
    parser.add_argument("--serve", action="store_true", help="keep everything running and print curl lines")
    args = parser.parse_args(argv)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="g2a-bridge-demo-") as tmp, Simulator() as sim:
        sim.seed_demo()
        bridge = Bridge(sim, Path(tmp))
        try:
            bridge.start()
            say(0, f"simulator, web ({bridge.base}) and worker are up")
            play(sim, bridge)
            if args.serve:
                serve_forever(bridge, sim)
        except DemoFailed as failure:
            print(f"demo failed: {failure}", file=sys.stderr)
            return 1
        finally:
            bridge.stop()
    print(f"demo finished in {time.monotonic() - started:.0f} s: every step worked.")
    return 0
