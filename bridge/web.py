"""The HTTP side: G2A's merchant contract on Bottle, served by Waitress; errors mapped to JSON in one place."""
import json
import logging
import threading
import time

import bottle

from . import alerts, db, httpserver, postbacks
from .access import MAX_BODY_BYTES, AccessLog
from .auth import CONTRACT, METRICS, FailureBrake, TokenStore, delete_unconfigured_tokens
from .budget import budgets_for
from .contract import check_id, error_body, parse_json, parse_order, parse_reservation
from .crypto import open_key_box
from .cws import CwsClient
from .errors import ContractError
from .fulfillment import Fulfilment
from .log import REQUEST_ID, event
from .metrics import CONTENT_TYPE, Metrics, deep_health
from .pause import PauseSwitch
from .products import MappingWatcher
from .refresh import StockRefresher
from .reservations import Reservations

log = logging.getLogger(__name__)
MAX_NOTIFICATIONS = 100  # per request: 120,000 one-row inserts in a 256 KiB body held a web thread for minutes
TRUSTED_PROXY = "127.0.0.1"  # the local TLS proxy: the only peer whose X-Forwarded-For Waitress believes
# Route config auth=MONITORING: a contract or a METRICS_CLIENTS pair (Bearer/Basic), or a direct call from this machine.
MONITORING = "monitoring"
# Waitress reads a request whole before a thread sees it, so a client trickling its body in costs one connection,
# not a thread. Its default limit of 100 connections let 105 such clients stop every G2A call; 1000 costs about as
# many descriptors (the web unit's LimitNOFILE), past select()'s 1024, hence poll(). An idle connection goes after
# 30-35 s: longer than the proxy keeps an idle upstream connection (README: Caddy keepalive 10s), or the proxy could
# send a request into a connection we just closed (a 502 for G2A). Bodies Waitress still reads above MAX_BODY_BYTES
# get the app's JSON 413; past 1 MiB Waitress refuses.
SERVER_OPTIONS = {"connection_limit": 1000, "asyncore_use_poll": True, "channel_timeout": 30, "cleanup_interval": 5,
                  "max_request_body_size": MAX_BODY_BYTES * 4, "backlog": 1024}


def reply(status, payload=None):
    """A JSON answer (or an empty one for 204)."""
    bottle.response.status = status
    if payload is None:
        return ""
    bottle.response.content_type = "application/json"
    return json.dumps(payload)


class ErrorPlugin:
    """Every exception a route raises becomes the contract's {code, message}; only bugs become 500 ERR99."""
    name, api = "errors", 2

    def apply(self, callback, route):
        def wrapper(*args, **kwargs):
            try:
                return callback(*args, **kwargs)
            except bottle.HTTPResponse:
                raise
            except Exception as err:
                return reply(*failure(err, bottle.request.method, bottle.request.path))
        return wrapper


def failure(err, method, path):
    """(status, {code, message}) for what a route raised: a ContractError says it; anything else is a bug, logged
    with its traceback (call this in the `except` block) and answered 500 ERR99."""
    if isinstance(err, ContractError):
        return err.status, err.body()
    log.exception("web.unhandled %s %s", method, path)
    return 500, error_body("ERR99", "internal error; the seller has been notified in the logs")


class AuthPlugin:
    """Bearer (or Basic) of a contract pair on every route unless the route says auth=False, or auth=MONITORING
    (metrics pairs too, and direct calls from this machine need none); repeated failures per IP get 429."""
    name, api = "auth", 2

    def __init__(self, tokens, brake):
        self.tokens, self.brake = tokens, brake

    def apply(self, callback, route):
        mode = route.config.get("auth", True)
        if mode is False:
            return callback

        def wrapper(*args, **kwargs):
            if mode == MONITORING:
                authorize_monitoring(self.tokens, self.brake)
            else:
                authorize(self.tokens, self.brake)
            return callback(*args, **kwargs)
        return wrapper


def authorize(tokens, brake, scopes=(CONTRACT,)):
    """Raise AUTH01/AUTH02 unless the call carries valid credentials of one of `scopes`."""
    # The raw header: Bottle's get_header() raises on bytes that are not UTF-8, which is then a 500, not a 401.
    guard(brake, lambda: tokens.check(bottle.request.environ.get("HTTP_AUTHORIZATION"), db.utcnow(), scopes))


def authorize_monitoring(tokens, brake):
    """/metrics and /health?deep=1: any configured pair, or no credentials on a direct call from this machine."""
    if not direct_from_loopback(bottle.request.environ):
        authorize(tokens, brake, (CONTRACT, METRICS))


def direct_from_loopback(environ):
    """A call made on this machine, not forwarded by the TLS proxy (which sets X-Forwarded-For on every call).
    Only from TRUSTED_PROXY itself: Waitress strips X-Forwarded-For (and Forwarded) from every other peer before we
    see it, so a proxy reaching us over ::1 would look like a direct call."""
    return environ.get("REMOTE_ADDR") == TRUSTED_PROXY and not environ.get("HTTP_X_FORWARDED_FOR")


def guard(brake, check):
    """Run an authentication check, counting failures against the caller's IP."""
    # Waitress already put the real client in REMOTE_ADDR when a local reverse proxy forwarded the call.
    ip = bottle.request.environ.get("REMOTE_ADDR", "")
    brake.check(ip)
    try:
        return check()
    except ContractError as err:
        if err.status == 401:
            brake.failed(ip)
        raise


def read_body():
    return bottle.request.body.read(MAX_BODY_BYTES + 1)


def token_request_params(request):
    """client_id/client_secret/grant_type from the query, a form, a JSON body or Basic auth, in that order."""
    params = _utf8_fields(request.query)
    content_type = (request.content_type or "").lower()
    if request.method == "POST" and "json" in content_type:
        data = parse_json(read_body())
        if isinstance(data, dict):
            params.update({k: v for k, v in data.items() if isinstance(v, str)})
    elif request.method == "POST":
        params.update(_utf8_fields(request.forms))
    from_basic = request.auth
    if from_basic and not params.get("client_id"):
        params["client_id"], params["client_secret"] = from_basic
    return params


def _utf8_fields(fields):
    # Bottle's decode() raises on bytes that are not UTF-8 (`client_id=%ff`): that is the caller's mistake, not ours.
    try:
        return dict(fields.decode())
    except UnicodeDecodeError:
        raise ContractError(400, "BR01", "the request is not valid UTF-8") from None


def create_app(settings, cws=None, metrics=None):
    """The Bottle app for `settings`; the database must already be open. `metrics` (by default a fresh one)
    counts what this process does; serve() must get the same object to count requests."""
    app = bottle.Bottle()
    app.config["json.enable"] = False  # every answer is rendered by contract.py, never by Bottle
    tokens, brake = TokenStore(settings), FailureBrake()
    revoked = delete_unconfigured_tokens(settings)
    if revoked:
        event(log, "auth.tokens_revoked", count=revoked, reason="their client pair is no longer configured")
    pause = PauseSwitch(settings.service_enabled)
    metrics = metrics or Metrics("web")
    cws = cws or CwsClient(settings, budgets=budgets_for(settings, "web"), observer=metrics.upstream)
    metrics.watch_tokens(cws=cws)
    metrics.watch_budgets(cws.budgets)
    refresher = StockRefresher(cws, settings.stock_max_age)
    orders = Fulfilment(settings, cws, open_key_box(settings))
    reservations = Reservations(settings, refresher, pause, observer=metrics.reservation)
    app.install(ErrorPlugin())
    app.install(AuthPlugin(tokens, brake))
    install_error_pages(app)

    @app.route("/oauth/token", method=["GET", "POST"], auth=False)
    def oauth_token():
        params = token_request_params(bottle.request)
        if params.get("grant_type", "client_credentials") != "client_credentials":
            raise ContractError(400, "BR02", "grant_type must be client_credentials")
        token, lifetime = guard(brake, lambda: tokens.issue(
            params.get("client_id", ""), params.get("client_secret", ""), db.utcnow()))
        return reply(200, {"access_token": token, "token_type": "bearer", "expires_in": lifetime})

    @app.get("/healthcheck")
    def healthcheck():
        return reply(204)
    app.known_caller = lambda environ: known_caller(tokens, brake, environ)

    @app.get("/health", auth=False)
    def health():
        if bottle.request.query.get("deep") in ("1", "true"):
            authorize_monitoring(tokens, brake)
            return reply(*deep_health(settings, db.utcnow()))
        try:
            db.database.execute_sql("SELECT 1")
        except Exception as err:  # the database is the only thing /health vouches for
            event(log, "health.db_unreachable", level=logging.ERROR, error=str(err))
            bottle.response.status = 503
            return "DB UNREACHABLE"
        bottle.response.content_type = "text/plain"
        return "OK"

    @app.get("/metrics", auth=MONITORING)
    def prometheus_metrics():
        bottle.response.content_type = CONTENT_TYPE
        return metrics.exposition(settings, db.utcnow())

    def reservation_answer(body):
        return 200, reservations.reserve(parse_reservation(body), db.utcnow(), REQUEST_ID.get())

    @app.post("/reservation")
    def create_reservation():
        return reply(*reservation_answer(read_body()))
    app.fast_routes = {("POST", "/reservation"):
                       lambda body: answered(reservation_answer, body, "POST", "/reservation")}

    @app.put("/reservation/<reservation_id>")
    def renew_reservation(reservation_id):
        check_id(reservation_id, "reservation")
        body = read_body()
        lines = parse_reservation(body) if body.strip() else None
        return reply(200, reservations.renew(reservation_id, lines, db.utcnow()))

    @app.delete("/reservation/<reservation_id>")
    def release_reservation(reservation_id):
        reservations.release(check_id(reservation_id, "reservation"))
        return reply(204)

    @app.post("/order")
    def create_order():
        reservation_id, g2a_order_id = parse_order(read_body())
        return reply(*orders.create_order(reservation_id, g2a_order_id, db.utcnow(), REQUEST_ID.get()))

    @app.get("/order/<order_id>/inventory")
    def order_inventory(order_id):
        return reply(200, orders.inventory(check_id(order_id, "order"), db.utcnow()))

    @app.delete("/order/<order_id>/inventory")
    def return_order_items(order_id):
        orders.return_items(check_id(order_id, "order"), returned_item_ids(bottle.request.query), db.utcnow())
        return reply(204)

    @app.get("/order/<order_id>/inventory/<item_id>")
    def order_item_file(order_id, item_id):
        return reply(200, orders.item_file(check_id(order_id, "order"), check_id(item_id, "item")))

    @app.get("/order/<order_id>/inventory/<item_id>/account")
    def order_item_account(order_id, item_id):
        return reply(200, orders.item_account(check_id(order_id, "order"), check_id(item_id, "item")))

    @app.post("/notifications")
    def notifications():
        store_notifications(parse_json(read_body()), db.utcnow())
        return reply(204)

    @app.post("/cws/postback", auth=False)
    def cws_postback():
        return reply(guard(brake, lambda: postbacks.handle(settings, read_body(), db.utcnow())), {})

    return app


def known_caller(tokens, brake, environ):
    """True when the fast lane (access.py) may answer: a Bearer contract token this process already checked, from
    a caller the brake lets through; what the auth plugin would accept without the database. Anything else takes
    the Bottle route, its checks and its errors."""
    return (not brake.braked(environ.get("REMOTE_ADDR", ""))
            and tokens.known(environ.get("HTTP_AUTHORIZATION"), time.time()))


def answered(answer, body, method, path):
    """answer(body) -> (status, payload), or the failure() of what it raised: a fast route's errors are the
    ErrorPlugin's."""
    try:
        return answer(body)
    except Exception as err:
        return failure(err, method, path)


def returned_item_ids(query):
    """Item ids of DELETE /order/{id}/inventory: `id[]=A&id[]=B`, repeated `id=A`, or PHP-style `id[0]=A`.
    An id we cannot have issued (`%00`, which PostgreSQL refuses even in a lookup) is unknown: 404."""
    return [check_id(value, "item") for key, value in query.allitems()
            if key == "id" or (key.startswith("id[") and key.endswith("]"))]


def store_notifications(data, now):
    """Keep every notification whole; an offer G2A switched off is also an alert."""
    entries = data if isinstance(data, list) else [data]
    if len(entries) > MAX_NOTIFICATIONS:
        raise ContractError(400, "BR02", f"at most {MAX_NOTIFICATIONS} notifications per request")
    for entry in entries:
        entry = entry if isinstance(entry, dict) else {"value": entry}
        detail = entry.get("data") if isinstance(entry.get("data"), dict) else {}
        kind = _short_text(entry.get("notification_type") or "unknown")
        row = db.Notification.create(
            notification_type=kind, offer_id=_short_text(detail.get("offer_id")),
            auction_id=_short_text(detail.get("auction_id")), message=_short_text(detail.get("message"), 2000),
            payload=entry, received_at=now)
        event(log, "notification.received", notification=row.id, type=kind, offer=row.offer_id)
        if kind == "auction_deactivated":
            alerts.raise_alert("auction_deactivated", row.offer_id or row.auction_id or "unknown",
                               f"G2A deactivated offer {row.offer_id or row.auction_id}: {row.message}", now)


def _short_text(value, limit=64):
    # PostgreSQL text cannot hold NUL; G2A's text never has one, so it is dropped rather than refused.
    return None if value is None else str(value).replace("\x00", "")[:limit]


def install_error_pages(app):
    """Bottle's own errors (no route, wrong method...) as JSON too, never HTML."""
    pages = {400: ("BR01", "bad request"), 404: ("BR02", "no such endpoint"), 405: ("BR02", "method not allowed"),
             413: ("BR01", "request body too large"), 500: ("ERR99", "internal error")}
    for status, (code, message) in pages.items():
        app.error(status)(_error_page(code, message))


def _error_page(code, message):
    def page(error):
        bottle.response.content_type = "application/json"
        return json.dumps(error_body(code, message))
    return page


def watch_mapping(settings, stop, interval=2.0):
    """Keep products.json applied while the web process runs (the worker may be down)."""
    watcher = MappingWatcher(settings.products_file, settings.default_fixed_profit, settings.default_fee)
    watcher.poll()

    def loop():
        while not stop.wait(interval):
            try:
                watcher.poll()
            except Exception:  # a bad moment on disk or in the DB must not end the watcher
                log.exception("products.watch_failed")
    threading.Thread(target=loop, name="products-watch", daemon=True).start()


def serve(settings, app, metrics=None):
    """Run Waitress until the process is stopped; `metrics` should be the object create_app() was given."""
    event(log, "web.listening", host=settings.host, port=settings.port, threads=settings.web_threads)
    httpserver.serve(AccessLog(app, metrics), host=settings.host, port=settings.port,
                     threads=settings.web_threads, ident="g2a-bridge", trusted_proxy=TRUSTED_PROXY,
                     trusted_proxy_count=1, trusted_proxy_headers={"x-forwarded-for"},
                     clear_untrusted_proxy_headers=True, **SERVER_OPTIONS)
