"""End to end: the real web server against the simulator, called the way G2A calls it."""
import base64
import json
import time

import pytest
import requests

from bridge import pause
from conftest import OUR_ID, OUR_SECRET, SKYLINES, SWITCH
from concurrently import run_together

UNKNOWN_PRODUCT = 10000099999999
BACKENDS = ("sqlite", "postgresql")  # each test runs on both databases (conftest.py)


def assert_error(answer, status, code=None):
    assert answer.status_code == status, answer.text
    assert answer.headers["Content-Type"].startswith("application/json")
    body = answer.json()
    assert set(body) >= {"code", "message"} and isinstance(body["message"], str)
    if code:
        assert body["code"] == code
    return body


# --- tokens -----------------------------------------------------------------------------------

def test_a_token_is_issued_for_query_parameters_and_works_as_bearer(web):
    answer = web.http.get(f"{web.base_url}/oauth/token", params={
        "grant_type": "client_credentials", "client_id": OUR_ID, "client_secret": OUR_SECRET})
    body = answer.json()
    assert answer.status_code == 200 and body["token_type"] == "bearer" and body["expires_in"] == 3600
    assert len(body["access_token"]) >= 22
    check = web.http.get(f"{web.base_url}/healthcheck", headers={"Authorization": f"Bearer {body['access_token']}"})
    assert check.status_code == 204 and check.content == b""


@pytest.mark.parametrize("how", ["form", "json", "basic"])
def test_a_token_is_issued_for_form_json_and_basic_credentials(web, how):
    url = f"{web.base_url}/oauth/token"
    fields = {"grant_type": "client_credentials", "client_id": OUR_ID, "client_secret": OUR_SECRET}
    if how == "form":
        answer = web.http.post(url, data=fields)
    elif how == "json":
        answer = web.http.post(url, json=fields)
    else:
        answer = web.http.post(url, data={"grant_type": "client_credentials"}, auth=(OUR_ID, OUR_SECRET))
    assert answer.status_code == 200, answer.text


def test_wrong_client_credentials_are_401_auth02(web):
    answer = web.http.get(f"{web.base_url}/oauth/token", params={
        "grant_type": "client_credentials", "client_id": OUR_ID, "client_secret": "nope"})
    assert_error(answer, 401, "AUTH02")


def test_a_wrong_grant_type_is_400_br02(web):
    answer = web.http.get(f"{web.base_url}/oauth/token", params={
        "grant_type": "password", "client_id": OUR_ID, "client_secret": OUR_SECRET})
    assert_error(answer, 400, "BR02")


def test_calls_without_credentials_are_auth01_and_with_a_bad_token_auth02(web):
    assert_error(web.call("GET", "/healthcheck", auth=False), 401, "AUTH01")
    assert_error(web.call("GET", "/healthcheck", headers={"Authorization": "Bearer forged"}), 401, "AUTH02")
    assert_error(web.call("POST", "/reservation", [], headers={"Authorization": "Token x"}), 401, "AUTH01")


def test_basic_auth_with_the_configured_pair_is_accepted_in_place_of_bearer(web):
    basic = "Basic " + base64.b64encode(f"{OUR_ID}:{OUR_SECRET}".encode()).decode()
    assert web.call("GET", "/healthcheck", headers={"Authorization": basic}).status_code == 204
    wrong = "Basic " + base64.b64encode(f"{OUR_ID}:bad".encode()).decode()
    assert_error(web.call("GET", "/healthcheck", headers={"Authorization": wrong}), 401, "AUTH02")


def test_issued_tokens_survive_a_restart_of_the_web_server(start_bridge):
    first = start_bridge("web")
    token = first.g2a.token()
    first.stop()
    second = start_bridge("web")
    answer = second.g2a.http.get(f"{second.g2a.base_url}/healthcheck", headers={"Authorization": f"Bearer {token}"})
    assert answer.status_code == 204


def test_repeated_failed_logins_from_one_address_are_slowed_down_with_429(web):
    url = f"{web.base_url}/oauth/token"
    statuses = [web.http.get(url, params={"client_id": OUR_ID, "client_secret": "guess"}).status_code
                for _ in range(25)]
    assert statuses[:20] == [401] * 20 and statuses[-1] == 429


# --- health -----------------------------------------------------------------------------------

def test_health_is_public_and_plain(web):
    answer = requests.get(f"{web.base_url}/health")
    assert answer.status_code == 200 and answer.text == "OK"


# --- reservations -----------------------------------------------------------------------------

def test_a_reservation_reserves_and_reports_what_is_left(web, sim):
    answer = web.call("POST", "/reservation", [
        {"product_id": SWITCH, "quantity": 3, "additional_data": {"unit_price": "9.98", "auction_base_price": "15.98"}},
        {"product_id": str(SKYLINES), "quantity": 1}])
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert len(body["reservation_id"]) <= 36
    assert body["stock"] == [{"product_id": SWITCH, "inventory_size": 22},
                             {"product_id": SKYLINES, "inventory_size": 7}]
    again = web.reserve((SWITCH, 1)).json()
    assert again["stock"] == [{"product_id": SWITCH, "inventory_size": 21}]


def test_a_reservation_is_all_or_nothing_and_reports_available_stock_when_short(web):
    answer = web.reserve((SWITCH, 1), (SKYLINES, 9))
    body = assert_error(answer, 400, "BR02")
    assert body["stock"] == [{"product_id": SWITCH, "inventory_size": 25},
                             {"product_id": SKYLINES, "inventory_size": 8}]
    assert web.reserve((SWITCH, 25)).status_code == 200


def test_an_unknown_product_is_404(web):
    assert_error(web.reserve((UNKNOWN_PRODUCT, 1)), 404, "BR02")


def test_a_unit_price_below_cost_plus_fee_is_refused(web):
    # 1-2-Switch costs 5.30 at CWS; with G2A's 15 % fee anything under 6.24 loses money.
    answer = web.call("POST", "/reservation", [
        {"product_id": SWITCH, "quantity": 1, "additional_data": {"unit_price": "6.00"}}])
    assert "below our cost" in assert_error(answer, 400, "BR02")["message"]
    ok = web.call("POST", "/reservation", [{"product_id": SWITCH, "quantity": 1,
                                            "additional_data": {"unit_price": "6.24"}}])
    assert ok.status_code == 200


def test_renewing_extends_a_reservation_even_after_it_expired(start_bridge):
    g2a = start_bridge("web", RESERVATION_TTL_MINUTES="0.01").g2a
    reservation = g2a.reserve((SKYLINES, 8)).json()
    assert reservation["stock"][0]["inventory_size"] == 0
    time.sleep(0.8)
    assert g2a.reserve((SKYLINES, 1)).json()["stock"][0]["inventory_size"] == 7  # the expired one let go
    answer = g2a.call("PUT", f"/reservation/{reservation['reservation_id']}", [{"product_id": SKYLINES, "quantity": 7}])
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"reservation_id": reservation["reservation_id"],
                             "stock": [{"product_id": SKYLINES, "inventory_size": 0}]}


def test_renewing_with_an_empty_body_keeps_the_reserved_lines(web):
    reservation_id = web.reserve((SKYLINES, 3)).json()["reservation_id"]
    answer = web.call("PUT", f"/reservation/{reservation_id}")
    assert answer.status_code == 200, answer.text
    assert answer.json()["stock"] == [{"product_id": SKYLINES, "inventory_size": 5}]


def test_renewing_when_the_stock_is_gone_is_400_and_unknown_is_404(web):
    first = web.reserve((SKYLINES, 2)).json()["reservation_id"]
    web.reserve((SKYLINES, 6))
    assert_error(web.call("PUT", f"/reservation/{first}", [{"product_id": SKYLINES, "quantity": 3}]), 400, "BR02")
    assert_error(web.call("PUT", "/reservation/no-such-id", [{"product_id": SKYLINES, "quantity": 1}]), 404)


def test_deleting_a_reservation_releases_its_stock_and_is_idempotent(web):
    reservation_id = web.reserve((SKYLINES, 8)).json()["reservation_id"]
    answer = web.call("DELETE", f"/reservation/{reservation_id}")
    assert answer.status_code == 204 and answer.content == b""
    assert web.call("DELETE", f"/reservation/{reservation_id}").status_code == 204
    assert web.reserve((SKYLINES, 8)).status_code == 200
    assert_error(web.call("DELETE", "/reservation/unknown-id"), 404)


def test_forty_concurrent_reservations_for_five_keys_reserve_exactly_five(web, sim):
    sim.cws.set_quantity(DEMO_CWS_SKYLINES, 5)
    web.token()
    results = []

    def buyer():
        answer = web.call("POST", "/reservation", [{"product_id": SKYLINES, "quantity": 1}])
        results.append(answer.status_code)
    run_together(*[buyer] * 40)
    assert sorted(results) == [200] * 5 + [400] * 35


def test_a_slow_cws_does_not_hold_up_a_reservation_beyond_its_budget(start_bridge, sim):
    g2a = start_bridge("web", STOCK_MAX_AGE_SECONDS="0").g2a
    assert g2a.reserve((SWITCH, 1)).status_code == 200  # warm the cache
    sim.cws.delay = 5
    started = time.monotonic()
    answer = g2a.reserve((SWITCH, 1))
    assert answer.status_code == 200 and time.monotonic() - started < 3.5
    sim.cws.delay = 0


def test_when_cws_is_down_the_cached_stock_answers(start_bridge, sim):
    g2a = start_bridge("web", STOCK_MAX_AGE_SECONDS="0", CWS_RETRY_MAX="0").g2a
    assert g2a.reserve((SWITCH, 1)).status_code == 200
    sim.cws.fail_next("/v3/products", 500, 500, 500, 500)
    answer = g2a.reserve((SWITCH, 2))
    assert answer.status_code == 200 and answer.json()["stock"][0]["inventory_size"] == 22


def test_paused_sales_answer_out_of_stock(web, fresh_db):
    pause.set_paused(True)
    time.sleep(1.1)  # the web process re-reads the flag at most once a second
    body = assert_error(web.reserve((SWITCH, 1)), 400, "BR02")
    assert body["stock"] == [{"product_id": SWITCH, "inventory_size": 0}]


# --- notifications ----------------------------------------------------------------------------

def test_notifications_are_stored_and_answered_204(web, fresh_db):
    payload = [{"notification_type": "auction_deactivated", "date": "2017-07-21T17:32:28Z",
                "data": {"message": "Price for reservation product is to low", "auction_id": 6666, "offer_id": "abc"}},
               {"notification_type": "something_new", "extra": [1, 2]}]
    assert web.call("POST", "/notifications", payload).status_code == 204
    kinds = sorted(n.notification_type for n in fresh_db.Notification.select())
    assert kinds == ["auction_deactivated", "something_new"]
    assert fresh_db.Alert.select().where(fresh_db.Alert.kind == "auction_deactivated").count() == 1


# --- hostile input: never a 5xx, always {code, message} ------------------------------------------

HOSTILE_BODIES = [
    b"", b"not json", b"{", b"[1,2", b"\xff\xfe\x00", b"null", b"42", b'"text"', b"[]", b"{}", b"[null]",
    b'[{"product_id": -1, "quantity": 1}]', b'[{"product_id": 0, "quantity": 1}]',
    b'[{"product_id": 99999999999999999999999, "quantity": 1}]', b'[{"product_id": 1.5, "quantity": 1}]',
    b'[{"product_id": true, "quantity": 1}]', b'[{"product_id": "12a", "quantity": 1}]',
    b'[{"product_id": 10000068865001, "quantity": 0}]', b'[{"product_id": 10000068865001, "quantity": -5}]',
    b'[{"product_id": 10000068865001, "quantity": "2"}]', b'[{"product_id": 10000068865001, "quantity": 1e309}]',
    b'[{"product_id": 10000068865001, "quantity": 1, "additional_data": "x"}]',
    b'[{"product_id": 10000068865001, "quantity": 1, "additional_data": {"unit_price": "NaN"}}]',
    b'[{"product_id": 10000068865001, "quantity": 1, "additional_data": {"unit_price": [1]}}]',
    b'[{"product_id": 10000068865001, "quantity": 1, "additional_data": {"unit_price": "-1"}}]',
    "[{\"product_id\": \"\u0661\u0662\", \"quantity\": 1}]".encode(),
    b"[" * 5000 + b"]" * 5000, json.dumps([{"product_id": SWITCH, "quantity": 1}] * 101).encode(),
]


@pytest.mark.parametrize("body", HOSTILE_BODIES, ids=range(len(HOSTILE_BODIES)))
def test_malformed_reservations_get_a_400_with_the_error_shape(web, body):
    answer = web.call("POST", "/reservation", raw=body, headers={"Content-Type": "application/json"})
    assert_error(answer, 400)


def test_unknown_paths_wrong_methods_and_huge_bodies_answer_json(web):
    assert_error(web.call("GET", "/nope"), 404, "BR02")
    assert_error(web.call("GET", "/reservation"), 405)
    assert_error(web.call("POST", "/reservation", raw=b"[" + b" " * 300_000 + b"]"), 413)
    assert_error(web.call("PUT", "/reservation/..%2F..%2Fetc", [{"product_id": SWITCH, "quantity": 1}]), 404)
    assert_error(web.call("DELETE", "/reservation/" + "x" * 300), 404)


def test_every_answer_carries_a_request_id_and_echoes_one_sent_in(web):
    assert web.call("GET", "/healthcheck", headers={"X-Request-Id": "abc-123"}).headers["X-Request-Id"] == "abc-123"
    assert len(web.call("GET", "/nope").headers["X-Request-Id"]) == 16


DEMO_CWS_SKYLINES = "067ccfe1-655a-4a1f-8362-c655bb9bbf95"
