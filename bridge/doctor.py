"""Operator checks for `g2a-bridge doctor`: config, database, products.json, data folder, secret key, CWS, G2A,
the request budgets, and the freshness to expect under them.

Each check is a Result with what it found and, when it failed, what to do. Config comes first and alone:
a config that does not load means no network call at all.
"""
import math
import tempfile
from dataclasses import dataclass
from urllib.parse import urlsplit

from peewee import PeeweeException

from . import db, status
from .budget import budgets_for
from .crypto import KEY_FILE_NAME, claim_database, load_key_box, stored_secret
from .cws import CwsClient
from .errors import BridgeError, ConfigError, UpstreamError
from .g2a import G2aClient
from .migrations import SchemaStep, open_database
from .products import load_mapping
from .catalogue import BATCH_SIZE
from .sweep import last_listing, reading_plan

CONFIG_REMEDY = "fix it in bridge.env (or .env / ENV_FILE), then run g2a-bridge doctor again"
LOCAL_ERRORS = (PeeweeException, OSError, BridgeError)
DEFAULT_PAGE_SIZE = 500  # products per catalogue page assumed until the worker has listed the catalogue once
SWEEP_WARNING = 300.0  # seconds: a mapped set that takes longer to sweep leaves silent stock-outs on G2A too long
FRESHNESS_REMEDY = ("without a postback a stock-out may take that long to reach G2A: set the CWS postback URL, "
                    "map fewer products, or raise CWS_LIST_REQUESTS_PER_10_MIN if CWS allows more")


@dataclass(frozen=True)
class Result:
    name: str
    ok: bool
    detail: str
    remedy: str = ""
    warning: bool = False  # worth knowing, not a failure: doctor still exits 0

    def line(self):
        label = "FAIL" if not self.ok else "WARN" if self.warning else "ok  "
        text = f"{label} {self.name:<12} {self.detail}"
        return f"{text}  -> {self.remedy}" if self.remedy and (self.warning or not self.ok) else text


def config_failures(error):
    """One FAIL line per configuration problem."""
    return [Result("config", False, problem, CONFIG_REMEDY) for problem in error.problems]


def checks(settings):
    """Every check after the config loaded, in order, as each finishes (the network ones may take a while)."""
    yield check_config(settings)
    database = check_database(settings)
    yield database
    yield check_products(settings)
    yield check_data_dir(settings)
    yield check_secret_key(settings, database.ok)
    yield check_cws(settings)
    yield check_g2a(settings)
    yield check_budgets(database.ok)
    yield check_freshness(settings, database.ok)


def check_config(settings):
    note = "" if settings.cws_client_signature else " (CWS_CLIENT_SIGNATURE is empty: CWS postbacks are refused)"
    return Result("config", True, f"loaded; G2A {settings.g2a_env} at {settings.g2a_base_url}, "
                                  f"CWS at {settings.cws_base_url}{note}")


def check_database(settings):
    where = safe_url(settings.database_url)
    try:
        open_database(settings.database_url)
        step = SchemaStep.select().order_by(SchemaStep.number.desc()).first()
    except LOCAL_ERRORS as err:
        return Result("database", False, f"{where}: {one_line(err)}",
                      "check DATABASE_URL; the database (or its folder) must be writable by the service user")
    return Result("database", True, f"{where} reachable, schema at step {step.number}")


def check_products(settings):
    try:
        mappings = load_mapping(settings.products_file, settings.default_fixed_profit, settings.default_fee)
    except ConfigError as err:
        return Result("products", False, "; ".join(err.problems),
                      f"fix {settings.products_file} (see README.md, products.json)")
    enabled = sum(1 for mapping in mappings if mapping.enabled)
    return Result("products", True, f"{settings.products_file}: {len(mappings)} products ({enabled} enabled)")


def check_data_dir(settings):
    folder = db.data_dir(settings.database_url)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        return Result("data folder", False, f"{folder}: {err.strerror or err}",
                      f"make {folder} writable by the service user (chown g2a-bridge {folder})")
    return Result("data folder", True, f"{folder.resolve()} writable")


def check_secret_key(settings, database_ok):
    """The key works, and (with a database) is the one it was set up with and still opens the keys stored with it."""
    folder = db.data_dir(settings.database_url)
    try:
        box = load_key_box(settings.bridge_secret_key, folder)
        box.decrypt(box.encrypt(b"doctor"))
        stored = stored_secret() if database_ok else None
        if database_ok:
            claim_database(box)
        if stored is not None:
            box.decrypt(stored)
    except LOCAL_ERRORS as err:
        return Result("secret key", False, one_line(err),
                      "restore the BRIDGE_SECRET_KEY the stored keys were encrypted with")
    source = "BRIDGE_SECRET_KEY" if settings.bridge_secret_key else f"generated {folder / KEY_FILE_NAME}"
    checked = "opens the stored keys" if stored is not None else "encrypts and decrypts"
    return Result("secret key", True, f"{source} {checked}; keep a backup of it")


def check_cws(settings):
    try:
        account = CwsClient(settings, budgets=budgets_for(settings, "cli")).account()
    except UpstreamError as err:
        return Result("CWS", False, one_line(err),
                      upstream_remedy(err, "CWS_CLIENT_ID and CWS_CLIENT_SECRET", "CWS_API_BASE_URL"))
    low = (f"; below CWS_LOW_BALANCE {settings.cws_low_balance}: top up"
           if account.balance < settings.cws_low_balance else "")
    return Result("CWS", True, f"token ok, balance {account.balance} {settings.currency}{low}")


def check_g2a(settings):
    try:
        next(G2aClient(settings, budgets=budgets_for(settings, "cli")).offers(), None)
    except UpstreamError as err:
        return Result("G2A", False, one_line(err),
                      upstream_remedy(err, "G2A_API_KEY and G2A_API_SECRET", "G2A_API_BASE_URL / G2A_ENV"))
    return Result("G2A", True, "token ok, offers readable")


def check_budgets(database_ok):
    """The worker's request budgets as it last published them: use per class and 429s."""
    if not database_ok:
        return Result("budgets", True, "unknown: the database is unreachable")
    try:
        figures = status.published_budgets("worker")
    except LOCAL_ERRORS as err:
        return Result("budgets", True, f"unknown: {one_line(err)}")
    return Result("budgets", True, f"worker: {status.budgets_text(figures)}")


def check_freshness(settings, database_ok):
    """How long one full sweep of the mapped set takes at the worker's GET /v3/products pace; a warning past 5 min."""
    try:
        mapped = sum(1 for m in load_mapping(settings.products_file, settings.default_fixed_profit,
                                             settings.default_fee) if m.enabled)
    except ConfigError:
        return Result("freshness", True, "unknown until products.json loads")
    listing = _last_listing() if database_ok else None
    pace = budgets_for(settings, "worker")["cws_list"].per_second
    requests, seconds = sweep_cost(mapped, listing, pace)
    detail = (f"{mapped} mapped products: one sweep is {requests} GET /v3/products (productIds batches of "
              f"{BATCH_SIZE} or catalogue pages, whichever is fewer) at {pace * 60:.1f}/min, the worker's share of "
              f"CWS_LIST_REQUESTS_PER_10_MIN: about {status.age_text(seconds)} per sweep")
    if seconds > SWEEP_WARNING:
        return Result("freshness", True, detail, FRESHNESS_REMEDY, warning=True)
    return Result("freshness", True, detail)


def sweep_cost(mapped, listing, per_second):
    """(requests, seconds) to read `mapped` products once as the worker's sweep will (sweep.reading_plan, given the
    last complete catalogue listing or None), at `per_second`; a catalogue never listed counts one page per
    DEFAULT_PAGE_SIZE mapped products."""
    _, requests = reading_plan(mapped, listing)
    requests = math.ceil(mapped / DEFAULT_PAGE_SIZE) if requests is None else requests
    return requests, requests / per_second


def _last_listing():
    try:
        return last_listing()
    except (ValueError, *LOCAL_ERRORS):
        return None


def upstream_remedy(err, credentials, url_names):
    if err.status == 401:
        return f"check {credentials} in bridge.env (and that they belong to this environment)"
    if err.status is None:
        return f"check {url_names} and that this machine can reach it over HTTPS"
    return "the service answered with an error; try again later, and check its status page"


def safe_url(url):
    """DATABASE_URL without its password."""
    parts = urlsplit(url)
    if not parts.password:
        return url
    return parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@")).geturl()


def one_line(err):
    return " ".join(str(err).split()) or type(err).__name__
