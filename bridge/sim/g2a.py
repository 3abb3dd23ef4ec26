"""Fake G2A Sales API (g2a-sales.md): tokens, offer listing, offer PATCH/create as jobs, price limits."""
import re
import secrets
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from decimal import Decimal

from .server import BadRequest, FakeApi, HttpError, Reply, Route

G2A_API_KEY = "sim-g2a-client"
G2A_API_SECRET = "sim-g2a-secret"
DEFAULT_PRICE_LIMIT = (Decimal("0.10"), Decimal("10000.00"))
MAX_ITEMS_PER_PAGE = 100
VISIBILITIES = ("all", "retail", "business")
VARIANT_FIELDS = {"productId", "price", "inventory", "active", "visibility"}
_PRICE = re.compile(r"\d+\.\d{2}")


def g2a_errors(code, message):
    return {"errors": [{"code": code, "message": message}]}


@dataclass
class _Job:
    job_id: str
    resource_id: str | None
    polls_left: int
    failure: tuple | None  # (code, message) when the job ends "failed"

    def as_json(self):
        status = "pending" if self.polls_left > 0 else "failed" if self.failure else "complete"
        code, message = self.failure if self.failure and status == "failed" else ("", "")
        element = {"resourceId": self.resource_id, "resourceType": "offer", "status": status,
                   "code": code, "message": message}
        return {"data": {"jobId": self.job_id, "status": status, "elements": [element]}}


class FakeG2a(FakeApi):
    """Stateful fake of the G2A Sales API; writes are jobs that report "pending" `job_polls` times.

    A change is applied when its job is created, unless the job is doomed to fail (fail_jobs, a price
    outside the product's priceLimit, a duplicate offer). `patches` records every PATCH that reached the
    routes (a fail_next fault answers before that). Knobs: token_ttl, job_polls, create_enabled, delay,
    hang_seconds, now (token expiry clock), fail_next faults (also "queue_full"), served_page_size (serve that
    many offers per page whatever itemsPerPage asks, as a G2A that caps pages does).
    """

    fault_names = FakeApi.fault_names | {"queue_full"}

    def __init__(self):
        self.token_ttl = 3600
        self.job_polls = 1
        self.create_enabled = True
        self.served_page_size = None
        self.offers = {}
        self.patches = []  # {"offer_id", "body", "at": time.monotonic()} for every PATCH that reached us
        self.now = lambda: datetime.now(timezone.utc)  # tests may replace this clock
        self._tokens = {}
        self._price_limits = {}
        self._jobs = {}
        self._jobs_to_fail = 0
        super().__init__()

    def routes(self):
        return [
            Route("POST", "/oauth/token", self._issue_token, public=True),
            Route("GET", "/v3/sales/offers", self._list_offers),
            Route("POST", "/v3/sales/offers", self._create_offer),
            Route("GET", "/v3/sales/offers/{id}", lambda request: {"data": self._offer(request.params["id"])}),
            Route("PATCH", "/v3/sales/offers/{id}", self._patch_offer),
            Route("GET", "/v3/jobs/{id}", self._get_job),
            Route("GET", "/v1/products", self._products),
        ]

    def error_body(self, status, message):
        if status == 429:
            return {"code": "BR03", "message": "Too many requests"}
        return g2a_errors(f"HTTP{status}", message)

    def fault_reply(self, outcome):
        if outcome == "queue_full":
            return Reply(400, g2a_errors("BR05", "You have reached the limit of tasks in the queue"))
        return super().fault_reply(outcome)

    # ---- knobs for tests ---------------------------------------------------------------------

    def add_offer(self, product_id, price, stock, active=False, offer_id=None, offer_type="dropshipping"):
        offer_id = offer_id or str(uuid.uuid4())
        with self._lock:
            self.offers[offer_id] = self._new_offer(offer_id, str(product_id), Decimal(str(price)),
                                                    int(stock), active, "all", offer_type)
        return offer_id

    def offer_for_product(self, product_id):
        with self._lock:
            return next((offer for offer in self.offers.values()
                         if offer["product"]["id"] == str(product_id)), None)

    def set_price_limit(self, product_id, min, max):
        with self._lock:
            self._price_limits[str(product_id)] = (Decimal(str(min)), Decimal(str(max)))

    def fail_jobs(self, n=1):
        """The next n jobs end "failed" and their change is not applied."""
        with self._lock:
            self._jobs_to_fail += n

    @staticmethod
    def _new_offer(offer_id, product_id, price, stock, active, visibility, offer_type="dropshipping"):
        return {"id": offer_id, "type": offer_type, "status": "active" if active else "inactive",
                "price": f"{price:.2f}", "inventory": {"size": stock}, "visibility": visibility,
                "product": {"id": product_id, "name": f"Simulated product {product_id}"}, "active": active}

    # ---- auth -------------------------------------------------------------------------------

    def _issue_token(self, request):
        form = request.form()
        if form.get("grant_type") != "client_credentials":
            raise HttpError(400, {"error": "unsupported_grant_type",
                                  "error_description": "grant_type must be client_credentials"})
        if (form.get("client_id"), form.get("client_secret")) != (G2A_API_KEY, G2A_API_SECRET):
            raise HttpError(401, {"error": "invalid_client", "error_description": "Bad client credentials"})
        token = secrets.token_urlsafe(24)
        self._tokens[token] = self.now() + timedelta(seconds=self.token_ttl)
        return {"access_token": token, "token_type": "bearer", "expires_in": int(self.token_ttl)}

    def authenticate(self, request):
        expires = self._tokens.get(request.bearer())
        if expires is None or self.now() >= expires:
            raise HttpError(401, g2a_errors("AUTH02", "Invalid or expired access token"))

    # ---- offers -----------------------------------------------------------------------------

    def _list_offers(self, request):
        page = _positive_int(request.query.get("page", "1"), "page")
        per_page = _positive_int(request.query.get("itemsPerPage", "20"), "itemsPerPage")
        if per_page > MAX_ITEMS_PER_PAGE:
            raise BadRequest(f"itemsPerPage must be at most {MAX_ITEMS_PER_PAGE}")
        per_page = self.served_page_size or per_page
        offers = list(self.offers.values())
        start = (page - 1) * per_page
        return {"data": offers[start:start + per_page],
                "meta": {"page": page, "itemsPerPage": per_page, "totalResults": len(offers)}}

    def _offer(self, offer_id):
        if offer_id not in self.offers:
            raise HttpError(404, g2a_errors("NOT_FOUND", f"Offer {offer_id} not found"))
        return self.offers[offer_id]

    def _patch_offer(self, request):
        offer = self._offer(request.params["id"])
        self.patches.append({"offer_id": offer["id"], "body": _json_or_raw(request), "at": time.monotonic()})
        body = request.json()
        _check_keys(body, {"offerType", "variant"}, "body", required={"offerType", "variant"})
        if body["offerType"] != offer["type"]:
            raise BadRequest(f"offerType must be {offer['type']!r}")
        changes = _parse_variant(body["variant"], VARIANT_FIELDS - {"productId"}, required=set())
        failure = self._job_failure(offer["product"]["id"], changes.get("price"))
        if failure is None:
            _apply(offer, changes)
        return self._start_job(offer["id"], failure)

    def _create_offer(self, request):
        if not self.create_enabled:
            raise HttpError(403, g2a_errors("FORBIDDEN", "Offer creation is not enabled for this account"))
        body = request.json()
        _check_keys(body, {"offerType", "variants"}, "body", required={"offerType", "variants"})
        variants = body["variants"]
        if body["offerType"] != "dropshipping" or not isinstance(variants, list) or len(variants) != 1:
            raise BadRequest("expected offerType 'dropshipping' and exactly one variant")
        changes = _parse_variant(variants[0], VARIANT_FIELDS, required={"productId", "price", "inventory"})
        return self._create_from(changes)

    def _create_from(self, changes):
        product_id = str(changes["productId"])
        failure = self._job_failure(product_id, changes["price"])
        if failure is None and self.offer_for_product(product_id):
            failure = ("DUPLICATE", f"An offer for product {product_id} already exists")
        if failure:
            return self._start_job(None, failure)
        offer_id = str(uuid.uuid4())
        self.offers[offer_id] = self._new_offer(offer_id, product_id, changes["price"], changes["size"],
                                                changes.get("active", False), changes.get("visibility", "all"))
        return self._start_job(offer_id, None)

    def _job_failure(self, product_id, price):
        if self._jobs_to_fail:
            self._jobs_to_fail -= 1
            return ("JOB_FAILED", "Simulated failure: the change was not applied")
        low, high = self._price_limits.get(product_id, DEFAULT_PRICE_LIMIT)
        if price is not None and not low <= price <= high:
            return ("PRICE_OUT_OF_RANGE", f"Price {price} is outside the allowed range {low}-{high}")
        return None

    def _start_job(self, resource_id, failure):
        job = _Job(str(uuid.uuid4()), resource_id, self.job_polls, failure)
        self._jobs[job.job_id] = job
        return {"data": {"jobId": job.job_id}}

    def _get_job(self, request):
        job = self._jobs.get(request.params["id"])
        if job is None:
            raise HttpError(404, g2a_errors("NOT_FOUND", f"Job {request.params['id']} not found"))
        rendered = job.as_json()
        job.polls_left = max(0, job.polls_left - 1)
        return rendered

    def _products(self, request):
        """GET /v1/products?id=ID[,ID…] -> {"docs": [{"id", "name", "priceLimit": {"min", "max"}}], "total"}.

        The real shape is not documented; ids are strings and the limits JSON numbers in EUR.
        Unknown ids are left out.
        """
        ids = [pid for pid in (request.query.get("id") or "").split(",") if pid]
        docs = [{"id": pid, "name": f"Simulated product {pid}", "priceLimit": self._limit_json(pid)}
                for pid in ids if pid in self._known_products()]
        return {"docs": docs, "total": len(docs)}

    def _known_products(self):
        return {offer["product"]["id"] for offer in self.offers.values()} | set(self._price_limits)

    def _limit_json(self, product_id):
        low, high = self._price_limits.get(product_id, DEFAULT_PRICE_LIMIT)
        return {"min": low, "max": high}


def _json_or_raw(request):
    try:
        return request.json()
    except BadRequest:
        return request.body.decode("utf-8", "replace")


def _positive_int(text, name):
    if not text.isdigit() or int(text) < 1:
        raise BadRequest(f"{name} must be a positive integer")
    return int(text)


def _check_keys(value, allowed, where, required=()):
    if not isinstance(value, dict):
        raise BadRequest(f"{where} must be a JSON object")
    unknown = sorted(set(value) - set(allowed))
    missing = sorted(set(required) - set(value))
    if unknown or missing:
        raise BadRequest(f"{where}: unknown fields {unknown}, missing fields {missing}")


def _parse_variant(variant, allowed, required):
    """Validate a variant; returns the changes it asks for as plain values."""
    _check_keys(variant, allowed, "variant", required)
    changes = {}
    if "productId" in variant:
        if not str(variant["productId"]).isdigit() or isinstance(variant["productId"], bool):
            raise BadRequest("variant.productId must be a G2A product id (digits)")
        changes["productId"] = variant["productId"]
    if "price" in variant:
        changes["price"] = _parse_price(variant["price"])
    if "inventory" in variant:
        changes["size"] = _parse_size(variant["inventory"])
    if "active" in variant:
        if not isinstance(variant["active"], bool):
            raise BadRequest("variant.active must be true or false")
        changes["active"] = variant["active"]
    if "visibility" in variant:
        if variant["visibility"] not in VISIBILITIES:
            raise BadRequest(f"variant.visibility must be one of {VISIBILITIES}")
        changes["visibility"] = variant["visibility"]
    return changes


def _parse_price(price):
    _check_keys(price, {"retail", "business"}, "variant.price", required={"retail"})
    for kind, value in price.items():
        if not isinstance(value, str) or not _PRICE.fullmatch(value):
            raise BadRequest(f"variant.price.{kind} must be a string with 2 decimals, like \"5.30\"")
    return Decimal(price["retail"])


def _parse_size(inventory):
    _check_keys(inventory, {"size"}, "variant.inventory", required={"size"})
    size = inventory["size"]
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise BadRequest("variant.inventory.size must be an integer >= 0")
    return size


def _apply(offer, changes):
    if "price" in changes:
        offer["price"] = f"{changes['price']:.2f}"
    if "size" in changes:
        offer["inventory"]["size"] = changes["size"]
    if "visibility" in changes:
        offer["visibility"] = changes["visibility"]
    if "active" in changes:
        offer["active"] = changes["active"]
        offer["status"] = "active" if changes["active"] else "inactive"
