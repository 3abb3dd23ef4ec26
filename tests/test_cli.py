"""`python -m bridge COMMAND` as an operator runs it: against the real web + worker and the simulator, exit codes
0/1/2, one `error:` line on stderr and never a traceback unless --verbose."""
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from datetime import timedelta
from decimal import Decimal

import pytest
import requests
from conftest import DEMO, ROOT, SKYLINES, SWITCH, free_port, write_products
from polling import wait_for

from bridge import db, doctor, status
from bridge.budget import budgets_for
from bridge.cli import COMMANDS, main
from bridge.config import Settings
from bridge.metrics import Metrics
from bridge.products import MappingWatcher
from bridge.sweep import LISTING_KEY

ORDER_IDS = iter(range(80201000000101, 80201000000999))
SWITCH_CWS = DEMO[0]["cws_product_id"]


def run_cli(env, *args, timeout=60):
    env = {**{k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG")}, **env}
    return subprocess.run([sys.executable, "-m", "bridge", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def assert_clean_failure(result, code):
    """The exit code, no traceback, and the reason as the last line of stderr (warnings may come before it)."""
    assert result.returncode == code, result
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: ")


def order(g2a, product=SWITCH):
    """Reserve one key and order it as G2A does; (HTTP answer, the G2A order id used)."""
    reservation = g2a.reserve((product, 1))
    assert reservation.status_code == 200, reservation.text
    g2a_order_id = next(ORDER_IDS)
    return g2a.call("POST", "/order", {"reservation_id": reservation.json()["reservation_id"],
                                       "g2a_order_id": g2a_order_id}), g2a_order_id


def buy(g2a, product=SWITCH):
    answer, _ = order(g2a, product)
    assert answer.status_code == 200, answer.text
    return answer.json()


@pytest.fixture
def running(start_bridge):
    """The real web and worker against the simulator, the worker past its first sync pass."""
    web = start_bridge("web")
    worker = start_bridge("worker")
    wait_for(lambda: "sync.full_pass" in worker.logs())
    return web.g2a


# ---- help and usage -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_has_help_with_an_example(name, capsys):
    assert main([name, "--help"]) == 0
    out = capsys.readouterr().out
    assert "example: g2a-bridge " + name in out


def test_retry_help_says_what_it_does_for_failed_and_each_stuck_state(capsys):
    assert main(["retry", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    for says in ("never buys twice", "A FAILED order CWS holds is polled again", "missing units",
                 "A FAILED order CWS refused takes returned keys from the pool", "A claimed order",
                 "CWS_RESEND_GRACE_SECONDS", "A preorder or fulfilling order is checked at CWS now",
                 "A completed order is refused"):
        assert says in out, says


def test_bad_usage_exits_2(capsys):
    assert main(["orders", "--state", "lost"]) == 2
    assert main(["no-such-command"]) == 2
    assert "invalid choice" in capsys.readouterr().err


# ---- configuration -------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["status", "web", "worker", "sync", "retry x", "pause"])
def test_bad_config_exits_2_listing_every_problem(bridge_env, command):
    env = {**bridge_env, "OUR_API_CLIENT_SECRET": "", "PORT": "eighty", "LOG_FORMAT": "xml"}
    result = run_cli(env, *command.split())
    assert result.returncode == 2, result
    assert "Traceback" not in result.stderr
    problems = result.stderr.strip().splitlines()
    assert all(line.startswith("error: ") for line in problems)
    named = {line[len("error: "):].split(":")[0] for line in problems}
    credentials_needed = command not in ("status", "pause")
    assert named == {"PORT", "LOG_FORMAT"} | ({"OUR_API_CLIENT_SECRET"} if credentials_needed else set())


def test_doctor_with_bad_config_lists_every_problem_and_calls_nobody(bridge_env, sim):
    env = {**bridge_env, "CWS_CLIENT_ID": "", "G2A_API_KEY": "", "SYNC_INTERVAL_SECONDS": "0"}
    result = run_cli(env, "doctor")
    assert result.returncode == 2, result
    fails = [line for line in result.stdout.splitlines() if line.startswith("FAIL config")]
    assert [line.split()[2].rstrip(":") for line in fails] == ["CWS_CLIENT_ID", "G2A_API_KEY",
                                                               "SYNC_INTERVAL_SECONDS"]
    assert "no other check was run" in result.stderr
    assert not sim.cws.requests and not sim.g2a.requests


# ---- doctor --------------------------------------------------------------------------------------


def test_doctor_passes_every_check_against_the_simulator(bridge_env):
    result = run_cli(bridge_env, "doctor")
    assert result.returncode == 0, result
    names = [line.split()[1] for line in result.stdout.splitlines()]
    assert names == ["config", "database", "products", "data", "secret", "CWS", "G2A", "budgets", "freshness"]
    assert all(line.startswith("ok ") for line in result.stdout.splitlines())
    assert "balance 1000" in result.stdout


def test_doctor_names_the_failing_check_and_its_remedy(bridge_env, tmp_path):
    (tmp_path / "products.json").write_text('{"products": [{"cws_product_id": "nope"}]}')
    result = run_cli({**bridge_env, "CWS_CLIENT_SECRET": "wrong-secret"}, "doctor")
    assert_clean_failure(result, 1)
    lines = {line.split()[1]: line for line in result.stdout.splitlines()}
    assert lines["CWS"].startswith("FAIL") and "check CWS_CLIENT_ID and CWS_CLIENT_SECRET" in lines["CWS"]
    assert lines["products"].startswith("FAIL") and "products[0]" in lines["products"]
    assert lines["G2A"].startswith("ok") and lines["database"].startswith("ok")
    assert "wrong-secret" not in result.stdout + result.stderr


def test_doctor_reports_an_unusable_database_file(bridge_env, tmp_path):
    (tmp_path / "bridge.db").write_bytes(b"pretend database " * 100)
    result = run_cli(bridge_env, "doctor")
    assert_clean_failure(result, 1)
    [line] = [line for line in result.stdout.splitlines() if line.split()[1] == "database"]
    assert line.startswith("FAIL") and "not a database" in line and "DATABASE_URL" in line


def test_doctor_never_reads_stdin(bridge_env):
    env = {**{k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG")}, **bridge_env}
    process = subprocess.Popen([sys.executable, "-m", "bridge", "doctor"], cwd=ROOT, env=env,
                               stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert process.wait(timeout=60) == 0  # stdin stays open: a read would hang here
    finally:
        process.stdin.close()
        if process.poll() is None:
            process.kill()


# ---- status, pause, resume -----------------------------------------------------------------------


def test_status_is_one_screen_and_exits_0_when_all_is_well(bridge_env, running):
    wait_for(lambda: run_cli(bridge_env, "status").returncode == 0)
    result = run_cli(bridge_env, "status")
    labels = [line.split("  ")[0] for line in result.stdout.splitlines()]
    assert labels == ["selling", "products", "offers", "orders", "last sync", "CWS state", "sweep", "CWS balance",
                      "notifications", "alerts", "worker", "stuck", "worker budget", "web budget", "all good"]
    assert "2 in sync, 0 pending, 0 failed" in result.stdout
    assert "1000" in result.stdout


def test_status_json_has_every_figure(bridge_env, running):
    buy(running)
    figures = json.loads(run_cli(bridge_env, "status", "--json").stdout)
    assert figures["selling"] == "running"
    assert figures["products"] == {"mapped": 2, "enabled": 2}
    assert set(figures["orders"]) == {"claimed", "fulfilling", "preorder", "completed", "failed"}
    assert figures["orders"]["completed"] == 1
    assert figures["worker"]["heartbeat_age_seconds"] < 10
    assert figures["last_sync"]["age_seconds"] < 30
    assert figures["cws_state"]["mapped"] == 2 and figures["cws_state"]["oldest_seconds"] < 30
    assert figures["sweep"]["mapped"] == 2 and figures["sweep"]["last_duration_seconds"] is not None
    assert figures["attention"] == []
    assert figures["upstream_budgets"]["worker"]["cws_list"]["limit"] == 360
    budgets = lambda: json.loads(run_cli(bridge_env, "status", "--json").stdout)["upstream_budgets"]  # noqa: E731
    wait_for(lambda: budgets()["worker"]["cws_list"]["used"],
             what="the worker's catalogue reads in its published budget figures")
    wait_for(lambda: budgets()["web"].get("cws_product", {}).get("limit") == 243,
             what="the web's budget figures, published every 5 s")


def test_status_exits_1_and_says_so_when_the_worker_is_not_running(bridge_env, web):
    result = run_cli(bridge_env, "status")
    assert result.returncode == 1
    assert "! worker is not running" in result.stdout
    assert "last sync      never" in result.stdout


def test_pause_stops_selling_within_2_seconds_and_resume_restarts_it(bridge_env, running):
    result = run_cli(bridge_env, "pause")
    assert result.returncode == 0 and 'run "g2a-bridge resume" to resume' in result.stdout
    assert "G2A sees no stock" not in result.stdout and "G2A offers keep their price and stock" in result.stdout
    time.sleep(2.1)
    refused = running.reserve((SWITCH, 1))
    assert refused.status_code == 400 and refused.json()["stock"][0]["inventory_size"] == 0
    assert "selling        paused" in run_cli(bridge_env, "status").stdout
    assert run_cli(bridge_env, "resume").returncode == 0
    time.sleep(2.1)
    assert running.reserve((SWITCH, 1)).status_code == 200


# ---- sync ----------------------------------------------------------------------------------------


def test_sync_dry_run_prints_the_planned_changes_and_sends_nothing(bridge_env, sim):
    result = run_cli(bridge_env, "sync", "--dry-run")
    assert result.returncode == 0, result
    lines = result.stdout.strip().splitlines()
    assert any(line.startswith(f"{SWITCH} ") and "stock 0 -> 25" in line and "activate" in line for line in lines)
    assert any(line.startswith(f"{SKYLINES} ") for line in lines)
    assert lines[-1] == "dry run: 2 changes planned for 2 products, nothing sent"
    assert sim.g2a.patches == []


def test_sync_sends_the_changes_once(bridge_env, sim):
    result = run_cli(bridge_env, "sync")
    assert result.returncode == 0, result
    assert result.stdout.strip().splitlines()[-1] == "2 products: 2 writes sent, 0 failed, 0 price cuts deferred"
    assert sim.g2a.offer_for_product(str(SWITCH))["active"]
    again = run_cli(bridge_env, "sync", "--dry-run")
    assert again.stdout.strip() == "dry run: 0 changes planned for 2 products, nothing sent"


def test_sync_exits_1_when_g2a_refuses_every_write(bridge_env, sim):
    sim.g2a.fail_next("/v3/sales/offers/", 403, 403)
    result = run_cli(bridge_env, "sync")
    assert_clean_failure(result, 1)
    assert "2 failed" in result.stdout


# ---- orders, order, retry ------------------------------------------------------------------------


def test_orders_lists_the_newest_first_and_filters_by_state(bridge_env, running):
    first, second = buy(running), buy(running, SKYLINES)
    listed = run_cli(bridge_env, "orders").stdout.splitlines()
    assert [line.split()[2] for line in listed[:2]] == [second["order_id"], first["order_id"]]
    assert listed[-1] == "2 orders"
    assert run_cli(bridge_env, "orders", "--state", "failed").stdout.strip() == "0 orders in state failed"
    assert run_cli(bridge_env, "orders", "--limit", "1").stdout.splitlines()[-1] == "1 orders"


def test_order_masks_the_key_unless_reveal(bridge_env, running):
    order = buy(running)
    key = order["stock"][0]["inventory"][0]["value"]
    masked = run_cli(bridge_env, "order", order["order_id"])
    assert masked.returncode == 0
    assert key not in masked.stdout
    assert key[:4] in masked.stdout and "****" in masked.stdout
    assert re.search(r"^state\s+completed$", masked.stdout, re.M)
    revealed = run_cli(bridge_env, "order", order["order_id"], "--reveal")
    assert key in revealed.stdout


def test_an_unknown_order_is_one_error_line_and_a_traceback_only_with_verbose(bridge_env, web):
    result = run_cli(bridge_env, "order", "no-such-order")
    assert_clean_failure(result, 1)
    assert len(result.stderr.strip().splitlines()) == 1 and "not found" in result.stderr
    verbose = run_cli(bridge_env, "--verbose", "order", "no-such-order")
    assert verbose.returncode == 1 and "Traceback" in verbose.stderr


def test_retry_re_drives_a_failed_order_without_buying_twice(bridge_env, running, sim):
    sim.cws.set_fulfilment(SWITCH_CWS, "balance")
    _, g2a_order_id = order(running)
    wait_for(lambda: str(g2a_order_id) in run_cli(bridge_env, "orders", "--state", "failed").stdout)
    order_id = run_cli(bridge_env, "orders", "--state", "failed").stdout.split()[2]
    sim.cws.set_fulfilment(SWITCH_CWS, "instant")
    retried = run_cli(bridge_env, "retry", order_id)
    assert retried.returncode == 0, retried
    assert retried.stdout.startswith(f"order {order_id}: completed")
    assert len(sim.cws.orders_for_client_id(f"g2a-{g2a_order_id}")) == 1


def test_retry_refuses_an_order_that_is_not_failed(bridge_env, running):
    order = buy(running)
    result = run_cli(bridge_env, "retry", order["order_id"])
    assert_clean_failure(result, 1)
    assert "is completed, not failed" in result.stderr


# ---- credentials, simulate, demo -----------------------------------------------------------------


def test_credentials_prints_a_fresh_pair_every_time(bridge_env):
    first, second = run_cli({}, "credentials"), run_cli({}, "credentials")
    assert first.returncode == 0
    pairs = [dict(line.split("=", 1) for line in result.stdout.splitlines()) for result in (first, second)]
    assert set(pairs[0]) == {"OUR_API_CLIENT_ID", "OUR_API_CLIENT_SECRET"}
    assert pairs[0] != pairs[1] and len(pairs[0]["OUR_API_CLIENT_SECRET"]) >= 32


def test_simulate_serves_both_fakes_until_sigterm(tmp_path):
    cws_port, g2a_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG")}
    process = subprocess.Popen([sys.executable, "-m", "bridge", "simulate", "--cws-port", str(cws_port),
                                "--g2a-port", str(g2a_port)], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: _answers(f"http://127.0.0.1:{cws_port}/oauth/token"))
        assert _answers(f"http://127.0.0.1:{g2a_port}/oauth/token")
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(10) == 0


def test_demo_plays_a_sale_and_exits_0_within_60_seconds():
    result = run_cli({}, "demo", timeout=90)
    assert result.returncode == 0, result
    assert "every step worked" in result.stdout
    assert int(re.search(r"demo finished in (\d+) s", result.stdout)[1]) < 60


def test_demo_serve_prints_curl_lines_that_order_a_key_and_read_the_inventory():
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG")}
    demo = subprocess.Popen([sys.executable, "-m", "bridge", "demo", "--serve"], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    watchdog = threading.Timer(150, demo.kill)
    watchdog.start()
    try:
        lines = []
        for line in demo.stdout:
            if line.startswith("Try") or lines:
                lines.append(line)
            if line.startswith("(each new order"):
                break
        commands = [line.strip() for line in lines if line.startswith("  ")]
        assert any("/order " in command for command in commands) and any("/inventory" in c for c in commands)
        script = "".join(f"{command}\necho\n" for command in commands[:4])  # each answer on a line of its own
        tried = subprocess.run(["bash", "-ec", script], capture_output=True, text=True, timeout=60)
        assert tried.returncode == 0, tried.stderr
        order_answer, inventory_answer = [line for line in tried.stdout.splitlines() if line]
        key = json.loads(order_answer)["stock"][0]["inventory"][0]["value"]
        assert key.startswith("SIM-") and json.loads(inventory_answer)[0]["inventory"][0]["value"] == key
    finally:
        watchdog.cancel()
        demo.send_signal(signal.SIGINT)
        demo.wait(30)


def _answers(url):
    try:
        return requests.post(url, timeout=1).status_code in (400, 401)
    except requests.ConnectionError:
        return False


# ---- what status asks the operator to look at (in-process, figures only) --------------------------


def test_status_lists_what_needs_attention(database):
    now = db.utcnow()
    settings = Settings(cws_low_balance=Decimal("50"), sync_interval=15)
    db.Reservation.create(id="r1", expires_at=now)
    db.Order.create(id="o1", reservation="r1", g2a_order_id=1, state=db.FAILED, cws_client_order_id="g2a-1")
    db.put_setting(status.BALANCE_KEY, "12.50")
    db.put_setting(status.SYNC_KEY, '{"writes": 0, "failed": 0}')
    db.Setting.update(updated_at=now - timedelta(minutes=5)).where(db.Setting.key == status.SYNC_KEY).execute()
    db.Lease.create(name="worker", holder="h:1:x", expires_at=now, heartbeat_at=now - timedelta(minutes=2))
    figures = status.collect(settings, now)
    assert figures["orders"]["failed"] == 1 and figures["cws_balance"]["low"]
    text = status.render(figures)
    for needle in ("! worker is not running", "! 1 paid orders without keys (oldest 0 s): g2a-bridge order o1 says",
                   "! last sync pass was 5 min ago", "! CWS balance 12.50 EUR is below CWS_LOW_BALANCE 50"):
        assert needle in text


def test_status_reports_a_refused_products_json_until_a_good_one_is_loaded(database, tmp_path):
    path = tmp_path / "products.json"
    path.write_text('{"products": [{"cws_product_id": "not-a-uuid", "g2a_product_id": 1}]}')
    watcher = MappingWatcher(path, Decimal("0.50"), Decimal("0.15"))
    db.Lease.create(name="worker", holder="h:1:x", expires_at=db.utcnow(), heartbeat_at=db.utcnow())
    watcher.poll()
    figures = status.collect(Settings(), db.utcnow())
    assert figures["products_refused"]["file"] == str(path)
    text = status.render(figures)
    assert "all good" not in text
    assert f"! {path} is refused, the previous mapping stays in force: " in text and "cws_product_id" in text
    path.write_text(json.dumps({"products": DEMO}))
    watcher.poll()
    figures = status.collect(Settings(), db.utcnow())
    assert figures["products_refused"] is None and figures["attention"] == []


def published(process, spend):
    """Metrics of a `process` whose budgets spent `spend` ({class: requests}) and got one 429 each, published."""
    metrics = Metrics(process)
    budgets = budgets_for(Settings(), process, alarm=lambda *args: None)
    metrics.watch_budgets(budgets)
    for name, count in spend.items():
        for _ in range(count):
            budgets[name].acquire()
        budgets[name].throttled(retry_after=0)
    metrics.publish()


def test_status_shows_the_budget_use_and_429s_per_class_of_the_worker_and_of_the_web(database):
    published("worker", {"cws_list": 1})
    published("web", {"cws_product": 2})
    figures = status.collect(Settings(), db.utcnow())
    worker, web = figures["upstream_budgets"]["worker"], figures["upstream_budgets"]["web"]
    assert worker["cws_list"] == {"used": 1, "limit": 360, "throttled": 1}
    assert worker["cws_order"] == {"used": 0, "limit": None, "throttled": 0}
    assert web["cws_product"] == {"used": 2, "limit": 243, "throttled": 1}
    assert web["cws_list"] == {"used": 0, "limit": 0, "throttled": 0}
    screen = status.render(figures)
    assert "worker budget  cws_order 0/-, cws_token 0/18, cws_list 1/360 (1x429)," in screen
    assert "web budget     cws_order 0/-, cws_token 0/18, cws_list 0/0, cws_product 2/243 (1x429)," in screen
    assert figures["attention"] == ["worker is not running: systemctl start g2a-bridge-worker (or g2a-bridge worker)"]


def test_status_of_an_empty_database_is_honest(database):
    figures = status.collect(Settings(), db.utcnow())
    assert figures["last_sync"] is None and figures["cws_balance"] is None and figures["worker"] is None
    assert figures["attention"] == ["worker is not running: systemctl start g2a-bridge-worker (or g2a-bridge worker)"]


# ---- doctor: budgets and the freshness to expect (in-process) -------------------------------------


def mapping_of(tmp_path, count):
    products = [{"cws_product_id": f"00000000-0000-4000-8000-{n:012d}", "g2a_product_id": 10 ** 13 + n}
                for n in range(count)]
    write_products(tmp_path / "many.json", products)
    return tmp_path / "many.json"


@pytest.mark.parametrize("mapped, requests, warned", [(2, 1, False), (10_000, 20, False), (50_000, 100, False),
                                                       (200_000, 400, True)])
def test_doctor_says_how_long_a_sweep_of_the_mapped_set_takes_and_warns_past_five_minutes(
        database, tmp_path, mapped, requests, warned):
    settings = Settings(products_file=mapping_of(tmp_path, mapped))
    result = doctor.check_freshness(settings, database_ok=True)
    assert result.ok and result.warning == warned
    assert f"{mapped} mapped products: one sweep is {requests} GET /v3/products" in result.line()
    assert result.line().startswith("WARN" if warned else "ok  ")


def test_the_sweep_estimate_uses_what_the_last_catalogue_listing_cost(database, tmp_path):
    db.put_setting(LISTING_KEY, json.dumps({"products": 10_000, "pages": 100, "at": "2026-01-01T00:00:00+00:00"}))
    settings = Settings(products_file=mapping_of(tmp_path, 10_000))
    assert "one sweep is 100 GET /v3/products" in doctor.check_freshness(settings, database_ok=True).detail
    assert doctor.sweep_cost(10_000, {"pages": 100}, 0.5) == (100, 200.0)
    assert doctor.sweep_cost(120, None, 1.0) == (3, 3.0)  # productIds batches of 50
    assert doctor.sweep_cost(120, {"pages": 1}, 1.0) == (1, 1.0)


def test_a_lower_list_limit_makes_doctor_warn(database, tmp_path):
    settings = Settings(products_file=mapping_of(tmp_path, 50_000), cws_list_per_10_min=100)
    result = doctor.check_freshness(settings, database_ok=True)
    assert result.warning and "CWS_LIST_REQUESTS_PER_10_MIN" in result.line()


def test_doctor_shows_the_workers_budget_use(database):
    assert doctor.check_budgets(True).detail == "worker: unknown (the worker publishes it every 5 s)"
    metrics = Metrics("worker")
    metrics.watch_budgets(budgets_for(Settings(), "worker"))
    metrics.publish()
    assert "cws_list 0/360" in doctor.check_budgets(True).line()
