"""The paced sweep and the priority lane: the cheaper way to read CWS, each answer reconciled as it arrives, and a
lane that a sweep in progress never holds up."""
import json
import threading
import uuid
from datetime import datetime, timedelta, timezone
from decimal import Decimal as D

import pytest

from bridge import db
from bridge.delta import STATE_KEY as DELTA_STATE_KEY
from bridge.lane import InFlight, hot_products, near_a_bound
from bridge.postbacks import handle
from bridge.pacing import Allowance, Pacer
from bridge.sweep import LISTING_KEY, PROGRESS_KEY, reading_plan
from conftest import sqlite_steps
from test_sync import world  # noqa: F401  (the simulator world of the sync tests, a fixture)
from fakes import FakeClock

IN_SYNC = ("6.48", 10, True)  # the offer of a CWS product at 5.00 with 10 keys


class WatchedCws:
    """The real CWS client, calling `before_request` as each productIds batch is asked for."""

    def __init__(self, cws, before_request):
        self.cws, self.before_request = cws, before_request

    def product_pages(self, *args, **options):
        self.before_request()
        yield from self.cws.product_pages(*args, **options)

    def __getattr__(self, name):
        return getattr(self.cws, name)


def watch(world, before_request):
    world.engine.cws = WatchedCws(world.cws, before_request)


def products(world, count, quantity=10):
    """`count` mapped products already in sync, as [(g2a id, cws id)] in the order a batched sweep reads them."""
    made = [world.product(quantity, offer=IN_SYNC) for _ in range(count)]
    world.map()
    return sorted(made, key=lambda pair: pair[1])


# ---- the cost of a sweep ------------------------------------------------------------------

def test_batches_are_chosen_while_they_cost_fewer_requests_than_the_last_listing():
    assert reading_plan(100, None) == ("batches", 2)
    assert reading_plan(300, {"pages": 20}) == ("batches", 6)
    assert reading_plan(10_000, {"pages": 20}) == ("pages", 20)
    assert reading_plan(50_000, {"pages": 100}) == ("pages", 100)
    assert reading_plan(50_000, {"pages": 1000}) == ("batches", 1000)


def test_a_catalogue_never_listed_is_listed_once_many_batches_would_be_needed():
    assert reading_plan(250, None) == ("batches", 5)
    assert reading_plan(251, None) == ("pages", None)
    assert reading_plan(6, None, batch_size=1) == ("pages", None)


def test_a_listing_learns_its_cost_and_deactivates_what_it_did_not_list(world):
    mapped = products(world, 5)
    gone, _ = world.product(in_cws=False, offer=IN_SYNC)
    world.map()
    for _ in range(2):
        world.sim.cws.add_product(str(uuid.uuid4()), 3, [(1, None, "2.00")])  # not ours
    world.sim.cws.page_size = 2
    world.engine.batch_size = 1  # 6 batches of one product: more than a listing is worth trying
    report = world.engine.full_pass()
    assert world.sim.cws.requests["GET /v3/products"] == 4  # 7 products, 2 a page
    assert json.loads(db.get_setting(LISTING_KEY))["pages"] == 4
    assert world.offer(gone) == (D("6.48"), 0, False)
    assert report.errors == [] and all(world.offer(g2a_id) == (D("6.48"), 10, True) for g2a_id, _ in mapped)
    world.engine.full_pass()
    assert world.sim.cws.requests["GET /v3/products"] == 8  # 4 pages still beat 6 batches


# ---- one answer at a time ----------------------------------------------------------------

def test_an_unchanged_batch_sends_nothing_and_a_stock_out_in_batch_3_is_sent_before_batch_4_is_read(world):
    ordered = products(world, 8)
    world.engine.batch_size = 2
    world.engine.full_pass()
    sold_out_g2a, sold_out_cws = ordered[5]  # the second product of the third batch
    world.sim.cws.set_quantity(sold_out_cws, 0)
    patches_before_each_read = []
    watch(world, lambda: patches_before_each_read.append(world.patches()))
    before = world.patches()
    world.engine.full_pass()
    assert patches_before_each_read == [before, before, before, before + 1]
    assert world.offer(sold_out_g2a) == (D("6.48"), 0, False)


def test_a_sweep_records_its_progress(world):
    products(world, 5)
    world.engine.batch_size = 2
    world.engine.full_pass()
    progress = json.loads(db.get_setting(PROGRESS_KEY))
    assert (progress["mode"], progress["mapped"], progress["read"]) == ("batches", 5, 5)
    assert progress["finished"] and progress["duration"] == progress["last_duration"] >= 0


def test_a_cws_failure_mid_sweep_keeps_what_was_read_and_unlists_nothing(world):
    ordered = products(world, 4)
    world.engine.batch_size = 2
    world.sim.cws.set_quantity(ordered[0][1], 0)
    reads = []

    def fail_from_the_second_read():
        reads.append(1)
        if len(reads) == 2:
            world.sim.cws.fail_next("/v3/products", 500, 500, 500)
    watch(world, fail_from_the_second_read)
    report = world.engine.full_pass()
    assert report.errors and "CWS products" in report.errors[0]
    assert world.offer(ordered[0][0]) == (D("6.48"), 0, False)  # the first batch was reconciled
    assert all(db.CwsProduct.get_by_id(cws_id).listed for _, cws_id in ordered)
    progress = json.loads(db.get_setting(PROGRESS_KEY))
    assert progress["read"] == 2 and progress["finished"] and progress["last_started"] is None  # not complete
    assert world.engine.delta_pass() is None  # no complete sweep to read changes since


def test_a_write_allowance_refills_over_time_up_to_its_capacity():
    moments = iter([0.0, 0.0, 0.0, 1.0, 100.0])
    allowance = Allowance(3, per_second=2, clock=lambda: next(moments))
    assert allowance.take(5) == 3
    assert allowance.take(1) == 0
    assert allowance.take(5) == 2
    assert allowance.take(5) == 3


def test_a_pacer_spaces_requests_evenly_after_a_small_burst():
    clock = FakeClock()
    pacer = Pacer(lambda: 0.5, burst=2, clock=clock, sleep=clock.sleep)
    for _ in range(5):
        pacer.wait()
    assert clock.slept == [2.0, 2.0, 2.0]
    unmetered = Pacer(lambda: None, burst=1, clock=clock, sleep=clock.sleep)
    for _ in range(5):
        unmetered.wait()
    assert clock.slept == [2.0, 2.0, 2.0]


def test_a_sweep_spreads_its_requests_at_the_list_pace(world):
    products(world, 8)
    world.engine.batch_size = 2
    clock = FakeClock()
    world.engine.list_pacer = Pacer(lambda: 0.25, burst=1, clock=clock, sleep=clock.sleep)
    world.engine.full_pass()
    assert world.sim.cws.requests["GET /v3/products"] == 4 and clock.slept == [4.0, 4.0, 4.0]


# ---- the priority lane -------------------------------------------------------------------

def test_a_postback_reaches_g2a_while_a_sweep_is_held_mid_read(world):
    ordered = products(world, 6)
    world.engine.batch_size = 2
    world.engine.full_pass()
    reading, release = threading.Event(), threading.Event()
    requests = []

    def hold_the_second_read():
        requests.append(1)
        if len(requests) == 2:
            reading.set()
            assert release.wait(30)
    watch(world, hold_the_second_read)
    sweep = threading.Thread(target=world.engine.full_pass)
    sweep.start()
    try:
        assert reading.wait(10)
        g2a_id, cws_id = ordered[-1]  # in a batch the held sweep has not read yet
        world.sim.cws.set_quantity(cws_id, 0)
        assert handle(world.settings, world.sim.cws.postback("STOCK", productId=cws_id), db.utcnow()) == 200
        report = world.engine.lane_pass()
        assert sweep.is_alive() and not release.is_set()
        assert report.writes == 1 and world.offer(g2a_id) == (D("6.48"), 0, False)
    finally:
        release.set()
        sweep.join(30)


def test_the_sweep_leaves_a_product_the_lane_holds_and_the_lane_retries_one_the_sweep_holds(world):
    (held_g2a, held_cws), (other_g2a, other_cws) = products(world, 2)
    world.sim.cws.set_quantity(held_cws, 4)
    world.sim.cws.set_quantity(other_cws, 0)
    with world.engine.inflight.claim([held_cws]):  # as the lane would while it reconciles it
        world.engine.full_pass()
        assert world.offer(held_g2a) == (D("6.48"), 10, True)
        assert world.offer(other_g2a) == (D("6.48"), 0, False)
        db.CwsProduct.update(dirty_since=db.utcnow()).where(db.CwsProduct.id == held_cws).execute()
        assert world.engine.lane_pass() is None  # held (now as by a sweep): left for the lane's next run
    assert db.CwsProduct.get_by_id(held_cws).dirty_since is not None
    assert world.engine.lane_pass().writes == 1
    assert world.offer(held_g2a) == (D("6.48"), 4, True)


def test_claims_hand_out_each_product_once():
    inflight = InFlight()
    with inflight.claim(["a", "b"]) as first:
        with inflight.claim(["b", "c"]) as second:
            assert (first, second) == (["a", "b"], ["c"])
    with inflight.claim(["a", "b", "c"]) as again:
        assert again == ["a", "b", "c"]


def test_hot_products_are_reserved_sold_low_on_stock_or_priced_near_a_bound(world):
    reserved, low, bounded, sold, plain = products(world, 5)
    world.engine.full_pass()  # learns the offers' prices
    db.CwsProduct.update(quantity=2).where(db.CwsProduct.id == low[1]).execute()
    db.Product.update(max_price=D("6.60")).where(db.Product.g2a_id == bounded[0]).execute()
    now = db.utcnow()
    reservation = db.Reservation.create(id="r1", expires_at=now + timedelta(minutes=30), created_at=now)
    db.ReservationLine.create(reservation=reservation, product=reserved[0], cws_product_id=reserved[1], quantity=1,
                              expires_at=now + timedelta(minutes=30))
    ordered = db.Reservation.create(id="r2", expires_at=now, created_at=now - timedelta(hours=1))
    order = db.Order.create(id="o1", reservation=ordered, g2a_order_id=1, state=db.COMPLETED,
                            cws_client_order_id="c1", created_at=now)
    db.OrderItem.create(id="i1", order=order, position=0, g2a_product_id=sold[0], cws_product_id=sold[1])
    assert hot_products(now) == {reserved[1], low[1], bounded[1], sold[1]}
    assert hot_products(now + timedelta(minutes=11)) == {low[1], bounded[1]}


def history(product, count, start, when):
    """`count` reservations made at `when`, one line each, all ordered (one key each) at `when` too."""
    g2a_id, cws_id = product
    ids = [f"h{start + n}" for n in range(count)]
    db.Reservation.insert_many([{"id": rid, "expires_at": when, "created_at": when} for rid in ids]).execute()
    db.ReservationLine.insert_many([{"reservation": rid, "product": g2a_id, "cws_product_id": cws_id, "quantity": 1,
                                     "expires_at": when, "active": False} for rid in ids]).execute()
    db.Order.insert_many([{"id": f"o{rid}", "reservation": rid, "g2a_order_id": start + n, "state": db.COMPLETED,
                           "cws_client_order_id": f"c{rid}", "created_at": when}
                          for n, rid in enumerate(ids)]).execute()
    db.OrderItem.insert_many([{"id": f"i{rid}", "order": f"o{rid}", "position": 0, "g2a_product_id": g2a_id,
                               "cws_product_id": cws_id} for rid in ids]).execute()


def test_finding_hot_products_reads_the_last_ten_minutes_not_the_whole_history(world):
    (old, recent), now = products(world, 2), db.utcnow()
    history(old, 300, 0, now - timedelta(hours=2))
    history(recent, 5, 10_000, now - timedelta(minutes=1))
    assert recent[1] in hot_products(now) and old[1] not in hot_products(now)
    steps = sqlite_steps(lambda: hot_products(now))
    later = now + timedelta(hours=2)  # ten times the history by then, made in time order as the web makes it
    history(old, 3000, 20_000, later - timedelta(hours=1))
    history(recent, 5, 30_000, later - timedelta(minutes=1))
    assert recent[1] in hot_products(later) and old[1] not in hot_products(later)
    assert sqlite_steps(lambda: hot_products(later)) <= steps * 1.5 + 2


@pytest.mark.parametrize("price, bounds, near", [
    (D("6.48"), (None, D("6.60")), True), (D("6.48"), (D("6.30"), None), True),
    (D("6.48"), (D("5.00"), D("8.00")), False), (None, (D("6.48"),), False)])
def test_a_price_within_five_percent_of_a_bound_is_near_it(price, bounds, near):
    assert near_a_bound(price, *bounds) is near


def test_the_lane_re_reads_a_stale_hot_product_with_a_single_get(world):
    (low_g2a, low_cws), _ = products(world, 2)
    world.engine.full_pass()
    db.CwsProduct.update(quantity=2, fetched_at=db.utcnow() - timedelta(minutes=5)).where(
        db.CwsProduct.id == low_cws).execute()
    world.sim.cws.set_quantity(low_cws, 0)
    reads = world.sim.cws.requests.copy()
    report = world.engine.lane_pass()
    assert world.sim.cws.requests - reads == {"GET /v3/products/{id}": 1}
    assert report.writes == 1 and world.offer(low_g2a) == (D("6.48"), 0, False)
    assert world.engine.lane_pass() is None  # read just now, and the pace allows no second read yet


def test_after_a_cws_failure_hot_reads_and_deltas_wait_but_postback_marks_do_not(world):
    (hot_g2a, hot_cws), (marked_g2a, marked_cws) = products(world, 2)
    world.engine.full_pass()
    db.CwsProduct.update(quantity=2, fetched_at=db.utcnow() - timedelta(minutes=5)).where(
        db.CwsProduct.id == hot_cws).execute()  # low on stock and stale: due a hot re-read
    world.sim.cws.fail_next("/v3/products", 500, 500, 500)
    assert world.engine.full_pass().cws_failed
    reads = world.sim.cws.requests.copy()
    assert world.engine.delta_pass() is None and world.engine.lane_pass() is None
    world.sim.cws.set_quantity(marked_cws, 0)
    db.CwsProduct.update(dirty_since=db.utcnow()).where(db.CwsProduct.id == marked_cws).execute()
    assert world.engine.lane_pass().writes == 1
    assert world.sim.cws.requests - reads == {"GET /v3/products/{id}": 1}
    assert world.offer(marked_g2a) == (D("6.48"), 0, False)


def test_sweeps_that_cannot_read_cws_back_off_and_the_first_good_one_resets_it(world):
    products(world, 2)
    world.engine.settings = world.settings.replace(sync_interval=1)
    start = datetime.now(timezone.utc)
    world.sim.cws.fail_next("/v3/products", *[500] * 6)
    assert world.engine.full_pass(start).cws_failed
    reads = world.sim.cws.requests.copy()
    skipped = world.engine.full_pass(start + timedelta(seconds=0.5))  # within 1 s: no CWS call at all
    assert skipped.cws_failed and not skipped.succeeded and world.sim.cws.requests == reads
    assert world.engine.full_pass(start + timedelta(seconds=1)).cws_failed  # tried again: failed again
    assert world.engine.full_pass(start + timedelta(seconds=2.5)).cws_failed  # now 2 s: skipped
    assert not world.engine.full_pass(start + timedelta(seconds=3)).cws_failed  # CWS back: reset
    assert not world.engine.full_pass(start + timedelta(seconds=3.1)).cws_failed


# ---- delta reads (updatedSince) ----------------------------------------------------------

def long_ago(world):
    """The simulator's clock an hour back, so the products added now are old news to updatedSince."""
    world.sim.cws.token_ttl = 10 * 3600
    world.sim.cws.now = lambda: datetime.now(timezone.utc) - timedelta(hours=1)


def test_a_delta_read_finds_a_silent_stock_out_with_one_request(world):
    long_ago(world)
    ordered = products(world, 8)
    world.engine.full_pass()
    world.sim.cws.now = lambda: datetime.now(timezone.utc)
    g2a_id, cws_id = ordered[3]
    world.sim.cws.set_quantity(cws_id, 0)
    reads = world.sim.cws.requests.copy()
    report = world.engine.delta_pass()
    assert world.sim.cws.requests - reads == {"GET /v3/products": 1}
    assert (report.products, report.writes) == (1, 1)
    assert world.offer(g2a_id) == (D("6.48"), 0, False)
    assert json.loads(db.get_setting(DELTA_STATE_KEY))["state"] == "honoured"


def test_no_delta_is_read_before_a_sweep_finished(world):
    products(world, 2)
    assert world.engine.delta_pass() is None
    assert world.sim.cws.requests["GET /v3/products"] == 0


def test_deltas_stop_when_cws_ignores_updated_since_and_sweeps_carry_on(world, caplog):
    ordered = products(world, 8)
    world.engine.full_pass()
    world.sim.cws.honour_updated_since, world.sim.cws.page_size = False, 2
    reads = world.sim.cws.requests.copy()
    world.engine.delta_pass()
    assert world.sim.cws.requests - reads == {"GET /v3/products": 3}  # stopped at the third page of four
    assert any(record.getMessage() == "sync.delta_ignored" for record in caplog.records)
    assert json.loads(db.get_setting(DELTA_STATE_KEY))["state"] == "ignored"
    assert world.engine.delta_pass() is None  # off for a while
    world.sim.cws.set_quantity(ordered[0][1], 0)
    world.engine.full_pass()
    assert world.offer(ordered[0][0]) == (D("6.48"), 0, False)


def test_an_answer_as_large_as_the_last_listing_is_not_a_delta(world):
    products(world, 6)
    world.engine.batch_size = 1  # the catalogue is listed, so its size is known
    world.engine.full_pass()
    world.sim.cws.honour_updated_since = False
    reads = world.sim.cws.requests.copy()
    world.engine.delta_pass()
    assert world.sim.cws.requests - reads == {"GET /v3/products": 1}
    assert json.loads(db.get_setting(DELTA_STATE_KEY))["state"] == "ignored"
