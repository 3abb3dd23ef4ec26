"""The simulator's fake CWS and fake G2A behave as cws.md and g2a-sales.md describe, faults included."""
import base64
import hashlib
import json
import signal
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
import requests

from bridge.sim import (CWS_CLIENT_ID, CWS_CLIENT_SECRET, CWS_CLIENT_SIGNATURE, G2A_API_KEY,
                              G2A_API_SECRET, FakeCws, Simulator)

ROOT = Path(__file__).resolve().parent.parent
SWITCH = "466c805b-ead1-4851-bc4f-9eda242550ad"
SKYLINES = "067ccfe1-655a-4a1f-8362-c655bb9bbf95"
G2A_SWITCH = "10000068865001"
CWS_FORM = {"grant_type": "client_credentials", "client_id": CWS_CLIENT_ID, "client_secret": CWS_CLIENT_SECRET}
G2A_FORM = {"grant_type": "client_credentials", "client_id": G2A_API_KEY, "client_secret": G2A_API_SECRET}


class Clock:
    def __init__(self, start=datetime(2025, 7, 14, 12, 0, tzinfo=timezone.utc)):
        self.moment = start

    def __call__(self):
        return self.moment

    def advance(self, **delta):
        self.moment += timedelta(**delta)


@pytest.fixture
def sim():
    with Simulator() as simulator:
        simulator.seed_demo()
        yield simulator


def cws_token(sim, **overrides):
    return requests.post(f"{sim.cws_url}/oauth/token", data={**CWS_FORM, **overrides}, timeout=5)


def cws(sim):
    session = requests.Session()
    session.headers["Authorization"] = "Bearer " + cws_token(sim).json()["access_token"]
    session.base = sim.cws_url
    return session


def g2a(sim):
    session = requests.Session()
    token = requests.post(f"{sim.g2a_url}/oauth/token", data=G2A_FORM, timeout=5).json()["access_token"]
    session.headers["Authorization"] = "Bearer " + token
    session.base = sim.g2a_url
    return session


def get(session, path, **kwargs):
    return session.get(session.base + path, timeout=kwargs.pop("timeout", 5), **kwargs)


def order(session, product_id=SWITCH, quantity=1, client_id="g2a-1", **fields):
    body = {"allowPreOrder": False, "orderId": client_id,
            "products": [{"productId": product_id, "quantity": quantity, **fields}]}
    return session.post(session.base + "/v3/orders", json=body, timeout=5)


def codes_of(order_json):
    return [code for line in order_json["products"] for code in line["codes"]]


def patch(session, offer_id, variant, offer_type="dropshipping"):
    body = {"offerType": offer_type, "variant": variant}
    return session.patch(f"{session.base}/v3/sales/offers/{offer_id}", json=body, timeout=5)


def job_until_done(session, job_id):
    statuses = []
    while not statuses or statuses[-1] == "pending":
        statuses.append(get(session, f"/v3/jobs/{job_id}").json()["data"]["status"])
    return statuses


# ---- CWS: tokens ------------------------------------------------------------------------------

def test_a_cws_token_is_reused_with_its_remaining_time_until_it_expires(sim):
    sim.cws.now = clock = Clock()
    sim.cws.token_ttl = 60
    first = cws_token(sim).json()
    clock.advance(seconds=20)
    second = cws_token(sim).json()
    assert second["access_token"] == first["access_token"]
    assert (first["expires_in"], second["expires_in"], second["token_type"]) == (60, 40, "bearer")
    clock.advance(seconds=40)
    stale = requests.get(f"{sim.cws_url}/v3/accounts/current", timeout=5,
                         headers={"Authorization": "Bearer " + first["access_token"]})
    assert stale.status_code == 401 and stale.json()["error"] == "invalid_token"
    assert cws_token(sim).json()["access_token"] != first["access_token"]


def test_cws_credentials_are_accepted_from_query_string_and_basic_auth(sim):
    by_query = requests.post(f"{sim.cws_url}/oauth/token", params=CWS_FORM, timeout=5)
    by_basic = requests.post(f"{sim.cws_url}/oauth/token", data={"grant_type": "client_credentials"},
                             auth=(CWS_CLIENT_ID, CWS_CLIENT_SECRET), timeout=5)
    assert by_query.status_code == by_basic.status_code == 200
    assert by_query.json()["access_token"] == by_basic.json()["access_token"]


def test_wrong_cws_credentials_are_401_invalid_client(sim):
    response = cws_token(sim, client_secret="nope")
    assert response.status_code == 401 and response.json()["error"] == "invalid_client"


def test_the_spring_token_shape_carries_value_and_expires_in(sim):
    sim.cws.token_shape = "spring"
    body = cws_token(sim).json()
    assert set(body) >= {"value", "tokenType", "expiresIn", "expiration", "expired"}
    assert "access_token" not in body and body["expiresIn"] == 3600


def test_v3_calls_need_the_current_bearer_token(sim):
    session = cws(sim)
    assert get(session, "/v3/accounts/current").status_code == 200
    assert requests.get(f"{sim.cws_url}/v3/products", timeout=5).status_code == 401
    sim.cws.expire_token()
    assert get(session, "/v3/accounts/current").json()["error"] == "invalid_token"


# ---- CWS: catalogue ---------------------------------------------------------------------------

def list_all(session, **params):
    pages, token = [], None
    while True:
        query = {**params, **({"continuationToken": token} if token else {})}
        body = get(session, "/v3/products", params=query).json()
        pages.append(body["items"])
        token = body["continuationToken"]
        if token is None:
            return pages


def test_paging_through_250_products_follows_continuation_tokens(sim):
    for n in range(248):
        sim.cws.add_product(str(uuid.UUID(int=n)), n, [(1, None, "1.00")])
    pages = list_all(cws(sim))
    assert [len(page) for page in pages] == [100, 100, 50]
    assert len({item["productId"] for page in pages for item in page}) == 250


def test_the_product_ids_filter_returns_only_known_requested_products(sim):
    sim.cws.add_product("aaaaaaaa-0000-0000-0000-000000000000", 1, [(1, None, "2.00")])
    body = get(cws(sim), "/v3/products", params={"productIds": f"{SKYLINES},{uuid.uuid4()},{SWITCH}"}).json()
    assert [item["productId"] for item in body["items"]] == [SKYLINES, SWITCH]
    assert body["continuationToken"] is None


def test_a_product_renders_every_price_band_with_an_open_last_band(sim):
    item = get(cws(sim), f"/v3/products/{SWITCH}").json()
    assert item["quantity"] == 25 and item["name"] == "1-2-Switch"
    assert item["prices"] == [{"value": 5.30, "from": 1, "to": 9}, {"value": 5.15, "from": 10, "to": 99},
                              {"value": 4.98, "from": 100, "to": None}]


def test_an_unknown_or_removed_product_is_404_with_code_20001(sim):
    session = cws(sim)
    sim.cws.remove_product(SWITCH)
    for product_id in (SWITCH, str(uuid.uuid4())):
        response = get(session, f"/v3/products/{product_id}")
        assert (response.status_code, response.json()["code"]) == (404, 20001)


def test_the_page_size_is_a_knob_also_set_over_http(sim):
    for n in range(8):
        sim.cws.add_product(str(uuid.UUID(int=n)), n, [(1, None, "1.00")])
    answer = requests.post(f"{sim.cws_url}/_sim/listing", json={"page_size": 4}, timeout=5)
    assert answer.json() == {"page_size": 4, "honour_updated_since": True}
    assert [len(page) for page in list_all(cws(sim))] == [4, 4, 2]


def test_updated_since_lists_only_what_changed_unless_the_knob_makes_it_ignored(sim):
    clock = Clock(datetime.now(timezone.utc) + timedelta(hours=1))  # after the demo products were added
    sim.cws.now = clock
    for n in range(3):
        sim.cws.add_product(str(uuid.UUID(int=n)), 5, [(1, None, "1.00")])
    since = {"updatedSince": (clock.moment + timedelta(minutes=1)).isoformat()}
    clock.advance(minutes=5)
    sim.cws.set_quantity(str(uuid.UUID(int=1)), 0)
    sim.cws.set_prices(str(uuid.UUID(int=2)), [(1, None, "2.00")])
    session = cws(sim)
    changed = [item["productId"] for page in list_all(session, **since) for item in page]
    assert changed == [str(uuid.UUID(int=1)), str(uuid.UUID(int=2))]
    requests.post(f"{sim.cws_url}/_sim/listing", json={"honour_updated_since": False}, timeout=5)
    assert len([item for page in list_all(session, **since) for item in page]) == 5  # the whole catalogue


def test_an_invalid_continuation_token_is_400(sim):
    assert get(cws(sim), "/v3/products", params={"continuationToken": "bogus"}).status_code == 400


# ---- CWS: orders ------------------------------------------------------------------------------

def test_an_instant_order_completes_with_unique_codes_and_charges_stock_and_balance(sim):
    response = order(cws(sim), quantity=3, price=5.30)
    body = response.json()
    assert response.status_code == 200 and body["status"] == "Completed"
    assert body["clientOrderId"] == "g2a-1" and body["orderId"] != "g2a-1"
    codes = codes_of(body)
    assert len({code["code"] for code in codes}) == 3
    assert all(code["codeType"] == "CODE_TEXT" and code["code"].startswith("SIM-") for code in codes)
    assert body["totalPrice"] == 15.90 and body["products"][0]["unitPrice"] == 5.30
    assert sim.cws.balance == Decimal("984.10")
    assert sim.cws.orders[0]["totalPrice"] == Decimal("15.90")
    assert get(cws(sim), f"/v3/products/{SWITCH}").json()["quantity"] == 22


def test_the_quantity_band_sets_the_unit_price(sim):
    body = order(cws(sim), quantity=10).json()
    assert body["products"][0]["unitPrice"] == 5.15 and body["totalPrice"] == 51.50


def test_a_delayed_order_is_fulfilling_for_the_configured_polls_then_completed(sim):
    sim.cws.set_fulfilment(SWITCH, "delayed", polls=2)
    session = cws(sim)
    created = order(session).json()
    assert (created["status"], codes_of(created)) == ("Fulfilling", [])
    polls = [get(session, f"/v3/orders/{created['orderId']}").json() for _ in range(3)]
    assert [poll["status"] for poll in polls] == ["Fulfilling", "Fulfilling", "Completed"]
    assert codes_of(polls[-1])[0]["code"]
    assert sim.cws.requests["GET /v3/orders/{id}"] == 3


def test_complete_order_finishes_a_delayed_order_at_once(sim):
    sim.cws.set_fulfilment(SWITCH, "delayed", polls=100)
    session = cws(sim)
    order_id = order(session).json()["orderId"]
    sim.cws.complete_order(order_id)
    assert get(session, f"/v3/orders/{order_id}").json()["status"] == "Completed"


def test_an_image_order_carries_a_base64_png_with_a_filename(sim):
    sim.cws.set_fulfilment(SWITCH, "image")
    session = cws(sim)
    code = codes_of(order(session, quantity=2).json())[0]
    assert code["codeType"] == "CODE_IMAGE" and code["filename"].endswith(".png")
    assert base64.b64decode(code["code"]).startswith(b"\x89PNG\r\n\x1a\n")
    assert get(session, f"/v3/codes/{code['codeId']}").json() == code


@pytest.mark.parametrize("mode, code_type", [("preorder", "CODE_PREORDER"), ("preorder_legacy", "PRE_ORDER")])
def test_preorder_codes_stay_empty_until_the_order_is_completed(sim, mode, code_type):
    sim.cws.set_fulfilment(SWITCH, mode)
    session = cws(sim)
    created = order(session).json()
    code = codes_of(created)[0]
    assert (code["codeType"], code["status"], code["code"]) == (code_type, "Pre-ordered code", "")
    assert codes_of(get(session, f"/v3/orders/{created['orderId']}").json())[0]["code"] == ""
    sim.cws.complete_preorder(created["orderId"])
    fetched = get(session, f"/v3/codes/{code['codeId']}").json()
    assert fetched["codeType"] == "CODE_TEXT" and fetched["code"].startswith("SIM-")


def test_allow_preorder_with_too_little_stock_gives_placeholders_for_the_missing_units(sim):
    sim.cws.set_quantity(SWITCH, 1)
    session = cws(sim)
    refused = order(session, quantity=2)
    assert refused.status_code == 400 and "allowPreOrder" in refused.json()["message"]
    body = {"allowPreOrder": True, "orderId": "g2a-2", "products": [{"productId": SWITCH, "quantity": 2}]}
    codes = codes_of(session.post(f"{sim.cws_url}/v3/orders", json=body, timeout=5).json())
    assert [code["codeType"] for code in codes] == ["CODE_TEXT", "CODE_PREORDER"]


def test_fail_mode_stores_a_cancelled_order_without_charging(sim):
    sim.cws.set_fulfilment(SWITCH, "fail")
    body = order(cws(sim)).json()
    assert body["status"] == "Cancelled" and codes_of(body) == []
    assert sim.cws.balance == Decimal("1000.00") and len(sim.cws.orders) == 1


@pytest.mark.parametrize("mode, status, code", [("balance", 400, 10002), ("delisted", 404, 20001)])
def test_refusing_modes_answer_the_cws_error_and_store_nothing(sim, mode, status, code):
    sim.cws.set_fulfilment(SWITCH, mode)
    response = order(cws(sim))
    assert (response.status_code, response.json()["code"]) == (status, code)
    assert sim.cws.orders == []


def test_a_balance_below_the_total_is_400_10002(sim):
    sim.cws.balance = Decimal("5.00")
    response = order(cws(sim))
    assert (response.status_code, response.json()["code"]) == (400, 10002)


def test_commit_then_500_stores_the_order_that_history_then_reveals(sim):
    sim.cws.set_fulfilment(SWITCH, "commit_then_500")
    session = cws(sim)
    assert order(session, client_id="g2a-crash").status_code == 500
    history = get(session, "/v3/orders").json()["items"]
    assert [item["clientOrderId"] for item in history] == ["g2a-crash"]
    assert codes_of(get(session, f"/v3/orders/{history[0]['orderId']}").json())[0]["code"]


def test_commit_then_hang_stores_the_order_before_the_client_gives_up(sim):
    sim.cws.set_fulfilment(SWITCH, "commit_then_hang")
    sim.cws.hang_seconds = 5
    session = cws(sim)
    with pytest.raises(requests.Timeout):
        session.post(f"{sim.cws_url}/v3/orders", timeout=0.3,
                     json={"orderId": "g2a-hang", "products": [{"productId": SWITCH, "quantity": 1}]})
    assert len(sim.cws.orders_for_client_id("g2a-hang")) == 1


@pytest.mark.parametrize("fields, status, code", [
    ({"quantity": 0}, 400, 40002),
    ({"quantity": "1"}, 400, 40002),
    ({"price": 5.29}, 400, 40003),
    ({"price": "5.30"}, 400, 40000),
])
def test_invalid_order_lines_are_refused(sim, fields, status, code):
    body = {"orderId": "g2a-x", "products": [{"productId": SWITCH, "quantity": 1, **fields}]}
    response = cws(sim).post(f"{sim.cws_url}/v3/orders", json=body, timeout=5)
    assert (response.status_code, response.json()["code"]) == (status, code)
    assert sim.cws.orders == []


def test_a_body_that_is_not_json_is_400(sim):
    response = cws(sim).post(f"{sim.cws_url}/v3/orders", data="{", timeout=5)
    assert response.status_code == 400 and response.json()["status"] == 400


def test_a_price_at_or_above_the_current_band_is_accepted(sim):
    assert order(cws(sim), price=5.30).status_code == 200
    assert order(cws(sim), price=9, client_id="g2a-2").status_code == 200


def test_a_repeated_client_order_id_creates_a_second_separate_order(sim):
    session = cws(sim)
    first, second = order(session).json(), order(session).json()
    assert first["orderId"] != second["orderId"]
    assert len(sim.cws.orders_for_client_id("g2a-1")) == 2
    assert sim.cws.balance == Decimal("989.40")


def test_order_history_filters_on_the_created_date_inclusively(sim):
    sim.cws.now = clock = Clock(datetime(2025, 7, 13, 23, 30, tzinfo=timezone.utc))
    sim.cws.token_ttl = 7 * 86400
    session = cws(sim)
    for client_id in ("g2a-13", "g2a-14", "g2a-15"):
        order(session, client_id=client_id)
        clock.advance(days=1)

    def history(start, end):
        items = get(session, "/v3/orders", params={"startFrom": start, "endOn": end}).json()["items"]
        assert all("products" not in item for item in items)
        return [item["clientOrderId"] for item in items]

    assert history("2025-07-14", "2025-07-14") == ["g2a-14"]
    assert history("2025-07-13", "2025-07-14") == ["g2a-13", "g2a-14"]
    assert history("2025-07-14T23:00:00Z", "2025-07-15T23:30:00.000Z") == ["g2a-14", "g2a-15"]
    assert get(session, "/v3/orders", params={"startFrom": "yesterday"}).status_code == 400


def test_short_mode_completes_with_fewer_codes_than_ordered(sim):
    sim.cws.set_fulfilment(SWITCH, "short")
    body = order(cws(sim), quantity=3).json()
    assert body["status"] == "Completed" and len(codes_of(body)) == 2


def test_late_preorder_hands_out_a_placeholder_despite_allow_preorder_false_and_fills_it_later(sim):
    sim.cws.now = clock = Clock()
    sim.cws.set_fulfilment(SWITCH, "late_preorder")
    sim.cws.preorder_seconds = 3
    session = cws(sim)
    created = order(session).json()
    (code,) = codes_of(created)
    assert (code["codeType"], code["code"]) == ("CODE_PREORDER", "")
    clock.advance(seconds=3)
    (filled,) = codes_of(get(session, f"/v3/orders/{created['orderId']}").json())
    assert filled["codeId"] == code["codeId"] and filled["code"].startswith("SIM-")


@pytest.mark.parametrize("paging", ["token", "page"])
def test_order_history_pages_and_lags_and_fails_on_request(sim, paging):
    sim.cws.now = clock = Clock()
    session = cws(sim)
    for n in range(3):
        order(session, client_id=f"g2a-{n}")
    sim.cws.history_lag = 60
    assert get(session, "/v3/orders").json()["items"] == []
    clock.advance(seconds=60)
    sim.cws.history_page_size, sim.cws.history_paging = 2, paging
    first = get(session, "/v3/orders").json()
    following = {"continuationToken": first.get("continuationToken")} if paging == "token" else {"page": 1}
    second = get(session, "/v3/orders", params=following).json()
    assert [item["clientOrderId"] for item in first["items"] + second["items"]] == ["g2a-0", "g2a-1", "g2a-2"]
    assert second.get("continuationToken") is None and second.get("totalPages", 2) == 2
    sim.cws.history_status = 500
    assert get(session, "/v3/orders").status_code == 500


def test_unknown_codes_and_orders_are_404(sim):
    session = cws(sim)
    code = get(session, f"/v3/codes/{uuid.uuid4()}")
    assert (code.status_code, code.json()["code"]) == (404, 50002)
    assert get(session, "/v3/orders/g2a-1").status_code == 404


def test_the_account_shows_the_balance_as_numbers(sim):
    sim.cws.balance = Decimal("120.50")
    assert get(cws(sim), "/v3/accounts/current").json()["totalToUse"] == 120.50


# ---- faults, latency, concurrency -------------------------------------------------------------

def test_queued_faults_hit_the_next_matching_requests_in_order(sim):
    session = cws(sim)
    sim.cws.fail_next("/v3/products", 429, 500, "garbage", "empty")
    first, second = get(session, "/v3/products"), get(session, "/v3/products")
    assert (first.status_code, first.json()["status"]) == (429, 429)
    assert second.status_code == 500
    with pytest.raises(ValueError):
        get(session, "/v3/products").json()
    assert get(session, "/v3/products").json() == {}
    assert get(session, "/v3/accounts/current").status_code == 200
    assert len(get(session, "/v3/products").json()["items"]) == 2
    assert sim.cws.requests["GET /v3/products"] == 5


def test_an_unknown_fault_outcome_is_refused_when_queued(sim):
    with pytest.raises(ValueError):
        sim.cws.fail_next("/v3", "queue_full")
    sim.g2a.fail_next("/v3", "queue_full")


def test_a_timeout_fault_holds_then_drops_the_connection(sim):
    session = cws(sim)
    sim.cws.hang_seconds = 0.2
    sim.cws.fail_next("/v3/products", "timeout", "timeout")
    with pytest.raises(requests.ConnectionError):
        get(session, "/v3/products")
    with pytest.raises(requests.Timeout):
        get(session, "/v3/products", timeout=0.05)
    assert get(session, "/v3/products").status_code == 200


def test_stop_returns_promptly_while_a_request_hangs():
    simulator = Simulator().start()
    simulator.cws.fail_next("/oauth", "timeout")
    hanging = threading.Thread(target=lambda: pytest.raises(requests.RequestException, cws_token, simulator))
    hanging.start()
    time.sleep(0.1)
    started = time.monotonic()
    simulator.stop()
    hanging.join(5)
    assert time.monotonic() - started < 2 and not hanging.is_alive()


def test_delay_slows_each_request_but_sixteen_run_concurrently(sim):
    sim.cws.delay = 0.3
    url = f"{sim.cws_url}/v3/products/{SWITCH}"
    headers = {"Authorization": cws(sim).headers["Authorization"]}
    started = time.monotonic()
    with ThreadPoolExecutor(16) as pool:
        statuses = list(pool.map(lambda _: requests.get(url, headers=headers, timeout=5).status_code, range(16)))
    elapsed = time.monotonic() - started
    assert statuses == [200] * 16 and 0.3 <= elapsed < 2


def test_listing_50000_products_page_by_page_is_quick(sim):
    for n in range(50_000):
        sim.cws.add_product(str(uuid.UUID(int=n)), 5, [(1, 9, "6.32"), (10, None, "6.15")])
    sim.cws.page_size = 1000
    session = cws(sim)
    started = time.monotonic()
    pages = list_all(session)
    elapsed = time.monotonic() - started
    print(f"\nlisted {sum(map(len, pages))} products in {len(pages)} pages in {elapsed:.2f} s")
    assert sum(map(len, pages)) == 50_002 and elapsed < 30


# ---- postbacks and control routes -------------------------------------------------------------

def test_the_postback_auth_hash_matches_the_cws_md_test_vector(sim):
    body = sim.cws.postback("PREORDER", orderId="abc")
    assert body == {"type": "PREORDER", "orderId": "abc",
                    "authHash": "4e2bb084b493d93216f55bac33f3987bc25c1d9bf8167677faed92fc9cdcb6d2"}
    expected = hashlib.sha256((CWS_CLIENT_ID + CWS_CLIENT_SIGNATURE).encode()).hexdigest()
    assert sim.cws.postback("STOCK", valid=False)["authHash"] != expected


def test_send_postback_posts_the_json_body_and_returns_the_status(sim):
    received = []

    class Receiver(BaseHTTPRequestHandler):
        def do_POST(self):
            received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=server.handle_request, daemon=True).start()
    sim.cws.set_quantity(SWITCH, 0)
    body = sim.cws.postback("STOCK", products=[sim.cws.stock_entry(SWITCH)])
    assert sim.cws.send_postback(f"http://127.0.0.1:{server.server_address[1]}/cws/postback", body) == 200
    server.server_close()
    assert received[0]["products"][0] == {"productId": SWITCH, "quantity": 0, "prices": [
        {"priceRangeLabel": "1-9", "price": 5.30}, {"priceRangeLabel": "10-99", "price": 5.15},
        {"priceRangeLabel": "100+", "price": 4.98}]}


def test_control_routes_drive_the_fake_without_auth_or_counting(sim):
    base = f"{sim.cws_url}/_sim"
    new_id = str(uuid.uuid4())
    assert requests.post(f"{base}/products/{new_id}", json={"quantity": 3, "prices": [[1, None, "5.00"]]},
                         timeout=5).json()["quantity"] == 3
    assert requests.post(f"{base}/products/{new_id}", json={"quantity": 7}, timeout=5).json()["quantity"] == 7
    assert requests.post(f"{base}/fulfilment/{new_id}", json={"mode": "delayed", "polls": 9},
                         timeout=5).status_code == 200
    assert requests.post(f"{base}/fulfilment/{new_id}", json={"mode": "nope"}, timeout=5).status_code == 400
    order_id = order(cws(sim), product_id=new_id).json()["orderId"]
    assert requests.post(f"{base}/orders/{order_id}/complete", timeout=5).json()["status"] == "Completed"
    assert requests.post(f"{base}/faults", json={"prefix": "/v3/accounts", "outcomes": [503]},
                         timeout=5).status_code == 200
    assert get(cws(sim), "/v3/accounts/current").status_code == 503
    assert requests.delete(f"{base}/products/{new_id}", timeout=5).status_code == 200
    assert len(requests.get(f"{base}/orders", timeout=5).json()["items"]) == 1
    assert not any("/_sim" in key for key in sim.cws.requests)


# ---- CWS: rate limits (cws.md §5.3, opt-in) ------------------------------------------------------

def test_rate_limits_are_off_by_default_but_requests_are_counted_per_class(sim):
    session = cws(sim)
    for _ in range(30):
        assert get(session, f"/v3/products/{SWITCH}").status_code == 200
    get(session, "/v3/products")
    get(session, "/v3/accounts/current")
    counts = sim.cws.limits.counts()
    assert counts["requests"] == {"token": 1, "product": 30, "list": 1, "other": 1}
    assert counts["throttled"] == {} and counts["limits"] == {}


def test_enforced_limits_answer_429_with_retry_after_beyond_the_window_per_class(sim):
    sim.cws.limits.enforce({"product": (3, 60.0), "list": (1, 600.0)})
    session = cws(sim)
    answers = [get(session, f"/v3/products/{SWITCH}") for _ in range(5)]
    assert [a.status_code for a in answers] == [200, 200, 200, 429, 429]
    assert 1 <= int(answers[3].headers["Retry-After"]) <= 60
    assert answers[3].json()["code"] == 429
    assert get(session, "/v3/products").status_code == 200  # its own window
    assert get(session, "/v3/products").status_code == 429
    assert sim.cws.limits.counts()["throttled"] == {"product": 2, "list": 1}


def test_the_window_slides(sim):
    now = [100.0]
    sim.cws.limits.clock = lambda: now[0]
    sim.cws.limits.enforce({"product": (2, 10.0)})
    session = cws(sim)
    get(session, f"/v3/products/{SWITCH}")
    now[0] += 6
    get(session, f"/v3/products/{SWITCH}")
    assert get(session, f"/v3/products/{SWITCH}").status_code == 429
    now[0] += 4.5  # the first left the window
    assert get(session, f"/v3/products/{SWITCH}").status_code == 200
    assert get(session, f"/v3/products/{SWITCH}").status_code == 429
    assert sim.cws.limits.counts()["peaks"] == {"product": 2}  # the most let through in any 10 s


def test_the_default_limits_are_those_of_section_5_3_and_retry_after_can_be_left_out(sim):
    sim.cws.limits.enforce(retry_after=False)
    assert sim.cws.limits.counts()["limits"] == {"token": [50, 300.0], "list": [400, 600.0], "product": [600, 300.0]}
    for _ in range(50):
        cws_token(sim)
    refused = cws_token(sim)
    assert refused.status_code == 429 and "Retry-After" not in refused.headers


def test_a_throttle_answers_429_to_its_class_for_a_while_through_the_control_route(sim):
    session = cws(sim)
    control = requests.post(f"{sim.cws_url}/_sim/limits", json={"throttle": {"list": 30}}, timeout=5)
    assert control.status_code == 200
    listed = get(session, "/v3/products")
    assert listed.status_code == 429 and 29 <= int(listed.headers["Retry-After"]) <= 30
    assert get(session, f"/v3/products/{SWITCH}").status_code == 200
    counts = requests.get(f"{sim.cws_url}/_sim/limits", timeout=5).json()
    assert counts["throttled"] == {"list": 1} and counts["requests"]["list"] == 1


def test_limits_can_be_set_through_the_control_route_and_the_constructor(sim):
    body = {"enforce": {"product": [1, 300]}, "retry_after": False}
    assert requests.post(f"{sim.cws_url}/_sim/limits", json=body, timeout=5).json()["limits"] == {
        "product": [1, 300]}
    requests.post(f"{sim.cws_url}/_sim/limits", json={"enforce": False}, timeout=5)
    assert sim.cws.limits.counts()["limits"] == {}
    assert FakeCws(rate_limits={"list": (5, 60)}, retry_after=False).limits.counts()["limits"] == {"list": [5, 60]}


# ---- G2A --------------------------------------------------------------------------------------

def test_g2a_tokens_need_the_form_credentials_and_every_call_a_bearer(sim):
    assert requests.post(f"{sim.g2a_url}/oauth/token", data={**G2A_FORM, "client_secret": "x"},
                         timeout=5).status_code == 401
    token = requests.post(f"{sim.g2a_url}/oauth/token", data=G2A_FORM, timeout=5).json()
    assert token["token_type"] == "bearer" and token["expires_in"] == 3600
    assert requests.get(f"{sim.g2a_url}/v3/sales/offers", timeout=5).status_code == 401


def test_g2a_tokens_expire_after_token_ttl(sim):
    sim.g2a.now = clock = Clock()
    session = g2a(sim)
    clock.advance(seconds=3600)
    assert get(session, "/v3/sales/offers").status_code == 401


def test_g2a_offers_are_listed_page_by_page_with_meta(sim):
    for n in range(248):
        sim.g2a.add_offer(str(20000000000000 + n), "1.00", 1)
    session = g2a(sim)
    pages = [get(session, "/v3/sales/offers", params={"page": p, "itemsPerPage": 100}).json() for p in (1, 2, 3)]
    assert [len(page["data"]) for page in pages] == [100, 100, 50]
    assert pages[2]["meta"] == {"page": 3, "itemsPerPage": 100, "totalResults": 250}
    assert get(session, "/v3/sales/offers", params={"itemsPerPage": 1000}).status_code == 400


def test_an_offer_is_fetched_by_id_and_found_by_product(sim):
    offer = sim.g2a.offer_for_product(G2A_SWITCH)
    assert offer["active"] is False and offer["inventory"] == {"size": 0} and offer["type"] == "dropshipping"
    assert get(g2a(sim), f"/v3/sales/offers/{offer['id']}").json() == {"data": offer}
    assert get(g2a(sim), f"/v3/sales/offers/{uuid.uuid4()}").status_code == 404


def test_a_patch_is_a_job_that_completes_after_the_pending_polls(sim):
    offer_id = sim.g2a.offer_for_product(G2A_SWITCH)["id"]
    session = g2a(sim)
    sim.g2a.job_polls = 2
    response = patch(session, offer_id, {"price": {"retail": "7.30"}, "inventory": {"size": 12}, "active": True})
    assert response.status_code == 200
    assert job_until_done(session, response.json()["data"]["jobId"]) == ["pending", "pending", "complete"]
    offer = get(session, f"/v3/sales/offers/{offer_id}").json()["data"]
    assert (offer["price"], offer["inventory"]["size"], offer["active"], offer["status"]) == (
        "7.30", 12, True, "active")
    assert sim.g2a.patches[0]["offer_id"] == offer_id and sim.g2a.patches[0]["body"]["variant"]["active"]


@pytest.mark.parametrize("variant", [
    {"price": {"retail": "5.3"}}, {"price": {"retail": 5.30}}, {"price": {"retail": "abc"}}, {"price": "5.30"},
    {"inventory": {"size": -1}}, {"inventory": {"size": "3"}}, {"inventory": {"size": True}},
    {"active": "yes"}, {"stock": 3}, {"productId": G2A_SWITCH},
])
def test_a_malformed_patch_is_400_and_changes_nothing(sim, variant):
    offer = sim.g2a.offer_for_product(G2A_SWITCH)
    before = json.dumps(offer, sort_keys=True)
    response = patch(g2a(sim), offer["id"], variant)
    assert response.status_code == 400 and response.json()["errors"][0]["message"]
    assert json.dumps(offer, sort_keys=True) == before


def test_a_patch_with_variants_plural_or_without_offer_type_is_400(sim):
    offer_id = sim.g2a.offer_for_product(G2A_SWITCH)["id"]
    session = g2a(sim)
    plural = session.patch(f"{sim.g2a_url}/v3/sales/offers/{offer_id}", timeout=5,
                           json={"offerType": "dropshipping", "variants": [{"active": True}]})
    untyped = session.patch(f"{sim.g2a_url}/v3/sales/offers/{offer_id}", json={"variant": {}}, timeout=5)
    assert plural.status_code == untyped.status_code == 400
    assert len(sim.g2a.patches) == 2


def test_a_failed_job_reports_why_and_does_not_apply_the_patch(sim):
    offer_id = sim.g2a.offer_for_product(G2A_SWITCH)["id"]
    session = g2a(sim)
    sim.g2a.fail_jobs(1)
    job_id = patch(session, offer_id, {"inventory": {"size": 5}}).json()["data"]["jobId"]
    assert job_until_done(session, job_id)[-1] == "failed"
    element = get(session, f"/v3/jobs/{job_id}").json()["data"]["elements"][0]
    assert element["status"] == "failed" and element["message"] and element["resourceId"] == offer_id
    assert sim.g2a.offers[offer_id]["inventory"]["size"] == 0
    job_id = patch(session, offer_id, {"inventory": {"size": 5}}).json()["data"]["jobId"]
    assert job_until_done(session, job_id)[-1] == "complete"


def test_a_price_outside_the_product_price_limit_fails_the_job(sim):
    sim.g2a.set_price_limit(G2A_SWITCH, "3.50", "40.00")
    session = g2a(sim)
    limits = get(session, "/v1/products", params={"id": G2A_SWITCH}).json()["docs"]
    assert limits == [{"id": G2A_SWITCH, "name": f"Simulated product {G2A_SWITCH}",
                       "priceLimit": {"min": 3.5, "max": 40.0}}]
    offer_id = sim.g2a.offer_for_product(G2A_SWITCH)["id"]
    job_id = patch(session, offer_id, {"price": {"retail": "40.01"}}).json()["data"]["jobId"]
    assert job_until_done(session, job_id)[-1] == "failed"
    assert sim.g2a.offers[offer_id]["price"] == "9.99"


def test_g2a_faults_use_g2a_bodies(sim):
    offer_id = sim.g2a.offer_for_product(G2A_SWITCH)["id"]
    session = g2a(sim)
    sim.g2a.fail_next("/v3/sales/offers/", 429, "queue_full", "garbage")
    assert patch(session, offer_id, {"active": True}).json() == {"code": "BR03", "message": "Too many requests"}
    queue_full = patch(session, offer_id, {"active": True})
    assert queue_full.status_code == 400 and "limit of tasks in the queue" in queue_full.text
    with pytest.raises(ValueError):
        patch(session, offer_id, {"active": True}).json()
    assert sim.g2a.patches == [] and sim.g2a.requests["PATCH /v3/sales/offers/{id}"] == 3


def test_creating_an_offer_returns_the_new_id_in_the_job(sim):
    session = g2a(sim)
    variant = {"productId": "10000000000042", "price": {"retail": "5.98", "business": "5.98"},
               "inventory": {"size": 10}, "active": True, "visibility": "all"}
    response = session.post(f"{sim.g2a_url}/v3/sales/offers", timeout=5,
                            json={"offerType": "dropshipping", "variants": [variant]})
    job_id = response.json()["data"]["jobId"]
    assert job_until_done(session, job_id)[-1] == "complete"
    offer_id = get(session, f"/v3/jobs/{job_id}").json()["data"]["elements"][0]["resourceId"]
    assert sim.g2a.offers[offer_id]["product"]["id"] == "10000000000042"
    again = session.post(f"{sim.g2a_url}/v3/sales/offers", timeout=5,
                         json={"offerType": "dropshipping", "variants": [variant]}).json()["data"]["jobId"]
    assert job_until_done(session, again)[-1] == "failed"


def test_offer_creation_can_be_disabled(sim):
    sim.g2a.create_enabled = False
    response = g2a(sim).post(f"{sim.g2a_url}/v3/sales/offers", json={}, timeout=5)
    assert response.status_code == 403


# ---- lifecycle and entry point ----------------------------------------------------------------

def test_the_simulator_binds_to_loopback_only():
    with pytest.raises(ValueError):
        Simulator(host="0.0.0.0")


def test_main_serves_seeded_fakes_until_sigterm():
    process = subprocess.Popen([sys.executable, "-c", "import sys; from bridge.sim import main; "
                                "sys.exit(main(['--cws-port', '0', '--g2a-port', '0']))"],
                               cwd=ROOT, stdout=subprocess.PIPE, text=True)
    lines = [process.stdout.readline() for _ in range(3)]
    cws_url = lines[2].strip().split("=", 1)[1]
    token = requests.post(f"{cws_url}/oauth/token", data=CWS_FORM, timeout=5).json()["access_token"]
    product = requests.get(f"{cws_url}/v3/products/{SWITCH}", headers={"Authorization": f"Bearer {token}"},
                           timeout=5)
    process.send_signal(signal.SIGTERM)
    assert process.wait(10) == 0 and product.json()["name"] == "1-2-Switch"
