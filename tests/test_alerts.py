"""Alerts: deduplicated, queued, posted to a Slack-compatible webhook with backoff, the secret URL never logged."""
import io
import logging
from datetime import datetime, timedelta, timezone

import pytest
from fake_webhook import webhook  # noqa: F401 (a fixture)

from bridge import alerts, db, status
from bridge.config import Settings
from bridge.log import Masker, TextFormatter

NOW = datetime(2025, 7, 14, 12, 0, tzinfo=timezone.utc)


@pytest.fixture
def logged():
    """What the bridge loggers print, with an empty masker: a secret must be absent, not merely masked."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(TextFormatter(Masker()))
    logger = logging.getLogger("bridge")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield stream
    logger.removeHandler(handler)
    logger.setLevel(level)


def settings_for(hook):
    return Settings(alert_webhook_url=hook.url)


def test_the_same_kind_and_subject_is_queued_once_per_15_minutes(database):
    assert alerts.raise_alert("order_failed", "o1", "order o1 failed", NOW)
    assert not alerts.raise_alert("order_failed", "o1", "order o1 failed again", NOW + timedelta(minutes=14))
    assert alerts.raise_alert("order_failed", "o2", "order o2 failed", NOW + timedelta(minutes=1))
    assert alerts.raise_alert("order_failed", "o1", "order o1 failed", NOW + timedelta(minutes=16))
    assert db.Alert.select().count() == 3


def test_a_queued_alert_is_posted_as_slack_text_once(database, webhook):
    alerts.raise_alert("low_balance", "cws", "CWS balance 12.00 EUR is below 50", NOW)
    assert alerts.dispatch_pending(settings_for(webhook), NOW) == 1
    assert alerts.dispatch_pending(settings_for(webhook), NOW + timedelta(minutes=1)) == 0
    [text] = webhook.texts()
    assert "low_balance" in text and "CWS balance 12.00 EUR is below 50" in text
    assert db.Alert.get().sent_at == NOW


def test_a_refused_post_is_retried_with_backoff(database, webhook):
    alerts.raise_alert("sync_failing", "sync", "sync failed 3 times", NOW)
    webhook.answers = [500]
    assert alerts.dispatch_pending(settings_for(webhook), NOW) == 0
    assert alerts.dispatch_pending(settings_for(webhook), NOW + timedelta(seconds=4)) == 0
    assert len(webhook.posts) == 1
    assert alerts.dispatch_pending(settings_for(webhook), NOW + timedelta(seconds=5)) == 1
    assert len(webhook.posts) == 2
    assert db.Alert.get().attempts == 2


def test_delivery_stops_at_the_first_failure_and_the_rest_wait(database, webhook):
    for subject in ("a", "b", "c"):
        alerts.raise_alert("order_failed", subject, f"order {subject} failed", NOW)
    webhook.answers = [503]
    assert alerts.dispatch_pending(settings_for(webhook), NOW) == 0
    assert len(webhook.posts) == 1
    assert alerts.dispatch_pending(settings_for(webhook), NOW + timedelta(seconds=1)) == 2


def test_a_failure_is_logged_without_the_webhook_url(database, logged):
    alerts.raise_alert("auth_failed", "g2a", "G2A rejected our credentials", NOW)
    unreachable = Settings(alert_webhook_url="http://127.0.0.1:9/services/T000/B000/secret-path")
    assert alerts.dispatch_pending(unreachable, NOW) == 0
    text = logged.getvalue()
    assert "alert.send_failed" in text and "ConnectionError" in text
    assert "secret-path" not in text and "127.0.0.1:9" not in text


def test_an_alert_is_given_up_after_the_last_attempt(database, webhook, logged):
    alerts.raise_alert("auth_failed", "cws", "CWS rejected our credentials", NOW)
    db.Alert.update(attempts=alerts.MAX_ATTEMPTS - 1).execute()
    webhook.answers = [500]
    later = NOW + timedelta(days=1)
    assert alerts.dispatch_pending(settings_for(webhook), later) == 0
    assert "alert.undeliverable" in logged.getvalue()
    assert alerts.dispatch_pending(settings_for(webhook), later + timedelta(days=1)) == 0
    assert len(webhook.posts) == 1


def test_without_a_webhook_url_a_logged_alert_counts_as_delivered_and_nothing_waits(database, logged):
    alerts.raise_alert("auction_deactivated", "offer-1", "G2A deactivated offer offer-1", NOW)
    assert "alert.auction_deactivated" in logged.getvalue()
    assert alerts.dispatch_pending(Settings(), NOW) == 1
    assert db.Alert.get().sent_at == NOW and db.Alert.get().attempts == 0
    assert status.collect(Settings(), NOW)["alerts_unsent"] == 0
    assert alerts.raise_alert("auction_deactivated", "offer-1", "again", NOW + timedelta(minutes=1)) is False
