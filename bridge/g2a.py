"""G2A Sales API client (g2a-sales.md): our offers, offer changes as jobs, price limits; answers checked into plain values."""
import logging
import time
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from urllib.parse import quote

from .config import G2A_HOSTS
from .errors import UpstreamError
from .log import event
from .upstream import TokenCache, Upstream, fetch_client_token

log = logging.getLogger(__name__)

BUDGET = "g2a"  # G2A meters every call of ours together
OFFER_TYPE = "dropshipping"
PAGE_SIZE = 100
JOB_DONE = ("complete", "completed", "done")
JOB_FAILED = ("failed", "error")
JOB_POLL_INTERVAL, JOB_POLL_MAX = 0.5, 5.0
QUEUE_FULL = "limit of tasks in the queue"


@dataclass(frozen=True, slots=True)
class Offer:
    id: str
    product_id: int
    price: Decimal | None
    stock: int
    active: bool
    status: str
    type: str = OFFER_TYPE  # G2A's offer type; only dropshipping offers are ours to match and write


class G2aClient:
    """One token and connection pool; every call, the token included, spends the "g2a" class of `budgets`
    (budget.py: the process's share of G2A_REQUESTS_PER_MINUTE)."""

    def __init__(self, settings, budgets=None, sleep=time.sleep, clock=time.monotonic,
                 job_poll_interval=JOB_POLL_INTERVAL, observer=None):
        self._sleep, self._clock, self.job_poll_interval = sleep, clock, job_poll_interval
        self._token = TokenCache(lambda: fetch_client_token(
            self._upstream, "/oauth/token", settings.g2a_api_key, settings.g2a_api_secret, BUDGET), clock=clock)
        self._upstream = Upstream("g2a", settings.g2a_base_url, settings.g2a_timeout, settings.g2a_retry_max,
                                  token=self._token, allowed_hosts=G2A_HOSTS, budgets=budgets,
                                  retryable=_queue_full, sleep=sleep, observer=observer)

    @property
    def token_age(self):
        return self._token.age_seconds

    def _request(self, method, path, **options):
        return self._upstream.request(method, path, budget=BUDGET, **options)

    def offers(self):
        """Every offer of ours, page by page; an entry we cannot read is logged and skipped.

        Paged by the size G2A says it served (meta.itemsPerPage), which may be smaller than the size we ask
        for; an empty page ends the listing whatever the total claims."""
        page = 1
        while True:
            body = self._request("GET", "/v3/sales/offers",
                                          params={"page": page, "itemsPerPage": PAGE_SIZE})
            items, total, served = _page(body)
            for item in items:
                offer = _offer(item)
                if offer is not None:
                    yield offer
            if not items or page * served >= total:
                return
            page += 1

    def update_offer(self, offer_id, price=None, stock=None, active=None):
        """Start a change of only the given parts; returns the job id (wait_job tells how it ended)."""
        variant = {}
        if price is not None:
            variant["price"] = {"retail": _price_text(price)}
        if stock is not None:
            variant["inventory"] = {"size": int(stock)}
        if active is not None:
            variant["active"] = bool(active)
        # Absolute values, so sending the same change twice is harmless: retries are safe.
        body = self._request("PATCH", f"/v3/sales/offers/{_segment(offer_id)}",
                                      json_body={"offerType": OFFER_TYPE, "variant": variant},
                                      endpoint="/v3/sales/offers/{id}")
        return _job_id(body)

    def create_offer(self, product_id, price, stock):
        """Start creating an active offer; returns the job id (its resource id is the new offer id)."""
        text = _price_text(price)
        variant = {"productId": str(product_id), "price": {"retail": text, "business": text},
                   "inventory": {"size": int(stock)}, "active": True, "visibility": "all"}
        body = self._request("POST", "/v3/sales/offers", idempotent=False,
                                      json_body={"offerType": OFFER_TYPE, "variants": [variant]})
        return _job_id(body)

    def wait_job(self, job_id, timeout):
        """Poll the job until it ends; returns its resource id (the offer), raises UpstreamError if it failed."""
        deadline = self._clock() + timeout
        delay = self.job_poll_interval
        while True:
            self._sleep(delay)
            body = self._request("GET", f"/v3/jobs/{_segment(job_id)}", endpoint="/v3/jobs/{id}")
            status, element = _job(body, job_id)
            if status in JOB_DONE:
                return element.get("resourceId")
            if status in JOB_FAILED:
                reason = " ".join(str(element.get(k)) for k in ("code", "message") if element.get(k))
                raise UpstreamError("g2a", f"job {job_id} failed: {reason or 'no reason given'}",
                                    code=element.get("code"))
            if self._clock() + delay > deadline:
                raise UpstreamError("g2a", f"job {job_id} still {status or 'pending'} after {timeout:g} s",
                                    retryable=True)
            delay = min(delay * 2, JOB_POLL_MAX)

    def price_limit(self, product_id):
        """(min, max) G2A accepts for the product's price, or None when G2A does not say."""
        body = self._request("GET", "/v1/products", params={"id": str(product_id)})
        for doc in _docs(body):
            if str(doc.get("id")) == str(product_id):
                return _limit(doc.get("priceLimit"))
        return None


def _queue_full(response):
    return response.status_code == 400 and QUEUE_FULL in response.text.lower()


def _segment(value):
    return quote(str(value), safe="")


def _price_text(price):
    return f"{Decimal(price):.2f}"


def _bad(message):
    return UpstreamError("g2a", message)


def _page(body):
    if not isinstance(body, dict) or not isinstance(body.get("data"), list):
        raise _bad("offers page has no data list")
    meta = body.get("meta") if isinstance(body.get("meta"), dict) else {}
    total = meta.get("totalResults")
    if not _count(total):
        raise _bad("offers page has no meta.totalResults")
    served = meta.get("itemsPerPage")
    return body["data"], total, served if _count(served) and served > 0 else len(body["data"])


def _count(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _offer(item):
    """An Offer, or None (logged) when the entry lacks what we use."""
    try:
        product = item["product"]
        inventory = item.get("inventory") or {}
        status = str(item.get("status") or "")
        active = item["active"] if isinstance(item.get("active"), bool) else status.lower() == "active"
        stock = inventory.get("size", 0)
        if isinstance(stock, bool) or not isinstance(stock, int) or stock < 0 or not str(item["id"]):
            raise ValueError("inventory.size")
        return Offer(str(item["id"]), int(str(product["id"])), _price(item), stock, active, status,
                     str(item.get("type") or OFFER_TYPE))
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        event(log, "g2a.offer_unreadable", level=logging.WARNING, offer=_field(item, "id"), error=repr(exc))
        return None


def _price(item):
    """The offer's price, or None (unknown: the next sync writes ours) when G2A sends a shape we cannot read."""
    try:
        return _decimal(item.get("price"))
    except ValueError:
        event(log, "g2a.offer_price_unreadable", level=logging.WARNING, offer=item.get("id"),
              price=repr(item.get("price"))[:80])
        return None


def _field(item, name):
    return item.get(name) if isinstance(item, dict) else None


def _decimal(value):
    if value is None or isinstance(value, bool):
        return None
    try:
        amount = Decimal(str(value))
    except InvalidOperation:
        raise ValueError(f"price {value!r}") from None
    if not amount.is_finite():
        raise ValueError(f"price {value!r}")
    return amount


def _job_id(body):
    data = body.get("data") if isinstance(body, dict) else None
    job_id = data.get("jobId") if isinstance(data, dict) else None
    if not isinstance(job_id, str) or not job_id:
        raise _bad("write answered without data.jobId")
    return job_id


def _job(body, job_id):
    """(lower-case status, first element) of a job; an element that failed fails the job."""
    data = body.get("data") if isinstance(body, dict) else None
    if not isinstance(data, dict):
        raise _bad(f"job {job_id}: answer has no data object")
    elements = [e for e in data.get("elements") or [] if isinstance(e, dict)]
    status = str(data.get("status") or "").lower()
    failed = next((e for e in elements if str(e.get("status") or "").lower() in JOB_FAILED), None)
    if failed is not None:
        return "failed", failed
    return status, elements[0] if elements else {}


def _docs(body):
    docs = body.get("docs", body.get("data")) if isinstance(body, dict) else body
    docs = [docs] if isinstance(docs, dict) else docs
    return [doc for doc in docs if isinstance(doc, dict)] if isinstance(docs, list) else []


def _limit(value):
    if not isinstance(value, dict):
        return None
    try:
        low, high = _decimal(value.get("min")), _decimal(value.get("max"))
    except ValueError:
        return None
    return None if low is None and high is None else (low, high)
