"""Issue 12, end to end: the ways the money path lost money, each played against the real web and worker
processes and the simulator (and what an operator now sees when money is stuck)."""
import json
import subprocess
import sys
import time

import pytest

from conftest import ROOT, SKYLINES, SWITCH
from test_orders_e2e import assert_error, eventually, inventory, keys_in

SWITCH_CWS, SKYLINES_CWS = "466c805b-ead1-4851-bc4f-9eda242550ad", "067ccfe1-655a-4a1f-8362-c655bb9bbf95"


@pytest.fixture
def shop(start_bridge):
    """The web process and a worker on the same database."""
    web = start_bridge("web")
    web.worker = start_bridge("worker")
    return web


def renew(g2a, reservation_id, lines=None):
    answer = g2a.call("PUT", f"/reservation/{reservation_id}", lines)
    assert answer.status_code == 200, answer.text
    return [entry["inventory_size"] for entry in answer.json()["stock"]]


def order(g2a, reservation_id, g2a_order_id=80201000000192):
    return g2a.call("POST", "/order", {"reservation_id": reservation_id, "g2a_order_id": g2a_order_id})


# --- 1. an empty-body renewal keeps the reservation as it is ---------------------------------------

def test_empty_body_renewals_neither_multiply_the_stock_held_nor_the_keys_bought(start_bridge, sim):
    g2a = start_bridge("web").g2a
    reservation_id = g2a.reserve((SKYLINES, 1)).json()["reservation_id"]
    assert renew(g2a, reservation_id) == [7]
    assert renew(g2a, reservation_id) == [7]
    answer = order(g2a, reservation_id)
    assert answer.status_code == 200 and len(keys_in(answer.json()["stock"])) == 1
    assert [len(o["products"][0]["codes"]) for o in sim.cws.orders] == [1]


def test_an_empty_body_renewal_after_a_resize_keeps_the_new_size(start_bridge, sim):
    g2a = start_bridge("web").g2a
    reservation_id = g2a.reserve((SKYLINES, 1)).json()["reservation_id"]
    assert renew(g2a, reservation_id, [{"product_id": SKYLINES, "quantity": 2}]) == [6]
    assert renew(g2a, reservation_id) == [6]
    answer = order(g2a, reservation_id)
    assert answer.status_code == 200 and len(keys_in(answer.json()["stock"])) == 2
    assert [len(o["products"][0]["codes"]) for o in sim.cws.orders] == [2]
