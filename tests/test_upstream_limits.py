"""Upstream limits end to end: web and worker against a CWS that enforces cws.md §5.3 (scaled down), the web's
freshness check inside its budget, and a CWS answering 429 for a while (nothing lost, one alert when it lasts)."""
import time

import pytest

from bridge import db, migrations
from bridge.budget import PERSISTENT, budgets_for
from bridge.config import load_settings
from bridge.cws import CwsClient
from bridge.g2a import G2aClient
from bridge.metrics import Metrics
from bridge.pacing import BURST
from bridge.pause import PauseSwitch
from bridge.products import apply_mapping, load_mapping
from bridge.sync import SyncEngine
from bridge.worker import checked
from conftest import SWITCH
from polling import wait_for
from test_faults import IN_SYNC, SWITCH_CWS, events, inventory_size, offers, offers_become
from fakes import FakeClock

# Scaled-down limits, enforced by the simulator exactly as configured in the bridge.
SCALED = {"token": (10, 300.0), "list": (20, 600.0), "product": (20, 300.0)}
SCALED_ENV = {"CWS_TOKEN_REQUESTS_PER_5_MIN": "10", "CWS_LIST_REQUESTS_PER_10_MIN": "20",
              "CWS_PRODUCT_REQUESTS_PER_5_MIN": "20"}
SHARE = {name: int(0.9 * limit) for name, (limit, _) in SCALED.items()}  # what web + worker + CLI may use


def refused(answer):
    return answer.status_code == 400 and answer.json()["stock"][0]["inventory_size"] == 0


def test_the_freshness_check_refuses_after_a_silent_stock_out_then_answers_from_the_cache_once_its_budget_is_spent(
        start_bridge, sim):
    sim.cws.limits.enforce(SCALED)
    web = start_bridge("web", STOCK_MAX_AGE_SECONDS="0", **SCALED_ENV)
    web_share = budgets_for_env(web)["cws_product"].limit
    g2a = web.g2a
    sim.cws.set_quantity(SWITCH_CWS, 0)  # sold out at CWS, no postback
    assert refused(g2a.reserve((SWITCH, 1)))
    sim.cws.set_quantity(SWITCH_CWS, 100)
    sizes = [inventory_size(g2a.reserve((SWITCH, 1))) for _ in range(web_share - 1)]
    assert sizes == [100 - n for n in range(1, web_share)]  # each one read CWS
    sim.cws.set_quantity(SWITCH_CWS, 0)  # sold out again, but the web's share of reads is spent
    started = time.monotonic()
    cached = g2a.reserve((SWITCH, 1))
    assert time.monotonic() - started < 1.0  # no waiting for a slot
    assert inventory_size(cached) == 100 - web_share  # the cache answered
    fallbacks = events(web, "stock.cache_fallback")
    assert len(fallbacks) == 1 and "reason=budget" in fallbacks[0] and SWITCH_CWS in fallbacks[0]
    counts = sim.cws.limits.counts()
    assert counts["requests"]["product"] == web_share and counts["throttled"] == {}


def budgets_for_env(process):
    """The budgets a web process started with `process.env` holds."""
    return budgets_for(load_settings(process.env), "web")


def test_web_and_worker_together_stay_within_the_share_of_every_limit_and_get_no_429(start_bridge, sim):
    sim.cws.limits.enforce(SCALED)
    web = start_bridge("web", STOCK_MAX_AGE_SECONDS="0", **SCALED_ENV)
    start_bridge("worker", SYNC_INTERVAL_SECONDS="1", **SCALED_ENV)
    offers_become(sim, IN_SYNC)
    deadline = time.monotonic() + 25  # the worker's sweeps: a burst, then one catalogue read per 37 s (16 per 10 min)
    while time.monotonic() < deadline:
        web.g2a.reserve((SWITCH, 1))
        time.sleep(0.2)
    counts = sim.cws.limits.counts()
    assert counts["throttled"] == {}
    assert BURST <= counts["requests"]["list"] <= SHARE["list"]
    assert counts["requests"]["product"] <= SHARE["product"]
    assert counts["requests"]["token"] <= SHARE["token"]


def test_a_catalogue_answered_429_for_a_while_is_not_a_sync_failure_and_sync_catches_up(start_bridge, sim):
    worker = start_bridge("worker", SYNC_INTERVAL_SECONDS="1", CWS_RETRY_MAX="0")
    offers_become(sim, IN_SYNC)
    sim.cws.limits.enforce({}, retry_after=False)  # a throttle without Retry-After: the bridge backs off itself
    sim.cws.limits.throttle("list", 12)
    sim.cws.set_quantity(SWITCH_CWS, 0)  # a silent stock-out while the catalogue cannot be read
    wait_for(lambda: len(events(worker, "sync.throttled")) >= 3, timeout=15, what="three throttled passes")
    offers_become(sim, {**IN_SYNC, SWITCH: (IN_SYNC[SWITCH][0], 0, False)}, timeout=40)
    assert not events(worker, "alert.sync_failing") and not events(worker, "job.failed")
    assert sim.cws.limits.counts()["throttled"]["list"] >= 3


@pytest.fixture
def engine(settings, sim):
    """The worker's sync engine in-process, on a clock the budgets and the upstream retries share."""
    database = migrations.open_database(settings.database_url)
    apply_mapping(load_mapping(settings.products_file, settings.default_fixed_profit, settings.default_fee))
    clock = FakeClock(1000.0)
    budgets = budgets_for(settings, "worker", clock=clock, sleep=clock.sleep)
    cws = CwsClient(settings, budgets=budgets, sleep=clock.sleep)
    g2a = G2aClient(settings, budgets=budgets, job_poll_interval=0.01)
    sync = SyncEngine(settings, cws, g2a, PauseSwitch())
    yield checked(sync.full_pass, Metrics("worker"), budgets.throttling), clock
    database.close()


def test_a_catalogue_throttled_for_minutes_alerts_once_and_sync_catches_up_after(engine, sim):
    full_pass, clock = engine
    full_pass(db.utcnow())
    assert offers(sim) == IN_SYNC
    sim.cws.limits.throttle("list", 3600)
    sim.cws.set_quantity(SWITCH_CWS, 0)
    started = clock.now
    while clock.now - started < PERSISTENT + 120:  # every pass fails on a 429, none raises SyncFailed
        full_pass(db.utcnow())
    [alert] = db.Alert.select()
    assert alert.kind == "upstream_throttled" and alert.dedupe_key == "upstream_throttled:cws_list"
    assert alert.text.startswith("CWS GET /v3/products answered 429 for 5 min; budget 360/600 s")
    assert alert.text.endswith("lower CWS_LIST_REQUESTS_PER_10_MIN")
    sim.cws.limits.throttle("list", 0)
    clock.now += 60  # the last hold
    full_pass(db.utcnow())
    assert offers(sim) == {**IN_SYNC, SWITCH: (IN_SYNC[SWITCH][0], 0, False)}
    assert db.Alert.select().count() == 1
