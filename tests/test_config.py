"""Settings: every documented variable is read, aliases and ENV_FILE work, all problems at once, secrets hidden."""
import io
import re
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import pytest

from bridge.config import load_environment, load_settings
from bridge.errors import ConfigError

OPERATOR_MD = Path(__file__).resolve().parent.parent.parent / "shared" / "OPERATOR.md"
REQUIRED = {"OUR_API_CLIENT_ID": "our-id", "OUR_API_CLIENT_SECRET": "our-secret-0123456789",
            "CWS_CLIENT_ID": "cws-id", "CWS_CLIENT_SECRET": "cws-secret-0123456789",
            "G2A_API_KEY": "g2a-key", "G2A_API_SECRET": "g2a-secret-0123456789"}

# variable -> (a non-default value, the Settings attribute, what it becomes)
DOCUMENTED = {
    "OUR_API_CLIENT_ID": ("id-2", "our_client_id", "id-2"),
    "OUR_API_CLIENT_SECRET": ("secret-2-abcdef", "our_client_secret", "secret-2-abcdef"),
    "OUR_API_EXTRA_CLIENTS": ("a:one-secret,b:two-secret", "extra_clients", (("a", "one-secret"), ("b", "two-secret"))),
    "METRICS_CLIENTS": ("prom:scrape-secret", "metrics_clients", (("prom", "scrape-secret"),)),
    "CWS_CLIENT_ID": ("cws-2", "cws_client_id", "cws-2"),
    "CWS_CLIENT_SECRET": ("$2a$10$cws", "cws_client_secret", "$2a$10$cws"),
    "CWS_CLIENT_SIGNATURE": ("signature-2", "cws_client_signature", "signature-2"),
    "CWS_API_BASE_URL": ("https://sandbox.codeswholesale.com/", "cws_base_url", "https://sandbox.codeswholesale.com"),
    "G2A_API_KEY": ("g2a-2", "g2a_api_key", "g2a-2"),
    "G2A_API_SECRET": ("g2a-secret-2", "g2a_api_secret", "g2a-secret-2"),
    "G2A_ENV": ("sandbox", "g2a_env", "sandbox"),
    "G2A_API_BASE_URL": ("https://eu.g2a.com", "g2a_base_url", "https://eu.g2a.com"),
    "G2A_TIMEOUT_MS": ("1500", "g2a_timeout", 1.5),
    "CWS_TIMEOUT_MS": ("2500", "cws_timeout", 2.5),
    "G2A_RETRY_MAX": ("4", "g2a_retry_max", 4),
    "CWS_RETRY_MAX": ("0", "cws_retry_max", 0),
    "HOST": ("0.0.0.0", "host", "0.0.0.0"),
    "PORT": ("8123", "port", 8123),
    "WEB_THREADS": ("3", "web_threads", 3),
    "DATABASE_URL": ("postgresql://bridge:pw@db/bridge", "database_url", "postgresql://bridge:pw@db/bridge"),
    "PRODUCTS_FILE": ("/etc/g2a-bridge/products.json", "products_file", Path("/etc/g2a-bridge/products.json")),
    "BRIDGE_SECRET_KEY": ("a-passphrase-for-keys", "bridge_secret_key", "a-passphrase-for-keys"),
    "SERVICE_ENABLED": ("false", "service_enabled", False),
    "SYNC_INTERVAL_SECONDS": ("2.5", "sync_interval", 2.5),
    "DEFAULT_FIXED_PROFIT": ("1.25", "default_fixed_profit", Decimal("1.25")),
    "DEFAULT_G2A_FEE_PERCENTAGE": ("0.1", "default_fee", Decimal("0.1")),
    "CWS_TARGET_CURRENCY": ("eur", "currency", "EUR"),
    "RESERVATION_TTL_MINUTES": ("0.05", "reservation_ttl", 3.0),
    "ORDER_INLINE_WAIT_SECONDS": ("2", "order_inline_wait", 2.0),
    "CWS_POLL_MAX_SECONDS": ("60", "cws_poll_max", 60.0),
    "CWS_LOW_BALANCE": ("12.50", "cws_low_balance", Decimal("12.50")),
    "ALERT_WEBHOOK_URL": ("https://hooks.slack.com/services/T0/B0/xyz", "alert_webhook_url",
                          "https://hooks.slack.com/services/T0/B0/xyz"),
    "LOG_LEVEL": ("debug", "log_level", "DEBUG"),
    "LOG_FORMAT": ("json", "log_format", "json"),
    "CWS_ALLOW_PREORDER": ("true", "cws_allow_preorder", True),
    "STOCK_MAX_AGE_SECONDS": ("0.5", "stock_max_age", 0.5),
    "G2A_REQUESTS_PER_MINUTE": ("120", "g2a_requests_per_minute", 120),
    "CWS_LIST_REQUESTS_PER_10_MIN": ("200", "cws_list_per_10_min", 200),
    "CWS_PRODUCT_REQUESTS_PER_5_MIN": ("300", "cws_product_per_5_min", 300),
    "CWS_TOKEN_REQUESTS_PER_5_MIN": ("25", "cws_token_per_5_min", 25),
    "UPSTREAM_BUDGET_SHARE": ("0.5", "upstream_budget_share", 0.5),
    "CWS_RESEND_GRACE_SECONDS": ("90", "cws_resend_grace", 90.0),
    "G2A_CREATE_OFFERS": ("yes", "g2a_create_offers", True),
    "PRICE_CHANGES_PER_HOUR": ("3", "price_changes_per_hour", 3),
}
EXTRAS = {}  # variables the bridge reads beyond OPERATOR.md's table (none today)


@pytest.fixture
def env(tmp_path):
    """The required variables, and an empty ENV_FILE so no stray .env is read."""
    (tmp_path / "empty.env").write_text("")
    return {**REQUIRED, "ENV_FILE": str(tmp_path / "empty.env")}


def documented_variables():
    if not OPERATOR_MD.exists():
        pytest.skip(f"{OPERATOR_MD} not found (shared/ sits beside the clone in CI)")
    table = OPERATOR_MD.read_text().split("\n## Configuration")[1].split("\n## ")[0]
    first_cells = [line.split("|")[1] for line in table.splitlines() if line.startswith("| `")]
    return {name for cell in first_cells for name in re.findall(r"`([A-Z][A-Z0-9_]+)`", cell)}


def problems(environ):
    with pytest.raises(ConfigError) as caught:
        load_settings(environ)
    return caught.value.problems


def test_the_table_here_covers_every_variable_operator_md_documents():
    assert documented_variables() == set(DOCUMENTED)


@pytest.mark.parametrize("name", sorted({**DOCUMENTED, **EXTRAS}))
def test_each_variable_is_read_into_the_settings(env, name):
    value, attribute, expected = {**DOCUMENTED, **EXTRAS}[name]
    if name not in ONE_VALUE:
        assert getattr(load_settings(env), attribute) != expected
    assert getattr(load_settings({**env, name: value}), attribute) == expected


ONE_VALUE = {"CWS_TARGET_CURRENCY"}  # accepted only as its default (any spelling); anything else is refused


def test_a_currency_other_than_eur_is_refused_rather_than_used_as_a_label(env):
    assert problems({**env, "CWS_TARGET_CURRENCY": "gbp"}) == [
        "CWS_TARGET_CURRENCY: only EUR is supported, got 'GBP': CWS prices carry no currency and G2A offers are "
        "priced in EUR, so the bridge cannot convert; use a CWS account billed in EUR"]


def test_the_defaults_are_the_documented_ones(env):
    settings = load_settings(env)
    assert (settings.host, settings.port, settings.web_threads) == ("127.0.0.1", 3000, 8)
    assert settings.cws_base_url == "https://api.codeswholesale.com"
    assert settings.g2a_base_url == "https://api.g2a.com"
    assert (settings.g2a_timeout, settings.cws_timeout, settings.g2a_retry_max) == (8.0, 8.0, 2)
    assert settings.database_url == "sqlite:///data/bridge.db"
    assert settings.products_file == Path("products.json")
    assert (settings.sync_interval, settings.reservation_ttl, settings.cws_poll_max) == (15.0, 1800.0, 420.0)
    assert (settings.default_fixed_profit, settings.default_fee) == (Decimal("0.50"), Decimal("0.15"))
    assert (settings.cws_low_balance, settings.currency, settings.service_enabled) == (Decimal("50"), "EUR", True)
    assert (settings.log_level, settings.log_format, settings.alert_webhook_url) == ("INFO", "text", "")


def test_g2a_env_sandbox_picks_the_sandbox_url_unless_one_is_given(env):
    assert load_settings({**env, "G2A_ENV": "sandbox"}).g2a_base_url == "https://sandboxapi.g2a.com"
    given = {**env, "G2A_ENV": "sandbox", "G2A_API_BASE_URL": "https://other.g2a.com"}
    assert load_settings(given).g2a_base_url == "https://other.g2a.com"


def test_g2a_api_hash_and_g2a_api_url_are_accepted_as_aliases(env):
    environ = {k: v for k, v in env.items() if k != "G2A_API_SECRET"}
    settings = load_settings({**environ, "G2A_API_HASH": "hash-value", "G2A_API_URL": "https://sandboxapi.g2a.com"})
    assert settings.g2a_api_secret == "hash-value"
    assert settings.g2a_base_url == "https://sandboxapi.g2a.com"


def test_the_canonical_name_wins_over_its_alias(env):
    settings = load_settings({**env, "G2A_API_HASH": "old", "G2A_API_URL": "https://old.g2a.com",
                              "G2A_API_BASE_URL": "https://new.g2a.com"})
    assert settings.g2a_api_secret == REQUIRED["G2A_API_SECRET"]
    assert settings.g2a_base_url == "https://new.g2a.com"


def test_env_file_is_read_and_the_real_environment_wins_over_it(tmp_path):
    env_file = tmp_path / "bridge.env"
    lines = [f"{name}={value}" for name, value in REQUIRED.items()]
    env_file.write_text("\n".join(lines + ["PORT=4000", "CWS_CLIENT_SECRET='$2a$10$quoted'"]) + "\n")
    settings = load_settings({"ENV_FILE": str(env_file), "PORT": "5000"})
    assert settings.port == 5000
    assert settings.cws_client_secret == "$2a$10$quoted"
    assert settings.our_client_id == "our-id"


def test_a_dot_env_in_the_working_directory_is_read_unless_env_file_points_elsewhere(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text("\n".join(f"{k}={v}" for k, v in REQUIRED.items()) + "\nPORT=4100\n")
    assert load_settings({}).port == 4100
    (tmp_path / "other.env").write_text("\n".join(f"{k}={v}" for k, v in REQUIRED.items()) + "\nPORT=4200\n")
    assert load_settings({"ENV_FILE": str(tmp_path / "other.env")}).port == 4200


class Terminal(io.StringIO):
    """Standard input left on a terminal: nothing was redirected."""

    def isatty(self):
        return True


def test_env_file_dash_reads_the_file_from_standard_input_with_the_same_parser():
    stdin = io.StringIO("PORT=4300  # behind Caddy\nCWS_CLIENT_SECRET='$2a$10$quoted'\n")
    env = load_environment({"ENV_FILE": "-", "LOG_LEVEL": "DEBUG"}, stdin=stdin)
    assert (env["PORT"], env["CWS_CLIENT_SECRET"], env["LOG_LEVEL"]) == ("4300", "$2a$10$quoted", "DEBUG")
    # Read once: a second load in the same process gets the same values, not the empty rest of the stream.
    assert load_environment({"ENV_FILE": "-"}, stdin=stdin)["PORT"] == "4300"


def test_env_file_dash_with_nothing_redirected_is_a_config_error_not_a_wait_for_typing():
    with pytest.raises(ConfigError) as raised:
        load_environment({"ENV_FILE": "-"}, stdin=Terminal())
    assert raised.value.problems == [
        "ENV_FILE: - means the file comes on standard input, and nothing was redirected there"]


def test_a_process_started_with_env_file_dash_reads_the_file_redirected_to_it(tmp_path):
    env_file = tmp_path / "bridge.env"
    env_file.write_text("\n".join(f"{k}={v}" for k, v in REQUIRED.items()) + "\nPORT=4400  # note\n")
    with open(env_file) as stdin:
        result = subprocess.run([sys.executable, "-c", "from bridge.config import load_settings; "
                                 "print(load_settings().port)"], stdin=stdin, capture_output=True, text=True,
                                env={"ENV_FILE": "-"}, cwd=Path(__file__).resolve().parent.parent, timeout=30)
    assert (result.returncode, result.stdout.strip()) == (0, "4400"), result.stderr


def test_a_missing_env_file_is_a_config_error(tmp_path):
    assert problems({"ENV_FILE": str(tmp_path / "nope.env")}) == [
        f"ENV_FILE: {tmp_path / 'nope.env'} does not exist or is not a file"]


def test_every_problem_is_listed_at_once(tmp_path):
    (tmp_path / "empty.env").write_text("")
    found = problems({"ENV_FILE": str(tmp_path / "empty.env"), "PORT": "eighty", "LOG_FORMAT": "xml",
                      "DEFAULT_G2A_FEE_PERCENTAGE": "1.5", "SYNC_INTERVAL_SECONDS": "0.2",
                      "DATABASE_URL": "mysql://x", "SERVICE_ENABLED": "maybe"})
    named = {problem.split(":")[0] for problem in found}
    assert named == {*REQUIRED, "PORT", "LOG_FORMAT", "DEFAULT_G2A_FEE_PERCENTAGE", "SYNC_INTERVAL_SECONDS",
                     "DATABASE_URL", "SERVICE_ENABLED"}
    assert "OUR_API_CLIENT_ID: is required but not set" in found


@pytest.mark.parametrize("name, url", [
    ("CWS_API_BASE_URL", "http://api.codeswholesale.com"),
    ("CWS_API_BASE_URL", "https://api.codeswholesale.com.evil.example"),
    ("CWS_API_BASE_URL", "https://example.com"),
    ("G2A_API_BASE_URL", "http://api.g2a.com"),
    ("G2A_API_BASE_URL", "https://notg2a.com"),
    ("G2A_API_BASE_URL", "http://10.0.0.5:8082"),
    ("ALERT_WEBHOOK_URL", "http://hooks.example.com/alert"),
    ("ALERT_WEBHOOK_URL", "not a url"),
])
def test_outbound_urls_must_be_https_on_the_expected_hosts(env, name, url):
    assert [problem.split(":")[0] for problem in problems({**env, name: url})] == [name]


@pytest.mark.parametrize("name, url", [
    ("CWS_API_BASE_URL", "http://127.0.0.1:8081"),
    ("CWS_API_BASE_URL", "https://sandbox.codeswholesale.com"),
    ("G2A_API_BASE_URL", "http://localhost:8082"),
    ("G2A_API_BASE_URL", "http://[::1]:8082"),
    ("ALERT_WEBHOOK_URL", "https://hooks.example.com/any/path"),
    ("ALERT_WEBHOOK_URL", "http://127.0.0.1:9999/hook"),
])
def test_plain_http_is_accepted_only_on_loopback(env, name, url):
    load_settings({**env, name: url})


def test_repr_never_shows_a_secret(env):
    secrets = {"OUR_API_CLIENT_SECRET": "s1-our-secret", "CWS_CLIENT_SECRET": "s2-cws-secret",
               "CWS_CLIENT_SIGNATURE": "s3-signature", "G2A_API_SECRET": "s4-g2a-secret",
               "BRIDGE_SECRET_KEY": "s5-secret-key", "ALERT_WEBHOOK_URL": "https://hooks.example.com/s6-hook",
               "OUR_API_EXTRA_CLIENTS": "rotated:s7-extra-secret"}
    settings = load_settings({**env, **secrets})
    shown = repr(settings) + str(settings)
    for value in secrets.values():
        assert value.split(":")[-1].split("/")[-1] not in shown
    assert set(settings.secrets()) >= {"s1-our-secret", "s2-cws-secret", "s4-g2a-secret", "s7-extra-secret"}

