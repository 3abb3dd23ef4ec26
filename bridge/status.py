"""Status figures for `g2a-bridge status` (and a deep health check): read-only queries, one screen of text.

`attention` lists what an operator should act on; the CLI exits 1 when it is not empty.
"""
import json
from datetime import timedelta
from decimal import Decimal, InvalidOperation

from peewee import fn

from . import db, freshness, lease, pause, stuck
from .products import REFUSED_KEY
from .stock import BALANCE_KEY

SNAPSHOT_PREFIX = "metrics."  # + "worker" / "web": that process's metric samples, published every 5 s (metrics.py)
BUDGET_PROCESSES = ("worker", "web")
BUDGET_SERIES = {"g2a_bridge_upstream_budget_used": "used", "g2a_bridge_upstream_budget_limit": "limit",
                 "g2a_bridge_upstream_throttled_total": "throttled"}
SYNC_KEY = "sync.last_pass"
SYNC_SUCCESS_KEY = "sync.last_success"
SYNC_STATES = ("in_sync", "pending", "failed")
NOTIFICATION_WINDOW = timedelta(hours=24)


def collect(settings, now):
    """Every figure as plain JSON-able values."""
    figures = {
        "selling": "paused" if pause.read_paused(not settings.service_enabled) else "running",
        "products": _products(),
        "products_refused": _refused(),
        "offers": counts(db.Product.sync_state, SYNC_STATES, db.Product.mapped == True),  # noqa: E712
        "orders": counts(db.Order.state, db.ORDER_STATES),
        "last_sync": _last_sync(now),
        "cws_state": freshness.staleness(now),
        "sweep": freshness.sweep_progress(now),
        "cws_balance": _balance(settings, now),
        "notifications_24h": db.Notification.select().where(
            db.Notification.received_at > now - NOTIFICATION_WINDOW).count(),
        "alerts_unsent": db.Alert.select().where(db.Alert.sent_at.is_null()).count(),
        "worker": _worker(now),
        "stuck": stuck.summary(settings, now),
        "upstream_budgets": {process: published_budgets(process) for process in BUDGET_PROCESSES},
    }
    figures["attention"] = attention(figures, settings)
    return figures


def _products():
    mapped = db.Product.select().where(db.Product.mapped == True)  # noqa: E712
    return {"mapped": mapped.count(), "enabled": mapped.where(db.Product.enabled == True).count()}  # noqa: E712


def _refused():
    """What the web or worker last found wrong with products.json (None when they accepted it)."""
    data = _json(db.get_setting(REFUSED_KEY, ""))
    return {"file": str(data.get("file")), "problems": list(data.get("problems") or [])} if data else None


def counts(column, names, *where):
    """{name: rows with column == name} for every name, zeros included (names None: only the names found)."""
    query = column.model.select(column, fn.COUNT(1)).group_by(column)
    found = dict((query.where(*where) if where else query).tuples())
    return found if names is None else {name: found.get(name, 0) for name in names}


def _age(row, now):
    return round((now - row.updated_at).total_seconds(), 1)


def _last_sync(now):
    row = db.Setting.get_or_none(db.Setting.key == SYNC_KEY)
    if row is None:
        return None
    report = _json(row.value)
    success = db.Setting.get_or_none(db.Setting.key == SYNC_SUCCESS_KEY)
    return {"age_seconds": _age(row, now), "writes": report.get("writes"), "failed": report.get("failed"),
            "errors": report.get("errors") or [], "duration_seconds": report.get("duration"),
            "success_age_seconds": None if success is None else _age(success, now)}


def _balance(settings, now):
    row = db.Setting.get_or_none(db.Setting.key == BALANCE_KEY)
    amount = None if row is None else _amount(row.value)
    if amount is None:
        return None
    return {"amount": str(amount), "currency": settings.currency, "age_seconds": _age(row, now),
            "low": amount < settings.cws_low_balance}


def _amount(value):
    """The balance from a stored "123.45" or {"balance": "123.45", ...}."""
    data = _json(value)
    try:
        return Decimal(str(data.get("balance", data.get("amount")) if data else value))
    except InvalidOperation:
        return None


def _json(value):
    try:
        data = json.loads(value)
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def _worker(now):
    row = db.Lease.get_or_none(db.Lease.name == lease.WORKER)
    if row is None:
        return None
    return {"holder": row.holder, "heartbeat_age_seconds": round((now - row.heartbeat_at).total_seconds(), 1)}


def snapshot(process):
    """The metric families `process` ("worker" or "web") last published, as stored (JSON-able dicts)."""
    stored = db.get_setting(SNAPSHOT_PREFIX + process)
    return [] if stored is None else json.loads(stored)


def published_budgets(process):
    """{class: {"used", "limit", "throttled"}} of the request budgets `process` ("worker" or "web") last published
    (429s counted since it started); {} before it first did."""
    budgets = {}
    for family in snapshot(process):
        for name, labels, value in family["samples"]:
            if name in BUDGET_SERIES:
                budgets.setdefault(labels["class"], {"used": 0, "limit": None, "throttled": 0})[
                    BUDGET_SERIES[name]] = int(value)
    return budgets


def attention(figures, settings):
    """One line per thing that needs the operator, with what to do about it."""
    lines = []
    refused = figures["products_refused"]
    if refused is not None:
        more = f" (and {len(refused['problems']) - 1} more)" if len(refused["problems"]) > 1 else ""
        lines.append(f"{refused['file']} is refused, the previous mapping stays in force: "
                     f"{(refused['problems'] or ['unreadable'])[0]}{more}; fix it (g2a-bridge doctor lists every problem)")
    worker = figures["worker"]
    if worker is None or worker["heartbeat_age_seconds"] > lease.TTL.total_seconds():
        lines.append("worker is not running: systemctl start g2a-bridge-worker (or g2a-bridge worker)")
    lines += stuck.attention(figures["stuck"])
    if figures["offers"]["failed"]:
        lines.append(f"{figures['offers']['failed']} offers failed to sync: g2a-bridge sync --dry-run, "
                     "and journalctl -u g2a-bridge-worker")
    sync = figures["last_sync"]
    if sync is not None and sync["age_seconds"] > max(3 * settings.sync_interval, 60):
        lines.append(f"last sync pass was {age_text(sync['age_seconds'])} ago: is the worker stuck?")
    balance = figures["cws_balance"]
    if balance is not None and balance["low"]:
        lines.append(f"CWS balance {balance['amount']} {balance['currency']} is below CWS_LOW_BALANCE "
                     f"{settings.cws_low_balance}: top up your CodesWholesale account")
    return lines


def age_text(seconds):
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{int(seconds // size)} {unit}"
    return f"{int(seconds)} s"


def render(figures):
    """The human screen: one fact per line, then what needs attention."""
    offers, orders = figures["offers"], figures["orders"]
    rows = [
        ("selling", figures["selling"]),
        ("products", _products_text(figures["products"], figures["products_refused"])),
        ("offers", f"{offers['in_sync']} in sync, {offers['pending']} pending, {offers['failed']} failed"),
        ("orders", ", ".join(f"{state} {count}" for state, count in orders.items())),
        ("last sync", _sync_text(figures["last_sync"])),
        ("CWS state", _state_text(figures["cws_state"])),
        ("sweep", _sweep_text(figures["sweep"])),
        ("CWS balance", _balance_text(figures["cws_balance"])),
        ("notifications", f"{figures['notifications_24h']} in the last 24 h"),
        ("alerts", f"{figures['alerts_unsent']} waiting to be sent"),
        ("worker", _worker_text(figures["worker"])),
        ("stuck", _stuck_text(figures["stuck"])),
        *((f"{process} budget", budgets_text(figures["upstream_budgets"][process], process))
          for process in BUDGET_PROCESSES),
    ]
    lines = [f"{label:<14} {value}" for label, value in rows]
    lines += [f"! {line}" for line in figures["attention"]] or ["all good"]
    return "\n".join(lines)


def _products_text(products, refused):
    text = f"{products['mapped']} mapped ({products['enabled']} enabled)"
    return text + ("; products.json refused, see below" if refused is not None else "")


def budgets_text(budgets, process="worker"):
    """One line: each class's requests in its window / the process's limit, and its 429s."""
    if not budgets:
        return f"unknown (the {process} publishes it every 5 s)"
    return ", ".join(f"{name} {row['used']}/{'-' if row['limit'] is None else row['limit']}"
                     + (f" ({row['throttled']}x429)" if row["throttled"] else "") for name, row in budgets.items())


def _sync_text(sync):
    if sync is None:
        return "never"
    return f"{age_text(sync['age_seconds'])} ago ({sync['writes']} writes, {sync['failed']} failed)"


def _state_text(state):
    if state["oldest_seconds"] is None:
        return f"never read ({state['never_read']} mapped products)"
    never = f", {state['never_read']} never read" if state["never_read"] else ""
    return (f"oldest {age_text(state['oldest_seconds'])}, p95 {age_text(state['p95_seconds'])}, "
            f"median {age_text(state['p50_seconds'])}{never}")


def _sweep_text(sweep):
    if sweep is None:
        return "none yet"
    last = "" if sweep["last_duration_seconds"] is None else f", last took {age_text(sweep['last_duration_seconds'])}"
    if not sweep["running"]:
        return f"idle: {sweep['mapped']} read by {sweep['mode']}, started {age_text(sweep['started_age_seconds'])} ago{last}"
    return (f"{sweep['read']}/{sweep['mapped']} read by {sweep['mode']} ({sweep['ratio']:.0%}), "
            f"started {age_text(sweep['started_age_seconds'])} ago{last}")


def _balance_text(balance):
    if balance is None:
        return "unknown (the worker checks it every 5 min)"
    return f"{balance['amount']} {balance['currency']} (checked {age_text(balance['age_seconds'])} ago)"


def _stuck_text(found):
    """Stuck orders by kind ("none" when nothing is): the `!` lines below say what to do."""
    parts = [f"{line['count']} {name}" for name, line in found.items() if line["count"]]
    return ", ".join(parts) or "none"


def _worker_text(worker):
    if worker is None:
        return "never seen"
    return f"heartbeat {age_text(worker['heartbeat_age_seconds'])} ago ({worker['holder']})"
