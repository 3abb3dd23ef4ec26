"""Offer sync: the pure plan (ordering, budget, pause), the shared stock formula, and whole passes against the simulator."""
import json
import threading
import uuid
from datetime import datetime, timedelta, timezone
from decimal import Decimal as D

import pytest

from bridge import db
from bridge.config import Settings
from bridge.cws import CwsClient
from bridge.g2a import G2aClient
from bridge.migrations import open_database
from bridge.pause import PauseSwitch, set_paused
from bridge.products import MappingWatcher, apply_mapping, load_mapping
from bridge.sim import (CWS_CLIENT_ID, CWS_CLIENT_SECRET, CWS_CLIENT_SIGNATURE, G2A_API_KEY,
                              G2A_API_SECRET, Simulator)
from bridge.stock import available_stock
from bridge.offers import ProductState
from bridge.plan import MISSING_OFFER, inactive_reason, plan, plan_product
from bridge.sync import LAST_PASS_KEY, PassReport, SyncEngine, writes_per_pass

NOW = datetime(2025, 7, 14, 12, 0, tzinfo=timezone.utc)
PATCH = "PATCH /v3/sales/offers/{id}"


def state(**fields):
    """An offer in sync: cost 5.00 + 0.50 profit at 15 % fee sells at 6.48, 10 in stock, active."""
    values = dict(g2a_id=1, offer_id="o1", cost=D("5.00"), available=10, fixed_profit=D("0.50"), fee=D("0.15"),
                  offer_price=D("6.48"), offer_stock=10, offer_active=True)
    return ProductState(**{**values, **fields})


def decide(paused=False, per_hour=5, create=False, **fields):
    return plan_product(state(**fields), NOW, paused, per_hour, create)


def changes_at(minutes_ago):
    return tuple(NOW - timedelta(minutes=m) for m in minutes_ago)


# ---- plan: pure ------------------------------------------------------------------------------

def test_an_offer_already_in_sync_needs_no_change():
    assert decide() is None


def test_a_cost_rise_is_a_price_increase():
    change = decide(cost=D("6.00"))
    assert (change.price, change.stock, change.active) == (D("7.65"), None, None)
    assert str(change) == "1 price 6.48 -> 7.65 (increase)"
    assert change.priority == 0


def test_only_the_parts_that_differ_are_sent():
    change = decide(available=3)
    assert (change.price, change.stock, change.active) == (None, 3, None)
    assert str(change) == "1 stock 10 -> 3"


def test_out_of_stock_deactivates_with_zero_inventory():
    change = decide(available=0)
    assert (change.stock, change.active, change.priority) == (0, False, 0)
    assert str(change) == "1 stock 10 -> 0, deactivate (out of stock)"
    assert decide(available=0, offer_active=False, offer_stock=0) is None


def test_max_stock_caps_what_g2a_sees():
    assert decide(available=50, max_stock=4).stock == 4


def test_the_known_cws_balance_caps_the_stock_and_below_one_key_deactivates():
    assert decide(balance=D("12.00")).stock == 2  # two keys at 5.00
    change = decide(balance=D("4.99"))
    assert (change.stock, change.active) == (0, False)
    assert str(change) == "1 stock 10 -> 0, deactivate (CWS balance 4.99 cannot pay for one key: top up the CWS account)"
    assert decide(balance=D("50.00")) is None and decide(balance=None) is None


@pytest.mark.parametrize("fields, reason", [
    ({"mapped": False}, "removed from products.json"),
    ({"enabled": False}, "disabled in products.json"),
    ({"listed": False}, "not listed by CWS"),
    ({"cost": None}, "no CWS price for one key"),
    ({"max_price": D("6.00")}, "price 6.48 above max_price 6.00: not selling at a loss"),
    ({"limit_max": D("6.00")}, "price 6.48 above G2A priceLimit.max 6.00"),
])
def test_an_offer_that_must_not_sell_is_deactivated_with_the_reason(fields, reason):
    change = decide(**fields)
    assert (change.active, change.stock, change.reason) == (False, 0, reason)


def test_a_g2a_price_limit_min_raises_the_price():
    assert decide(limit_min=D("7.00")).price == D("7.00")


def test_an_unknown_offer_state_is_sent_whole():
    change = decide(offer_price=None, offer_stock=None, offer_active=None)
    assert (change.price, change.stock, change.active) == (D("6.48"), 10, True)
    assert str(change) == "1 price unknown -> 6.48 (increase), stock unknown -> 10, activate"


def test_a_price_cut_is_deferred_once_the_hourly_budget_is_spent():
    change = decide(cost=D("4.00"), price_changes=changes_at([5, 10, 20, 30]))
    assert change.price is None and change.deferred_price == D("5.30")
    assert not change.sends
    assert str(change) == "1 price 6.48 -> 5.30 (decrease deferred: 4 price changes in the last hour)"


def test_a_price_cut_goes_out_while_the_budget_allows_and_old_changes_expire():
    assert decide(cost=D("4.00"), price_changes=changes_at([5, 10, 20])).price == D("5.30")
    assert decide(cost=D("4.00"), price_changes=changes_at([5, 10, 20, 61, 90])).price == D("5.30")


def test_a_price_rise_is_never_held_back_by_the_budget():
    assert decide(cost=D("9.00"), price_changes=changes_at(range(10))).price == D("11.18")


def test_a_deferred_cut_still_lets_the_stock_change_through():
    change = decide(cost=D("4.00"), available=2, price_changes=changes_at([1, 2, 3, 4]))
    assert (change.price, change.stock, change.deferred_price) == (None, 2, D("5.30"))
    assert change.sends


def test_activation_keeps_the_higher_old_price_when_a_cut_is_deferred():
    change = decide(cost=D("4.00"), offer_active=False, offer_stock=0, price_changes=changes_at([1, 2, 3, 4]))
    assert (change.active, change.stock, change.price, change.deferred_price) == (True, 10, None, D("5.30"))


def test_changes_are_ordered_deactivations_and_rises_then_stock_then_cuts():
    states = [state(g2a_id=1, cost=D("4.00")), state(g2a_id=2, available=4), state(g2a_id=3, cost=D("9.00")),
              state(g2a_id=4, available=0), state(g2a_id=5)]
    assert [c.g2a_id for c in plan(states, NOW, False, 5)] == [3, 4, 2, 1]


def test_paused_activates_nothing_and_raises_no_stock():
    assert decide(paused=True, offer_active=False, offer_stock=0) is None
    assert decide(paused=True, available=50) is None
    assert decide(paused=True, available=3).stock == 3
    assert decide(paused=True, available=0).active is False
    assert decide(paused=True, cost=D("9.00")).price == D("11.18")


def test_an_idle_offer_is_explained():
    assert inactive_reason(state(offer_active=False, offer_stock=0), paused=True) == "paused"
    assert inactive_reason(state(offer_active=False, available=0), paused=False) == "out of stock"
    assert inactive_reason(state(offer_id=None), paused=False) == MISSING_OFFER
    assert inactive_reason(state(), paused=False) == ""


def test_a_mapped_product_without_an_offer_is_warned_about_once():
    assert decide(offer_id=None).action == "missing"
    assert decide(offer_id=None, missing_offer_warned=True) is None
    assert decide(offer_id=None, mapped=False) is None


def test_a_missing_offer_is_created_when_allowed_and_worth_selling():
    change = decide(offer_id=None, create=True)
    assert (change.action, change.price, change.stock, change.active) == ("create", D("6.48"), 10, True)
    assert decide(offer_id=None, create=True, available=0) is None
    assert decide(offer_id=None, create=True, paused=True) is None


# ---- the stock formula -------------------------------------------------------------------

@pytest.fixture
def database(tmp_path):
    database = open_database(f"sqlite:///{tmp_path}/bridge.db")
    yield database
    database.close()


def cws_row(quantity, listed=True):
    product_id = str(uuid.uuid4())
    db.CwsProduct.create(id=product_id, quantity=quantity, listed=listed)
    db.Product.create(g2a_id=abs(hash(product_id)) % 10**12, cws_product=product_id)
    return product_id


def reserve(cws_id, quantity, expires_at, active=True):
    product = db.Product.get(db.Product.cws_product == cws_id)
    reservation = db.Reservation.create(id=str(uuid.uuid4()), expires_at=expires_at)
    db.ReservationLine.create(reservation=reservation, product=product, cws_product_id=cws_id, quantity=quantity,
                              active=active, expires_at=expires_at)
    return reservation


def order_item(cws_id, state, source="cws"):
    reservation = reserve(cws_id, 1, NOW, active=False)
    order = db.Order.create(id=str(uuid.uuid4()), reservation=reservation, g2a_order_id=uuid.uuid4().int % 10**12,
                            state=state, cws_client_order_id=str(uuid.uuid4()))
    return db.OrderItem.create(id=str(uuid.uuid4()), order=order, position=0, g2a_product_id=1,
                               cws_product_id=cws_id, source=source)


def test_available_stock_adds_the_pool_and_subtracts_holds_and_claims(database):
    a, b, hidden = cws_row(10), cws_row(1), cws_row(7, listed=False)
    reserve(a, 2, NOW + timedelta(minutes=5))
    reserve(a, 5, NOW - timedelta(minutes=1))  # expired
    reserve(a, 4, NOW + timedelta(minutes=5), active=False)  # released
    order_item(a, db.CLAIMED)
    order_item(a, db.CLAIMED, source="pool")
    order_item(a, db.FULFILLING)
    returned = order_item(a, db.COMPLETED)
    db.PooledKey.create(cws_product_id=a, returned_item=returned)
    taken = order_item(a, db.COMPLETED)
    db.PooledKey.create(cws_product_id=a, returned_item=taken, taken_by=order_item(a, db.COMPLETED))
    db.PooledKey.create(cws_product_id=hidden, returned_item=order_item(hidden, db.COMPLETED))
    reserve(b, 3, NOW + timedelta(minutes=5))
    assert available_stock([a, b, hidden, "unknown"], NOW) == {a: 10 + 1 - 2 - 1, b: 0, hidden: 1, "unknown": 0}
    assert available_stock(None, NOW) == {a: 8, b: 0, hidden: 1}


# ---- whole passes against the simulator --------------------------------------------------

class World:
    """A simulator, a fresh database, real clients and an engine, plus helpers to set the scene."""

    def __init__(self, sim, tmp_path):
        self.sim, self.tmp_path = sim, tmp_path
        self.products_file = tmp_path / "products.json"
        self.settings = Settings(
            cws_client_id=CWS_CLIENT_ID, cws_client_secret=CWS_CLIENT_SECRET, cws_client_signature=CWS_CLIENT_SIGNATURE,
            cws_base_url=sim.cws_url, g2a_api_key=G2A_API_KEY, g2a_api_secret=G2A_API_SECRET,
            g2a_base_url=sim.g2a_url, g2a_retry_max=3, products_file=self.products_file)
        self.entries = []
        fast = lambda seconds: None  # noqa: E731 (backoff without waiting)
        self.cws = CwsClient(self.settings, sleep=fast)
        self.g2a = G2aClient(self.settings, sleep=lambda s: __import__("time").sleep(min(s, 0.01)),
                             job_poll_interval=0.005)
        self.pause = PauseSwitch(max_age=0)
        self.engine = SyncEngine(self.settings, self.cws, self.g2a, self.pause)

    def product(self, quantity=10, prices=((1, None, "5.00"),), offer=None, limit=None, in_cws=True, **mapping):
        """A CWS product mapped to a new G2A product; `offer` = (price, stock, active) seeds its G2A offer."""
        cws_id, g2a_id = str(uuid.uuid4()), 10000068865000 + len(self.entries) + 1
        if in_cws:
            self.sim.cws.add_product(cws_id, quantity, list(prices))
        if offer is not None:
            self.sim.g2a.add_offer(g2a_id, *offer)
        if limit is not None:
            self.sim.g2a.set_price_limit(g2a_id, *limit)
        self.entries.append({"cws_product_id": cws_id, "g2a_product_id": g2a_id, **mapping})
        return g2a_id, cws_id

    def write_mapping(self, entries=None):
        data = {"defaults": {"fixed_profit": 0.50, "fee_percentage": 0.15},
                "products": self.entries if entries is None else entries}
        self.products_file.write_text(json.dumps(data))

    def map(self, entries=None):
        self.write_mapping(entries)
        apply_mapping(load_mapping(self.products_file, D("0.50"), D("0.15")))

    def offer(self, g2a_id):
        offer = self.sim.g2a.offer_for_product(g2a_id)
        return D(offer["price"]), offer["inventory"]["size"], offer["active"]

    def patches(self):
        return self.sim.g2a.requests[PATCH]


@pytest.fixture
def world(database, tmp_path):
    with Simulator() as sim:
        yield World(sim, tmp_path)


def test_a_mixed_catalogue_ends_with_the_right_offers_and_a_second_pass_sends_nothing(world):
    tiers = world.product(25, [(1, 9, "5.30"), (10, None, "4.98")], offer=("9.99", 0))
    override = world.product(30, [(1, None, "5.02")], offer=("9.99", 0), fixed_profit=1.20, max_stock=20)
    floor = world.product(5, [(1, None, "1.00")], offer=("9.99", 0), min_price=9.00)
    capped = world.product(5, [(1, None, "10.00")], offer=("9.99", 5, True), max_price=5.00)
    limit_low = world.product(5, [(1, None, "2.00")], offer=("9.99", 0), limit=("12.00", "100.00"))
    limit_high = world.product(5, [(1, None, "5.00")], offer=("9.99", 0), limit=("0.50", "3.00"))
    sold_out = world.product(0, offer=("6.48", 4, True))
    delisted = world.product(in_cws=False, offer=("6.48", 4, True))
    removed = world.product(3, offer=("6.48", 3, True))
    disabled = world.product(3, offer=("6.48", 3, True), enabled=False)
    world.map()
    world.map(world.entries[:-2] + world.entries[-1:])  # `removed` left products.json

    report = world.engine.full_pass()

    assert world.offer(tiers[0]) == (D("6.83"), 25, True)
    assert world.offer(override[0]) == (D("7.32"), 20, True)
    assert world.offer(floor[0]) == (D("9.00"), 5, True)
    assert world.offer(capped[0]) == (D("9.99"), 0, False)
    assert world.offer(limit_low[0]) == (D("12.00"), 5, True)
    assert world.offer(limit_high[0])[2] is False
    for g2a_id, _ in (sold_out, delisted, removed, disabled):
        assert world.offer(g2a_id) == (D("6.48"), 0, False)
    assert report.failed == 0 and report.errors == []
    assert db.Product.get_by_id(removed[0]).mapped is False
    assert {p.sync_state for p in db.Product.select()} == {"in_sync"}
    sent = world.patches()

    second = world.engine.full_pass()

    assert world.patches() == sent
    assert (second.writes, second.changes) == (0, [])
    stats = json.loads(db.get_setting(LAST_PASS_KEY))
    assert stats["writes"] == 0 and stats["kind"] == "full" and stats["finished"]


def test_deactivations_and_rises_are_sent_before_stock_changes_and_cuts(world):
    cut = world.product(5, [(1, None, "3.00")], offer=("6.48", 5, True))
    restock = world.product(8, offer=("6.48", 5, True))
    rise = world.product(5, [(1, None, "9.00")], offer=("6.48", 5, True))
    gone = world.product(0, offer=("6.48", 5, True))
    world.map()
    world.engine.writers = 1  # one write in flight, so arrival order is submission order
    world.engine.full_pass()
    offer_ids = [p["offer_id"] for p in world.sim.g2a.patches]
    order = [world.sim.g2a.offer_for_product(g2a_id)["id"] for g2a_id, _ in (rise, gone, restock, cut)]
    assert set(offer_ids[:2]) == set(order[:2]) and offer_ids[2:] == order[2:]


def test_passes_of_a_kind_reuse_their_writer_threads_instead_of_starting_new_ones(world):
    products = [world.product(5, offer=("9.99", 0)) for _ in range(3)]
    world.map()

    def writers():
        return {thread.ident for thread in threading.enumerate() if thread.name.startswith("g2a-write-full")}
    assert world.engine.full_pass().writes == 3
    first = writers()
    for _, cws_id in products:
        world.sim.cws.set_quantity(cws_id, 7)
    assert world.engine.full_pass().writes == 3
    assert first and writers() == first


def test_lane_and_delta_passes_share_the_urgent_writers_and_a_full_pass_never_queues_ahead_of_them(world):
    urgent = world.engine._pool("lane")
    assert world.engine._pool("delta") is urgent and world.engine._pool("full") is not urgent


def test_a_failed_job_marks_the_product_failed_and_the_next_pass_retries_it(world):
    g2a_id, _ = world.product(5, offer=("9.99", 0))
    world.map()
    world.sim.g2a.fail_jobs(1)
    report = world.engine.full_pass()
    product = db.Product.get_by_id(g2a_id)
    assert (report.failed, product.sync_state) == (1, "failed")
    assert "JOB_FAILED" in product.sync_error
    world.engine.full_pass()
    assert world.offer(g2a_id) == (D("6.48"), 5, True)
    assert db.Product.get_by_id(g2a_id).sync_state == "in_sync"


def test_too_many_requests_and_a_full_task_queue_are_retried(world):
    g2a_id, _ = world.product(5, offer=("9.99", 0))
    world.map()
    world.sim.g2a.fail_next("/v3/sales/offers/", 429, "queue_full")
    report = world.engine.full_pass()
    assert report.failed == 0
    assert world.offer(g2a_id) == (D("6.48"), 5, True)


def test_a_cws_outage_keeps_the_last_known_state_and_is_reported(world):
    g2a_id, cws_id = world.product(5, offer=("9.99", 0))
    world.map()
    world.engine.full_pass()
    world.sim.cws.fail_next("/v3/products", 500, 500, 500, 500)
    report = world.engine.full_pass()
    assert report.errors and "CWS products" in report.errors[0]
    assert world.offer(g2a_id) == (D("6.48"), 5, True)
    assert db.CwsProduct.get_by_id(cws_id).listed is True


def test_paused_sync_activates_nothing_and_raises_no_stock_but_lowers_it(world):
    new, _ = world.product(5, offer=("9.99", 0))
    growing, growing_cws = world.product(5, offer=("6.48", 5, True))
    shrinking, shrinking_cws = world.product(5, offer=("6.48", 5, True))
    world.map()
    world.sim.cws.set_quantity(growing_cws, 9)
    world.sim.cws.set_quantity(shrinking_cws, 2)
    set_paused(True)
    world.engine.full_pass()
    assert world.offer(new) == (D("9.99"), 0, False)
    assert world.offer(growing) == (D("6.48"), 5, True)
    assert world.offer(shrinking) == (D("6.48"), 2, True)
    set_paused(False)
    world.engine.full_pass()
    assert world.offer(new) == (D("6.48"), 5, True)
    assert world.offer(growing) == (D("6.48"), 9, True)


def test_price_cuts_beyond_the_hourly_budget_wait_and_the_latest_value_goes_out(world):
    g2a_id, cws_id = world.product(5, offer=("6.48", 5, True))
    world.map()
    now = datetime.now(timezone.utc)
    for minutes, price in enumerate(["4.90", "4.80", "4.70", "4.60", "4.50", "4.40"]):
        world.sim.cws.set_prices(cws_id, [(1, None, price)])
        world.engine.full_pass(now + timedelta(minutes=minutes))
    assert world.offer(g2a_id)[0] == D("6.00")  # 4.60 + 0.50 grossed up: cuts 5 and 6 were held back
    assert db.Product.get_by_id(g2a_id).sync_state == "pending"
    assert db.PriceChange.select().count() == 4
    world.engine.full_pass(now + timedelta(minutes=61))
    assert world.offer(g2a_id)[0] == D("5.77")  # 4.40 + 0.50: the newest value, not each one missed
    assert db.Product.get_by_id(g2a_id).sync_state == "in_sync"


def test_dry_run_says_why_an_idle_offer_stays_inactive(world):
    sold_out, _ = world.product(0, offer=("6.48", 0))
    no_offer, _ = world.product(5)
    world.map()
    world.engine.full_pass()
    report = world.engine.full_pass(dry_run=True)
    assert report.changes == []
    assert report.inactive == [f"{sold_out} stays inactive: out of stock",
                               f"{no_offer} stays inactive: {MISSING_OFFER}"]


def test_dry_run_lists_readable_changes_and_sends_nothing(world):
    g2a_id, _ = world.product(5, offer=("5.30", 5, True))
    world.map()
    report = world.engine.full_pass(dry_run=True)
    assert [str(change) for change in report.changes] == [f"{g2a_id} price 5.30 -> 6.48 (increase)"]
    assert world.patches() == 0
    assert db.get_setting(LAST_PASS_KEY) is None


def test_a_full_pass_reads_cws_in_product_id_batches_never_one_call_per_product(world):
    for _ in range(3):
        world.product(5, offer=("6.48", 5, True))
    world.map()
    world.engine.full_pass()
    assert world.sim.cws.requests["GET /v3/products"] == 1
    assert world.sim.cws.requests["GET /v3/products/{id}"] == 0


def test_many_dirty_products_are_read_in_one_batch(world):
    cws_ids = [world.product(5, offer=("6.48", 5, True))[1] for _ in range(5)]
    world.map()
    world.engine.full_pass()
    db.CwsProduct.update(dirty_since=db.utcnow()).where(db.CwsProduct.id.in_(cws_ids)).execute()
    world.engine.lane_pass()
    assert world.sim.cws.requests["GET /v3/products"] == 2
    assert world.sim.cws.requests["GET /v3/products/{id}"] == 0


def test_offers_are_discovered_once_and_again_only_for_new_products(world):
    world.product(5, offer=("6.48", 5, True))
    world.map()
    world.engine.full_pass()
    world.engine.full_pass()
    listings = world.sim.g2a.requests["GET /v3/sales/offers"]
    assert listings == 1
    late, _ = world.product(5)
    world.map()
    world.engine.full_pass()
    assert world.sim.g2a.requests["GET /v3/sales/offers"] == 2
    assert db.Product.get_by_id(late).sync_state == "failed"
    world.sim.g2a.add_offer(late, "9.99", 0)
    world.engine.full_pass()
    assert world.sim.g2a.requests["GET /v3/sales/offers"] == 2  # already looked for: warned once, not re-listed


def test_offers_of_a_g2a_that_serves_20_per_page_are_all_found(world):
    world.sim.g2a.served_page_size = 20
    products = [world.product(5, offer=("6.48", 5, True))[0] for _ in range(45)]
    world.map()
    report = world.engine.full_pass()
    assert report.failed == 0
    assert world.sim.g2a.requests["GET /v3/sales/offers"] == 3
    assert all(db.Product.get_by_id(g2a_id).offer_id for g2a_id in products)


def test_offers_of_other_types_are_not_matched_or_written_and_are_warned_about_once(world, caplog):
    g2a_id, _ = world.product(5)
    other = world.sim.g2a.add_offer(g2a_id, "9.99", 0, offer_type="promo")
    world.map()
    world.engine.full_pass()
    world.engine.catalogue.discover(PassReport("full", NOW))  # a second listing warns no more
    assert db.Product.get_by_id(g2a_id).offer_id is None
    assert not [patch for patch in world.sim.g2a.patches if patch["offer_id"] == other]
    warnings = [r for r in caplog.records if r.getMessage() == "sync.offer_other_type"]
    assert len(warnings) == 1


def test_a_missing_offer_is_warned_about_once(world, caplog):
    g2a_id, _ = world.product(5)
    world.map()
    world.engine.full_pass()
    world.engine.full_pass()
    warnings = [r for r in caplog.records if r.getMessage() == "sync.missing_offer"]
    assert len(warnings) == 1
    assert db.Product.get_by_id(g2a_id).missing_offer_warned is True


def test_missing_offers_are_created_when_enabled(world):
    g2a_id, _ = world.product(5)
    world.map()
    world.engine.settings = world.settings.replace(g2a_create_offers=True)
    world.engine.full_pass()
    assert world.offer(g2a_id) == (D("6.48"), 5, True)
    product = db.Product.get_by_id(g2a_id)
    assert product.offer_id == world.sim.g2a.offer_for_product(g2a_id)["id"]
    world.engine.full_pass()
    assert world.sim.g2a.requests["POST /v3/sales/offers"] == 1


def test_an_offer_deleted_on_g2a_is_looked_for_again(world):
    g2a_id, cws_id = world.product(5, offer=("6.48", 5, True))
    world.map()
    world.engine.full_pass()
    world.sim.g2a.offers.clear()
    world.sim.cws.set_quantity(cws_id, 3)
    report = world.engine.full_pass()
    assert report.failed == 1
    assert db.Product.get_by_id(g2a_id).offer_id is None


def test_products_json_is_hot_reloaded_and_a_bad_file_keeps_the_old_mapping(world):
    first, _ = world.product(5, offer=("9.99", 0))
    world.write_mapping()
    watcher = MappingWatcher(world.products_file, D("0.50"), D("0.15"))
    assert watcher.poll()
    world.engine.full_pass()
    assert world.offer(first)[2] is True
    second, _ = world.product(5, offer=("9.99", 0))
    world.write_mapping()
    assert watcher.poll()
    world.engine.full_pass()
    assert world.offer(second)[2] is True
    world.products_file.write_text('{"products": [{"cws_product_id": "nope"}]}')
    assert not watcher.poll()
    world.engine.full_pass()
    assert world.offer(first)[2] is True and world.offer(second)[2] is True
    world.write_mapping(world.entries[1:])
    assert watcher.poll()
    world.engine.full_pass()
    assert world.offer(first) == (D("6.48"), 0, False)


def test_a_dirty_pass_reconciles_only_the_marked_products(world):
    first, first_cws = world.product(5, offer=("6.48", 5, True))
    other, other_cws = world.product(5, offer=("6.48", 5, True))
    world.map()
    world.engine.full_pass()
    assert world.engine.lane_pass() is None
    world.sim.cws.set_quantity(first_cws, 2)
    world.sim.cws.set_quantity(other_cws, 1)
    db.CwsProduct.update(dirty_since=db.utcnow()).where(db.CwsProduct.id == first_cws).execute()
    before, reads = world.patches(), world.sim.cws.requests.copy()
    report = world.engine.lane_pass()
    assert report.writes == 1 and world.patches() == before + 1
    assert world.sim.cws.requests - reads == {"GET /v3/products/{id}": 1}  # one product: one single GET
    assert world.offer(first) == (D("6.48"), 2, True)
    assert world.offer(other) == (D("6.48"), 5, True)
    assert db.CwsProduct.get_by_id(first_cws).dirty_since is None
    assert world.engine.lane_pass() is None


def test_a_pass_stores_what_cws_says_about_each_product(world):
    _, cws_id = world.product(25, [(10, None, "4.98"), (1, 9, "5.30")], offer=("9.99", 0))
    world.map()
    world.engine.full_pass()
    stored = db.CwsProduct.get_by_id(cws_id)
    assert (stored.quantity, stored.cost, stored.listed) == (25, D("5.30"), True)
    assert [(p["from"], p["to"], D(p["value"])) for p in stored.prices] == [(1, 9, D("5.30")), (10, None, D("4.98"))]
    assert stored.fetched_at is not None


def test_a_fresher_fetch_is_not_overwritten_by_a_slower_pass(world):
    _, cws_id = world.product(5, offer=("6.48", 5, True))
    world.map()
    later = datetime.now(timezone.utc) + timedelta(minutes=5)
    db.CwsProduct.update(quantity=2, fetched_at=later).where(db.CwsProduct.id == cws_id).execute()
    world.engine.full_pass()
    assert db.CwsProduct.get_by_id(cws_id).quantity == 2


def test_a_pass_sends_at_most_its_share_of_the_budget_most_urgent_first(world):
    restocks = [world.product(8, offer=("6.48", 5, True))[0] for _ in range(3)]
    gone = world.product(0, offer=("6.48", 5, True))[0]
    world.map()
    world.engine.max_writes = 2
    report = world.engine.full_pass()
    assert (report.writes, report.postponed) == (2, 2)
    assert world.offer(gone)[2] is False
    world.engine.full_pass()
    assert [world.offer(g2a_id)[1] for g2a_id in restocks] == [8, 8, 8]


def test_the_write_cap_follows_the_g2a_budget_and_the_interval():
    assert writes_per_pass(Settings()) == 50
    assert writes_per_pass(Settings(g2a_requests_per_minute=60, sync_interval=1)) == 1


def test_a_dirty_pass_deactivates_a_product_cws_no_longer_lists(world):
    g2a_id, cws_id = world.product(5, offer=("6.48", 5, True))
    world.map()
    world.engine.full_pass()
    world.sim.cws.remove_product(cws_id)
    db.CwsProduct.update(dirty_since=db.utcnow()).where(db.CwsProduct.id == cws_id).execute()
    world.engine.lane_pass()
    assert world.offer(g2a_id) == (D("6.48"), 0, False)
    assert db.CwsProduct.get_by_id(cws_id).listed is False


def test_an_unchanged_product_only_gets_a_new_fetched_at(world):
    _, cws_id = world.product(5, offer=("6.48", 5, True))
    world.map()
    first = datetime.now(timezone.utc)
    world.engine.full_pass(first)
    world.engine.full_pass(first + timedelta(seconds=30))
    stored = db.CwsProduct.get_by_id(cws_id)
    assert (stored.fetched_at, stored.quantity) == (first + timedelta(seconds=30), 5)


def test_a_dirty_pass_that_cannot_reach_cws_keeps_the_mark_and_backs_off(world):
    _, cws_id = world.product(5, offer=("6.48", 5, True))
    world.map()
    world.engine.full_pass()
    db.CwsProduct.update(dirty_since=db.utcnow()).where(db.CwsProduct.id == cws_id).execute()
    world.sim.cws.fail_next("/v3/products", 500, 500, 500, 500)
    report = world.engine.lane_pass()
    assert report.errors and db.CwsProduct.get_by_id(cws_id).dirty_since is not None
    assert world.engine.lane_pass() is None
