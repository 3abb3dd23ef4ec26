"""The CWS v3 client: requests it sends, validation of what comes back, order outcomes."""
import datetime
import gc
import json
import logging
from decimal import Decimal

import pytest
import requests
from fakes import FakeClock

from bridge import cws as cws_module
from bridge.budget import UNMETERED, budgets_for
from bridge.config import Settings
from bridge.cws import CwsClient, CwsCode, CwsOrder, CwsOrderProduct, CwsProductInfo, PriceTier
from bridge.errors import BudgetSpent, OutcomeUnknown, UpstreamError

BASE = "https://sandbox.codeswholesale.com"
PRODUCTS = BASE + "/v3/products"
ORDERS = BASE + "/v3/orders"
P1, P2 = "466c805b-ead1-4851-bc4f-9eda242550ad", "14e7693f-888e-470f-94f4-f102aa314d22"
SETTINGS = Settings(cws_client_id="ff72ce315d1259e822f47d87d02d261e", cws_client_secret="$2a$10$E2jVWDADFA5g/h.x",
                    cws_base_url=BASE, cws_retry_max=2)


def product(product_id=P1, quantity=5, prices=None, **extra):
    prices = [{"value": 5.30, "from": 1, "to": None}] if prices is None else prices
    return {"productId": product_id, "name": "1-2-Switch", "quantity": quantity, "prices": prices, **extra}


def text_code(code_id="c1", value="51B506CD-E164-40C4-9F8F-2E45A3D42F50"):
    return {"codeId": code_id, "codeType": "CODE_TEXT", "status": "Text code", "code": value, "filename": ""}


def order_body(status="Completed", codes=None, product_id=P1, **extra):
    codes = [text_code()] if codes is None else codes
    return {"orderId": "5afd584c-c0d0-4628-8b8b-e44561f6f1b5", "clientOrderId": "g2a-1", "status": status,
            "totalPrice": 5.30, "createdOn": "2025-07-14T18:05:36.659Z",
            "products": [{"productId": product_id, "name": "x", "unitPrice": 5.30, "codes": codes, "links": []}],
            **extra}


@pytest.fixture
def seen():
    return []


@pytest.fixture
def client(requests_mock, seen):
    requests_mock.post(BASE + "/oauth/token", json={"access_token": "tok", "token_type": "bearer",
                                                    "expires_in": 1158})
    return CwsClient(SETTINGS, sleep=lambda s: None, observer=lambda *args: seen.append(args))


# --- catalogue ----------------------------------------------------------------------------

def test_products_by_id_are_fetched_in_batches_as_a_comma_list(client, requests_mock):
    ids = [f"id-{n}" for n in range(5)]
    calls = requests_mock.get(PRODUCTS, [{"json": {"items": [product(i) for i in ids[:2]]}},
                                         {"json": {"items": [product(i) for i in ids[2:4]]}},
                                         {"json": {"items": [product(ids[4])]}}])
    found = list(client.products(ids + ["id-0"], batch_size=2))
    assert [p.id for p in found] == ids
    assert [r.qs["productids"] for r in calls.request_history] == [["id-0,id-1"], ["id-2,id-3"], ["id-4"]]
    assert calls.last_request.headers["Authorization"] == "Bearer tok"


def test_the_whole_catalogue_follows_continuation_tokens_until_null(client, requests_mock):
    calls = requests_mock.get(PRODUCTS, [{"json": {"items": [product("a")], "continuationToken": "page2"}},
                                         {"json": {"items": [product("b")], "continuationToken": "page3"}},
                                         {"json": {"items": [product("c")], "continuationToken": None}}])
    assert [p.id for p in client.products()] == ["a", "b", "c"]
    assert [r.qs.get("continuationtoken") for r in calls.request_history] == [None, ["page2"], ["page3"]]
    assert "productids" not in calls.last_request.qs


def test_each_batch_of_ids_is_paged_too(client, requests_mock):
    calls = requests_mock.get(PRODUCTS, [{"json": {"items": [product("a")], "continuationToken": "more"}},
                                         {"json": {"items": [product("b")]}}])
    assert [p.id for p in client.products(["a", "b"])] == ["a", "b"]
    assert calls.last_request.qs == {"productids": ["a,b"], "continuationtoken": ["more"]}


def test_a_repeated_continuation_token_stops_paging_with_an_error(client, requests_mock):
    calls = requests_mock.get(PRODUCTS, json={"items": [product("a")], "continuationToken": "same"})
    with pytest.raises(UpstreamError, match="repeated a continuationToken"):
        list(client.products())
    assert calls.call_count == 2


def test_a_page_in_use_does_not_keep_its_decoded_answer_alive(client, requests_mock):
    # Given as text, so the only dict carrying this marker is the one decoded from the answer.
    requests_mock.get(PRODUCTS, [{"text": json.dumps({"items": [product("a")], "continuationToken": "marker-7"})},
                                 {"json": {"items": []}}])
    pages = client.product_pages()
    page = next(pages)  # the caller now stores and reconciles it, which takes seconds in the worker
    gc.collect()
    decoded = [o for o in gc.get_objects() if isinstance(o, dict) and o.get("continuationToken") == "marker-7"]
    assert [info.id for info in page.items] == ["a"] and page.more
    assert decoded == []


@pytest.mark.parametrize("item, field", [
    ({"productId": P1, "name": "x", "prices": []}, "quantity"),
    (product(quantity="many"), "quantity"),
    (product(prices={"value": 5.3}), "prices"),
    (product(prices=[{"value": "cheap", "from": 1, "to": None}]), "value"),
    (product(prices=[{"value": 5.3, "to": None}]), "from"),
    ({"name": "no id", "quantity": 1, "prices": []}, "productId"),
])
def test_a_product_of_the_wrong_shape_is_an_upstream_error_naming_the_field(client, requests_mock, item, field):
    requests_mock.get(PRODUCTS, json={"items": [item]})
    with pytest.raises(UpstreamError, match=f"field {field} ") as raised:
        list(client.products([P1]))
    assert raised.value.service == "cws"


def test_a_products_page_that_is_not_an_object_is_an_upstream_error(client, requests_mock):
    requests_mock.get(PRODUCTS, json=["what"])
    with pytest.raises(UpstreamError, match="not a JSON object"):
        list(client.products())


def test_prices_are_exact_decimals(client, requests_mock):
    requests_mock.get(PRODUCTS, text='{"items": [{"productId": "a", "name": "n", "quantity": 2, '
                                     '"prices": [{"value": 6.32, "from": 1, "to": null}]}]}')
    [found] = client.products(["a"])
    assert found == CwsProductInfo("a", "n", 2, (PriceTier(1, None, Decimal("6.32")),))
    assert str(found.unit_price()) == "6.32"


def test_unit_price_picks_the_inclusive_band_from_unsorted_tiers_with_an_open_end():
    info = CwsProductInfo("a", "n", 500, (PriceTier(100, None, Decimal("5.98")), PriceTier(1, 9, Decimal("6.32")),
                                          PriceTier(10, 99, Decimal("6.15"))))
    assert [info.unit_price(q) for q in (1, 9, 10, 99, 100, 10_000)] == [
        Decimal("6.32"), Decimal("6.32"), Decimal("6.15"), Decimal("6.15"), Decimal("5.98"), Decimal("5.98")]


def test_unit_price_is_none_when_no_band_covers_the_quantity():
    assert CwsProductInfo("a", "n", 1, (PriceTier(2, 9, Decimal("1")),)).unit_price(1) is None
    assert CwsProductInfo("a", "n", 1, ()).unit_price(1) is None


def test_one_product_is_fetched_by_its_quoted_id(client, requests_mock, seen):
    requests_mock.get(PRODUCTS + "/" + P1, json=product())
    assert client.product(P1).quantity == 5
    assert seen[-1][:4] == ("cws", "GET", "/v3/products/{id}", 200)


def test_an_unlisted_product_is_none(client, requests_mock):
    requests_mock.get(PRODUCTS + "/gone", status_code=404, json={"code": 20001, "message": "Product not found"})
    assert client.product("gone") is None


# --- orders -------------------------------------------------------------------------------

def test_place_order_sends_our_id_allow_preorder_and_a_two_decimal_price(client, requests_mock):
    calls = requests_mock.post(ORDERS, status_code=201, json=order_body(status="Fulfilling", codes=[]))
    order = client.place_order("g2a-1", [(P1, 1, Decimal("5.301")), (P2, 2, None)], allow_preorder=False)
    assert json.loads(calls.last_request.text) == {
        "allowPreOrder": False, "orderId": "g2a-1",
        "products": [{"productId": P1, "quantity": 1, "price": 5.31}, {"productId": P2, "quantity": 2}]}
    assert '"price": 5.31' in calls.last_request.text
    assert (order.order_id, order.client_order_id, order.status) == (
        "5afd584c-c0d0-4628-8b8b-e44561f6f1b5", "g2a-1", "Fulfilling")
    assert order.total_price == Decimal("5.3") and order.products[0].unit_price == Decimal("5.3")


@pytest.mark.parametrize("failure", [{"status_code": 500}, {"exc": requests.ReadTimeout},
                                     {"status_code": 200, "json": {"status": "Completed"}}])
def test_a_purchase_that_may_have_happened_is_outcome_unknown_and_sent_once(client, requests_mock, failure):
    calls = requests_mock.post(ORDERS, [failure, {"json": order_body()}])
    with pytest.raises(OutcomeUnknown):
        client.place_order("g2a-1", [(P1, 1, None)], allow_preorder=False)
    assert calls.call_count == 1


def test_a_balance_too_low_answer_keeps_code_10002(client, requests_mock):
    requests_mock.post(ORDERS, status_code=400, json={"status": 400, "code": 10002, "message": "No balance"})
    with pytest.raises(UpstreamError) as raised:
        client.place_order("g2a-1", [(P1, 1, None)], allow_preorder=False)
    error = raised.value
    assert (error.code, error.status, error.retryable) == (cws_module.BALANCE_TOO_LOW, 400, False)
    assert not isinstance(raised.value, OutcomeUnknown)


def test_an_order_is_fetched_by_the_cws_id_and_its_codes_parsed(client, requests_mock, seen):
    requests_mock.get(ORDERS + "/5afd", json=order_body())
    order = client.order("5afd")
    assert order.products == (CwsOrderProduct(P1, Decimal("5.3"), (
        CwsCode("c1", "text", "51B506CD-E164-40C4-9F8F-2E45A3D42F50", ""),)),)
    assert seen[-1][2:4] == ("/v3/orders/{id}", 200)


def test_an_order_with_a_malformed_code_names_the_field(client, requests_mock):
    requests_mock.get(ORDERS + "/5afd", json=order_body(codes=[{"codeType": "CODE_TEXT", "code": "K"}]))
    with pytest.raises(UpstreamError, match="field codeId missing in order .* product .* code"):
        client.order("5afd")


def make_order(status, codes, quantity_expected=1):
    order = CwsOrder("o", "g2a-1", status, None, "", (CwsOrderProduct(P1, None, tuple(codes)),))
    return order.outcome({P1: quantity_expected})


@pytest.fixture
def code_of(client, requests_mock):
    """A code object as CwsClient.code() parses it."""
    def parse(**fields):
        requests_mock.get(BASE + "/v3/codes/c", json={"codeId": "c", **fields})
        return client.code("c")
    return parse


@pytest.mark.parametrize("status, codes, expected", [
    ("Completed", [text_code()], "done"),
    ("COMPLETED", [text_code()], "done"),
    ("Completed", [], "pending"),
    ("Fulfilling", [], "pending"),
    ("Fulfilling", [text_code()], "pending"),
    ("Cancelled", [], "failed"),
    ("FAILED", [text_code()], "failed"),
    ("Rejected", [], "failed"),
    ("Fulfilling", [{"codeId": "p", "codeType": "CODE_PREORDER", "status": "Pre-ordered code", "code": ""}],
     "preorder"),
    ("Completed", [{"codeId": "p", "codeType": "PRE_ORDER", "code": None}], "preorder"),
    ("Completed", [{"codeId": "p", "status": "Pre-ordered code", "code": ""}], "preorder"),
    ("Completed", [{"codeId": "p", "code": ""}], "preorder"),
    ("Completed", [{"codeId": "i", "codeType": "CODE_IMAGE", "status": "Image code", "code": "iVBORw0KGgo=",
                    "filename": "key.png"}], "done"),
    # A real key not sent inline: pending until fulfillment fetches it with CwsClient.code().
    ("Completed", [text_code(value="")], "pending"),
])
def test_order_outcomes(client, requests_mock, status, codes, expected):
    requests_mock.get(ORDERS + "/o", json=order_body(status=status, codes=codes))
    assert client.order("o").outcome({P1: 1}) == expected


def test_an_order_is_done_only_with_exactly_the_expected_number_of_keys(code_of):
    two = [code_of(codeType="CODE_TEXT", code="A"), code_of(codeType="CODE_TEXT", code="B")]
    assert make_order("Completed", two, quantity_expected=2) == "done"
    assert make_order("Completed", two[:1], quantity_expected=2) == "pending"
    assert make_order("Completed", two, quantity_expected=1) == "pending"
    assert CwsOrder("o", None, "Completed", None, "", ()).outcome({P1: 1}) == "pending"


def test_an_image_code_keeps_its_base64_data_and_filename(code_of):
    code = code_of(codeType="CODE_IMAGE", status="Image code", code="iVBORw0KGgo=", filename="key.png")
    assert code == CwsCode("c", "image", "iVBORw0KGgo=", "key.png")
    assert not code.needs_fetch


def test_a_code_with_an_empty_value_needs_fetching_and_a_preorder_does_not(code_of):
    assert code_of(codeType="CODE_TEXT", code="").needs_fetch
    assert code_of(codeType="CODE_IMAGE", code="", filename="k.png").needs_fetch
    assert not code_of(codeType="CODE_PREORDER", code="").needs_fetch


def test_an_unknown_status_is_logged_once_and_pending(caplog):
    cws_module._warn_unknown_status.cache_clear()
    with caplog.at_level(logging.WARNING, logger="bridge.cws"):
        assert make_order("Prepared", []) == "pending"
        assert make_order("Prepared", []) == "pending"
    assert [r.event_fields for r in caplog.records] == [{"status": "Prepared"}]


def test_a_single_code_is_fetched_by_id(client, requests_mock):
    requests_mock.get(BASE + "/v3/codes/c1", json=text_code())
    assert client.code("c1") == CwsCode("c1", "text", "51B506CD-E164-40C4-9F8F-2E45A3D42F50", "")


def test_a_missing_code_is_an_upstream_error_with_code_50002(client, requests_mock):
    requests_mock.get(BASE + "/v3/codes/c9", status_code=404, json={"code": 50002, "message": "Code not found"})
    with pytest.raises(UpstreamError) as raised:
        client.code("c9")
    assert raised.value.code == cws_module.CODE_NOT_FOUND


# --- recovery -----------------------------------------------------------------------------

def test_find_orders_asks_for_the_day_before_to_the_day_after_and_filters_on_our_id(client, requests_mock):
    history = {"items": [
        {"orderId": "o1", "clientOrderId": "g2a-7", "status": "Completed", "totalPrice": 5.02, "createdOn": "x"},
        {"orderId": "o2", "clientOrderId": "g2a-8", "status": "Completed"},
        {"clientOrderId": "g2a-9", "weird": True},  # malformed but not ours: must not block recovery
    ]}
    calls = requests_mock.get(ORDERS, json=history)
    around = datetime.datetime(2025, 7, 1, 0, 30, tzinfo=datetime.timezone(datetime.timedelta(hours=2)))
    found = client.find_orders("g2a-7", around)
    assert calls.last_request.qs == {"startfrom": ["2025-06-29"], "endon": ["2025-07-01"]}
    assert [(o.order_id, o.products) for o in found] == [("o1", ())]


def test_find_orders_is_empty_when_our_order_is_not_there(client, requests_mock):
    requests_mock.get(ORDERS, json={"items": []})
    assert client.find_orders("g2a-7", datetime.datetime.now(datetime.timezone.utc)) == []


def history_item(order_id, client_order_id):
    return {"orderId": order_id, "clientOrderId": client_order_id, "status": "Completed"}


def test_find_orders_follows_history_continuation_tokens_to_an_order_on_page_two(client, requests_mock):
    requests_mock.get(ORDERS, [{"json": {"items": [history_item("o1", "g2a-8")], "continuationToken": "t2"}},
                               {"json": {"items": [history_item("o2", "g2a-7")], "continuationToken": None}}])
    assert [o.order_id for o in client.find_orders("g2a-7", datetime.datetime.now(datetime.timezone.utc))] == ["o2"]
    assert requests_mock.last_request.qs["continuationtoken"] == ["t2"]


@pytest.mark.parametrize("pages", [
    [{"page": 0, "totalPages": 2}, {"page": 1, "totalPages": 2}],
    [{"number": 0, "last": False}, {"number": 1, "last": True}],
])
def test_find_orders_follows_page_numbers_to_an_order_on_page_two(client, requests_mock, pages):
    requests_mock.get(ORDERS, [{"json": {"items": [history_item("o1", "g2a-8")], **pages[0]}},
                               {"json": {"items": [history_item("o2", "g2a-7")], **pages[1]}}])
    assert [o.order_id for o in client.find_orders("g2a-7", datetime.datetime.now(datetime.timezone.utc))] == ["o2"]
    assert requests_mock.last_request.qs["page"] == ["1"]


def test_history_paging_that_repeats_itself_is_an_error_not_a_short_list(client, requests_mock):
    requests_mock.get(ORDERS, json={"items": [], "continuationToken": "same"})
    with pytest.raises(UpstreamError, match="history incomplete"):
        client.find_orders("g2a-7", datetime.datetime.now(datetime.timezone.utc))


# --- account and token --------------------------------------------------------------------

def test_the_account_balance_is_parsed_as_decimals(client, requests_mock):
    requests_mock.get(BASE + "/v3/accounts/current", json={
        "fullName": "Acme", "currentBalance": 120.50, "currentCredit": 0.10, "totalToUse": 120.60})
    assert client.account() == cws_module.CwsAccount(Decimal("120.5"), Decimal("0.1"), Decimal("120.6"))


def test_an_account_without_a_balance_is_an_upstream_error(client, requests_mock):
    requests_mock.get(BASE + "/v3/accounts/current", json={"totalToUse": 1})
    with pytest.raises(UpstreamError, match="field currentBalance missing in account"):
        client.account()


def test_token_age_is_known_after_the_first_call(client, requests_mock):
    requests_mock.get(BASE + "/v3/accounts/current", json={"currentBalance": 1})
    assert client.token_age is None
    client.account()
    assert client.token_age >= 0


def test_the_token_and_every_call_are_reported_to_the_observer(client, requests_mock, seen):
    requests_mock.get(BASE + "/v3/accounts/current", json={"currentBalance": 1})
    client.account()
    assert [args[1:4] for args in seen] == [("POST", "/oauth/token", 200), ("GET", "/v3/accounts/current", 200)]


# --- budgets ------------------------------------------------------------------------------

@pytest.fixture
def metered(requests_mock):
    """A CWS client spending the worker's budgets, on a fake clock."""
    clock = FakeClock(1000.0)
    requests_mock.post(BASE + "/oauth/token", json={"access_token": "tok", "expires_in": 1158})
    budgets = budgets_for(SETTINGS, "worker", clock=clock, sleep=clock.sleep, alarm=lambda *args: None, wall=None)
    return CwsClient(SETTINGS, budgets=budgets, sleep=clock.sleep, clock=clock), budgets, clock


def test_each_call_spends_the_budget_of_its_endpoint_class(metered, requests_mock):
    client, budgets, _ = metered
    requests_mock.get(PRODUCTS, json={"items": [product()]})
    requests_mock.get(f"{PRODUCTS}/{P1}", json=product())
    requests_mock.get(BASE + "/v3/accounts/current", json={"currentBalance": 10})
    requests_mock.get(ORDERS + "/o1", json=order_body())
    list(client.products([P1]))
    client.product(P1)
    client.account()
    client.order("o1")
    use = {name: budgets[name].window_use()[0] for name in ("cws_token", "cws_list", "cws_product", "cws_other",
                                                              UNMETERED)}
    assert use == {"cws_token": 1, "cws_list": 1, "cws_product": 1, "cws_other": 1, UNMETERED: 1}


def test_a_429_on_the_catalogue_waits_its_retry_after_and_slows_only_that_class(metered, requests_mock):
    client, budgets, clock = metered
    requests_mock.get(PRODUCTS, [{"status_code": 429, "headers": {"Retry-After": "20"}},
                                 {"json": {"items": [product()]}}])
    assert [p.id for p in client.products([P1])] == [P1]
    assert 20.0 in clock.slept
    assert budgets["cws_list"].throttles == 1 and budgets["cws_product"].throttles == 0
    assert budgets["cws_list"].per_second < budgets_for(SETTINGS, "worker")["cws_list"].per_second


def test_the_purchase_and_its_polling_go_out_while_every_read_class_is_held(metered, requests_mock):
    client, budgets, clock = metered
    requests_mock.post(ORDERS, json=order_body())
    requests_mock.get(ORDERS + "/o1", json=order_body())
    requests_mock.get(BASE + "/v3/codes/c1", json=text_code())
    for name in ("cws_list", "cws_product", "cws_other"):
        budgets[name].throttled(retry_after=300)
    client.place_order("g2a-1", [(P1, 1, None)], allow_preorder=False)
    client.order("o1")
    client.code("c1")
    assert clock.slept == []
    assert budgets[UNMETERED].window_use() == (3, None)


def test_a_single_product_read_that_will_not_wait_is_budget_spent(metered, requests_mock):
    client, budgets, _ = metered
    one = requests_mock.get(f"{PRODUCTS}/{P1}", json=product())
    budgets["cws_product"].throttled(retry_after=60)
    with pytest.raises(BudgetSpent):
        client.product(P1, wait=False)
    assert one.call_count == 0
