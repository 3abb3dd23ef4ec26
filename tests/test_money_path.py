"""Issue 12, end to end: the ways the money path lost money, each played against the real web and worker
processes and the simulator (and what an operator now sees when money is stuck)."""
import json
import sqlite3
import threading
import time
from datetime import timedelta
from decimal import Decimal

import pytest

from bridge import db, migrations, stuck
from bridge.config import Settings
from conftest import SKYLINES, SWITCH, sqlite_steps
from test_cli import run_cli
from test_orders_e2e import eventually, inventory, keys_in

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


# --- 7. the loss alert has a sale price even when G2A sends none -----------------------------------

def test_a_purchase_above_break_even_alerts_a_loss_against_the_published_price_when_g2a_sends_none(
        shop, sim, fresh_db):
    published = Decimal("6.50")  # (5.02 + 0.50) / (1 - 0.15), rounded up
    eventually(lambda: fresh_db.Product.get_by_id(SKYLINES).offer_price == published, timeout=20)
    reservation_id = shop.g2a.reserve((SKYLINES, 1)).json()["reservation_id"]  # no additional_data.unit_price
    sim.cws.set_prices(SKYLINES_CWS, [(1, None, "6.00")])  # break-even is now 7.06, above what the buyer paid
    assert order(shop.g2a, reservation_id).status_code == 200
    (item,) = fresh_db.OrderItem.select()
    assert item.sale_price == published
    (alert,) = eventually(lambda: list(fresh_db.Alert.select().where(fresh_db.Alert.kind == "loss")))
    assert f"sold at {published}" in alert.text and "break-even after G2A's fee is 7.06" in alert.text


def test_step_20_adds_the_new_columns_to_a_database_made_before_them(tmp_path):
    database = db.connect(f"sqlite:///{tmp_path}/old.db")
    with db.write_transaction(database):
        database.create_tables(db.MODELS)
        database.execute_sql("DROP INDEX order_item_preorder_code_id")
        for table, column in (("reservation_line", "offer_price"), ("order_item", "preorder_code_id")):
            database.execute_sql(f"ALTER TABLE {table} DROP COLUMN {column}")
        database.create_tables([migrations.SchemaStep])
        migrations.SchemaStep.create(number=1, name="initial tables")
    migrations.migrate(database)
    assert "offer_price" in {c.name for c in database.get_columns("reservation_line")}
    assert "order_item_preorder_code_id" in {i.name for i in database.get_indexes("order_item")}
    migrations.migrate(database)  # applied once
    database.close()


# --- 6. a failed order gives back the returned keys it took from the pool --------------------------

def return_one_key(g2a, sim, g2a_order_id):
    """Buy one Skylines key and return it: it waits in the pool."""
    _, answer = reserve_and_order(g2a, SKYLINES, 1, g2a_order_id)
    (key,) = keys_in(answer.json()["stock"])
    assert g2a.call("DELETE", f"/order/{answer.json()['order_id']}/inventory?id[]={key['id']}").status_code == 204
    return key


def reserve_and_order(g2a, product, quantity, g2a_order_id):
    reservation_id = g2a.reserve((product, quantity)).json()["reservation_id"]
    return reservation_id, order(g2a, reservation_id, g2a_order_id)


def stock_seen(g2a, product):
    reservation = g2a.reserve((product, 1)).json()
    g2a.call("DELETE", f"/reservation/{reservation['reservation_id']}")
    return reservation["stock"][0]["inventory_size"] + 1


def test_an_order_cws_refuses_gives_its_pooled_key_back_and_the_next_order_uses_it(shop, sim, fresh_db):
    key = return_one_key(shop.g2a, sim, 1001)
    before = stock_seen(shop.g2a, SKYLINES)
    sim.cws.set_fulfilment(SKYLINES_CWS, "balance")
    _, refused = reserve_and_order(shop.g2a, SKYLINES, 2, 1002)
    assert refused.status_code == 202 and fresh_db.Order.get(fresh_db.Order.g2a_order_id == 1002).state == "failed"
    assert stock_seen(shop.g2a, SKYLINES) == before
    sim.cws.set_fulfilment(SKYLINES_CWS, "instant")
    purchases = len(sim.cws.orders)
    _, answer = reserve_and_order(shop.g2a, SKYLINES, 1, 1003)
    assert [k["value"] for k in keys_in(answer.json()["stock"])] == [key["value"]]
    assert len(sim.cws.orders) == purchases


# --- 5. no sales the CWS balance cannot pay for ----------------------------------------------------

def test_after_cws_refuses_a_purchase_for_balance_the_offer_goes_to_stock_0_until_the_balance_is_back(
        shop, sim, fresh_db):
    eventually(lambda: (sim.g2a.offer_for_product(SKYLINES) or {}).get("active"), timeout=20)
    sim.cws.balance = Decimal("0.00")
    _, refused = reserve_and_order(shop.g2a, SKYLINES, 1, 2001)
    assert refused.status_code == 202
    assert fresh_db.Order.get(fresh_db.Order.g2a_order_id == 2001).state == "failed"
    answer = shop.g2a.reserve((SKYLINES, 1))
    assert answer.status_code == 400 and answer.json()["stock"] == [{"product_id": SKYLINES, "inventory_size": 0}]
    offer = eventually(lambda: (o := sim.g2a.offer_for_product(SKYLINES)) and not o["active"] and o, timeout=20)
    assert offer["inventory"]["size"] == 0
    sim.cws.balance = Decimal("1000.00")  # topped up: the worker reads a low balance again every 30 s
    offer = eventually(lambda: (o := sim.g2a.offer_for_product(SKYLINES)) and o["active"] and o, timeout=60)
    assert offer["inventory"]["size"] > 0 and shop.g2a.reserve((SKYLINES, 1)).status_code == 200


# --- 4. CWS_TARGET_CURRENCY is not a label: anything but EUR is refused -----------------------------

@pytest.mark.parametrize("command", ["web", "worker", "sync"])
def test_a_currency_other_than_eur_stops_every_command_before_it_prices_anything(bridge_env, sim, command):
    done = run_cli({**bridge_env, "CWS_TARGET_CURRENCY": "GBP"}, command)
    assert done.returncode == 2
    assert "CWS_TARGET_CURRENCY: only EUR is supported, got 'GBP'" in done.stderr
    assert sim.g2a.patches == [] and sim.cws.requests["GET /v3/products"] == 0


# --- re-send grace and history: an order CWS took is never bought again ----------------------------

QUICK_GRACE = {"CWS_TIMEOUT_MS": "300", "CWS_RESEND_GRACE_SECONDS": "2",  # grace max(2, 6 x 0.3) = 2 s
               "ORDER_INLINE_WAIT_SECONDS": "1"}  # the worker checks a claim 6 s after it


def test_a_purchase_cws_never_took_is_sent_again_after_cws_resend_grace_seconds(start_bridge, sim):
    web = start_bridge("web", **QUICK_GRACE)
    start_bridge("worker", **QUICK_GRACE)
    sim.cws.fail_next("/v3/orders", 503)  # CWS answers 5xx and stores nothing: the outcome is unknown to us
    reservation_id = web.g2a.reserve((SWITCH, 1)).json()["reservation_id"]
    assert order(web.g2a, reservation_id).status_code == 202
    keys = eventually(lambda: keys_in(inventory(web.g2a, reservation_id)), timeout=20)
    assert len(keys) == 1 and [o["clientOrderId"] for o in sim.cws.orders] == ["g2a-80201000000192"]


def test_an_order_cws_shows_only_after_a_history_lag_within_the_grace_is_adopted_not_bought_again(
        start_bridge, sim):
    env = {"CWS_TIMEOUT_MS": "300", "CWS_RESEND_GRACE_SECONDS": "12", "ORDER_INLINE_WAIT_SECONDS": "1"}
    web = start_bridge("web", **env)
    worker = start_bridge("worker", **env)
    sim.cws.history_lag = 8.0  # the first look-up (6 s after the claim) finds nothing; the next (16 s) does
    sim.cws.set_fulfilment(SWITCH_CWS, "commit_then_500")
    reservation_id = web.g2a.reserve((SWITCH, 1)).json()["reservation_id"]
    assert order(web.g2a, reservation_id).status_code == 202
    sim.cws.set_fulfilment(SWITCH_CWS, "instant")
    eventually(lambda: keys_in(inventory(web.g2a, reservation_id)), timeout=30)
    assert "order.not_at_cws_yet" in worker.logs() and "how=adopted" in worker.logs()
    assert len(sim.cws.orders_for_client_id("g2a-80201000000192")) == 1


def test_an_order_on_page_three_of_cws_history_is_adopted_not_bought_again(start_bridge, sim):
    web = start_bridge("web", **QUICK_GRACE)
    start_bridge("worker", **QUICK_GRACE)
    for g2a_order_id in (3001, 3002):
        assert reserve_and_order(web.g2a, SWITCH, 1, g2a_order_id)[1].status_code == 200
    sim.cws.history_page_size = 1
    sim.cws.set_fulfilment(SWITCH_CWS, "commit_then_500")
    reservation_id, answer = reserve_and_order(web.g2a, SWITCH, 1, 3003)
    assert answer.status_code == 202
    sim.cws.set_fulfilment(SWITCH_CWS, "instant")
    eventually(lambda: keys_in(inventory(web.g2a, reservation_id)), timeout=20)
    time.sleep(3)  # past the grace: a re-send would have happened by now
    assert len(sim.cws.orders_for_client_id("g2a-3003")) == 1


# --- 2. an unresolved claim is stuck money: deadline, alert, status, metrics ------------------------

def stuck_figures(env):
    done = run_cli(env, "status", "--json")
    return done.returncode, json.loads(done.stdout)


def test_a_claim_cws_took_but_whose_history_is_unreadable_is_alerted_shown_and_resolved_by_retry(
        start_bridge, bridge_env, sim, fresh_db):
    env = QUICK_GRACE
    web = start_bridge("web", **env)
    worker = start_bridge("worker", **env)
    sim.cws.set_fulfilment(SWITCH_CWS, "commit_then_500")  # CWS stores the purchase and answers 500...
    sim.cws.history_status = 500  # ...and its history answers 500 too
    reservation_id = web.g2a.reserve((SWITCH, 1)).json()["reservation_id"]
    order_id = order(web.g2a, reservation_id).json()["order_id"]
    (alert,) = eventually(lambda: list(fresh_db.Alert.select().where(fresh_db.Alert.kind == "order_stuck")),
                          timeout=20)
    assert f"order {order_id}" in alert.text and f"g2a-bridge retry {order_id}" in alert.text
    code, figures = stuck_figures({**bridge_env, **env})
    line = figures["stuck"]["claim_unresolved"]
    assert code == 1 and (line["count"], line["oldest_order"]) == (1, order_id)
    assert any(f"g2a-bridge retry {order_id}" in text for text in figures["attention"])
    assert 'g2a_bridge_orders_stuck{kind="claim_unresolved"} 1.0' in web.g2a.call("GET", "/metrics").text
    worker.stop()  # the operator's command resolves it here, not the worker's next look-up
    retried = run_cli({**bridge_env, **env}, "retry", order_id)
    assert retried.returncode == 1 and "history is unreachable; nothing was sent" in retried.stderr
    sim.cws.set_fulfilment(SWITCH_CWS, "instant")
    sim.cws.history_status = None
    retried = run_cli({**bridge_env, **env}, "retry", order_id)
    assert retried.returncode == 0 and retried.stdout.startswith(f"order {order_id}: completed"), retried
    assert len(keys_in(inventory(web.g2a, order_id))) == 1 and len(sim.cws.orders) == 1
    assert stuck_figures({**bridge_env, **env})[1]["stuck"]["claim_unresolved"]["count"] == 0


# --- 3. a pre-order we did not ask for is followed closely, and overdue ones are stuck money -----------

def test_a_key_cws_assigns_to_a_pre_order_we_did_not_ask_for_reaches_g2a_within_seconds(shop, sim):
    sim.cws.set_fulfilment(SWITCH_CWS, "late_preorder")  # placeholder despite allowPreOrder=false...
    sim.cws.preorder_seconds = 3.0  # ...and the real key 3 s later
    reservation_id, answer = reserve_and_order(shop.g2a, SWITCH, 1, 4001)
    assert answer.status_code == 202 and keys_in(answer.json()["stock"]) == []
    assigned = time.monotonic() + 3.0 - 1.0  # the POST answered about a second after CWS made the order
    eventually(lambda: keys_in(inventory(shop.g2a, reservation_id)), timeout=15)
    assert time.monotonic() - assigned < 8  # was 300 s (one check per 5 min)


def test_an_overdue_pre_order_is_alerted_and_shown_as_stuck(start_bridge, bridge_env, sim, fresh_db):
    env = {"CWS_POLL_MAX_SECONDS": "2", "ORDER_INLINE_WAIT_SECONDS": "1"}
    web = start_bridge("web", **env)
    start_bridge("worker", **env)
    sim.cws.set_fulfilment(SWITCH_CWS, "late_preorder")
    sim.cws.preorder_seconds = 10_000
    order_id = reserve_and_order(web.g2a, SWITCH, 1, 4002)[1].json()["order_id"]
    (alert,) = eventually(lambda: list(fresh_db.Alert.select().where(fresh_db.Alert.kind == "order_stuck")),
                          timeout=20)
    assert "preorder_overdue" in alert.text and f"g2a-bridge retry {order_id}" in alert.text
    code, figures = stuck_figures({**bridge_env, **env})
    assert code == 1 and figures["stuck"]["preorder_overdue"]["count"] == 1
    assert 'g2a_bridge_orders_stuck{kind="preorder_overdue"} 1.0' in web.g2a.call("GET", "/metrics").text
    assert fresh_db.Order.get_by_id(order_id).state == "preorder"  # CWS charged: waiting, never failed


def test_a_preorder_postback_carrying_only_the_code_id_delivers_the_key_at_once(start_bridge, sim):
    web = start_bridge("web", CWS_ALLOW_PREORDER="true")
    start_bridge("worker", CWS_ALLOW_PREORDER="true")  # welcome pre-orders are checked every 5 min
    sim.cws.set_fulfilment(SWITCH_CWS, "preorder")
    reservation_id, answer = reserve_and_order(web.g2a, SWITCH, 1, 4003)
    assert answer.status_code == 202
    (cws_order,) = sim.cws.orders
    (placeholder,) = cws_order["products"][0]["codes"]
    time.sleep(1.0)
    sim.cws.complete_order(cws_order["orderId"])
    body = sim.cws.postback("PREORDER", codeId=placeholder["codeId"])
    assert web.g2a.call("POST", "/cws/postback", body, auth=False).status_code == 200
    eventually(lambda: keys_in(inventory(web.g2a, reservation_id)), timeout=5)


# --- bundles: decided from the complete code set --------------------------------------------------

def test_bundle_codes_cws_assigns_one_by_one_reach_g2a_as_whole_bundles(shop, sim):
    sim.cws.codes_per_unit = 2  # every unit is two keys: a random-key bundle
    sim.cws.set_fulfilment(SWITCH_CWS, "late_preorder")
    sim.cws.preorder_seconds = 1.5  # one code more every 1.5 s: the first unit is half there for a while
    reservation_id, answer = reserve_and_order(shop.g2a, SWITCH, 2, 4004)
    assert answer.status_code == 202
    keys = eventually(lambda: keys_in(inventory(shop.g2a, reservation_id)), timeout=20)
    codes = [code["code"] for code in sim.cws.orders[0]["products"][0]["codes"]]
    name = sim.cws.orders[0]["products"][0]["name"]
    assert [key["value"] for key in keys] == [f"{name} | {codes[0]} / {name} | {codes[1]}",
                                              f"{name} | {codes[2]} / {name} | {codes[3]}"]


# --- fewer codes than ordered: retry buys exactly the missing units, under a new id -----------------

def test_retry_of_an_order_cws_completed_with_a_code_short_buys_exactly_the_missing_unit_once(
        start_bridge, bridge_env, sim, fresh_db):
    env = {"CWS_POLL_MAX_SECONDS": "2", "ORDER_INLINE_WAIT_SECONDS": "1"}
    web = start_bridge("web", **env)
    start_bridge("worker", **env)
    sim.cws.set_fulfilment(SKYLINES_CWS, "short")  # Completed with one code fewer than ordered
    reservation_id, answer = reserve_and_order(web.g2a, SKYLINES, 3, 5001)
    order_id = answer.json()["order_id"]
    eventually(lambda: fresh_db.Order.get_by_id(order_id).state == "failed", timeout=20)
    sim.cws.set_fulfilment(SKYLINES_CWS, "instant")
    retried = run_cli({**bridge_env, **env}, "retry", order_id)
    assert retried.returncode == 0 and retried.stdout.startswith(f"order {order_id}: completed"), retried
    keys = keys_in(inventory(web.g2a, order_id))
    bought = [(o["clientOrderId"], len(o["products"][0]["codes"])) for o in sim.cws.orders]
    assert bought == [("g2a-5001", 2), ("g2a-5001-2", 1)]
    assert sorted(k["value"] for k in keys) == sorted(c["code"] for o in sim.cws.orders
                                                      for c in o["products"][0]["codes"])
    again = run_cli({**bridge_env, **env}, "retry", order_id)
    assert again.returncode == 1 and "nothing to retry" in again.stderr and len(sim.cws.orders) == 2


# --- a repeated order: 409 with the existing order id as a field -----------------------------------

def test_a_repeated_order_is_409_carrying_the_existing_order_id_as_a_field(start_bridge, sim):
    g2a = start_bridge("web").g2a
    reservation_id, first = reserve_and_order(g2a, SWITCH, 1, 6001)
    for body in ({"reservation_id": reservation_id, "g2a_order_id": 6001},
                 {"reservation_id": reservation_id, "g2a_order_id": 6002},
                 {"reservation_id": g2a.reserve((SWITCH, 1)).json()["reservation_id"], "g2a_order_id": 6001}):
        again = g2a.call("POST", "/order", body)
        assert again.status_code == 409 and again.json()["code"] == "BR02"
        assert again.json()["order_id"] == first.json()["order_id"] and again.json()["message"]
    assert len(sim.cws.orders) == 1


# --- expiry is judged at commit time ---------------------------------------------------------------

def test_an_order_that_waited_past_the_reservation_expiry_for_the_database_is_410(
        start_bridge, bridge_env, sim):
    g2a = start_bridge("web", RESERVATION_TTL_MINUTES="0.02").g2a  # 1.2 s
    reservation_id = g2a.reserve((SWITCH, 1)).json()["reservation_id"]
    g2a.token()
    blocker = sqlite3.connect(bridge_env["DATABASE_URL"][len("sqlite:///"):], timeout=10)
    blocker.execute("BEGIN IMMEDIATE")  # another writer holds the database while the order arrives in time
    answers = []
    posting = threading.Thread(target=lambda: answers.append(order(g2a, reservation_id)))
    posting.start()
    time.sleep(2.0)  # the reservation expires while the order waits for the write lock
    blocker.rollback()
    posting.join()
    assert answers[0].status_code == 410, answers[0].text
    assert sim.cws.orders == []


def test_finding_stuck_money_reads_the_candidate_orders_not_every_order_item(database):
    settings = Settings(cws_resend_grace=150.0, cws_poll_max=420.0)
    held = make_order("failed-pool", db.FAILED, 0)
    db.OrderItem.create(id="i-held", order=held, position=0, g2a_product_id=1, cws_product_id="c", source="pool")

    def delivered(count, start):  # completed orders, half of them with a key from the pool
        for n in range(start, start + count):
            make_order(f"done-{n}", db.COMPLETED, 60)
        db.OrderItem.insert_many([{"id": f"i-{n}", "order": f"done-{n}", "position": 0, "g2a_product_id": 1,
                                   "cws_product_id": "c", "source": "pool" if n % 2 else "cws"}
                                  for n in range(start, start + count)]).execute()
    delivered(200, 0)
    steps = sqlite_steps(lambda: stuck.find(settings, db.utcnow()))
    delivered(2000, 200)  # ten times the history
    assert sqlite_steps(lambda: stuck.find(settings, db.utcnow())) <= steps * 1.5 + 2
    assert [o.id for o in stuck.find(settings, db.utcnow())["failed_holding_pooled_keys"]] == ["failed-pool"]


# --- no CWS price band for one key: nothing to sell ------------------------------------------------

def test_a_product_without_a_cws_price_for_one_key_is_not_reserved_whatever_g2a_says_it_pays(start_bridge, sim):
    sim.cws.set_prices(SKYLINES_CWS, [(10, None, "4.00")])  # bands from 10 keys up: no cost for a G2A sale
    g2a = start_bridge("web", STOCK_MAX_AGE_SECONDS="0").g2a
    answer = g2a.call("POST", "/reservation", [{"product_id": SKYLINES, "quantity": 1,
                                                "additional_data": {"unit_price": "1.00"}}])
    assert answer.status_code == 400, answer.text
    assert answer.json()["stock"] == [{"product_id": SKYLINES, "inventory_size": 0}]


# --- stuck money: each kind, its deadline, and the command that resolves it (in-process) ------------

def make_order(order_id, state, age, **fields):
    now = db.utcnow()
    db.Reservation.create(id=f"r-{order_id}", expires_at=now)
    return db.Order.create(id=order_id, reservation=f"r-{order_id}", g2a_order_id=abs(hash(order_id)) % 10**9,
                           state=state, cws_client_order_id=f"g2a-{order_id}", created_at=now - timedelta(seconds=age),
                           **fields)


def test_each_kind_of_stuck_money_has_its_deadline_and_command(database):
    settings = Settings(cws_resend_grace=150.0, cws_poll_max=420.0)
    make_order("young-claim", db.CLAIMED, 299)
    make_order("old-claim", db.CLAIMED, 301)
    make_order("preorder", db.PREORDER, 421)
    make_order("failed", db.FAILED, 0)
    held = make_order("failed-pool", db.FAILED, 0)
    db.OrderItem.create(id="i1", order=held, position=0, g2a_product_id=1, cws_product_id="c", source="pool",
                        state="delivered")
    make_order("slow", db.FULFILLING, 841)
    found = {kind: [order.id for order in orders] for kind, orders in stuck.find(settings, db.utcnow()).items()}
    assert found == {"claim_unresolved": ["old-claim"], "preorder_overdue": ["preorder"],
                     "failed_holding_pooled_keys": ["failed-pool"], "undelivered": ["slow", "failed"]}  # oldest first
    summary = stuck.summary(settings, db.utcnow())
    assert summary["claim_unresolved"]["deadline_seconds"] == 300
    assert "g2a-bridge retry old-claim" in summary["claim_unresolved"]["command"]
    welcome = stuck.find(settings.replace(cws_allow_preorder=True), db.utcnow())
    assert welcome["preorder_overdue"] == []  # pre-orders the seller asked for wait for their release day
    assert stuck.alert_new(settings, db.utcnow()) == 3 and stuck.alert_new(settings, db.utcnow()) == 0
