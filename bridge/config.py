"""Settings: built once from the environment (and .env / ENV_FILE), validated all at once, passed in.

Nothing else in the bridge reads os.environ. Every problem is collected so the operator
fixes the whole file in one go; secrets never appear in a repr.
"""
import dataclasses
import functools
import ipaddress
import os
import re
import sys
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from urllib.parse import urlsplit

from dotenv import dotenv_values
from urllib3.exceptions import LocationParseError
from urllib3.util import parse_url

from .errors import ConfigError

REQUIRED = ("OUR_API_CLIENT_ID", "OUR_API_CLIENT_SECRET", "CWS_CLIENT_ID", "CWS_CLIENT_SECRET",
            "G2A_API_KEY", "G2A_API_SECRET")
ALIASES = {"G2A_API_SECRET": "G2A_API_HASH", "G2A_API_BASE_URL": "G2A_API_URL"}
STDIN = "-"  # ENV_FILE=-: the file comes on standard input (README, "Without systemd")
G2A_BASE_URLS = {"live": "https://api.g2a.com", "sandbox": "https://sandboxapi.g2a.com"}
CWS_HOSTS = ("codeswholesale.com",)
G2A_HOSTS = ("g2a.com",)
_URL_ODDITY = re.compile(r"[^\x21-\x7e]|[\\@]")  # outside printable ASCII (spaces too), a backslash, userinfo
_HOST = re.compile(r"[a-z0-9.-]+|[0-9a-f:.]+")  # a DNS name or an IP address, nothing percent-encoded


def secret(default=""):
    """A settings field kept out of repr(), so a logged Settings never shows it."""
    return field(default=default, repr=False)


@dataclass(frozen=True)
class Settings:
    our_client_id: str = ""
    our_client_secret: str = secret()
    extra_clients: tuple = secret(())
    metrics_clients: tuple = secret(())
    cws_client_id: str = ""
    cws_client_secret: str = secret()
    cws_client_signature: str = secret()
    cws_base_url: str = "https://api.codeswholesale.com"
    cws_allow_preorder: bool = False
    g2a_api_key: str = ""
    g2a_api_secret: str = secret()
    g2a_env: str = "live"
    g2a_base_url: str = "https://api.g2a.com"
    g2a_timeout: float = 8.0
    cws_timeout: float = 8.0
    g2a_retry_max: int = 2
    cws_retry_max: int = 2
    g2a_requests_per_minute: int = 600
    cws_list_per_10_min: int = 400
    cws_product_per_5_min: int = 600
    cws_token_per_5_min: int = 50
    upstream_budget_share: float = 0.9
    cws_resend_grace: float = 150.0
    g2a_create_offers: bool = False
    price_changes_per_hour: int = 5
    host: str = "127.0.0.1"
    port: int = 3000
    web_threads: int = 8
    database_url: str = "sqlite:///data/bridge.db"
    products_file: Path = Path("products.json")
    bridge_secret_key: str = secret()
    service_enabled: bool = True
    sync_interval: float = 15.0
    stock_max_age: float = 5.0
    default_fixed_profit: Decimal = Decimal("0.50")
    default_fee: Decimal = Decimal("0.15")
    currency: str = "EUR"
    reservation_ttl: float = 1800.0
    order_inline_wait: float = 5.0
    cws_poll_max: float = 420.0
    cws_low_balance: Decimal = Decimal("50")
    alert_webhook_url: str = secret()
    log_level: str = "INFO"
    log_format: str = "text"

    def secrets(self):
        """Every configured secret value, for the log masker."""
        values = [self.our_client_secret, self.cws_client_secret, self.cws_client_signature,
                  self.g2a_api_secret, self.bridge_secret_key, self.alert_webhook_url]
        values += [pair_secret for _, pair_secret in self.extra_clients + self.metrics_clients]
        return [v for v in values if v]

    def api_clients(self):
        """The (client_id, client_secret) pairs G2A may use to call us."""
        return ((self.our_client_id, self.our_client_secret),) + tuple(self.extra_clients)

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)


def load_environment(environ=None, cwd=None, stdin=None):
    """The process environment layered over ENV_FILE (or ./.env): the real environment wins. ENV_FILE=- reads the
    file from standard input (`stdin`, else sys.stdin), so a process may get a file only root can open."""
    environ = dict(os.environ if environ is None else environ)
    if environ.get("ENV_FILE") == STDIN:
        from_file = _read_stream(stdin or sys.stdin)
    else:
        from_file = _read_file(environ.get("ENV_FILE"), cwd)
    return {**{k: v for k, v in from_file.items() if v is not None}, **environ}


def _read_file(named, cwd):
    env_file = named or str(Path(cwd or ".") / ".env")
    if named and not Path(env_file).is_file():
        raise ConfigError([f"ENV_FILE: {env_file} does not exist or is not a file"])
    return dotenv_values(env_file) if Path(env_file).is_file() else {}


@functools.lru_cache(maxsize=None)
def _read_stream(stream):
    """A stream is read once; a second load_settings in the same process gets the same values, not an empty rest."""
    if stream is None or stream.isatty():
        raise ConfigError(["ENV_FILE: - means the file comes on standard input, and nothing was redirected there"])
    return dotenv_values(stream=stream)


def load_settings(environ=None, require_credentials=True):
    """Build Settings from a mapping of variables; raise ConfigError listing every problem."""
    env = load_environment(environ)
    reader = _Reader(env)
    settings = reader.build(require_credentials)
    if reader.problems:
        raise ConfigError(reader.problems)
    return settings


class _Reader:
    """Reads and checks variables one by one, collecting problems instead of stopping at the first."""

    def __init__(self, env):
        self.env = env
        self.problems = []

    def raw(self, name, default=""):
        value = self.env.get(name)
        if (value is None or value == "") and name in ALIASES:
            value = self.env.get(ALIASES[name])
        return default if value is None or value.strip() == "" else value.strip()

    def problem(self, name, why):
        self.problems.append(f"{name}: {why}")

    def required(self, name, check):
        value = self.raw(name)
        if check and not value:
            self.problem(name, "is required but not set")
        return value

    def number(self, name, default, kind, minimum=None, below=None, maximum=None):
        text = self.raw(name, str(default))
        try:
            value = kind(text)
        except (ValueError, InvalidOperation):
            self.problem(name, f"must be a number, got {text!r}")
            return kind(default)
        if ((minimum is not None and value < minimum) or (below is not None and value >= below)
                or (maximum is not None and value > maximum)):
            bounds = (f"in [{minimum}, {below})" if below is not None else f"in [{minimum}, {maximum}]"
                      if maximum is not None else f">= {minimum}")
            self.problem(name, f"must be {bounds}, got {text}")
            return kind(default)
        return value

    def boolean(self, name, default):
        text = self.raw(name, "true" if default else "false").lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
        self.problem(name, f"must be true or false, got {text!r}")
        return default

    def choice(self, name, default, choices):
        value = self.raw(name, default).lower()
        if value not in choices:
            self.problem(name, f"must be one of {', '.join(choices)}, got {value!r}")
            return default
        return value

    def url(self, name, default, hosts, allow_empty=False):
        value = self.raw(name, default).rstrip("/")
        if allow_empty and not value:
            return ""
        why = outbound_url_problem(value, hosts)
        if why:
            self.problem(name, why)
        return value

    def client_pairs(self, name):
        pairs = []
        for item in filter(None, (p.strip() for p in self.raw(name).split(","))):
            client_id, sep, client_secret = item.partition(":")
            if not (sep and client_id and client_secret):
                self.problem(name, "must be a comma-separated list of id:secret pairs")
                continue
            pairs.append((client_id, client_secret))
        return tuple(pairs)

    def build(self, require_credentials):
        g2a_env = self.choice("G2A_ENV", "live", ("live", "sandbox"))
        return Settings(
            our_client_id=self.required("OUR_API_CLIENT_ID", require_credentials),
            our_client_secret=self.required("OUR_API_CLIENT_SECRET", require_credentials),
            extra_clients=self.client_pairs("OUR_API_EXTRA_CLIENTS"),
            metrics_clients=self.client_pairs("METRICS_CLIENTS"),
            cws_client_id=self.required("CWS_CLIENT_ID", require_credentials),
            cws_client_secret=self.required("CWS_CLIENT_SECRET", require_credentials),
            cws_client_signature=self.raw("CWS_CLIENT_SIGNATURE"),
            cws_base_url=self.url("CWS_API_BASE_URL", "https://api.codeswholesale.com", CWS_HOSTS),
            cws_allow_preorder=self.boolean("CWS_ALLOW_PREORDER", False),
            g2a_api_key=self.required("G2A_API_KEY", require_credentials),
            g2a_api_secret=self.required("G2A_API_SECRET", require_credentials),
            g2a_env=g2a_env,
            g2a_base_url=self.url("G2A_API_BASE_URL", G2A_BASE_URLS[g2a_env], G2A_HOSTS),
            g2a_timeout=self.number("G2A_TIMEOUT_MS", 8000, int, minimum=100) / 1000,
            cws_timeout=self.number("CWS_TIMEOUT_MS", 8000, int, minimum=100) / 1000,
            g2a_retry_max=self.number("G2A_RETRY_MAX", 2, int, minimum=0),
            cws_retry_max=self.number("CWS_RETRY_MAX", 2, int, minimum=0),
            g2a_requests_per_minute=self.number("G2A_REQUESTS_PER_MINUTE", 600, int, minimum=1),
            cws_list_per_10_min=self.number("CWS_LIST_REQUESTS_PER_10_MIN", 400, int, minimum=1),
            cws_product_per_5_min=self.number("CWS_PRODUCT_REQUESTS_PER_5_MIN", 600, int, minimum=1),
            cws_token_per_5_min=self.number("CWS_TOKEN_REQUESTS_PER_5_MIN", 50, int, minimum=1),
            upstream_budget_share=self.number("UPSTREAM_BUDGET_SHARE", 0.9, float, minimum=0.01, maximum=1),
            cws_resend_grace=self.number("CWS_RESEND_GRACE_SECONDS", 150, float, minimum=0),
            g2a_create_offers=self.boolean("G2A_CREATE_OFFERS", False),
            price_changes_per_hour=self.number("PRICE_CHANGES_PER_HOUR", 5, int, minimum=1),
            host=self.raw("HOST", "127.0.0.1"),
            port=self.number("PORT", 3000, int, minimum=0),
            web_threads=self.number("WEB_THREADS", 8, int, minimum=1),
            database_url=self.database_url(),
            products_file=Path(self.raw("PRODUCTS_FILE", "products.json")),
            bridge_secret_key=self.raw("BRIDGE_SECRET_KEY"),
            service_enabled=self.boolean("SERVICE_ENABLED", True),
            sync_interval=self.number("SYNC_INTERVAL_SECONDS", 15, float, minimum=1),
            stock_max_age=self.number("STOCK_MAX_AGE_SECONDS", 5, float, minimum=0),
            default_fixed_profit=self.number("DEFAULT_FIXED_PROFIT", "0.50", Decimal, minimum=0),
            default_fee=self.number("DEFAULT_G2A_FEE_PERCENTAGE", "0.15", Decimal, minimum=0, below=1),
            currency=self.currency(),
            reservation_ttl=self.number("RESERVATION_TTL_MINUTES", 30, float, minimum=0.001) * 60,
            order_inline_wait=self.number("ORDER_INLINE_WAIT_SECONDS", 5, float, minimum=0),
            cws_poll_max=self.number("CWS_POLL_MAX_SECONDS", 420, float, minimum=1),
            cws_low_balance=self.number("CWS_LOW_BALANCE", 50, Decimal, minimum=0),
            alert_webhook_url=self.url("ALERT_WEBHOOK_URL", "", None, allow_empty=True),
            log_level=self.choice("LOG_LEVEL", "info", ("debug", "info", "warning", "error")).upper(),
            log_format=self.choice("LOG_FORMAT", "text", ("text", "json")),
        )

    def currency(self):
        # CWS prices carry no currency (cws.md 7.11) and G2A prices offers in EUR: another value could only
        # relabel EUR figures, and an account billed in another currency would sell every key at the wrong price.
        value = self.raw("CWS_TARGET_CURRENCY", "EUR").upper()
        if value != "EUR":
            self.problem("CWS_TARGET_CURRENCY", f"only EUR is supported, got {value!r}: CWS prices carry no currency "
                                                "and G2A offers are priced in EUR, so the bridge cannot convert; "
                                                "use a CWS account billed in EUR")
            return "EUR"
        return value

    def database_url(self):
        value = self.raw("DATABASE_URL", "sqlite:///data/bridge.db")
        scheme = value.split(":", 1)[0].lower()
        if scheme not in ("sqlite", "postgres", "postgresql"):
            self.problem("DATABASE_URL", f"must start with sqlite:/// or postgresql://, got {scheme}:")
        return value


def is_loopback(host):
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def outbound_url_problem(url, hosts):
    """Why an outbound base URL is unsafe (None when fine): HTTPS on an expected host, HTTP only on loopback.

    The host is read the way urllib3 (and so requests) will connect, and must be what urlsplit reads too: a URL the
    two could read differently (`https://evil.example\\@api.codeswholesale.com`) is refused, as is anything but
    plain printable ASCII, a backslash, or a user@ part."""
    if _URL_ODDITY.search(url):
        return f"must be a plain URL (no spaces, control or non-ASCII characters, backslashes or user@), got {url!r}"
    try:
        parts = parse_url(url)
        host = (parts.host or "").strip("[]").lower()
        same = host == (urlsplit(url).hostname or "")
    except (LocationParseError, ValueError):
        return f"is not a URL: {url!r}"
    if not host or not same or not _HOST.fullmatch(host):
        return f"is not a URL with a plain host name: {url!r}"
    if parts.scheme == "http" and is_loopback(host):
        return None
    if parts.scheme != "https":
        return f"must use https:// (plain http only on loopback), got {url}"
    if hosts and not any(host == h or host.endswith("." + h) for h in hosts):
        return f"host {host} is not one of {', '.join('*.' + h for h in hosts)}"
    return None
