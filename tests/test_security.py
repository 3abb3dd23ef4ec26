"""Security review, pinned: tokens only as hashes and refused once expired; credentials compared in constant time
against every pair; no key or secret in a database dump or in DEBUG logs of web and worker; outbound calls only
over HTTPS to the expected hosts and never redirected; the brake on failed logins per client address (and which
address counts); postbacks and /metrics refused without credentials.

Already pinned elsewhere and not repeated here: config refusing http and foreign hosts (test_config), Upstream
refusing them and not following redirects (test_upstream), secret masking of a sale at DEBUG (test_logging).
"""
import base64
import hashlib
import hmac
import re
import socket
import sqlite3
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import requests
from conftest import OUR_ID, OUR_SECRET, SECRET_KEY, SKYLINES, SWITCH
from polling import wait_for

from bridge import alerts, db, postbacks
from bridge.auth import TokenStore, client_scope, token_hash
from bridge.config import CWS_HOSTS, G2A_HOSTS, Settings, outbound_url_problem
from bridge.cws import CwsClient
from bridge.errors import ConfigError, ContractError
from bridge.g2a import G2aClient
from bridge.sim import CWS_CLIENT_ID, CWS_CLIENT_SECRET, CWS_CLIENT_SIGNATURE, G2A_API_SECRET

SWITCH_CWS, SKYLINES_CWS = "466c805b-ead1-4851-bc4f-9eda242550ad", "067ccfe1-655a-4a1f-8362-c655bb9bbf95"
NOW = datetime(2025, 7, 14, 12, 0, tzinfo=timezone.utc)
PAIRS = Settings(our_client_id="first-id", our_client_secret="first-secret-0123456789",
                 extra_clients=(("second-id", "second-secret-0123456789"), ("third-id", "third-secret-0123456789")))


def basic(client_id, client_secret):
    return "Basic " + base64.b64encode(f"{client_id}:{client_secret}".encode()).decode()


def issue(g2a):
    answer = g2a.http.get(f"{g2a.base_url}/oauth/token", params={
        "grant_type": "client_credentials", "client_id": OUR_ID, "client_secret": OUR_SECRET}, timeout=10)
    assert answer.status_code == 200, answer.text
    return answer.json()["access_token"]


def healthcheck(g2a, token, **headers):
    return g2a.http.get(f"{g2a.base_url}/healthcheck", headers={"Authorization": f"Bearer {token}", **headers},
                        timeout=10)


# ---- tokens ------------------------------------------------------------------------------------------------------

def test_issued_tokens_are_stored_only_as_their_sha256(web, fresh_db, bridge_env):
    tokens = [issue(web) for _ in range(3)]
    rows = {row.token_hash: row for row in fresh_db.ApiToken.select()}
    assert set(rows) == {hashlib.sha256(token.encode()).hexdigest() for token in tokens}
    assert all(len(token) >= 43 for token in tokens)  # 32 random bytes, url-safe
    assert all(row.client_id == OUR_ID for row in rows.values())
    dump = "\n".join(sqlite3.connect(database_file(bridge_env)).iterdump())
    assert [token for token in tokens if token in dump] == []


def test_an_expired_token_is_refused_even_though_the_database_still_has_it(web, fresh_db):
    token = issue(web)
    fresh_db.ApiToken.update(expires_at=fresh_db.utcnow() - timedelta(seconds=1)).where(
        fresh_db.ApiToken.token_hash == token_hash(token)).execute()
    answer = healthcheck(web, token)
    assert answer.status_code == 401 and answer.json()["code"] == "AUTH02"
    assert healthcheck(web, issue(web)).status_code == 204


def test_a_cached_token_stops_working_when_its_hour_is_up(database):
    store = TokenStore(PAIRS)
    token, lifetime = store.issue("first-id", "first-secret-0123456789", NOW)
    store.check(f"Bearer {token}", NOW + timedelta(seconds=lifetime - 1))  # now in the per-process cache
    with pytest.raises(ContractError) as refused:
        store.check(f"Bearer {token}", NOW + timedelta(seconds=lifetime))
    assert (refused.value.status, refused.value.code) == (401, "AUTH02")


def database_file(bridge_env):
    return bridge_env["DATABASE_URL"].removeprefix("sqlite:///")


# ---- constant-time comparisons -------------------------------------------------------------------------------------

@pytest.fixture
def compare_spy(monkeypatch):
    """Every hmac.compare_digest call the bridge makes, still answered by the real function."""
    calls = []
    real = hmac.compare_digest

    def spy(a, b):
        calls.append((a, b))
        return real(a, b)
    monkeypatch.setattr(hmac, "compare_digest", spy)
    return calls


@pytest.mark.parametrize("client_id, client_secret, expected", [
    ("first-id", "first-secret-0123456789", True),
    ("third-id", "third-secret-0123456789", True),
    ("first-id", "third-secret-0123456789", False),
    ("nobody", "nothing", False),
])
def test_credentials_are_compared_in_constant_time_against_every_pair_with_no_early_exit(
        compare_spy, client_id, client_secret, expected):
    assert (client_scope(PAIRS, client_id, client_secret) == "contract") is expected
    # id and secret of each of the three pairs, even when the first pair already matched
    assert len(compare_spy) == 6
    assert {b for _, b in compare_spy} == {value.encode() for pair in PAIRS.api_clients() for value in pair}


def test_basic_auth_on_a_call_goes_through_the_same_constant_time_check(compare_spy, database):
    TokenStore(PAIRS).check(basic("second-id", "second-secret-0123456789"), NOW)
    assert len(compare_spy) == 6


def test_the_postback_auth_hash_is_compared_in_constant_time(compare_spy, database):
    settings = Settings(cws_client_id=CWS_CLIENT_ID, cws_client_signature=CWS_CLIENT_SIGNATURE)
    good = postbacks.expected_hash(CWS_CLIENT_ID, CWS_CLIENT_SIGNATURE)
    assert postbacks.handle(settings, {"type": "STOCK", "authHash": good, "productId": "x"}, NOW) == 200
    with pytest.raises(ContractError):
        postbacks.handle(settings, {"type": "STOCK", "authHash": good[:-1] + "0", "productId": "x"}, NOW)
    assert [b for _, b in compare_spy] == [good.encode(), good.encode()]


# ---- keys at rest --------------------------------------------------------------------------------------------------

@pytest.fixture
def shop(start_bridge):
    web = start_bridge("web")
    web.worker = start_bridge("worker")
    return web


def order(g2a, product, quantity, g2a_order_id):
    reservation = g2a.reserve((product, quantity))
    assert reservation.status_code == 200, reservation.text
    answer = g2a.call("POST", "/order", {"reservation_id": reservation.json()["reservation_id"],
                                         "g2a_order_id": g2a_order_id})
    assert answer.status_code in (200, 202), answer.text
    return answer


def keys_of(g2a, order_id):
    answer = g2a.call("GET", f"/order/{order_id}/inventory")
    return [line for entry in answer.json() for line in entry["inventory"]]


def sell_every_kind_of_key(g2a, sim):
    """Text keys, one of them returned to the pool and sold again, a key delivered late by the worker, and an image
    key; returns every key value G2A received (the image as its base64 data)."""
    first = order(g2a, SKYLINES, 2, 80201000000001).json()
    returned = first["stock"][0]["inventory"][0]
    assert g2a.call("DELETE", f"/order/{first['order_id']}/inventory?id[]={returned['id']}").status_code == 204
    again = order(g2a, SKYLINES, 1, 80201000000002).json()
    assert again["stock"][0]["inventory"][0]["value"] == returned["value"]  # from the pool, not bought again
    sim.cws.set_fulfilment(SWITCH_CWS, "delayed", polls=10_000)
    late = order(g2a, SWITCH, 1, 80201000000003)
    assert late.status_code == 202
    sim.cws.complete_order(sim.cws.orders_for_client_id("g2a-80201000000003")[0]["orderId"])
    wait_for(lambda: keys_of(g2a, late.json()["order_id"]), what="the late key")
    sim.cws.set_fulfilment(SWITCH_CWS, "image")
    image = order(g2a, SWITCH, 1, 80201000000004).json()
    item = image["stock"][0]["inventory"][0]
    file = g2a.call("GET", f"/order/{image['order_id']}/inventory/{item['id']}").json()
    text_keys = [key["value"] for key in first["stock"][0]["inventory"] + keys_of(g2a, late.json()["order_id"])]
    assert all(value.startswith("SIM-") for value in text_keys) and file["data"]
    return {"text": text_keys, "image": file["data"]}


def test_a_database_dump_after_every_kind_of_delivery_holds_no_key_in_clear(shop, sim, fresh_db, bridge_env):
    sold = sell_every_kind_of_key(shop.g2a, sim)
    assert fresh_db.PooledKey.select().count() == 1
    shop.worker.stop(), shop.stop()
    path = database_file(bridge_env)
    dump = "\n".join(sqlite3.connect(path).iterdump())
    raw = b"".join(Path(f"{path}{suffix}").read_bytes() for suffix in ("", "-wal") if Path(f"{path}{suffix}").exists())
    # What makes each simulated image unique is a key-like text chunk inside the PNG.
    (image_secret,) = re.findall(rb"SIM-[A-Z0-9]{4}-[A-Z0-9]{4}-[A-Z0-9]{4}", base64.b64decode(sold["image"]))
    found = [value for value in sold["text"] if value in dump or value.encode() in raw]
    found += ["image base64"] * (sold["image"][:40] in dump or sold["image"][-40:] in dump)
    found += ["image bytes"] * (image_secret in raw or image_secret.decode() in dump)
    found += ["image hex"] * (image_secret.hex().upper() in dump.upper())
    found += [name for name, value in {"BRIDGE_SECRET_KEY": SECRET_KEY, "OUR_API_CLIENT_SECRET": OUR_SECRET,
                                       "CWS_CLIENT_SECRET": CWS_CLIENT_SECRET}.items() if value in dump]
    assert found == []


# ---- logs of web and worker at DEBUG ---------------------------------------------------------------------------

def test_debug_logs_of_web_and_worker_hold_no_secret_token_or_key_through_every_kind_of_delivery(start_bridge, sim):
    web = start_bridge("web", LOG_LEVEL="DEBUG")
    worker = start_bridge("worker", LOG_LEVEL="DEBUG")
    g2a = web.g2a
    wait_for(lambda: sim.g2a.offer_for_product(str(SWITCH))["active"], what="the first sync")
    url = f"{g2a.base_url}/oauth/token"
    tokens = [g2a.token(), requests.post(url, json={"client_id": OUR_ID, "client_secret": OUR_SECRET}).json()[
        "access_token"], requests.post(url, auth=(OUR_ID, OUR_SECRET)).json()["access_token"]]
    refused = {"guessed secret": "guessed-secret-77", "forged token": "forged-token-0123456789abcdef",
               "wrong basic": basic(OUR_ID, "wrong-secret-99")}
    requests.get(url, params={"client_id": OUR_ID, "client_secret": refused["guessed secret"]})
    healthcheck(g2a, refused["forged token"])
    requests.get(f"{g2a.base_url}/healthcheck", headers={"Authorization": refused["wrong basic"]})
    requests.get(f"{g2a.base_url}/healthcheck", headers={"Authorization": basic(OUR_ID, OUR_SECRET)})
    sold = sell_every_kind_of_key(g2a, sim)
    postback = sim.cws.postback("STOCK", products=[sim.cws.stock_entry(SKYLINES_CWS)])
    sim.cws.send_postback(f"{g2a.base_url}/cws/postback", postback)
    web.stop(), worker.stop()
    logs = web.logs() + worker.logs()
    assert "order.completed" in worker.logs() and "DEBUG bridge.access" in web.logs()
    values = {"OUR_API_CLIENT_SECRET": OUR_SECRET, "CWS_CLIENT_SECRET": CWS_CLIENT_SECRET,
              "CWS_CLIENT_SIGNATURE": CWS_CLIENT_SIGNATURE, "G2A_API_SECRET": G2A_API_SECRET,
              "BRIDGE_SECRET_KEY": SECRET_KEY, "basic credentials": basic(OUR_ID, OUR_SECRET)[6:],
              "postback authHash": postback["authHash"], "image key": sold["image"][:40], **refused,
              **{f"access token {n}": token for n, token in enumerate(tokens)},
              **{f"key {n}": value for n, value in enumerate(sold["text"])},
              **{f"G2A token {n}": token for n, token in enumerate(sim.g2a._tokens)},
              "CWS token": sim.cws._token}
    assert all(values.values())
    assert [name for name, value in values.items() if value in logs] == []


# ---- outbound calls --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("client, field, url", [
    (CwsClient, "cws_base_url", "https://api.codeswholesale.com.evil.example"),
    (CwsClient, "cws_base_url", "http://api.codeswholesale.com"),
    (CwsClient, "cws_base_url", "https://api.g2a.com"),
    (G2aClient, "g2a_base_url", "https://g2a.com.evil.example"),
    (G2aClient, "g2a_base_url", "http://10.0.0.5:8082"),
    (G2aClient, "g2a_base_url", "https://api.codeswholesale.com"),
])
def test_the_real_clients_refuse_a_base_url_off_their_allow_list_even_past_config(client, field, url):
    """Settings built in code skip load_settings' checks; the clients check again."""
    with pytest.raises(ConfigError):
        client(Settings(**{field: url}))


TRICKY_URLS = [
    "https://evil.example\\@api.codeswholesale.com",  # urlsplit sees codeswholesale.com, requests goes to evil.example
    "https://evil.example%2f@api.codeswholesale.com",
    "https://api.codeswholesale.com:443@evil.example",
    "https://user:pw@api.codeswholesale.com",
    "https://evil.example#@api.codeswholesale.com",
    "https://evil.example?@api.codeswholesale.com",
    "https://evil.example\t.codeswholesale.com",
    "https://evil.example .codeswholesale.com",
    "https://evil.example%00.codeswholesale.com",
    "https://evil.example\x00.codeswholesale.com",
    "https://evil%2eexample.codeswholesale.com",
    "https://api.codeswholesale.com\\.evil.example",
    "https://\u0430pi.codeswholesale.com.evil.example",
    "https:\\\\evil.example\\api.codeswholesale.com",
    "http://127.0.0.1\\@evil.example",
]


@pytest.mark.parametrize("url", TRICKY_URLS)
def test_a_url_that_parsers_could_read_differently_is_refused(url):
    assert outbound_url_problem(url, CWS_HOSTS) is not None
    assert outbound_url_problem(url, None) is not None  # the alert webhook, any https host
    with pytest.raises(ConfigError):
        CwsClient(Settings(cws_base_url=url))
    with pytest.raises(ConfigError):
        G2aClient(Settings(g2a_base_url=url.replace("codeswholesale", "g2a")))


@pytest.mark.parametrize("url", ["https://api.codeswholesale.com", "https://sandbox.codeswholesale.com/v3",
                                 "https://API.CodesWholesale.com", "http://127.0.0.1:8081", "http://[::1]:81",
                                 "http://localhost:9/x"])
def test_plain_urls_on_the_allowed_hosts_still_pass(url):
    assert outbound_url_problem(url, CWS_HOSTS) is None


def test_the_allow_lists_are_the_documented_hosts():
    assert (CWS_HOSTS, G2A_HOSTS) == (("codeswholesale.com",), ("g2a.com",))


def test_an_alert_webhook_that_redirects_is_not_followed(database, requests_mock):
    """The alert text would otherwise go wherever the redirect points, over plain http too."""
    hook = "https://hooks.example.com/services/T0/B0/secret-path"
    requests_mock.post(hook, status_code=302, headers={"Location": "http://evil.example/collect"})
    evil = requests_mock.get("http://evil.example/collect", json={})
    alerts.raise_alert("low_balance", "cws", "CWS balance 1.00 EUR is below 50", NOW)
    assert alerts.dispatch_pending(Settings(alert_webhook_url=hook), NOW) == 0
    assert evil.call_count == 0
    assert db.Alert.get().sent_at is None


# ---- the brake on failed authentication, per client address ------------------------------------------------------

def guess(g2a, forwarded_for=None, base_url=None):
    headers = {"X-Forwarded-For": forwarded_for} if forwarded_for else {}
    return requests.get(f"{base_url or g2a.base_url}/oauth/token", headers=headers, timeout=10,
                        params={"client_id": OUR_ID, "client_secret": "guess"}).status_code


def test_behind_the_local_proxy_each_forwarded_address_has_its_own_brake(web):
    assert [guess(web, "203.0.113.7") for _ in range(21)] == [401] * 20 + [429]
    assert guess(web, "203.0.113.8") == 401
    braked = healthcheck(web, issue(web), **{"X-Forwarded-For": "203.0.113.7"})
    assert braked.status_code == 429 and braked.json()["code"] == "AUTH03"  # even right credentials wait
    assert healthcheck(web, web.token(), **{"X-Forwarded-For": "203.0.113.9"}).status_code == 204
    assert guess(web) == 401  # the proxy's own address is a third one


def test_the_proxy_counts_only_its_own_last_hop(web):
    """A client can put anything in X-Forwarded-For; the proxy appends the real address, and only that counts."""
    statuses = [guess(web, f"198.51.100.{n}, 203.0.113.50") for n in range(21)]
    assert statuses == [401] * 20 + [429]


def non_loopback_address():
    """This machine's address on its default route, or None (then the tests that need one are skipped)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(("10.254.254.254", 9))  # no packet is sent; this only picks the outgoing interface
        except OSError:
            return None
        address = sock.getsockname()[0]
    return None if address.startswith("127.") else address


@pytest.fixture
def public_web(start_bridge):
    """The web server listening on every interface, reached through a non-loopback address (not the proxy)."""
    address = non_loopback_address()
    if address is None:
        pytest.skip("no non-loopback IPv4 address on this machine")
    web = start_bridge("web", HOST="0.0.0.0")
    web.public_url = f"http://{address}:{web.env['PORT']}"
    return web


def test_a_forged_x_forwarded_for_from_anyone_but_the_local_proxy_is_ignored(public_web):
    g2a, url = public_web.g2a, public_web.public_url
    statuses = [guess(g2a, f"198.51.100.{n}", base_url=url) for n in range(21)]
    assert statuses == [401] * 20 + [429]  # all counted against the real peer address
    assert guess(g2a, "198.51.100.200") == 401  # the same forwarded address via the proxy is not braked


# ---- postbacks and /metrics ----------------------------------------------------------------------------------------

def test_a_postback_without_or_with_a_wrong_auth_hash_is_401(web, sim):
    url = f"{web.base_url}/cws/postback"
    unsigned = {"type": "STOCK", "products": [{"productId": SKYLINES_CWS}]}
    answer = requests.post(url, json=unsigned, timeout=10)
    assert (answer.status_code, answer.json()["code"]) == (401, "AUTH01")
    answer = requests.post(url, json=sim.cws.postback("STOCK", valid=False, products=[{"productId": SKYLINES_CWS}]))
    assert (answer.status_code, answer.json()["code"]) == (401, "AUTH02")
    answer = requests.post(url, json=sim.cws.postback("STOCK", products=[{"productId": SKYLINES_CWS}]))
    assert answer.status_code == 200


def status_of(url, **headers):
    return requests.get(url, headers=headers, timeout=10).status_code


@pytest.mark.parametrize("path", ["/metrics", "/health?deep=1"])
def test_metrics_and_deep_health_need_credentials_unless_asked_directly_on_this_machine(public_web, path):
    """Both tell the CWS balance, order counts and what needs attention: not for the internet."""
    local, public = public_web.g2a.base_url + path, public_web.public_url + path
    if status_of(local) == 404:
        pytest.skip(f"no {path} in this build")
    assert status_of(local) in (200, 503)  # from loopback, not through the proxy (503: no worker heartbeat)
    assert status_of(local, **{"X-Forwarded-For": "203.0.113.1"}) == 401  # through the proxy
    assert status_of(public) == 401  # from another machine
    assert status_of(public, Authorization=f"Bearer {public_web.g2a.token()}") in (200, 503)
    assert status_of(public, Authorization=basic(OUR_ID, OUR_SECRET)) in (200, 503)
    assert status_of(public_web.public_url + "/health") == 200  # the plain check stays public


def test_errors_never_carry_a_stack_trace_or_server_version(web):
    answer = web.call("POST", "/oauth/token", raw=b"client_id=%ff", auth=False,
                      headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert answer.status_code == 400 and answer.json()["code"] == "BR01"
    assert "Traceback" not in answer.text and answer.headers["Server"] == "g2a-bridge"
