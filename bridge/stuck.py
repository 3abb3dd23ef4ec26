"""Stuck money: paid orders that stopped moving. Each kind has a deadline, the g2a-bridge command that resolves
it, an alert (raised once per order by the worker), a line in `status` and a gauge on /metrics.

Read-only, like status: the worker's `orders.stuck` job is the only writer (the alerts).
"""
from dataclasses import dataclass
from datetime import timedelta

from peewee import fn

from . import db
from .alerts import raise_alert
from .claims import resend_grace


@dataclass(frozen=True)
class Kind:
    name: str
    what: str  # "<count> <what>" reads as a sentence
    remedy: str  # {id} is the oldest such order


KINDS = (
    Kind("claim_unresolved", "purchases whose outcome CWS has not confirmed (its order history is unreadable, or "
         "the purchase keeps failing before CWS answers)",
         "look for client order id g2a-<G2A order id> in the CWS panel (g2a-bridge order {id}), then "
         "g2a-bridge retry {id}: it adopts what CWS holds and buys only when CWS has no trace of it"),
    Kind("preorder_overdue", "pre-orders CWS handed out although CWS_ALLOW_PREORDER=false, still without keys",
         "g2a-bridge retry {id} checks CWS now (the worker keeps checking every 5 min); or refund the buyer on G2A"),
    Kind("failed_holding_pooled_keys", "failed orders holding returned keys that could be sold again",
         "g2a-bridge retry {id} (it delivers them with the CWS codes)"),
    Kind("undelivered", "paid orders without keys",
         "g2a-bridge order {id} says why; fix the cause, then g2a-bridge retry {id}"),
)
KIND_NAMES = tuple(kind.name for kind in KINDS)


def deadlines(settings):
    """{kind: seconds after the order was created}: past it, the order counts as stuck."""
    return {"claim_unresolved": 2 * resend_grace(settings), "preorder_overdue": settings.cws_poll_max,
            "failed_holding_pooled_keys": 0.0, "undelivered": 2 * settings.cws_poll_max}


def find(settings, now):
    """{kind: [orders, oldest first]}; every order in at most one kind (the first that fits)."""
    older = {name: now - timedelta(seconds=seconds) for name, seconds in deadlines(settings).items()}
    order, item = db.Order, db.OrderItem
    # Correlated, so only the candidate orders' items are read (an IN list of every pooled item grew with history).
    pooled = fn.EXISTS(item.select(item.id).where((item.order == order.id) & (item.source == "pool")))
    preorder_overdue = ((order.state == db.PREORDER) & (order.created_at <= older["preorder_overdue"])
                        if not settings.cws_allow_preorder else None)
    queries = {
        "claim_unresolved": (order.state == db.CLAIMED) & (order.created_at <= older["claim_unresolved"]),
        "preorder_overdue": preorder_overdue,
        "failed_holding_pooled_keys": (order.state == db.FAILED) & pooled,
        "undelivered": ((order.state == db.FAILED) & ~pooled) | (
            (order.state == db.FULFILLING) & (order.created_at <= older["undelivered"])),
    }
    return {name: [] if where is None else list(order.select().where(where).order_by(order.created_at))
            for name, where in queries.items()}


def summary(settings, now):
    """What status, --json and /metrics show: per kind the count, the oldest order, its age and the remedy."""
    found, limits = find(settings, now), deadlines(settings)
    return {kind.name: _line(kind, found[kind.name], limits[kind.name], now) for kind in KINDS}


def _line(kind, orders, deadline, now):
    oldest = orders[0] if orders else None
    return {"count": len(orders), "deadline_seconds": deadline, "oldest_order": oldest and oldest.id,
            "oldest_age_seconds": oldest and round(max(0.0, (now - oldest.created_at).total_seconds()), 1),
            "command": kind.remedy.format(id=oldest.id if oldest else "ORDER_ID")}


def attention(stuck):
    """One `status` line per kind with stuck orders."""
    what = {kind.name: kind.what for kind in KINDS}
    return [f"{line['count']} {what[name]} (oldest {_minutes(line['oldest_age_seconds'])}): {line['command']}"
            for name, line in stuck.items() if line["count"]]


def _minutes(seconds):
    return f"{seconds / 60:.0f} min" if seconds >= 60 else f"{seconds:.0f} s"


def alert_new(settings, now):
    """Worker job: one `order_stuck` alert per order and kind, naming the command (FAILED orders already had
    their `order_failed` alert when they failed); how many were raised."""
    found = find(settings, now)
    return sum(_alert_once(kind, order, now) for kind in KINDS if kind.name != "undelivered"
               for order in found[kind.name])


def _alert_once(kind, order, now):
    subject = f"{order.id}:{kind.name}"
    if db.Alert.select().where(db.Alert.dedupe_key == f"order_stuck:{subject}").exists():
        return 0
    return int(raise_alert("order_stuck", subject, f"order {order.id} (G2A order {order.g2a_order_id}) is stuck: "
                                                   f"{kind.name}. Resolve: {kind.remedy.format(id=order.id)}", now))
