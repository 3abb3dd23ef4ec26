"""The bundled simulator: a fake CodesWholesale API and a fake G2A Sales API on loopback.

Shares no code with the real clients (so it cannot share their bugs); `main` is `python -m bridge simulate`.
"""
import argparse
import ipaddress
import signal
import sys
import threading

from .cws import CWS_CLIENT_ID, CWS_CLIENT_SECRET, CWS_CLIENT_SIGNATURE, FakeCws
from .g2a import G2A_API_KEY, G2A_API_SECRET, FakeG2a
from .server import serve, shut

__all__ = ["CWS_CLIENT_ID", "CWS_CLIENT_SECRET", "CWS_CLIENT_SIGNATURE", "G2A_API_KEY", "G2A_API_SECRET",
           "DEMO_PRODUCTS", "FakeCws", "FakeG2a", "Simulator", "main"]

DEMO_PRODUCTS = [
    # (CWS product id, G2A product id, name, stock, CWS price bands, G2A price limits)
    ("466c805b-ead1-4851-bc4f-9eda242550ad", "10000068865001", "1-2-Switch", 25,
     [(1, 9, "5.30"), (10, 99, "5.15"), (100, None, "4.98")], ("0.50", "100.00")),
    ("067ccfe1-655a-4a1f-8362-c655bb9bbf95", "10000068865002", "Cities: Skylines", 8,
     [(1, None, "5.02")], ("1.00", "60.00")),
]


class Simulator:
    """Both fakes on their own loopback ports; tests drive them through `cws` and `g2a`.

    Use as `with Simulator() as sim:` or call start()/stop(); port 0 picks a free port.
    """

    def __init__(self, cws_port=0, g2a_port=0, host="127.0.0.1"):
        if not _is_loopback(host):
            raise ValueError(f"the simulator binds to loopback only, not {host!r}")
        self.cws, self.g2a = FakeCws(), FakeG2a()
        self.host, self._ports = host, (cws_port, g2a_port)
        self.cws_url = self.g2a_url = ""
        self._servers = []

    def start(self):
        cws_server, self.cws_url = serve(self.cws, self.host, self._ports[0])
        self._servers.append(cws_server)
        g2a_server, self.g2a_url = serve(self.g2a, self.host, self._ports[1])
        self._servers.append(g2a_server)
        return self

    def stop(self):
        while self._servers:
            shut(self._servers.pop())

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc_info):
        self.stop()

    def seed_demo(self):
        """The two products of the OPERATOR.md products.json example, and their inactive G2A offers."""
        for cws_id, g2a_id, name, stock, bands, (low, high) in DEMO_PRODUCTS:
            self.cws.add_product(cws_id, stock, bands, name=name)
            self.g2a.add_offer(g2a_id, price="9.99", stock=0, active=False)
            self.g2a.set_price_limit(g2a_id, low, high)


def _is_loopback(host):
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _parser():
    parser = argparse.ArgumentParser(
        prog="python -m bridge simulate",
        description="Run the fake CWS and fake G2A Sales API on loopback until Ctrl-C.",
        epilog="example: python -m bridge simulate --cws-port 8081 --g2a-port 8082")
    parser.add_argument("--cws-port", type=int, default=8081, help="fake CWS port (0 = any free port)")
    parser.add_argument("--g2a-port", type=int, default=8082, help="fake G2A port (0 = any free port)")
    parser.add_argument("--host", default="127.0.0.1", help="loopback address to bind")
    return parser


def _banner(sim):
    return "\n".join([
        f"fake CWS: {sim.cws_url}  (control: POST {sim.cws_url}/_sim/products/ID, /_sim/fulfilment/ID)",
        f"fake G2A: {sim.g2a_url}",
        f"CWS_API_BASE_URL={sim.cws_url}", f"CWS_CLIENT_ID={CWS_CLIENT_ID}",
        f"CWS_CLIENT_SECRET='{CWS_CLIENT_SECRET}'", f"CWS_CLIENT_SIGNATURE={CWS_CLIENT_SIGNATURE}",
        f"G2A_API_BASE_URL={sim.g2a_url}", f"G2A_API_KEY={G2A_API_KEY}", f"G2A_API_SECRET={G2A_API_SECRET}",
        "Ctrl-C stops.",
    ])


def main(argv=None):
    try:
        args = _parser().parse_args(argv)
        sim = Simulator(args.cws_port, args.g2a_port, args.host)
    except SystemExit as exit:
        return exit.code
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    try:
        sim.start()
    except OSError as error:
        sim.stop()
        print(f"error: cannot listen: {error}", file=sys.stderr)
        return 1
    sim.seed_demo()
    print(_banner(sim), flush=True)
    while not stop.wait(0.5):
        pass
    sim.stop()
    return 0
