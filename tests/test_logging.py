"""Logs as journald gets them: the real web and worker, a whole sale driven through them, and not one secret or
key in the output; JSON lines parse; LOG_LEVEL is obeyed; noisy libraries are held down."""
import http.client
import json
import logging
import re
import sys
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
import requests
from conftest import DEMO, OUR_ID, OUR_SECRET, SECRET_KEY, SWITCH
from fake_webhook import webhook  # noqa: F401 (a fixture)
from polling import wait_for

from bridge import log as logsetup
from bridge.sim import CWS_CLIENT_ID, CWS_CLIENT_SECRET, CWS_CLIENT_SIGNATURE, G2A_API_SECRET


def cws_token(sim):
    """The token the bridge holds (the fake CWS hands out the same one while it is valid)."""
    answer = requests.post(f"{sim.cws_url}/oauth/token", data={
        "grant_type": "client_credentials", "client_id": CWS_CLIENT_ID, "client_secret": CWS_CLIENT_SECRET})
    return answer.json()["access_token"]


def drive_a_sale(g2a, sim):
    """Token, Basic auth, a refused secret, reservation, order with a key, inventory, notification, postback;
    returns the values that must never be logged."""
    g2a.http.get(f"{g2a.base_url}/healthcheck", auth=(OUR_ID, OUR_SECRET), timeout=10)
    g2a.http.get(f"{g2a.base_url}/oauth/token", params={"client_id": OUR_ID, "client_secret": "guessed-secret-1"})
    reservation = g2a.reserve((SWITCH, 1)).json()
    order = g2a.call("POST", "/order", {"reservation_id": reservation["reservation_id"],
                                        "g2a_order_id": 80201000000777}).json()
    inventory = g2a.call("GET", f"/order/{order['order_id']}/inventory").json()
    g2a.call("POST", "/notifications", [{"notification_type": "auction_deactivated",
                                         "data": {"offer_id": "offer-1", "message": "stock mismatch"}}])
    postback = sim.cws.postback("STOCK", products=[sim.cws.stock_entry(DEMO[0]["cws_product_id"])])
    sim.cws.send_postback(f"{g2a.base_url}/cws/postback", postback)
    return {"delivered key": inventory[0]["inventory"][0]["value"], "our access token": g2a.token(),
            "CWS token": cws_token(sim), "CWS postback authHash": postback["authHash"]}


SECRETS = {"OUR_API_CLIENT_SECRET": OUR_SECRET, "CWS_CLIENT_SECRET": CWS_CLIENT_SECRET,
           "CWS_CLIENT_SIGNATURE": CWS_CLIENT_SIGNATURE, "G2A_API_SECRET": G2A_API_SECRET,
           "BRIDGE_SECRET_KEY": SECRET_KEY, "a guessed secret": "guessed-secret-1"}


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_no_secret_and_no_key_reaches_the_logs(start_bridge, sim, webhook, fmt):
    env = {"LOG_FORMAT": fmt, "LOG_LEVEL": "DEBUG", "ALERT_WEBHOOK_URL": webhook.url}
    web, worker = start_bridge("web", **env), start_bridge("worker", **env)
    wait_for(lambda: sim.g2a.offer_for_product(str(SWITCH))["active"])
    values = {**SECRETS, **drive_a_sale(web.g2a, sim), "webhook path": "secret-path"}
    wait_for(lambda: any("auction_deactivated" in text for text in webhook.texts()))
    web.stop(), worker.stop()
    logs = web.logs() + worker.logs()
    assert "order.completed" in logs and "alert.sent" in logs
    leaked = [name for name, value in values.items() if value in logs]
    assert leaked == []


def test_every_json_log_line_is_one_object_with_the_same_fields(start_bridge, sim):
    web = start_bridge("web", LOG_FORMAT="json")
    worker = start_bridge("worker", LOG_FORMAT="json")
    wait_for(lambda: "sync.full_pass" in worker.logs())
    web.g2a.reserve((SWITCH, 1))
    web.stop(), worker.stop()
    lines = (web.logs() + worker.logs()).splitlines()
    records = [json.loads(line) for line in lines]
    assert all({"ts", "level", "logger", "msg"} <= set(record) for record in records)
    access = [r for r in records if r["msg"] == "http" and r["path"] == "/reservation"]
    assert access and access[0]["status"] == "200" and access[0]["request_id"]
    assert any(r["msg"] == "worker.stopped" for r in records)


def test_log_level_warning_hides_the_info_lines(start_bridge):
    web = start_bridge("web", LOG_LEVEL="WARNING")
    web.g2a.reserve((SWITCH, 1))
    web.stop()
    assert "INFO" not in web.logs() and "web.listening" not in web.logs()


def test_log_level_debug_shows_the_health_checks(start_bridge):
    web = start_bridge("web", LOG_LEVEL="DEBUG")
    requests.get(f"{web.g2a.base_url}/health", timeout=5)
    web.stop()
    assert "DEBUG bridge.access http method=GET path=/health status=200" in web.logs()


def test_noisy_libraries_stay_quiet_even_at_debug():
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        logsetup.setup("DEBUG")
        assert logging.getLogger("waitress.queue").getEffectiveLevel() >= logging.WARNING
        assert logging.getLogger("urllib3").getEffectiveLevel() >= logging.WARNING
        assert logging.getLogger("bridge.worker").getEffectiveLevel() == logging.DEBUG
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
        for name in ("waitress.queue", "urllib3", "requests", "peewee"):
            logging.getLogger(name).setLevel(logging.NOTSET)


# ---- control bytes from callers never reach the terminal reading the log ---------------------------------------------

HOSTILE_PATHS = ["/%1b[2J%1b[31mfake-alert%07", "/oauth/token%00nul", "/x%7fdel%c2%9bcsi", "/a%0aINFO%20forged%20line",
                 "/bidi%e2%80%aecod.exe", "/health%09tab"]
RAW_CONTROL = re.compile(rb"[\x00-\x09\x0b-\x1f\x7f]|\xc2[\x80-\x9f]|\xe2\x80[\xa8\xa9\xaa-\xae]")


def send_raw(port, path):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        conn.getresponse().read()
    finally:
        conn.close()


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_control_characters_in_unauthenticated_requests_are_escaped_in_the_log(start_bridge, fmt):
    web = start_bridge("web", LOG_FORMAT=fmt)
    for path in HOSTILE_PATHS:
        send_raw(int(web.env["PORT"]), path)
    web.stop()
    raw = web.log_path.read_bytes()
    assert RAW_CONTROL.findall(raw) == []
    assert raw.count(b"fake-alert") == 1
    assert not [line for line in raw.splitlines() if b"forged" in line and b"path" not in line]
    if fmt == "json":
        paths = [json.loads(line).get("path") for line in raw.decode().splitlines()]
        assert "/\x1b[2J\x1b[31mfake-alert\x07" in paths  # escaped, yet exactly what was asked


def unhandled_record(path):
    try:
        raise ValueError(f"bad id {path}")
    except ValueError:
        record = logging.LogRecord("bridge.web", logging.ERROR, __file__, 1, "web.unhandled %s %s",
                                   ("GET", path), sys.exc_info())
    record.event_fields = {"path": path}
    return record


@pytest.mark.parametrize("formatter", [logsetup.TextFormatter(logsetup.Masker()),
                                       logsetup.JsonFormatter(logsetup.Masker())], ids=["text", "json"])
def test_the_unhandled_error_line_escapes_every_unprintable_character(formatter):
    nasty = "/\x1b]0;owned\x07\x00\x7f\x9b\u2028\u202e\U000e0041x\ty"
    line = formatter.format(unhandled_record(nasty))
    assert all(char.isprintable() for char in line), repr(line)
    assert "web.unhandled GET" in line and "ValueError" in line
    if isinstance(formatter, logsetup.JsonFormatter):
        record = json.loads(line)
        assert record["path"] == nasty and record["msg"] == f"web.unhandled GET {nasty}"
        assert record["error"].startswith(f"ValueError: bad id {nasty} at ")


def every_pattern_applied(masker, text):
    """What the masker gave before it learnt to skip lines without a credential word: every scan, always."""
    for value in masker.secrets:
        text = text.replace(value, logsetup.MASK)
    text = logsetup._SECRET_PATTERNS[0].sub(lambda m: f"{m.group(1)} {logsetup.MASK}", text)
    for pattern in logsetup._SECRET_PATTERNS[1:]:
        text = pattern.sub(lambda m: m.group(1) + logsetup.MASK, text)
    return text


LINE_PARTS = st.sampled_from(["Bearer ", "BASIC ", "client_secret=", "Token: ", '"code": "', "VALUE=", "authHash=",
                              "emailPassword=", "ſecret=", "status=200 ", "path=/reservation ", " ", "=", '"'])


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(LINE_PARTS, st.text(min_size=1, max_size=12)), max_size=8).map("".join))
def test_the_masker_masks_what_every_scan_would(text):
    masker = logsetup.Masker(["supersecretvalue", "supersecretvalue-longer"])
    assert masker(text) == every_pattern_applied(masker, text)


@pytest.mark.parametrize("line, masked", [
    ("INFO bridge.access http method=POST path=/reservation status=200", "unchanged"),
    ("upstream said: Authorization: BEARER abcdefghijk", "upstream said: Authorization: BEARER ***"),
    ("ſecret=abcdefghij", "ſecret=***"),  # not ASCII: every scan runs, and (?i) matches the long s
    ('{"CODE": "ABCD-EFGH-IJKL"}', '{"CODE": "***"}'),
    ("x supersecretvalue-longer y supersecretvalue", "x *** y ***"),  # the longer secret first, whole
])
def test_the_masker(line, masked):
    masker = logsetup.Masker(["supersecretvalue"])
    masker.add("supersecretvalue-longer")
    assert masker(line) == (line if masked == "unchanged" else masked)


def test_a_record_is_formatted_before_the_handler_takes_its_lock(tmp_path):
    """Threads logging at once queue only on the write: formatting under the lock (StreamHandler's way) made the
    8 Waitress threads wait for each other's formatting at INFO (bench: 1,309 -> 1,418 reservations/s)."""
    handler = logsetup.LineHandler(open(tmp_path / "log", "w"))
    free_while_formatting = []

    def try_the_lock():
        taken = handler.lock.acquire(timeout=0.5)
        if taken:
            handler.lock.release()
        free_while_formatting.append(taken)

    class Probe(logging.Formatter):
        def format(self, record):
            other = threading.Thread(target=try_the_lock)
            other.start(), other.join()
            return "line"
    handler.setFormatter(Probe())
    handler.handle(logging.LogRecord("bridge.test", logging.INFO, __file__, 1, "event", None, None))
    handler.close()
    assert free_while_formatting == [True] and (tmp_path / "log").read_text() == "line\n"
