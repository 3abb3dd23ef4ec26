"""Alerts for the seller: always logged, queued in the database, and sent to ALERT_WEBHOOK_URL by the worker.

The same subject is alerted at most once per DEDUPE_WINDOW, so a flapping upstream can't flood a phone.
"""
import logging
from datetime import timedelta

from . import db
from .log import event

log = logging.getLogger(__name__)
DEDUPE_WINDOW = timedelta(minutes=15)


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
