"""What a reservation trusts: cached CWS stock spares it a re-read only when the product was read alone (the web's
freshness check, the priority lane) within STOCK_MAX_AGE_SECONDS, never after a sweep page; and the cache answers
of a spent budget are logged once a minute with a count, not once each."""
import logging
from datetime import timedelta

import pytest

from bridge import db, migrations
from bridge.catalogue import Catalogue, store_answer
from bridge.contract import Line
from bridge.cws import CwsClient
from bridge.errors import ContractError
from bridge.pause import PauseSwitch
from bridge.products import apply_mapping, load_mapping
from bridge.refresh import FALLBACK_LOG_EVERY, BudgetFallbacks, StockRefresher
from bridge.reservations import Reservations
from bridge.sync import PassReport
from conftest import SWITCH
from fakes import FakeClock
from test_faults import SWITCH_CWS

MAX_AGE = 5.0


@pytest.fixture
def shop(settings, sim):
    """Reservations in-process against the simulator, with a STOCK_MAX_AGE_SECONDS of 5 s."""
    database = migrations.open_database(settings.database_url)
    apply_mapping(load_mapping(settings.products_file, settings.default_fixed_profit, settings.default_fee))
    cws = CwsClient(settings)
    refresher = StockRefresher(cws, MAX_AGE)
    yield Reservations(settings, refresher, PauseSwitch()), cws
    refresher.close()
    database.close()


def reserve(reservations, now):
    """True when the reservation of one SWITCH key was accepted."""
    try:
        reservations.reserve([Line(SWITCH, 1, None)], now)
    except ContractError as err:
        assert err.status == 400
        return False
    return True


def checked_at():
    return db.CwsProduct.get_by_id(SWITCH_CWS).checked_at


def test_a_reservation_re_reads_cws_after_a_sweep_page_read_the_product_a_moment_ago(shop, sim):
    reservations, cws = shop
    now = db.utcnow()
    store_answer(list(cws.products([SWITCH_CWS])), {SWITCH_CWS}, now)  # what a sweep page stores
    assert db.CwsProduct.get_by_id(SWITCH_CWS).fetched_at == now and checked_at() is None
    sim.cws.set_quantity(SWITCH_CWS, 0)  # a silent stock-out right after the page was read
    assert not reserve(reservations, now + timedelta(seconds=0.5))
    assert checked_at() is not None  # the re-read counts from now on


def test_a_read_of_the_product_alone_is_trusted_for_stock_max_age_seconds_then_read_again(shop, sim):
    reservations, _ = shop
    now = db.utcnow()
    assert reserve(reservations, now)  # the freshness check read SWITCH alone
    sim.cws.set_quantity(SWITCH_CWS, 0)
    assert reserve(reservations, now + timedelta(seconds=MAX_AGE - 1))  # trusted: the documented window
    assert not reserve(reservations, now + timedelta(seconds=MAX_AGE + 1))


def test_the_priority_lanes_reads_count_as_reads_of_the_product_alone(shop, sim):
    _, cws = shop
    now = db.utcnow()
    assert Catalogue(cws, None).read_products([SWITCH_CWS], now, PassReport("lane", now))
    assert checked_at() == now


def test_cache_answers_of_a_spent_budget_are_logged_once_a_minute_with_their_count(caplog):
    clock = FakeClock(1000.0)
    fallbacks = BudgetFallbacks(clock)
    with caplog.at_level(logging.DEBUG, logger="bridge.refresh"):
        for number in range(300):
            fallbacks.note([f"p{number}"])
            clock.now += 0.25
    warnings = [record.event_fields for record in caplog.records if record.levelno == logging.WARNING]
    assert warnings == [{"products": "p0", "reason": "budget", "answers": 1},
                        {"products": "p240", "reason": "budget", "answers": FALLBACK_LOG_EVERY * 4}]
    assert sum(1 for r in caplog.records if r.levelno == logging.DEBUG) == 300 - 2  # each one, at DEBUG
