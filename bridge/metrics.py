"""Observability: the Prometheus metrics behind GET /metrics and the figures of GET /health?deep=1.

Figures that live in the database are read at scrape time, so they are the same whichever process is asked and
survive restarts. Each process also keeps its own counters in a CollectorRegistry (label process="web" or
"worker"); the worker publishes its samples to the setting "metrics.worker" on each heartbeat (every 5 s) and
the web's /metrics merges them with its own. The web publishes its own to "metrics.web" as often, for `status`.
Why this shape: docs/decisions.md, "Observability".
"""
import json
import logging

from peewee import PeeweeException
from prometheus_client import CONTENT_TYPE_PLAIN_0_0_4, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.samples import Sample

from . import db, keys, report, status
from .log import event
from .reservations import ACTIVE

log = logging.getLogger(__name__)

PREFIX = "g2a_bridge_"
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4  # the text format every Prometheus version reads
WORKER_SILENT = 60.0  # seconds without a heartbeat after which the worker counts as down
METHODS = ("GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS")
KEY_STATES = (keys.PENDING, keys.DELIVERED, keys.RETURNED)
SYNC_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
HEALTH_FIELDS = ("db", "worker_heartbeat_age", "last_sync_age", "cws_token_age", "g2a_token_age", "cws_balance",
                 "paused", "status", "attention")


class Metrics:
    """One process's counters and histograms, in a registry of its own; `process` is "web" or "worker"."""

    def __init__(self, process):
        self.process = process
        self.registry = registry = CollectorRegistry()
        self.requests = Counter(PREFIX + "http_requests", "Inbound HTTP requests by route rule and status",
                                ("method", "route", "status"), registry=registry)
        self.request_seconds = Histogram(PREFIX + "http_request_duration_seconds", "Inbound HTTP request latency",
                                         ("method", "route"), registry=registry)
        self.reservations_created = Counter(PREFIX + "reservations_created", "Reservations created",
                                            registry=registry)
        self.reservations_refused = Counter(PREFIX + "reservations_refused", "Reservation requests (new or "
                                            "renewed) refused, by reason", ("reason",), registry=registry)
        self.upstream_requests = Counter(PREFIX + "upstream_requests", "Outbound HTTP attempts to CWS and G2A",
                                         ("service", "method", "endpoint", "status"), registry=registry)
        self.upstream_retries = Counter(PREFIX + "upstream_retries", "Outbound attempts after the first one "
                                        "(retries, and a re-send after a 401)", ("service", "endpoint"),
                                        registry=registry)
        self.upstream_seconds = Histogram(PREFIX + "upstream_request_duration_seconds", "Outbound attempt latency",
                                          ("service", "method", "endpoint"), registry=registry)
        self.sync_passes = Counter(PREFIX + "sync_passes", "Sync passes by kind and result", ("kind", "result"),
                                   registry=registry)
        self.sync_seconds = Histogram(PREFIX + "sync_pass_duration_seconds", "Sync pass duration", ("kind",),
                                      buckets=SYNC_BUCKETS, registry=registry)
        self.sync_writes = Counter(PREFIX + "sync_writes", "G2A offer writes sent by sync, by result",
                                   ("kind", "result"), registry=registry)
        self.sync_deferred = Counter(PREFIX + "sync_price_cuts_deferred", "Price cuts held back by the hourly "
                                     "price-change budget", ("kind",), registry=registry)
        self.sync_postponed = Counter(PREFIX + "sync_writes_postponed", "Writes left for the next pass by the "
                                      "per-pass cap", ("kind",), registry=registry)
        self._token_clients = {}
        self._budgets = None
        self._request_children = {}  # (method, route, status) -> (requests child, latency child)

    # ---- observers, called where things happen -----------------------------------------------

    def request(self, method, route, status_code, seconds):
        """One inbound request; `route` is the Bottle rule ("unmatched" when none), never the raw path."""
        key = (method if method in METHODS else "other", route, status_code)
        children = self._request_children.get(key)
        if children is None:  # labels() takes a lock and checks its arguments: once per series, not per request
            children = (self.requests.labels(*key), self.request_seconds.labels(*key[:2]))
            self._request_children[key] = children
        children[0].inc()
        children[1].observe(seconds)

    def upstream(self, service, method, endpoint, status_code, seconds, attempt):
        """The Upstream observer: every attempt of every outbound call."""
        self.upstream_requests.labels(service, method, endpoint, str(status_code)).inc()
        self.upstream_seconds.labels(service, method, endpoint).observe(seconds)
        if attempt > 1:
            self.upstream_retries.labels(service, endpoint).inc()

    def reservation(self, outcome):
        """The Reservations observer: "created", or the reason a reservation was refused."""
        if outcome == "created":
            self.reservations_created.inc()
        else:
            self.reservations_refused.labels(outcome).inc()

    def sync_pass(self, report):
        kind = report.kind
        self.sync_passes.labels(kind, "ok" if report.succeeded else "failed").inc()
        self.sync_seconds.labels(kind).observe(report.duration)
        self.sync_writes.labels(kind, "ok").inc(report.writes - report.failed)
        self.sync_writes.labels(kind, "failed").inc(report.failed)
        self.sync_deferred.labels(kind).inc(report.deferred)
        self.sync_postponed.labels(kind).inc(report.postponed)

    def watch_tokens(self, **clients):
        """Report each client's token_age (seconds since it obtained its OAuth token) at every collection."""
        self._token_clients.update(clients)

    def watch_budgets(self, budgets):
        """Report this process's request budgets (budget.py) at every collection."""
        self._budgets = budgets

    # ---- exposition --------------------------------------------------------------------------

    def families(self):
        """This process's metric families, every sample labelled process=<name>."""
        own = [*self.registry.collect(), self._token_ages(), *self._budget_families()]
        return [_labelled(family, self.process) for family in own]

    def publish(self):
        """Keep this process's samples in the database: the worker's for the web's /metrics and /health?deep=1,
        both for `g2a-bridge status`. The figures are taken before the write: a budget's lock is held across a
        shared-window write (budget.py), so waiting for it while holding the writer lock would deadlock the two."""
        snapshot = json.dumps([_dump(family) for family in self.families()])
        with db.write_transaction():
            db.put_setting(status.SNAPSHOT_PREFIX + self.process, snapshot)

    def exposition(self, settings, now):
        """The text of GET /metrics: the database figures, this process's metrics and the worker's last snapshot."""
        try:
            stored, up = database_families(settings, now) + worker_families(), 1
        except PeeweeException as err:
            event(log, "metrics.db_unreachable", level=logging.ERROR, error=str(err))
            stored, up = [], 0
        database_up = _gauge("database_up", "1 when the database answered this scrape", up)
        return generate_latest(_Families(_merged([database_up], stored, self.families())))

    def _token_ages(self):
        family = GaugeMetricFamily(PREFIX + "upstream_token_age_seconds", "Seconds since the OAuth token in use "
                                   "was obtained (absent until there is one)", labels=["service"])
        for service, client in self._token_clients.items():
            age = getattr(client, "token_age", None)
            if age is not None:
                family.add_metric([service], age)
        return family


    def _budget_families(self):
        used = GaugeMetricFamily(PREFIX + "upstream_budget_used", "Requests of this process in the current window "
                                 "of the endpoint class's limit", labels=["class"])
        limit = GaugeMetricFamily(PREFIX + "upstream_budget_limit", "This process's share of the endpoint class's "
                                  "limit per window (absent: not held back)", labels=["class"])
        pace = GaugeMetricFamily(PREFIX + "upstream_budget_pace_per_second", "Requests per second this process may "
                                 "send now (lower for a while after a 429)", labels=["class"])
        throttled = CounterMetricFamily(PREFIX + "upstream_throttled", "429 answers by endpoint class",
                                        labels=["class"])
        for name, budget in (self._budgets.items() if self._budgets is not None else ()):
            in_window, allowed = budget.window_use()
            used.add_metric([name], in_window)
            throttled.add_metric([name], budget.throttles)
            if allowed is not None:
                limit.add_metric([name], allowed)
                pace.add_metric([name], budget.per_second)
        return [used, limit, pace, throttled]


class _Families:
    """What generate_latest needs: something whose collect() yields metric families."""

    def __init__(self, families):
        self.families = families

    def collect(self):
        return iter(self.families)


# ---- figures read from the database at scrape time ------------------------------------------------

def database_families(settings, now):
    """Orders, keys, offers, reservations, balance, pause, sync, worker and alerts, from the status queries."""
    figures = status.collect(settings, now)
    sync, balance = figures["last_sync"] or {}, figures["cws_balance"] or {}
    heartbeat = _heartbeat_age(figures)
    return [
        _labelled_gauge("orders", "Orders by state", "state", figures["orders"]),
        _labelled_gauge("keys", "Order items (one key each) by state", "state",
                        status.counts(db.OrderItem.state, KEY_STATES)),
        _labelled_gauge("offers", "Mapped products by offer sync state", "sync_state", figures["offers"]),
        _gauge("reservations_active", "Reservations holding stock now", active_reservations(now)),
        _gauge("cws_balance", f"CWS balance in {settings.currency} at its last check", balance.get("amount")),
        _gauge("cws_balance_age_seconds", "Seconds since the CWS balance was read", balance.get("age_seconds")),
        _gauge("paused", "1 while selling is paused", figures["selling"] == "paused"),
        _gauge("sync_last_pass_duration_seconds", "Duration of the last full sync pass", sync.get("duration_seconds")),
        _gauge("sync_last_pass_age_seconds", "Seconds since the last full sync pass ended", sync.get("age_seconds")),
        _gauge("sync_last_success_age_seconds", "Seconds since the last full sync pass that succeeded",
               sync.get("success_age_seconds")),
        *_freshness(figures["cws_state"], figures["sweep"] or {}),
        _gauge("worker_heartbeat_age_seconds", "Seconds since the worker's last heartbeat", heartbeat),
        _gauge("worker_up", f"1 while the worker's heartbeat is at most {WORKER_SILENT:g} s old",
               _worker_alive(heartbeat)),
        _alerts(),
        _labelled_gauge("orders_stuck", "Paid orders stuck past their deadline, by kind (g2a-bridge status says "
                        "what resolves each)", "kind", {name: line["count"] for name, line in figures["stuck"].items()}),
        *money_families(settings),
    ]


def _freshness(state, sweep):
    ages = GaugeMetricFamily(PREFIX + "cws_state_age_seconds", "Age of the mapped products' last CWS state, by "
                             "quantile over the products read at least once", labels=["quantile"])
    for quantile, name in (("0.5", "p50_seconds"), ("0.95", "p95_seconds"), ("1", "oldest_seconds")):
        if state[name] is not None:
            ages.add_metric([quantile], state[name])
    return [ages,
            _gauge("cws_oldest_state_seconds", "Age of the oldest mapped product's CWS state", state["oldest_seconds"]),
            _gauge("cws_never_read_products", "Mapped products whose CWS state was never read", state["never_read"]),
            _gauge("sweep_progress_ratio", "Share of the mapped products the running sweep has read (1 when idle)",
                   sweep.get("ratio")),
            _gauge("sweep_started_age_seconds", "Seconds since the running (or last) sweep started",
                   sweep.get("started_age_seconds")),
            _gauge("sweep_duration_seconds", "Duration of the last complete sweep", sweep.get("last_duration_seconds"))]


def money_families(settings):
    """All-time sales money, as `g2a-bridge report` computes it. Gauges, not counters: a returned key lowers the
    revenue and the profit, and a counter must never go down (dashboards take delta() over them)."""
    total = report.all_time(settings)
    currency = settings.currency
    families = [_gauge(name, f"{what} in {currency} since the first order (net of returned keys)", value)
                for name, what, value in (("revenue", "Sales revenue at the sale price", total.revenue),
                                          ("g2a_fee", "G2A's fee on the revenue", total.fee),
                                          ("cws_cost", "What CWS charged for the keys bought", total.cost),
                                          ("profit", "Revenue less G2A's fee and the CWS cost", total.profit))]
    pooled = db.PooledKey.select().where(db.PooledKey.taken_by.is_null()).count()
    return families + [_gauge("pooled_keys", "Returned keys waiting in the pool for the next order", pooled)]


def active_reservations(now):
    return db.Reservation.select().where(db.Reservation.state == ACTIVE, db.Reservation.expires_at > now).count()


def _alerts():
    family = GaugeMetricFamily(PREFIX + "alerts", "Alerts by kind: queued (not sent yet) or sent",
                               labels=["kind", "state"])
    for state in ("queued", "sent"):
        for kind, count in status.counts(db.Alert.kind, None, db.Alert.sent_at.is_null(state == "queued")).items():
            family.add_metric([kind, state], count)
    return family


def _heartbeat_age(figures):
    return figures["worker"]["heartbeat_age_seconds"] if figures["worker"] else None


def _worker_alive(heartbeat_age):
    return heartbeat_age is not None and heartbeat_age <= WORKER_SILENT


def worker_families():
    """The worker's metric families as it last published them (none before its first heartbeat)."""
    return [_load(item) for item in status.snapshot("worker")]


def worker_token_ages():
    """{service: seconds} since the worker obtained its CWS and G2A tokens, as of its last heartbeat."""
    return {sample.labels["service"]: round(sample.value, 1) for family in worker_families()
            if family.name == PREFIX + "upstream_token_age_seconds" for sample in family.samples}


# ---- GET /health?deep=1 ---------------------------------------------------------------------------

def deep_health(settings, now):
    """(HTTP status, body): 503 when the database is unreachable or the worker silent for over 60 s;
    "degraded" also when `g2a-bridge status` lists something that needs the operator."""
    try:
        figures, tokens = status.collect(settings, now), worker_token_ages()
    except PeeweeException as err:
        event(log, "health.db_unreachable", level=logging.ERROR, error=str(err))
        return 503, dict.fromkeys(HEALTH_FIELDS) | {"db": f"error: {err}", "status": "degraded", "attention": [
            "the database is unreachable: check DATABASE_URL, then g2a-bridge doctor"]}
    heartbeat, sync, balance = _heartbeat_age(figures), figures["last_sync"], figures["cws_balance"]
    alive = _worker_alive(heartbeat)
    body = {"db": "ok", "worker_heartbeat_age": heartbeat, "last_sync_age": sync and sync["age_seconds"],
            "cws_token_age": tokens.get("cws"), "g2a_token_age": tokens.get("g2a"),
            "cws_balance": balance and balance["amount"], "paused": figures["selling"] == "paused",
            "status": "ok" if alive and not figures["attention"] else "degraded", "attention": figures["attention"]}
    return (200 if alive else 503), body


# ---- metric families: building, labelling, merging, storing ---------------------------------------

def _gauge(name, documentation, value):
    """A gauge with one sample, or none when the value is unknown (None)."""
    family = GaugeMetricFamily(PREFIX + name, documentation)
    if value is not None:
        family.add_metric([], float(value))
    return family


def _labelled_gauge(name, documentation, label, values):
    family = GaugeMetricFamily(PREFIX + name, documentation, labels=[label])
    for key, value in values.items():
        family.add_metric([key], value)
    return family


def _labelled(family, process):
    """A copy with process=<name> on every sample, without the `_created` series (start times, noise here)."""
    copy = Metric(family.name, family.documentation, family.type, family.unit)
    copy.samples = [Sample(sample.name, {**sample.labels, "process": process}, sample.value)
                    for sample in family.samples if sample.name != family.name + "_created"]
    return copy


def _merged(*groups):
    """One family per name (the text format allows no repeats), the samples of every group in order."""
    merged = {}
    for family in (family for group in groups for family in group):
        target = merged.setdefault(family.name, Metric(family.name, family.documentation, family.type, family.unit))
        target.samples.extend(family.samples)
    return list(merged.values())


def _dump(family):
    return {"name": family.name, "help": family.documentation, "type": family.type, "unit": family.unit,
            "samples": [[sample.name, sample.labels, sample.value] for sample in family.samples]}


def _load(item):
    family = Metric(item["name"], item["help"], item["type"], item["unit"])
    family.samples = [Sample(name, labels, value) for name, labels, value in item["samples"]]
    return family
