"""How old our CWS knowledge is, and how far the sweep got: in `status` and /metrics."""
import json
from datetime import timedelta
from decimal import Decimal as D

from prometheus_client.parser import text_string_to_metric_families

from bridge import db, freshness, status
from bridge.config import Settings
from bridge.metrics import Metrics
from bridge.products import Mapping, apply_mapping
from bridge.sweep import PROGRESS_KEY


def mapped_products(ages, now, unread=0, unmapped_age=None):
    """Mapped products last read `ages` seconds ago, `unread` never read, one unmapped product (not counted)."""
    ids = [f"cws-{i}" for i in range(len(ages) + unread + 1)]
    apply_mapping([Mapping(cws_id, i + 1, D("0.5"), D("0.15")) for i, cws_id in enumerate(ids[:-1])])
    for cws_id, age in zip(ids, ages):
        db.CwsProduct.update(fetched_at=now - timedelta(seconds=age)).where(db.CwsProduct.id == cws_id).execute()
    db.CwsProduct.create(id=ids[-1], fetched_at=None if unmapped_age is None else now - timedelta(seconds=unmapped_age))


def test_staleness_is_the_age_of_the_oldest_state_and_its_quantiles_over_mapped_products(database):
    now = db.utcnow()
    mapped_products(range(1, 101), now, unread=2, unmapped_age=9999)
    figures = freshness.staleness(now)
    assert figures == {"mapped": 102, "never_read": 2, "oldest_seconds": 100.0, "p50_seconds": 50.0,
                       "p95_seconds": 95.0}


def test_staleness_of_nothing_read_yet_is_unknown(database):
    now = db.utcnow()
    mapped_products([], now, unread=3)
    assert freshness.staleness(now) == {"mapped": 3, "never_read": 3, "oldest_seconds": None, "p50_seconds": None,
                                        "p95_seconds": None}
    assert "never read (3 mapped products)" in status.render(status.collect(Settings(), now))


def sweep(now, read, finished=None, last=None, mapped=10):
    db.put_setting(PROGRESS_KEY, json.dumps({"started": (now - timedelta(seconds=40)).isoformat(), "mode": "pages",
                                             "mapped": mapped, "read": read, "finished": finished,
                                             "duration": None, "last_duration": last}))


def test_a_running_sweep_shows_how_far_it_got_and_how_long_the_last_one_took(database):
    now = db.utcnow()
    sweep(now, read=4, last=125.0)
    progress = freshness.sweep_progress(now)
    assert (progress["ratio"], progress["running"], progress["started_age_seconds"]) == (0.4, True, 40.0)
    text = status.render(status.collect(Settings(), now))
    assert "sweep          4/10 read by pages (40%), started 40 s ago, last took 2 min" in text
    sweep(now, read=10, finished=now.isoformat(), last=38.5)
    assert freshness.sweep_progress(now)["ratio"] == 1.0
    assert freshness.sweep_progress(now)["running"] is False


def test_metrics_carry_the_staleness_quantiles_and_the_sweep(database):
    now = db.utcnow()
    mapped_products(range(1, 101), now)
    sweep(now, read=4, last=125.0)
    text = Metrics("web").exposition(Settings(), now).decode()
    samples = {(s.name, tuple(s.labels.items())): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    assert samples[("g2a_bridge_cws_state_age_seconds", (("quantile", "0.95"),))] >= 95.0
    assert samples[("g2a_bridge_cws_oldest_state_seconds", ())] >= 100.0
    assert samples[("g2a_bridge_sweep_progress_ratio", ())] == 0.4
    assert samples[("g2a_bridge_sweep_duration_seconds", ())] == 125.0
    assert samples[("g2a_bridge_cws_never_read_products", ())] == 0
