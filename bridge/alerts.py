"""Alerts for the seller: always logged, queued in the database, and sent to ALERT_WEBHOOK_URL by the worker
(without a webhook the log line is the delivery).

The same subject is alerted at most once per DEDUPE_WINDOW, so a flapping upstream can't flood a phone.
Delivery retries with exponential backoff; the webhook URL is a secret and never appears in a log line.
"""
import logging
import socket
from datetime import timedelta

import requests

from . import db
from .log import event

log = logging.getLogger(__name__)
DEDUPE_WINDOW = timedelta(minutes=15)
POST_TIMEOUT = 5.0
BACKOFF_BASE = 5.0  # seconds; attempt n is due BACKOFF_BASE * (2**n - 1) after the alert was raised
MAX_ATTEMPTS = 12  # the last try comes about 2.8 hours after the alert
BATCH = 20


def raise_alert(kind, subject, text, now, level=logging.ERROR):
    """Log the alert and queue it unless the same kind+subject was queued within the window; True if queued."""
    event(log, f"alert.{kind}", level=level, subject=subject, text=text)
    dedupe_key = f"{kind}:{subject}"
    with db.write_transaction():
        recent = db.Alert.select().where(db.Alert.dedupe_key == dedupe_key,
                                         db.Alert.created_at > now - DEDUPE_WINDOW).exists()
        if recent:
            return False
        db.Alert.create(kind=kind, dedupe_key=dedupe_key, text=text, created_at=now)
    return True


def dispatch_pending(settings, now, session=None):
    """POST due, unsent alerts to ALERT_WEBHOOK_URL as Slack-compatible {"text": …}; returns how many were sent.

    Stops at the first failure: the endpoint is down, and the rest wait for their own backoff.
    """
    if not settings.alert_webhook_url:
        return _delivered_by_log(now)
    session = session or requests
    sent = 0
    for alert in due_alerts(now):
        if not _post(session, settings.alert_webhook_url, alert):
            _record_attempt(alert, None)
            break
        _record_attempt(alert, now)
        sent += 1
    return sent


def _delivered_by_log(now):
    """Without a webhook the log line raise_alert wrote is the delivery: nothing is left waiting to be sent."""
    return db.Alert.update(sent_at=now).where(db.Alert.sent_at.is_null()).execute()


def due_alerts(now):
    """Unsent alerts whose next attempt is due, oldest first."""
    pending = (db.Alert.select().where(db.Alert.sent_at.is_null(), db.Alert.attempts < MAX_ATTEMPTS)
               .order_by(db.Alert.created_at).limit(BATCH))
    return [alert for alert in pending if now >= next_attempt_at(alert)]


def next_attempt_at(alert):
    return alert.created_at + timedelta(seconds=BACKOFF_BASE * (2 ** alert.attempts - 1))


def message(alert):
    return f"g2a-bridge on {socket.gethostname()}: {alert.kind}: {alert.text}"


def _post(session, url, alert):
    """True when the webhook accepted the alert; a failure is logged by type or status only (the URL is secret)."""
    try:
        # Not redirected: the alert text would follow a Location anywhere, plain http included.
        response = session.post(url, json={"text": message(alert)}, timeout=POST_TIMEOUT, allow_redirects=False)
    except requests.RequestException as exc:
        return _failed(alert, type(exc).__name__)
    if not 200 <= response.status_code < 300:
        return _failed(alert, f"HTTP {response.status_code}")
    event(log, "alert.sent", alert=alert.id, kind=alert.kind)
    return True


def _failed(alert, why):
    last = alert.attempts + 1 >= MAX_ATTEMPTS
    event(log, "alert.undeliverable" if last else "alert.send_failed", level=logging.WARNING, alert=alert.id,
          kind=alert.kind, attempt=alert.attempts + 1, error=why)
    return False


def _record_attempt(alert, sent_at):
    db.Alert.update(attempts=db.Alert.attempts + 1, sent_at=sent_at).where(db.Alert.id == alert.id).execute()
