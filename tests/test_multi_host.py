"""More than one machine, as README "Running on more than one machine" sets it up: two web processes and two
workers on one PostgreSQL database, sharing BRIDGE_SECRET_KEY. No oversell across webs, one CWS purchase per
order whichever web took it, keys readable from either web, and the standby worker finishing what the active
one left when it is killed; a host with another BRIDGE_SECRET_KEY is refused."""
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from cryptography.fernet import Fernet

from conftest import G2A, ROOT, SWITCH, free_port
from test_orders_e2e import SWITCH_CWS, eventually, keys_in

BACKENDS = ("postgresql",)
UNITS, BUYERS = 5, 40
FIRST_ORDER = 80201000000500


@pytest.fixture
def two_hosts(start_bridge, sim):
    """Two webs and two workers on the test PostgreSQL server; returns (webs, active worker, standby worker)."""
    sim.cws.set_quantity(SWITCH_CWS, UNITS)  # before the first read: the webs trust fresh state for 5 s
    webs = [start_bridge("web", PORT=str(free_port())) for _ in range(2)]
    workers = [start_bridge("worker") for _ in range(2)]
    active = eventually(lambda: next((w for w in workers if "worker.active" in w.logs()), None), timeout=20)
    standby = next(w for w in workers if w is not active)
    eventually(lambda: "worker.standby" in standby.logs(), timeout=20)
    return webs, active, standby


def reserve_concurrently(webs):
    """BUYERS reservations of one unit each, spread over the webs and sent all at once; the ids that got stock."""
    start = threading.Barrier(BUYERS)

    def one(index):
        g2a = G2A(webs[index % len(webs)].g2a.base_url)
        g2a.token()
        start.wait()
        answer = g2a.reserve((SWITCH, 1))
        return answer.json()["reservation_id"] if answer.status_code == 200 else None

    with ThreadPoolExecutor(BUYERS) as pool:
        return [found for found in pool.map(one, range(BUYERS)) if found]


def test_forty_buyers_over_two_webs_get_exactly_the_five_units_and_each_order_buys_once(two_hosts, sim):
    webs, _, _ = two_hosts
    reserved = reserve_concurrently(webs)
    assert len(reserved) == UNITS
    for number, reservation_id in enumerate(reserved):
        taker, reader = webs[number % 2].g2a, webs[(number + 1) % 2].g2a
        answer = taker.call("POST", "/order", {"reservation_id": reservation_id,
                                               "g2a_order_id": FIRST_ORDER + number})
        assert answer.status_code == 200, answer.text
        # The other web decrypts what this one stored: both run with the same BRIDGE_SECRET_KEY.
        inventory = reader.call("GET", f"/order/{FIRST_ORDER + number}/inventory")
        assert keys_in(inventory.json()) == keys_in(answer.json()["stock"])
    assert [len(sim.cws.orders_for_client_id(f"g2a-{FIRST_ORDER + n}")) for n in range(UNITS)] == [1] * UNITS
    assert len(sim.cws.orders) == UNITS


def test_the_standby_worker_finishes_the_order_the_killed_active_worker_was_polling(two_hosts, sim):
    webs, active, standby = two_hosts
    sim.cws.set_fulfilment(SWITCH_CWS, "delayed", polls=10_000)
    g2a = webs[0].g2a
    reservation_id = g2a.reserve((SWITCH, 1)).json()["reservation_id"]
    answer = g2a.call("POST", "/order", {"reservation_id": reservation_id, "g2a_order_id": FIRST_ORDER})
    assert answer.status_code == 202, answer.text
    active.kill()
    killed_at = time.monotonic()
    [cws_order] = sim.cws.orders_for_client_id(f"g2a-{FIRST_ORDER}")
    sim.cws.complete_order(cws_order["orderId"])
    keys = eventually(lambda: keys_in(webs[1].g2a.call("GET", f"/order/{FIRST_ORDER}/inventory").json()),
                      timeout=60, every=0.5)
    assert len(keys) == 1 and "worker.active" in standby.logs()
    assert time.monotonic() - killed_at < 45  # the lease lasts 30 s; then the standby polls at once
    assert len(sim.cws.orders_for_client_id(f"g2a-{FIRST_ORDER}")) == 1


def test_a_third_web_with_another_secret_key_refuses_to_start_beside_the_two(two_hosts, bridge_env):
    other_key = Fernet.generate_key().decode()  # a valid key, just not the one the database was set up with
    result = subprocess.run([sys.executable, "-m", "bridge", "web"], cwd=ROOT, capture_output=True, text=True,
                            env={"PATH": os.environ["PATH"], **bridge_env, "PORT": str(free_port()),
                                 "BRIDGE_SECRET_KEY": other_key}, timeout=60)
    assert result.returncode == 2 and "error: BRIDGE_SECRET_KEY: " in result.stderr, result.stderr
