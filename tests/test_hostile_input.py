"""Hostile input against one real web process, property-based: whatever reaches any endpoint, the answer is
never a 5xx, an error is always the JSON {code, message} shape (plus `stock` on a short reservation), and the
process is alive and healthy at the end. The statuses seen are printed when the module ends.

One web process per database backend serves the whole module (starting one per example would be too slow).
Requests go out through http.client, so paths, methods and repeated headers reach the server exactly as
written (requests/urllib3 would normalise `..` segments). Every request carries a fresh X-Forwarded-For
address, which the server trusts from 127.0.0.1 (the local TLS proxy), so the brake on failed
authentication (20 per address per minute) never turns the rest of the run into 429s.
"""
import base64
import http.client
import itertools
import json
import socket
import urllib.parse
from collections import Counter, defaultdict

import pytest
import requests
from conftest import DEMO, OUR_ID, OUR_SECRET, SECRET_KEY, SKYLINES, SWITCH, BridgeProcess, free_port, write_products
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

from bridge.postbacks import expected_hash
from bridge.sim import (CWS_CLIENT_ID, CWS_CLIENT_SECRET, CWS_CLIENT_SIGNATURE, G2A_API_KEY, G2A_API_SECRET,
                              Simulator)

CODES = {"AUTH01", "AUTH02", "AUTH03", "BR01", "BR02", "ERR99"}
BODY_LIMIT = 256 * 1024  # web.MAX_BODY_BYTES: above it the app answers 413 itself
# No shrinking: against a live server it can take minutes; a failure is reported as found (the server log names
# the exception). derandomize keeps CI runs identical.
HOSTILE = settings(max_examples=150, deadline=None, derandomize=True, database=None, report_multiple_bugs=False,
                   phases=[Phase.explicit, Phase.generate],
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                          HealthCheck.large_base_example])
STATUSES = defaultdict(Counter)  # endpoint group -> status -> count, printed at the end of the module
_addresses = itertools.count(1)


# ---- one real web process for the module -----------------------------------------------------------------------

class Server:
    def __init__(self, process, port, backend):
        self.process, self.port, self.backend = process, port, backend
        self.base = f"http://127.0.0.1:{port}"
        self.token = self.order = None

    def send(self, method, path, body=b"", headers=(), auth=True):
        """(status, content type, body) of one request sent as written; each carries a new forwarded address."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            conn.putrequest(method, path, skip_accept_encoding=True)
            sent = [name.lower() for name, _ in headers]
            if auth and "authorization" not in sent:
                conn.putheader("Authorization", f"Bearer {self.token}")
            if "x-forwarded-for" not in sent:
                conn.putheader("X-Forwarded-For", next_address())
            for name, value in headers:
                conn.putheader(name, value)
            if body or method in ("POST", "PUT", "PATCH"):
                conn.putheader("Content-Length", str(len(body)))
            conn.endheaders(body or None)
            answer = conn.getresponse()
            return answer.status, answer.getheader("Content-Type") or "", answer.read()
        finally:
            conn.close()


def next_address():
    n = next(_addresses)
    return f"10.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}"


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def server(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"hostile-{request.param}")
    database_url = f"sqlite:///{folder}/bridge.db"
    if request.param == "postgresql":
        postgres = request.getfixturevalue("postgres")
        database_url = postgres.create_database()
    with Simulator() as sim:
        sim.seed_demo()
        port = free_port()
        process = BridgeProcess(["web"], environment(folder, sim, database_url, port), folder / "web.log").start()
        try:
            process.wait_http(f"http://127.0.0.1:{port}/health")
            server = Server(process, port, request.param)
            server.token = token(server)
            server.order = an_order(server)
            yield server
            assert process.proc.poll() is None, f"the web process died:\n{process.logs()[-3000:]}"
        finally:
            process.stop()
            if request.param == "postgresql":
                postgres.drop_database(database_url)
    print_statuses(request, request.param)


def environment(folder, sim, database_url, port):
    (folder / "empty.env").write_text("")
    write_products(folder / "products.json", DEMO)
    return {"ENV_FILE": str(folder / "empty.env"), "OUR_API_CLIENT_ID": OUR_ID, "OUR_API_CLIENT_SECRET": OUR_SECRET,
            "CWS_CLIENT_ID": CWS_CLIENT_ID, "CWS_CLIENT_SECRET": CWS_CLIENT_SECRET,
            "CWS_CLIENT_SIGNATURE": CWS_CLIENT_SIGNATURE, "CWS_API_BASE_URL": sim.cws_url,
            "G2A_API_KEY": G2A_API_KEY, "G2A_API_SECRET": G2A_API_SECRET, "G2A_API_BASE_URL": sim.g2a_url,
            "DATABASE_URL": database_url, "PRODUCTS_FILE": str(folder / "products.json"),
            "BRIDGE_SECRET_KEY": SECRET_KEY, "PORT": str(port), "HOST": "127.0.0.1", "LOG_LEVEL": "WARNING",
            "CWS_TIMEOUT_MS": "2000", "G2A_TIMEOUT_MS": "2000"}


def token(server):
    answer = requests.get(f"{server.base}/oauth/token", params={
        "grant_type": "client_credentials", "client_id": OUR_ID, "client_secret": OUR_SECRET}, timeout=10)
    assert answer.status_code == 200, answer.text
    return answer.json()["access_token"]


def an_order(server):
    """A real order with one delivered key, so the order routes also meet ids that exist."""
    http = requests.Session()
    http.headers["Authorization"] = f"Bearer {server.token}"
    reservation = http.post(f"{server.base}/reservation", json=[{"product_id": SWITCH, "quantity": 1}], timeout=10)
    order = http.post(f"{server.base}/order", json={"reservation_id": reservation.json()["reservation_id"],
                                                    "g2a_order_id": 80201000000555}, timeout=20)
    assert order.status_code == 200, order.text
    body = order.json()
    return {"order_id": body["order_id"], "item_id": body["stock"][0]["inventory"][0]["id"],
            "reservation_id": reservation.json()["reservation_id"], "g2a_order_id": "80201000000555"}


def print_statuses(request, backend):
    lines = [f"hostile input ({backend}): statuses per endpoint group"]
    for group, seen in sorted(STATUSES.items()):
        lines.append(f"  {group:<24} {sum(seen.values()):>5} requests  " +
                     "  ".join(f"{status}x{count}" for status, count in sorted(seen.items(), key=str)))
    total = sum((seen for seen in STATUSES.values()), Counter())
    lines.append(f"  {'all':<24} {sum(total.values()):>5} requests  " +
                 "  ".join(f"{status}x{count}" for status, count in sorted(total.items(), key=str)))
    STATUSES.clear()
    capture = request.config.pluginmanager.getplugin("capturemanager")
    if capture is None:
        print("\n" + "\n".join(lines))
        return
    with capture.global_and_fixture_disabled():
        print("\n" + "\n".join(lines))


# ---- what every answer must look like ---------------------------------------------------------------------------

def check(group, method, answer, stock_allowed=False):
    """Never a 5xx; a 204 is empty; an error is exactly {code, message} (plus stock on a short reservation)."""
    status, content_type, body = answer
    STATUSES[group][status] += 1
    assert status < 500, (status, body[:300])
    if method == "HEAD":
        return None
    if status == 204:
        assert body == b""
        return None
    if status < 400:
        return body
    assert content_type.startswith("application/json"), (status, content_type, body[:300])
    error = json.loads(body)
    allowed = [{"code", "message"}] + ([{"code", "message", "stock"}] if stock_allowed and status == 400 else [])
    assert set(error) in allowed, error
    assert error["code"] in CODES and isinstance(error["message"], str) and error["message"], error
    return None


# ---- strategies --------------------------------------------------------------------------------------------------

ODD_TEXT = ["", " ", "\x00", "a\x00b", "\u202e\u0645\u0631\u062d\u0628\u0627", "\u200f\u05e9\u05dc\u05d5\u05dd",
            "\ufeff", "\ud800", "\udfff", "\U0001f600", "\u0661\u0662", "\uff11\uff12", "null", "1e999", "-0",
            "0x10", "../../etc/passwd", "%00", "%2F", "' OR 1=1 --", "<script>", "A" * 5000]
odd_text = st.one_of(st.text(max_size=30), st.sampled_from(ODD_TEXT),
                     st.text(st.characters(categories=["Cs", "Cc", "Cf", "Mn", "Nd", "Lo", "Zs"]), max_size=12))
odd_numbers = st.one_of(st.integers(min_value=-2**70, max_value=2**70), st.floats(),
                        st.sampled_from([0, -1, 1, 2**63 - 1, 2**63, 2**64, -2**63, 10**19, 10**300, 1.5, -0.0,
                                         1e308, True, False]))
scalars = st.one_of(st.none(), st.booleans(), odd_numbers, odd_text)
json_values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(odd_text, inner, max_size=4)), max_leaves=12)
product_ids = st.one_of(st.sampled_from([SWITCH, SKYLINES, str(SWITCH), f" {SKYLINES} ", 10000099999999]),
                        odd_numbers, odd_text)
quantities = st.one_of(st.integers(min_value=1, max_value=3), st.integers(min_value=-3, max_value=1002), odd_numbers,
                       odd_text, st.none())
prices = st.one_of(st.sampled_from(["5.98", "9.99", "6.24", "NaN", "-1", "1e999999", "Infinity", "1,5", " 7 "]),
                   odd_numbers, odd_text, json_values)
reservation_lines = st.fixed_dictionaries({}, optional={
    "product_id": product_ids, "quantity": quantities,
    "additional_data": st.one_of(st.fixed_dictionaries({}, optional={"unit_price": prices,
                                                                     "auction_base_price": prices}), json_values)})
reservation_values = st.one_of(st.lists(reservation_lines, max_size=4), reservation_lines, json_values)

# Bodies that no JSON encoder would write: broken bytes, deep nesting, numbers past every limit, big sizes.
RAW_BODIES = [b"", b"\x00", b"\xff\xfe\xfd", b"{", b"[1,", b'{"a":', b"\xef\xbb\xbf[]", b'"\xed\xa0\x80"',
              b"[" * 100_000 + b"]" * 100_000, b'{"a":' * 50_000 + b"1" + b"}" * 50_000,
              b"[" * 990 + b"]" * 990, b'[{"product_id": ' + b"9" * 5000 + b', "quantity": 1}]',
              b'[{"product_id": 1' + b"0" * 400 + b', "quantity": 1e400}]', b"NaN", b"-Infinity",
              b'{"reservation_id": "x", "g2a_order_id": 1, "reservation_id": "y"}',
              b"[" + b"1," * 120_000 + b"1]", b"[" + b" " * (BODY_LIMIT - 1) + b"]",
              b"x" * (BODY_LIMIT + 1), b"x" * (3 * BODY_LIMIT)]


class Body(bytes):
    """Request bytes with a short repr, so a failing example stays readable."""

    def __repr__(self):
        text = bytes.__repr__(bytes(self[:120]))
        return text if len(self) <= 120 else f"Body({text} + {len(self) - 120} more bytes)"


def encodings(values):
    """JSON text of `values`, written in a few ways a careless or hostile client might write it."""
    def encode(pair):
        value, how = pair
        text = json.dumps(value, ensure_ascii=(how == "ascii"), allow_nan=True)
        if how == "utf-16":
            return text.encode("utf-16", "surrogatepass")
        return text.encode("utf-8", "surrogatepass")  # a lone surrogate becomes bytes that are not UTF-8
    return st.tuples(values, st.sampled_from(["ascii", "utf-8", "utf-8", "utf-16"])).map(encode).map(Body)


def bodies(values):
    return st.one_of(encodings(values), st.sampled_from(RAW_BODIES).map(Body), st.binary(max_size=300).map(Body))


content_types = st.sampled_from(["application/json", "application/json; charset=utf-16", "text/plain", "",
                                 "application/x-www-form-urlencoded", "multipart/form-data",
                                 "multipart/form-data; boundary=zzz", "application/xml", "*/*", "application/json\x80",
                                 "application/json; charset=\xe9"])
# What Waitress lets through to the app: visible ASCII, space, tab and bytes 0x80-0xFF (control bytes it refuses
# itself, see the protocol tricks).
header_text = st.text(st.one_of(st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"),
                                st.just("\t")), max_size=60)


def quoted(text):
    return urllib.parse.quote(text, safe="", errors="surrogatepass")


PATH_IDS = ["..", ".", "../..", "..%2F..%2Fetc%2Fpasswd", "%2e%2e", "%00", "a%00b", "%2F", "%ff", "%", "%zz",
            "x" * 5000, "%E2%80%AE", "%F0%9F%98%80", "%ED%A0%80", "~", "-1", "0", "9" * 40, "80201000000555", "+",
            "%20", "id;jsessionid=1", "?", "#"]
path_ids = st.one_of(st.sampled_from(PATH_IDS), odd_text.map(quoted),
                     st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7e), min_size=1, max_size=70))


def with_json(values, content=content_types):
    """(body bytes, headers) with a content type that is usually, not always, JSON."""
    return st.tuples(bodies(values), st.one_of(st.just("application/json"), content)).map(
        lambda pair: (pair[0], [("Content-Type", pair[1])] if pair[1] else []))


# ---- POST/GET /oauth/token -------------------------------------------------------------------------------------

token_fields = st.dictionaries(
    st.one_of(st.sampled_from(["grant_type", "client_id", "client_secret"]), odd_text),
    st.one_of(st.sampled_from(["client_credentials", "password", OUR_ID, OUR_SECRET, ""]), odd_text), max_size=4)


def basic(user, password):
    raw = f"{user}:{password}".encode("utf-8", "surrogatepass")
    return "Basic " + base64.b64encode(raw).decode()


basic_headers = st.one_of(
    st.tuples(st.one_of(st.just(OUR_ID), odd_text), st.one_of(st.just(OUR_SECRET), odd_text)).map(
        lambda pair: basic(*pair)),
    st.binary(max_size=40).map(lambda raw: "Basic " + base64.b64encode(raw).decode()),
    st.sampled_from(["Basic", "Basic ", "Basic !!!", "Basic ====", "Basic Zm9v", "basic Zm9vOmJhcg==",
                     "Basic " + "A" * 50_000]))


@HOSTILE
@given(method=st.sampled_from(["GET", "POST", "POST", "HEAD", "PUT"]), query=token_fields,
       raw_query=st.sampled_from(["", "client_id=%ff%fe&client_secret=x", "client_id=%zz", "grant_type",
                                  "&&&==&", "client_id=" + "a" * 8000]),
       form=st.one_of(token_fields.map(lambda f: urllib.parse.urlencode(f, errors="surrogatepass").encode()),
                      encodings(st.one_of(token_fields, json_values)), st.sampled_from(RAW_BODIES[:9])),
       content_type=content_types, authorization=st.one_of(st.none(), basic_headers))
def test_token_requests_never_fail_the_server(server, method, query, raw_query, form, content_type, authorization):
    query_string = "&".join(filter(None, [urllib.parse.urlencode(query, errors="surrogatepass"), raw_query]))
    headers = [("Content-Type", content_type)] if content_type else []
    headers += [("Authorization", authorization)] if authorization else []
    answer = server.send(method, "/oauth/token?" + query_string, form if method != "GET" else b"", headers, auth=False)
    body = check("oauth/token", method, answer)
    if body is not None:
        assert json.loads(body)["token_type"] == "bearer"


# ---- /healthcheck, /health and header tricks --------------------------------------------------------------------

authorizations = st.one_of(
    st.sampled_from(["", "Bearer", "Bearer ", "bearer", "Bearer  ", "Token abc", "Bearer \x80\xff", "Bearer a b c",
                     "Bearer " + "x" * 100_000, "B" * 60_000, "Digest username=x", "Bearer Bearer"]),
    basic_headers, header_text, header_text.map(lambda t: "Bearer " + t))
# Not "Expect: 100-continue": on a request without a body Waitress 3.0.2 then waits for a body that never comes
# (until channel_timeout, 30 s). Harmless for the server, fatal for a test run.
header_values = st.one_of(header_text.filter(lambda text: text.strip().lower() != "100-continue"),
                          st.sampled_from(["", "a" * 20_000, "../../", "\xff\xfe"]))
# Only the local proxy's X-Forwarded-For is read, and it writes well-formed ones (a malformed one is refused by
# Waitress below the app: see the protocol tricks); from anyone else the header is dropped.
forwarded_for = st.one_of(st.sampled_from(["", "1.2.3.4", "::1", "[::1]:80", "unknown", "1.1.1.1, 2.2.2.2", "x" * 500]),
                          header_text.filter(lambda text: '"' not in text))
other_headers = st.lists(st.one_of(
    st.tuples(st.sampled_from(["X-Request-Id", "Content-Type", "Accept", "Host", "Cookie", "X-Custom",
                               "Authorization", "Expect", "Connection", "Accept-Charset"]), header_values),
    st.tuples(st.just("X-Forwarded-For"), forwarded_for)), max_size=4)


@HOSTILE
@given(path=st.sampled_from(["/healthcheck", "/health", "/health?x=%ff", "/healthcheck/", "//healthcheck",
                             "/HEALTHCHECK", "/healthcheck?" + "a=1&" * 500]),
       method=st.sampled_from(["GET", "GET", "HEAD", "POST", "OPTIONS", "DELETE"]),
       authorization=st.one_of(st.none(), authorizations), repeated=st.booleans(), headers=other_headers)
def test_health_routes_and_header_tricks_never_fail_the_server(server, path, method, authorization, repeated,
                                                               headers):
    sent = list(headers)
    if authorization is not None:
        sent.append(("Authorization", authorization))
        if repeated:
            sent.append(("Authorization", f"Bearer {server.token}"))
    answer = server.send(method, path, b"", sent)
    body = check("health+headers", method, answer)
    if body is not None:
        assert path.startswith("/health") and not path.startswith("/healthcheck") and body == b"OK"


# ---- reservations ---------------------------------------------------------------------------------------------------

@HOSTILE
@given(request=with_json(reservation_values))
def test_reservation_bodies_never_fail_the_server(server, request):
    body, headers = request
    answer = server.send("POST", "/reservation", body, headers)
    result = check("POST /reservation", "POST", answer, stock_allowed=True)
    if result is not None:
        assert set(json.loads(result)) == {"reservation_id", "stock"}


@HOSTILE
@given(method=st.sampled_from(["PUT", "PUT", "DELETE", "GET", "POST", "PATCH"]),
       reservation_id=st.one_of(path_ids, st.just("REAL")), suffix=st.sampled_from(["", "/", "/x", "?a=%ff"]),
       request=with_json(reservation_values))
def test_reservation_ids_and_renewals_never_fail_the_server(server, method, reservation_id, suffix, request):
    if reservation_id == "REAL":
        reservation_id = server.order["reservation_id"]
    body, headers = request
    answer = server.send(method, f"/reservation/{reservation_id}{suffix}", body if method != "GET" else b"", headers)
    check("PUT/DELETE /reservation", method, answer, stock_allowed=True)


# ---- orders -------------------------------------------------------------------------------------------------------

order_values = st.one_of(
    st.fixed_dictionaries({}, optional={
        "reservation_id": st.one_of(st.just("REAL"), odd_text, path_ids, json_values),
        "g2a_order_id": st.one_of(odd_numbers, odd_text, st.just("80201000000555"), json_values)}),
    json_values)


def real_ids(server, value):
    if isinstance(value, dict) and value.get("reservation_id") == "REAL":
        return {**value, "reservation_id": server.order["reservation_id"]}
    return value


@HOSTILE
@given(request=st.data())
def test_order_bodies_never_fail_the_server(server, request):
    body, headers = request.draw(with_json(order_values.map(lambda value: real_ids(server, value))))
    check("POST /order", "POST", server.send("POST", "/order", body, headers))


def order_path(server, order_id, rest=""):
    real = {"ORDER": server.order["order_id"], "G2A": server.order["g2a_order_id"],
            "RESERVATION": server.order["reservation_id"], "ITEM": server.order["item_id"]}
    return f"/order/{real.get(order_id, order_id)}/inventory{rest}"


order_ids = st.one_of(path_ids, st.sampled_from(["ORDER", "G2A", "RESERVATION"]))
item_ids = st.one_of(path_ids, st.just("ITEM"))


@HOSTILE
@example(order_id="ORDER", method="DELETE", query=[("id[]", "\x00"), ("id", "ITEM")], raw_query="")
@example(order_id="ORDER", method="DELETE", query=[], raw_query="id[]=%00")
@given(order_id=order_ids, method=st.sampled_from(["GET", "GET", "DELETE", "POST", "PUT", "HEAD"]),
       query=st.lists(st.tuples(st.sampled_from(["id[]", "id", "id[0]", "id[", "ids", "id[][]"]),
                                st.one_of(item_ids, odd_text)), max_size=5),
       raw_query=st.sampled_from(["", "id[]=%00", "id=%ff%fe", "id[]=" + "x" * 5000, "id[]=..%2F..", "&&id==&"]))
def test_inventory_reads_and_returns_never_fail_the_server(server, order_id, method, query, raw_query):
    pairs = [(name, server.order["item_id"] if value == "ITEM" else value) for name, value in query]
    query_string = "&".join(filter(None, [urllib.parse.urlencode(pairs, errors="surrogatepass"), raw_query]))
    answer = server.send(method, order_path(server, order_id, "?" + query_string if query_string else ""))
    body = check("GET/DELETE inventory", method, answer)
    if body is not None:
        assert isinstance(json.loads(body), list)


@HOSTILE
@given(order_id=order_ids, item_id=item_ids, account=st.booleans(),
       method=st.sampled_from(["GET", "GET", "DELETE", "POST", "HEAD"]),
       suffix=st.sampled_from(["", "/", "/..", "/../..", "?x=%00"]))
def test_item_file_and_account_routes_never_fail_the_server(server, order_id, item_id, account, method, suffix):
    item = server.order["item_id"] if item_id == "ITEM" else item_id
    answer = server.send(method, order_path(server, order_id, f"/{item}" + ("/account" if account else "") + suffix))
    check("inventory item/account", method, answer)


# ---- notifications and CWS postbacks ------------------------------------------------------------------------------

notification_values = st.one_of(
    st.lists(st.fixed_dictionaries({}, optional={
        "notification_type": st.one_of(st.just("auction_deactivated"), odd_text, json_values),
        "date": st.one_of(st.just("2017-07-21T17:32:28Z"), odd_text),
        "data": st.one_of(st.fixed_dictionaries({}, optional={"message": json_values, "auction_id": json_values,
                                                              "offer_id": json_values}), json_values)}), max_size=3),
    json_values)


NUL_NOTIFICATION = b'[{"notification_type": "a\\u0000b", "data": {"offer_id": "\\u0000", "message": "x\\u0000y"}}]'


@HOSTILE
@example(request=(NUL_NOTIFICATION, [("Content-Type", "application/json")]))
@given(request=with_json(notification_values))
def test_notifications_never_fail_the_server(server, request):
    body, headers = request
    check("POST /notifications", "POST", server.send("POST", "/notifications", body, headers))


GOOD_HASH = expected_hash(CWS_CLIENT_ID, CWS_CLIENT_SIGNATURE)
postback_values = st.one_of(
    st.fixed_dictionaries({"authHash": st.one_of(st.just(GOOD_HASH), st.just(GOOD_HASH.upper()), odd_text,
                                                 json_values)}, optional={
        "type": st.one_of(st.sampled_from(["STOCK", "PRODUCT_UPDATED", "PRODUCT_HIDDEN", "PREORDER", "stock"]),
                          odd_text, json_values),
        "products": st.one_of(st.lists(st.fixed_dictionaries({}, optional={
            "productId": st.one_of(st.just(DEMO[1]["cws_product_id"]), odd_text, json_values)}), max_size=3),
            json_values),
        "productId": st.one_of(odd_text, json_values), "orderId": st.one_of(odd_text, json_values),
        "codeId": st.one_of(odd_text, json_values)}),
    json_values)


@HOSTILE
@example(request=(json.dumps({"authHash": GOOD_HASH, "type": "STOCK", "products": [{"productId": "a\x00"}]}).encode(),
                  []))
@example(request=(json.dumps({"authHash": GOOD_HASH, "type": "PREORDER", "orderId": "\x00"}).encode(), []))
@example(request=(json.dumps({"authHash": GOOD_HASH, "type": "PREORDER", "codeId": "\x00"}).encode(), []))
@given(request=with_json(postback_values))
def test_cws_postbacks_never_fail_the_server(server, request):
    body, headers = request
    answer = server.send("POST", "/cws/postback", body, headers, auth=False)
    result = check("POST /cws/postback", "POST", answer)
    if result is not None:
        assert json.loads(result) == {}


# ---- unknown paths and methods ------------------------------------------------------------------------------------

KNOWN = ["/oauth/token", "/healthcheck", "/health", "/reservation", "/reservation/abc", "/order",
         "/order/abc/inventory", "/order/abc/inventory/def", "/order/abc/inventory/def/account", "/notifications",
         "/cws/postback"]


@HOSTILE
@given(path=st.one_of(st.sampled_from(KNOWN + ["/", "", "*", "/metrics", "/admin", "/.env", "/../../etc/passwd",
                                               "/%2e%2e/%2e%2e/etc/passwd", "/reservation/", "/order/",
                                               "/order/abc/inventory/def/account/x", "/oauth/token/..",
                                               "/" + "a/" * 2000]),
                      st.lists(path_ids, min_size=1, max_size=4).map(lambda parts: "/" + "/".join(parts))),
       method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD", "TRACE", "PROPFIND",
                               "FOO", "M-SEARCH", "BREW"]),
       auth=st.booleans())
def test_unknown_paths_and_methods_never_fail_the_server(server, path, method, auth):
    if not path.startswith("/") and path != "*":
        path = "/" + path
    check("unknown paths/methods", method, server.send(method, path, b"", auth=auth))


# ---- below HTTP: what only Waitress answers -------------------------------------------------------------------------

PROTOCOL_TRICKS = {
    "garbage request line": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",
    "no HTTP version": b"GET /health\r\n\r\n",
    "lower-case method": b"get /health HTTP/1.1\r\nHost: x\r\n\r\n",
    "header past 256 KiB": b"GET /healthcheck HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + b"x" * 300_000 +
                           b"\r\n\r\n",
    "Content-Length not a number": b"POST /reservation HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
    "two Content-Lengths": b"POST /reservation HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n[]",
    "bad chunk size": b"POST /reservation HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                      b"zz\r\nabc\r\n0\r\n\r\n",
    "body past 1 MiB": b"POST /reservation HTTP/1.1\r\nHost: x\r\nContent-Length: 2000000\r\n\r\n" + b"[" * 65536,
    "malformed X-Forwarded-For from the proxy": b"GET /health HTTP/1.1\r\nHost: x\r\n"
                                                b"X-Forwarded-For: \"1.2.3.4\r\n\r\n",
    "NUL in the path": b"GET /order/a\x00b/inventory HTTP/1.1\r\nHost: x\r\n\r\n",
    "raw UTF-8 in the path": "GET /order/\u202e\u0645/inventory HTTP/1.1\r\nHost: x\r\n\r\n".encode(),
    "NUL in a header": b"GET /healthcheck HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \x00\r\n\r\n",
    "DEL in a header": b"POST /reservation HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\x7f\r\n"
                       b"Content-Length: 2\r\n\r\n[]",
}


@pytest.mark.parametrize("trick", sorted(PROTOCOL_TRICKS))
def test_malformed_http_never_gets_a_5xx_and_the_server_lives_on(server, trick):
    """Waitress answers most of these itself before any route runs, with a text/plain 4xx (no JSON shape to pin
    there: see docs/decisions.md, Hostile input); what we hold it to is never a 5xx, and the next request served."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        try:
            sock.sendall(PROTOCOL_TRICKS[trick])
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # Waitress may refuse an oversized request and close before it has read all of it
        reply = receive(sock)
    status = int(reply.split(b" ", 2)[1]) if reply.startswith(b"HTTP/1.") else None
    STATUSES["protocol (waitress)"][status or "closed"] += 1
    assert status is None or status < 500, reply[:300]
    assert requests.get(f"{server.base}/health", timeout=30).text == "OK"


def receive(sock):
    chunks = []
    try:
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    except OSError:  # reset or not connected: the server closed first, which is an answer too
        pass
    return b"".join(chunks)


# ---- and at the end ----------------------------------------------------------------------------------------------

def test_after_all_of_it_the_process_is_alive_healthy_and_still_selling(server):
    assert server.process.proc.poll() is None
    assert requests.get(f"{server.base}/health", timeout=30).text == "OK"
    answer = requests.get(f"{server.base}/healthcheck", headers={"Authorization": f"Bearer {server.token}",
                                                                 "X-Forwarded-For": next_address()}, timeout=30)
    assert answer.status_code == 204
    assert "Traceback" not in server.process.logs()
