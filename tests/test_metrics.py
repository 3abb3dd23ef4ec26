"""GET /metrics from the real web and worker processes against the simulator; request ids across both processes."""
import re
import threading
import time

import pytest
from polling import wait_for
from prometheus_client.parser import text_string_to_metric_families

from bridge import db
from bridge.budget import budgets_for
from bridge.config import Settings
from bridge.metrics import Metrics
from bridge.sharedwindow import SharedWindow
from conftest import DEMO, OUR_ID, OUR_SECRET, ROOT, SKYLINES, SWITCH

SKYLINES_CWS = DEMO[1]["cws_product_id"]
REMOTE = {"X-Forwarded-For": "203.0.113.7"}  # as the TLS proxy forwards a call from the internet


@pytest.fixture
def shop(start_bridge):
    """The web process and a worker on the same database."""
    web = start_bridge("web", ORDER_INLINE_WAIT_SECONDS="1")
    web.worker = start_bridge("worker")
    return web


def scrape(g2a, headers=None):
    """{(sample name, sorted label pairs): value} from /metrics, called directly on loopback."""
    answer = g2a.http.get(f"{g2a.base_url}/metrics", headers=headers, timeout=10)
    assert answer.status_code == 200, answer.text
    assert answer.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(answer.text) for sample in family.samples}


def value(samples, name, **labels):
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def moved(before, after, name, **labels):
    return value(after, name, **labels) - value(before, name, **labels)


def test_a_scripted_sale_moves_each_counter_by_what_happened(shop, sim):
    g2a = shop.g2a
    before = scrape(g2a)
    g2a.token()
    reservation_id = g2a.reserve((SWITCH, 1)).json()["reservation_id"]
    assert g2a.reserve((SWITCH, 500)).status_code == 400
    order = g2a.call("POST", "/order", {"reservation_id": reservation_id, "g2a_order_id": 4242})
    assert order.status_code == 200, order.text
    after = scrape(g2a)

    assert moved(before, after, "g2a_bridge_reservations_created_total", process="web") == 1
    assert moved(before, after, "g2a_bridge_reservations_refused_total", process="web", reason="out_of_stock") == 1
    assert moved(before, after, "g2a_bridge_orders", state="completed") == 1
    assert moved(before, after, "g2a_bridge_keys", state="delivered") == 1
    assert moved(before, after, "g2a_bridge_upstream_requests_total", process="web", service="cws",
                 method="POST", endpoint="/v3/orders", status="200") == 1
    inbound = {("GET", "/oauth/token", "200"): 1, ("POST", "/reservation", "200"): 1,
               ("POST", "/reservation", "400"): 1, ("POST", "/order", "200"): 1}
    for (method, route, status), count in inbound.items():
        assert moved(before, after, "g2a_bridge_http_requests_total", process="web", method=method, route=route,
                     status=status) == count, (method, route, status)
    assert value(after, "g2a_bridge_http_request_duration_seconds_count", process="web", method="POST",
                 route="/order") == 1
    assert value(after, "g2a_bridge_database_up") == 1


def test_routes_are_labelled_by_their_rule_and_unknown_paths_as_unmatched(shop):
    g2a = shop.g2a
    g2a.call("GET", "/order/some-order-id/inventory")
    g2a.call("GET", "/no/such/path")
    samples = scrape(g2a)
    assert value(samples, "g2a_bridge_http_requests_total", process="web", method="GET",
                 route="/order/<order_id>/inventory", status="404") == 1
    assert value(samples, "g2a_bridge_http_requests_total", process="web", method="GET", route="unmatched",
                 status="404") == 1
    assert not any("some-order-id" in str(labels) for _, labels in samples)


def test_the_worker_publishes_its_own_figures_with_process_worker(shop, sim):
    def synced():
        samples = scrape(shop.g2a)
        return value(samples, "g2a_bridge_sync_writes_total", process="worker", kind="full", result="ok") >= 2
    wait_for(synced, timeout=20, what="the worker's sync writes in /metrics")
    samples = scrape(shop.g2a)
    assert value(samples, "g2a_bridge_sync_passes_total", process="worker", kind="full", result="ok") >= 1
    assert value(samples, "g2a_bridge_upstream_token_age_seconds", process="worker", service="g2a") > 0
    assert value(samples, "g2a_bridge_worker_up") == 1
    assert value(samples, "g2a_bridge_offers", sync_state="in_sync") == 2
    assert value(samples, "g2a_bridge_sync_last_success_age_seconds") < 30
    web_writes = [key for key in samples if key[0] == "g2a_bridge_sync_writes_total" and ("process", "web") in key[1]]
    assert web_writes == []  # the web process never syncs, so it has no such series


def test_an_unauthenticated_scrape_through_the_proxy_is_refused_and_credentials_open_it(shop):
    g2a = shop.g2a
    refused = g2a.http.get(f"{g2a.base_url}/metrics", headers=REMOTE, timeout=10)
    assert refused.status_code == 401 and refused.json()["code"] == "AUTH01"
    assert scrape(g2a, headers={**REMOTE, "Authorization": f"Bearer {g2a.token()}"})
    basic = g2a.http.get(f"{g2a.base_url}/metrics", headers=REMOTE, auth=(OUR_ID, OUR_SECRET), timeout=10)
    assert basic.status_code == 200 and "g2a_bridge_orders" in basic.text
    wrong = g2a.http.get(f"{g2a.base_url}/metrics", headers=REMOTE, auth=(OUR_ID, "wrong"), timeout=10)
    assert wrong.status_code == 401 and wrong.json()["code"] == "AUTH02"


def test_a_request_id_follows_an_order_into_the_web_purchase_and_the_worker_polls(shop, sim):
    sim.cws.set_fulfilment(SKYLINES_CWS, "delayed", polls=10_000)
    reservation_id = shop.g2a.reserve((SKYLINES, 1)).json()["reservation_id"]
    answer = shop.g2a.call("POST", "/order", {"reservation_id": reservation_id, "g2a_order_id": 99001},
                           headers={"X-Request-Id": "g2a-trace-5150"})
    assert answer.status_code == 202 and answer.headers["X-Request-Id"] == "g2a-trace-5150"
    order_id = answer.json()["order_id"]
    placed = [line for line in shop.logs().splitlines() if "order.placed" in line and order_id in line]
    assert placed and all("request_id=g2a-trace-5150" in line for line in placed)

    sim.cws.complete_order(sim.cws.orders[0]["orderId"])
    wait_for(lambda: "order.completed" in shop.worker.logs(), timeout=15, what="the worker completing the order")
    polled = [line for line in shop.worker.logs().splitlines() if f"order={order_id}" in line]
    assert any("order.completed" in line for line in polled)
    assert all("request_id=g2a-trace-5150" in line for line in polled)


def test_metrics_answer_even_with_no_worker_and_say_so(start_bridge):
    samples = scrape(start_bridge("web").g2a)
    assert value(samples, "g2a_bridge_worker_up") == 0
    assert not any(name == "g2a_bridge_worker_heartbeat_age_seconds" for name, _ in samples)
    assert value(samples, "g2a_bridge_orders", state="completed") == 0 and value(samples, "g2a_bridge_paused") == 0



def test_every_metric_is_in_the_readme(database):
    text = Metrics("web").exposition(Settings(), db.utcnow()).decode()
    names = re.findall(r"^# TYPE (\S+) ", text, re.MULTILINE)
    section = (ROOT / "README.md").read_text().split("\n## Observability\n")[1].split("\n## ")[0]
    assert len(names) > 20 and [name for name in names if f"`{name}" not in section] == []


def test_budget_use_and_429s_per_endpoint_class_are_shown_for_each_process(shop, sim):
    sim.cws.fail_next("/v3/products", 429)
    def listed():
        samples = scrape(shop.g2a)
        return value(samples, "g2a_bridge_upstream_throttled_total", process="worker", **{"class": "cws_list"}) == 1
    wait_for(listed, timeout=20, what="the worker's 429 in /metrics")
    samples = scrape(shop.g2a)
    worker, web = {"process": "worker"}, {"process": "web"}
    assert value(samples, "g2a_bridge_upstream_budget_used", **worker, **{"class": "cws_list"}) >= 2
    assert value(samples, "g2a_bridge_upstream_budget_limit", **worker, **{"class": "cws_list"}) == 360
    assert value(samples, "g2a_bridge_upstream_budget_limit", **web, **{"class": "cws_product"}) == 243
    assert value(samples, "g2a_bridge_upstream_budget_limit", **web, **{"class": "cws_list"}) == 0
    assert value(samples, "g2a_bridge_upstream_budget_used", **worker, **{"class": "g2a"}) >= 1
    assert value(samples, "g2a_bridge_upstream_throttled_total", **web, **{"class": "cws_product"}) == 0


def test_publishing_while_the_sweep_takes_a_catalogue_slot_never_deadlocks(database, monkeypatch):
    """Taking a slot of the shared catalogue window holds the budget's lock, then waits for the writer lock;
    publishing reads every budget. If it held the writer lock while it read them, the two would wait on each
    other for ever: a worker froze that way with its heartbeat, sweep and balance reads stuck (CI, round 3)."""
    budgets = budgets_for(Settings(), "worker", alarm=lambda *args: None)
    metrics = Metrics("worker")
    metrics.watch_budgets(budgets)
    in_take, go_on = threading.Event(), threading.Event()
    real_take = SharedWindow.take

    def take_when_told(window, cap, held):
        in_take.set()
        go_on.wait(5)
        return real_take(window, cap, held)
    monkeypatch.setattr(SharedWindow, "take", take_when_told)
    sweep = threading.Thread(target=budgets["cws_list"].acquire, daemon=True)
    sweep.start()
    assert in_take.wait(5)
    publisher = threading.Thread(target=metrics.publish, daemon=True)
    publisher.start()
    time.sleep(0.2)  # the publisher is now waiting for the catalogue budget the sweep holds
    go_on.set()
    sweep.join(5)
    publisher.join(5)
    assert not sweep.is_alive() and not publisher.is_alive()
    assert db.get_setting("metrics.worker")
