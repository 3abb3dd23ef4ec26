"""CodesWholesale v3 client: catalogue, orders, codes and balance, every answer checked into plain values.

A response of the wrong shape raises UpstreamError("cws", "field X missing in ..."), never KeyError.
Keys (code values) are never logged here.
"""
import datetime
import functools
import logging
import time
from dataclasses import dataclass
from decimal import ROUND_CEILING, Decimal, InvalidOperation
from urllib.parse import quote

from .budget import UNMETERED
from .config import CWS_HOSTS
from .errors import OutcomeUnknown, UpstreamError
from .log import event
from .upstream import TokenCache, Upstream, fetch_client_token

log = logging.getLogger(__name__)

BALANCE_TOO_LOW, DELISTED, BAD_QUANTITY, CODE_NOT_FOUND = 10002, 20001, 40002, 50002
PREORDER_TYPES = ("CODE_PREORDER", "PRE_ORDER")
KNOWN_STATUSES = ("completed", "fulfilling")
FAILED_WORDS = ("cancel", "fail", "reject")
CENT = Decimal("0.01")
MAX_HISTORY_PAGES = 100


@dataclass(frozen=True, slots=True)
class PriceTier:
    low: int
    high: int | None
    value: Decimal


@dataclass(frozen=True, slots=True)
class CwsProductInfo:
    id: str
    name: str
    quantity: int
    tiers: tuple[PriceTier, ...]

    def unit_price(self, quantity=1):
        """The price per unit when buying `quantity` (cws.md 3.4: inclusive bands sorted by `from`), or None."""
        for tier in sorted(self.tiers, key=lambda t: t.low):
            if tier.low <= quantity and (tier.high is None or quantity <= tier.high):
                return tier.value
        return None


@dataclass(frozen=True)
class ProductPage:
    """One GET /v3/products answer: its products, and whether CWS has a next page."""
    items: list
    more: bool


@dataclass(frozen=True)
class CwsCode:
    code_id: str
    kind: str  # "text" | "image" | "preorder"
    value: str  # the key, base64 image data, or "" (pre-order, or not sent inline)
    filename: str

    @property
    def needs_fetch(self):
        """A real key that the order did not carry inline: fetch it with CwsClient.code()."""
        return self.kind != "preorder" and not self.value


@dataclass(frozen=True)
class CwsOrderProduct:
    product_id: str
    unit_price: Decimal | None
    codes: tuple[CwsCode, ...]


@dataclass(frozen=True)
class CwsOrder:
    order_id: str
    client_order_id: str | None
    status: str
    total_price: Decimal | None
    created_on: str
    products: tuple[CwsOrderProduct, ...]

    def outcome(self, expected_quantities):
        """"done" | "failed" | "pending" | "preorder" (cws.md 3.1, 3.3). A code with an empty value
        keeps the order pending until fulfillment fetches it with CwsClient.code()."""
        status = self.status.lower()
        if any(word in status for word in FAILED_WORDS):
            return "failed"
        if any(code.kind == "preorder" for product in self.products for code in product.codes):
            return "preorder"
        if status == "completed" and self._has_all_keys(expected_quantities):
            return "done"
        if status not in KNOWN_STATUSES:
            _warn_unknown_status(self.status)
        return "pending"

    def _has_all_keys(self, expected_quantities):
        def ready(product_id):
            codes = [c for p in self.products if p.product_id == product_id for c in p.codes]
            return len(codes), sum(1 for c in codes if c.value)
        return bool(expected_quantities) and all(
            ready(product_id) == (quantity, quantity) for product_id, quantity in expected_quantities.items())


@dataclass(frozen=True)
class CwsAccount:
    balance: Decimal
    credit: Decimal
    total_to_use: Decimal


class CwsClient:
    """The CWS v3 API as plain values; one token and one connection pool per client object. `budgets` (budget.py)
    meter each endpoint class; the purchase and its polling are counted but never held back."""

    def __init__(self, settings, budgets=None, sleep=time.sleep, observer=None, clock=time.monotonic):
        self._token = TokenCache(lambda: fetch_client_token(
            self._upstream, "/oauth/token", settings.cws_client_id, settings.cws_client_secret, "cws_token"),
            clock=clock)
        self._upstream = Upstream("cws", settings.cws_base_url, settings.cws_timeout, settings.cws_retry_max,
                                  token=self._token, allowed_hosts=CWS_HOSTS, budgets=budgets, sleep=sleep,
                                  observer=observer)

    @property
    def token_age(self):
        return self._token.age_seconds

    @property
    def budgets(self):
        """The request budgets this client spends (None: unmetered)."""
        return self._upstream.budgets

    def products(self, product_ids=None, batch_size=50):
        """Products by id (batched through productIds), or the whole catalogue when product_ids is None."""
        if product_ids is None:
            for page in self.product_pages():
                yield from page.items
            return
        ids = list(dict.fromkeys(product_ids))
        for start in range(0, len(ids), batch_size):
            for page in self.product_pages(ids[start:start + batch_size]):
                yield from page.items

    def product_pages(self, product_ids=None, updated_since=None):
        """GET /v3/products as ProductPages: the products `product_ids` (one productIds request), or the
        catalogue (only what changed since `updated_since`, an aware datetime, when CWS honours that)."""
        params = {}
        if product_ids is not None:
            params["productIds"] = ",".join(product_ids)
        if updated_since is not None:
            params["updatedSince"] = _iso(updated_since)
        seen, token = set(), None
        while True:
            answer = _object(self._upstream.request(
                "GET", "/v3/products", budget="cws_list",
                params={**params, "continuationToken": token} if token else params), "products page")
            token = answer.get("continuationToken")
            page = ProductPage([_product(item) for item in _list(answer, "items", "products page", default=[])],
                               bool(token))
            # The decoded answer (a 1,000-product page is ~20,000 objects, 1.5 MB) must not live on while the caller
            # stores and reconciles the page, which takes seconds (bench/soak.py: the worker's RSS 1.2-1.6 MB lower).
            del answer
            yield page
            if not token:
                return
            if token in seen:  # a server bug must not become an endless loop, nor a silently short list
                raise UpstreamError("cws", "products paging repeated a continuationToken; list incomplete")
            seen.add(token)

    def product(self, product_id, wait=True):
        """One product, or None when CWS does not list it (404, usually code 20001). wait=False: BudgetSpent when
        the single-product budget has no slot free now."""
        try:
            body = self._get(f"/v3/products/{_segment(product_id)}", "/v3/products/{id}", "cws_product", wait)
        except UpstreamError as err:
            if err.status == 404:
                return None
            raise
        return _product(body)

    def place_order(self, client_order_id, lines, allow_preorder, before_send=None):
        """Buy `lines` [(product_id, quantity, max_unit_price or None)]; never retried (OutcomeUnknown instead).

        `before_send()` runs before each POST goes out (the first, and the one re-send after a 401)."""
        body = {"allowPreOrder": bool(allow_preorder), "orderId": client_order_id,
                "products": [_order_line(*line) for line in lines]}
        answer = self._upstream.request("POST", "/v3/orders", budget=UNMETERED, json_body=body, idempotent=False,
                                        before_send=before_send)
        try:
            return _order(answer)
        except UpstreamError as err:  # CWS accepted something we cannot read: recover by client order id
            raise OutcomeUnknown("cws", f"order {client_order_id} accepted but unreadable: {err}") from err

    def order(self, cws_order_id):
        return _order(self._get(f"/v3/orders/{_segment(cws_order_id)}", "/v3/orders/{id}", UNMETERED))

    def find_orders(self, client_order_id, around):
        """Orders carrying our client order id, from the history around `around` (an aware datetime).

        History items have no products: call order() on the result for codes."""
        day = around.astimezone(datetime.timezone.utc).date()
        one_day = datetime.timedelta(days=1)
        params = {"startFrom": (day - one_day).isoformat(), "endOn": (day + one_day).isoformat()}
        # Filter before parsing, so one odd unrelated item cannot block crash recovery.
        return [_order(item) for item in self._history(params)
                if isinstance(item, dict) and item.get("clientOrderId") == client_order_id]

    def _history(self, params):
        """Every history item, page after page: an order on page 2 that we missed would be bought again.

        cws.md 7.5 leaves paging unknown, so both usual shapes are followed: `continuationToken` (as the
        catalogue pages) and a page number (`page` with `totalPages`, or `last`). Anything that cannot be paged
        to the end is an error, never a short list (recovery would then buy again)."""
        seen, extra = set(), {}
        for _ in range(MAX_HISTORY_PAGES):
            body = self._upstream.request("GET", "/v3/orders", budget="cws_other", params={**params, **extra})
            if isinstance(body, list):
                yield from body
                return
            yield from _list(body, "items", "order history", default=[])
            extra = _next_history_page(body)
            if extra is None:
                return
            if repr(extra) in seen:
                raise UpstreamError("cws", "order history paging repeated itself; history incomplete")
            seen.add(repr(extra))
        raise UpstreamError("cws", f"order history has more than {MAX_HISTORY_PAGES} pages; history incomplete")

    def code(self, code_id):
        return _code(self._get(f"/v3/codes/{_segment(code_id)}", "/v3/codes/{id}", UNMETERED), f"code {code_id}")

    def account(self):
        body = self._get("/v3/accounts/current", "/v3/accounts/current", "cws_other")
        balance = _money(body, "currentBalance", "account")
        credit = _money(body, "currentCredit", "account", optional=True) or Decimal("0")
        total = _money(body, "totalToUse", "account", optional=True)
        return CwsAccount(balance, credit, balance + credit if total is None else total)

    def _get(self, path, endpoint, budget, wait=True):
        return self._upstream.request("GET", path, budget=budget, wait=wait, endpoint=endpoint)


def _next_history_page(body):
    """The parameters of the next history page, or None after the last one."""
    token = body.get("continuationToken")
    if token:
        return {"continuationToken": token}
    page, pages = body.get("page", body.get("number")), body.get("totalPages")
    if isinstance(page, int) and (isinstance(pages, int) and page + 1 < pages or body.get("last") is False):
        return {"page": page + 1}
    return None


def _iso(moment):
    """ISO-8601 in UTC with milliseconds, as CWS writes its own timestamps."""
    moment = moment.astimezone(datetime.timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def _order_line(product_id, quantity, max_unit_price):
    line = {"productId": product_id, "quantity": quantity}
    if max_unit_price is not None:
        # A JSON number, so never a Decimal; rounded up to cents so a correct cap never fails.
        line["price"] = float(Decimal(str(max_unit_price)).quantize(CENT, rounding=ROUND_CEILING))
    return line


def _product(item):
    product_id = _text(item, "productId", "product")
    where = f"product {product_id}"
    prices = _list(item, "prices", where)
    tiers = tuple(_tier(price, f"{where} prices[{i}]") for i, price in enumerate(prices))
    return CwsProductInfo(product_id, _text(item, "name", where, optional=True), _count(item, "quantity", where),
                          tuple(sorted(tiers, key=lambda t: t.low)))


def _tier(price, where):
    high = _count(price, "to", where, optional=True)
    return PriceTier(_count(price, "from", where), high, _money(price, "value", where))


def _order(body):
    order_id = _text(body, "orderId", "order")
    where = f"order {order_id}"
    products = _list(body, "products", where, default=[])
    return CwsOrder(order_id, _text(body, "clientOrderId", where, optional=True) or None,
                    _text(body, "status", where), _money(body, "totalPrice", where, optional=True),
                    _text(body, "createdOn", where, optional=True),
                    tuple(_order_product(product, where) for product in products))


def _order_product(product, where):
    product_id = _text(product, "productId", f"{where} product")
    where = f"{where} product {product_id}"
    codes = _list(product, "codes", where, default=[])
    return CwsOrderProduct(product_id, _money(product, "unitPrice", where, optional=True),
                           tuple(_code(code, f"{where} code") for code in codes))


def _code(body, where):
    code_id = _text(body, "codeId", where)
    value = _text(body, "code", f"code {code_id}", optional=True)
    kind = _code_kind(str(body.get("codeType") or "").upper(), str(body.get("status") or "").lower(), value)
    return CwsCode(code_id, kind, "" if kind == "preorder" else value,
                   _text(body, "filename", f"code {code_id}", optional=True))


def _code_kind(code_type, label, value):
    # cws.md 3.3. An explicit text/image code with an empty value is a real key not sent inline
    # (the SDK fetches it lazily); an empty value with no recognised type is a pre-order placeholder.
    if code_type in PREORDER_TYPES or label == "pre-ordered code":
        return "preorder"
    if code_type == "CODE_IMAGE" or label == "image code":
        return "image"
    if code_type == "CODE_TEXT" or label == "text code" or value:
        return "text"
    return "preorder"


@functools.lru_cache(maxsize=64)
def _warn_unknown_status(status):
    """Logs each unrecognised order status once per process (the cache is the memory)."""
    event(log, "cws.unknown_status", level=logging.WARNING, status=status)


def _segment(value):
    return quote(str(value), safe="")


def _bad(message):
    return UpstreamError("cws", message)


def _object(body, where):
    if not isinstance(body, dict):
        raise _bad(f"{where} is not a JSON object")
    return body


def _value(body, name, where, optional):
    value = _object(body, where).get(name)
    if value is None and not optional:
        raise _bad(f"field {name} missing in {where}")
    return value


def _text(body, name, where, optional=False):
    value = _value(body, name, where, optional)
    if value is None:
        return ""
    if not isinstance(value, str) or not (value or optional):
        raise _bad(f"field {name} is not a non-empty string in {where}")
    return value


def _count(body, name, where, optional=False):
    value = _value(body, name, where, optional)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _bad(f"field {name} is not a whole number >= 0 in {where}")
    return value


def _money(body, name, where, optional=False):
    value = _value(body, name, where, optional)
    if value is None:
        return None
    try:
        amount = Decimal(str(value))  # str() keeps 6.32 exact; str(True) is rejected like any non-number
    except InvalidOperation:
        amount = None
    if amount is None or not amount.is_finite():
        raise _bad(f"field {name} is not a number in {where}")
    return amount


def _list(body, name, where, default=None):
    value = _value(body, name, where, optional=default is not None)
    value = default if value is None else value
    if not isinstance(value, list):
        raise _bad(f"field {name} is not a list in {where}")
    return value
