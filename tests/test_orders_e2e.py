"""End to end: G2A buys through the real web process; the real worker delivers late keys and recovers."""
import base64
import time

import pytest

from conftest import SKYLINES, SWITCH
from concurrently import run_together

SWITCH_CWS, SKYLINES_CWS = "466c805b-ead1-4851-bc4f-9eda242550ad", "067ccfe1-655a-4a1f-8362-c655bb9bbf95"
BACKENDS = ("sqlite", "postgresql")  # each test runs on both databases (conftest.py)


def eventually(check, timeout=10.0, every=0.05):
    """The first truthy result of check() within timeout seconds, else an AssertionError."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(every)
    raise AssertionError(f"not true within {timeout}s: {check.__doc__ or check}")


def buy(g2a, product=SWITCH, quantity=1, g2a_order_id=80201000000192, headers=None):
    reservation_id = g2a.reserve((product, quantity)).json()["reservation_id"]
    answer = g2a.call("POST", "/order", {"reservation_id": reservation_id, "g2a_order_id": g2a_order_id},
                      headers=headers)
    return reservation_id, answer


def keys_in(stock):
    return [line for entry in stock for line in entry["inventory"]]


def inventory(g2a, any_id):
    answer = g2a.call("GET", f"/order/{any_id}/inventory")
    assert answer.status_code == 200, answer.text
    return answer.json()


def assert_error(answer, status, code="BR02"):
    assert answer.status_code == status, answer.text
    assert answer.json()["code"] == code and answer.json()["message"]


@pytest.fixture
def shop(start_bridge):
    """The web process and a worker on the same database."""
    web = start_bridge("web")
    web.worker = start_bridge("worker")
    return web


def test_an_instant_order_is_200_with_keys_that_every_id_fetches_again(shop, sim):
    reservation_id, answer = buy(shop.g2a, SWITCH, 2)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["stock"][0]["product_id"] == SWITCH and body["stock"][0]["inventory_size"] == 23
    keys = keys_in(body["stock"])
    assert len(keys) == 2 and len({k["id"] for k in keys}) == 2 and all(len(k["id"]) <= 36 for k in keys)
    for any_id in (body["order_id"], "80201000000192", reservation_id):
        assert keys_in(inventory(shop.g2a, any_id)) == keys
    again = shop.g2a.call("POST", "/order", {"reservation_id": reservation_id, "g2a_order_id": "80201000000192"})
    assert_error(again, 409)
    assert len(sim.cws.orders_for_client_id("g2a-80201000000192")) == 1


def test_a_delayed_order_is_202_and_its_keys_appear_soon_after_cws_completes(shop, sim):
    sim.cws.set_fulfilment(SKYLINES_CWS, "delayed", polls=10_000)
    _, answer = buy(shop.g2a, SKYLINES, 1, headers={"X-Request-Id": "g2a-call-77"})
    assert answer.status_code == 202 and keys_in(answer.json()["stock"]) == []
    order_id = answer.json()["order_id"]
    time.sleep(1.5)
    assert keys_in(inventory(shop.g2a, order_id)) == []
    sim.cws.complete_order(sim.cws.orders[0]["orderId"])
    completed = time.monotonic()
    keys = eventually(lambda: keys_in(inventory(shop.g2a, order_id)), timeout=10)
    assert time.monotonic() - completed < 2.5
    assert keys[0]["kind"] == "text" and keys[0]["value"].startswith("SIM-")
    eventually(lambda: "order.completed" in shop.worker.logs())
    line = next(line for line in shop.worker.logs().splitlines() if "order.completed" in line)
    assert "request_id=g2a-call-77" in line and keys[0]["value"] not in shop.worker.logs() + shop.logs()


def test_concurrent_orders_for_one_reservation_buy_once(shop, sim):
    reservation_id = shop.g2a.reserve((SWITCH, 1)).json()["reservation_id"]
    shop.g2a.token()
    statuses = []

    def post():
        answer = shop.g2a.call("POST", "/order", {"reservation_id": reservation_id, "g2a_order_id": 555})
        statuses.append(answer.status_code)
    run_together(*[post] * 8)
    assert sorted(statuses) == [200] + [409] * 7
    assert len(sim.cws.orders) == 1


def test_an_image_key_is_served_as_a_file(shop, sim):
    sim.cws.set_fulfilment(SWITCH_CWS, "image")
    _, answer = buy(shop.g2a)
    (key,) = keys_in(answer.json()["stock"])
    assert key["kind"] == "file" and key["value"] == ""
    file = shop.g2a.call("GET", f"/order/{answer.json()['order_id']}/inventory/{key['id']}")
    assert file.status_code == 200 and file.json()["mimeType"] == "image/png"
    assert base64.b64decode(file.json()["data"]).startswith(b"\x89PNG") and file.json()["fileName"].endswith(".png")
    assert_error(shop.g2a.call("GET", f"/order/{answer.json()['order_id']}/inventory/{key['id']}/account"), 404)


def test_returned_keys_go_back_to_stock_and_the_next_order_uses_them(shop, sim):
    _, answer = buy(shop.g2a, SKYLINES, 2)
    order_id, keys = answer.json()["order_id"], keys_in(answer.json()["stock"])
    path = f"/order/{order_id}/inventory?id[]={keys[0]['id']}&id={keys[1]['id']}"
    assert shop.g2a.call("DELETE", path).status_code == 204
    assert shop.g2a.call("DELETE", path).status_code == 204
    assert_error(shop.g2a.call("DELETE", f"/order/{order_id}/inventory?id[]=unknown-item"), 404)
    assert shop.g2a.reserve((SKYLINES, 1)).json()["stock"][0]["inventory_size"] == 7
    purchases = len(sim.cws.orders)
    _, again = buy(shop.g2a, SKYLINES, 1, g2a_order_id=80201000000193)
    assert again.status_code == 200 and len(sim.cws.orders) == purchases
    assert keys_in(again.json()["stock"])[0]["value"] in {k["value"] for k in keys}


def test_a_failed_order_answers_500_err99_and_unknown_orders_404(shop, sim):
    sim.cws.set_fulfilment(SWITCH_CWS, "fail")
    _, answer = buy(shop.g2a)
    assert answer.status_code == 202
    assert_error(shop.g2a.call("GET", f"/order/{answer.json()['order_id']}/inventory"), 500, "ERR99")
    assert_error(shop.g2a.call("GET", "/order/no-such-order/inventory"), 404)
    assert_error(shop.g2a.call("GET", "/order/123/inventory/x"), 404)


def test_an_expired_reservation_is_410(start_bridge, sim):
    g2a = start_bridge("web", RESERVATION_TTL_MINUTES="0.005").g2a
    reservation_id = g2a.reserve((SWITCH, 1)).json()["reservation_id"]
    time.sleep(0.5)
    assert_error(g2a.call("POST", "/order", {"reservation_id": reservation_id, "g2a_order_id": 1}), 410)
    assert_error(g2a.call("POST", "/order", {"reservation_id": "unknown", "g2a_order_id": 2}), 404)
    assert sim.cws.orders == []


@pytest.mark.parametrize("body", [b"", b"[]", b'{"reservation_id": 5, "g2a_order_id": 1}',
                                  b'{"reservation_id": "r", "g2a_order_id": -1}', b'{"reservation_id": "r"}',
                                  b'{"reservation_id": "../x", "g2a_order_id": 1}', b"{"])
def test_malformed_orders_are_400_with_the_error_shape(start_bridge, body):
    g2a = start_bridge("web").g2a
    answer = g2a.call("POST", "/order", raw=body, headers={"Content-Type": "application/json"})
    assert answer.status_code == 400 and set(answer.json()) == {"code", "message"}
