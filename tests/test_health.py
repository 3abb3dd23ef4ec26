"""GET /health stays the fast public "OK"; GET /health?deep=1 reports the figures an operator's monitor needs."""
from datetime import timedelta

import pytest
from peewee import SqliteDatabase
from polling import wait_for

from bridge import db, pause
from bridge.config import Settings
from bridge.metrics import Metrics, deep_health

REMOTE = {"X-Forwarded-For": "203.0.113.7"}  # as the TLS proxy forwards a call from the internet
FIELDS = {"db", "worker_heartbeat_age", "last_sync_age", "cws_token_age", "g2a_token_age", "cws_balance", "paused",
          "status", "attention"}


@pytest.fixture
def shop(start_bridge):
    web = start_bridge("web")
    web.worker = start_bridge("worker")
    return web


def deep(g2a, headers=None):
    return g2a.http.get(f"{g2a.base_url}/health", params={"deep": "1"}, headers=headers, timeout=10)


def test_plain_health_is_ok_for_anyone_and_deep_health_needs_credentials_from_outside(shop):
    g2a = shop.g2a
    plain = g2a.http.get(f"{g2a.base_url}/health", headers=REMOTE, timeout=10)
    assert plain.status_code == 200 and plain.text == "OK"
    refused = deep(g2a, REMOTE)
    assert refused.status_code == 401 and refused.json()["code"] == "AUTH01"
    assert deep(g2a, {**REMOTE, "Authorization": f"Bearer {g2a.token()}"}).headers["Content-Type"] == \
        "application/json"


def test_deep_health_reports_the_worker_sync_tokens_balance_and_pause(shop, fresh_db):
    def worker_reported():
        body = deep(shop.g2a).json()
        return body["g2a_token_age"] is not None and body["last_sync_age"] is not None and body["cws_balance"]
    wait_for(worker_reported, timeout=20, what="the worker's figures in /health?deep=1")
    answer = deep(shop.g2a)
    body = answer.json()
    assert answer.status_code == 200 and set(body) == FIELDS
    assert body["db"] == "ok" and body["status"] == "ok" and body["attention"] == [] and body["paused"] is False
    assert 0 <= body["worker_heartbeat_age"] <= 10 and 0 <= body["last_sync_age"] < 30
    assert body["cws_token_age"] >= 0 and body["g2a_token_age"] >= 0
    assert float(body["cws_balance"]) > 0

    pause.set_paused(True)
    assert deep(shop.g2a).json()["paused"] is True


def test_deep_health_is_503_once_the_killed_workers_heartbeat_is_over_a_minute_old(shop, fresh_db):
    wait_for(lambda: deep(shop.g2a).status_code == 200, timeout=20, what="a healthy worker")
    shop.worker.kill()
    assert deep(shop.g2a).status_code == 200  # a fresh heartbeat: not silent yet
    fresh_db.Lease.update(heartbeat_at=fresh_db.utcnow() - timedelta(seconds=120)).execute()
    answer = deep(shop.g2a)
    body = answer.json()
    assert answer.status_code == 503 and body["status"] == "degraded" and body["db"] == "ok"
    assert body["worker_heartbeat_age"] > 60
    assert any("worker is not running" in line for line in body["attention"])


def test_deep_health_is_503_when_the_worker_stopped_cleanly(shop):
    wait_for(lambda: deep(shop.g2a).status_code == 200, timeout=20, what="a healthy worker")
    assert shop.worker.stop() == 0  # a clean stop gives the lease back: no heartbeat at all
    answer = deep(shop.g2a)
    assert answer.status_code == 503 and answer.json()["worker_heartbeat_age"] is None


def test_an_unreachable_database_is_503_and_metrics_still_answer_with_database_up_0(tmp_path):
    db.database.initialize(SqliteDatabase(str(tmp_path / "no-such-folder" / "bridge.db")))
    status, body = deep_health(Settings(), db.utcnow())
    assert status == 503 and set(body) == FIELDS
    assert body["db"].startswith("error: ") and body["status"] == "degraded" and body["worker_heartbeat_age"] is None
    text = Metrics("web").exposition(Settings(), db.utcnow()).decode()
    assert "\ng2a_bridge_database_up 0.0\n" in text and "g2a_bridge_http_requests_total" in text
