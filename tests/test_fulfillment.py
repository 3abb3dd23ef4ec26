"""Fulfilment in-process against the simulator: claim, purchase, keys, polling, recovery, returns, retry."""
import base64
import functools
import json
import logging
from datetime import timedelta
from decimal import Decimal

import pytest

from bridge import claims, db, migrations, postbacks
from bridge.contract import Line
from bridge.crypto import KeyBox
from bridge.cws import CwsClient, CwsCode
from bridge.errors import BridgeError, ContractError
from bridge.fulfillment import Fulfilment
from bridge.keys import KeyStore, assignments, mask
from bridge.log import REQUEST_ID
from bridge.pause import PauseSwitch
from bridge.products import apply_mapping, load_mapping
from bridge.refresh import StockRefresher
from bridge.reservations import Reservations
from conftest import SECRET_KEY, SKYLINES, SWITCH
from fakes import FakeClock
from concurrently import run_together

SWITCH_CWS, SKYLINES_CWS = "466c805b-ead1-4851-bc4f-9eda242550ad", "067ccfe1-655a-4a1f-8362-c655bb9bbf95"
G2A_ORDER = 80201000000192
BACKENDS = ("sqlite", "postgresql")  # each test runs on both databases (conftest.py)


class Shop:
    """The bridge's domain objects on one database, and G2A's view of them."""

    def __init__(self, settings, sim, **options):
        self.sim, self.settings = sim, settings
        self.cws = CwsClient(settings)
        self.reservations = Reservations(settings, StockRefresher(self.cws, 0), PauseSwitch())
        self.clock = FakeClock()
        self.box = KeyBox(SECRET_KEY)
        self.service = self.fulfilment(**options)
        self.next_g2a_order = G2A_ORDER

    def fulfilment(self, cws=None, **options):
        return Fulfilment(self.settings, cws or self.cws, self.box, sleep=self.clock.sleep, clock=self.clock,
                          background=lambda work, *args: work(*args), **options)

    def reserve(self, product=SWITCH, quantity=1, unit_price=None, now=None):
        lines = [Line(product, quantity, None if unit_price is None else Decimal(unit_price))]
        return self.reservations.reserve(lines, now or db.utcnow())["reservation_id"]

    def order(self, product=SWITCH, quantity=1, now=None, **options):
        """Reserve and order; (status, body)."""
        self.next_g2a_order += 1
        reservation_id = self.reserve(product, quantity, **options)
        return self.service.create_order(reservation_id, self.next_g2a_order, now or db.utcnow(), "req-1")

    def cws_orders(self, order_id):
        return self.sim.cws.orders_for_client_id(db.Order.get_by_id(order_id).cws_client_order_id)

    def alerts(self, kind):
        return [alert.text for alert in db.Alert.select().where(db.Alert.kind == kind)]


@pytest.fixture
def shop(settings, sim):
    database = migrations.open_database(settings.database_url)
    apply_mapping(load_mapping(settings.products_file, settings.default_fixed_profit, settings.default_fee))
    yield Shop(settings.replace(order_inline_wait=5.0), sim)
    database.close()


def keys_of(body):
    return [line for entry in body["stock"] for line in entry["inventory"]]


def state(order_id):
    return db.Order.get_by_id(order_id).state


def later(seconds):
    return db.utcnow() + timedelta(seconds=seconds)


# --- POST /order ---------------------------------------------------------------------------------

def test_an_instant_cws_order_answers_200_with_its_key_stored_encrypted(shop, sim):
    status, body = shop.order(SWITCH, 2)
    assert status == 200
    assert body["stock"][0]["product_id"] == SWITCH and body["stock"][0]["inventory_size"] == 23
    keys = keys_of(body)
    assert len(keys) == 2 and all(k["kind"] == "text" and k["value"].startswith("SIM-") for k in keys)
    cws_orders = shop.cws_orders(body["order_id"])
    assert len(cws_orders) == 1 and cws_orders[0]["clientOrderId"] == f"g2a-{G2A_ORDER + 1}"
    stored = db.OrderItem.get_by_id(keys[0]["id"])
    assert keys[0]["value"] not in stored.secret and stored.fingerprint == shop.box.fingerprint(keys[0]["value"])
    assert stored.unit_cost == Decimal("5.3") and state(body["order_id"]) == db.COMPLETED


def test_the_purchase_is_sent_without_pre_orders_and_without_a_price_cap(shop, sim):
    captured = []
    original = shop.cws.place_order
    shop.cws.place_order = lambda *args, **options: captured.append(args) or original(*args, **options)
    shop.order(SKYLINES, 3)
    assert captured[0][1:] == ([(SKYLINES_CWS, 3, None)], False)


def test_a_reservation_becomes_used_and_its_stock_turns_into_the_purchase(shop, sim):
    reservation_id = shop.reserve(SKYLINES, 3)
    status, body = shop.service.create_order(reservation_id, 1, db.utcnow())
    assert db.Reservation.get_by_id(reservation_id).state == "ordered"
    assert not db.ReservationLine.select().where(db.ReservationLine.active == True).exists()  # noqa: E712
    assert db.CwsProduct.get_by_id(SKYLINES_CWS).quantity == 5
    assert body["stock"][0]["inventory_size"] == 5


def test_a_second_order_for_the_same_reservation_is_409_and_never_buys_again(shop, sim):
    reservation_id = shop.reserve()
    first_status, first = shop.service.create_order(reservation_id, 7, db.utcnow())
    with pytest.raises(ContractError) as again:
        shop.service.create_order(reservation_id, 7, db.utcnow())
    assert (first_status, again.value.status) == (200, 409)
    assert first["order_id"] in again.value.message
    assert len(sim.cws.orders) == 1
    assert keys_of({"stock": shop.service.inventory(first["order_id"])}) == keys_of(first)


def test_a_g2a_order_id_that_already_has_an_order_is_409(shop, sim):
    shop.service.create_order(shop.reserve(), 7, db.utcnow())
    with pytest.raises(ContractError) as again:
        shop.service.create_order(shop.reserve(), 7, db.utcnow())
    assert again.value.status == 409 and len(sim.cws.orders) == 1


def test_an_expired_reservation_is_410_and_an_unknown_one_404(shop, sim):
    reservation_id = shop.reserve()
    with pytest.raises(ContractError) as expired:
        shop.service.create_order(reservation_id, 7, later(shop.settings.reservation_ttl + 1))
    with pytest.raises(ContractError) as unknown:
        shop.service.create_order("no-such-reservation", 8, db.utcnow())
    assert (expired.value.status, unknown.value.status) == (410, 404)
    assert sim.cws.orders == []


def test_expiry_is_judged_when_the_claim_holds_the_lock_not_when_the_request_arrived(shop, sim):
    reservation_id = shop.reserve()
    arrived = db.utcnow()
    with pytest.raises(ContractError) as expired:
        claims.claim(reservation_id, 7, arrived, clock=lambda: later(shop.settings.reservation_ttl + 1))
    assert expired.value.status == 410
    assert claims.claim(reservation_id, 7, arrived, clock=lambda: arrived).state == db.CLAIMED


def test_a_released_reservation_is_410(shop, sim):
    reservation_id = shop.reserve()
    shop.reservations.release(reservation_id)
    with pytest.raises(ContractError) as gone:
        shop.service.create_order(reservation_id, 7, db.utcnow())
    assert gone.value.status == 410


def test_concurrent_orders_for_one_reservation_buy_exactly_once(shop, sim):
    reservation_id = shop.reserve()
    results = []

    def buyer(g2a_order_id):
        try:
            results.append(shop.service.create_order(reservation_id, g2a_order_id, db.utcnow())[0])
        except ContractError as err:
            results.append(err.status)
    run_together(*(functools.partial(buyer, n % 2 + 1) for n in range(8)))
    assert sorted(results) == [200] + [409] * 7
    assert len(sim.cws.orders) == 1


def test_a_price_rise_since_the_reservation_still_delivers_and_alerts_a_loss(shop, sim):
    reservation_id = shop.reserve(SWITCH, 1, unit_price="6.24")  # break-even at 5.30 with G2A's 15 %
    sim.cws.set_prices(SWITCH_CWS, [(1, None, "6.00")])
    status, body = shop.service.create_order(reservation_id, 7, db.utcnow())
    assert status == 200 and len(keys_of(body)) == 1
    (text,) = shop.alerts("loss")
    assert "6.00" in text and "6.24" in text and "7.06" in text


def test_a_sale_above_break_even_raises_no_loss_alert(shop, sim):
    shop.order(SWITCH, 1, unit_price="9.99")
    assert shop.alerts("loss") == []


# --- waiting for codes -------------------------------------------------------------------------

def test_a_delayed_order_completing_within_the_inline_budget_answers_200(shop, sim):
    sim.cws.set_fulfilment(SWITCH_CWS, "delayed", polls=2)
    status, body = shop.order()
    assert status == 200 and len(keys_of(body)) == 1
    assert shop.clock.slept[:3] == [0.5, 1.0, 1.0] and sum(shop.clock.slept) <= 5.0


def cws_calls_take(shop, seconds):
    """Each CWS purchase and order read costs `seconds` on the shop's clock, as a real CWS's do."""
    for name in ("place_order", "order"):
        call = getattr(shop.cws, name)
        setattr(shop.cws, name, lambda *args, call=call, **kwargs: shop.clock.sleep(seconds) or call(*args, **kwargs))


def test_an_order_cws_completes_after_4_5_s_still_answers_200_within_the_default_5_s(shop, sim):
    cws_calls_take(shop, 0.2)
    sim.cws.set_fulfilment(SWITCH_CWS, "delayed", polls=4)  # the keys come with the fifth read, at ~4.7 s
    status, _ = shop.order()
    assert status == 200
    assert shop.clock() <= 5.0


@pytest.mark.parametrize("setting, budget", [(5.0, 5.0), (2.0, 2.0), (30.0, 7.0)])
def test_a_slow_order_is_re_read_for_the_whole_inline_wait_up_to_the_7_s_cap(shop, sim, setting, budget):
    cws_calls_take(shop, 0.2)
    sim.cws.set_fulfilment(SWITCH_CWS, "delayed", polls=100)
    shop.settings = shop.settings.replace(order_inline_wait=setting)
    shop.service = shop.fulfilment()
    status, _ = shop.order()
    assert status == 202
    assert budget - 0.35 <= shop.clock() <= budget


def test_a_slow_order_answers_202_and_the_worker_delivers_the_keys_later(shop, sim):
    sim.cws.set_fulfilment(SWITCH_CWS, "delayed", polls=20)
    status, body = shop.order(SWITCH, 2)
    assert status == 202 and body["stock"][0]["inventory"] == [] and sum(shop.clock.slept) <= 5.0
    order = db.Order.get_by_id(body["order_id"])
    assert order.state == db.FULFILLING and shop.service.inventory(order.id)[0]["inventory"] == []
    item_ids = [item.id for item in db.OrderItem.select().where(db.OrderItem.order == order.id)]
    sim.cws.complete_order(order.cws_order_id)
    assert shop.service.poll_due(later(10)) == 1  # the inline wait took 5 s on the test's clock
    keys = shop.service.inventory(order.id)[0]["inventory"]
    assert [key["id"] for key in keys] == item_ids and all(key["value"] for key in keys)
    assert shop.service.inventory(str(order.g2a_order_id)) == shop.service.inventory(order.reservation_id)


def test_young_orders_are_polled_every_second_and_older_ones_less_often(shop, sim):
    sim.cws.set_fulfilment(SWITCH_CWS, "delayed", polls=1000)
    _, body = shop.order()
    order = db.Order.get_by_id(body["order_id"])
    for age, gap in ((3, 1.0), (50, 5.0), (200, 10.0)):
        now = order.placed_at + timedelta(seconds=age)
        db.Order.update(next_check_at=now).where(db.Order.id == order.id).execute()
        assert shop.service.poll_due(now) == 1
        assert (db.Order.get_by_id(order.id).next_check_at - now).total_seconds() == pytest.approx(gap)
    assert shop.service.poll_due(order.placed_at + timedelta(seconds=205)) == 0  # not due: left alone


def test_an_order_cws_never_delivers_fails_after_the_poll_limit_with_an_alert(shop, sim):
    sim.cws.set_fulfilment(SWITCH_CWS, "delayed", polls=1000)
    _, body = shop.order()
    shop.service.poll_due(later(shop.settings.cws_poll_max + 5))
    assert state(body["order_id"]) == db.FAILED
    assert "did not deliver" in shop.alerts("order_failed")[0]
    with pytest.raises(ContractError) as failed:
        shop.service.inventory(body["order_id"])
    assert failed.value.status == 500 and failed.value.code == "ERR99"


def test_a_cancelled_cws_order_fails_with_an_alert_and_inventory_answers_500(shop, sim):
    sim.cws.set_fulfilment(SWITCH_CWS, "fail")
    status, body = shop.order()
    assert status == 202 and state(body["order_id"]) == db.FAILED
    assert "Cancelled" in db.Order.get_by_id(body["order_id"]).failure and shop.alerts("order_failed")
    with pytest.raises(ContractError) as failed:
        shop.service.inventory(body["order_id"])
    assert failed.value.status == 500 and "retry" in failed.value.message


def welcome_preorders(shop):
    shop.settings = shop.settings.replace(cws_allow_preorder=True)
    shop.service = shop.fulfilment()


@pytest.mark.parametrize("mode", ["preorder", "preorder_legacy"])
def test_pre_ordered_codes_keep_the_order_pending_past_the_poll_limit(shop, sim, mode):
    welcome_preorders(shop)
    sim.cws.set_fulfilment(SWITCH_CWS, mode)
    status, body = shop.order()
    order = db.Order.get_by_id(body["order_id"])
    assert status == 202 and order.state == db.PREORDER
    assert (order.next_check_at - order.updated_at).total_seconds() == pytest.approx(300)
    shop.service.poll_due(later(shop.settings.cws_poll_max + 400))
    assert state(order.id) == db.PREORDER and shop.alerts("order_failed") == []
    sim.cws.complete_order(order.cws_order_id)
    preorder_postback = json.dumps(sim.cws.postback("PREORDER", orderId=order.cws_order_id))
    assert postbacks.handle(shop.settings, preorder_postback, later(1)) == 200
    shop.service.poll_due(later(2))
    assert state(order.id) == db.COMPLETED and len(shop.service.inventory(order.id)[0]["inventory"]) == 1


def test_a_pre_order_we_did_not_ask_for_is_polled_like_a_fulfilling_order_until_the_poll_limit(shop, sim):
    sim.cws.set_fulfilment(SWITCH_CWS, "late_preorder")
    sim.cws.preorder_seconds = 10_000
    _, body = shop.order()
    order = db.Order.get_by_id(body["order_id"])
    assert order.state == db.PREORDER and (order.next_check_at - order.updated_at).total_seconds() <= 10
    shop.service.poll_due(later(shop.settings.cws_poll_max + 10))
    order = db.Order.get_by_id(order.id)
    assert order.state == db.PREORDER and (order.next_check_at - order.updated_at).total_seconds() == 300
    assert shop.alerts("order_failed") == []  # CWS charged and the key will come: never failed


def test_a_preorder_postback_naming_only_the_placeholder_code_checks_the_order_now(shop, sim):
    welcome_preorders(shop)
    sim.cws.set_fulfilment(SWITCH_CWS, "preorder")
    _, body = shop.order()
    order = db.Order.get_by_id(body["order_id"])
    (placeholder,) = shop.cws_orders(order.id)[0]["products"][0]["codes"]
    assert db.OrderItem.get(db.OrderItem.order == order.id).preorder_code_id == placeholder["codeId"]
    sim.cws.complete_order(order.cws_order_id)
    postback = json.dumps(sim.cws.postback("PREORDER", codeId=placeholder["codeId"]))
    assert postbacks.handle(shop.settings, postback, later(1)) == 200
    shop.service.poll_due(later(2))
    assert state(order.id) == db.COMPLETED


def test_bundle_codes_arriving_in_steps_are_stored_only_as_whole_bundles():
    class Item:
        def __init__(self):
            self.cws_code_id, self.state, self.preorder_code_id = None, "pending", None
    first = [CwsCode("c0", "text", "KEY-0", ""), CwsCode("c1", "preorder", "", ""),
             CwsCode("c2", "text", "KEY-2", ""), CwsCode("c3", "text", "KEY-3", "")]
    pairs = assignments([Item(), Item()], first)
    assert [[c.code_id for c in group] for _, group in pairs] == [["c0", "c1"], ["c2", "c3"]]
    assert [all(c.value for c in group) for _, group in pairs] == [False, True]  # unit 1 waits for c1


def test_an_image_code_becomes_a_file_item_fetched_from_the_file_endpoint(shop, sim):
    sim.cws.set_fulfilment(SWITCH_CWS, "image")
    status, body = shop.order()
    (key,) = keys_of(body)
    assert status == 200 and key["kind"] == "file" and key["value"] == ""
    payload = shop.service.item_file(body["order_id"], key["id"])
    (code,) = shop.cws_orders(body["order_id"])[0]["products"][0]["codes"]
    assert payload == {"data": code["code"], "fileName": code["filename"], "mimeType": "image/png"}
    assert base64.b64decode(payload["data"]).startswith(b"\x89PNG")
    with pytest.raises(ContractError) as not_account:
        shop.service.item_account(body["order_id"], key["id"])
    assert not_account.value.status == 404


class BlankCodes(CwsClient):
    """CWS as its SDK describes it: an order may list codes without their values (fetch each by id)."""

    def order(self, cws_order_id):
        found = super().order(cws_order_id)
        blank = tuple(product.__class__(product.product_id, product.unit_price,
                                        tuple(CwsCode(c.code_id, c.kind, "", c.filename) for c in product.codes))
                      for product in found.products)
        return found.__class__(found.order_id, found.client_order_id, found.status, found.total_price,
                               found.created_on, blank)


def test_codes_sent_without_a_value_are_fetched_once_by_id(shop, sim):
    sim.cws.set_fulfilment(SWITCH_CWS, "delayed", polls=0)
    service = shop.fulfilment(cws=BlankCodes(shop.settings))
    status, body = service.create_order(shop.reserve(SWITCH, 2), 7, db.utcnow())
    assert status == 200 and all(key["value"].startswith("SIM-") for key in keys_of(body))
    assert sim.cws.requests["GET /v3/codes/{id}"] == 2


def test_a_balance_too_low_fails_the_order_and_alerts(shop, sim):
    sim.cws.set_fulfilment(SWITCH_CWS, "balance")
    status, body = shop.order()
    assert status == 202 and state(body["order_id"]) == db.FAILED
    assert shop.alerts("low_balance") and shop.alerts("order_failed")
    assert db.Order.get_by_id(body["order_id"]).cws_order_id is None


def test_a_delisted_product_fails_the_order_and_stops_being_listed(shop, sim):
    reservation_id = shop.reserve()
    sim.cws.set_fulfilment(SWITCH_CWS, "delisted")
    _, body = shop.service.create_order(reservation_id, 7, db.utcnow())
    assert state(body["order_id"]) == db.FAILED and shop.alerts("order_failed")
    assert db.CwsProduct.get_by_id(SWITCH_CWS).listed is False


def test_a_failed_order_gives_its_stock_back(shop, sim):
    sim.cws.set_fulfilment(SKYLINES_CWS, "balance")
    _, body = shop.order(SKYLINES, 8)
    assert state(body["order_id"]) == db.FAILED
    assert body["stock"][0]["inventory_size"] == 8


def test_a_low_balance_is_read_every_30_s_so_selling_resumes_soon_after_a_top_up(shop, sim):
    sim.cws.balance = Decimal("0.00")
    assert shop.service.balance.due(db.utcnow()) == 0  # never read: read now
    sim.cws.balance = Decimal("1000.00")
    assert shop.service.balance.due(later(10)) is None
    assert shop.service.balance.due(later(31)) == Decimal("1000.00")
    assert shop.service.balance.due(later(60)) is None  # no longer low: every 5 min
    assert shop.service.balance.due(later(301)) == Decimal("1000.00")


def test_a_purchase_refused_for_balance_marks_the_balance_spent_until_it_is_read_again(shop, sim):
    shop.service.balance.check(db.utcnow())
    sim.cws.set_fulfilment(SWITCH_CWS, "balance")
    shop.service.balance._background = lambda work, *args: None  # the re-read it queues has not run yet
    shop.order()
    with pytest.raises(ContractError) as refused:
        shop.reserve(SKYLINES, 1)
    assert refused.value.extra["stock"] == [{"product_id": SKYLINES, "inventory_size": 0}]


# --- retry ---------------------------------------------------------------------------------------

def test_retry_of_a_refused_purchase_buys_once_after_the_cause_is_fixed(shop, sim):
    sim.cws.set_fulfilment(SWITCH_CWS, "balance")
    _, body = shop.order()
    sim.cws.set_fulfilment(SWITCH_CWS, "instant")
    line = shop.service.retry(body["order_id"], db.utcnow())
    assert line.startswith(f"order {body['order_id']}: completed")
    assert len(shop.cws_orders(body["order_id"])) == 1
    assert len(shop.service.inventory(body["order_id"])[0]["inventory"]) == 1


def test_retry_of_an_order_cws_holds_polls_it_again_and_never_buys_twice(shop, sim):
    sim.cws.set_fulfilment(SWITCH_CWS, "delayed", polls=1000)
    _, body = shop.order()
    shop.service.poll_due(later(shop.settings.cws_poll_max + 5))
    order = db.Order.get_by_id(body["order_id"])
    sim.cws.complete_order(order.cws_order_id)
    assert "completed" in shop.service.retry(str(order.g2a_order_id), later(shop.settings.cws_poll_max + 6))
    assert len(sim.cws.orders) == 1


def test_retry_refuses_unknown_and_unfailed_orders_with_one_line(shop, sim):
    _, body = shop.order()
    with pytest.raises(BridgeError, match="not found"):
        shop.service.retry("nope", db.utcnow())
    with pytest.raises(BridgeError, match="is completed, not failed or stuck"):
        shop.service.retry(body["order_id"], db.utcnow())


def test_retry_of_a_claim_whose_history_is_unreadable_says_so_and_sends_nothing(shop, sim):
    sim.cws.fail_next("/v3/orders", 503)
    _, body = shop.order()
    sim.cws.history_status = 500
    with pytest.raises(BridgeError, match="history is unreachable; nothing was sent"):
        shop.service.retry(body["order_id"], later(600))
    sim.cws.history_status = None
    assert "completed" in shop.service.retry(body["order_id"], later(600))
    assert len(shop.cws_orders(body["order_id"])) == 1


# --- unknown outcomes and crash recovery ---------------------------------------------------------

def test_a_purchase_with_an_unknown_outcome_is_adopted_from_cws_history(shop, sim):
    sim.cws.set_fulfilment(SWITCH_CWS, "commit_then_500")
    status, body = shop.order()
    assert status == 202 and state(body["order_id"]) == db.CLAIMED
    assert shop.service.recover(db.utcnow()) == 0  # too young: the web process may still be placing it
    sim.cws.set_fulfilment(SWITCH_CWS, "instant")
    assert shop.service.recover(later(10)) == 1
    assert state(body["order_id"]) == db.COMPLETED
    assert len(shop.cws_orders(body["order_id"])) == 1


def test_a_purchase_cws_never_received_is_sent_again_with_the_same_id_only_after_the_grace(shop, sim):
    sim.cws.fail_next("/v3/orders", 503)  # CWS answers 5xx without taking the order
    _, body = shop.order()
    assert state(body["order_id"]) == db.CLAIMED and sim.cws.orders == []
    placed_at = db.Order.get_by_id(body["order_id"]).placed_at
    shop.service.recover(placed_at + timedelta(seconds=shop.settings.cws_resend_grace - 1))
    assert sim.cws.orders == [] and sim.cws.requests["GET /v3/orders"] == 1
    shop.service.recover(placed_at + timedelta(seconds=shop.settings.cws_resend_grace + 1))
    assert state(body["order_id"]) == db.COMPLETED
    assert [o["clientOrderId"] for o in sim.cws.orders] == [db.Order.get_by_id(body["order_id"]).cws_client_order_id]


def test_while_cws_history_is_unreadable_nothing_is_bought_again(shop, sim):
    sim.cws.fail_next("/v3/orders", 503)
    _, body = shop.order()
    sim.cws.fail_next("/v3/orders", *[500] * 20)
    shop.service.recover(later(600))
    assert state(body["order_id"]) == db.CLAIMED and sim.cws.orders == []


def test_two_recoverers_reaching_for_one_claim_at_once_send_it_once(shop, sim):
    sim.cws.fail_next("/v3/orders", 503)
    _, body = shop.order()
    sim.cws.delay = 0.3  # both read the claim and search CWS's history before either sends
    grace = shop.service.recovery_grace
    run_together(*(functools.partial(shop.fulfilment().recover, later(grace + 1)) for _ in range(2)))
    assert sim.cws.requests["GET /v3/orders"] == 2 and sim.cws.requests["POST /v3/orders"] == 2  # 503 + one
    assert len(sim.cws.orders) == 1 and state(body["order_id"]) == db.COMPLETED


def test_the_grace_is_cws_resend_grace_seconds_and_never_below_the_longest_possible_purchase_call(settings, shop):
    assert shop.service.recovery_grace == 150.0
    assert Fulfilment(settings.replace(cws_resend_grace=90.0), shop.cws, shop.box).recovery_grace == 90.0
    slow = settings.replace(cws_timeout=30.0, cws_resend_grace=1.0)
    assert Fulfilment(slow, shop.cws, shop.box).recovery_grace == 180.0


class Ticking(FakeClock):
    """Monotonic time that moves 5 s at every reading."""

    def __call__(self):
        self.now += 5
        return self.now


def test_a_purchase_resent_after_a_401_counts_its_grace_from_the_resend(shop, sim):
    sim.cws.fail_next("/v3/orders", 401, 500)  # the token is refused; the re-send's answer is lost
    service = Fulfilment(shop.settings, shop.cws, shop.box, sleep=shop.clock.sleep, clock=Ticking(),
                         background=lambda work, *args: None)
    now = db.utcnow()
    claim = claims.claim(shop.reserve(), 555, now)
    service._place(claim, now)  # the purchase thread's work, on this thread
    order = db.Order.get_by_id(claim.id)
    assert order.state == db.CLAIMED and sim.cws.requests["POST /v3/orders"] == 2
    # clock readings: sent, first POST (+5 s), re-send (+10 s): the grace counts from the re-send
    assert order.placed_at == now + timedelta(seconds=10)


def test_due_claims_are_resolved_by_the_regular_poll_too(shop, sim):
    sim.cws.set_fulfilment(SWITCH_CWS, "commit_then_500")
    _, body = shop.order()
    assert shop.service.poll_due(later(shop.service.inline_budget + 6)) == 1
    assert state(body["order_id"]) == db.COMPLETED


# --- returns and the pool ------------------------------------------------------------------------

def test_returned_keys_are_pooled_counted_in_stock_and_sold_again_without_buying(shop, sim):
    _, first = shop.order(SKYLINES, 2)
    returned = [key["id"] for key in keys_of(first)]
    assert shop.service.return_items(first["order_id"], returned + returned[:1], db.utcnow()) == 2
    assert shop.service.return_items(first["order_id"], returned, db.utcnow()) == 0  # twice is harmless
    assert shop.service.inventory(first["order_id"])[0]["inventory"] == []
    assert shop.reservations.reserve([Line(SKYLINES, 1)], db.utcnow())["stock"][0]["inventory_size"] == 7
    purchases = sim.cws.requests["POST /v3/orders"]
    status, second = shop.order(SKYLINES, 2)
    assert status == 200 and sim.cws.requests["POST /v3/orders"] == purchases
    assert sorted(k["value"] for k in keys_of(second)) == sorted(k["value"] for k in keys_of(first))
    assert not {k["id"] for k in keys_of(second)} & set(returned)
    assert db.Order.get_by_id(second["order_id"]).cws_order_id is None


def test_an_order_bigger_than_the_pool_buys_only_the_rest(shop, sim):
    _, first = shop.order(SKYLINES, 1)
    shop.service.return_items(first["order_id"], [keys_of(first)[0]["id"]], db.utcnow())
    status, second = shop.order(SKYLINES, 3)
    assert status == 200 and len(keys_of(second)) == 3
    assert shop.cws_orders(second["order_id"])[0]["products"][0]["codes"].__len__() == 2


def test_a_retried_refused_order_takes_returned_keys_first_and_buys_only_the_rest(shop, sim):
    _, first = shop.order(SKYLINES, 1)
    shop.service.return_items(first["order_id"], [keys_of(first)[0]["id"]], db.utcnow())
    sim.cws.set_fulfilment(SKYLINES_CWS, "balance")
    _, refused = shop.order(SKYLINES, 2)
    assert state(refused["order_id"]) == db.FAILED
    assert db.PooledKey.select().where(db.PooledKey.taken_by.is_null()).count() == 1  # given back at once
    sim.cws.set_fulfilment(SKYLINES_CWS, "instant")
    assert "completed" in shop.service.retry(refused["order_id"], db.utcnow())
    assert [len(o["products"][0]["codes"]) for o in shop.cws_orders(refused["order_id"])] == [1]
    assert db.PooledKey.select().where(db.PooledKey.taken_by.is_null()).count() == 0


def test_returning_unknown_or_keyless_items_is_refused(shop, sim):
    _, done = shop.order()
    with pytest.raises(ContractError) as unknown:
        shop.service.return_items(done["order_id"], ["not-an-item"], db.utcnow())
    sim.cws.set_fulfilment(SWITCH_CWS, "delayed", polls=1000)
    _, waiting = shop.order()
    pending = db.OrderItem.get(db.OrderItem.order == waiting["order_id"]).id
    with pytest.raises(ContractError) as keyless:
        shop.service.return_items(waiting["order_id"], [pending], db.utcnow())
    assert (unknown.value.status, keyless.value.status) == (404, 400)


# --- keys: kinds, bundles, masking -----------------------------------------------------------------

def test_account_items_are_served_by_the_account_endpoint_only(shop, sim):
    _, body = shop.order()
    item = db.OrderItem.get_by_id(keys_of(body)[0]["id"])
    sealed = shop.service.keys.seal_account({"username": "buyer1", "password": "pw-123456", "email": "b@x.io"})
    db.OrderItem.update(kind="account", secret=sealed.secret).where(db.OrderItem.id == item.id).execute()
    account = shop.service.item_account(body["order_id"], item.id)
    assert account == {"username": "buyer1", "password": "pw-123456", "email": "b@x.io", "emailPassword": "",
                       "optional": []}
    assert shop.service.inventory(body["order_id"])[0]["inventory"] == [{"id": item.id, "value": "", "kind": "account"}]
    with pytest.raises(ContractError) as not_file:
        shop.service.item_file(body["order_id"], item.id)
    assert not_file.value.status == 404


def test_several_text_codes_per_unit_become_one_random_key_bundle():
    box = KeyStore(KeyBox(SECRET_KEY))
    codes = [CwsCode(f"c{n}", "text", f"KEY-{n}", "") for n in range(4)]

    class Item:
        def __init__(self):
            self.cws_code_id, self.state = None, "pending"
    pairs = assignments([Item(), Item()], codes)
    assert [[c.value for c in group] for _, group in pairs] == [["KEY-0", "KEY-1"], ["KEY-2", "KEY-3"]]
    sealed = box.seal_codes(pairs[0][1], "Cities: Skylines")
    assert box.box.decrypt_text(sealed.secret) == "Cities: Skylines | KEY-0 / Cities: Skylines | KEY-1"


def test_keys_are_masked_for_the_cli_unless_revealed(shop, sim):
    _, body = shop.order()
    value = keys_of(body)[0]["value"]
    shown = shop.service.describe(body["order_id"])
    assert shown["items"][0]["key"] == mask(value) and value not in str(shown)
    assert mask("ABCD-EFGH-IJKL-WXYZ") == "ABCD-****-****-WXYZ"
    assert shop.service.describe(str(G2A_ORDER + 1), reveal=True)["items"][0]["key"] == value
    assert [o["id"] for o in shop.service.list_orders(state="completed")] == [body["order_id"]]
    assert shop.service.list_orders(state="failed") == []
    with pytest.raises(BridgeError):
        shop.service.describe("nope")


# --- balance, request ids, logs ------------------------------------------------------------------

def test_the_balance_is_stored_after_a_purchase_and_alerts_when_low(shop, sim):
    shop.order()
    assert Decimal(db.get_setting("cws.balance")) == Decimal("994.70")
    sim.cws.balance = Decimal("12.00")
    assert shop.service.balance.check(db.utcnow()) == Decimal("12.00")
    assert "12.00" in shop.alerts("low_balance")[0]


class Recorder(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines = []

    def emit(self, record):
        self.lines.append((record.getMessage(), REQUEST_ID.get(), str(getattr(record, "event_fields", ""))))


def test_the_worker_logs_an_orders_polling_under_its_request_id_and_never_a_key(shop, sim):
    recorder = Recorder()
    logging.getLogger("bridge").addHandler(recorder)
    logging.getLogger("bridge").setLevel(logging.DEBUG)
    try:
        sim.cws.set_fulfilment(SWITCH_CWS, "delayed", polls=1000)
        _, body = shop.order()
        order = db.Order.get_by_id(body["order_id"])
        sim.cws.complete_order(order.cws_order_id)
        shop.service.poll_due(later(10))
    finally:
        logging.getLogger("bridge").removeHandler(recorder)
    assert order.request_id == "req-1"
    completed = [line for line in recorder.lines if line[0] == "order.completed"]
    assert completed and completed[0][1] == "req-1"
    value = shop.service.inventory(order.id)[0]["inventory"][0]["value"]
    assert not any(value in str(line) for line in recorder.lines)
