"""POST /reservation's quick path on SQLite (quickhold.py): after an exact read of its products, a reservation is
written by one guarded statement; whatever changed since that read makes the guard refuse, nothing is written, and
the exact path answers as it always did. In-process, on a real SQLite file, against the simulator's CWS."""
import sqlite3
import threading
import time
from decimal import Decimal

import peewee
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from conftest import SKYLINES, SWITCH
from test_concurrency import SKYLINES_CWS, SWITCH_CWS, shop  # noqa: F401 (a fixture)

from bridge import db, quickhold, stock
from bridge import reservations as reservation_rules
from bridge.contract import Line
from bridge.errors import ContractError


@pytest.fixture
def holds(monkeypatch):
    """What each quick statement gave: its stock figures, or None when the guard refused."""
    seen, hold = [], quickhold.hold

    def spy(rows):
        seen.append(hold(rows))
        return seen[-1]
    monkeypatch.setattr(quickhold, "hold", spy)
    return seen


def counts():
    return db.Reservation.select().count(), db.ReservationLine.select().count()


def available(cws_id):
    return stock.available_stock([cws_id], db.utcnow())[cws_id]


def test_a_known_product_is_reserved_in_one_statement_with_the_exact_paths_answer(shop, sim, holds):
    _, reservations, _ = shop
    sim.cws.set_quantity(SWITCH_CWS, 10)
    first = reservations.reserve([Line(SWITCH, 2)], db.utcnow())  # the exact path: nothing known yet
    assert holds == [] and first["stock"] == [{"product_id": SWITCH, "inventory_size": 8}]
    second = reservations.reserve([Line(SWITCH, 3)], db.utcnow(), request_id="req-2")
    assert holds == [[8]]  # one statement, which found 8 before it counted its own 3
    assert second["stock"] == [{"product_id": SWITCH, "inventory_size": 5}] and available(SWITCH_CWS) == 5
    stored = db.Reservation.get_by_id(second["reservation_id"])
    assert (stored.state, stored.request_id) == (reservation_rules.ACTIVE, "req-2")
    line = db.ReservationLine.get(db.ReservationLine.reservation == stored.id)
    assert (line.g2a_product_id, line.cws_product_id, line.quantity, line.active) == (SWITCH, SWITCH_CWS, 3, True)
    assert line.expires_at == stored.expires_at and line.offer_price == first_line(first).offer_price


def first_line(answer):
    return db.ReservationLine.get(db.ReservationLine.reservation == answer["reservation_id"])


def set_cost(cws_id, cost):
    db.CwsProduct.update(cost=Decimal(cost)).where(db.CwsProduct.id == cws_id).execute()


# Each changes, after the exact read, one fact the reservation is decided on; the guard must see it.
CHANGES = {
    "stock sold elsewhere": (lambda: db.CwsProduct.update(quantity=2).where(db.CwsProduct.id == SWITCH_CWS).execute(),
                             "not enough stock"),
    "cost raised above the unit price": (lambda: set_cost(SWITCH_CWS, "9.50"), "below our cost"),
    "product disabled": (lambda: db.Product.update(enabled=False).where(db.Product.g2a_id == SWITCH).execute(),
                         "not enough stock"),
    "product unmapped": (lambda: db.Product.update(mapped=False).where(db.Product.g2a_id == SWITCH).execute(),
                         "not sold here"),
    "balance spent": (lambda: db.put_setting(stock.BALANCE_KEY, "1.00"), "not enough stock"),  # buys no key
}


@pytest.mark.parametrize("change", CHANGES)
def test_a_fact_changed_since_the_read_makes_the_guard_refuse_and_the_exact_path_answer(shop, sim, holds, change):
    _, reservations, _ = shop
    sim.cws.set_quantity(SWITCH_CWS, 10)
    db.put_setting(stock.BALANCE_KEY, "1000.00")
    set_cost(SWITCH_CWS, "5.00")
    reservations.reserve([Line(SWITCH, 1, Decimal("9.00"))], db.utcnow())
    apply, refusal = CHANGES[change]
    apply()
    before = counts()
    with pytest.raises(ContractError) as refused:
        reservations.reserve([Line(SWITCH, 3, Decimal("9.00"))], db.utcnow())
    assert holds == [None] and refusal in refused.value.message
    assert counts() == before


def test_a_refreshed_product_is_reserved_by_the_exact_path(shop, sim, holds):
    _, reservations, _ = shop
    sim.cws.set_quantity(SWITCH_CWS, 10)
    reservations.reserve([Line(SWITCH, 1)], db.utcnow())
    db.CwsProduct.update(checked_at=db.utcnow()).where(db.CwsProduct.id == SWITCH_CWS).execute()  # a later read
    answer = reservations.reserve([Line(SWITCH, 1)], db.utcnow())
    assert holds == [None] and answer["stock"] == [{"product_id": SWITCH, "inventory_size": 8}]
    reservations.reserve([Line(SWITCH, 1)], db.utcnow())  # the exact path's read is what is known now
    assert holds == [None, [8]]


def test_lines_are_all_written_or_none(shop, sim, holds):
    _, reservations, _ = shop
    sim.cws.set_quantity(SWITCH_CWS, 10)
    sim.cws.set_quantity(SKYLINES_CWS, 10)
    reservations.reserve([Line(SWITCH, 1), Line(SKYLINES, 1)], db.utcnow())
    db.CwsProduct.update(quantity=1).where(db.CwsProduct.id == SKYLINES_CWS).execute()  # the second line no longer fits
    before = counts()
    with pytest.raises(ContractError) as refused:
        reservations.reserve([Line(SWITCH, 1), Line(SKYLINES, 2)], db.utcnow())
    assert holds == [None] and counts() == before  # not even the first line's stock is held
    assert refused.value.extra["stock"] == [{"product_id": SWITCH, "inventory_size": 9},
                                            {"product_id": SKYLINES, "inventory_size": 0}]


def test_two_g2a_products_of_one_cws_product_share_its_stock_in_the_statement(shop, sim, holds):
    _, reservations, _ = shop
    twin = 10000099999001
    db.run_sql("INSERT INTO product SELECT {p}, cws_product_id, mapped, enabled, fixed_profit, fee, min_price, "
               "max_price, max_stock, offer_id, offer_price, offer_stock, offer_active, price_limit_min, "
               "price_limit_max, sync_state, sync_error, synced_at, missing_offer_warned FROM product "
               "WHERE g2a_id = {p}", twin, SWITCH)
    sim.cws.set_quantity(SWITCH_CWS, 5)
    reservations.reserve([Line(SWITCH, 1), Line(twin, 1)], db.utcnow())  # the exact read: 3 left
    with pytest.raises(ContractError):
        reservations.reserve([Line(SWITCH, 2), Line(twin, 2)], db.utcnow())  # 4 of 3: each line alone would fit
    assert holds == [None]
    answer = reservations.reserve([Line(SWITCH, 2), Line(twin, 1)], db.utcnow())
    assert holds == [None, [3, 1]]  # the second line counted after the first
    assert answer["stock"] == [{"product_id": SWITCH, "inventory_size": 0}, {"product_id": twin, "inventory_size": 0}]


def test_a_new_connection_gets_the_statement_made_again(shop, sim, holds):
    _, reservations, _ = shop
    sim.cws.set_quantity(SWITCH_CWS, 10)
    for _ in range(2):
        reservations.reserve([Line(SWITCH, 1)], db.utcnow())
        db.database.obj.close()  # the writing connection, and with it the TEMP view and its trigger, are gone
    reservations.reserve([Line(SWITCH, 1)], db.utcnow())
    assert holds == [[9], [8]]


def test_what_a_process_knows_for_the_quick_path_is_bounded(shop, monkeypatch):
    _, reservations, _ = shop
    monkeypatch.setattr(reservation_rules, "KNOWN_MAX", 2)
    with db.write_transaction():
        sellable = reservation_rules._read_sellable([SWITCH, SKYLINES], db.utcnow())
    reservations._remember(sellable)
    reservations._remember(sellable._replace(products={SWITCH: sellable.products[SWITCH]}))
    assert list(reservations._known) == [SKYLINES, SWITCH]  # the newest read last; none beyond the bound


def outcome(reserve, lines):
    """What a reservation answered, without its id: ("ok", stock) or ("refused", status, message, stock)."""
    try:
        return "ok", reserve(lines, db.utcnow())["stock"]
    except ContractError as err:
        return "refused", err.status, err.message, err.extra.get("stock")


def exact_answer(exact, lines):
    """The exact path's answer to `lines` on the database as it is, rolled back: nothing it writes stays."""
    database = db.database.obj
    with database.writing(), database.atomic() as attempt:
        answer = outcome(exact.reserve, lines)
        attempt.rollback()
    return answer


PRODUCTS = {SWITCH: SWITCH_CWS, SKYLINES: SKYLINES_CWS}
LINES = st.lists(st.tuples(st.sampled_from(sorted(PRODUCTS)), st.integers(1, 4),
                           st.sampled_from([None, "6.00", "9.00"])), min_size=1, max_size=2,
                 unique_by=lambda line: line[0])
STEPS = st.lists(st.one_of(
    st.tuples(st.just("reserve"), LINES),
    st.tuples(st.just("quantity"), st.sampled_from(sorted(PRODUCTS.values())), st.integers(0, 8)),
    st.tuples(st.just("cost"), st.sampled_from(sorted(PRODUCTS.values())), st.sampled_from(["5.00", "8.50"])),
    st.tuples(st.just("balance"), st.sampled_from(["1000.00", "12.00"])),
    st.tuples(st.just("enabled"), st.sampled_from(sorted(PRODUCTS)), st.booleans())), min_size=1, max_size=14)
CHANGE = {
    "quantity": lambda cws_id, count: db.CwsProduct.update(quantity=count).where(db.CwsProduct.id == cws_id).execute(),
    "cost": lambda cws_id, cost: set_cost(cws_id, cost),
    "balance": lambda value: db.put_setting(stock.BALANCE_KEY, value),
    "enabled": lambda g2a_id, on: db.Product.update(enabled=on).where(db.Product.g2a_id == g2a_id).execute(),
}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=STEPS)
def test_every_reservation_is_answered_as_the_exact_path_alone_would(shop, steps):
    _, reservations, _ = shop
    exact = reservation_rules.Reservations(reservations.settings, reservations.refresher, reservations.pause)
    exact._quick = lambda *args: None
    db.ReservationLine.delete().execute(), db.Reservation.delete().execute()
    db.CwsProduct.update(quantity=6, cost=Decimal("5.00"), checked_at=db.utcnow()).execute()
    db.Product.update(enabled=True).execute()
    db.put_setting(stock.BALANCE_KEY, "1000.00")
    for kind, *args in steps:
        if kind != "reserve":
            CHANGE[kind](*args)
            continue
        lines = [Line(g2a_id, count, None if price is None else Decimal(price)) for g2a_id, count, price in args[0]]
        expected = exact_answer(exact, lines)  # first: the quick path's reservation then holds stock
        assert outcome(reservations.reserve, lines) == expected, steps


class FailingConnection:
    """A writing connection whose every statement fails with `error`."""

    def __init__(self, error):
        self.error = error

    def execute(self, sql, params=()):
        raise self.error


@pytest.mark.parametrize("error", [sqlite3.OperationalError("database is locked"),
                                   sqlite3.IntegrityError("FOREIGN KEY constraint failed")])
def test_any_other_database_error_is_raised_not_taken_for_a_refusal(database, monkeypatch, error):
    monkeypatch.setattr(database, "connection", lambda: FailingConnection(error))
    with pytest.raises(getattr(peewee, type(error).__name__)):  # as peewee's, like every other statement's
        quickhold.hold([(None,) * len(quickhold.COLUMNS)])


def queued(count, timeout=10):
    """Until `count` reservations wait in the quick path's queue."""
    deadline = time.monotonic() + timeout
    while len(quickhold._queue._waiting) < count:
        assert time.monotonic() < deadline, "the reservations never queued"
        time.sleep(0.005)


def together(calls):
    """Run `calls` in threads that queue while this thread holds the writer lock, then let them write; their
    results (or errors) in order."""
    results = [None] * len(calls)

    def run(index, call):
        try:
            results[index] = call()
        except Exception as err:  # noqa: BLE001 (the test compares it)
            results[index] = err
    with db.database.obj.writer:
        threads = [threading.Thread(target=run, args=pair) for pair in enumerate(calls)]
        for thread in threads:
            thread.start()
        queued(len(calls))
    for thread in threads:
        thread.join(10)
    return results


@pytest.fixture
def statements(monkeypatch):
    """The rows of each guarded statement written (one list of rows per statement)."""
    seen, statement = [], quickhold._statement

    def spy(database, rows):
        seen.append(rows)
        return statement(database, rows)
    monkeypatch.setattr(quickhold, "_statement", spy)
    return seen


def test_reservations_waiting_together_are_written_by_one_statement(shop, sim, statements):
    _, reservations, _ = shop
    sim.cws.set_quantity(SWITCH_CWS, 10)
    reservations.reserve([Line(SWITCH, 1)], db.utcnow())  # the exact read: 9 left
    answers = together([lambda: reservations.reserve([Line(SWITCH, 1)], db.utcnow())] * 3)
    assert [len(rows) for rows in statements] == [3]
    assert sorted(answer["stock"][0]["inventory_size"] for answer in answers) == [6, 7, 8]  # each after the others
    assert available(SWITCH_CWS) == 6 and counts() == (4, 4)


def test_a_refusal_in_a_batch_falls_on_its_own_reservation_only(shop, sim, statements):
    _, reservations, _ = shop
    sim.cws.set_quantity(SWITCH_CWS, 3)
    reservations.reserve([Line(SWITCH, 1)], db.utcnow())  # 2 left for the 3 that wait together
    results = together([lambda: outcome(reservations.reserve, [Line(SWITCH, 1)])] * 3)
    assert [len(rows) for rows in statements] == [3, 1, 1, 1]  # the batch refused, then each alone
    assert sorted(result[0] for result in results) == ["ok", "ok", "refused"]
    assert available(SWITCH_CWS) == 0 and counts() == (3, 3)


def test_an_error_in_a_batch_falls_on_its_own_reservation_only(shop, sim, monkeypatch):
    _, reservations, _ = shop
    sim.cws.set_quantity(SWITCH_CWS, 10)
    reservations.reserve([Line(SWITCH, 1)], db.utcnow())
    written, hold = [], quickhold.hold
    monkeypatch.setattr(quickhold, "hold", lambda rows: written.append(rows) or hold(rows))
    reservations.reserve([Line(SWITCH, 1)], db.utcnow())
    no_id = [(None, *written[0][0][1:])]  # a reservation id is required: this row's insert fails
    results = together([lambda: reservations.reserve([Line(SWITCH, 1)], db.utcnow()), lambda: hold(no_id),
                        lambda: reservations.reserve([Line(SWITCH, 1)], db.utcnow())])
    assert isinstance(results[1], peewee.IntegrityError) and "NOT NULL" in str(results[1])
    assert sorted(results[index]["stock"][0]["inventory_size"] for index in (0, 2)) == [6, 7]
    assert counts() == (4, 4)


def test_a_leader_whose_lock_fails_leaves_nothing_queued(database, monkeypatch):
    def failing():
        raise OSError("no lock")
    monkeypatch.setattr(database, "writing", failing)
    with pytest.raises(OSError):
        quickhold.hold([(None,) * len(quickhold.COLUMNS)])
    assert not quickhold._queue._waiting and not quickhold._queue._leading


@pytest.mark.timeout(30)  # without the rule it deadlocks: its leader waits for the lock this thread holds
def test_a_reservation_inside_a_transaction_is_written_alone_within_it(shop, sim, statements):
    _, reservations, _ = shop
    sim.cws.set_quantity(SWITCH_CWS, 10)
    reservations.reserve([Line(SWITCH, 1)], db.utcnow())
    database = db.database.obj
    with database.writing(), database.atomic("IMMEDIATE") as transaction:
        waiting = threading.Thread(target=reservations.reserve, args=([Line(SWITCH, 1)], db.utcnow()))
        waiting.start()  # queues behind this thread's lock; must not be written inside this transaction
        queued(1)
        answer = reservations.reserve([Line(SWITCH, 2)], db.utcnow())
        assert answer["stock"] == [{"product_id": SWITCH, "inventory_size": 7}]
        transaction.rollback()
    waiting.join(10)
    assert [len(rows) for rows in statements] == [1, 1] and counts() == (2, 2)  # the first and the waiting one


@pytest.mark.timeout(30)  # without the rule it deadlocks: its leader waits for the lock this thread holds
def test_a_reservation_by_the_thread_holding_the_writer_lock_is_written_alone(shop, sim, statements):
    _, reservations, _ = shop
    sim.cws.set_quantity(SWITCH_CWS, 10)
    reservations.reserve([Line(SWITCH, 1)], db.utcnow())
    with db.database.obj.writing():  # no transaction: the statement commits on its own
        waiting = threading.Thread(target=reservations.reserve, args=([Line(SWITCH, 1)], db.utcnow()))
        waiting.start()
        queued(1)
        answer = reservations.reserve([Line(SWITCH, 2)], db.utcnow())
        assert answer["stock"] == [{"product_id": SWITCH, "inventory_size": 7}]
    waiting.join(10)
    assert [len(rows) for rows in statements] == [1, 1] and counts() == (3, 3) and available(SWITCH_CWS) == 6
