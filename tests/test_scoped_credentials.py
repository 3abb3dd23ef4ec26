"""Which credential opens what: METRICS_CLIENTS pairs (Basic, or a token issued to them) open /metrics and
/health?deep=1 and nothing else; contract pairs open everything; a token remembers the pair it was issued to."""
import base64
from datetime import datetime, timezone

import pytest
import requests
from conftest import OUR_ID, OUR_SECRET

from bridge import db
from bridge.auth import CONTRACT, METRICS, TokenStore, token_hash
from bridge.config import Settings
from bridge.errors import ContractError

NOW = datetime(2025, 7, 14, 12, 0, tzinfo=timezone.utc)
PROM_ID, PROM_SECRET = "prometheus", "prometheus-secret-0123456789"
THROUGH_PROXY = {"X-Forwarded-For": "203.0.113.20"}  # not a direct call from this machine
MONITORING = ["/metrics", "/health?deep=1"]
CONTRACT_CALLS = [("GET", "/healthcheck"), ("POST", "/reservation"), ("PUT", "/reservation/abc"),
                  ("DELETE", "/reservation/abc"), ("POST", "/order"), ("GET", "/order/1/inventory"),
                  ("DELETE", "/order/1/inventory?id[]=x"), ("GET", "/order/1/inventory/x"),
                  ("GET", "/order/1/inventory/x/account"), ("POST", "/notifications")]


def basic(client_id, client_secret):
    return "Basic " + base64.b64encode(f"{client_id}:{client_secret}".encode()).decode()


def token_for(base_url, client_id, client_secret):
    answer = requests.post(f"{base_url}/oauth/token", data={
        "grant_type": "client_credentials", "client_id": client_id, "client_secret": client_secret},
        headers=THROUGH_PROXY, timeout=10)
    assert answer.status_code == 200, answer.text
    return answer.json()["access_token"]


def call(base_url, method, path, authorization):
    return requests.request(method, base_url + path, headers={"Authorization": authorization, **THROUGH_PROXY},
                            json=[], timeout=10)


@pytest.fixture
def scoped_web(start_bridge):
    return start_bridge("web", METRICS_CLIENTS=f"{PROM_ID}:{PROM_SECRET}").g2a


@pytest.mark.parametrize("path", MONITORING)
def test_a_metrics_pair_opens_metrics_and_deep_health_by_basic_or_by_its_token(scoped_web, path):
    url = scoped_web.base_url
    assert call(url, "GET", path, "").status_code == 401
    assert call(url, "GET", path, basic(PROM_ID, PROM_SECRET)).status_code in (200, 503)  # 503: no worker
    assert call(url, "GET", path, f"Bearer {token_for(url, PROM_ID, PROM_SECRET)}").status_code in (200, 503)
    assert call(url, "GET", path, basic(PROM_ID, "wrong-" + PROM_SECRET)).status_code == 401


@pytest.mark.parametrize("method, path", CONTRACT_CALLS)
def test_a_metrics_pair_and_its_token_open_no_contract_route(scoped_web, method, path):
    url = scoped_web.base_url
    for authorization in (basic(PROM_ID, PROM_SECRET), f"Bearer {token_for(url, PROM_ID, PROM_SECRET)}"):
        answer = call(url, method, path, authorization)
        assert (answer.status_code, answer.json()["code"]) == (403, "AUTH02"), (authorization[:6], answer.text)
    assert call(url, method, path, basic(OUR_ID, OUR_SECRET)).status_code not in (401, 403)


def test_a_contract_pair_still_opens_the_monitoring_routes(scoped_web):
    url = scoped_web.base_url
    for path in MONITORING:
        assert call(url, "GET", path, basic(OUR_ID, OUR_SECRET)).status_code in (200, 503)
        assert call(url, "GET", path, f"Bearer {token_for(url, OUR_ID, OUR_SECRET)}").status_code in (200, 503)


def test_each_token_row_remembers_its_client_and_scope(scoped_web, fresh_db):
    ours, theirs = (token_for(scoped_web.base_url, *pair) for pair in ((OUR_ID, OUR_SECRET), (PROM_ID, PROM_SECRET)))
    rows = {row.token_hash: (row.client_id, row.scope) for row in fresh_db.ApiToken.select()}
    assert rows == {token_hash(ours): (OUR_ID, CONTRACT), token_hash(theirs): (PROM_ID, METRICS)}


# ---- in process -------------------------------------------------------------------------------------------------

SETTINGS = Settings(our_client_id=OUR_ID, our_client_secret=OUR_SECRET, metrics_clients=((PROM_ID, PROM_SECRET),))


def refusal(store, authorization, scopes=(CONTRACT,)):
    with pytest.raises(ContractError) as refused:
        store.check(authorization, NOW, scopes)
    return refused.value.status, refused.value.code


def test_a_cached_metrics_token_is_still_refused_on_contract_routes(database):
    store = TokenStore(SETTINGS)
    token, _ = store.issue(PROM_ID, PROM_SECRET, NOW)
    assert store.check(f"Bearer {token}", NOW, (CONTRACT, METRICS)) == METRICS  # now cached
    assert refusal(store, f"Bearer {token}") == (403, "AUTH02")


def test_the_same_id_as_a_contract_and_a_metrics_pair_gets_the_scope_of_the_secret_given(database):
    settings = SETTINGS.replace(metrics_clients=((OUR_ID, PROM_SECRET),))
    store = TokenStore(settings)
    token, _ = store.issue(OUR_ID, PROM_SECRET, NOW)
    assert db.ApiToken.get().scope == METRICS
    assert refusal(store, f"Bearer {token}") == (403, "AUTH02")
    assert store.check(basic(OUR_ID, OUR_SECRET), NOW) == CONTRACT


# ---- removing a pair revokes its tokens --------------------------------------------------------------------------

OLD_ID, OLD_SECRET = "old-client", "old-client-secret-0123456789"


def test_a_token_of_a_removed_pair_stops_working_through_a_restart_and_leaves_the_database(start_bridge, fresh_db):
    before = start_bridge("web", OUR_API_EXTRA_CLIENTS=f"{OLD_ID}:{OLD_SECRET}",
                          METRICS_CLIENTS=f"{PROM_ID}:{PROM_SECRET}")
    url = before.g2a.base_url
    old, prom, ours = (token_for(url, *pair) for pair in ((OLD_ID, OLD_SECRET), (PROM_ID, PROM_SECRET),
                                                          (OUR_ID, OUR_SECRET)))
    assert call(url, "GET", "/healthcheck", f"Bearer {old}").status_code == 204
    before.stop()
    start_bridge("web")  # the same database, without the old pair and without METRICS_CLIENTS
    for token in (old, prom):
        answer = call(url, "GET", "/metrics", f"Bearer {token}")
        assert (answer.status_code, answer.json()["code"]) == (401, "AUTH02")
    assert call(url, "GET", "/healthcheck", f"Bearer {ours}").status_code == 204
    assert [row.client_id for row in fresh_db.ApiToken.select()] == [OUR_ID]


def test_a_cached_token_is_refused_by_a_store_whose_settings_no_longer_have_its_pair(database):
    with_old = SETTINGS.replace(extra_clients=((OLD_ID, OLD_SECRET),))
    token, _ = TokenStore(with_old).issue(OLD_ID, OLD_SECRET, NOW)
    store = TokenStore(SETTINGS)
    assert refusal(store, f"Bearer {token}") == (401, "AUTH02")
    assert refusal(store, f"Bearer {token}") == (401, "AUTH02")  # the second answer comes from the cache


def test_a_pair_moved_from_the_contract_to_the_metrics_list_keeps_no_contract_token(database):
    token, _ = TokenStore(SETTINGS.replace(extra_clients=((OLD_ID, OLD_SECRET),))).issue(OLD_ID, OLD_SECRET, NOW)
    store = TokenStore(SETTINGS.replace(metrics_clients=((OLD_ID, OLD_SECRET),)))
    assert refusal(store, f"Bearer {token}", (CONTRACT, METRICS)) == (401, "AUTH02")
