"""Fake CodesWholesale v3 API (cws.md §1-6): tokens, price list, orders with fulfilment modes,
codes, balance, postbacks, and /_sim/ control routes for curl users and other processes.
"""
import base64
import binascii
import hashlib
import itertools
import math
import secrets
import string
import struct
import uuid
import zlib
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta, timezone
from decimal import Decimal, InvalidOperation

import requests

from .limits import RateLimits
from .server import BadRequest, FakeApi, HttpError, Reply, Route, to_json

CWS_CLIENT_ID = "ff72ce315d1259e822f47d87d02d261e"
CWS_CLIENT_SECRET = "$2a$10$E2jVWDADFA5gh6zlRVcrlOOX01Q/HJoT6hXuDMJxek.YEo.lkO2T6"
CWS_CLIENT_SIGNATURE = "b4cded07-e13e-4021-8b9f-a3cee994109b"

MODES = frozenset({"instant", "delayed", "image", "preorder", "preorder_legacy", "fail", "balance",
                   "delisted", "commit_then_500", "commit_then_hang", "short", "late_preorder"})
# Documented CWS codes (cws.md §5.2), then ours for cases CWS leaves undocumented.
LOW_BALANCE, PRODUCT_NOT_FOUND, BAD_QUANTITY, CODE_NOT_FOUND = 10002, 20001, 40002, 50002
BAD_REQUEST, PRICE_CHANGED, OUT_OF_STOCK, ORDER_NOT_FOUND = 40000, 40003, 40004, 30001
CODE_LABELS = {"CODE_TEXT": "Text code", "CODE_IMAGE": "Image code",
               "CODE_PREORDER": "Pre-ordered code", "PRE_ORDER": "Pre-ordered code"}
CENT = Decimal("0.01")
# cws.md §5.3: requests per window (seconds) by rate class, as CWS support reportedly enforces them.
SECTION_5_3 = {"token": (50, 300.0), "list": (400, 600.0), "product": (600, 300.0)}
_KEY_ALPHABET = string.ascii_uppercase + string.digits


def cws_error(status, code, message):
    return HttpError(status, {"status": status, "code": code, "message": message,
                              "developerMessage": message, "moreInfo": ""})


def money(value):
    try:
        return Decimal(str(value)).quantize(CENT)
    except InvalidOperation:
        raise ValueError(f"not an amount: {value!r}") from None


def tiers(prices):
    """[(from, to or None, value)] -> sorted [(int, int|None, Decimal)]."""
    bands = [(int(low), None if high is None else int(high), money(value)) for low, high, value in prices]
    return sorted(bands)


def unit_price(bands, quantity):
    for low, high, value in bands:
        if low <= quantity and (high is None or quantity <= high):
            return value
    return None


def text_key():
    groups = ("".join(secrets.choice(_KEY_ALPHABET) for _ in range(4)) for _ in range(3))
    return "SIM-" + "-".join(groups)


def png_key():
    """A valid 1x1 PNG made unique by a random text chunk (stored keys are deduplicated by fingerprint)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", 1, 1, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"tEXt", b"Comment\0" + text_key().encode())
            + chunk(b"IDAT", zlib.compress(b"\0\0")) + chunk(b"IEND", b""))


def iso(moment):
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def parse_bound(text, end):
    """A history bound: YYYY-MM-DD (the whole day) or an ISO timestamp (exact)."""
    try:
        if len(text) == 10:
            day = date.fromisoformat(text)
            return datetime.combine(day, time.max if end else time.min, timezone.utc)
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise BadRequest(f"bad date {text!r}: use YYYY-MM-DD or an ISO timestamp") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def cws_rate_class(request):
    """The §5.3 class a request counts against (None for /_sim/ control calls)."""
    if request.path.startswith("/_sim/"):
        return None
    if (request.method, request.path) == ("POST", "/oauth/token"):
        return "token"
    if request.method == "GET" and request.path.rstrip("/") == "/v3/products":
        return "list"
    if request.method == "GET" and request.path.count("/") == 3 and request.path.startswith("/v3/products/"):
        return "product"
    return "other"


@dataclass
class _Product:
    product_id: str
    name: str
    quantity: int
    bands: list
    mode: str = "instant"
    polls: int = 2

    def as_item(self):
        return {
            "productId": self.product_id, "identifier": "SIM" + self.product_id[:6].upper(),
            "name": self.name, "platform": "Steam", "quantity": self.quantity,
            "prices": [{"value": value, "from": low, "to": high} for low, high, value in self.bands],
            "regions": ["WORLDWIDE"], "regionDescription": None, "languages": ["Multilanguage"],
            "badges": [], "images": [], "releaseDate": "2020-08-26T22:00:00.000Z",
        }


@dataclass
class _Line:
    product: _Product
    quantity: int
    unit_price: Decimal
    codes: list = field(default_factory=list)


@dataclass
class _Order:
    order_id: str
    client_order_id: str | None
    identifier: str
    created_on: datetime
    lines: list
    status: str = "Completed"
    polls_left: int | None = None  # GETs left before a Fulfilling order completes

    @property
    def total(self):
        return sum((line.unit_price * line.quantity for line in self.lines), Decimal("0.00"))


class FakeCws(FakeApi):
    """Stateful fake of the CWS v3 API.

    Knobs: token_ttl, token_shape ("oauth"/"spring"), page_size, balance, delay, hang_seconds, now (a
    clock returning an aware datetime: token expiry and createdOn), per-product fulfilment modes (MODES),
    fail_next faults, rate limits per class token/list/product/other (`limits`, limits.py: off unless
    rate_limits= or limits.enforce() turns them on; limits.throttle() answers 429 to a class for a while;
    limits.counts() counts requests and 429s per class). Choices where CWS is undocumented: an order with pre-order placeholders is
    "Completed" (only codeType tells); "fail" stores a Cancelled order without charging; a repeated
    client orderId makes a new order; GET /v3/orders/{clientOrderId} is 404; codes 40000 (bad request),
    40003 (price changed), 40004 (out of stock, allowPreOrder false) and 30001 (order not found) are ours.

    Modes beyond cws.md §6: "short" completes with `short_by` codes fewer than ordered; "late_preorder" hands out
    pre-order placeholders although stock was there and allowPreOrder was false, and fills them in place, one
    more every `preorder_seconds` after the order was created. `codes_per_unit` > 1 sells every unit as that
    many text codes (a bundle). History knobs (cws.md §7.5 leaves paging and lag unknown):
    history_status (every GET /v3/orders answers it), history_page_size with history_paging "token"
    (items + continuationToken, as products) or "page" (?page=N from 0, with page and totalPages), and
    history_lag (an order shows in history only that many seconds after its creation).
    """

    def __init__(self, rate_limits=None, retry_after=True):
        self.limits = RateLimits(rate_limits, retry_after, defaults=SECTION_5_3)
        self.token_ttl = 3600
        self.token_shape = "oauth"
        self.page_size = 100
        self.balance = Decimal("1000.00")
        self.hang_seconds = 30.0
        self.short_by = 1
        self.codes_per_unit = 1
        self.preorder_seconds = 3.0
        self.history_status = None
        self.history_page_size = None
        self.history_paging = "token"
        self.history_lag = 0.0
        self.now = lambda: datetime.now(timezone.utc)  # tests may replace this clock
        self._token, self._token_expires = None, None
        self._products = {}
        self._orders = []
        self._orders_by_id = {}
        self._codes = {}
        self._serial = itertools.count(100001)
        super().__init__()

    def routes(self):
        return [
            Route("POST", "/oauth/token", self._issue_token, public=True),
            Route("GET", "/v3/products", self._list_products),
            Route("GET", "/v3/products/{id}", self._get_product),
            Route("POST", "/v3/orders", self._create_order),
            Route("GET", "/v3/orders", self._order_history),
            Route("GET", "/v3/orders/{id}", self._get_order),
            Route("GET", "/v3/codes/{id}", self._get_code),
            Route("GET", "/v3/accounts/current", self._account),
            Route("POST", "/_sim/products/{id}", self._control_product),
            Route("DELETE", "/_sim/products/{id}", self._control_remove),
            Route("POST", "/_sim/fulfilment/{id}", self._control_fulfilment),
            Route("POST", "/_sim/orders/{id}/complete", self._control_complete),
            Route("GET", "/_sim/orders", lambda request: {"items": self.orders}),
            Route("POST", "/_sim/faults", self._control_faults),
            Route("POST", "/_sim/limits", lambda request: self.limits.control(request.json())),
            Route("GET", "/_sim/limits", lambda request: self.limits.counts()),
        ]

    def error_body(self, status, message):
        return cws_error(status, BAD_REQUEST if status == 400 else status, message).body

    # ---- knobs for tests ---------------------------------------------------------------------

    def add_product(self, product_id, quantity, prices, name=None):
        with self._lock:
            self._products[product_id] = _Product(product_id, name or f"Simulated game {product_id[:8]}",
                                                  int(quantity), tiers(prices))

    def set_quantity(self, product_id, quantity):
        with self._lock:
            self._products[product_id].quantity = int(quantity)

    def set_prices(self, product_id, prices):
        with self._lock:
            self._products[product_id].bands = tiers(prices)

    def remove_product(self, product_id):
        with self._lock:
            del self._products[product_id]

    def set_fulfilment(self, product_id, mode, polls=2):
        if mode not in MODES:
            raise ValueError(f"unknown fulfilment mode {mode!r}; one of {sorted(MODES)}")
        with self._lock:
            product = self._products[product_id]
            product.mode, product.polls = mode, int(polls)

    def complete_order(self, cws_order_id):
        """Give every unit of the order a real code now (delayed and pre-ordered orders)."""
        with self._lock:
            self._complete(self._orders_by_id[cws_order_id])

    complete_preorder = complete_order

    def expire_token(self):
        with self._lock:
            self._token = None

    @property
    def orders(self):
        """Every stored order as CWS would render it, money as Decimal."""
        with self._lock:
            return [self._order_json(order) for order in self._orders]

    def orders_for_client_id(self, client_order_id):
        return [order for order in self.orders if order["clientOrderId"] == client_order_id]

    def postback(self, type, valid=True, **payload):
        """A postback body (cws.md §4); valid=False signs it with the wrong authHash."""
        signature = CWS_CLIENT_SIGNATURE if valid else "not-the-signature"
        auth_hash = hashlib.sha256((CWS_CLIENT_ID + signature).encode()).hexdigest()
        return {"type": type, "authHash": auth_hash, **payload}

    def stock_entry(self, product_id):
        """A STOCK postback `products` entry describing the product as it is now."""
        with self._lock:
            product = self._products[product_id]
            labels = (f"{low}-{high}" if high else f"{low}+" for low, high, _ in product.bands)
            prices = [{"priceRangeLabel": label, "price": float(value)}
                      for label, (_, _, value) in zip(labels, product.bands)]
            return {"productId": product_id, "quantity": product.quantity, "prices": prices}

    def send_postback(self, url, body):
        response = requests.post(url, data=to_json(body), headers={"Content-Type": "application/json"},
                                 timeout=10)
        return response.status_code

    # ---- rate limits (cws.md §5.3) -----------------------------------------------------------

    def handle(self, request):
        rate_class = cws_rate_class(request)
        wait = 0 if rate_class is None else self.limits.admit(rate_class)
        if wait <= 0:
            return super().handle(request)
        headers = {"Retry-After": str(max(1, math.ceil(wait)))} if self.limits.retry_after else {}
        return self._encode(Reply(429, cws_error(429, 429, "Too many requests").body, headers=headers))

    # ---- auth -------------------------------------------------------------------------------

    def _issue_token(self, request):
        fields = {**request.query, **request.form()}
        user, password = request.basic_auth() or (fields.get("client_id"), fields.get("client_secret"))
        if fields.get("grant_type") != "client_credentials":
            raise HttpError(400, {"error": "unsupported_grant_type",
                                  "error_description": "grant_type must be client_credentials"})
        if (user, password) != (CWS_CLIENT_ID, CWS_CLIENT_SECRET):
            raise HttpError(401, {"error": "invalid_client", "error_description": "Bad client credentials"})
        return self._token_body(self._current_token())

    def _current_token(self):
        # Like CWS: asking again while a token is valid returns the same one with less time left.
        if self._token is None or self.now() >= self._token_expires:
            self._token = str(uuid.uuid4())
            self._token_expires = self.now() + timedelta(seconds=self.token_ttl)
        return self._token

    def _token_body(self, token):
        seconds = max(0, math.ceil((self._token_expires - self.now()).total_seconds()))
        if self.token_shape == "spring":
            return {"value": token, "tokenType": "bearer", "expiresIn": seconds,
                    "expiration": iso(self._token_expires), "expired": False, "scope": [],
                    "refreshToken": None, "additionalInformation": {}}
        return {"access_token": token, "token_type": "bearer", "expires_in": seconds}

    def authenticate(self, request):
        token = request.bearer()
        if token is None or token != self._token or self.now() >= self._token_expires:
            raise HttpError(401, {"error": "invalid_token",
                                  "error_description": "Invalid access token: missing, unknown or expired"})

    # ---- catalogue --------------------------------------------------------------------------

    def _list_products(self, request):
        products = self._select(request.query.get("productIds"))
        start = self._page_start(request.query.get("continuationToken"))
        end = start + self.page_size
        items = [product.as_item() for product in products[start:end]]
        more = end < len(products)
        return {"items": items, "continuationToken": self._page_token(end) if more else None}

    def _select(self, product_ids):
        if not product_ids:
            return list(self._products.values())
        wanted = dict.fromkeys(product_ids.split(","))
        return [self._products[pid] for pid in wanted if pid in self._products]

    @staticmethod
    def _page_token(offset):
        return base64.urlsafe_b64encode(f"sim-page:{offset}".encode()).decode()

    @staticmethod
    def _page_start(token):
        if not token:
            return 0
        try:
            prefix, _, offset = base64.urlsafe_b64decode(token).decode().partition(":")
            if prefix == "sim-page":
                return int(offset)
        except (binascii.Error, UnicodeDecodeError, ValueError):
            pass
        raise BadRequest("invalid continuationToken")

    def _get_product(self, request):
        return self._product(request.params["id"]).as_item()

    def _product(self, product_id):
        product = self._products.get(product_id)
        if product is None or product.mode == "delisted":
            raise cws_error(404, PRODUCT_NOT_FOUND, f"Product {product_id} is not in the price list")
        return product

    # ---- orders -----------------------------------------------------------------------------

    def _create_order(self, request):
        body = request.json()
        if not isinstance(body, dict) or not isinstance(body.get("products"), list) or not body["products"]:
            raise cws_error(400, BAD_REQUEST, "products must be a non-empty list")
        allow_preorder = body.get("allowPreOrder", True)
        if not isinstance(allow_preorder, bool):
            raise cws_error(400, BAD_REQUEST, "allowPreOrder must be a boolean")
        lines = [self._order_line(item, allow_preorder) for item in body["products"]]
        order = self._place(body.get("orderId"), lines)
        modes = {line.product.mode for line in lines}
        if "commit_then_500" in modes:
            return Reply(500, self.error_body(500, "Internal server error"))
        return Reply(200, self._order_json(order), hang=self.hang_seconds if "commit_then_hang" in modes else 0)

    def _order_line(self, item, allow_preorder):
        if not isinstance(item, dict):
            raise cws_error(400, BAD_REQUEST, "each product must be an object")
        product = self._product(item.get("productId"))
        quantity = item.get("quantity")
        if not isinstance(quantity, int) or isinstance(quantity, bool) or quantity < 1:
            raise cws_error(400, BAD_QUANTITY, "quantity must be at least 1")
        if product.mode == "balance":
            raise cws_error(400, LOW_BALANCE, "Not enough balance to place the order")
        if quantity > product.quantity and not allow_preorder:
            raise cws_error(400, OUT_OF_STOCK, f"Only {product.quantity} in stock for {product.product_id}, "
                                               f"{quantity} requested and allowPreOrder is false")
        return _Line(product, quantity, self._checked_price(product, quantity, item.get("price")))

    @staticmethod
    def _checked_price(product, quantity, expected):
        price = unit_price(product.bands, quantity)
        if price is None:
            raise cws_error(400, BAD_REQUEST, f"No price band covers quantity {quantity}")
        if expected is None:
            return price
        if not isinstance(expected, (int, float)) or isinstance(expected, bool):
            raise cws_error(400, BAD_REQUEST, "price must be a number")
        if price > money(expected):
            raise cws_error(400, PRICE_CHANGED, f"Price changed: unit price is now {price}, "
                                                f"above the {money(expected)} sent")
        return price

    def _place(self, client_order_id, lines):
        order = _Order(str(uuid.uuid4()), client_order_id, f"SIM-{next(self._serial)}", self.now(), lines)
        if order.total > self.balance:
            raise cws_error(400, LOW_BALANCE, f"Balance {self.balance} is below the order total {order.total}")
        self._start(order)
        self._orders.append(order)
        self._orders_by_id[order.order_id] = order
        return order

    def _start(self, order):
        modes = {line.product.mode for line in order.lines}
        if "fail" in modes:
            order.status = "Cancelled"  # nothing charged, no stock taken
            return
        self.balance -= order.total
        for line in order.lines:
            in_stock = min(line.quantity, line.product.quantity)
            line.product.quantity -= in_stock
            line.codes = self._first_codes(line.product.mode, line.quantity * self.codes_per_unit,
                                           in_stock * self.codes_per_unit)
        if "delayed" in modes:
            order.status = "Fulfilling"
            order.polls_left = max(line.product.polls for line in order.lines if line.product.mode == "delayed")

    def _first_codes(self, mode, quantity, in_stock):
        # Pre-ordered units keep status Completed on the order: only the code type says "no key yet".
        if mode == "delayed":
            return []
        if mode == "short":
            return [self._new_code(mode) for _ in range(max(0, in_stock - self.short_by))]
        if mode in ("preorder", "preorder_legacy", "late_preorder"):
            in_stock = 0
        placeholder = "PRE_ORDER" if mode == "preorder_legacy" else "CODE_PREORDER"
        real = [self._new_code(mode) for _ in range(in_stock)]
        return real + [self._placeholder(placeholder) for _ in range(quantity - in_stock)]

    def _complete(self, order):
        for line in order.lines:
            for code in line.codes:
                if not code["code"]:
                    self._fill(code, line.product.mode)
            line.codes += [self._new_code(line.product.mode)
                           for _ in range(line.quantity * self.codes_per_unit - len(line.codes))]
        order.status, order.polls_left = "Completed", None

    def _placeholder(self, code_type):
        code_id = str(uuid.uuid4())
        code = {"codeId": code_id, "codeType": code_type, "status": CODE_LABELS[code_type], "code": "",
                "filename": "", "links": [self.link(f"/v3/codes/{code_id}")]}
        self._codes[code_id] = code
        return code

    def _new_code(self, mode):
        return self._fill(self._placeholder("CODE_TEXT"), mode)

    @staticmethod
    def _fill(code, mode):
        if mode == "image":
            code.update(codeType="CODE_IMAGE", code=base64.b64encode(png_key()).decode(),
                        filename=f"{code['codeId']}.png")
        else:
            code.update(codeType="CODE_TEXT", code=text_key())
        code["status"] = CODE_LABELS[code["codeType"]]
        return code

    def _get_order(self, request):
        order = self._orders_by_id.get(request.params["id"])
        if order is None:
            raise cws_error(404, ORDER_NOT_FOUND, f"Order {request.params['id']} not found")
        if order.polls_left == 0:
            self._complete(order)
        elif order.polls_left:
            order.polls_left -= 1
        self._fill_late_keys(order)
        return self._order_json(order)

    def _fill_late_keys(self, order):
        """late_preorder: one more placeholder gets its key every preorder_seconds after the order was made."""
        due = int((self.now() - order.created_on).total_seconds() // self.preorder_seconds)
        for line in (line for line in order.lines if line.product.mode == "late_preorder"):
            waiting = [code for code in line.codes if not code["code"]]
            for code in waiting[:max(0, due - (len(line.codes) - len(waiting)))]:
                self._fill(code, "late_preorder")

    def _order_history(self, request):
        if self.history_status:
            raise cws_error(self.history_status, self.history_status, "Order history is unavailable")
        start = request.query.get("startFrom")
        end = request.query.get("endOn")
        low = parse_bound(start, end=False) if start else None
        high = parse_bound(end, end=True) if end else None
        shown = self.now() - timedelta(seconds=self.history_lag)
        chosen = [self._order_json(order, with_products=False) for order in self._orders
                  if (low is None or order.created_on >= low) and (high is None or order.created_on <= high)
                  and order.created_on <= shown]
        return self._history_page(chosen, request.query)

    def _history_page(self, items, query):
        size = self.history_page_size
        if not size:
            return {"items": items}
        if self.history_paging == "page":
            page = int(query.get("page") or 0)
            return {"items": items[page * size:(page + 1) * size], "page": page,
                    "totalPages": max(1, math.ceil(len(items) / size))}
        start = self._page_start(query.get("continuationToken"))
        more = start + size < len(items)
        return {"items": items[start:start + size], "continuationToken": self._page_token(start + size) if more else None}

    def _order_json(self, order, with_products=True):
        rendered = {"orderId": order.order_id, "clientOrderId": order.client_order_id,
                    "identifier": order.identifier, "status": order.status, "totalPrice": order.total,
                    "createdOn": iso(order.created_on),
                    # Sandbox self links name the client order id, not CWS's uuid (cws.md §2.3).
                    "links": [self.link(f"/v3/orders/{order.client_order_id or order.order_id}")]}
        if with_products:
            rendered["products"] = [
                {"productId": line.product.product_id, "name": line.product.name, "unitPrice": line.unit_price,
                 "codes": [dict(code) for code in line.codes], "links": []}
                for line in order.lines]
        return rendered

    def _get_code(self, request):
        code = self._codes.get(request.params["id"])
        if code is None:
            raise cws_error(404, CODE_NOT_FOUND, f"Code {request.params['id']} not found")
        return dict(code)

    def _account(self, request):
        return {"fullName": "Simulated Buyer", "email": "buyer@sim.invalid", "currentBalance": self.balance,
                "currentCredit": Decimal("0.00"), "totalToUse": self.balance, "links": []}

    # ---- /_sim/ control routes (loopback only, no auth) -------------------------------------

    def _control_product(self, request):
        body, product_id = request.json(), request.params["id"]
        if product_id not in self._products:
            self.add_product(product_id, body["quantity"], body["prices"], body.get("name"))
        if "quantity" in body:
            self.set_quantity(product_id, body["quantity"])
        if "prices" in body:
            self.set_prices(product_id, body["prices"])
        return self._products[product_id].as_item()

    def _control_remove(self, request):
        self.remove_product(request.params["id"])
        return {"removed": request.params["id"]}

    def _control_fulfilment(self, request):
        body = request.json()
        self.set_fulfilment(request.params["id"], body["mode"], body.get("polls", 2))
        return {"productId": request.params["id"], "mode": body["mode"]}

    def _control_complete(self, request):
        self.complete_order(request.params["id"])
        return self._order_json(self._orders_by_id[request.params["id"]])

    def _control_faults(self, request):
        body = request.json()
        self.fail_next(body["prefix"], *body["outcomes"])
        return {"queued": len(body["outcomes"])}
