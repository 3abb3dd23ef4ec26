"""GET /healthcheck, G2A's liveness probe, on the fastest path: a token this process already checked is answered
without the database or Bottle, and counted; everything else still takes the route and its errors."""
import http.client
import json
import wsgiref.util
from datetime import datetime, timezone
from urllib.parse import urlencode

import pytest

from bridge import db, migrations, web
from bridge.auth import CONTRACT, METRICS, TOKEN_LIFETIME, TokenStore
from bridge.config import Settings
from bridge.metrics import Metrics
from conftest import OUR_ID, OUR_SECRET


@pytest.fixture
def served(settings):
    migrations.open_database(settings.database_url)
    metrics = Metrics("web")
    yield web.AccessLog(web.create_app(settings, metrics=metrics), metrics), metrics
    db.database.close()


def call(app, path, query="", authorization=None, remote="203.0.113.5"):
    environ = {}
    wsgiref.util.setup_testing_defaults(environ)
    environ.update(PATH_INFO=path, QUERY_STRING=query, REMOTE_ADDR=remote)
    if authorization:
        environ["HTTP_AUTHORIZATION"] = authorization
    seen = []
    body = b"".join(app(environ, lambda status, headers, exc_info=None: seen.append((status, dict(headers)))))
    return int(seen[0][0].split()[0]), seen[0][1], body


def bearer(app, secret=OUR_SECRET):
    status, _, body = call(app, "/oauth/token", urlencode({"client_id": OUR_ID, "client_secret": secret}))
    assert status == 200, body
    return "Bearer " + json.loads(body)["access_token"]


def count_queries():
    queries = []
    db.database.obj.query_hooks.append(queries.append)
    return queries


def healthchecks(metrics):
    """(requests counted, latencies observed) for GET /healthcheck."""
    samples = {(s.name, s.labels.get("route")): s.value for family in metrics.registry.collect() for s in family.samples}
    return (samples.get(("g2a_bridge_http_requests_total", "/healthcheck")),
            samples.get(("g2a_bridge_http_request_duration_seconds_count", "/healthcheck")))


def test_a_known_token_is_answered_without_a_database_query_or_timing_and_counted(served):
    app, metrics = served
    token = bearer(app)
    assert call(app, "/healthcheck", authorization=token)[0] == 204  # the first check reads the token's row
    queries = count_queries()
    answers = [call(app, "/healthcheck", authorization=token) for _ in range(5)]
    assert queries == []
    assert [status for status, _, _ in answers] == [204] * 5
    assert all(body == b"" and headers["X-Request-Id"] for _, headers, body in answers)
    assert healthchecks(metrics) == (6, 1)  # counted, but only the first (through the route) timed


def test_a_healthcheck_without_a_known_token_still_gets_the_routes_answers(served):
    app, _ = served
    status, headers, body = call(app, "/healthcheck", authorization="Bearer not-a-token-we-issued")
    assert status == 401 and b'"AUTH02"' in body and headers["Content-Type"] == "application/json"
    assert call(app, "/healthcheck")[0] == 401


def test_a_braked_caller_waits_even_with_a_known_token(served):
    app, _ = served
    token = bearer(app)
    assert call(app, "/healthcheck", authorization=token)[0] == 204
    for _ in range(20):
        call(app, "/oauth/token", urlencode({"client_id": OUR_ID, "client_secret": "guess"}))
    status, _, body = call(app, "/healthcheck", authorization=token)
    assert status == 429 and b'"AUTH03"' in body


def test_the_connection_stays_open_after_a_healthcheck(web):
    """Waitress closes after every 204 unless told otherwise; G2A's probe would pay a new connection each time."""
    host, port = web.base_url.split("//")[1].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    answers = []
    for _ in range(3):
        conn.request("GET", "/healthcheck", headers={"Authorization": f"Bearer {web.token()}"})
        answer = conn.getresponse()
        answer.read()
        answers.append((answer.status, answer.getheader("Connection"), conn.sock))
    assert [status for status, _, _ in answers] == [204] * 3
    assert all(connection is None for _, connection, _ in answers)
    assert len({id(sock) for _, _, sock in answers}) == 1
    conn.request("GET", "/healthcheck", headers={"Authorization": f"Bearer {web.token()}", "Connection": "close"})
    assert conn.getresponse().getheader("Connection") == "close"  # asked to close: closed


def test_only_a_contract_token_takes_the_fast_path(database):
    """A scraper's token (METRICS_CLIENTS) opens /metrics, not /healthcheck: the route answers it 403."""
    settings = Settings(our_client_id="g2a-id", our_client_secret="g2a-secret-0123456789",
                        metrics_clients=(("scraper-id", "scraper-secret-0123456789"),))
    store, now = TokenStore(settings), datetime.now(timezone.utc)
    g2a, _ = store.issue("g2a-id", "g2a-secret-0123456789", now)
    scraper, _ = store.issue("scraper-id", "scraper-secret-0123456789", now)
    assert not store.known(f"Bearer {g2a}", now.timestamp())  # not checked yet: the route reads it once
    for token in (g2a, scraper):
        store.check(f"Bearer {token}", now, (CONTRACT, METRICS))
    assert store.known(f"Bearer {g2a}", now.timestamp())
    assert not store.known(f"Bearer {scraper}", now.timestamp())
    assert not store.known(f"Bearer {g2a}", now.timestamp() + TOKEN_LIFETIME + 1)
