"""kill -9 of the web process at each step of a purchase; after a restart every G2A order is bought exactly once.

No crash hook lives in the bridge: the simulator puts CWS in the state each crash leaves behind.
  never_sent  the claim is committed but CWS never takes the order (as if we died before the call);
  in_flight   CWS is still working on the POST when we die, and takes the order afterwards;
  answered    CWS has taken the order and its answer is on the wire when we die (we never commit it).
"""
import threading
import time
from datetime import timedelta

from bridge import db
from bridge.crypto import load_key_box
from bridge.cws import CwsClient
from bridge.claims import resend_grace
from bridge.fulfillment import Fulfilment
from conftest import SWITCH
from test_orders_e2e import eventually, inventory, keys_in

SWITCH_CWS = "466c805b-ead1-4851-bc4f-9eda242550ad"
G2A_ORDER, CLIENT_ORDER = 80201000000192, "g2a-80201000000192"


def never_sent(sim):
    sim.cws.fail_next("/v3/orders", "timeout")  # held without an answer, and nothing is stored


def in_flight(sim):
    sim.cws.delay = 14.0  # the POST waits 14 s before CWS takes the order: past the first history look-up


def answered(sim):
    sim.cws.set_fulfilment(SWITCH_CWS, "commit_then_hang")


def order_in_background(g2a, reservation_id):
    """POST /order on a thread (its connection dies with the server)."""
    def post():
        try:
            g2a.call("POST", "/order", {"reservation_id": reservation_id, "g2a_order_id": G2A_ORDER})
        except Exception:  # noqa: BLE001 (the server is killed under this request on purpose)
            pass
    threading.Thread(target=post, daemon=True).start()


def kill_mid_purchase(start_bridge, sim, fresh_db, crash):
    """Start web, begin a purchase, kill -9 the web process while CWS holds the POST; the claim stays."""
    sim.cws.hang_seconds = 20.0
    web = start_bridge("web", CWS_TIMEOUT_MS="15000")  # our own timeout must not end the call before the kill
    reservation_id = web.g2a.reserve((SWITCH, 1)).json()["reservation_id"]
    crash(sim)
    order_in_background(web.g2a, reservation_id)
    eventually(lambda: sim.cws.requests["POST /v3/orders"] == 1, timeout=10)
    time.sleep(0.2)  # the POST is now inside CWS (held, or about to be stored)
    sim.cws.delay = 0.0  # only that POST is slow; everything after it is quick
    web.kill()
    order = fresh_db.Order.get(fresh_db.Order.reservation == reservation_id)
    assert order.state == db.CLAIMED and order.cws_order_id is None
    return reservation_id


def restart(start_bridge, sim):
    """A new web process and a worker on the same database; returns both."""
    sim.cws.set_fulfilment(SWITCH_CWS, "instant")
    return start_bridge("web"), start_bridge("worker")


def delivered(web, sim, reservation_id, timeout):
    keys = eventually(lambda: keys_in(inventory(web.g2a, reservation_id)), timeout=timeout)
    (cws_order,) = sim.cws.orders_for_client_id(CLIENT_ORDER)
    assert [key["value"] for key in keys] == [c["code"] for c in cws_order["products"][0]["codes"]]
    return keys


def adopted_after_restart(start_bridge, sim, fresh_db, crash):
    """Crash, restart, G2A retries the call: the one CWS order is adopted and its keys served; returns the worker."""
    reservation_id = kill_mid_purchase(start_bridge, sim, fresh_db, crash)
    web, worker = restart(start_bridge, sim)
    again = web.g2a.call("POST", "/order", {"reservation_id": reservation_id, "g2a_order_id": G2A_ORDER})
    assert again.status_code == 409  # G2A retrying the call never buys
    delivered(web, sim, reservation_id, timeout=40)
    time.sleep(1.0)
    assert len(sim.cws.orders_for_client_id(CLIENT_ORDER)) == 1
    return worker


def test_a_purchase_cws_took_only_after_we_died_is_adopted_not_bought_again(start_bridge, sim, fresh_db):
    worker = adopted_after_restart(start_bridge, sim, fresh_db, in_flight)
    assert "order.not_at_cws_yet" in worker.logs()  # a look-up found nothing, and nothing was bought blind


def test_a_purchase_cws_answered_as_we_died_is_adopted_not_bought_again(start_bridge, sim, fresh_db):
    worker = adopted_after_restart(start_bridge, sim, fresh_db, answered)
    assert "how=adopted" in worker.logs()


def test_a_purchase_cws_never_took_is_placed_again_once_with_the_same_id_after_the_grace(
        start_bridge, sim, fresh_db, settings):
    reservation_id = kill_mid_purchase(start_bridge, sim, fresh_db, never_sent)
    web, _ = restart(start_bridge, sim)
    eventually(lambda: sim.cws.requests["GET /v3/orders"] >= 1, timeout=20)  # the worker looked...
    time.sleep(1.0)
    assert sim.cws.orders == []  # ...found nothing, and waits out the grace rather than buy blind
    after_the_grace = db.utcnow() + timedelta(seconds=resend_grace(settings) + 1)  # time is a parameter (STYLE 9)
    key_box = load_key_box(settings.bridge_secret_key, db.data_dir(settings.database_url))
    assert Fulfilment(settings, CwsClient(settings), key_box).recover(after_the_grace) == 1
    delivered(web, sim, reservation_id, timeout=15)
    assert [order["clientOrderId"] for order in sim.cws.orders] == [CLIENT_ORDER]
