"""Outbound HTTP plumbing: token cache, retries, outcome-unknown writes, host allow-list, budget."""
import logging

import pytest
import requests
from urllib3.exceptions import MaxRetryError, NewConnectionError

from bridge.config import CWS_HOSTS, G2A_HOSTS
from bridge.budget import Budget, Budgets
from bridge.errors import BudgetSpent, ConfigError, OutcomeUnknown, UpstreamError
from bridge.upstream import BACKOFF_CAP, TokenCache, Upstream, error_details, fetch_client_token
from fakes import FakeClock

BASE = "https://api.codeswholesale.com"
TOKEN_URL = BASE + "/oauth/token"
ITEMS = BASE + "/v3/items"


def make(retry_max=2, with_token=False, clock=None, **kwargs):
    waits = []
    upstream = Upstream("cws", BASE, 5, retry_max, allowed_hosts=CWS_HOSTS, sleep=waits.append, **kwargs)
    if with_token:
        upstream.token = TokenCache(lambda: fetch_client_token(upstream, "/oauth/token", "id", "s3cret-value"),
                                    clock=clock or FakeClock(1000.0))
    return upstream, waits


def tokens(requests_mock, *names, expires_in=3600):
    return requests_mock.post(TOKEN_URL, [{"json": {"access_token": n, "expires_in": expires_in}} for n in names])


def refused():
    reason = NewConnectionError(None, "Connection refused")
    return requests.ConnectionError(MaxRetryError(None, "/v3/orders", reason=reason))


# --- tokens -------------------------------------------------------------------------------

def test_a_token_is_fetched_once_and_reused(requests_mock):
    token_calls = tokens(requests_mock, "t1")
    items = requests_mock.get(ITEMS, json={"ok": True})
    upstream, _ = make(with_token=True)
    assert upstream.request("GET", "/v3/items") == {"ok": True}
    upstream.request("GET", "/v3/items")
    assert token_calls.call_count == 1
    assert items.last_request.headers["Authorization"] == "Bearer t1"


def test_the_token_request_is_a_client_credentials_form_without_auth(requests_mock):
    token_calls = tokens(requests_mock, "t1")
    requests_mock.get(ITEMS, json={})
    upstream, _ = make(with_token=True)
    upstream.request("GET", "/v3/items")
    sent = token_calls.last_request
    assert sent.headers["Content-Type"] == "application/x-www-form-urlencoded"
    assert sent.text == "grant_type=client_credentials&client_id=id&client_secret=s3cret-value"
    assert "Authorization" not in sent.headers


def test_a_token_is_refreshed_after_80_percent_of_its_lifetime(requests_mock):
    token_calls = tokens(requests_mock, "t1", "t2", expires_in=100)
    items = requests_mock.get(ITEMS, json={})
    clock = FakeClock(1000.0)
    upstream, _ = make(with_token=True, clock=clock)
    upstream.request("GET", "/v3/items")
    clock.now += 79
    upstream.request("GET", "/v3/items")
    assert token_calls.call_count == 1
    clock.now += 1
    upstream.request("GET", "/v3/items")
    assert token_calls.call_count == 2
    assert items.last_request.headers["Authorization"] == "Bearer t2"


def test_token_age_counts_from_when_the_token_was_obtained():
    clock = FakeClock(1000.0)
    cache = TokenCache(lambda: ("t1", 3600), clock=clock)
    assert cache.age_seconds is None
    cache.get()
    clock.now += 42
    assert cache.age_seconds == 42
    cache.invalidate()
    assert cache.age_seconds is None


def test_invalidating_a_stale_token_keeps_the_current_one():
    issued = iter(["t1", "t2", "t3"])
    cache = TokenCache(lambda: (next(issued), 3600), clock=FakeClock(1000.0))
    assert cache.get() == "t1"
    cache.invalidate("t1")
    assert cache.get() == "t2"
    cache.invalidate("t1")  # a second thread that also saw t1 rejected
    assert cache.get() == "t2"


def test_a_401_invalidates_the_token_and_the_call_is_retried_once_with_a_new_one(requests_mock):
    token_calls = tokens(requests_mock, "t1", "t2")
    items = requests_mock.get(ITEMS, [{"status_code": 401, "json": {"error": "invalid_token"}},
                                      {"json": {"ok": True}}])
    upstream, waits = make(with_token=True)
    assert upstream.request("GET", "/v3/items") == {"ok": True}
    assert token_calls.call_count == 2
    assert [r.headers["Authorization"] for r in items.request_history] == ["Bearer t1", "Bearer t2"]
    assert waits == []


def test_a_second_401_after_the_refresh_is_an_error_with_status_401(requests_mock):
    tokens(requests_mock, "t1", "t2")
    items = requests_mock.get(ITEMS, status_code=401, json={"error": "invalid_token",
                                                            "error_description": "Access token expired"})
    upstream, _ = make(with_token=True)
    with pytest.raises(UpstreamError) as raised:
        upstream.request("GET", "/v3/items")
    assert raised.value.status == 401
    assert "Access token expired" in str(raised.value)
    assert items.call_count == 2


def test_a_post_that_gets_401_is_sent_again_once_after_a_token_refresh(requests_mock):
    tokens(requests_mock, "t1", "t2")
    orders = requests_mock.post(BASE + "/v3/orders", [{"status_code": 401}, {"json": {"orderId": "o"}}])
    upstream, _ = make(with_token=True)
    assert upstream.request("POST", "/v3/orders", json_body={}, idempotent=False) == {"orderId": "o"}
    assert orders.call_count == 2


def test_the_spring_token_shape_is_accepted(requests_mock):
    requests_mock.post(TOKEN_URL, json={"value": "spring-token", "tokenType": "bearer", "expiresIn": 1158})
    upstream, _ = make()
    assert fetch_client_token(upstream, "/oauth/token", "id", "secret") == ("spring-token", 1158.0)


@pytest.mark.parametrize("status, body", [
    (401, {"error": "invalid_client", "error_description": "Bad client credentials"}),
    (400, {"error": "invalid_client", "error_description": "Bad client credentials"}),
])
def test_rejected_credentials_are_an_upstream_error_with_status_401(requests_mock, status, body):
    requests_mock.post(TOKEN_URL, status_code=status, json=body)
    upstream, _ = make()
    with pytest.raises(UpstreamError) as raised:
        fetch_client_token(upstream, "/oauth/token", "id", "secret")
    assert raised.value.status == 401
    assert str(raised.value) == "cws: authentication failed: Bad client credentials (HTTP 401)"


@pytest.mark.parametrize("body, missing", [
    ({"expires_in": 3600}, "access_token"),
    ({"access_token": "t"}, "expires_in"),
    ({"access_token": "t", "expires_in": "soon"}, "expires_in"),
    (["not", "an", "object"], "access_token"),
])
def test_a_token_response_with_missing_fields_is_a_clear_error(requests_mock, body, missing):
    requests_mock.post(TOKEN_URL, json=body)
    upstream, _ = make()
    with pytest.raises(UpstreamError, match=missing):
        fetch_client_token(upstream, "/oauth/token", "id", "secret")


# --- retries ------------------------------------------------------------------------------

@pytest.mark.parametrize("failure", [
    {"status_code": 429}, {"status_code": 500}, {"status_code": 503},
    {"exc": requests.ConnectionError}, {"exc": requests.ReadTimeout},
])
def test_a_get_is_retried_on_429_5xx_connection_errors_and_timeouts(requests_mock, failure):
    items = requests_mock.get(ITEMS, [failure, failure, {"json": {"ok": 1}}])
    upstream, waits = make(retry_max=2)
    assert upstream.request("GET", "/v3/items") == {"ok": 1}
    assert items.call_count == 3
    assert len(waits) == 2


def test_backoff_uses_full_jitter_below_an_exponential_cap(requests_mock):
    requests_mock.get(ITEMS, status_code=500, json={"message": "boom"})
    upstream, waits = make(retry_max=6)
    with pytest.raises(UpstreamError) as raised:
        upstream.request("GET", "/v3/items")
    assert raised.value.retryable and raised.value.status == 500
    assert len(waits) == 6
    for retry, wait in enumerate(waits, start=1):
        assert 0 <= wait <= min(BACKOFF_CAP, 0.5 * 2 ** (retry - 1))


def test_a_get_gives_up_after_retry_max_retries(requests_mock):
    items = requests_mock.get(ITEMS, status_code=503)
    upstream, waits = make(retry_max=2)
    with pytest.raises(UpstreamError):
        upstream.request("GET", "/v3/items")
    assert items.call_count == 3


@pytest.mark.parametrize("header, wait", [("7", 7.0), ("120", 30.0), ("Wed, 21 Oct 2026 07:28:00 GMT", None)])
def test_retry_after_seconds_is_honoured_and_capped(requests_mock, header, wait):
    requests_mock.get(ITEMS, [{"status_code": 429, "headers": {"Retry-After": header}}, {"json": {}}])
    upstream, waits = make()
    upstream.request("GET", "/v3/items")
    if wait is None:  # the HTTP-date form falls back to the normal backoff
        assert 0 <= waits[0] <= 0.5
    else:
        assert waits == [wait]


@pytest.mark.parametrize("status", [400, 403, 404, 409, 422])
def test_other_4xx_are_never_retried(requests_mock, status):
    items = requests_mock.get(ITEMS, status_code=status, json={"message": "no"})
    upstream, waits = make()
    with pytest.raises(UpstreamError) as raised:
        upstream.request("GET", "/v3/items")
    assert (raised.value.status, raised.value.retryable) == (status, False)
    assert items.call_count == 1 and waits == []


def test_a_g2a_queue_full_400_is_retried_when_the_retryable_hook_says_so(requests_mock):
    url = "https://api.g2a.com/v3/sales/offers/1"
    body = {"errors": [{"code": "BR00", "message": "You have reached the limit of tasks in the queue"}]}
    offers = requests_mock.patch(url, [{"status_code": 400, "json": body}, {"json": {"data": {"jobId": "j"}}}])
    upstream = Upstream("g2a", "https://api.g2a.com", 5, 2, allowed_hosts=G2A_HOSTS, sleep=lambda s: None,
                        retryable=lambda r: "limit of tasks in the queue" in r.text)
    assert upstream.request("PATCH", "/v3/sales/offers/1", json_body={}) == {"data": {"jobId": "j"}}
    assert offers.call_count == 2


def test_a_retry_is_logged_at_warning_without_the_token(requests_mock, caplog):
    tokens(requests_mock, "tok-very-secret")
    requests_mock.get(ITEMS + "/7", [{"status_code": 503}, {"json": {}}])
    upstream, _ = make(with_token=True)
    with caplog.at_level(logging.WARNING, logger="bridge.upstream"):
        upstream.request("GET", "/v3/items/7", endpoint="/v3/items/{id}")
    [record] = caplog.records
    assert record.getMessage() == "upstream.retry"
    assert record.event_fields == {"service": "cws", "endpoint": "/v3/items/{id}", "status": 503, "attempt": 1,
                                   "wait": record.event_fields["wait"]}
    assert "tok-very-secret" not in caplog.text


# --- writes that must not be repeated -----------------------------------------------------

@pytest.mark.parametrize("failure", [
    {"status_code": 500, "json": {"message": "internal"}}, {"status_code": 502, "text": "<html>bad gateway"},
    {"exc": requests.ReadTimeout}, {"exc": requests.ConnectionError("Connection aborted")},
    {"status_code": 201, "text": "{not json"},
])
def test_a_post_order_that_may_have_happened_is_outcome_unknown_and_never_retried(requests_mock, failure):
    orders = requests_mock.post(BASE + "/v3/orders", [failure, {"json": {"orderId": "twice"}}])
    upstream, waits = make(retry_max=5)
    with pytest.raises(OutcomeUnknown):
        upstream.request("POST", "/v3/orders", json_body={"orderId": "g2a-1"}, idempotent=False)
    assert orders.call_count == 1 and waits == []


@pytest.mark.parametrize("failure", [requests.ConnectTimeout, refused()])
def test_a_post_that_never_connected_is_a_retryable_error_but_not_retried(requests_mock, failure):
    orders = requests_mock.post(BASE + "/v3/orders", exc=failure)
    upstream, waits = make(retry_max=5)
    with pytest.raises(UpstreamError) as raised:
        upstream.request("POST", "/v3/orders", json_body={}, idempotent=False)
    assert not isinstance(raised.value, OutcomeUnknown)
    assert raised.value.retryable
    assert orders.call_count == 1 and waits == []


def test_a_post_rate_limited_with_429_is_retryable_but_not_retried(requests_mock):
    orders = requests_mock.post(BASE + "/v3/orders", status_code=429)
    upstream, _ = make()
    with pytest.raises(UpstreamError) as raised:
        upstream.request("POST", "/v3/orders", json_body={}, idempotent=False)
    assert not isinstance(raised.value, OutcomeUnknown) and raised.value.retryable
    assert orders.call_count == 1


# --- bodies -------------------------------------------------------------------------------

def test_malformed_json_on_a_get_is_retried_then_an_upstream_error(requests_mock):
    items = requests_mock.get(ITEMS, text="<html>oops</html>")
    upstream, _ = make(retry_max=1)
    with pytest.raises(UpstreamError, match="malformed JSON") as raised:
        upstream.request("GET", "/v3/items")
    assert raised.value.retryable
    assert items.call_count == 2


def test_an_empty_2xx_body_is_an_empty_dict_and_a_list_body_is_returned(requests_mock):
    requests_mock.get(ITEMS, [{"status_code": 204, "text": ""}, {"json": [1, 2]}])
    upstream, _ = make()
    assert upstream.request("GET", "/v3/items") == {}
    assert upstream.request("GET", "/v3/items") == [1, 2]


@pytest.mark.parametrize("body, message, code", [
    ({"status": 400, "code": 10002, "message": "Balance too low", "moreInfo": "x"}, "Balance too low", 10002),
    ({"status": 404, "code": "20001", "message": "Product not found"}, "Product not found", 20001),
    ({"error": "invalid_token", "error_description": "Token expired"}, "Token expired", None),
    ({"error": "access_denied"}, "access_denied", None),
    ({"errors": [{"code": "BR03", "message": "Too many requests"}]}, "Too many requests", "BR03"),
    ("x" * 300, "x" * 200, None),
])
def test_the_error_message_and_code_come_from_the_body(requests_mock, body, message, code):
    requests_mock.get(ITEMS, status_code=400, **({"text": body} if isinstance(body, str) else {"json": body}))
    assert error_details(requests.get(ITEMS)) == (message, code)


def test_a_final_error_keeps_status_and_code(requests_mock):
    requests_mock.post(BASE + "/v3/orders", status_code=400, json={"code": 10002, "message": "Balance too low"})
    upstream, _ = make()
    with pytest.raises(UpstreamError) as raised:
        upstream.request("POST", "/v3/orders", json_body={}, idempotent=False)
    assert (raised.value.status, raised.value.code, raised.value.retryable) == (400, 10002, False)
    assert str(raised.value) == "cws: Balance too low (HTTP 400)"


# --- safety and plumbing ------------------------------------------------------------------

@pytest.mark.parametrize("url", ["http://evil.example", "https://evil.example", "http://api.codeswholesale.com",
                                 "https://codeswholesale.com.evil.example", "not a url"])
def test_the_base_url_must_be_https_on_an_expected_host(url):
    with pytest.raises(ConfigError):
        Upstream("cws", url, 5, 2, allowed_hosts=CWS_HOSTS)


@pytest.mark.parametrize("url", ["https://sandbox.codeswholesale.com", "http://127.0.0.1:81", "http://localhost:9"])
def test_https_on_a_cws_host_or_plain_http_on_loopback_is_accepted(url):
    assert Upstream("cws", url + "/", 5, 2, allowed_hosts=CWS_HOSTS).base_url == url


def test_redirects_are_not_followed(requests_mock):
    requests_mock.get(ITEMS, status_code=302, headers={"Location": "https://evil.example/steal"})
    evil = requests_mock.get("https://evil.example/steal", json={})
    upstream, _ = make()
    with pytest.raises(UpstreamError) as raised:
        upstream.request("GET", "/v3/items")
    assert raised.value.status == 302 and evil.call_count == 0


def test_requests_carry_accept_user_agent_and_the_configured_timeout(requests_mock):
    items = requests_mock.get(ITEMS, json={})
    upstream, _ = make(user_agent="g2a-bridge/test")
    upstream.request("GET", "/v3/items", params={"a": "1"})
    sent = items.last_request
    assert sent.headers["Accept"] == "application/json"
    assert sent.headers["User-Agent"] == "g2a-bridge/test"
    assert sent.timeout == (5, 5)
    assert sent.qs == {"a": ["1"]}


def test_one_session_per_upstream_with_a_pool_of_16():
    upstream, _ = make()
    assert upstream.session.get_adapter(BASE)._pool_maxsize >= 16


def test_the_observer_sees_every_attempt_with_status_and_endpoint(requests_mock):
    seen = []
    requests_mock.get(BASE + "/v3/orders/abc", [{"exc": requests.ReadTimeout}, {"exc": requests.ConnectionError},
                                                {"status_code": 500}, {"json": {}}])
    upstream, _ = make(retry_max=3, observer=lambda *args: seen.append(args))
    upstream.request("GET", "/v3/orders/abc", endpoint="/v3/orders/{id}")
    assert [(s, m, e, st, a) for s, m, e, st, _, a in seen] == [
        ("cws", "GET", "/v3/orders/{id}", "timeout", 1), ("cws", "GET", "/v3/orders/{id}", "error", 2),
        ("cws", "GET", "/v3/orders/{id}", 500, 3), ("cws", "GET", "/v3/orders/{id}", 200, 4)]
    assert all(seconds >= 0 for *_, seconds, _ in seen)


def test_a_failing_observer_does_not_fail_the_call(requests_mock):
    requests_mock.get(ITEMS, json={"ok": 1})

    def broken(*args):
        raise RuntimeError("metrics bug")
    upstream, _ = make(observer=broken)
    assert upstream.request("GET", "/v3/items") == {"ok": 1}


# --- budgets ------------------------------------------------------------------------------

def metered(clock, limit=2, window=60.0, name="cws_list"):
    return Budgets("worker", {name: Budget(name, limit, window, clock=clock, sleep=clock.sleep)})


def test_each_attempt_spends_the_budget_of_the_class_named_by_the_call_retries_included(requests_mock):
    clock = FakeClock(1000.0)
    requests_mock.get(ITEMS, [{"status_code": 503}, {"json": {}}, {"json": {}}])
    budgets = metered(clock)
    upstream, _ = make(budgets=budgets)
    upstream.request("GET", "/v3/items", budget="cws_list")
    assert clock.slept == []
    upstream.request("GET", "/v3/items", budget="cws_list")
    assert clock.slept == [60.0]
    assert budgets["cws_list"].requests == 3


def test_attempts_that_got_no_answer_give_their_slot_back_so_an_outage_leaves_the_class_unspent(requests_mock):
    clock = FakeClock(1000.0)
    requests_mock.get(ITEMS, [{"exc": refused()}, {"exc": requests.ConnectionError("dropped")},
                              {"exc": requests.ReadTimeout("black hole")}, {"json": {"ok": 1}}])
    budgets = metered(clock, limit=1)
    upstream, _ = make(budgets=budgets, retry_max=0)
    for _ in range(3):
        with pytest.raises(UpstreamError):
            upstream.request("GET", "/v3/items", budget="cws_list")
    assert budgets["cws_list"].window_use()[0] == 0
    assert upstream.request("GET", "/v3/items", budget="cws_list") == {"ok": 1}
    assert clock.slept == [] and budgets["cws_list"].window_use()[0] == 1


def test_a_call_without_a_class_is_not_metered(requests_mock):
    clock = FakeClock(1000.0)
    requests_mock.get(ITEMS, json={})
    upstream, _ = make(budgets=metered(clock, limit=1))
    for _ in range(5):
        upstream.request("GET", "/v3/items")
    assert clock.slept == []


def test_a_call_that_will_not_wait_raises_budget_spent_without_sending(requests_mock):
    clock = FakeClock(1000.0)
    items = requests_mock.get(ITEMS, json={})
    upstream, _ = make(budgets=metered(clock, limit=1))
    upstream.request("GET", "/v3/items", budget="cws_list", wait=False)
    with pytest.raises(BudgetSpent):
        upstream.request("GET", "/v3/items", budget="cws_list", wait=False)
    assert items.call_count == 1 and clock.slept == []


def test_a_429_holds_its_class_for_retry_after_before_the_retry(requests_mock):
    clock = FakeClock(1000.0)
    requests_mock.get(ITEMS, [{"status_code": 429, "headers": {"Retry-After": "45"}}, {"json": {"ok": 1}}])
    budgets = metered(clock, limit=100)
    upstream, waits = make(budgets=budgets)
    assert upstream.request("GET", "/v3/items", budget="cws_list") == {"ok": 1}
    assert clock.slept == [45.0] and waits == []  # the budget waited, not the retry loop
    assert budgets["cws_list"].throttles == 1


def test_a_429_slows_its_class_and_an_answer_ends_the_streak(requests_mock):
    clock = FakeClock(1000.0)
    requests_mock.get(ITEMS, [{"status_code": 429}, {"json": {}}])
    budgets = metered(clock, limit=100, window=100)
    upstream, _ = make(budgets=budgets)
    upstream.request("GET", "/v3/items", budget="cws_list")
    assert budgets["cws_list"].per_second < 1.0
    assert clock.slept == [0.25]  # no Retry-After: the budget's first backoff step
    assert not budgets["cws_list"].throttling


def test_an_absurd_retry_after_is_ignored(requests_mock):
    clock = FakeClock(1000.0)
    requests_mock.get(ITEMS, [{"status_code": 429, "headers": {"Retry-After": "999999"}}, {"json": {}}])
    upstream, _ = make(budgets=metered(clock, limit=100))
    upstream.request("GET", "/v3/items", budget="cws_list")
    assert clock.slept == [0.25]


def test_429s_beyond_the_retries_surface_as_a_retryable_error(requests_mock):
    clock = FakeClock(1000.0)
    requests_mock.get(ITEMS, status_code=429, headers={"Retry-After": "2"})
    budgets = metered(clock, limit=100)
    upstream, _ = make(budgets=budgets, retry_max=2)
    with pytest.raises(UpstreamError) as caught:
        upstream.request("GET", "/v3/items", budget="cws_list")
    assert caught.value.status == 429 and caught.value.retryable
    assert budgets["cws_list"].throttles == 3 and budgets["cws_list"].throttling


def test_a_caller_that_will_not_wait_still_waits_out_a_short_hold_before_its_retry(requests_mock):
    clock = FakeClock(1000.0)
    requests_mock.get(ITEMS, [{"status_code": 429, "headers": {"Retry-After": "3"}}, {"json": {"ok": 1}}])
    upstream, _ = make(budgets=metered(clock, limit=100))
    assert upstream.request("GET", "/v3/items", budget="cws_list", wait=False) == {"ok": 1}
    assert clock.slept == [3.0]


def test_a_caller_that_will_not_wait_gives_up_on_a_long_hold_and_others_are_not_sent_meanwhile(requests_mock):
    clock = FakeClock(1000.0)
    items = requests_mock.get(ITEMS, status_code=429, headers={"Retry-After": "120"})
    upstream, _ = make(budgets=metered(clock, limit=100))
    with pytest.raises(BudgetSpent):
        upstream.request("GET", "/v3/items", budget="cws_list", wait=False)
    with pytest.raises(BudgetSpent):
        upstream.request("GET", "/v3/items", budget="cws_list", wait=False)
    assert items.call_count == 1 and clock.slept == []
