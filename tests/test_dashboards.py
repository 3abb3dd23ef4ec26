"""contrib/: the Grafana dashboard and the Prometheus alert rules name only series a running bridge exports
(compared with a live /metrics scrape of the real web and worker), and both files parse."""
import json
import re

import requests
import yaml
from conftest import ROOT
from polling import wait_for
from test_orders_e2e import buy

DASHBOARD = ROOT / "contrib" / "grafana" / "g2a-bridge.json"
ALERTS = ROOT / "contrib" / "prometheus" / "alerts.yml"
SERIES = re.compile(r"\bg2a_bridge_[a-z0-9_]+")
SUFFIXES = {"histogram": ("_bucket", "_count", "_sum"), "summary": ("_count", "_sum")}


def dashboard_expressions():
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [target["expr"] for panel in panels for target in panel["targets"]]


def alert_expressions():
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule["expr"] for group in groups for rule in group["rules"]]


def exported_series(text):
    """Every series name a scrape can hold: each family's name, with the suffixes of its type."""
    names = set()
    for name, kind in re.findall(r"^# TYPE (\S+) (\S+)$", text, re.MULTILINE):
        names.add(name)
        names.update(name + suffix for suffix in SUFFIXES.get(kind, ()))
    return names


def test_both_files_parse_and_every_panel_and_rule_has_an_expression():
    assert len(dashboard_expressions()) >= 10 and all(dashboard_expressions())
    rules = yaml.safe_load(ALERTS.read_text())["groups"][0]["rules"]
    assert all(rule["alert"] and rule["expr"] and rule["annotations"]["summary"] for rule in rules)


def test_every_series_the_dashboard_and_the_alerts_name_is_in_a_live_scrape(start_bridge):
    web, worker = start_bridge("web"), start_bridge("worker")
    wait_for(lambda: "sync.full_pass" in worker.logs())
    buy(web.g2a, g2a_order_id=80201000000777)
    scrapes = []

    def scraped_with_the_worker():  # the worker hands its series to the web with its heartbeat, every 5 s
        scrapes.append(requests.get(f"{web.g2a.base_url}/metrics", timeout=5).text)
        return 'process="worker"' in scrapes[-1]

    wait_for(scraped_with_the_worker, timeout=15, what="the worker's series in /metrics")
    exported = exported_series(scrapes[-1])
    named = {name for expr in dashboard_expressions() + alert_expressions() for name in SERIES.findall(expr)}
    assert named and named <= exported, f"not exported: {sorted(named - exported)}"
