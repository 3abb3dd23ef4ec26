"""POST /reservation on the fast lane (access.py): a caller with a token this process already checked skips Bottle,
and gets exactly the answers, headers, access line and metrics the Bottle route gives; anyone else takes the route."""
import base64
import io
import json
import logging
import wsgiref.util

import pytest

from bridge import db, migrations, pause, web
from bridge.metrics import Metrics
from bridge.products import MappingWatcher
from conftest import OUR_ID, OUR_SECRET, SKYLINES, SWITCH
from test_healthcheck import bearer

BASIC = "Basic " + base64.b64encode(f"{OUR_ID}:{OUR_SECRET}".encode()).decode()  # always through Bottle


@pytest.fixture
def served(settings):
    migrations.open_database(settings.database_url)
    MappingWatcher(settings.products_file, settings.default_fixed_profit, settings.default_fee).poll()
    metrics = Metrics("web")
    yield web.AccessLog(web.create_app(settings, metrics=metrics), metrics), metrics
    db.database.close()


def post(app, body, authorization, remote="203.0.113.5", **environ_extra):
    """(status, headers, body, whether Bottle handled it) of POST /reservation through the WSGI wrapper."""
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    environ = {}
    wsgiref.util.setup_testing_defaults(environ)
    environ.update(REQUEST_METHOD="POST", PATH_INFO="/reservation", REMOTE_ADDR=remote, CONTENT_TYPE="application/json",
                   CONTENT_LENGTH=str(len(raw)), HTTP_AUTHORIZATION=authorization)
    environ["wsgi.input"] = io.BytesIO(raw)
    environ.update(environ_extra)
    seen = []
    answer = b"".join(app(environ, lambda status, headers, exc_info=None: seen.append((status, headers))))
    return seen[0][0], dict(seen[0][1]), answer, "bottle.app" in environ


def known_token(app):
    token = bearer(app)
    assert post(app, [{"product_id": SWITCH, "quantity": 1}], token)[3]  # the first call reads the token's row
    return token


def comparable(status, headers, body):
    """What must be the same on both paths: all but the new reservation's id and what it left in stock."""
    data = json.loads(body)
    if data.pop("reservation_id", None):
        data["stock"] = [{**entry, "inventory_size": "what is left"} for entry in data["stock"]]
    return status, sorted((k, v) for k, v in headers.items() if k not in ("X-Request-Id", "Content-Length")), data


BODIES = {
    "a reservation": [{"product_id": SWITCH, "quantity": 2}, {"product_id": SKYLINES, "quantity": 1}],
    "one object as one line": {"product_id": SKYLINES, "quantity": 1},
    "not JSON": b"{nope",
    "no lines": [],
    "a bad quantity": [{"product_id": SWITCH, "quantity": 0}],
    "an unknown product": [{"product_id": 10000099999999, "quantity": 1}],
    "more than there is": [{"product_id": SKYLINES, "quantity": 500}],
    "below our cost": [{"product_id": SWITCH, "quantity": 1, "additional_data": {"unit_price": "0.01"}}],
}


@pytest.mark.parametrize("case", BODIES)
def test_a_known_token_gets_the_same_answer_without_bottle(served, case):
    app, _ = served
    token = known_token(app)
    status, headers, body, through_bottle = post(app, BODIES[case], token)
    assert not through_bottle
    assert comparable(status, headers, body) == comparable(*post(app, BODIES[case], BASIC)[:3])
    assert headers["Content-Length"] == str(len(body)) and headers["X-Request-Id"]


def test_a_paused_seller_refuses_on_the_fast_lane_too(served):
    app, _ = served
    pause.set_paused(True)
    token = known_token(app)
    status, _, body, through_bottle = post(app, [{"product_id": SWITCH, "quantity": 1}], token)
    assert not through_bottle
    assert status.startswith("400") and json.loads(body)["stock"] == [{"product_id": SWITCH, "inventory_size": 0}]


def test_a_fast_reservation_is_logged_counted_and_timed_under_its_route(served, caplog):
    app, metrics = served
    token = known_token(app)
    with caplog.at_level(logging.INFO, logger="bridge"):
        post(app, [{"product_id": SWITCH, "quantity": 1}], token, HTTP_X_REQUEST_ID="g2a-call-7")
        post(app, [{"product_id": 10000099999999, "quantity": 1}], token)
    lines = [r.getMessage() + " " + str(getattr(r, "event_fields", "")) for r in caplog.records]
    assert any("reservation.created" in line for line in lines)
    access = [r.event_fields for r in caplog.records if r.name == "bridge.access"]
    assert [(a["method"], a["path"], a["status"]) for a in access] == [("POST", "/reservation", "200"),
                                                                      ("POST", "/reservation", "404")]
    samples = {(s.name, s.labels.get("route"), s.labels.get("status")): s.value
               for family in metrics.registry.collect() for s in family.samples}
    assert samples[("g2a_bridge_http_requests_total", "/reservation", "200")] == 2  # one through Bottle first
    assert samples[("g2a_bridge_http_requests_total", "/reservation", "404")] == 1
    assert samples[("g2a_bridge_http_request_duration_seconds_count", "/reservation", None)] == 3


def test_a_bug_on_the_fast_lane_is_a_logged_500_in_the_one_error_shape(served, caplog):
    app, _ = served
    token = known_token(app)
    db.database.execute_sql("DROP TABLE reservation_line")
    with caplog.at_level(logging.ERROR, logger="bridge"):
        status, headers, body, through_bottle = post(app, [{"product_id": SWITCH, "quantity": 1}], token)
    assert not through_bottle
    assert status == "500 Internal Server Error" and headers["Content-Type"] == "application/json"
    assert json.loads(body)["code"] == "ERR99"
    unhandled = [r for r in caplog.records if r.getMessage() == "web.unhandled POST /reservation"]
    assert unhandled and unhandled[0].exc_info is not None


def test_unknown_tokens_braked_callers_and_bodies_without_a_length_take_the_bottle_route(served):
    app, _ = served
    token = known_token(app)
    line = [{"product_id": SWITCH, "quantity": 1}]
    status, _, body, through_bottle = post(app, line, "Bearer not-a-token-we-issued")
    assert through_bottle and status.startswith("401") and json.loads(body)["code"] == "AUTH02"
    status, _, _, through_bottle = post(app, line, token, CONTENT_LENGTH="")
    assert through_bottle and status.startswith("400")  # no body read: Bottle's answer, as before
    status, _, _, through_bottle = post(app, line, token, HTTP_TRANSFER_ENCODING="chunked")
    assert through_bottle
    for _ in range(20):
        post(app, line, "Bearer guess", remote="198.51.100.9")
    status, _, body, through_bottle = post(app, line, token, remote="198.51.100.9")
    assert through_bottle and status.startswith("429") and json.loads(body)["code"] == "AUTH03"
