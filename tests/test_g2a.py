"""The G2A Sales API client at its HTTP boundary (requests-mock): tokens, offers, jobs, limits, retries."""
import json
from decimal import Decimal as D

import pytest
import requests_mock

from bridge.config import Settings
from bridge.errors import UpstreamError
from bridge.g2a import G2aClient, Offer
from bridge.budget import Budget, Budgets
from fakes import FakeClock

BASE = "https://api.g2a.com"
TOKEN = {"access_token": "t1", "token_type": "bearer", "expires_in": 3600}
JOB = {"data": {"jobId": "job-1"}}


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def client(clock):
    settings = Settings(g2a_api_key="key", g2a_api_secret="secret", g2a_base_url=BASE, g2a_retry_max=2)
    return G2aClient(settings, sleep=clock.sleep, clock=clock)


@pytest.fixture
def http():
    with requests_mock.Mocker() as mocker:
        mocker.post(f"{BASE}/oauth/token", json=TOKEN)
        yield mocker


def offer_json(offer_id, product_id, price="5.30", size=3, status="active"):
    return {"id": offer_id, "type": "dropshipping", "status": status, "price": price,
            "inventory": {"size": size}, "visibility": "all", "product": {"id": str(product_id)}}


def test_the_token_is_fetched_with_the_client_credentials_form_and_reused(client, http):
    http.get(f"{BASE}/v3/sales/offers", json={"data": [], "meta": {"page": 1, "itemsPerPage": 100, "totalResults": 0}})
    list(client.offers())
    list(client.offers())
    token_calls = [r for r in http.request_history if r.path == "/oauth/token"]
    assert len(token_calls) == 1
    assert "grant_type=client_credentials" in token_calls[0].text and "client_id=key" in token_calls[0].text
    assert http.request_history[-1].headers["Authorization"] == "Bearer t1"


def test_the_token_is_refreshed_before_80_percent_of_its_lifetime(client, http, clock):
    http.get(f"{BASE}/v3/sales/offers", json={"data": [], "meta": {"totalResults": 0}})
    list(client.offers())
    clock.now += 0.81 * 3600
    list(client.offers())
    assert len([r for r in http.request_history if r.path == "/oauth/token"]) == 2


def test_a_401_refreshes_the_token_once_and_retries(client, http):
    http.post(f"{BASE}/oauth/token", [{"json": TOKEN}, {"json": {**TOKEN, "access_token": "t2"}}])
    http.patch(f"{BASE}/v3/sales/offers/o1", [{"status_code": 401, "json": {}}, {"json": JOB}])
    assert client.update_offer("o1", stock=2) == "job-1"
    assert http.request_history[-1].headers["Authorization"] == "Bearer t2"


def test_offers_are_read_page_by_page_until_the_total_is_reached(client, http):
    pages = [{"json": {"data": [offer_json(f"o{i}", 1000 + i) for i in range(100)],
                       "meta": {"page": 1, "itemsPerPage": 100, "totalResults": 150}}},
             {"json": {"data": [offer_json(f"o{i}", 1000 + i) for i in range(100, 150)],
                       "meta": {"page": 2, "itemsPerPage": 100, "totalResults": 150}}}]
    http.get(f"{BASE}/v3/sales/offers", pages)
    offers = list(client.offers())
    assert len(offers) == 150
    assert offers[0] == Offer("o0", 1000, D("5.30"), 3, True, "active")
    queries = [r.qs for r in http.request_history if r.path == "/v3/sales/offers"]
    assert queries == [{"page": ["1"], "itemsperpage": ["100"]}, {"page": ["2"], "itemsperpage": ["100"]}]


def test_offers_are_paged_by_the_page_size_g2a_served_not_the_one_we_asked_for(client, http):
    pages = [{"json": {"data": [offer_json(f"o{i}", 1000 + i) for i in range(start, min(start + 20, 50))],
                       "meta": {"page": number, "itemsPerPage": 20, "totalResults": 50}}}
             for number, start in ((1, 0), (2, 20), (3, 40))]
    http.get(f"{BASE}/v3/sales/offers", pages)
    assert [offer.id for offer in client.offers()] == [f"o{i}" for i in range(50)]
    assert [r.qs["page"] for r in http.request_history if r.path == "/v3/sales/offers"] == [["1"], ["2"], ["3"]]


def test_an_empty_page_ends_the_listing_whatever_the_total_claims(client, http):
    pages = [{"json": {"data": [offer_json("o1", 1)], "meta": {"page": 1, "itemsPerPage": 1, "totalResults": 9}}},
             {"json": {"data": [], "meta": {"page": 2, "itemsPerPage": 1, "totalResults": 9}}}]
    http.get(f"{BASE}/v3/sales/offers", pages)
    assert [offer.id for offer in client.offers()] == ["o1"]
    assert len([r for r in http.request_history if r.path == "/v3/sales/offers"]) == 2


@pytest.mark.parametrize("price", [{"amount": "5.30", "currency": "EUR"}, ["5.30"], "five", "NaN"])
def test_an_offer_with_an_unreadable_price_is_kept_with_the_price_unknown(client, http, price):
    http.get(f"{BASE}/v3/sales/offers", json={"data": [offer_json("o1", 7, price=price)], "meta": {"totalResults": 1}})
    assert list(client.offers()) == [Offer("o1", 7, None, 3, True, "active")]


def test_the_offer_type_is_read_and_an_untyped_offer_counts_as_dropshipping(client, http):
    untyped = offer_json("o2", 8)
    del untyped["type"]
    http.get(f"{BASE}/v3/sales/offers", json={"data": [{**offer_json("o1", 7), "type": "promo"}, untyped],
                                              "meta": {"totalResults": 2}})
    assert [(offer.id, offer.type) for offer in client.offers()] == [("o1", "promo"), ("o2", "dropshipping")]


def test_an_unreadable_offer_is_skipped_not_fatal(client, http):
    http.get(f"{BASE}/v3/sales/offers", json={"data": [{"id": "broken"}, offer_json("o2", 7, status="inactive"),
                                                        {**offer_json("o3", 8), "inventory": {"size": -1}}],
                                              "meta": {"totalResults": 3}})
    assert list(client.offers()) == [Offer("o2", 7, D("5.30"), 3, False, "inactive")]


def test_a_page_without_data_is_an_upstream_error(client, http):
    http.get(f"{BASE}/v3/sales/offers", json={"oops": True})
    with pytest.raises(UpstreamError, match="no data list"):
        list(client.offers())


def test_an_update_sends_only_the_given_parts_with_a_two_decimal_price(client, http):
    http.patch(f"{BASE}/v3/sales/offers/o1", json=JOB)
    client.update_offer("o1", price=D("5.3"))
    client.update_offer("o1", stock=0, active=False)
    first, second = (json.loads(r.text) for r in http.request_history if r.method == "PATCH")
    assert first == {"offerType": "dropshipping", "variant": {"price": {"retail": "5.30"}}}
    assert second == {"offerType": "dropshipping", "variant": {"inventory": {"size": 0}, "active": False}}


def test_a_full_task_queue_and_429_are_retried_with_backoff(client, http, clock):
    http.patch(f"{BASE}/v3/sales/offers/o1", [
        {"status_code": 400, "json": {"errors": [{"code": "BR05", "message": "You have reached the limit of tasks in the queue"}]}},
        {"status_code": 429, "json": {"code": "BR03", "message": "Too many requests"}},
        {"json": JOB}])
    assert client.update_offer("o1", stock=1) == "job-1"
    assert clock.now > 0


def test_other_400s_are_not_retried(client, http):
    http.patch(f"{BASE}/v3/sales/offers/o1", status_code=400, json={"errors": [{"code": "X", "message": "bad price"}]})
    with pytest.raises(UpstreamError) as info:
        client.update_offer("o1", price=D("1"))
    assert (info.value.status, info.value.retryable) == (400, False)
    assert len([r for r in http.request_history if r.method == "PATCH"]) == 1


def test_a_job_is_polled_until_complete_and_yields_its_resource(client, http):
    http.get(f"{BASE}/v3/jobs/job-1", [
        {"json": {"data": {"jobId": "job-1", "status": "pending", "elements": []}}},
        {"json": {"data": {"jobId": "job-1", "status": "complete",
                           "elements": [{"resourceId": "o1", "status": "complete"}]}}}])
    assert client.wait_job("job-1", timeout=30) == "o1"


@pytest.mark.parametrize("status", ["completed", "done", "COMPLETE"])
def test_other_spellings_of_done_are_accepted(client, http, status):
    http.get(f"{BASE}/v3/jobs/job-1", json={"data": {"status": status, "elements": [{"resourceId": "o9"}]}})
    assert client.wait_job("job-1", timeout=30) == "o9"


def test_a_failed_job_raises_with_the_element_message(client, http):
    http.get(f"{BASE}/v3/jobs/job-1", json={"data": {"status": "failed", "elements": [
        {"resourceId": "o1", "status": "failed", "code": "PRICE_OUT_OF_RANGE", "message": "Price 1.00 too low"}]}})
    with pytest.raises(UpstreamError, match="PRICE_OUT_OF_RANGE Price 1.00 too low"):
        client.wait_job("job-1", timeout=30)


def test_a_job_whose_element_failed_is_a_failure(client, http):
    http.get(f"{BASE}/v3/jobs/job-1", json={"data": {"status": "complete", "elements": [
        {"status": "error", "message": "nope"}]}})
    with pytest.raises(UpstreamError, match="nope"):
        client.wait_job("job-1", timeout=30)


def test_a_job_pending_past_the_timeout_is_a_retryable_error(client, http):
    http.get(f"{BASE}/v3/jobs/job-1", json={"data": {"status": "pending", "elements": []}})
    with pytest.raises(UpstreamError, match="still pending") as info:
        client.wait_job("job-1", timeout=10)
    assert info.value.retryable


def test_create_offer_posts_one_dropshipping_variant(client, http):
    http.post(f"{BASE}/v3/sales/offers", json=JOB)
    assert client.create_offer(10000068865001, D("5.98"), 10) == "job-1"
    body = json.loads(http.request_history[-1].text)
    assert body == {"offerType": "dropshipping", "variants": [{
        "productId": "10000068865001", "price": {"retail": "5.98", "business": "5.98"},
        "inventory": {"size": 10}, "active": True, "visibility": "all"}]}


def test_a_write_without_a_job_id_is_an_upstream_error(client, http):
    http.patch(f"{BASE}/v3/sales/offers/o1", json={"data": {}})
    with pytest.raises(UpstreamError, match="jobId"):
        client.update_offer("o1", stock=1)


def test_price_limit_reads_min_and_max_as_decimals(client, http):
    http.get(f"{BASE}/v1/products", json={"docs": [{"id": "77", "priceLimit": {"min": 0.5, "max": 100}}]})
    assert client.price_limit(77) == (D("0.5"), D("100"))
    assert http.request_history[-1].qs == {"id": ["77"]}


def test_an_unknown_product_has_no_price_limit(client, http):
    http.get(f"{BASE}/v1/products", json={"docs": [], "total": 0})
    assert client.price_limit(77) is None


def test_the_g2a_budget_counts_every_request_the_token_included(clock, http):
    budgets = Budgets("worker", {"g2a": Budget("g2a", 3, 60, clock=clock, sleep=clock.sleep)})
    settings = Settings(g2a_api_key="key", g2a_api_secret="secret", g2a_base_url=BASE)
    client = G2aClient(settings, budgets=budgets, sleep=clock.sleep, clock=clock)
    http.patch(f"{BASE}/v3/sales/offers/o1", json=JOB)
    for _ in range(3):
        client.update_offer("o1", stock=1)
    assert clock.now >= 60  # token + 3 PATCHes: the fourth request waited for the window
