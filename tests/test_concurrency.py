"""Concurrency: the web server (8 threads) and the worker on one SQLite file under load, and single races on purpose.

The load: G2A-like keep-alive clients reserve, order, renew and release for ~10 s while CWS quantities churn, so
every sync pass of 2,000 products upserts the catalogue and writes offers, and the web re-fetches stale stock.
Afterwards: no 5xx and no "database is locked"; every G2A call inside its 9 s; no lost update (the database holds
exactly the reservations and orders G2A was told about); no oversell (scarce products: held + sold <= stock, and
CWS refused no purchase); every order has its keys and exactly one CWS order. bench/concurrency_bench.py is the
big, measured version. The races: an order against a release or renewal of its reservation; a stock read that
lands after a purchase; the other process committing between a read and a write on one connection.
"""
import itertools
import logging
import random
import re
import sqlite3
import threading
import time
import uuid
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal

import pytest
import requests
from peewee import fn

from bridge import db, migrations
from bridge.catalogue import store_checked
from bridge.contract import Line
from bridge.crypto import KeyBox
from bridge.cws import CwsClient
from bridge.errors import ContractError
from bridge.fulfillment import Fulfilment
from bridge.pause import PauseSwitch
from bridge.products import apply_mapping, load_mapping
from bridge.refresh import StockRefresher
from bridge.reservations import Reservations
from conftest import OUR_ID, OUR_SECRET, SECRET_KEY, SKYLINES, SWITCH, write_products
from polling import wait_for

BULK, HOT, SCARCE = 2000, 20, 3  # products: churned by the sync / reserved and ordered / fought over
SCARCE_STOCK, HOT_STOCK = 10, 100_000
CLIENTS, LOAD_SECONDS = 12, 10.0
MIN_CALLS = 200  # ~100/s on a busy 2-core box (the web is CPU-bound); fewer would not be a load
G2A_LIMIT = 9.0
FIRST_G2A_ID = 10000070000000


class Catalogue:
    """The products of the run, in the simulator (CWS stock, G2A offers already in sync) and in products.json."""

    def __init__(self, sim):
        self.sim = sim
        self.bulk, self.hot, self.scarce = [], [], []
        for count, quantity, group in ((BULK, 50, self.bulk), (HOT, HOT_STOCK, self.hot),
                                       (SCARCE, SCARCE_STOCK, self.scarce)):
            for _ in range(count):
                group.append(self._add(quantity))

    def _add(self, quantity):
        cws_id, g2a_id = str(uuid.uuid4()), FIRST_G2A_ID + len(self.bulk) + len(self.hot) + len(self.scarce)
        self.sim.cws.add_product(cws_id, quantity, [(1, None, "5.00")])
        self.sim.g2a.add_offer(g2a_id, price="6.48", stock=quantity, active=True)  # (5.00 + 0.50) / 0.85
        return g2a_id, cws_id

    def mapping(self):
        return [{"cws_product_id": cws_id, "g2a_product_id": g2a_id}
                for g2a_id, cws_id in self.bulk + self.hot + self.scarce]

    def churn(self, stop, rng):
        """Change a quarter of the bulk quantities twice a second: each sync pass has rows and offers to write."""
        while not stop.wait(0.5):
            for _, cws_id in rng.sample(self.bulk, BULK // 4):
                self.sim.cws.set_quantity(cws_id, rng.randint(0, 100))


class Ledger:
    """What G2A was told, per call and per product: the truth the database must agree with afterwards."""

    def __init__(self):
        self.lock = threading.Lock()
        self.calls = []  # (endpoint, status, seconds)
        self.held = Counter()  # g2a id -> units in reservations left active
        self.sold = Counter()  # g2a id -> units in orders
        self.orders = {}  # order id -> (g2a order id, g2a product id, quantity, keys in the answer)
        self.kept, self.released, self.short = 0, 0, Counter()

    def note(self, endpoint, answer, seconds):
        with self.lock:
            self.calls.append((endpoint, answer.status_code, seconds))

    def statuses(self):
        return Counter((endpoint, status) for endpoint, status, _ in self.calls)


class Buyer:
    """One G2A connection (keep-alive), looping reserve -> order / release / renew / keep until the deadline."""

    g2a_order_ids = itertools.count(80300000000000)

    def __init__(self, base_url, token, ledger, catalogue, seed):
        self.base, self.ledger, self.catalogue = base_url, ledger, catalogue
        self.http = requests.Session()
        self.http.headers["Authorization"] = f"Bearer {token}"
        self.rng = random.Random(seed)

    def call(self, method, path, endpoint, body=None):
        started = time.monotonic()
        answer = self.http.request(method, self.base + path, json=body, timeout=15)
        self.ledger.note(endpoint, answer, time.monotonic() - started)
        return answer

    def run(self, deadline):
        while time.monotonic() < deadline:
            scarce = self.rng.random() < 0.2
            g2a_id, _ = self.rng.choice(self.catalogue.scarce if scarce else self.catalogue.hot)
            quantity = 1 if scarce else self.rng.choice((1, 1, 2))
            answer = self.call("POST", "/reservation", "POST /reservation",
                               [{"product_id": g2a_id, "quantity": quantity}])
            if answer.status_code == 400 and scarce:
                with self.ledger.lock:
                    self.ledger.short[g2a_id] += 1
                continue
            assert answer.status_code == 200, answer.text
            self.settle(answer.json()["reservation_id"], g2a_id, quantity)

    def settle(self, reservation_id, g2a_id, quantity):
        roll = self.rng.random()
        if roll < 0.5:
            return self.order(reservation_id, g2a_id, quantity)
        if roll < 0.75:
            answer = self.call("DELETE", f"/reservation/{reservation_id}", "DELETE /reservation")
            assert answer.status_code == 204, answer.text
            with self.ledger.lock:
                self.ledger.released += 1
            return
        if roll < 0.85:
            answer = self.call("PUT", f"/reservation/{reservation_id}", "PUT /reservation",
                               [{"product_id": g2a_id, "quantity": quantity}])
            assert answer.status_code == 200, answer.text
        with self.ledger.lock:
            self.ledger.held[g2a_id] += quantity
            self.ledger.kept += 1

    def order(self, reservation_id, g2a_id, quantity):
        g2a_order_id = next(self.g2a_order_ids)
        answer = self.call("POST", "/order", "POST /order", {"reservation_id": reservation_id,
                                                              "g2a_order_id": g2a_order_id})
        assert answer.status_code in (200, 202), answer.text
        body = answer.json()
        keys = [line["value"] for entry in body["stock"] for line in entry["inventory"]]
        with self.ledger.lock:
            self.ledger.sold[g2a_id] += quantity
            self.ledger.orders[body["order_id"]] = (g2a_order_id, g2a_id, quantity, keys)
        if self.rng.random() < 0.3:
            inventory = self.call("GET", f"/order/{body['order_id']}/inventory", "GET /order/inventory")
            assert inventory.status_code == 200, inventory.text


def token(base_url):
    answer = requests.get(f"{base_url}/oauth/token", params={"grant_type": "client_credentials",
                                                            "client_id": OUR_ID, "client_secret": OUR_SECRET},
                          timeout=10)
    assert answer.status_code == 200, answer.text
    return answer.json()["access_token"]


def full_passes(worker):
    """(products, writes, seconds) of every full sync pass the worker logged."""
    found = re.findall(r"sync\.full_pass products=(\d+) writes=(\d+) .*?seconds=([\d.]+)", worker.logs())
    return [(int(products), int(writes), float(seconds)) for products, writes, seconds in found]


def percentile(values, share):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * share))]


@pytest.fixture
def loaded(sim, bridge_env, start_bridge):
    """Web and worker on one SQLite file, 2,023 mapped products, offers already in sync, the catalogue churning."""
    sim.cws.balance = 10**9
    catalogue = Catalogue(sim)
    write_products(bridge_env["PRODUCTS_FILE"], catalogue.mapping())
    env = {"STOCK_MAX_AGE_SECONDS": "1", "SYNC_INTERVAL_SECONDS": "1", "WEB_THREADS": "8",
           "G2A_REQUESTS_PER_MINUTE": "2880"}  # 16 offer writes per pass (sync.writes_per_pass): passes of ~3 s
    worker = start_bridge("worker", **env)
    wait_for(lambda: full_passes(worker), timeout=60, what="the first full sync pass")
    web = start_bridge("web", **env)
    stop = threading.Event()
    churn = threading.Thread(target=catalogue.churn, args=(stop, random.Random(7)), daemon=True)
    churn.start()
    yield web, worker, catalogue
    stop.set()
    churn.join()


def test_reservations_and_orders_under_load_beside_a_big_sync_lose_nothing_and_oversell_nothing(
        loaded, sim, fresh_db):
    web, worker, catalogue = loaded
    ledger, base = Ledger(), web.g2a.base_url
    access = token(base)
    passes_before = len(full_passes(worker))
    started, load_began = time.monotonic(), db.utcnow()
    deadline = started + LOAD_SECONDS
    with ThreadPoolExecutor(CLIENTS) as pool:
        list(pool.map(lambda seed: Buyer(base, access, ledger, catalogue, seed).run(deadline), range(CLIENTS)))
    elapsed, load_ended = time.monotonic() - started, db.utcnow()
    seconds = [s for _, _, s in ledger.calls]
    print(f"\n{len(seconds)} calls in {elapsed:.1f}s = {len(seconds) / elapsed:.0f}/s; "
          f"p50 {percentile(seconds, 0.5) * 1000:.0f} ms, p99 {percentile(seconds, 0.99) * 1000:.0f} ms, "
          f"max {max(seconds) * 1000:.0f} ms; {dict(ledger.statuses())}; "
          f"sync passes {full_passes(worker)[passes_before:]}")

    assert_answered_in_time_without_locking(ledger, web, worker)
    assert_the_sync_wrote(fresh_db, catalogue, load_began, load_ended)
    wait_for(lambda: fresh_db.Order.select().where(fresh_db.Order.state != db.COMPLETED).count() == 0,
             timeout=30, what="every order completed")
    assert_each_order_has_its_keys_and_one_cws_order(ledger, sim, fresh_db)
    assert_the_database_holds_what_g2a_was_told(ledger, fresh_db)
    assert_no_oversell(ledger, catalogue, sim, web, worker)


def assert_answered_in_time_without_locking(ledger, web, worker):
    seconds = [s for _, _, s in ledger.calls]
    assert all(status < 500 for _, status, _ in ledger.calls), ledger.statuses()
    assert max(seconds) < G2A_LIMIT
    assert len(seconds) >= MIN_CALLS, "the load was too light to mean anything"
    for process in (web, worker):
        logs = process.logs()
        assert "database is locked" not in logs and "web.unhandled" not in logs and "Traceback" not in logs


def assert_the_sync_wrote(fresh_db, catalogue, began, ended):
    """A pass stored the churned catalogue during the load, and offer changes were confirmed."""
    cws, product = fresh_db.CwsProduct, fresh_db.Product
    bulk = [cws_id for _, cws_id in catalogue.bulk[:500]]
    assert cws.select().where(cws.id.in_(bulk), cws.fetched_at.between(began, ended)).count()
    assert product.select().where(product.synced_at.between(began, ended)).count()


def assert_each_order_has_its_keys_and_one_cws_order(ledger, sim, fresh_db):
    cws_orders = defaultdict(list)
    for cws_order in sim.cws.orders:
        cws_orders[cws_order["clientOrderId"]].append(cws_order)
    assert len(sim.cws.orders) == len(ledger.orders) == fresh_db.Order.select().count()
    for order_id, (g2a_order_id, _, quantity, keys) in ledger.orders.items():
        (cws_order,) = cws_orders[f"g2a-{g2a_order_id}"]
        codes = [code["code"] for product in cws_order["products"] for code in product["codes"]]
        assert len(codes) == quantity and (keys == [] or keys == codes)
        items = fresh_db.OrderItem.select().where(fresh_db.OrderItem.order == order_id)
        assert [item.state for item in items] == ["delivered"] * quantity


def assert_the_database_holds_what_g2a_was_told(ledger, fresh_db):
    """No lost update: holds, sales and reservation states match G2A's answers, product by product."""
    lines, items = fresh_db.ReservationLine, fresh_db.OrderItem
    held = lines.select(lines.product, fn.SUM(lines.quantity)).where(lines.active == True)  # noqa: E712
    assert dict(held.group_by(lines.product).tuples()) == dict(+ledger.held)
    assert Counter(g2a_id for (g2a_id,) in items.select(items.g2a_product_id).tuples()) == +ledger.sold
    states = Counter(state for (state,) in fresh_db.Reservation.select(fresh_db.Reservation.state).tuples())
    assert states == +Counter(active=ledger.kept, released=ledger.released, ordered=len(ledger.orders))


def assert_no_oversell(ledger, catalogue, sim, web, worker):
    """Held + sold of a scarce product never exceed its stock, and CWS refused no purchase."""
    assert sum(ledger.short.values()), "no scarce product ever ran short: the clients did not fight over them"
    for g2a_id, cws_id in catalogue.scarce:
        assert ledger.held[g2a_id] + ledger.sold[g2a_id] <= SCARCE_STOCK
        assert sim.cws.stock_entry(cws_id)["quantity"] == SCARCE_STOCK - ledger.sold[g2a_id]
    assert "order.failed" not in web.logs() + worker.logs()


# ---- one interleaving, replayed in-process -------------------------------------------------------------

SKYLINES_CWS = "067ccfe1-655a-4a1f-8362-c655bb9bbf95"


@pytest.fixture
def shop(settings, sim):
    """Reservations and fulfilment in this process, sharing one CWS client, as in the web process."""
    database = migrations.open_database(settings.database_url)
    apply_mapping(load_mapping(settings.products_file, settings.default_fixed_profit, settings.default_fee))
    cws = CwsClient(settings)
    yield cws, Reservations(settings, StockRefresher(cws, max_age=3600), PauseSwitch()), Fulfilment(
        settings, cws, KeyBox(SECRET_KEY), background=lambda work, *args: work(*args))
    database.close()


def test_a_stock_fetch_that_began_before_a_purchase_and_lands_after_it_cannot_undo_it(shop, sim):
    cws, reservations, fulfilment = shop
    sim.cws.set_quantity(SKYLINES_CWS, 3)
    store_checked([cws.product(SKYLINES_CWS)], [SKYLINES_CWS], db.utcnow())
    fetch_began = db.utcnow()
    before = cws.product(SKYLINES_CWS)  # a refresh (web) or a sync page (worker) reads CWS: 3 keys...
    reservation = reservations.reserve([Line(SKYLINES, 1)], db.utcnow())["reservation_id"]
    assert fulfilment.create_order(reservation, 80201000000192, db.utcnow())[0] == 200  # ...one is bought...
    store_checked([before], [SKYLINES_CWS], fetch_began)  # ...and the read is stored after the purchase
    assert sim.cws.stock_entry(SKYLINES_CWS)["quantity"] == 2
    with pytest.raises(ContractError) as refused:  # promising 3 would sell a key CWS no longer has
        reservations.reserve([Line(SKYLINES, 3)], db.utcnow())
    assert refused.value.extra["stock"] == [{"product_id": SKYLINES, "inventory_size": 2}]


# ---- one reservation, two calls at once ------------------------------------------------------------------

SWITCH_CWS = "466c805b-ead1-4851-bc4f-9eda242550ad"


def test_an_order_racing_a_release_or_a_renewal_of_its_reservation_ends_one_consistent_way(
        start_bridge, sim, fresh_db):
    web = start_bridge("web")
    sim.cws.set_quantity(SWITCH_CWS, 1000)
    sim.cws.balance = Decimal("100000.00")  # stock, not what the balance buys, is what this test counts
    access, base = token(web.g2a.base_url), web.g2a.base_url
    sessions = [requests.Session() for _ in range(2)]
    for session in sessions:
        session.headers["Authorization"] = f"Bearer {access}"
    body = [{"product_id": SWITCH, "quantity": 1}]
    races = []
    for number in range(40):
        reservation = sessions[0].post(f"{base}/reservation", json=body, timeout=15).json()["reservation_id"]
        other = ("DELETE", None) if number % 2 else ("PUT", body)
        calls = [("POST", "/order", {"reservation_id": reservation, "g2a_order_id": 80400000000000 + number}),
                 (other[0], f"/reservation/{reservation}", other[1])]
        barrier = threading.Barrier(2)

        def fire(session, method, path, payload):
            barrier.wait()
            return session.request(method, base + path, json=payload, timeout=15).status_code
        with ThreadPoolExecutor(2) as pool:
            statuses = list(pool.map(fire, sessions, *zip(*calls)))
        races.append((reservation, other[0], statuses))

    lines = fresh_db.ReservationLine
    for reservation, other, (ordered, answered) in races:
        order = fresh_db.Order.get_or_none(fresh_db.Order.reservation == reservation)
        state = fresh_db.Reservation.get_by_id(reservation).state
        active = lines.select().where(lines.reservation == reservation, lines.active == True).count()  # noqa: E712
        outcome = (other, ordered, answered, state, order is not None, active)
        if order is not None:  # the order won: it stays ordered and holds no stock beside its order
            assert ordered == 200 and state == "ordered" and active == 0, outcome
            assert answered in ((204,) if other == "DELETE" else (200, 400)), outcome
        else:  # the release won: the order is refused and nothing was bought
            assert other == "DELETE" and (ordered, answered, state, active) == (410, 204, "released", 0), outcome
    bought = fresh_db.Order.select().count()
    assert len(sim.cws.orders) == bought
    answer = sessions[0].post(f"{base}/reservation", json=body, timeout=15).json()
    assert answer["stock"][0]["inventory_size"] == 1000 - bought - 1  # no hold was left behind


class CommitFromAnotherProcess(logging.Handler):
    """At the first log record named `event`, commits a write through a second connection, as the other
    bridge process would: the moment between what the code read just before and what it writes next."""

    def __init__(self, path, event):
        super().__init__()
        self.path, self.event, self.done = path, event, False

    def emit(self, record):
        if record.getMessage() == self.event and not self.done:
            self.done = True
            with sqlite3.connect(self.path) as other:
                other.execute("UPDATE setting SET value = value WHERE key = 'paused'")
                other.execute("INSERT INTO setting (key, value, updated_at) VALUES ('other', '1', '2026-01-01')")


def test_a_loss_alert_is_queued_even_when_the_other_process_commits_while_the_order_is_checked(
        shop, sim, settings):
    cws, reservations, fulfilment = shop
    reservation = reservations.reserve([Line(SKYLINES, 2, Decimal("5.95"))], db.utcnow())["reservation_id"]
    sim.cws.set_prices(SKYLINES_CWS, [(1, None, "6.00")])  # CWS now costs more than the sale brings in
    hook = CommitFromAnotherProcess(settings.database_url[len("sqlite:///"):], "alert.loss")
    logging.getLogger("bridge.alerts").addHandler(hook)
    try:
        status, _ = fulfilment.create_order(reservation, 80201000000193, db.utcnow())
    finally:
        logging.getLogger("bridge.alerts").removeHandler(hook)
    assert hook.done and status == 200
    assert [alert.kind for alert in db.Alert.select()] == ["loss"]


def test_each_sqlite_connection_keeps_a_small_statement_cache_and_page_cache(tmp_path):
    # One connection per thread, and every IN (...) length is a statement of its own: Python's default of 128
    # cached statements per connection was the worker's largest memory growth in bench/soak.py.
    database = db.connect(f"sqlite:///{tmp_path}/cache.db")
    try:
        assert database.connect_params["cached_statements"] == db.STATEMENT_CACHE <= 16
        assert database.connection().execute("PRAGMA cache_size").fetchone() == (-db.PAGE_CACHE_KB,)
        assert db.PAGE_CACHE_KB <= 256
        assert database.connection().execute("PRAGMA journal_mode").fetchone() == ("wal",)
    finally:
        database.close()
